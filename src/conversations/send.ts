// send: stream a snapshot into a QEMU waiting with -incoming, over a main channel and N multifd
// channels (PROTOCOL.md §7b).
//
// Sequence: validate the whole file first (nothing is sent for a corrupt one) → connect main and
// write its prologue at once (QEMU peeks each connection's first bytes and blocks until they come)
// → connect the channels, init + setup SYNC each → every present page, once, in packets of ≤ 128
// pages of one block → final sync (SYNC per channel, FLUSH on main) → SWITCHOVER_START, END →
// device state forwarded byte for byte → EOF, VMDESCRIPTION.
//
// The destination's answer comes on the return path: we PING at stage boundaries (configuration
// loaded, RAM set up) so a refusal says where it happened, and the final SHUT tells how loading
// ended (QEMU sends SHUT(1) when its stream failed to load). The device state itself is forwarded
// untouched: a PING inside it would end up in a snapshot written by a receiver. A snapshot holds every page once, so a single round suffices: the
// only syncs are the setup one and the final one.

import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { Command, MULTIFD_PAGES_PER_PACKET, ReturnPathMessage, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeConfiguration, withCapability } from '../codec/configuration.js';
import { ProtocolError } from '../codec/errors.js';
import { defaultSyncMode } from '../codec/machine-type.js';
import { ReturnPathParser } from '../codec/return-path.js';
import { decodePageRequest, encodeDiscards, encodePageRecords, encodePackagedHeader, encodePostcopyAdvise, encodePostcopyListen, encodePostcopyRun, type PageRecordState } from '../codec/postcopy.js';
import { PageRequestError, PostcopyPages } from '../engine/postcopy-pages.js';
import { PostcopyPhase } from './postcopy-phase.js';
import {
  encodeBlockEntry,
  encodeCommand,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeMultifdFlush,
  encodePing,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
} from '../codec/stream-encode.js';
import { publish } from '../engine/diagnostics.js';
import { getMethod } from '../engine/methods/registry.js';
import { MultifdSender, type PageBatch, type SendChannelStats } from '../engine/multifd-sender.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import type { TlsCreds } from '../transports/tls.js';
import { connectTo, gatherWrite } from '../transports/connect.js';

export interface SendOptions {
  /** Snapshot path, or an already opened (validated) snapshot. */
  file: string | SnapshotSource;
  /** Destination: tcp:HOST:PORT or unix:PATH (QEMU's migrate-incoming URI). */
  to: string;
  /** multifd channels; must equal the destination's multifd-channels. 0 = destination has multifd off. Default 2. */
  channels?: number;
  /** multifd-compression: none (default), zlib or zstd; must equal the destination's. */
  compression?: string;
  /** Compression level (zlib 1–9, zstd 1–22); the method's default (1, as QEMU's) when unset. */
  level?: number;
  /** The destination's -uuid; multifd init messages must carry it. */
  uuid?: Buffer;
  /** round: MULTIFD_FLUSH per sync; section: sync at every RAM EOS. auto: from the machine type. */
  syncMode?: 'auto' | 'round' | 'section';
  /** Open the return path (default true): the only way to learn without QMP whether loading succeeded. */
  returnPath?: boolean;
  /** TLS on every channel, with client credentials as for QEMU's tls-creds-x509 (the destination's tls-creds). */
  tls?: TlsCreds;
  /** Pages found all-zero are listed, not sent ('multifd', default) or sent as data ('none'). */
  zeroPageDetection?: 'multifd' | 'none';
  /**
   * Postcopy ("instant restore", PROTOCOL.md §6.2): the device state goes right after the switch,
   * the destination starts the guest, and the pages follow — the ones its guest touches first, the
   * rest in the background. The destination needs postcopy-ram on (and postcopy-preempt for
   * `preempt`). If the destination dies in postcopy, the guest it was running is lost.
   */
  postcopy?: boolean | PostcopyOptions;
  connectTimeoutMs?: number;
  /** Fails when no byte could be written and no answer came for this long. Default 60 s. */
  stallTimeoutMs?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface PostcopyOptions {
  /** Answer page requests on a second connection (the destination has postcopy-preempt on). */
  preempt?: boolean;
  /** Page bytes to send before the switch (multifd, or main without it). Default 0: switch at once. */
  precopyBytes?: number;
  /** Switch after this long at the latest (ms). Default: no time limit. */
  precopyMs?: number;
  /** Bytes/s for the background pages after the switch (requested pages are never held back). Default: unlimited. */
  bandwidth?: number;
  /** Pages per background batch after the switch. Default 128. */
  batchPages?: number;
}

/** What happened in postcopy; times in ms since send started. */
export interface PostcopySummary {
  preempt: boolean;
  /** Pages that went before the switch. */
  'precopy-pages': number;
  /** Pages sent after the switch (every page of the guest not sent before it, absent ones as ZERO records). */
  'postcopy-pages': number;
  'discard-ranges': number;
  /** When the switch began (end of the precopy phase). */
  'switch-time': number;
  /** The package (LISTEN, device state, RUN) was written. */
  'package-time': number;
  /** PONG(3): the destination loaded the device state. */
  'devices-loaded-time'?: number;
  /** PONG(0x42), the last ping before RUN in the package: the guest starts now (unless the destination runs with -S). */
  'run-time'?: number;
  /** Every page written. */
  'pages-time': number;
  /** SHUT(0): the destination has every page and finished. */
  'complete-time': number;
  /** Page requests (REQ_PAGES / REQ_PAGES_ID) from the destination. */
  requests: number;
  /** Pages sent because they were requested, ahead of the background scan. */
  'requested-pages': number;
  /** Requested pages that were already on their way (not sent twice). */
  'requests-already-sent': number;
  'preempt-pages': number;
  'preempt-bytes': number;
}

export interface SendProgress {
  phase: 'validating' | 'connecting' | 'ram' | 'device-state' | 'postcopy' | 'waiting' | 'completed' | 'failed';
  elapsedMs: number;
  transferred: number;
  normal: number;
  duplicate: number;
  /** Pages the snapshot holds (present pages); normal + duplicate reaches it when RAM is done. */
  pagesTotal: number;
  channels: number;
}

export interface SendSummary {
  status: 'completed';
  file: string;
  format: 'mapped-ram' | 'stream';
  to: string;
  machine: string;
  'total-time': number;
  transferred: number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  mbps: number;
  'sync-mode': 'round' | 'section' | 'none';
  compression: string;
  'return-path': boolean;
  /** confirmed: the destination acknowledged the device state and shut down cleanly. */
  destination: 'confirmed' | 'closed';
  'device-state-bytes': number;
  blocks: { name: string; 'used-length': number; 'pages-sent': number }[];
  channels: SendChannelStats[];
  postcopy?: PostcopySummary;
}

/** The destination closed a connection we were writing to; `where` names it, `detail` the socket error. */
export class DestinationClosedError extends Error {
  constructor(readonly where: string, readonly detail: string, message: string) {
    super(message);
    this.name = 'DestinationClosedError';
  }
}

/**
 * The destination went away (or failed) in postcopy, after its guest had started: that guest ran on
 * memory that was only partly there, so it is lost (QEMU's own postcopy has the same risk). The
 * snapshot is untouched and can be restored again.
 */
export class PostcopyDestinationLostError extends DestinationClosedError {
  constructor(where: string, detail: string, message: string) {
    super(where, detail, message);
    this.name = 'PostcopyDestinationLostError';
  }
}

export const POSTCOPY_LOSS_TEXT = 'in postcopy, after the guest had started there: that guest ran on memory the destination had only partly received, so it is lost (the snapshot file is intact; restore it again into a fresh QEMU)';

/** Nothing moved for stallTimeoutMs: the destination waits for something we do not send. */
export class StallError extends Error {
  override name = 'StallError';
}

export class SendHandle extends EventEmitter {
  readonly done: Promise<SendSummary>;
  private readonly controller = new AbortController();
  constructor(run: (h: SendHandle, signal: AbortSignal) => Promise<SendSummary>) {
    super();
    // Started on the next tick so callers can attach 'progress' listeners first.
    this.done = Promise.resolve().then(() => run(this, this.controller.signal));
    this.done.catch(() => {});
  }

  abort(reason = new Error('aborted')): void {
    this.controller.abort(reason);
  }
}

export function send(opts: SendOptions): SendHandle {
  return new SendHandle((h, signal) => new Sender(opts, h, signal).run());
}

/** PING values: each marks a stage the destination has loaded when it answers. */
const PING_CONFIG = 1;
const PING_RAM_SETUP = 2;
/** Postcopy pings, numbered as QEMU's source numbers them (§6.2). */
const PING_DISCARDED = 2;
const PING_DEVICES = 3;
/** QEMU 11.1's "package loaded" ping: the last thing in the package before RUN. */
const PING_PACKAGE_LOADED = 0x42;
const PING_LISTENING = 4;
const STAGE_TEXT: Record<number, string> = {
  0: 'before it accepted the configuration record or the multifd channels (machine type, capabilities, channel count, uuid or compression differ?)',
  [PING_CONFIG]: 'after the configuration record, while setting up RAM or the multifd channels (RAM block sizes, channel count or uuid differ? same machine type and -m as the snapshot?)',
  [PING_RAM_SETUP]: 'after RAM setup, while loading pages or the device state (multifd-compression or devices differ? same compression, machine type and devices as the snapshot?)',
};

const POSTCOPY_STAGE_TEXT: Record<number, string> = {
  0: STAGE_TEXT[0]!,
  [PING_CONFIG]: 'after the configuration record, during RAM setup, the pages before the switch or the discards (RAM block sizes, channel count or uuid differ? postcopy-ram on at the destination?)',
  [PING_DISCARDED]: 'after the discards, while reading or loading the device state in the package (devices differ? same machine type and devices as the snapshot?)',
  [PING_DEVICES]: POSTCOPY_LOSS_TEXT,
  [PING_LISTENING]: POSTCOPY_LOSS_TEXT,
};

const DEVICE_CHUNK = 1024 * 1024;

class Sender {
  private readonly startedAt = Date.now();
  private phase: SendProgress['phase'] = 'validating';
  private source!: SnapshotSource;
  private main: Socket | undefined;
  private readonly sockets: Socket[] = [];
  private multifd: MultifdSender | undefined;
  private failure: Error | undefined;
  private readonly failed: Promise<never>;
  private rejectFailed!: (e: Error) => void;
  private mainBytes = 0;
  private mainPages = 0;
  private mainZero = 0;
  private pagesTotal = 0;
  private lastPong = 0;
  private shut: number | undefined;
  private readonly answered: Promise<void>;
  private resolveAnswered!: () => void;
  private lastActivity = Date.now();
  private readonly channels: number;
  /** Postcopy settings when postcopy is on. */
  private readonly pc: PostcopyOptions | undefined;
  /** Pages handed out after LISTEN (and the precopy pages the destination keeps); exists from the switch on. */
  private pages: PostcopyPages | undefined;
  private postcopyPhase: PostcopyPhase | undefined;
  /** PING values answered, with when (ms since start). */
  private readonly pongs = new Map<number, number>();
  /** Set once RUN went out: from then on the destination's guest may be running. */
  private inPostcopy = false;
  /** Set once POSTCOPY_LISTEN went out: page requests may come from then on. */
  private listenSent = false;
  /** CONTINUE state of the main channel's page records. */
  private readonly mainRecords: PageRecordState = {};

  constructor(private readonly opts: SendOptions, private readonly handle: SendHandle, private readonly signal: AbortSignal) {
    this.channels = opts.channels ?? 2;
    if (!Number.isInteger(this.channels) || this.channels < 0 || this.channels > 255) {
      throw new RangeError(`channels must be 0..255 (got ${opts.channels})`);
    }
    this.pc = opts.postcopy === true ? {} : opts.postcopy ? opts.postcopy : undefined;
    this.failed = new Promise<never>((_, reject) => { this.rejectFailed = reject; });
    this.failed.catch(() => {});
    this.answered = new Promise<void>((resolve) => { this.resolveAnswered = resolve; });
  }

  progress(): SendProgress {
    const st = this.multifd?.stats() ?? [];
    const pc = this.postcopyPhase?.stats;
    return {
      phase: this.phase,
      elapsedMs: Date.now() - this.startedAt,
      transferred: this.mainBytes + st.reduce((n, c) => n + c.bytes, 0) + (pc?.preemptBytes ?? 0),
      normal: this.mainPages + st.reduce((n, c) => n + c.normalPages, 0) + (pc?.normal ?? 0),
      duplicate: this.mainZero + st.reduce((n, c) => n + c.zeroPages, 0) + (pc?.zero ?? 0),
      pagesTotal: this.pagesTotal,
      channels: this.channels,
    };
  }

  async run(): Promise<SendSummary> {
    const external = this.opts.signal;
    const onAbort = (): void => this.fail(new Error('aborted'));
    const onHandleAbort = (): void => this.fail(this.signal.reason instanceof Error ? this.signal.reason : new Error('aborted'));
    external?.addEventListener('abort', onAbort, { once: true });
    this.signal.addEventListener('abort', onHandleAbort, { once: true });
    const timer = setInterval(() => this.handle.emit('progress', this.progress()), this.opts.progressIntervalMs ?? 250);
    timer.unref();
    const stall = this.opts.stallTimeoutMs ?? 60000;
    const watchdog = setInterval(() => {
      if (Date.now() - this.lastActivity > stall) {
        const pong = this.lastPong;
        if (this.inPostcopy) {
          this.fail(new StallError(`no progress for ${Math.round(stall / 1000)} s ${POSTCOPY_LOSS_TEXT.replace('so it is lost', 'so it is stuck and will be lost')}: the destination stopped reading and answering`));
          return;
        }
        this.fail(new StallError(`no progress for ${Math.round(stall / 1000)} s: the destination stopped reading ${this.stageText(pong)}. A destination waiting for more multifd channels than we opened (--channels ${this.channels}), or one whose multifd sync mode differs (multifd-flush-after-each-section; --sync-mode), also stalls like this.`));
      }
    }, Math.min(1000, stall));
    watchdog.unref();
    const ownSource = typeof this.opts.file === 'string';
    try {
      if (external?.aborted) throw new Error('aborted');
      this.source = typeof this.opts.file === 'string' ? await openSnapshot(this.opts.file) : this.opts.file;
      return await Promise.race([this.transfer(), this.failed]);
    } catch (e) {
      this.fail(e as Error);
      throw this.failure ?? e;
    } finally {
      clearInterval(timer);
      clearInterval(watchdog);
      external?.removeEventListener('abort', onAbort);
      this.signal.removeEventListener('abort', onHandleAbort);
      this.multifd?.close();
      for (const s of this.sockets) s.destroy();
      if (ownSource && this.source) await this.source.close().catch(() => {});
      this.handle.emit('progress', this.progress());
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.phase = 'failed';
    publish('send-failed', { error: err });
    this.multifd?.fail(err);
    for (const s of this.sockets) s.destroy();
    this.rejectFailed(err);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private async write(bufs: Buffer[]): Promise<void> {
    this.check();
    await gatherWrite(this.main!, bufs).catch(async (e: Error) => { throw await this.connectionLost('main channel', e); });
    this.mainBytes += bufs.reduce((n, b) => n + b.length, 0);
    this.lastActivity = Date.now();
  }

  /**
   * The error for a write that failed because the destination went away. Its PONGs may still sit
   * unread on the main socket, so the stage is judged once that socket ended (or shortly after).
   */
  private async connectionLost(where: string, e: Error): Promise<Error> {
    if (this.failure) return this.failure;
    await Promise.race([this.answered, new Promise((r) => setTimeout(r, 500).unref())]);
    if (this.failure) return this.failure;
    if (this.inPostcopy) return new PostcopyDestinationLostError(where, e.message, `the destination closed the ${where} ${POSTCOPY_LOSS_TEXT} (${e.message})`);
    return new DestinationClosedError(where, e.message, `the destination closed the ${where} ${this.stageText(this.lastPong)} (${e.message})`);
  }

  private stageText(pong: number): string {
    return (this.pc ? POSTCOPY_STAGE_TEXT[pong] : STAGE_TEXT[pong]) ?? '';
  }

  private async transfer(): Promise<SendSummary> {
    const src = this.source;
    const returnPath = this.opts.returnPath ?? true;
    const syncMode = this.channels === 0 ? 'none' : this.opts.syncMode && this.opts.syncMode !== 'auto' ? this.opts.syncMode : defaultSyncMode(src.configuration.machine);
    const method = getMethod(this.opts.compression ?? 'none');
    if (method.name !== 'none' && this.channels === 0) throw new Error(`compression ${method.name} needs multifd channels (--channels ≥ 1)`);
    if (this.opts.level !== undefined) {
      const max = method.name === 'zlib' ? 9 : method.name === 'zstd' ? 20 : 0;
      if (method.name === 'none') throw new Error('a compression level needs a compression method (zlib or zstd)');
      if (!Number.isInteger(this.opts.level) || this.opts.level < 0 || this.opts.level > max) throw new RangeError(`${method.name} level must be 0..${max}, as QEMU's multifd-${method.name}-level (got ${this.opts.level})`);
    }
    const pc = this.pc;
    if (pc) {
      if (!returnPath) throw new Error('postcopy needs the return path (page requests and the end of the migration come over it)');
      if (src.blockList.some((b) => b.mrAddr !== undefined)) throw new Error('postcopy of a snapshot taken with x-ignore-shared is not supported');
      // Every page of the guest goes once: before the switch (present pages) or after it (all the others).
      for (const b of src.blockList) this.pagesTotal += Math.ceil(b.usedLength / TARGET_PAGE_SIZE);
    } else {
      for (const b of src.blockList) this.pagesTotal += src.presentPages(b.name);
    }
    publish('send-start', { file: src.path, format: src.format, pages: this.pagesTotal, syncMode, postcopy: pc !== undefined });

    this.phase = 'connecting';
    const connectTimeout = this.opts.connectTimeoutMs ?? 10000;
    this.main = await connectTo(this.opts.to, connectTimeout, this.opts.tls);
    this.adopt(this.main);
    if (returnPath) this.listenReturnPath(this.main);
    // The prologue goes out at once: QEMU blocks its main loop peeking at a new connection's
    // first bytes, and it loads nothing before all channels exist.
    const config = withCapability(src.configuration, 'mapped-ram', false);
    const sid = src.ramSection.sectionId;
    await this.write([
      encodeStreamHeader(),
      encodeConfiguration(config),
      ...(returnPath ? [encodeCommand(Command.OPEN_RETURN_PATH), encodePing(PING_CONFIG)] : []),
      // With postcopy-ram QEMU's source advises before RAM setup (host and target page size).
      ...(pc ? [encodePostcopyAdvise()] : []),
      encodeSectionFull(SectionType.START, sid, 'ram', src.ramSection.instanceId, src.ramSection.versionId),
      encodeMemSize(src.blockList.reduce((n, b) => n + b.usedLength, 0)),
      ...src.blockList.map((b) => encodeBlockEntry(b.name, b.usedLength, b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {})),
      ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
      encodeEos(),
      encodeFooter(sid),
      ...(returnPath && !pc ? [encodePing(PING_RAM_SETUP)] : []),
    ]);

    if (this.channels > 0) {
      const socks: Socket[] = [];
      const sender = new MultifdSender({
        channels: Array.from({ length: this.channels }, (_, i) => ({
          write: (bufs: readonly Buffer[]) =>
            gatherWrite(socks[i]!, bufs).then(
              () => { this.lastActivity = Date.now(); },
              async (e: Error) => { throw await this.connectionLost(`multifd channel ${i}`, e); },
            ),
        })),
        method,
        loader: src,
        ...(this.opts.uuid ? { uuid: this.opts.uuid } : {}),
        ...(this.opts.zeroPageDetection ? { zeroPageDetection: this.opts.zeroPageDetection } : {}),
        ...(this.opts.level !== undefined ? { level: this.opts.level } : {}),
      });
      sender.on('error', (e: Error) => this.fail(e));
      this.multifd = sender;
      // Each channel writes its init and setup SYNC as soon as it is connected (see above).
      await Promise.all(
        Array.from({ length: this.channels }, async (_, i) => {
          const s = await connectTo(this.opts.to, connectTimeout, this.opts.tls);
          socks[i] = s;
          this.adopt(s);
          await sender.setupChannel(i);
        }),
      );
      publish('send-channels', { channels: this.channels });
    }

    this.phase = 'ram';
    const ds = src.deviceState;
    let perBlock: Map<string, number>;
    let postcopy: PostcopySummary | undefined;
    if (pc) {
      const r = await this.postcopyTransfer(pc, syncMode, connectTimeout);
      perBlock = r.perBlock;
      postcopy = r.summary;
    } else {
      perBlock = await this.sendPages();

      // Final sync: every page written before the barrier the destination waits on.
      if (this.multifd) await this.multifd.sync();
      await this.write([
        ...(src.switchoverStart ? [encodeCommand(Command.SWITCHOVER_START)] : []),
        encodeSectionShort(SectionType.END, sid),
        ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
        encodeEos(),
        encodeFooter(sid),
        // dirty-bitmap & co., as received: where QEMU puts its other END sections.
        ...(src.iterableSections ? [src.iterableSections] : []),
      ]);

      this.phase = 'device-state';
      await this.forward(ds.fileOffset, ds.end);
    }

    this.phase = 'waiting';
    let destination: SendSummary['destination'] = 'closed';
    if (returnPath) {
      await this.answered;
      this.check();
      if (this.shut === undefined) {
        if (this.inPostcopy) throw new PostcopyDestinationLostError('main channel', 'closed', `the destination closed the connection ${POSTCOPY_LOSS_TEXT}, before it confirmed that it had every page`);
        throw new Error(`the destination closed the connection without confirming the load ${this.stageText(this.lastPong)}`);
      }
      if (this.shut !== 0) {
        if (this.inPostcopy) throw new PostcopyDestinationLostError('main channel', `SHUT ${this.shut}`, `the destination reported a failure (SHUT ${this.shut}) ${POSTCOPY_LOSS_TEXT}`);
        throw new Error(`the destination reported a failure (SHUT ${this.shut}) ${this.stageText(this.lastPong)}`);
      }
      destination = 'confirmed';
    }
    if (postcopy) {
      postcopy['complete-time'] = Date.now() - this.startedAt;
      // PONG(3) and PONG(0x42) come once the destination loaded the devices, which may be late.
      const devicesLoaded = this.pongs.get(PING_DEVICES);
      const run = this.pongs.get(PING_PACKAGE_LOADED);
      if (devicesLoaded !== undefined) postcopy['devices-loaded-time'] = devicesLoaded;
      if (run !== undefined) postcopy['run-time'] = run;
    }
    for (const s of this.sockets) s.end();
    this.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: SendSummary = {
      status: 'completed',
      file: src.path,
      format: src.format,
      to: this.opts.to,
      machine: src.configuration.machine,
      'total-time': elapsed,
      transferred: p.transferred,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round(((p.transferred * 8) / (elapsed * 1000)) * 100) / 100 : 0,
      'sync-mode': syncMode,
      compression: this.channels > 0 ? method.name : 'none',
      'return-path': returnPath,
      destination,
      'device-state-bytes': ds.end,
      blocks: src.blockList.map((b) => ({ name: b.name, 'used-length': b.usedLength, 'pages-sent': perBlock.get(b.name) ?? 0 })),
      channels: this.multifd?.stats() ?? [],
      ...(postcopy ? { postcopy } : {}),
    };
    publish('send-completed', { summary });
    return summary;
  }

  /**
   * Postcopy (PROTOCOL.md §6.2, §6.4): pages before the switch within the budget, then the switch
   * in QEMU's order — one SYNC per multifd channel and a RAM PART (FLUSH in round mode, EOS),
   * SWITCHOVER_START, discards for every page not sent yet, PING(2), the package (LISTEN, device
   * sections, PING(3), PING(0x42), RUN), PING(4) — then every remaining page exactly once, requested
   * ones first, and END (EOS, no FLUSH), EOF. No VMDESCRIPTION: QEMU's postcopy destination stops
   * reading at EOF (its listen thread ends there), and QEMU's postcopy source sends none.
   */
  private async postcopyTransfer(pc: PostcopyOptions, syncMode: SendSummary['sync-mode'], connectTimeout: number): Promise<{ perBlock: Map<string, number>; summary: PostcopySummary }> {
    const src = this.source;
    if (src.iterableSections) throw new ProtocolError('UNSUPPORTED', 'the snapshot holds dirty-bitmap sections, which send replays only without postcopy');
    const sid = src.ramSection.sectionId;
    const pages = new PostcopyPages(src);
    this.pages = pages;

    // Pages before the switch: in file order, within the budget. QEMU places them as in precopy.
    const budgetBytes = pc.precopyBytes ?? 0;
    const deadline = pc.precopyMs !== undefined ? this.startedAt + pc.precopyMs : undefined;
    const perBlock = budgetBytes > 0 || (pc.precopyMs ?? 0) > 0
      ? await this.sendPages({ bytes: budgetBytes > 0 ? budgetBytes : Infinity, ...(deadline !== undefined ? { deadline } : {}) })
      : new Map<string, number>();
    // Pages the destination has for good (without multifd, all-zero pages are left to postcopy).
    const precopyPages = this.pagesTotal - pages.unsent;
    const switchTime = Date.now() - this.startedAt;
    publish('send-postcopy-switch', { precopyPages });
    this.handle.emit('postcopy-switch', { elapsedMs: switchTime, precopyPages });

    // The preempt channel connects first (QEMU's source does so before its multifd sync): the
    // destination takes the connection after main and every multifd channel as preempt.
    let preempt: Socket | undefined;
    if (pc.preempt) {
      // Only once the destination answered PING(1), as QEMU's source does: then it has accepted
      // main and every multifd channel, so this connection is the one after them. Earlier, it can
      // find the listen backlog (sized for the multifd channels) full: EAGAIN on a unix socket.
      await this.pongArrived(PING_CONFIG);
      preempt = await connectTo(this.opts.to, connectTimeout, this.opts.tls);
      this.adopt(preempt);
    }

    // Finish multifd: every page before the barrier, which the destination passes before LISTEN
    // (multifd writes pages non-atomically). Afterwards the channels stay open but idle.
    if (this.multifd) await this.multifd.sync();
    const ranges = src.blockList.map((b) => ({ block: b.name, ranges: pages.unsentRanges(b.name) }));
    const discards = ranges.flatMap((r) => encodeDiscards(r.block, r.ranges));
    const ds = src.deviceState;
    const devicesLength = ds.eofOffset;
    const packageLength = 5 + devicesLength + 9 + 9 + 5;
    await this.write([
      encodeSectionShort(SectionType.PART, sid),
      ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
      encodeEos(),
      encodeFooter(sid),
      ...(src.switchoverStart ? [encodeCommand(Command.SWITCHOVER_START)] : []),
      ...discards,
      encodePing(PING_DISCARDED),
      encodePackagedHeader(packageLength),
      encodePostcopyListen(),
    ]);
    this.listenSent = true;
    this.phase = 'device-state';
    // The device sections, without EOF and VMDESCRIPTION (the package is a stream without header).
    await this.forward(ds.fileOffset, devicesLength);
    await this.write([encodePing(PING_DEVICES), encodePing(PING_PACKAGE_LOADED), encodePostcopyRun(), encodePing(PING_LISTENING)]);
    // From RUN on the destination's guest may run: a failure from here loses it.
    this.inPostcopy = true;
    const packageTime = Date.now() - this.startedAt;
    this.phase = 'postcopy';
    publish('send-postcopy-package', { bytes: packageLength });

    // Every page not sent yet, exactly once; the main channel's next record names its block.
    this.mainRecords.lastBlock = undefined;
    const phase = new PostcopyPhase({
      source: src,
      pages,
      mainRecords: this.mainRecords,
      writeMain: (bufs) => this.write(bufs),
      ...(preempt ? { writePreempt: (bufs: Buffer[]) => this.writeTo(preempt, 'preempt channel', bufs) } : {}),
      ...(pc.bandwidth !== undefined ? { bandwidth: pc.bandwidth } : {}),
      ...(pc.batchPages !== undefined ? { batchPages: pc.batchPages } : {}),
      failed: this.failed,
    });
    this.postcopyPhase = phase;
    await phase.run();
    const pagesTime = Date.now() - this.startedAt;
    await this.write([encodeSectionShort(SectionType.END, sid), encodeEos(), encodeFooter(sid), Buffer.from([SectionType.EOF])]);
    publish('send-postcopy-pages-done', { stats: phase.stats, pages: pages.stats });

    for (const b of src.blockList) perBlock.set(b.name, Math.ceil(b.usedLength / TARGET_PAGE_SIZE));
    const summary: PostcopySummary = {
      preempt: preempt !== undefined,
      'precopy-pages': precopyPages,
      'postcopy-pages': phase.stats.normal + phase.stats.zero,
      'discard-ranges': ranges.reduce((n, r) => n + r.ranges.length, 0),
      'switch-time': switchTime,
      'package-time': packageTime,
      'pages-time': pagesTime,
      'complete-time': 0,
      requests: pages.stats.requests,
      'requested-pages': pages.stats.requestedPages,
      'requests-already-sent': pages.stats.alreadySent,
      'preempt-pages': phase.stats.preemptPages,
      'preempt-bytes': phase.stats.preemptBytes,
    };
    return { perBlock, summary };
  }

  private readonly pongWaiters = new Map<number, (() => void)[]>();

  /** Resolves when PONG(value) has arrived (the stall watchdog and failures end the wait). */
  private pongArrived(value: number): Promise<void> {
    if (this.pongs.has(value)) return Promise.resolve();
    return Promise.race([
      new Promise<void>((resolve) => {
        const list = this.pongWaiters.get(value) ?? [];
        list.push(resolve);
        this.pongWaiters.set(value, list);
      }),
      this.failed,
    ]);
  }

  /** A gather write to another connection than main (the preempt channel). */
  private async writeTo(sock: Socket, where: string, bufs: Buffer[]): Promise<void> {
    this.check();
    await gatherWrite(sock, bufs).catch(async (e: Error) => { throw await this.connectionLost(where, e); });
    this.lastActivity = Date.now();
  }

  private adopt(s: Socket): void {
    this.sockets.push(s);
    // Write errors surface through gatherWrite; this keeps an EPIPE from crashing the process.
    s.on('error', () => {});
    s.on('close', () => {
      if (s === this.main) this.resolveAnswered();
    });
  }

  private listenReturnPath(s: Socket): void {
    const rp = new ReturnPathParser();
    s.on('data', (chunk: Buffer) => {
      this.lastActivity = Date.now();
      try {
        rp.push(chunk);
        for (let m = rp.next(); m !== null; m = rp.next()) {
          if (m.type === ReturnPathMessage.PONG) {
            const v = m.payload.readUInt32BE(0);
            if (!this.pongs.has(v)) this.pongs.set(v, Date.now() - this.startedAt);
            for (const w of this.pongWaiters.get(v) ?? []) w();
            this.pongWaiters.delete(v);
            // Stages are 0..4; 0x42 (package loaded) is not one of them.
            if (v <= PING_LISTENING) this.lastPong = Math.max(this.lastPong, v);
            publish('send-pong', { value: v });
            if (this.pc && v === PING_PACKAGE_LOADED) this.handle.emit('postcopy-running', { elapsedMs: Date.now() - this.startedAt });
          } else if (m.type === ReturnPathMessage.SHUT) {
            this.shut = m.payload.readUInt32BE(0);
            this.resolveAnswered();
          } else if (m.type === ReturnPathMessage.REQ_PAGES || m.type === ReturnPathMessage.REQ_PAGES_ID) {
            const req = decodePageRequest(m.type, m.payload);
            // Legitimate from LISTEN on: loading the devices in the package may touch guest memory.
            if (!this.pages || !this.listenSent) {
              throw new ProtocolError('BAD_RECORD', `page request (${req.block ?? 'same block'} at 0x${req.start.toString(16)}) before the destination was told to listen: ${this.pc ? 'it was not in postcopy yet' : 'this is not a postcopy migration'}`);
            }
            // A bad request throws a PageRequestError naming what was wrong.
            this.pages.request(req);
            publish('send-page-request', req);
          }
          // SWITCHOVER_ACK and others need no answer from a sender that never waits on them.
        }
      } catch (e) {
        this.fail(e instanceof ProtocolError || e instanceof PageRequestError ? e : new ProtocolError('BAD_RECORD', `return path: ${(e as Error).message}`));
      }
    });
    s.on('end', () => this.resolveAnswered());
  }

  /**
   * Every present page once: batches of ≤ 128 pages of one block, in block order. With a budget
   * (postcopy's pages before the switch), stops at the first batch boundary past it.
   */
  private async sendPages(budget?: { bytes: number; deadline?: number }): Promise<Map<string, number>> {
    const src = this.source;
    const perBlock = new Map<string, number>();
    let spent = 0;
    const exhausted = (): boolean => budget !== undefined && (spent >= budget.bytes || (budget.deadline !== undefined && Date.now() >= budget.deadline));
    for (const b of src.blockList) {
      let next = 0;
      let sent = 0;
      while (!exhausted()) {
        const runs: number[] = [];
        let pages = 0;
        src.forEachRun(b.name, (first, count) => {
          const take = Math.min(count, MULTIFD_PAGES_PER_PACKET - pages);
          runs.push(first, take);
          pages += take;
          next = first + take;
          return pages < MULTIFD_PAGES_PER_PACKET;
        }, next);
        if (pages === 0) break;
        const batch: PageBatch = { block: b.name, runs, pages };
        if (this.multifd) {
          // QEMU ≥ 11.1 with postcopy-ram writes multifd zero pages too, so all of them count as placed.
          if (this.pages) for (let i = 0; i < runs.length; i += 2) this.pages.markSent(b.name, runs[i]!, runs[i + 1]!);
          await this.multifd.send(batch);
        } else {
          await this.sendOnMain(batch);
        }
        sent += pages;
        spent += pages * TARGET_PAGE_SIZE;
        this.check();
      }
      perBlock.set(b.name, sent);
    }
    return perBlock;
  }

  private mainScratch: Buffer | undefined;
  private readonly zeroPage = Buffer.alloc(TARGET_PAGE_SIZE);

  /**
   * Without multifd, pages travel as PAGE records in a PART section of the main channel. All-zero
   * pages stay at home: a fresh destination's RAM is zero (with postcopy they are left to the
   * postcopy phase, which must place every page the destination has not received).
   */
  private async sendOnMain(batch: PageBatch): Promise<void> {
    const src = this.source;
    this.mainScratch ??= Buffer.allocUnsafe(src.scratchBytes(MULTIFD_PAGES_PER_PACKET));
    const views = await src.loadRuns(batch.block, batch.runs, batch.runs.length / 2, this.mainScratch);
    const offsets: number[] = [];
    const data: Buffer[] = [];
    let v = 0;
    let vPos = 0;
    const zeroDetect = (this.opts.zeroPageDetection ?? 'multifd') === 'multifd';
    for (let r = 0; r < batch.runs.length; r += 2) {
      for (let p = batch.runs[r]!; p < batch.runs[r]! + batch.runs[r + 1]!; p++) {
        while (vPos >= views[v]!.length) { v++; vPos = 0; }
        const page = views[v]!.subarray(vPos, vPos + TARGET_PAGE_SIZE);
        vPos += TARGET_PAGE_SIZE;
        if (zeroDetect && page.equals(this.zeroPage)) {
          if (!this.pages) this.mainZero++;
          continue;
        }
        offsets.push(p * TARGET_PAGE_SIZE);
        data.push(page);
        this.pages?.markSent(batch.block, p, 1);
        this.mainPages++;
      }
    }
    if (data.length === 0) return;
    // CONTINUE refers to the block of the previous record on the channel, across sections.
    await this.write([
      encodeSectionShort(SectionType.PART, src.ramSection.sectionId),
      ...encodePageRecords(this.mainRecords, batch.block, offsets, data),
      encodeEos(),
      encodeFooter(src.ramSection.sectionId),
    ]);
  }

  /** Copies [position, position + length) of the file to the main channel. */
  private async forward(position: number, length: number): Promise<void> {
    const buf = Buffer.allocUnsafe(Math.min(DEVICE_CHUNK, Math.max(1, length)));
    for (let done = 0; done < length; ) {
      const n = Math.min(buf.length, length - done);
      const chunk = await this.source.readAt(position + done, n, buf);
      await this.write([chunk]);
      done += n;
    }
  }
}

