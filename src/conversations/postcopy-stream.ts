// What receive and relay both check when a source switches to postcopy (PROTOCOL.md §6.2, §6.4):
// the discards, the package, and the end of the stream. Each conversation then does its own part
// (receive answers the package's PINGs; relay passes it on and B answers).

import { Command, SectionType } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { decodeDiscard, encodeEofAndVmdesc, findDeviceSections, splitPackage, synthesizeVmdesc, type FoundSection } from '../codec/postcopy.js';

/** Checks a POSTCOPY_RAM_DISCARD against the block list; returns its number of ranges. */
export function checkDiscard(payload: Buffer, advised: boolean, blocks: ReadonlyMap<string, { usedLength: number }>): number {
  if (!advised) throw new ProtocolError('BAD_RECORD', 'POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE');
  const d = decodeDiscard(payload);
  const b = blocks.get(d.block);
  if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `POSTCOPY_RAM_DISCARD names unknown RAM block "${d.block}"`);
  for (const r of d.ranges) {
    if (r.start + r.length > b.usedLength) throw new ProtocolError('OFFSET_OUT_OF_RANGE', `POSTCOPY_RAM_DISCARD range 0x${r.start.toString(16)}+0x${r.length.toString(16)} is outside block "${d.block}"`);
  }
  return d.ranges.length;
}

export interface OpenedPackage {
  devices: Buffer;
  sections: FoundSection[];
  /** PING values in the package, in order (the destination answers them once it is loaded). */
  pings: number[];
}

/** Checks that a package may come now and holds LISTEN, device sections, PINGs, RUN. */
export function openPackage(data: Buffer, at: { advised: boolean; returnPath: boolean; switched: boolean; inRam: boolean }): OpenedPackage {
  if (!at.advised) throw new ProtocolError('BAD_RECORD', 'PACKAGED command without POSTCOPY_ADVISE');
  if (!at.returnPath) throw new ProtocolError('BAD_RECORD', 'PACKAGED command without a return path (postcopy needs one)');
  if (at.switched) throw new ProtocolError('BAD_RECORD', 'a second PACKAGED command');
  if (!at.inRam) throw new ProtocolError('BAD_RECORD', 'PACKAGED command outside the RAM migration');
  const pkg = splitPackage(data);
  if (pkg.leading.length !== 1 || pkg.leading[0]!.cmd !== Command.POSTCOPY_LISTEN) {
    throw new ProtocolError('BAD_RECORD', `package starts with commands ${pkg.leading.map((c) => c.cmd).join(',') || 'none'} (expected POSTCOPY_LISTEN)`);
  }
  if (pkg.trailing.at(-1)?.cmd !== Command.POSTCOPY_RUN) throw new ProtocolError('BAD_RECORD', 'package does not end with POSTCOPY_RUN');
  return {
    devices: pkg.devices,
    sections: findDeviceSections(pkg.devices),
    pings: pkg.trailing.filter((c) => c.cmd === Command.PING).map((c) => c.payload.readUInt32BE(0)),
  };
}

/**
 * A postcopy stream ends with EOF after RAM END: no device sections, no VMDESCRIPTION. Returns
 * what a snapshot stores there instead: EOF and a description of the package's sections (our
 * tools walk the device state by it; QEMU ignores it when loading).
 */
export function postcopyEnd(data: readonly Buffer[], sections: readonly FoundSection[], seenBefore: boolean): Buffer[] {
  const bytes = Buffer.concat(data);
  if (seenBefore || bytes.length !== 1 || bytes[0] !== SectionType.EOF) {
    throw new ProtocolError('BAD_RECORD', `${bytes.length} unexpected bytes after RAM END in a postcopy stream (expected only EOF)`);
  }
  return encodeEofAndVmdesc(synthesizeVmdesc(sections));
}

/**
 * Whether a new connection is the source's preempt channel (it has no magic, PROTOCOL.md §6.3):
 * while one is possible (postcopy advised, main channel there, no preempt yet), the connection
 * after all multifd channels identified themselves, as QEMU's destination takes it (`byOrder`),
 * or one whose first bytes are no magic (it raced a multifd channel's init).
 */
export function preemptExpected(possible: boolean, multifdConnected: number, channels: number, byOrder: boolean): boolean {
  return possible && (!byOrder || multifdConnected >= channels);
}
