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
// The return path: B's messages (PONG, SHUT, ...) go back to A when A opened one. When A did not,
// we open one to B ourselves, so the relay still learns whether B loaded the state. A SHUT(0) from
// B is what completes the relay; any failure before it fails A's migration too (SHUT(1) and its
// connections closed), so A keeps running and can migrate again.

import type { Socket } from 'node:net';
import { Command, ReturnPathMessage, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { PageRecordParser } from '../codec/postcopy.js';
import { abortError, DestinationClosedError, DestinationRefusedError, IdleTimeoutError, InvalidOptionError, ProtocolError, StallError } from '../codec/errors.js';
import { encodeMainEvent } from '../codec/main-event-encode.js';
import { encodeReturnPathMessage, encodeShut } from '../codec/return-path.js';
import { encodeCommand } from '../codec/stream-encode.js';
import { StreamSession, type SessionEvent, type SessionEventOf } from '../codec/stream-session.js';
import type { SyncMode } from '../codec/sync-points.js';
import { publish } from '../engine/diagnostics.js';
import { ForwardingStore } from '../engine/forwarding-store.js';
import { checkLevel, getMethod } from '../engine/methods/registry.js';
import { ChannelError, MultifdReceiver, type ChannelStats } from '../engine/multifd-receiver.js';
import { MultifdSender, type SendChannelStats } from '../engine/multifd-sender.js';
import type { RamBlock } from '../engine/page-store.js';
import { connectTo } from '../transports/connect.js';
import { formatAddress, listen, type Listener } from '../transports/listener.js';
import type { TlsCreds } from '../transports/tls.js';
import { IdleWatch } from './idle-watch.js';
import { DEFAULT_IDENTIFY_TIMEOUT_MS, DEFAULT_MAX_PENDING, IncomingConnections, StrayConnectionError, type ConnectionKind } from './incoming.js';
import { ListeningHandle } from './handle.js';
import { OutboundSide } from './outbound-side.js';
import { SnapshotOutput } from './snapshot-output.js';
import { PostcopyFailedError } from './postcopy-failure.js';
import { preemptExpected } from './postcopy-stream.js';

export interface RelayOptions {
  /** Where A connects: tcp:HOST:PORT or unix:PATH (port 0 picks one, see handle.listening). */
  listen: string;
  /** B's migrate-incoming address. */
  to: string;
  /** A's multifd-channels; 0 = A has multifd off. Default 2. */
  channelsIn?: number;
  /** B's multifd-channels; default channelsIn. */
  channelsOut?: number;
  /**
   * Read A's multifd channels into one reused ring each (default true): less CPU per GiB; false
   * reads them as plain streams (see src/transports/ring-reader.ts).
   */
  readRing?: boolean;
  /** A's multifd-compression; 'auto' (default) detects it from the first data packet. */
  compressionIn?: string;
  /** B's multifd-compression: none (default), zlib or zstd. */
  compressionOut?: string;
  /**
   * Compression level towards B (zlib 1–9, zstd 1–20); the method's default when unset. Setting
   * it re-encodes every packet (see recompress).
   */
  levelOut?: number;
  /**
   * Decode and re-encode compressed packets even when A and B use the same method on as many
   * channels. By default such packets go on as they came (each A channel's stream continues on the
   * B channel of the same number), which costs no compression work; with levelOut set they are
   * always re-encoded.
   */
  recompress?: boolean;
  /** A's -uuid: A's init messages must carry it and B's carry it too. Default: B's carry A's. */
  uuid?: Buffer;
  /** Also write a mapped-ram snapshot of the migrated state here (committed once B confirmed). */
  tee?: string;
  /** O_DIRECT page writes for the tee (default true). */
  teeDirectIo?: boolean;
  /** How A's MULTIFD_FLUSH/EOS map to syncs; 'auto' infers it from A's setup section. */
  syncMode?: 'auto' | SyncMode;
  /** How long a new connection may take to send its first 4 bytes (default 10 s); a silent one is closed as a stray. */
  identifyTimeoutMs?: number;
  /** Connections allowed to wait for identification at once (default 16); more are closed at once. */
  maxPendingConnections?: number;
  /** TLS towards A: accept TLS connections only, with server credentials (A's tls-creds is a client). */
  tlsIn?: TlsCreds;
  /** TLS towards B: client credentials (B's tls-creds is a server). */
  tlsOut?: TlsCreds;
  /** How long a sync waits for A channels that never connected. */
  channelTimeoutMs?: number;
  /** Fails when A sends nothing for this long mid-migration (default 300 s; 0: never). */
  idleTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** Fails when B accepted nothing (no byte written, no message) for this long while we wait on it. Default 60 s. */
  stallTimeoutMs?: number;
  maxDeviceStateBytes?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface RelayProgress {
  phase: 'listening' | 'setup' | 'ram' | 'postcopy' | 'device-state' | 'waiting' | 'committing' | 'completed' | 'failed';
  elapsedMs: number;
  /** Bytes read from A (main and multifd channels). */
  bytesIn: number;
  /** Bytes written to B. */
  bytesOut: number;
  normal: number;
  duplicate: number;
  rounds: number;
  channelsIn: number;
  channelsOut: number;
  ramTotal: number;
}

export interface RelaySummary {
  status: 'completed';
  from: string;
  to: string;
  machine: string;
  'total-time': number;
  'bytes-in': number;
  'bytes-out': number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  /** Throughput of what came in from A. */
  mbps: number;
  'multifd-syncs': number;
  'sync-mode': SyncMode | 'none';
  'compression-in': string;
  'compression-out': string;
  /** Compressed packets passed on as they came, without decoding and re-encoding (see recompress). */
  'passed-encoded': number;
  /** A opened the return path (A completed only after B confirmed). */
  'return-path': boolean;
  /** B confirmed the load (SHUT 0 on the return path). */
  destination: 'confirmed';
  'device-state-bytes': number;
  /** Present when A switched to postcopy: B ran from the package on, pages followed on demand. */
  postcopy?: {
    'switched-at-ms': number;
    /** Page records relayed on the main channel after the switch. */
    'main-pages': number;
    /** Bytes relayed on the preempt channel (requested pages, A → B). */
    'preempt-bytes': number;
    'preempt-pages': number;
    'preempt-channel': boolean;
    /** Page requests relayed from B to A. */
    'page-requests': number;
  };
  tee?: { file: string; 'file-size': number; 'commit-time': number; 'direct-io': boolean };
  'channels-in': ChannelStats[];
  'channels-out': SendChannelStats[];
}

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
    return { listening: r.listening, done: r.done, abort: (e) => r.fail(e) };
  }, opts.signal);
}

class Relay {
  readonly listening: Promise<string>;
  readonly done: Promise<RelaySummary>;
  private resolveDone!: (s: RelaySummary) => void;
  private rejectDone!: (e: Error) => void;
  private readonly channelsIn: number;
  private readonly channelsOut: number;
  private readonly startedAt = Date.now();
  private phase: RelayProgress['phase'] = 'listening';
  private listener: Listener | undefined;
  private from = '';
  private aMain: Socket | undefined;
  private readonly aSockets = new Set<Socket>();
  /** B's side: its connections, the return path we open to it, the stall watchdog. */
  private readonly b: OutboundSide;
  private bMain: Promise<Socket> | undefined;
  private receiver: MultifdReceiver | undefined;
  private sender: MultifdSender | undefined;
  private tee: SnapshotOutput | undefined;
  private readonly blocks = new Map<string, RamBlock>();
  private readonly session: StreamSession;
  private failure: Error | undefined;
  private completed = false;
  private progressTimer: NodeJS.Timeout | undefined;
  private out: Buffer[] = [];
  private mainBytesIn = 0;
  private mainBytesOut = 0;
  private mainPages = 0;
  private mainZero = 0;
  private rounds = 0;
  private ramTotal = 0;
  private aReturnPath = false;
  private bReturnPath = false;
  /** A SHUT went to A (B's own, or our SHUT(1)): A has its verdict. */
  private aShutSent = false;
  /** A's whole stream (up to a VMDESCRIPTION that walks the device sections) was passed on to B. */
  private get streamComplete(): boolean {
    return this.session.complete;
  }

  private readonly incoming: IncomingConnections;
  private idle: IdleWatch | undefined;
  private switchedAt: number | undefined;
  private aPreempt: Socket | undefined;
  private preemptBytes = 0;
  private preemptPages = 0;
  private postcopyMainPages = 0;
  private pageRequests = 0;
  /** Resolves once precopy is sealed: tee writes of preempt pages wait for it. */
  private readonly postcopyStarted: Promise<void>;
  private resolvePostcopyStarted!: () => void;

  constructor(private readonly opts: RelayOptions, private readonly handle: ListeningHandle<RelaySummary, RelayEvents>, private readonly signal: AbortSignal) {
    this.incoming = new IncomingConnections({
      identifyTimeoutMs: opts.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
      maxPending: opts.maxPendingConnections ?? DEFAULT_MAX_PENDING,
      onKind: (sock, kind, source, peer) => this.identify(sock, kind, source, peer),
      onStray: (e) => this.onStray(e),
      takePreempt: (sock, source, byOrder) => this.takePreempt(sock, source, byOrder),
      ...(opts.readRing !== undefined ? { readRing: opts.readRing } : {}),
    });
    this.postcopyStarted = new Promise((resolve) => { this.resolvePostcopyStarted = resolve; });
    this.channelsIn = opts.channelsIn ?? 2;
    this.channelsOut = opts.channelsOut ?? this.channelsIn;
    for (const [name, n] of [['channels-in', this.channelsIn], ['channels-out', this.channelsOut]] as const) {
      if (!Number.isInteger(n) || n < 0 || n > 255) throw new InvalidOptionError(`${name} must be 0..255 (got ${n})`);
    }
    if ((this.channelsIn === 0) !== (this.channelsOut === 0)) {
      throw new InvalidOptionError(`channels-in ${this.channelsIn} and channels-out ${this.channelsOut}: the relay needs multifd on both sides or on neither`);
    }
    this.session = new StreamSession({
      kind: 'live',
      ...(opts.syncMode === undefined || opts.syncMode === 'auto' ? {} : { syncMode: opts.syncMode }),
      ...(opts.maxDeviceStateBytes === undefined ? {} : { maxDeviceStateBytes: opts.maxDeviceStateBytes }),
    });
    this.done = new Promise((res, rej) => {
      this.resolveDone = res;
      this.rejectDone = rej;
    });
    this.done.catch(() => {});
    this.b = new OutboundSide({
      to: opts.to,
      ...(opts.tlsOut ? { tls: opts.tlsOut } : {}),
      ...(opts.connectTimeoutMs !== undefined ? { connectTimeoutMs: opts.connectTimeoutMs } : {}),
      ...(opts.stallTimeoutMs !== undefined ? { stallTimeoutMs: opts.stallTimeoutMs } : {}),
      // Silence from B while nothing is owed to it is A's business (the idle watch).
      stallWhen: 'while-busy',
      stallError: (s) => new StallError(`the destination accepted nothing for ${s} s; does it expect ${this.channelsOut} multifd channel(s) (multifd-channels), the same multifd-compression (${opts.compressionOut ?? 'none'}) and the same sync mode (multifd-flush-after-each-section)?`),
      closedError: (where, detail) => this.destinationError(where, detail, `the destination closed its ${where} (${detail})`),
      onMessage: (m) => {
        if (m.type === ReturnPathMessage.REQ_PAGES || m.type === ReturnPathMessage.REQ_PAGES_ID) this.pageRequests++;
        publish('relay', 'destination-return-path', { type: m.type });
        // Forwarded message by message: A may have opened its return path after ours.
        if (this.aReturnPath && this.aMain && !this.aMain.destroyed) {
          this.aMain.write(encodeReturnPathMessage(m.type, m.payload));
          if (m.type === ReturnPathMessage.SHUT) this.aShutSent = true;
        }
        if (m.type === ReturnPathMessage.SHUT && this.b.shut !== 0) this.fail(this.destinationError('main channel', `SHUT ${this.b.shut}`, ''));
      },
      onMainEnd: () => {
        // B closes after its SHUT, as a destination does; A (which got that SHUT) sees the same.
        if (this.b.shut === 0 && this.aShutSent && this.aMain && !this.aMain.destroyed) this.aMain.end();
      },
      onClose: (where, isMain) => {
        // B gone before its verdict: A must not wait for a SHUT that never comes. Once the whole
        // stream went out, B closing its multifd channels is B finishing its load, not a failure.
        if (this.completed || this.failure || this.b.shut !== undefined) return;
        if (isMain || !this.streamComplete) {
          this.fail(new DestinationClosedError(where, 'closed', `the destination closed its ${where} ${this.streamComplete ? 'without confirming the load' : `during ${this.phase}`} (QEMU gone or failed? see its log)`));
        }
      },
      fail: (e) => this.fail(e),
      failure: () => this.failure,
    });
    this.listening = this.start();
  }

  private async start(): Promise<string> {
    try {
      const methodOut = getMethod(this.opts.compressionOut ?? 'none');
      checkLevel(methodOut, this.opts.levelOut);
      if (methodOut.name !== 'none' && this.channelsOut === 0) throw new InvalidOptionError(`compression ${methodOut.name} needs multifd channels towards the destination`);
      const compressionIn = this.opts.compressionIn ?? 'auto';
      const methodIn = compressionIn === 'auto' ? undefined : getMethod(compressionIn);
      if (this.opts.tee) this.tee = await SnapshotOutput.create(this.opts.tee, { channels: this.channelsIn, ...(this.opts.teeDirectIo === undefined ? {} : { directIo: this.opts.teeDirectIo }) });
      if (this.channelsOut > 0) {
        this.sender = new MultifdSender({
          channels: Array.from({ length: this.channelsOut }, (_, i) => ({ write: (bufs: readonly Buffer[]) => this.b.writeChannel(i, bufs) })),
          method: methodOut,
          ...(this.opts.levelOut !== undefined ? { level: this.opts.levelOut } : {}),
        });
        this.sender.on('error', (e: Error) => this.fail(e));
        this.receiver = new MultifdReceiver({
          channels: this.channelsIn,
          ...(methodIn ? { method: methodIn } : {}),
          store: new ForwardingStore(this.sender, this.tee?.store, {
            passEncoded: this.channelsIn === this.channelsOut && this.opts.levelOut === undefined && this.opts.recompress !== true,
          }),
          blocks: this.blocks,
          ...(this.opts.uuid ? { uuid: this.opts.uuid } : {}),
          ...(this.opts.channelTimeoutMs !== undefined ? { channelTimeoutMs: this.opts.channelTimeoutMs } : {}),
          channelName: 'source multifd channel',
        });
        this.receiver.on('error', (e: Error) => this.fail(e));
        this.receiver.on('channel', (_id: number, uuid: Buffer) => this.openChannelsToB(this.opts.uuid ?? uuid));
      }
      this.listener = await listen(this.opts.listen, (s) => this.onConnection(s), {
        ...(this.opts.tlsIn ? { tls: this.opts.tlsIn } : {}),
        handshakeTimeoutMs: this.opts.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
        onTlsError: (e, peer) => this.onStray(new StrayConnectionError(peer, e.message)),
      });
      if (this.signal.aborted) throw abortError(this.signal.reason);
      this.progressTimer = setInterval(() => this.handle.emit('progress', this.progress()), this.opts.progressIntervalMs ?? 250);
      this.idle = new IdleWatch(
        this.opts.idleTimeoutMs ?? 300_000,
        () => this.progress().bytesIn,
        // Waiting on B is the stall watchdog's business, not A's silence.
        () => (this.phase === 'setup' || this.phase === 'ram' || this.phase === 'device-state') && !this.b.busy,
        (s) => this.fail(new IdleTimeoutError(s, `the source sent nothing for ${s} s during ${this.phase} (a stalled channel, a paused source, or gone?)`)),
      );
      this.idle.start();
      this.progressTimer.unref();
      this.b.watch();
      this.from = formatAddress(this.listener.address);
      publish('relay', 'listening', { address: this.from });
      return this.from;
    } catch (e) {
      this.fail(e as Error);
      throw e;
    }
  }

  progress(): RelayProgress {
    const cin = this.receiver?.channelStats() ?? [];
    const cout = this.sender?.stats() ?? [];
    return {
      phase: this.phase,
      elapsedMs: Date.now() - this.startedAt,
      bytesIn: this.mainBytesIn + cin.reduce((n, c) => n + c.bytes, 0),
      bytesOut: this.mainBytesOut + cout.reduce((n, c) => n + c.bytes, 0),
      normal: this.mainPages + cin.reduce((n, c) => n + c.normalPages, 0),
      duplicate: this.mainZero + cin.reduce((n, c) => n + c.zeroPages, 0),
      rounds: this.rounds,
      channelsIn: this.channelsIn,
      channelsOut: this.channelsOut,
      ramTotal: this.ramTotal,
    };
  }

  // ---- A's side -------------------------------------------------------------------------------

  private onConnection(sock: Socket): void {
    if (this.failure || this.completed) {
      sock.destroy();
      return;
    }
    this.aSockets.add(sock);
    sock.on('close', () => this.aSockets.delete(sock));
    this.incoming.accept(sock);
  }

  /** A connection that is no migration channel: closed and reported, the migration goes on. */
  private onStray(e: StrayConnectionError): void {
    publish('relay', 'stray-connection', { error: e });
    this.handle.emit('stray', e);
  }

  /** A's postcopy preempt channel (no magic): the connection after main and all multifd (§6.3). */
  private takePreempt(sock: Socket, source: AsyncIterable<Buffer>, byOrder: boolean): boolean {
    if (!preemptExpected(this.session.postcopyAdvised && !!this.aMain && !this.aPreempt && !this.failure && !this.completed, this.receiver?.connected ?? 0, this.channelsIn, byOrder)) return false;
    this.aPreempt = sock;
    sock.setNoDelay(true);
    sock.on('error', () => {});
    void this.runPreempt(source);
    return true;
  }

  /**
   * Relays A's preempt channel to a preempt channel of our own to B, opened after B's main and
   * multifd channels so B takes it as preempt too. Bytes pass unchanged (block names are the
   * same on both sides); they are parsed to check them and for the tee.
   */
  private async runPreempt(source: AsyncIterable<Buffer>): Promise<void> {
    const b = (async () => {
      await this.bMain;
      for (let i = 0; i < this.b.channelsOpened; i++) await this.b.channel(i);
      return this.b.connect('postcopy preempt channel');
    })();
    b.catch(() => {});
    publish('relay', 'preempt-channel', {});
    const parser = new PageRecordParser((name) => this.blocks.get(name)?.usedLength, 'source preempt channel');
    try {
      for await (const chunk of source) {
        if (this.failure) return;
        this.preemptBytes += chunk.length;
        // Pages on preempt belong after the switch (the block list known, precopy sealed); the
        // socket is not read meanwhile, so an early sender cannot make us buffer without bound.
        await this.postcopyStarted;
        parser.push(chunk);
        for (let ev = parser.next(); ev !== null; ev = parser.next()) {
          if (ev.type === 'eos') continue;
          this.preemptPages++;
          if (!this.tee) continue;
          if (ev.type === 'page') await this.tee.store.writePages(ev.block, [ev.offset], 1, ev.data);
          else await this.tee.store.zeroPages(ev.block, [ev.offset], 0, 1);
        }
        await this.b.write(await b, [chunk]);
      }
      if (!parser.atBoundary) throw new ProtocolError('TRUNCATED', 'closed inside a page record');
      (await b).end();
    } catch (e) {
      if (this.completed || this.failure) return;
      const err = e as Error & { code?: string };
      if ((err.code === 'ECONNRESET' || err.code === 'EPIPE') && this.b.shut === 0) return;
      this.fail(new ChannelError('source postcopy preempt channel', err));
    }
  }

  private identify(sock: Socket, kind: ConnectionKind, source: AsyncIterable<Buffer>, peer: string): void {
    if (this.failure) return;
    if (kind === 'main') {
      if (this.aMain) {
        sock.destroy();
        this.onStray(new StrayConnectionError(peer, 'a second main channel (QEVM) while one is in use; closed'));
        return;
      }
      this.aMain = sock;
      this.phase = 'setup';
      publish('relay', 'source', { peer });
      void this.runMain(source);
      return;
    }
    if (!this.receiver) {
      sock.destroy();
      this.fail(new ProtocolError('BAD_CHANNEL_ID', 'a multifd channel connected but the relay expects none (--channels-in 0); does the source have multifd on?'));
      return;
    }
    // Counted with the ones still sending their init: a connection that sent the magic and
    // stalls holds a place too. QEMU ignores extra connections; we close and report them.
    if (this.receiver.openConnections >= this.channelsIn) {
      sock.destroy();
      this.onStray(new StrayConnectionError(peer, `a multifd connection beyond the ${this.channelsIn} channels; closed`));
      return;
    }
    void this.receiver.runChannel(source, `source multifd connection from ${peer}`);
  }

  private async runMain(source: AsyncIterable<Buffer>): Promise<void> {
    const session = this.session;
    try {
      for await (const chunk of source) {
        if (this.failure) return;
        this.mainBytesIn += chunk.length;
        session.push(chunk);
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          await this.onMainEvent(ev);
          if (this.failure) return;
        }
        await this.flushMain();
      }
      if (this.failure) return;
      await this.sourceEnded();
    } catch (e) {
      const err = e as Error & { code?: string };
      // A that got B's SHUT(0) has completed; it may drop the connection without a clean close
      // (QEMU 11 over TLS resets it). With the whole stream passed on, that is the end.
      if (err.code === 'ECONNRESET' && this.aShutSent && this.b.shut === 0 && session.ramEnded && session.complete && !this.failure) {
        try {
          await this.sourceEnded();
        } catch (e2) {
          this.fail(new ChannelError('source main channel', e2 as Error));
        }
        return;
      }
      this.fail(err instanceof ChannelError ? err : new ChannelError('source main channel', err));
    }
  }

  /** The record order is the session's; this forwards each record to B (and the tee). */
  private async onMainEvent(ev: SessionEvent): Promise<void> {
    const session = this.session;
    switch (ev.type) {
      case 'header':
        this.connectMainToB();
        break;
      case 'configuration':
        publish('relay', 'configuration', { machine: ev.config.machine });
        break;
      case 'return-path':
        this.aReturnPath = true;
        publish('relay', 'return-path', {});
        // Already open towards B (we opened it ourselves): a second one is only logged by QEMU.
        if (this.bReturnPath) return;
        this.bReturnPath = true;
        break;
      case 'section':
        if (ev.kind === 'start' && !this.bReturnPath) {
          // Our own return path to B: its SHUT tells us whether B loaded what we sent.
          this.bReturnPath = true;
          this.out.push(encodeCommand(Command.OPEN_RETURN_PATH));
        }
        if (this.phase === 'setup' && ev.kind !== 'start') this.phase = 'ram';
        break;
      case 'mem-size':
        this.ramTotal = ev.totalBytes;
        break;
      case 'ram-block':
        this.blocks.set(ev.block.name, { name: ev.block.name, usedLength: ev.block.usedLength });
        break;
      case 'ram-setup':
        if (this.tee) await this.tee.head(session.configuration!, ev.sectionId, ev.totalBytes, ev.blocks);
        break;
      case 'page':
        this.mainPages++;
        if (ev.postcopy) this.postcopyMainPages++;
        if (this.tee) await this.tee.store.writePages(ev.block, [ev.offset], 1, ev.data);
        break;
      case 'zero':
        this.mainZero++;
        if (ev.postcopy) this.postcopyMainPages++;
        if (this.tee) await this.tee.store.zeroPages(ev.block, [ev.offset], 0, 1);
        break;
      case 'sync-point':
        if (!this.receiver) {
          if (ev.cause === 'flush') throw new ProtocolError('BAD_RECORD', 'MULTIFD_FLUSH but the relay expects no multifd channels (--channels-in 0); does the source have multifd on?');
          break;
        }
        if (ev.decided) publish('relay', 'sync-mode', { mode: ev.decided });
        await this.syncRound();
        break;
      case 'eos':
        if (ev.decided && this.receiver) publish('relay', 'sync-mode', { mode: ev.decided });
        break;
      case 'footer':
        if (ev.setup && this.tee) await this.tee.setupFooter(ev.sectionId);
        break;
      case 'postcopy-switch':
        await this.onPostcopySwitch(ev);
        break;
      case 'device-state':
        // B gets the record as it came; the tee gets the session's bytes (after a postcopy
        // switch: a description of the package's sections, as receive writes it).
        if (!session.postcopy) this.phase = 'device-state';
        if (this.tee) await this.tee.deviceState(ev.data, session.sectionId, session.switchoverStart);
        break;
      default:
        break;
    }
    if (ev.record) this.out.push(...encodeMainEvent(ev.record));
  }

  /**
   * A's switch to postcopy (§6.2, §6.4): the package goes to B unchanged (B answers its PINGs;
   * B's PONGs, page requests and SHUT come back through the return path). Multifd is over: the
   * prepare FLUSH before it was the last sync, so later multifd packets from A are refused.
   */
  private async onPostcopySwitch(ev: SessionEventOf<'postcopy-switch'>): Promise<void> {
    this.switchedAt = Date.now();
    this.phase = 'postcopy';
    publish('relay', 'postcopy', { sections: ev.sections.length, deviceBytes: ev.devices.length });
    await this.receiver?.finish('the switch to postcopy');
    this.resolvePostcopyStarted();
    if (this.tee) await this.tee.deviceState([ev.devices], this.session.sectionId, this.session.switchoverStart);
  }

  /**
   * One sync point of A: once every A channel has passed its pages of the round on (written to
   * B), one SYNC on every B channel, while A's channels are still held.
   */
  private async syncRound(): Promise<void> {
    await this.flushMain();
    await this.receiver!.sync(() => this.sender!.sync());
    this.rounds++;
  }

  /** A closed its main channel: after a complete stream, hand B the end and wait for its verdict. */
  private async sourceEnded(): Promise<void> {
    // A complete stream ends in a VMDESCRIPTION that walks the device sections; anything less
    // would leave B waiting for device state that never comes.
    if (!this.session.complete) {
      throw new ProtocolError('TRUNCATED', `the source closed its main channel before the migration completed, at stream offset ${this.session.offset} (source gone?)`);
    }
    await this.flushMain();
    this.phase = 'waiting';
    if (this.receiver) await this.receiver.finish();
    // A closes first only without a return path of its own; B may still be loading. B main stays
    // open until B's SHUT arrived on the return path we opened: a destination may close its side
    // when it sees our end (Node's default for servers), and its verdict would be lost.
    const bMain = await this.bMain!;
    await this.b.verdict();
    bMain.end();
    if (this.failure) return;
    if (this.b.shut === undefined) throw new DestinationClosedError('main channel', 'closed without confirming the load', 'the destination closed the connection without confirming the load (no SHUT on the return path)');
    await this.complete();
  }

  // ---- B's side -------------------------------------------------------------------------------

  private connectMainToB(): void {
    if (this.bMain) return;
    // The return path to B is always ours: the relay learns B's verdict even when A opened none.
    this.bMain = this.b.connectMain(true).then((s) => {
      publish('relay', 'destination', { to: this.opts.to });
      return s;
    });
    this.bMain.catch((e: Error) => this.fail(e));
  }

  /**
   * B's multifd connections, once A's first init told the uuid: B identifies the first
   * connection as its main channel, so these connect after it, and each writes its init at once
   * (QEMU blocks reading it). No SYNC here: every B sync mirrors one of A's sync points.
   */
  private openChannelsToB(uuid: Buffer): void {
    if (this.b.channelsOpened > 0 || !this.sender) return;
    this.connectMainToB();
    this.b.openChannels(this.channelsOut, this.bMain!);
    // Queued before any packet can be: the sender writes each channel's buffers in order.
    for (let i = 0; i < this.channelsOut; i++) {
      this.sender.initChannel(i, false, uuid).catch((e: Error) => this.fail(e));
    }
    publish('relay', 'destination-channels', { channelsOut: this.channelsOut });
  }

  private async flushMain(): Promise<void> {
    if (this.out.length === 0) return;
    const bufs = this.out;
    this.out = [];
    await this.b.write(await this.bMain!, bufs);
    this.mainBytesOut += bufs.reduce((n, b) => n + b.length, 0);
  }

  /** B's SHUT(n ≠ 0) says more than a closed connection: it failed to load. */
  private destinationError(where: string, detail: string, what: string): Error {
    const shut = this.b.shut;
    if (shut !== undefined && shut !== 0) return new DestinationRefusedError(shut, `the destination failed to load the migration (SHUT ${shut}); see its log`);
    return new DestinationClosedError(where, detail, what);
  }

  // ---- the end --------------------------------------------------------------------------------

  private async complete(): Promise<void> {
    const session = this.session;
    let tee: RelaySummary['tee'];
    if (this.tee) {
      this.phase = 'committing';
      if (!session.complete) {
        throw new ProtocolError('TRUNCATED', `the migration completed, but the tee snapshot was not written: the device state (${session.deviceStateBytes} bytes) has no complete VMDESCRIPTION (suppress-vmdesc on?)`);
      }
      const t0 = Date.now();
      await this.tee.commit();
      tee = { file: this.opts.tee!, 'file-size': this.tee.store.streamEnd, 'commit-time': Date.now() - t0, 'direct-io': this.tee.store.directIo };
    }
    this.completed = true;
    this.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: RelaySummary = {
      status: 'completed',
      from: this.from,
      to: this.opts.to,
      machine: session.configuration?.machine ?? '',
      'total-time': elapsed,
      'bytes-in': p.bytesIn,
      'bytes-out': p.bytesOut,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round(((p.bytesIn * 8) / (elapsed * 1000)) * 100) / 100 : 0,
      'multifd-syncs': this.rounds,
      'sync-mode': this.receiver ? (session.syncMode ?? 'round') : 'none',
      'compression-in': this.receiver?.compression ?? (this.opts.compressionIn && this.opts.compressionIn !== 'auto' ? this.opts.compressionIn : 'none'),
      'compression-out': this.opts.compressionOut ?? 'none',
      'passed-encoded': this.receiver?.encodedPackets ?? 0,
      'return-path': this.aReturnPath,
      destination: 'confirmed',
      'device-state-bytes': session.deviceStateBytes,
      ...(session.postcopy ? {
        postcopy: {
          'switched-at-ms': (this.switchedAt ?? this.startedAt) - this.startedAt,
          'main-pages': this.postcopyMainPages,
          'preempt-bytes': this.preemptBytes,
          'preempt-pages': this.preemptPages,
          'preempt-channel': this.aPreempt !== undefined,
          'page-requests': this.pageRequests,
        },
      } : {}),
      ...(tee ? { tee } : {}),
      'channels-in': this.receiver?.channelStats() ?? [],
      'channels-out': this.sender?.stats() ?? [],
    };
    await this.cleanup();
    this.handle.emit('progress', this.progress());
    publish('relay', 'completed', { summary });
    this.resolveDone(summary);
  }

  fail(err: Error): void {
    if (this.failure || this.completed) return;
    if (this.switchedAt !== undefined) err = new PostcopyFailedError(err, 'relay');
    this.failure = err;
    this.phase = 'failed';
    publish('relay', 'failed', { error: err });
    // A must not complete on a state B did not load: tell it, then cut it off. If B's SHUT(0)
    // already went to A, A completed and B runs; only our own part (the tee) failed.
    if (!this.aShutSent && this.aReturnPath && this.aMain && !this.aMain.destroyed) {
      this.aShutSent = true;
      this.aMain.write(encodeShut(1));
    }
    this.receiver?.fail(err);
    this.sender?.fail(err);
    // B reads its main channel only once all its multifd channels connected: when A failed before
    // they were opened, B would wait in setup for ever. They connect and close at once, so B fails.
    if (this.bMain && this.b.channelsOpened === 0 && this.channelsOut > 0) {
      for (let i = 0; i < this.channelsOut; i++) {
        this.bMain.then(() => connectTo(this.opts.to, 2000, this.opts.tlsOut)).then((s) => s.destroy(), () => {});
      }
    }
    void (async () => {
      await this.cleanup();
      await this.receiver?.quiesce();
      await this.tee?.abort();
      this.rejectDone(err);
    })();
  }

  private async cleanup(): Promise<void> {
    if (this.progressTimer) clearInterval(this.progressTimer);
    this.idle?.stop();
    this.sender?.close();
    const failing = this.failure !== undefined;
    if (failing) this.b.destroy();
    else this.b.end(2000);
    for (const s of this.aSockets) {
      if (failing) s.destroy();
      else s.end(() => s.destroy());
    }
    if (!failing) setTimeout(() => { for (const s of this.aSockets) s.destroy(); }, 2000).unref();
    await this.listener?.close();
  }
}
