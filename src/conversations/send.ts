// send: stream a snapshot into a QEMU waiting with -incoming, over a main channel and N multifd
// channels (docs/protocol.md §7b).
//
// Sequence: validate the whole file first (nothing is sent for a corrupt one) → connect main and
// write its prologue at once (QEMU peeks each connection's first bytes and blocks until they come)
// → connect the channels, init + setup SYNC each → every present page, once, in packets of ≤ 128
// pages of one block → final sync (SYNC per channel, FLUSH on main) → SWITCHOVER_START, END →
// device state forwarded byte for byte → EOF, VMDESCRIPTION. With postcopy, send-postcopy.ts
// takes over after the pages before the switch.
//
// The destination's answer comes on the return path: we PING at stage boundaries (configuration
// loaded, RAM set up) so a refusal says where it happened, and the final SHUT tells how loading
// ended (QEMU sends SHUT(1) when its stream failed to load). The device state itself is forwarded
// untouched: a PING inside it would end up in a snapshot written by a receiver. A snapshot holds
// every page once, so a single round suffices: the only syncs are the setup one and the final one.
// The connections, the return path and the stall watchdog are the outbound side's.

import { ReturnPathMessage, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { abortError, InvalidOptionError, ProtocolError } from '../codec/errors.js';
import { defaultSyncMode } from '../codec/machine-type.js';
import type { PageRecordState } from '../codec/postcopy.js';
import { publish } from '../engine/diagnostics.js';
import { checkLevel, getMethod } from '../engine/methods/registry.js';
import type { MultifdSender } from '../engine/multifd-sender.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import type { PostcopyPages } from '../engine/postcopy-pages.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import { ConversationHandle } from './handle.js';
import { OutboundSide } from './outbound-side.js';
import type { PostcopyPhase } from './postcopy-phase.js';
import { openMultifd, PageSender } from './send-pages.js';
import { destinationPageSizes, sendPostcopy } from './send-postcopy.js';
import { closedError, encodePrologue, encodeRamEnd, PING_DEVICES, PING_LISTENING, PING_PACKAGE_LOADED, stallError, verdictError, type SendStage } from './send-stages.js';
import type { PostcopyOptions, PostcopySummary, SendEvents, SendOptions, SendProgress, SendSummary } from './send-types.js';

export type { PostcopyOptions, PostcopySummary, SendEvents, SendOptions, SendProgress, SendSummary } from './send-types.js';
export { DestinationClosedError, POSTCOPY_LOSS_TEXT, PostcopyDestinationLostError, StallError } from '../codec/errors.js';

export class SendHandle extends ConversationHandle<SendSummary, SendEvents> {}

/** Starts sending on the next tick (so 'progress' listeners can be attached first). */
export function send(opts: SendOptions): SendHandle {
  return new SendHandle((h, signal) => {
    let sender: Sender | undefined;
    return {
      done: Promise.resolve().then(() => (sender = new Sender(opts, h, signal)).run()),
      abort: (e) => sender?.fail(e),
    };
  }, opts.signal);
}

class Sender {
  private readonly startedAt = Date.now();
  private phase: SendProgress['phase'] = 'validating';
  private source!: SnapshotSource;
  private readonly out: OutboundSide;
  private multifd: MultifdSender | undefined;
  private pageSender: PageSender | undefined;
  private postcopyPhase: PostcopyPhase | undefined;
  private failure: Error | undefined;
  private readonly failed: Promise<never>;
  private rejectFailed!: (e: Error) => void;
  private mainBytes = 0;
  private pagesTotal = 0;
  /** The highest stage PING the destination answered (0..4). */
  private lastPong = 0;
  private readonly channels: number;
  private readonly pc: PostcopyOptions | undefined;
  /** Set once POSTCOPY_LISTEN went out: page requests may come from then on. */
  private listening: PostcopyPages | undefined;
  /** Set once RUN went out: from then on the destination's guest may be running. */
  private inPostcopy = false;
  /** CONTINUE state of the main channel's page records. */
  private readonly mainRecords: PageRecordState = {};

  constructor(private readonly opts: SendOptions, private readonly handle: ConversationHandle<SendSummary, SendEvents>, private readonly signal: AbortSignal) {
    this.channels = opts.channels ?? 2;
    if (!Number.isInteger(this.channels) || this.channels < 0 || this.channels > 255) throw new InvalidOptionError(`channels must be 0..255 (got ${opts.channels})`);
    this.pc = opts.postcopy === true ? {} : opts.postcopy ? opts.postcopy : undefined;
    this.failed = new Promise<never>((_, reject) => { this.rejectFailed = reject; });
    this.failed.catch(() => {});
    this.out = new OutboundSide({
      to: opts.to,
      ...(opts.tls ? { tls: opts.tls } : {}),
      ...(opts.connectTimeoutMs !== undefined ? { connectTimeoutMs: opts.connectTimeoutMs } : {}),
      ...(opts.stallTimeoutMs !== undefined ? { stallTimeoutMs: opts.stallTimeoutMs } : {}),
      stallError: (s) => stallError(this.stage(), s, this.channels),
      closedError: (where, detail) => closedError(this.stage(), where, detail),
      onPageRequest: (req) => {
        // Legitimate from LISTEN on: loading the devices in the package may touch guest memory.
        if (!this.listening) throw new ProtocolError('BAD_RECORD', `page request (${req.block ?? 'same block'} at 0x${req.start.toString(16)}) before the destination was told to listen: ${this.pc ? 'it was not in postcopy yet' : 'this is not a postcopy migration'}`);
        // A bad request throws a PageRequestError naming what was wrong.
        this.listening.request(req);
        publish('send', 'page-request', req);
      },
      onMessage: (m) => {
        if (m.type !== ReturnPathMessage.PONG) return;
        const v = m.payload.readUInt32BE(0);
        // Stages are 0..4; 0x42 (package loaded) is not one of them.
        if (v <= PING_LISTENING) this.lastPong = Math.max(this.lastPong, v);
        publish('send', 'pong', { value: v });
        if (this.pc && v === PING_PACKAGE_LOADED) this.handle.emit('postcopy-running', { elapsedMs: Date.now() - this.startedAt });
      },
      fail: (e) => this.fail(e),
      failure: () => this.failure,
    });
  }

  progress(): SendProgress {
    const st = this.multifd?.stats() ?? [];
    const pc = this.postcopyPhase?.stats;
    return {
      phase: this.phase,
      elapsedMs: Date.now() - this.startedAt,
      transferred: this.mainBytes + st.reduce((n, c) => n + c.bytes, 0) + (pc?.preemptBytes ?? 0),
      normal: (this.pageSender?.mainPages ?? 0) + st.reduce((n, c) => n + c.normalPages, 0) + (pc?.normal ?? 0),
      duplicate: (this.pageSender?.mainZero ?? 0) + st.reduce((n, c) => n + c.zeroPages, 0) + (pc?.zero ?? 0),
      pagesTotal: this.pagesTotal,
      channels: this.channels,
    };
  }

  async run(): Promise<SendSummary> {
    const timer = setInterval(() => this.handle.emit('progress', this.progress()), this.opts.progressIntervalMs ?? 250);
    timer.unref();
    this.out.watch();
    const ownSource = typeof this.opts.file === 'string';
    try {
      if (this.signal.aborted) throw abortError(this.signal.reason);
      this.source = typeof this.opts.file === 'string' ? await openSnapshot(this.opts.file) : this.opts.file;
      return await Promise.race([this.transfer(), this.failed]);
    } catch (e) {
      this.fail(e as Error);
      throw this.failure ?? e;
    } finally {
      clearInterval(timer);
      this.multifd?.close();
      this.out.destroy();
      if (ownSource && this.source) await this.source.close().catch(() => {});
      this.handle.emit('progress', this.progress());
    }
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.phase = 'failed';
    publish('send', 'failed', { error: err });
    this.multifd?.fail(err);
    this.out.stop(err);
    this.rejectFailed(err);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private async write(bufs: Buffer[]): Promise<void> {
    await this.out.write(this.out.main!, bufs);
    this.mainBytes += bufs.reduce((n, b) => n + b.length, 0);
  }

  private stage(): SendStage {
    return { lastPong: this.lastPong, postcopy: this.pc !== undefined, inPostcopy: this.inPostcopy };
  }

  private async transfer(): Promise<SendSummary> {
    const src = this.source;
    const returnPath = this.opts.returnPath ?? true;
    const syncMode = this.channels === 0 ? 'none' : this.opts.syncMode && this.opts.syncMode !== 'auto' ? this.opts.syncMode : defaultSyncMode(src.configuration.machine);
    const method = getMethod(this.opts.compression ?? 'none');
    if (method.name !== 'none' && this.channels === 0) throw new InvalidOptionError(`compression ${method.name} needs multifd channels (--channels ≥ 1)`);
    checkLevel(method, this.opts.level);
    const pc = this.pc;
    if (pc && !returnPath) throw new InvalidOptionError('postcopy needs the return path (page requests and the end of the migration come over it)');
    if (pc && src.blockList.some((b) => b.mrAddr !== undefined)) throw new InvalidOptionError('postcopy of a snapshot taken with x-ignore-shared is not supported');
    const pageSizes = destinationPageSizes(src, pc?.pageSizes);
    // With postcopy every page of the guest goes once: before the switch (present pages) or after it (all the others).
    for (const b of src.blockList) this.pagesTotal += pc ? Math.ceil(b.usedLength / TARGET_PAGE_SIZE) : src.presentPages(b.name);
    publish('send', 'start', { file: src.path, format: src.format, pages: this.pagesTotal, syncMode, postcopy: pc !== undefined });

    this.phase = 'connecting';
    await this.out.connectMain(returnPath);
    await this.write(encodePrologue(src, { returnPath, postcopy: pc !== undefined, syncMode, pageSizes }));

    if (this.channels > 0) {
      const { sender, ready } = openMultifd(this.out, this.channels, {
        method,
        loader: src,
        ...(this.opts.uuid ? { uuid: this.opts.uuid } : {}),
        ...(this.opts.zeroPageDetection ? { zeroPageDetection: this.opts.zeroPageDetection } : {}),
        ...(this.opts.level !== undefined ? { level: this.opts.level } : {}),
      }, (e) => this.fail(e));
      this.multifd = sender;
      await ready;
      publish('send', 'channels', { channels: this.channels });
    }
    const pages = new PageSender({
      source: src,
      multifd: this.multifd,
      writeMain: (bufs) => this.write(bufs),
      mainRecords: this.mainRecords,
      zeroPageDetection: this.opts.zeroPageDetection ?? 'multifd',
      check: () => this.check(),
    });
    this.pageSender = pages;

    this.phase = 'ram';
    const ds = src.deviceState;
    let perBlock: Map<string, number>;
    let postcopy: PostcopySummary | undefined;
    if (pc) {
      ({ perBlock, summary: postcopy } = await sendPostcopy({
        source: src, out: this.out, multifd: this.multifd, pageSender: pages, mainRecords: this.mainRecords,
        startedAt: this.startedAt, syncMode, pagesTotal: this.pagesTotal, failed: this.failed, pageSizes,
        writeMain: (bufs) => this.write(bufs),
        setPhase: (p) => { this.phase = p; },
        listenSent: (p) => { this.listening = p; },
        running: () => { this.inPostcopy = true; },
        phaseStarted: (phase) => { this.postcopyPhase = phase; },
        switched: (precopyPages, elapsedMs) => this.handle.emit('postcopy-switch', { elapsedMs, precopyPages }),
      }, pc));
    } else {
      perBlock = await pages.sendAll();
      // Final sync: every page written before the barrier the destination waits on.
      if (this.multifd) await this.multifd.sync();
      await this.write(encodeRamEnd(src, syncMode));
      this.phase = 'device-state';
      await pages.forward(ds.fileOffset, ds.end);
    }

    this.phase = 'waiting';
    if (returnPath) await this.verdict();
    if (postcopy) {
      postcopy['complete-time'] = Date.now() - this.startedAt;
      // PONG(3) and PONG(0x42) come once the destination loaded the devices, which may be late.
      const devicesLoaded = this.out.pongs.get(PING_DEVICES);
      const run = this.out.pongs.get(PING_PACKAGE_LOADED);
      if (devicesLoaded !== undefined) postcopy['devices-loaded-time'] = devicesLoaded;
      if (run !== undefined) postcopy['run-time'] = run;
    }
    this.out.end();
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
      destination: returnPath ? 'confirmed' : 'closed',
      'device-state-bytes': ds.end,
      blocks: src.blockList.map((b) => ({ name: b.name, 'used-length': b.usedLength, 'pages-sent': perBlock.get(b.name) ?? 0 })),
      channels: this.multifd?.stats() ?? [],
      ...(postcopy ? { postcopy } : {}),
    };
    publish('send', 'completed', { summary });
    return summary;
  }

  /** The destination's verdict on the return path: SHUT(0), or a typed error saying what it was. */
  private async verdict(): Promise<void> {
    await this.out.answered;
    this.check();
    const e = verdictError(this.stage(), this.out.shut);
    if (e) throw e;
  }
}
