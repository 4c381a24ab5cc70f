// receive: accept a live migration from an unmodified QEMU (main channel + N multifd channels)
// and write it as a mapped-ram snapshot that QEMU restores (PROTOCOL.md §7a, §7d).
//
// Main-channel state machine: header → configuration → START ram (MEM_SIZE, blocks: the file's
// head is written here) → RAM records and syncs (FLUSH, or EOS in per-section mode) through END →
// device state, kept byte for byte until a VMDESCRIPTION proves it complete → commit.

import type { Socket } from 'node:net';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { PageRecordParser } from '../codec/postcopy.js';
import { abortError, IdleTimeoutError, InvalidOptionError, ProtocolError } from '../codec/errors.js';
import type { SyncMode } from '../codec/sync-points.js';
import { encodePong, encodeShut } from '../codec/return-path.js';
import { StreamSession, type SessionEvent, type SessionEventOf } from '../codec/stream-session.js';
import { publish } from '../engine/diagnostics.js';
import { getMethod } from '../engine/methods/registry.js';
import { ChannelError, MultifdReceiver, type ChannelStats } from '../engine/multifd-receiver.js';
import type { RamBlock } from '../engine/page-store.js';
import { formatAddress, listen, type Listener } from '../transports/listener.js';
import type { TlsCreds } from '../transports/tls.js';
import { describePeer } from '../transports/socket-io.js';
import { IdleWatch } from './idle-watch.js';
import { DEFAULT_IDENTIFY_TIMEOUT_MS, DEFAULT_MAX_PENDING, IncomingConnections, StrayConnectionError } from './incoming.js';
import { ListeningHandle } from './handle.js';
import { SnapshotOutput } from './snapshot-output.js';
import { PostcopyFailedError } from './postcopy-failure.js';
import { preemptExpected } from './postcopy-stream.js';


export interface ReceiveOptions {
  /** tcp:HOST:PORT or unix:PATH; port 0 picks a free port (see handle.listening). */
  listen: string;
  /** Snapshot path; written as a temporary file and renamed when complete. */
  out: string;
  /** multifd channels the source uses; 0 = the source has multifd off. Default 2 (QEMU's). */
  channels?: number;
  /** The source's multifd-compression (none, zlib, zstd); 'auto' (default) detects it from the first data packet. */
  compression?: string;
  /** How MULTIFD_FLUSH/EOS map to syncs; 'auto' infers it from the START section. */
  syncMode?: 'auto' | SyncMode;
  /** Required uuid in multifd init messages (the source's -uuid); default: accept any. */
  uuid?: Buffer;
  /** How long a new connection may take to send its first 4 bytes (default 10 s); a silent one is closed as a stray. */
  identifyTimeoutMs?: number;
  /** Connections allowed to wait for identification at once (default 16); more are closed at once. */
  maxPendingConnections?: number;
  /** Accept TLS connections only, with server credentials as for QEMU's tls-creds-x509 (the source's tls-creds). */
  tls?: TlsCreds;
  /**
   * Read multifd channels into one reused ring each (default true): less CPU per GiB; false reads
   * them as plain streams (see src/transports/ring-reader.ts).
   */
  readRing?: boolean;
  /** How long a sync waits for channels that never connected. */
  channelTimeoutMs?: number;
  /** Fails when the source sends nothing for this long mid-migration (default 300 s; 0: never). */
  idleTimeoutMs?: number;
  /** Largest device state (everything after RAM) kept for verification. */
  maxDeviceStateBytes?: number;
  /**
   * How long the main channel must stay quiet after a complete-looking VMDESCRIPTION before the
   * snapshot is committed (default 20 ms); end of stream commits at once.
   */
  completionQuietMs?: number;
  /**
   * Write pages with O_DIRECT where the file system supports it (default true): cheaper than the
   * page cache for a whole guest, but the file is not cached for an immediate restore.
   */
  directIo?: boolean;
  /** How often 'progress' is emitted. */
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface ReceiveProgress {
  phase: 'listening' | 'setup' | 'ram' | 'device-state' | 'postcopy' | 'committing' | 'completed' | 'failed';
  elapsedMs: number;
  transferred: number;
  normal: number;
  duplicate: number;
  rounds: number;
  channelsConnected: number;
  channels: number;
  mainBytes: number;
  ramTotal: number;
}

export interface ReceiveSummary {
  status: 'completed';
  file: string;
  machine: string;
  'total-time': number;
  /** Of total-time: making the snapshot durable (fsync, bitmaps, rename) after the last byte. */
  'commit-time': number;
  /** Pages went to the file with O_DIRECT (see ReceiveOptions.directIo). */
  'direct-io': boolean;
  transferred: number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  mbps: number;
  /**
   * Receive alone cannot see QEMU's dirty-bitmap syncs; it reports the multifd sync barriers it
   * passed (one per scan wrap plus setup, or one per section). `save` replaces it with QEMU's count.
   */
  'dirty-sync-count': number;
  /** Multifd sync barriers passed (setup sync included). */
  'multifd-syncs': number;
  'sync-mode': 'round' | 'section' | 'none';
  /** multifd-compression of the source's packets (detected or as given); the snapshot holds plain pages. */
  compression: string;
  'return-path': boolean;
  'main-bytes': number;
  'device-state-bytes': number;
  'file-size': number;
  blocks: { name: string; 'used-length': number; 'pages-present': number }[];
  channels: ChannelStats[];
  /** Present when the source switched to postcopy (device state came in its PACKAGED command). */
  postcopy?: {
    /** Since the start of the migration. */
    'switched-at-ms': number;
    /** Page records on the main channel after the switch. */
    'main-pages': number;
    /** Page records on the preempt channel. */
    'preempt-pages': number;
    'discard-ranges': number;
    'preempt-channel': boolean;
  };
}

export interface ReceiveEvents {
  progress: [ReceiveProgress];
  /** A connection that is not a migration channel was closed; the migration goes on. */
  stray: [StrayConnectionError];
}

export class ReceiveHandle extends ListeningHandle<ReceiveSummary, ReceiveEvents> {}

/** Starts receiving; the handle reports progress and resolves `done` with a summary. */
export function receive(opts: ReceiveOptions): ReceiveHandle {
  return new ReceiveHandle((h, signal) => {
    const r = new Receiver(opts, h, signal);
    return { listening: r.listening, done: r.done, abort: (e) => r.fail(e) };
  }, opts.signal);
}

class Receiver {
  readonly listening: Promise<string>;
  readonly done: Promise<ReceiveSummary>;
  private resolveDone!: (s: ReceiveSummary) => void;
  private rejectDone!: (e: Error) => void;
  private readonly channels: number;
  private readonly startedAt = Date.now();
  private phase: ReceiveProgress['phase'] = 'listening';
  private listener: Listener | undefined;
  private main: Socket | undefined;
  private readonly sockets = new Set<Socket>();
  private multifd: MultifdReceiver | undefined;
  private output: SnapshotOutput | undefined;
  private readonly blocks = new Map<string, RamBlock>();
  private failure: Error | undefined;
  private finished = false;
  private progressTimer: NodeJS.Timeout | undefined;
  private mainBytes = 0;
  private mainPages = 0;
  private mainZero = 0;
  private rounds = 0;
  private returnPath = false;
  private readonly session: StreamSession;
  private ramTotal = 0;
  private readonly incoming: IncomingConnections;
  private idle: IdleWatch | undefined;
  private preempt: Socket | undefined;
  private preemptPages = 0;
  /** When the preempt channel last delivered bytes, and whether it is inside a record or a write. */
  private preemptAt = 0;
  private preemptBusy = false;
  private postcopyMainPages = 0;
  private discardRanges = 0;
  private switchedAt: number | undefined;
  /** Resolves when precopy is sealed (every multifd write done): preempt pages wait for it. */
  private readonly postcopyStarted: Promise<void>;
  private resolvePostcopyStarted!: () => void;

  constructor(private readonly opts: ReceiveOptions, private readonly handle: ListeningHandle<ReceiveSummary, ReceiveEvents>, private readonly signal: AbortSignal) {
    this.incoming = new IncomingConnections({
      identifyTimeoutMs: opts.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
      maxPending: opts.maxPendingConnections ?? DEFAULT_MAX_PENDING,
      onKind: (sock, kind, source, peer) => this.identify(sock, kind, source, peer),
      onStray: (e) => this.onStray(e),
      takePreempt: (sock, source, byOrder) => this.takePreempt(sock, source, byOrder),
      ...(opts.readRing !== undefined ? { readRing: opts.readRing } : {}),
    });
    this.postcopyStarted = new Promise((resolve) => { this.resolvePostcopyStarted = resolve; });
    this.channels = opts.channels ?? 2;
    this.session = new StreamSession({
      kind: 'live',
      ...(opts.syncMode === undefined || opts.syncMode === 'auto' ? {} : { syncMode: opts.syncMode }),
      ...(opts.maxDeviceStateBytes === undefined ? {} : { maxDeviceStateBytes: opts.maxDeviceStateBytes }),
    });
    if (!Number.isInteger(this.channels) || this.channels < 0 || this.channels > 255) {
      throw new InvalidOptionError(`channels must be 0..255 (got ${opts.channels})`);
    }
    this.done = new Promise((res, rej) => {
      this.resolveDone = res;
      this.rejectDone = rej;
    });
    this.done.catch(() => {});
    this.listening = this.start();
  }

  private async start(): Promise<string> {
    try {
      const compression = this.opts.compression ?? 'auto';
      const method = compression === 'auto' ? undefined : getMethod(compression);
      this.output = await SnapshotOutput.create(this.opts.out, { channels: this.channels, ...(this.opts.directIo === undefined ? {} : { directIo: this.opts.directIo }) });
      if (this.channels > 0) {
        this.multifd = new MultifdReceiver({
          channels: this.channels,
          ...(method ? { method } : {}),
          store: this.output.store,
          blocks: this.blocks,
          ...(this.opts.uuid ? { uuid: this.opts.uuid } : {}),
          ...(this.opts.channelTimeoutMs !== undefined ? { channelTimeoutMs: this.opts.channelTimeoutMs } : {}),
        });
        this.multifd.on('error', (e: Error) => this.fail(e));
        this.multifd.on('sync', (n: number) => { this.rounds = n; });
      }
      this.listener = await listen(this.opts.listen, (s) => this.onConnection(s), {
        ...(this.opts.tls ? { tls: this.opts.tls } : {}),
        handshakeTimeoutMs: this.opts.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
        onTlsError: (e, peer) => this.onStray(new StrayConnectionError(peer, e.message)),
      });
      if (this.signal.aborted) throw abortError(this.signal.reason);
      const interval = this.opts.progressIntervalMs ?? 250;
      this.progressTimer = setInterval(() => this.handle.emit('progress', this.progress()), interval);
      this.idle = new IdleWatch(
        this.opts.idleTimeoutMs ?? 300_000,
        () => this.progress().transferred,
        () => this.phase === 'setup' || this.phase === 'ram' || this.phase === 'device-state' || this.phase === 'postcopy',
        (s) => this.fail(new IdleTimeoutError(s, `the source sent nothing for ${s} s during ${this.phase} (a stalled channel, a paused source, or gone?)`)),
      );
      this.idle.start();
      this.progressTimer.unref();
      const addr = formatAddress(this.listener.address);
      publish('receive', 'listening', { address: addr });
      return addr;
    } catch (e) {
      this.fail(e as Error);
      throw e;
    }
  }

  progress(): ReceiveProgress {
    const ch = this.multifd?.channelStats() ?? [];
    const chBytes = ch.reduce((n, c) => n + c.bytes, 0);
    return {
      phase: this.phase,
      elapsedMs: Date.now() - this.startedAt,
      transferred: chBytes + this.mainBytes,
      normal: ch.reduce((n, c) => n + c.normalPages, 0) + this.mainPages,
      duplicate: ch.reduce((n, c) => n + c.zeroPages, 0) + this.mainZero,
      rounds: this.rounds,
      channelsConnected: ch.length,
      channels: this.channels,
      mainBytes: this.mainBytes,
      ramTotal: this.ramTotal,
    };
  }

  private onConnection(sock: Socket): void {
    if (this.failure || this.finished) {
      sock.destroy();
      return;
    }
    this.sockets.add(sock);
    sock.on('close', () => this.sockets.delete(sock));
    this.incoming.accept(sock);
  }

  /** A connection that is no migration channel: closed and reported, the migration goes on. */
  private onStray(e: StrayConnectionError): void {
    publish('receive', 'stray-connection', { error: e });
    this.handle.emit('stray', e);
  }

  /**
   * The postcopy preempt channel has no magic: like QEMU, take the connection that comes after
   * the main channel and all multifd channels of a source that advised postcopy (§6.3).
   */
  private takePreempt(sock: Socket, source: AsyncIterable<Buffer>, byOrder: boolean): boolean {
    if (!preemptExpected(this.session.postcopyAdvised && !!this.main && !this.preempt && !this.failure && !this.finished, this.multifd?.connected ?? 0, this.channels, byOrder)) return false;
    this.preempt = sock;
    // Its quiet window starts now: pages sent before EOF may not have been read yet.
    this.preemptAt = Date.now();
    sock.setNoDelay(true);
    sock.on('error', () => {});
    publish('receive', 'preempt-channel', { kind: 'preempt', peer: describePeer(sock) });
    void this.runPreempt(source);
    return true;
  }

  private async runPreempt(source: AsyncIterable<Buffer>): Promise<void> {
    const parser = new PageRecordParser((name) => this.blocks.get(name)?.usedLength);
    try {
      for await (const chunk of source) {
        if (this.failure || this.finished) return;
        this.mainBytes += chunk.length;
        this.preemptAt = Date.now();
        this.preemptBusy = true;
        // A page here answers a request made in postcopy: it must land after every precopy page
        // (and its block be known). Waiting before the next read also bounds what an early
        // sender can make us buffer: the socket is not read meanwhile.
        await this.postcopyStarted;
        parser.push(chunk);
        for (let ev = parser.next(); ev !== null; ev = parser.next()) {
          if (ev.type === 'page') {
            this.preemptPages++;
            await this.output!.store.writePages(ev.block, [ev.offset], 1, ev.data);
          } else if (ev.type === 'zero') {
            this.preemptPages++;
            await this.output!.store.zeroPages(ev.block, [ev.offset], 0, 1);
          }
        }
        this.preemptBusy = !parser.atBoundary;
        this.preemptAt = Date.now();
      }
      if (!parser.atBoundary && !this.finished) throw new ProtocolError('TRUNCATED', 'closed inside a page record');
    } catch (e) {
      if (this.finished) return;
      const err = e as Error & { code?: string };
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') return;
      this.fail(new ChannelError('postcopy preempt channel', err));
    }
  }

  /**
   * Pages the source wrote on the preempt channel before its EOF on main may still be on their
   * way (another socket): commit once that channel is between records, written, and quiet.
   */
  private async preemptSettled(): Promise<void> {
    if (!this.preempt) return;
    const quiet = this.opts.completionQuietMs ?? 20;
    const limit = Date.now() + (this.opts.channelTimeoutMs ?? 15000);
    while (!this.failure && (this.preemptBusy || Date.now() - this.preemptAt < quiet)) {
      if (Date.now() > limit) throw new ProtocolError('TRUNCATED', 'the postcopy preempt channel stopped inside a page record at the end of the migration');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    if (this.failure) throw this.failure;
  }

  private identify(sock: Socket, kind: 'main' | 'multifd', source: AsyncIterable<Buffer>, peer: string): void {
    if (this.failure) return;
    if (kind === 'main') {
      if (this.main) {
        sock.destroy();
        this.onStray(new StrayConnectionError(peer, 'a second main channel (QEVM) while one is in use; closed'));
        return;
      }
      this.main = sock;
      this.phase = 'setup';
      publish('receive', 'main-channel', {});
      void this.runMain(source);
      return;
    }
    {
      if (!this.multifd) {
        sock.destroy();
        this.fail(new ProtocolError('BAD_CHANNEL_ID', 'a multifd channel connected but the receiver expects none (--channels 0); does the source have multifd on?'));
        return;
      }
      // Counted with the ones still sending their init: a connection that sent the magic and
      // stalls holds a place too. QEMU ignores extra connections; we close and report them.
      if (this.multifd.openConnections >= this.channels) {
        sock.destroy();
        this.onStray(new StrayConnectionError(peer, `a multifd connection beyond the ${this.channels} channels; closed`));
        return;
      }
      void this.multifd.runChannel(source, `multifd connection from ${peer}`);
    }
  }

  private async runMain(source: AsyncIterable<Buffer>): Promise<void> {
    const session = this.session;
    const chunks = source[Symbol.asyncIterator]();
    try {
      for (;;) {
        const next = chunks.next();
        let r: IteratorResult<Buffer>;
        if (session.complete) {
          // The bytes so far end in a VMDESCRIPTION that walks, but guest-written bytes can look
          // like one at a read boundary: commit only once the stream stays quiet (a real source
          // sends nothing more until our SHUT) or ends.
          const quiet = await quietFor(next, this.opts.completionQuietMs ?? 20);
          if (quiet === 'quiet') {
            next.then((more) => {
              if (!more.done) publish('receive', 'late-data', { bytes: more.value.length, message: 'bytes arrived on the main channel after the snapshot was committed' });
            }, () => {});
            await this.complete();
            return;
          }
          r = quiet;
        } else {
          r = await next;
        }
        if (r.done) break;
        const chunk = r.value;
        if (this.failure || this.finished) return;
        this.mainBytes += chunk.length;
        session.push(chunk);
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          await this.onMainEvent(ev);
          if (this.failure || this.finished) return;
        }
      }
      if (!this.finished && !this.failure) {
        if (session.complete) {
          await this.complete();
          return;
        }
        const why = session.rejection ? `: ${session.rejection.message}` : '; is the machine\'s suppress-vmdesc on?';
        const where = session.postcopy
          ? `in postcopy (RAM ${session.ramEnded ? 'complete, EOF missing' : 'pages still to come'}), at stream offset ${session.offset}`
          : session.deviceStateBytes > 0
          ? `in the device state (${session.deviceStateBytes} bytes received, no complete VMDESCRIPTION${why})`
          : `at stream offset ${session.offset}`;
        throw new ProtocolError('TRUNCATED', `closed before the migration completed, ${where} (source gone?)`);
      }
    } catch (e) {
      const err = e as Error & { code?: string };
      // A source killed outright resets the connection instead of closing it: same news.
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') {
        this.fail(new ChannelError('main channel', new ProtocolError('TRUNCATED', `the connection was reset before the migration completed, at stream offset ${session.offset} (source gone?)`)));
        return;
      }
      this.fail(err instanceof ChannelError ? err : new ChannelError('main channel', err));
    }
  }

  /** The record order is the session's; this writes what each event means into the snapshot. */
  private async onMainEvent(ev: SessionEvent): Promise<void> {
    const session = this.session;
    switch (ev.type) {
      case 'configuration':
        publish('receive', 'configuration', { machine: ev.config.machine });
        return;
      case 'return-path':
        this.returnPath = true;
        publish('receive', 'return-path', {});
        return;
      case 'ping':
        this.main!.write(encodePong(ev.value));
        return;
      case 'discard':
        // The discarded pages each arrive again in postcopy: the snapshot keeps its older copy until then.
        this.discardRanges += ev.ranges;
        return;
      case 'mem-size':
        this.ramTotal = ev.totalBytes;
        return;
      case 'ram-block':
        this.blocks.set(ev.block.name, { name: ev.block.name, usedLength: ev.block.usedLength });
        return;
      case 'ram-setup':
        await this.output!.head(session.configuration!, ev.sectionId, ev.totalBytes, ev.blocks);
        return;
      case 'page':
        this.mainPages++;
        if (ev.postcopy) this.postcopyMainPages++;
        await this.output!.store.writePages(ev.block, [ev.offset], 1, ev.data);
        return;
      case 'zero':
        this.mainZero++;
        if (ev.postcopy) this.postcopyMainPages++;
        this.output!.store.zeroPages(ev.block, [ev.offset], 0, 1);
        return;
      case 'sync-point':
        if (!this.multifd) {
          if (ev.cause === 'flush') throw new ProtocolError('BAD_RECORD', 'MULTIFD_FLUSH but the receiver expects no multifd channels (--channels 0); does the source have multifd on?');
          return;
        }
        if (ev.decided) publish('receive', 'sync-mode', { mode: ev.decided });
        this.phase = 'ram';
        await this.multifd.sync();
        return;
      case 'eos':
        if (ev.decided && this.multifd) publish('receive', 'sync-mode', { mode: ev.decided });
        return;
      case 'footer':
        if (ev.setup) await this.output!.setupFooter(ev.sectionId);
        return;
      case 'postcopy-switch':
        return this.onPostcopySwitch(ev);
      case 'device-state':
        if (session.postcopy) {
          // Pages the source wrote on the preempt channel before this EOF may still be on their way.
          await this.preemptSettled();
        } else {
          this.phase = 'device-state';
        }
        await this.output!.deviceState(ev.data, session.sectionId, session.switchoverStart);
        return;
      case 'complete':
        // A precopy stream is committed once it stays quiet (runMain); a postcopy one ends here.
        if (session.postcopy) await this.complete();
        return;
      default:
        return;
    }
  }

  /**
   * The switch to postcopy (§6.2, §6.4). The destination's vCPUs would start at RUN; ours is a
   * file, so it answers the package's PINGs at once and stores the device sections where a
   * precopy snapshot has them.
   */
  private async onPostcopySwitch(ev: SessionEventOf<'postcopy-switch'>): Promise<void> {
    this.switchedAt = Date.now();
    this.phase = 'postcopy';
    publish('receive', 'postcopy', { sections: ev.sections.length, deviceBytes: ev.devices.length });
    // Every precopy page is in place before any postcopy page: the prepare FLUSH synced the
    // channels; later multifd packets are refused.
    await this.multifd?.finish('the switch to postcopy');
    this.resolvePostcopyStarted();
    await this.output!.deviceState([ev.devices], this.session.sectionId, this.session.switchoverStart);
    for (const v of ev.pings) this.main!.write(encodePong(v));
  }

  private async complete(): Promise<void> {
    const session = this.session;
    this.phase = 'committing';
    this.finished = true;
    if (this.multifd) await this.multifd.finish();
    const commitStart = Date.now();
    await this.output!.commit();
    const commitTime = Date.now() - commitStart;
    if (this.returnPath && this.main && !this.main.destroyed) {
      await new Promise<void>((resolve) => this.main!.write(encodeShut(0), () => resolve()));
    }
    this.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: ReceiveSummary = {
      status: 'completed',
      file: this.opts.out,
      machine: session.configuration?.machine ?? '',
      'total-time': elapsed,
      'commit-time': commitTime,
      'direct-io': this.output!.store.directIo,
      transferred: p.transferred,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round((p.transferred * 8) / (elapsed * 1000) * 100) / 100 : 0,
      'dirty-sync-count': this.rounds,
      'multifd-syncs': this.rounds,
      'sync-mode': this.multifd ? (session.syncMode ?? 'round') : 'none',
      compression: this.multifd?.compression ?? (this.opts.compression && this.opts.compression !== 'auto' ? this.opts.compression : 'none'),
      'return-path': this.returnPath,
      'main-bytes': this.mainBytes,
      'device-state-bytes': session.deviceStateBytes,
      ...(session.postcopy ? {
        postcopy: {
          'switched-at-ms': (this.switchedAt ?? this.startedAt) - this.startedAt,
          'main-pages': this.postcopyMainPages,
          'preempt-pages': this.preemptPages,
          'discard-ranges': this.discardRanges,
          'preempt-channel': this.preempt !== undefined,
        },
      } : {}),
      'file-size': this.output!.store.streamEnd,
      blocks: session.blocks.map((b) => ({ name: b.name, 'used-length': b.usedLength, 'pages-present': this.output!.store.bitmap(b.name)?.count() ?? 0 })),
      channels: this.multifd?.channelStats() ?? [],
    };
    await this.cleanup();
    this.handle.emit('progress', this.progress());
    publish('receive', 'completed', { summary });
    this.resolveDone(summary);
  }

  fail(err: Error): void {
    if (this.failure || this.phase === 'completed') return;
    if (this.switchedAt !== undefined) err = new PostcopyFailedError(err, 'receive');
    this.failure = err;
    this.phase = 'failed';
    publish('receive', 'failed', { error: err });
    if (this.returnPath && this.main && !this.main.destroyed) this.main.write(encodeShut(1));
    this.multifd?.fail(err);
    void (async () => {
      await this.cleanup();
      await this.multifd?.quiesce();
      await this.output?.abort();
      this.rejectDone(err);
    })();
  }

  private async cleanup(): Promise<void> {
    if (this.progressTimer) clearInterval(this.progressTimer);
    this.idle?.stop();
    for (const s of this.sockets) s.end(() => s.destroy());
    // Give a clean end a moment; anything left is destroyed so the source sees the failure now.
    setTimeout(() => { for (const s of this.sockets) s.destroy(); }, this.failure ? 0 : 2000).unref();
    await this.listener?.close();
  }
}

/** Resolves with the next read, or 'quiet' when none came within `ms`. */
async function quietFor<T>(next: Promise<T>, ms: number): Promise<T | 'quiet'> {
  let timer: NodeJS.Timeout | undefined;
  const quiet = new Promise<'quiet'>((resolve) => { timer = setTimeout(() => resolve('quiet'), ms); });
  try {
    return await Promise.race([next, quiet]);
  } finally {
    clearTimeout(timer);
  }
}
