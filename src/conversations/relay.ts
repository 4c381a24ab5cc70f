// relay: a live migration from QEMU A to QEMU B through us, decoded on A's side and re-encoded on
// B's, so each side has its own channel count and compression (and --tee keeps a snapshot).
//
// A's main stream is parsed record by record and re-encoded to B. A's multifd packets are decoded
// by a MultifdReceiver whose store hands each packet to a MultifdSender towards B (and to the
// tee). At each of A's sync points (MULTIFD_FLUSH, or RAM EOS in per-section mode) A's barrier
// holds every A channel — each has passed all its earlier pages on, written to B — while the
// sender writes one SYNC on every B channel; only then is the record forwarded and A's channels
// released. A round's pages therefore reach B before B's barrier for it, and a page re-sent in a
// later round can never be overtaken by an older copy.
//
// A on its main channel only (0) and B with multifd (N): A's page records (PAGE, ZERO, XBZRLE
// decoded) become packets on B's channels (engine/main-pages-to-multifd.ts), and B's main gets the
// sync points a multifd destination expects (pagedEvent below).
//
// The return path: B's messages (PONG, SHUT, ...) go back to A when A opened one. When A did not,
// we open one to B ourselves, so the relay still learns whether B loaded the state. A SHUT(0) from
// B is what completes the relay; any failure before it fails A's migration too (SHUT(1) and its
// connections closed), so A keeps running and can migrate again.

import { RAM_SECTION_NAME, RAM_SECTION_VERSION, ReturnPathMessage, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { ChannelError, DestinationClosedError, InvalidOptionError, ProtocolError } from '../codec/errors.js';
import { encodeReturnPathMessage, encodeShut } from '../codec/return-path.js';
import { defaultSyncMode } from '../codec/machine-type.js';
import type { SessionEvent } from '../codec/stream-session.js';
import type { SyncMode } from '../codec/sync-points.js';
import { publish } from '../engine/diagnostics.js';
import { ForwardingStore } from '../engine/forwarding-store.js';
import { DEFAULT_XBZRLE_COPY_BYTES, MainPagesToMultifd } from '../engine/main-pages-to-multifd.js';
import type { MultifdReceiver } from '../engine/multifd-receiver.js';
import { PageSpill, temporaryDirectory } from '../engine/page-spill.js';
import { InboundSide, type InboundSink } from './inbound-side.js';
import type { StrayConnectionError } from './incoming.js';
import { ListeningHandle } from './handle.js';
import { settleable } from './listening-handle.js';
import { RelayDestination, type DestinationHost } from './relay-destination.js';
import type { RelayOptions, RelayProgress, RelaySummary } from './relay-types.js';
import { notesOf, SnapshotOutput } from './snapshot-output.js';

export type { RelayOptions, RelayProgress, RelaySummary } from './relay-types.js';

export interface RelayEvents {
  progress: [RelayProgress];
  /** A connection that is not a migration channel was closed; the relay goes on. */
  stray: [StrayConnectionError];
}

export class RelayHandle extends ListeningHandle<RelaySummary, RelayEvents> {}

/** Starts relaying; the handle reports progress and resolves `done` with a summary. */
export function relay(opts: RelayOptions): RelayHandle {
  return new RelayHandle((h, signal) => {
    const r = new Relay(opts, h, signal);
    return { listening: r.listening, done: r.result.promise, abort: (e) => r.interrupt(e) };
  }, opts.signal);
}

class Relay implements InboundSink, DestinationHost {
  readonly listening: Promise<string>;
  readonly result = settleable<RelaySummary>();
  private readonly channelsIn: number;
  private readonly channelsOut: number;
  private readonly startedAt = Date.now();
  private readonly inbound: InboundSide;
  private dest: RelayDestination | undefined;
  private tee: SnapshotOutput | undefined;
  private forwarding: ForwardingStore | undefined;
  /** 0 → N: A's main-channel pages go to B's channels as packets. */
  private paging: MainPagesToMultifd | undefined;
  /** 0 → N without a tee: where the XBZRLE page copies that leave memory go. */
  private spill: PageSpill | undefined;
  /** The RAM section A's records are in (0 → N: B syncs before the EOS of START and END). */
  private ramSection: { kind: 'start' | 'part' | 'end' | 'full'; sectionId: number } | undefined;
  private xbzrleBuf: Buffer | undefined;
  /** 0 → N: B's sync mode (--sync-mode, else its machine type's default, which is A's). */
  private syncOut: SyncMode = 'round';
  /** A SHUT went to A (B's own, or our SHUT(1)): A has its verdict. */
  private aShutSent = false;

  constructor(private readonly opts: RelayOptions, private readonly handle: ListeningHandle<RelaySummary, RelayEvents>, signal: AbortSignal) {
    this.channelsIn = opts.channelsIn ?? 2;
    this.channelsOut = opts.channelsOut ?? this.channelsIn;
    for (const [name, n] of [['channels-in', this.channelsIn], ['channels-out', this.channelsOut]] as const) {
      if (!Number.isInteger(n) || n < 0 || n > 255) throw new InvalidOptionError(`${name} must be 0..255 (got ${n})`);
    }
    // 0 → N turns A's main-channel pages into packets (MainPagesToMultifd); N → 0 would need
    // multifd rounds serialised onto one channel, which nothing does yet.
    if (this.channelsIn > 0 && this.channelsOut === 0) {
      throw new InvalidOptionError(`channels-in ${this.channelsIn} and channels-out 0: multifd from the source onto the destination's main channel is not supported; the relay needs multifd on both sides or on neither, or only towards the destination (channels-in 0)`);
    }
    this.inbound = new InboundSide({
      ...opts,
      signal,
      tls: opts.tlsIn,
      channels: this.channelsIn,
      compression: opts.compressionIn ?? 'auto',
      // Waiting on B is the stall watchdog's business, not A's silence (see busy()).
      idlePhases: ['setup', 'ram', 'device-state'],
      conversation: 'relay',
    });
    this.listening = this.start();
  }

  private async start(): Promise<string> {
    try {
      if (this.opts.tee) this.tee = await SnapshotOutput.create(this.opts.tee, { channels: this.channelsIn, ...(this.opts.teeDirectIo === undefined ? {} : { directIo: this.opts.teeDirectIo }) });
      this.dest = new RelayDestination(this.opts, this.channelsOut, this, this.inbound);
      if (this.dest.sender) {
        this.forwarding = new ForwardingStore(this.dest.sender, this.tee?.store, {
          passEncoded: this.channelsIn === this.channelsOut && this.opts.levelOut === undefined && this.opts.recompress !== true,
        });
        if (this.channelsIn === 0) {
          const sender = this.dest.sender;
          // With a tee the inbound side applied each delta onto the tee's page: read back from there.
          const cacheBytes = this.tee ? 0 : (this.opts.xbzrleCacheBytes ?? DEFAULT_XBZRLE_COPY_BYTES);
          // Created up front, so an unusable directory fails before A sends anything.
          if (cacheBytes > 0) this.spill = await PageSpill.create(temporaryDirectory(this.opts.tempDir), TARGET_PAGE_SIZE);
          this.paging = new MainPagesToMultifd({
            sink: sender,
            blockLength: (name) => this.inbound.blocks.get(name)?.usedLength,
            cacheBytes,
            ...(this.spill ? { spill: this.spill } : {}),
          });
        }
      }
      const from = await this.inbound.open(this);
      publish('relay', 'listening', { address: from });
      return from;
    } catch (e) {
      this.fail(e as Error);
      throw e;
    }
  }

  progress(): RelayProgress {
    const a = this.inbound;
    const t = a.multifdTotals();
    return {
      phase: a.phase,
      elapsedMs: Date.now() - this.startedAt,
      bytesIn: a.mainBytes + t.bytes,
      bytesOut: this.dest?.outBytes() ?? 0,
      normal: a.mainPages + t.normal,
      duplicate: a.mainZero + t.zero,
      rounds: a.rounds,
      channelsIn: this.channelsIn,
      channelsOut: this.channelsOut,
      ramTotal: a.session.ramTotal,
      ...(this.tee?.uploadProgress ? { upload: this.tee.uploadProgress } : {}),
    };
  }

  // ---- the sink: B, and the tee ------------------------------------------------------------

  /** B's return-path messages go back to A when A opened its own. */
  toSource(type: number, payload: Buffer): void {
    const main = this.inbound.main;
    if (!this.inbound.session.returnPath || !main || main.destroyed) return;
    main.write(encodeReturnPathMessage(type, payload));
    if (type === ReturnPathMessage.SHUT) this.aShutSent = true;
  }

  /** B closes after its SHUT, as a destination does; A (which got that SHUT) sees the same. */
  ended(): void {
    const main = this.inbound.main;
    if (this.dest!.shut === 0 && this.aShutSent && main && !main.destroyed) main.end();
  }

  get store(): ForwardingStore {
    return this.forwarding!;
  }

  get snapshot(): SnapshotOutput | undefined {
    return this.tee;
  }

  preempt: InboundSink['preempt'];

  tick(): void {
    this.handle.emit('progress', this.progress());
  }

  busy(): boolean {
    return this.dest?.busy ?? false;
  }

  stray(e: StrayConnectionError): void {
    this.handle.emit('stray', e);
  }

  connected(kind: 'main' | 'preempt', peer: string): void {
    if (kind === 'main') publish('relay', 'source', { peer });
    else this.preempt = this.dest!.openPreempt();
  }

  channel(_id: number, uuid: Buffer): void {
    this.dest!.openChannels(this.opts.uuid ?? uuid);
  }

  /** Once every A channel passed its pages of the round on (written to B), one SYNC on every B channel. */
  async sync(receiver: MultifdReceiver): Promise<void> {
    await this.dest!.flush();
    await receiver.sync(() => this.dest!.sender!.sync());
  }

  chunkDone(): Promise<void> {
    return this.dest!.flush();
  }

  /** Each record of A's goes to B as it came (with a return path of our own when A has none). */
  event(ev: SessionEvent): Promise<void> | void {
    if (this.paging) return this.pagedEvent(ev, this.paging);
    this.forward(ev);
  }

  private forward(ev: SessionEvent): void {
    const dest = this.dest!;
    if (ev.type === 'header') dest.connectMain();
    // Already open towards B (we opened it ourselves): a second one is only logged by QEMU.
    if (ev.type === 'return-path' && !dest.openReturnPath()) return;
    if (ev.type === 'section' && ev.kind === 'start') dest.ensureReturnPath();
    if (ev.type === 'section' && ev.kind !== 'start' && this.inbound.phase === 'setup') this.inbound.phase = 'ram';
    if (ev.type === 'postcopy-switch') publish('relay', 'postcopy', { sections: ev.sections.length, deviceBytes: ev.devices.length });
    if (ev.record) dest.record(ev.record);
  }

  /**
   * 0 → N (docs/protocol.md §2.6): pages go to B's channels; B's main gets the rest of A's records
   * and a sync point (SYNC on every channel, then MULTIFD_FLUSH in per-round mode) before a page
   * that went out since the last one, and before the EOS of RAM's START and END sections. The
   * setup one is QEMU's too (ram_save_setup): B's channels then hold every packet until B's main
   * thread passed the setup. A packet that comes before B's main thread read the header finds no
   * receivedmap (allocated in ram_load_setup) and crashes QEMU 10 (SIGSEGV, 2 of 4 runs without
   * this sync). In per-section mode (B's
   * multifd-flush-after-each-section on: --sync-mode section, or auto with a machine type up to
   * 8.0, A's and so B's) every RAM EOS is B's sync point.
   */
  private async pagedEvent(ev: SessionEvent, paging: MainPagesToMultifd): Promise<void> {
    const dest = this.dest!;
    switch (ev.type) {
      case 'configuration':
        this.syncOut = this.opts.syncMode === 'round' || this.opts.syncMode === 'section' ? this.opts.syncMode : defaultSyncMode(ev.config.machine);
        // B reads its main channel only once all its multifd channels connected; they carry B's
        // -uuid, which validate-uuid says is A's.
        dest.openChannels(this.opts.uuid ?? ev.config.uuid ?? Buffer.alloc(16));
        break;
      case 'postcopy-advise':
        if (ev.postcopy) throw new ProtocolError('UNSUPPORTED', 'the source advised postcopy-ram: relay 0 → N (multifd towards the destination only) does not carry postcopy; relay with --channels-out 0');
        break;
      case 'page':
      case 'zero':
      case 'xbzrle': {
        if (paging.needsSync(ev.block, ev.offset)) await this.pagedSync(paging);
        if (ev.type === 'page') await paging.page(ev.block, ev.offset, ev.data);
        else if (ev.type === 'zero') await paging.zeroPage(ev.block, ev.offset);
        else if (this.tee) await paging.page(ev.block, ev.offset, [await this.tee.store.readPage(ev.block, ev.offset, this.xbzrleBuf ??= Buffer.alloc(TARGET_PAGE_SIZE))]);
        else await paging.xbzrle(ev.block, ev.offset, ev.delta, ev.at);
        return;
      }
      case 'section':
        // A stream without a configuration section (send-configuration off).
        dest.openChannels(this.opts.uuid ?? Buffer.alloc(16));
        this.ramSection = ev.record?.type === 'section' && ev.record.idstr === RAM_SECTION_NAME ? { kind: ev.kind, sectionId: ev.sectionId } : undefined;
        break;
      default:
        break;
    }
    const kind = this.ramSection?.kind;
    if (ev.record?.type === 'ram-eos' && (this.syncOut === 'section' || kind === 'start' || kind === 'end')) {
      await this.pagedSync(paging, true);
      this.forward(ev);
      // Out at once: per section this EOS is what releases B's channels held after their SYNC;
      // the pages that follow in this chunk could otherwise wait on them for ever.
      await dest.flush();
      return;
    }
    this.forward(ev);
  }

  /**
   * `atEos`: A's EOS follows (per-section mode: it is B's sync point). Per section, a sync in the
   * middle of a section splits it: EOS, footer and the same section's header again, which B
   * loads as two parts (qemu_loadvm_section_part_end takes PART and END alike).
   */
  private async pagedSync(paging: MainPagesToMultifd, atEos = false): Promise<void> {
    const dest = this.dest!;
    await dest.flush();
    await paging.sync();
    if (this.syncOut === 'round') {
      dest.record({ type: 'ram-flush' });
    } else if (!atEos) {
      const sec = this.ramSection;
      if (!sec || (sec.kind !== 'part' && sec.kind !== 'end')) throw new ProtocolError('BAD_RECORD', 'a page outside a RAM PART or END section');
      dest.record({ type: 'ram-eos' });
      dest.record({ type: 'footer', sectionId: sec.sectionId });
      dest.record({ type: 'section', kind: sec.kind, sectionId: sec.sectionId, idstr: RAM_SECTION_NAME, instanceId: 0, versionId: RAM_SECTION_VERSION });
    }
    // Out at once: B's channels wait after their SYNC until B's main thread reads this.
    await dest.flush();
  }

  mainErrorIsEnd(e: Error & { code?: string }): boolean {
    // A that got B's SHUT(0) has completed; it may drop the connection without a clean close
    // (QEMU 11 over TLS resets it). With the whole stream passed on, that is the end.
    return e.code === 'ECONNRESET' && this.aShutSent && this.dest?.shut === 0 && this.inbound.session.complete;
  }

  /** A closed its main channel: after a complete stream, hand B the end and wait for its verdict. */
  async mainEnded(): Promise<void> {
    const a = this.inbound;
    // A complete stream ends in a VMDESCRIPTION that walks the device sections; anything less
    // would leave B waiting for device state that never comes.
    if (!a.session.complete) {
      throw new ProtocolError('TRUNCATED', `the source closed its main channel before the migration completed, at stream offset ${a.session.offset} (source gone?)`);
    }
    await this.dest!.flush();
    a.phase = 'waiting';
    if (a.receiver) await a.receiver.finish();
    // A closes first only without a return path of its own; B may still be loading.
    await this.dest!.verdict();
    if (a.failure) return;
    if (this.dest!.shut === undefined) throw new DestinationClosedError('main channel', 'closed without confirming the load', 'the destination closed the connection without confirming the load (no SHUT on the return path)');
    await this.complete();
  }

  // ---- the end -------------------------------------------------------------------------------

  private async complete(): Promise<void> {
    const a = this.inbound;
    const session = a.session;
    let tee: RelaySummary['tee'];
    let stored: RelaySummary['store'];
    if (this.tee) {
      a.phase = 'committing';
      if (!session.complete) {
        throw new ProtocolError('TRUNCATED', `the migration completed, but the tee snapshot was not written: the device state (${session.deviceStateBytes} bytes) has no complete VMDESCRIPTION (suppress-vmdesc on?)`);
      }
      const t0 = Date.now();
      try {
        // For an object: made durable in staging, then uploaded (the progress timer runs on).
        await this.tee.commit();
      } catch (e) {
        // B confirmed the load (and A, with a return path, got that SHUT(0)): both are done, see
        // fail(). Failed here and not in runMain, whose error would name A's main channel.
        this.fail(new ChannelError(`the tee ${this.opts.tee!} (the destination loaded the migration and runs it; only the tee was not stored)`, e as Error));
        return;
      }
      tee = { file: this.opts.tee!, 'file-size': this.tee.store.streamEnd, 'commit-time': Date.now() - t0, 'direct-io': this.tee.store.directIo };
      stored = this.tee.uploadReport;
    }
    a.finished = true;
    a.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: RelaySummary = {
      status: 'completed',
      from: a.address,
      to: this.opts.to,
      machine: session.configuration?.machine ?? '',
      'total-time': elapsed,
      'bytes-in': p.bytesIn,
      'bytes-out': p.bytesOut,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round(((p.bytesIn * 8) / (elapsed * 1000)) * 100) / 100 : 0,
      'multifd-syncs': this.paging ? this.paging.syncs : a.rounds,
      'sync-mode': this.paging ? this.syncOut : a.receiver ? (session.syncMode ?? 'round') : 'none',
      'compression-in': a.receiver?.compression ?? (this.opts.compressionIn && this.opts.compressionIn !== 'auto' ? this.opts.compressionIn : 'none'),
      'compression-out': this.opts.compressionOut ?? 'none',
      'passed-encoded': a.receiver?.encodedPackets ?? 0,
      'return-path': session.returnPath,
      destination: 'confirmed',
      'device-state-bytes': session.deviceStateBytes,
      ...(session.postcopy ? {
        postcopy: {
          'switched-at-ms': (a.switchedAt ?? this.startedAt) - this.startedAt,
          'main-pages': a.postcopyMainPages,
          'preempt-bytes': a.preemptBytes,
          'preempt-pages': a.preemptPages,
          'preempt-channel': a.preemptChannel !== undefined,
          'page-requests': this.dest!.pageRequests,
        },
      } : {}),
      ...(tee ? { tee } : {}),
      ...(stored ? { store: stored } : {}),
      ...(this.tee ? notesOf(this.tee) : {}),
      'channels-in': a.receiver?.channelStats() ?? [],
      'channels-out': this.dest!.stats(),
    };
    await this.cleanup();
    this.handle.emit('progress', this.progress());
    publish('relay', 'completed', { summary });
    this.result.resolve(summary);
  }

  /** The handle's abort: a failure, unless the tee is past its point of no return (see SnapshotOutput.interrupt). */
  interrupt(e: Error): void {
    if (this.tee?.interrupt(e)) return;
    this.fail(e);
  }

  fail(e: Error): void {
    const a = this.inbound;
    if (a.failure || a.finished) return;
    const err = a.failed(e);
    publish('relay', 'failed', { error: err });
    // A must not complete on a state B did not load: tell it, then cut it off. If B's SHUT(0)
    // already went to A, A completed and B runs; only our own part (the tee) failed.
    if (!this.aShutSent && a.session.returnPath && a.main && !a.main.destroyed) {
      this.aShutSent = true;
      a.main.write(encodeShut(1));
    }
    this.dest?.failed(err);
    void (async () => {
      await this.cleanup();
      await a.discard();
      this.result.reject(err);
    })();
  }

  private async cleanup(): Promise<void> {
    this.dest?.close(this.inbound.failure !== undefined);
    await this.inbound.close();
    const spill = this.spill;
    if (spill) {
      this.spill = undefined;
      const p = this.paging!;
      publish('relay', 'xbzrle-copies', { deltas: p.xbzrlePages, copyBytes: p.copyBytes, spilled: spill.writes, spillReads: p.spillReads, dir: spill.dir });
      spill.close();
    }
  }
}
