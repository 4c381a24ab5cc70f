// What send writes on main at its stage boundaries, and what a failure after each stage means.
// The destination answers every PING with a PONG on the return path, so the highest PONG tells
// how far it loaded when it refused, closed or stalled (docs/protocol.md §6.1).

import { Command, SectionType } from '../codec/constants.js';
import { encodeConfiguration, withCapability } from '../codec/configuration.js';
import { DestinationClosedError, DestinationRefusedError, POSTCOPY_LOSS_TEXT, PostcopyDestinationLostError, StallError } from '../codec/errors.js';
import { encodePostcopyAdvise } from '../codec/postcopy.js';
import { pageSizeSummary } from '../codec/ram-page-sizes.js';
import { encodeBlockEntry, encodeCommand, encodeEos, encodeFooter, encodeMemSize, encodeMultifdFlush, encodePing, encodeSectionFull, encodeSectionShort, encodeStreamHeader } from '../codec/stream-encode.js';
import type { SnapshotSource } from '../engine/snapshot.js';

/** PING values, numbered as QEMU's source numbers them (§6.2). */
export const PING_CONFIG = 1;
export const PING_RAM_SETUP = 2;
export const PING_DISCARDED = 2;
export const PING_DEVICES = 3;
export const PING_LISTENING = 4;
/** QEMU 11.1's "package loaded" ping: the last thing in the package before RUN. */
export const PING_PACKAGE_LOADED = 0x42;

const STAGE_TEXT: Record<number, string> = {
  0: 'before it accepted the configuration record or the multifd channels (machine type, capabilities, channel count, uuid or compression differ?)',
  [PING_CONFIG]: 'after the configuration record, while setting up RAM or the multifd channels (RAM block sizes, channel count or uuid differ? same machine type and -m as the snapshot?)',
  [PING_RAM_SETUP]: 'after RAM setup, while loading pages or the device state (multifd-compression or devices differ? same compression, machine type and devices as the snapshot?)',
};

const POSTCOPY_STAGE_TEXT: Record<number, string> = {
  0: STAGE_TEXT[0]!,
  [PING_CONFIG]: 'after the configuration record, during RAM setup, the pages before the switch or the discards (RAM block sizes, channel count or uuid differ? postcopy-ram on at the destination? RAM page sizes differ: a hugepage-backed destination needs its page sizes, --page-size BLOCK=SIZE?)',
  [PING_DISCARDED]: 'after the discards, while reading or loading the device state in the package (devices differ? same machine type and devices as the snapshot?)',
  [PING_DEVICES]: POSTCOPY_LOSS_TEXT,
  [PING_LISTENING]: POSTCOPY_LOSS_TEXT,
};

/** Where the destination was, by the highest stage PING it answered, for an error message. */
export function stageText(postcopy: boolean, lastPong: number): string {
  return (postcopy ? POSTCOPY_STAGE_TEXT[lastPong] : STAGE_TEXT[lastPong]) ?? '';
}

/**
 * Main's prologue: header, configuration (mapped-ram off: the stream carries pages), the return
 * path with PING(1), postcopy's ADVISE, RAM setup (START, MEM_SIZE, the block list, the setup
 * sync) and PING(2). It goes out at once: QEMU blocks its main loop peeking at a new connection's
 * first bytes, and it loads nothing before all channels exist.
 */
export function encodePrologue(src: SnapshotSource, o: { returnPath: boolean; postcopy: boolean; syncMode: 'round' | 'section' | 'none'; pageSizes?: ReadonlyMap<string, number> }): Buffer[] {
  const sid = src.ramSection.sectionId;
  // With postcopy-ram QEMU's source lists a block's page size where it differs from the host's
  // (4 KiB here), and the destination reads it exactly for its blocks that have such pages.
  const sizes = o.postcopy ? o.pageSizes ?? new Map<string, number>() : new Map<string, number>();
  return [
    encodeStreamHeader(),
    encodeConfiguration(withCapability(src.configuration, 'mapped-ram', false)),
    ...(o.returnPath ? [encodeCommand(Command.OPEN_RETURN_PATH), encodePing(PING_CONFIG)] : []),
    // With postcopy-ram QEMU's source advises before RAM setup (host and target page size).
    ...(o.postcopy ? [encodePostcopyAdvise(pageSizeSummary(src.blockList.map((b) => b.name), sizes))] : []),
    encodeSectionFull(SectionType.START, sid, 'ram', src.ramSection.instanceId, src.ramSection.versionId),
    encodeMemSize(src.blockList.reduce((n, b) => n + b.usedLength, 0)),
    ...src.blockList.map((b) => encodeBlockEntry(b.name, b.usedLength, {
      ...(sizes.has(b.name) ? { pageSize: sizes.get(b.name)! } : {}),
      ...(b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {}),
    })),
    ...(o.syncMode === 'round' ? [encodeMultifdFlush()] : []),
    encodeEos(),
    encodeFooter(sid),
    ...(o.returnPath && !o.postcopy ? [encodePing(PING_RAM_SETUP)] : []),
  ];
}

/**
 * The end of RAM after the final multifd sync: SWITCHOVER_START, END (FLUSH in round mode), EOS,
 * then the snapshot's other iterable sections (dirty-bitmap & co.) as received, where QEMU puts
 * their END sections.
 */
export function encodeRamEnd(src: SnapshotSource, syncMode: 'round' | 'section' | 'none'): Buffer[] {
  const sid = src.ramSection.sectionId;
  return [
    ...(src.switchoverStart ? [encodeCommand(Command.SWITCHOVER_START)] : []),
    encodeSectionShort(SectionType.END, sid),
    ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
    encodeEos(),
    encodeFooter(sid),
    ...(src.iterableSections ? [src.iterableSections] : []),
  ];
}

/** Where send stood when something went wrong: what the destination loaded, whether its guest may run. */
export interface SendStage {
  /** The highest stage PING the destination answered. */
  lastPong: number;
  postcopy: boolean;
  /** RUN went out: the destination's guest may be running, and a failure loses it. */
  inPostcopy: boolean;
}

export function stallError(st: SendStage, seconds: number, channels: number): StallError {
  return new StallError(st.inPostcopy
    ? `no progress for ${seconds} s ${POSTCOPY_LOSS_TEXT.replace('so it is lost', 'so it is stuck and will be lost')}: the destination stopped reading and answering`
    : `no progress for ${seconds} s: the destination stopped reading ${stageText(st.postcopy, st.lastPong)}. A destination waiting for more multifd channels than we opened (--channels ${channels}), or one whose multifd sync mode differs (multifd-flush-after-each-section; --sync-mode), also stalls like this.`);
}

export function closedError(st: SendStage, where: string, detail: string): DestinationClosedError {
  return st.inPostcopy
    ? new PostcopyDestinationLostError(where, detail, `the destination closed the ${where} ${POSTCOPY_LOSS_TEXT} (${detail})`)
    : new DestinationClosedError(where, detail, `the destination closed the ${where} ${stageText(st.postcopy, st.lastPong)} (${detail})`);
}

/** The destination's verdict on the return path as an error; undefined for SHUT(0), the load confirmed. */
export function verdictError(st: SendStage, shut: number | undefined): Error | undefined {
  const stage = stageText(st.postcopy, st.lastPong);
  if (shut === undefined) {
    if (st.inPostcopy) return new PostcopyDestinationLostError('main channel', 'closed', `the destination closed the connection ${POSTCOPY_LOSS_TEXT}, before it confirmed that it had every page`);
    return new DestinationClosedError('main channel', 'closed without confirming the load', `the destination closed the connection without confirming the load ${stage}`);
  }
  if (shut === 0) return undefined;
  if (st.inPostcopy) return new PostcopyDestinationLostError('main channel', `SHUT ${shut}`, `the destination reported a failure (SHUT ${shut}) ${POSTCOPY_LOSS_TEXT}`);
  return new DestinationRefusedError(shut, `the destination reported a failure (SHUT ${shut}) ${stage}`);
}
