// The side of a conversation that a migration source connects to (receive; relay's A side): the
// listener, sorting each connection by its first bytes (main, multifd, the postcopy preempt
// channel), the multifd receiver, the preempt channel, the idle watch, and the main channel read
// through the stream session. What the migration is written into is a sink: receive's snapshot,
// or relay's forwarder to B with its optional tee snapshot.
//
// The record order is the session's (codec/stream-session.ts); this side does what every sink
// needs of an event (block list for the multifd receiver, the snapshot's writes, sync points, the
// postcopy switch) and hands the event on.

import type { Socket } from 'node:net';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { abortError, IdleTimeoutError, ProtocolError } from '../codec/errors.js';
import { PageRecordParser } from '../codec/postcopy.js';
import { formatUuid } from '../codec/multifd-init.js';
import { StreamSession, type SessionEvent } from '../codec/stream-session.js';
import { applyXbzrle } from '../codec/xbzrle.js';
import type { SyncMode } from '../codec/sync-points.js';
import { publish } from '../engine/diagnostics.js';
import { getMethod } from '../engine/methods/registry.js';
import { ChannelError, MultifdReceiver } from '../engine/multifd-receiver.js';
import type { PageStore, RamBlock } from '../engine/page-store.js';
import { formatAddress, listen, type Listener } from '../transports/listener.js';
import { describePeer } from '../transports/socket-io.js';
import type { TlsCreds } from '../transports/tls.js';
import { IdleWatch } from './idle-watch.js';
import { DEFAULT_IDENTIFY_TIMEOUT_MS, DEFAULT_MAX_PENDING, IncomingConnections, StrayConnectionError, type ConnectionKind } from './incoming.js';
import { PostcopyFailedError } from './postcopy-failure.js';
import { preemptExpected } from './postcopy-stream.js';
import type { SnapshotOutput } from './snapshot-output.js';

export type InboundPhase = 'listening' | 'setup' | 'ram' | 'postcopy' | 'device-state' | 'waiting' | 'committing' | 'completed' | 'failed';

export interface InboundOptions {
  listen: string;
  tls?: TlsCreds | undefined;
  channels: number;
  /** The source's multifd-compression, or 'auto'. */
  compression: string;
  uuid?: Buffer | undefined;
  channelTimeoutMs?: number | undefined;
  identifyTimeoutMs?: number | undefined;
  maxPendingConnections?: number | undefined;
  idleTimeoutMs?: number | undefined;
  /** Phases in which the source's silence counts (see IdleWatch). */
  idlePhases: readonly InboundPhase[];
  syncMode?: 'auto' | SyncMode | undefined;
  maxDeviceStateBytes?: number | undefined;
  /** Receive: commit once a complete-looking main stream stayed quiet this long (see runMain). */
  completionQuietMs?: number | undefined;
  progressIntervalMs?: number | undefined;
  signal?: AbortSignal | undefined;
  /** Read multifd channels into one reused ring each (default true; see src/transports/ring-reader.ts). */
  readRing?: boolean | undefined;
  /** Whose side this is: a relay names the source's channels "source ..." in its errors. */
  conversation: 'receive' | 'relay';
}

/** Where the migration goes. Everything optional is what only a relay does. */
export interface InboundSink {
  /** Where multifd pages go. */
  readonly store: PageStore;
  /** Receives the main channel's pages, its setup section and the device state (receive's output, relay's tee). */
  readonly snapshot: SnapshotOutput | undefined;
  /** Each main-stream event, after this side did its part (relay passes the record on to B). */
  event(ev: SessionEvent): Promise<void> | undefined | void;
  /** One sync point of the source (relay: SYNC on B while the source's channels are held). */
  sync(receiver: MultifdReceiver): Promise<void>;
  /** After each main-channel chunk's events. */
  chunkDone?(): Promise<void>;
  /** The main channel ended, or (with completionQuietMs) stayed quiet after a complete stream. */
  mainEnded(): Promise<void>;
  /** A main channel error the sink takes as the end (relay: a reset after B's SHUT 0). */
  mainErrorIsEnd?(e: Error & { code?: string }): boolean;
  /** A source multifd channel's init came with this uuid. */
  channel?(id: number, uuid: Buffer): void;
  /** The main channel or the preempt channel connected. */
  connected(kind: 'main' | 'preempt', peer: string): void;
  /** Relay: the preempt channel's bytes as they came, after the snapshot had their pages. */
  preempt?: { chunk(c: Buffer): Promise<void>; end(): Promise<void>; resetIsEnd(): boolean };
  /** Whether the sink waits on its own peer (then the source's silence is no idleness). */
  busy?(): boolean;
  /** Every 'progress' tick. */
  tick(): void;
  /** A connection closed without being taken as a migration channel. */
  stray(e: StrayConnectionError): void;
  /** The conversation's fail(): the inbound side's failures go through it. */
  fail(e: Error): void;
}

export class InboundSide {
  readonly session: StreamSession;
  /** RAM blocks as the main channel lists them; the multifd receiver checks packets against them. */
  readonly blocks = new Map<string, RamBlock>();
  receiver: MultifdReceiver | undefined;
  phase: InboundPhase = 'listening';
  main: Socket | undefined;
  failure: Error | undefined;
  /** Set once the conversation completes: late events and connections are ignored. */
  finished = false;
  address = '';
  mainBytes = 0;
  mainPages = 0;
  mainZero = 0;
  /** XBZRLE deltas applied onto the pages held (main channel; QEMU sends them without multifd). */
  xbzrlePages = 0;
  /** The page an XBZRLE delta is applied onto, reused (the snapshot copies it when staging). */
  private xbzrlePage: Buffer | undefined;
  rounds = 0;
  postcopyMainPages = 0;
  preemptBytes = 0;
  preemptPages = 0;
  discardRanges = 0;
  switchedAt: number | undefined;
  preemptChannel: Socket | undefined;

  private sink!: InboundSink;
  private listener: Listener | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly incoming: IncomingConnections;
  private idle: IdleWatch | undefined;
  private progressTimer: NodeJS.Timeout | undefined;
  /** When the preempt channel last delivered bytes, and whether it is inside a record or a write. */
  private preemptAt = 0;
  private preemptBusy = false;
  /** Resolves when precopy is sealed (every multifd write done): preempt pages wait for it. */
  private readonly postcopyStarted: Promise<void>;
  private resolvePostcopyStarted!: () => void;

  private readonly names: { main: string; preempt: string; preemptRecords: string; multifdConnection: string; who: string; flag: string };

  constructor(private readonly o: InboundOptions) {
    const relay = o.conversation === 'relay';
    const src = relay ? 'source ' : '';
    this.names = {
      main: `${src}main channel`,
      preempt: `${src}postcopy preempt channel`,
      preemptRecords: `${src}preempt channel`,
      multifdConnection: `${src}multifd connection`,
      who: relay ? 'the relay' : 'the receiver',
      flag: relay ? '--channels-in' : '--channels',
    };
    this.session = new StreamSession({
      kind: 'live',
      ...(o.syncMode === undefined || o.syncMode === 'auto' ? {} : { syncMode: o.syncMode }),
      ...(o.maxDeviceStateBytes === undefined ? {} : { maxDeviceStateBytes: o.maxDeviceStateBytes }),
    });
    this.incoming = new IncomingConnections({
      identifyTimeoutMs: o.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
      maxPending: o.maxPendingConnections ?? DEFAULT_MAX_PENDING,
      onKind: (sock, kind, source, peer) => this.identify(sock, kind, source, peer),
      onStray: (e) => this.onStray(e),
      takePreempt: (sock, source, byOrder) => this.takePreempt(sock, source, byOrder),
      ...(o.readRing !== undefined ? { readRing: o.readRing } : {}),
    });
    this.postcopyStarted = new Promise((resolve) => { this.resolvePostcopyStarted = resolve; });
  }

  /** Creates the multifd receiver and starts listening; resolves with the bound address. */
  async open(sink: InboundSink): Promise<string> {
    this.sink = sink;
    const o = this.o;
    const method = o.compression === 'auto' ? undefined : getMethod(o.compression);
    if (o.channels > 0) {
      this.receiver = new MultifdReceiver({
        channels: o.channels,
        ...(method ? { method } : {}),
        store: sink.store,
        blocks: this.blocks,
        ...(o.uuid ? { uuid: o.uuid } : {}),
        ...(o.channelTimeoutMs !== undefined ? { channelTimeoutMs: o.channelTimeoutMs } : {}),
        ...(o.conversation === 'relay' ? { channelName: 'source multifd channel' } : {}),
      });
      this.receiver.on('error', (e: Error) => sink.fail(e));
      this.receiver.on('sync', (n: number) => { this.rounds = n; });
      if (sink.channel) this.receiver.on('channel', (id: number, uuid: Buffer) => sink.channel!(id, uuid));
    }
    this.listener = await listen(o.listen, (s) => this.onConnection(s), {
      ...(o.tls ? { tls: o.tls } : {}),
      handshakeTimeoutMs: o.identifyTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
      onTlsError: (e, peer) => this.onStray(new StrayConnectionError(peer, e.message)),
    });
    // The conversation's handle fails it on abort; one aborted before listening stops here, and
    // closes what it opened so that open() on its own leaves nothing behind.
    if (o.signal?.aborted) {
      await this.close();
      throw abortError(o.signal.reason);
    }
    this.progressTimer = setInterval(() => sink.tick(), o.progressIntervalMs ?? 250);
    this.progressTimer.unref();
    this.idle = new IdleWatch(
      o.idleTimeoutMs ?? 300_000,
      () => this.bytesIn(),
      () => o.idlePhases.includes(this.phase) && !(sink.busy?.() ?? false),
      (s) => sink.fail(new IdleTimeoutError(s, `the source sent nothing for ${s} s during ${this.phase} (a stalled channel, a paused source, or gone?)`)),
    );
    this.idle.start();
    this.address = formatAddress(this.listener.address);
    return this.address;
  }

  /** Bytes read from the source on every channel. */
  bytesIn(): number {
    return this.mainBytes + this.preemptBytes + this.multifdTotals().bytes;
  }

  multifdTotals(): { bytes: number; normal: number; zero: number } {
    const t = { bytes: 0, normal: 0, zero: 0 };
    for (const c of this.receiver?.channelStats() ?? []) {
      t.bytes += c.bytes;
      t.normal += c.normalPages;
      t.zero += c.zeroPages;
    }
    return t;
  }

  /** Returns the error to report: after the switch to postcopy it says what was lost. */
  failed(err: Error): Error {
    if (this.switchedAt !== undefined) err = new PostcopyFailedError(err, this.o.conversation);
    this.failure = err;
    this.phase = 'failed';
    this.receiver?.fail(err);
    return err;
  }

  /** Stops timers and the listener and closes the source's connections (at once when failing). */
  async close(): Promise<void> {
    if (this.progressTimer) clearInterval(this.progressTimer);
    this.idle?.stop();
    for (const s of this.sockets) s.end(() => s.destroy());
    // Give a clean end a moment; anything left is destroyed so the source sees a failure now.
    setTimeout(() => { for (const s of this.sockets) s.destroy(); }, this.failure ? 0 : 2000).unref();
    await this.listener?.close();
  }

  /** After a failure: waits for the channels' writes to stop, then drops the snapshot. */
  async discard(): Promise<void> {
    await this.receiver?.quiesce();
    await this.sink?.snapshot?.abort();
  }

  // ---- connections --------------------------------------------------------------------------

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
    publish(this.o.conversation, 'stray-connection', { error: e });
    this.sink.stray(e);
  }

  private identify(sock: Socket, kind: ConnectionKind, source: AsyncIterable<Buffer>, peer: string): void {
    if (this.failure) return;
    if (kind === 'main') {
      if (this.main) {
        sock.destroy();
        this.onStray(new StrayConnectionError(peer, 'a second main channel (QEVM) while one is in use; closed'));
        return;
      }
      this.main = sock;
      this.phase = 'setup';
      this.sink.connected('main', peer);
      void this.runMain(source);
      return;
    }
    if (!this.receiver) {
      sock.destroy();
      this.sink.fail(new ProtocolError('BAD_CHANNEL_ID', `a multifd channel connected but ${this.names.who} expects none (${this.names.flag} 0); does the source have multifd on?`));
      return;
    }
    // Counted with the ones still sending their init: a connection that sent the magic and
    // stalls holds a place too. QEMU ignores extra connections; we close and report them.
    if (this.receiver.openConnections >= this.o.channels) {
      sock.destroy();
      this.onStray(new StrayConnectionError(peer, `a multifd connection beyond the ${this.o.channels} channels; closed`));
      return;
    }
    void this.receiver.runChannel(source, `${this.names.multifdConnection} from ${peer}`);
  }

  // ---- the main channel ---------------------------------------------------------------------

  private async runMain(source: AsyncIterable<Buffer>): Promise<void> {
    const session = this.session;
    const quietMs = this.o.completionQuietMs;
    const chunks = source[Symbol.asyncIterator]();
    try {
      for (;;) {
        const next = chunks.next();
        let r: IteratorResult<Buffer>;
        if (quietMs !== undefined && session.complete) {
          // The bytes so far end in a VMDESCRIPTION that walks, but guest-written bytes can look
          // like one at a read boundary: end only once the stream stays quiet (a real source
          // sends nothing more until our SHUT) or ends.
          const quiet = await quietFor(next, quietMs);
          if (quiet === 'quiet') {
            next.then((more) => {
              if (!more.done) publish(this.o.conversation, 'late-data', { bytes: more.value.length, message: 'bytes arrived on the main channel after the snapshot was committed' });
            }, () => {});
            await this.sink.mainEnded();
            return;
          }
          r = quiet;
        } else {
          r = await next;
        }
        if (r.done) break;
        if (this.failure || this.finished) return;
        this.mainBytes += r.value.length;
        session.push(r.value);
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          await this.onEvent(ev);
          if (this.failure || this.finished) return;
        }
        await this.sink.chunkDone?.();
      }
      if (!this.failure && !this.finished) await this.sink.mainEnded();
    } catch (e) {
      const err = e as Error & { code?: string };
      if (!this.failure && this.sink.mainErrorIsEnd?.(err)) {
        try {
          await this.sink.mainEnded();
        } catch (e2) {
          this.sink.fail(new ChannelError(this.names.main, e2 as Error));
        }
        return;
      }
      // A source killed outright resets the connection instead of closing it: same news.
      if (err.code === 'ECONNRESET' || err.code === 'EPIPE') {
        this.sink.fail(new ChannelError(this.names.main, new ProtocolError('TRUNCATED', `the connection was reset before the migration completed, at stream offset ${session.offset} (source gone?)`)));
        return;
      }
      this.sink.fail(err instanceof ChannelError ? err : new ChannelError(this.names.main, err));
    }
  }

  /** What every sink needs of an event; then the sink's own part. */
  private async onEvent(ev: SessionEvent): Promise<void> {
    const snapshot = this.sink.snapshot;
    const session = this.session;
    switch (ev.type) {
      case 'configuration':
        // validate-uuid puts the source's -uuid here; with multifd off it is the only place it shows.
        if (this.o.uuid && ev.config.uuid && !ev.config.uuid.equals(this.o.uuid)) {
          throw new ProtocolError('UUID_MISMATCH', `the configuration (validate-uuid) carries uuid ${formatUuid(ev.config.uuid)}, expected ${formatUuid(this.o.uuid)}`, { offset: ev.at });
        }
        publish(this.o.conversation, 'configuration', { machine: ev.config.machine });
        break;
      case 'return-path':
        publish(this.o.conversation, 'return-path', {});
        break;
      case 'discard':
        this.discardRanges += ev.ranges;
        break;
      case 'ram-block':
        this.blocks.set(ev.block.name, { name: ev.block.name, usedLength: ev.block.usedLength });
        break;
      case 'ram-setup':
        await snapshot?.head(session.configuration!, ev.sectionId, ev.totalBytes, ev.blocks);
        break;
      case 'page': {
        this.mainPages++;
        if (ev.postcopy) this.postcopyMainPages++;
        // Staged into runs, not a write awaited per page (a background snapshot is all pages here).
        const staged = snapshot?.store.stagePage(ev.block, ev.offset, ev.data);
        if (staged) await staged;
        break;
      }
      case 'zero': {
        this.mainZero++;
        if (ev.postcopy) this.postcopyMainPages++;
        const zeroed = snapshot?.store.zeroPages(ev.block, [ev.offset], 0, 1);
        if (zeroed) await zeroed;
        break;
      }
      case 'xbzrle':
        // Onto the page the snapshot holds (a staged page is read from its staging buffer), as a
        // QEMU destination applies it onto guest memory; a relay without a tee passes it on.
        this.mainPages++;
        this.xbzrlePages++;
        if (snapshot) {
          const page = await snapshot.store.readPage(ev.block, ev.offset, this.xbzrlePage ??= Buffer.alloc(TARGET_PAGE_SIZE));
          applyXbzrle(ev.delta, page);
          const staged = snapshot.store.stagePage(ev.block, ev.offset, [page]);
          if (staged) await staged;
        }
        break;
      case 'iterable':
        snapshot?.iterable(ev.bytes);
        break;
      case 'sync-point':
        if (!this.receiver) {
          if (ev.cause === 'flush') throw new ProtocolError('BAD_RECORD', `MULTIFD_FLUSH but ${this.names.who} expects no multifd channels (${this.names.flag} 0); does the source have multifd on?`);
          break;
        }
        if (ev.decided) publish(this.o.conversation, 'sync-mode', { mode: ev.decided });
        // Main-channel pages land before the next round's multifd pages can touch the same pages.
        await snapshot?.store.flushPages();
        await this.sink.sync(this.receiver);
        break;
      case 'eos':
        if (ev.decided && this.receiver) publish(this.o.conversation, 'sync-mode', { mode: ev.decided });
        break;
      case 'footer':
        if (ev.setup) await snapshot?.setupFooter(ev.sectionId);
        break;
      case 'postcopy-switch':
        this.switchedAt = Date.now();
        this.phase = 'postcopy';
        // Every precopy page is in place before any postcopy page: the prepare FLUSH synced the
        // channels; later multifd packets are refused.
        await this.receiver?.finish('the switch to postcopy');
        // Precopy's main-channel pages too: preempt pages are written directly.
        await snapshot?.store.flushPages();
        this.resolvePostcopyStarted();
        await snapshot?.deviceState([ev.devices], session.sectionId, session.switchoverStart);
        break;
      case 'device-state':
        await snapshot?.store.flushPages();
        if (!session.postcopy) {
          this.phase = 'device-state';
        } else if (snapshot) {
          // Pages the source wrote on the preempt channel before this EOF may still be on their way.
          await this.preemptSettled();
        }
        await snapshot?.deviceState(ev.data, session.sectionId, session.switchoverStart);
        break;
      default:
        break;
    }
    // Most events mean nothing more to the sink: no promise, no extra turn per page.
    const handled = this.sink.event(ev);
    if (handled) await handled;
  }

  // ---- the postcopy preempt channel ---------------------------------------------------------

  /**
   * The postcopy preempt channel has no magic: like QEMU, take the connection that comes after
   * the main channel and all multifd channels of a source that advised postcopy (§6.3).
   */
  private takePreempt(sock: Socket, source: AsyncIterable<Buffer>, byOrder: boolean): boolean {
    const possible = this.session.postcopyAdvised && !!this.main && !this.preemptChannel && !this.failure && !this.finished;
    if (!preemptExpected(possible, this.receiver?.connected ?? 0, this.o.channels, byOrder)) return false;
    this.preemptChannel = sock;
    // Its quiet window starts now: pages sent before EOF may not have been read yet.
    this.preemptAt = Date.now();
    sock.setNoDelay(true);
    sock.on('error', () => {});
    this.sink.connected('preempt', describePeer(sock));
    void this.runPreempt(source);
    return true;
  }

  private async runPreempt(source: AsyncIterable<Buffer>): Promise<void> {
    const parser = new PageRecordParser((name) => this.blocks.get(name)?.usedLength, this.names.preemptRecords);
    const store = this.sink.snapshot?.store;
    const forward = this.sink.preempt;
    try {
      for await (const chunk of source) {
        if (this.failure || this.finished) return;
        this.preemptBytes += chunk.length;
        this.preemptAt = Date.now();
        this.preemptBusy = true;
        // A page here answers a request made in postcopy: it must land after every precopy page
        // (and its block be known). Waiting before the next read also bounds what an early
        // sender can make us buffer: the socket is not read meanwhile.
        await this.postcopyStarted;
        parser.push(chunk);
        for (let ev = parser.next(); ev !== null; ev = parser.next()) {
          if (ev.type === 'eos') continue;
          this.preemptPages++;
          if (!store) continue;
          if (ev.type === 'page') await store.writePages(ev.block, [ev.offset], 1, ev.data);
          else await store.zeroPages(ev.block, [ev.offset], 0, 1);
        }
        await forward?.chunk(chunk);
        this.preemptBusy = !parser.atBoundary;
        this.preemptAt = Date.now();
      }
      if (!parser.atBoundary && !this.finished) throw new ProtocolError('TRUNCATED', 'closed inside a page record');
      await forward?.end();
    } catch (e) {
      if (this.finished || this.failure) return;
      const err = e as Error & { code?: string };
      if ((err.code === 'ECONNRESET' || err.code === 'EPIPE') && (forward?.resetIsEnd() ?? true)) return;
      this.sink.fail(new ChannelError(this.names.preempt, err));
    }
  }

  /**
   * Pages the source wrote on the preempt channel before its EOF on main may still be on their
   * way (another socket): go on once that channel is between records, written, and quiet.
   */
  private async preemptSettled(): Promise<void> {
    if (!this.preemptChannel) return;
    const quiet = this.o.completionQuietMs ?? 20;
    const limit = Date.now() + (this.o.channelTimeoutMs ?? 15000);
    while (!this.failure && (this.preemptBusy || Date.now() - this.preemptAt < quiet)) {
      if (Date.now() > limit) throw new ProtocolError('TRUNCATED', 'the postcopy preempt channel stopped inside a page record at the end of the migration');
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    if (this.failure) throw this.failure;
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
