// Relay's side towards B (its migrate-incoming address): B's main channel with the records A's
// stream session passed on, B's multifd channels fed by a MultifdSender, a preempt channel of
// our own, B's return path (its messages go back to A), and the stall watchdog. A SHUT(0) from B
// is what completes the relay; B going away or refusing fails it.

import type { Socket } from 'node:net';
import { Command, ReturnPathMessage } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { encodeMainEvent } from '../codec/main-event-encode.js';
import type { MainEvent } from '../codec/main-stream-parser.js';
import { ReturnPathParser } from '../codec/return-path.js';
import { encodeCommand } from '../codec/stream-encode.js';
import { publish } from '../engine/diagnostics.js';
import type { MultifdMethod } from '../engine/methods/method.js';
import { getMethod } from '../engine/methods/registry.js';
import { MultifdSender } from '../engine/multifd-sender.js';
import { connectTo, gatherWrite } from '../transports/connect.js';
import type { TlsCreds } from '../transports/tls.js';
import type { InboundSide } from './inbound-side.js';
import type { RelayOptions } from './relay-types.js';
import { StallError } from './send.js';

export type DestinationOptions = Pick<RelayOptions, 'to' | 'tlsOut' | 'compressionOut' | 'levelOut' | 'connectTimeoutMs' | 'stallTimeoutMs'>;

/** What the destination needs of the relay. */
export interface DestinationHost {
  /** A return-path message of B's, to go to A when A has a return path. */
  toSource(type: number, payload: Buffer): void;
  /** B closed its return path after its SHUT. */
  ended(): void;
  fail(e: Error): void;
}

export class RelayDestination {
  readonly sender: MultifdSender | undefined;
  readonly method: MultifdMethod;
  bytesOut = 0;
  pageRequests = 0;
  /** B's SHUT value, once it came. */
  shut: number | undefined;
  private main: Promise<Socket> | undefined;
  private mainSocket: Socket | undefined;
  private readonly channels: Promise<Socket>[] = [];
  private readonly sockets = new Set<Socket>();
  private out: Buffer[] = [];
  private returnPath = false;
  private readonly answered: Promise<void>;
  private resolveAnswered!: () => void;
  /** B writes in flight (or an awaited answer) and when B last made progress, for the stall watchdog. */
  private pending = 0;
  private progressAt = Date.now();
  private readonly watchdog: NodeJS.Timeout;

  private readonly o: DestinationOptions & { channels: number; tls: TlsCreds | undefined };

  constructor(opts: DestinationOptions, channels: number, private readonly host: DestinationHost, private readonly source: InboundSide) {
    this.o = { ...opts, channels, tls: opts.tlsOut };
    const method = this.method = getMethod(opts.compressionOut ?? 'none');
    if (opts.levelOut !== undefined) {
      const max = method.name === 'zlib' ? 9 : method.name === 'zstd' ? 20 : 0;
      if (method.name === 'none') throw new RangeError('a compression level needs a compression method (zlib or zstd)');
      if (!Number.isInteger(opts.levelOut) || opts.levelOut < 0 || opts.levelOut > max) throw new RangeError(`${method.name} level must be 0..${max} (got ${opts.levelOut})`);
    }
    if (method.name !== 'none' && channels === 0) throw new RangeError(`compression ${method.name} needs multifd channels towards the destination`);
    this.answered = new Promise((resolve) => { this.resolveAnswered = resolve; });
    if (channels > 0) {
      this.sender = new MultifdSender({
        channels: Array.from({ length: channels }, (_, i) => ({ write: (bufs: readonly Buffer[]) => this.writeChannel(i, bufs) })),
        method,
        ...(opts.levelOut !== undefined ? { level: opts.levelOut } : {}),
      });
      this.sender.on('error', (e: Error) => host.fail(e));
    }
    const stall = opts.stallTimeoutMs ?? 60000;
    this.watchdog = setInterval(() => {
      if (this.pending > 0 && Date.now() - this.progressAt > stall) {
        host.fail(new StallError(`the destination accepted nothing for ${Math.round(stall / 1000)} s; does it expect ${channels} multifd channel(s) (multifd-channels), the same multifd-compression (${method.name}) and the same sync mode (multifd-flush-after-each-section)?`));
      }
    }, Math.min(1000, stall));
    this.watchdog.unref();
  }

  /** Something is being written to B or awaited from it (A's silence is then no idleness). */
  get busy(): boolean {
    return this.pending > 0;
  }

  /** A record of A's main stream, to go to B with the next flush. */
  record(ev: MainEvent): void {
    this.out.push(...encodeMainEvent(ev));
  }

  /** A's return path is B's too; the first is opened once (QEMU only logs a second). False when it was open. */
  openReturnPath(): boolean {
    if (this.returnPath) return false;
    this.returnPath = true;
    return true;
  }

  /** Before A's RAM section: our own return path to B, when A has none; B's SHUT tells us whether it loaded. */
  ensureReturnPath(): void {
    if (this.openReturnPath()) this.out.push(encodeCommand(Command.OPEN_RETURN_PATH));
  }

  connectMain(): void {
    if (this.main) return;
    this.main = connectTo(this.o.to, this.o.connectTimeoutMs ?? 10000, this.o.tls).then((s) => {
      this.mainSocket = s;
      this.adopt(s, 'its main channel');
      this.listenReturnPath(s);
      publish('relay-destination', { to: this.o.to });
      return s;
    });
    this.main.catch((e: Error) => this.host.fail(e));
  }

  /**
   * B's multifd connections, once A's first init told the uuid: B identifies the first
   * connection as its main channel, so these connect after it, and each writes its init at once
   * (QEMU blocks reading it). No SYNC here: every B sync mirrors one of A's sync points.
   */
  openChannels(uuid: Buffer): void {
    if (this.channels.length > 0 || !this.sender) return;
    this.connectMain();
    const main = this.main!;
    for (let i = 0; i < this.o.channels; i++) {
      const s = main.then(() => connectTo(this.o.to, this.o.connectTimeoutMs ?? 10000, this.o.tls)).then((sock) => {
        this.adopt(sock, `its multifd channel ${i}`);
        return sock;
      });
      s.catch(() => {});
      this.channels.push(s);
    }
    // Queued before any packet can be: the sender writes each channel's buffers in order.
    for (let i = 0; i < this.o.channels; i++) {
      this.sender.initChannel(i, false, uuid).catch((e: Error) => this.host.fail(e));
    }
    publish('relay-channels', { channelsOut: this.o.channels });
  }

  /** A preempt channel of our own, opened after B's main and multifd channels so B takes it as preempt too. */
  openPreempt(): { chunk(c: Buffer): Promise<void>; end(): Promise<void>; resetIsEnd(): boolean } {
    const b = (async () => {
      await this.main;
      await Promise.all(this.channels);
      const s = await connectTo(this.o.to, this.o.connectTimeoutMs ?? 10000, this.o.tls);
      s.setNoDelay(true);
      this.adopt(s, 'its postcopy preempt channel');
      return s;
    })();
    b.catch(() => {});
    publish('relay-preempt', {});
    return {
      chunk: async (c) => this.track(gatherWrite(await b, [c]), 'its postcopy preempt channel'),
      end: async () => void (await b).end(),
      resetIsEnd: () => this.shut === 0,
    };
  }

  async flush(): Promise<void> {
    if (this.out.length === 0) return;
    const bufs = this.out;
    this.out = [];
    const s = await this.main!;
    await this.track(gatherWrite(s, bufs), 'its main channel');
    this.bytesOut += bufs.reduce((n, b) => n + b.length, 0);
  }

  /**
   * A's stream is all out: B's main channel stays open until B's SHUT arrived on the return path:
   * a destination may close its side when it sees our end, and its verdict would be lost.
   */
  async verdict(): Promise<void> {
    await this.flush();
    const main = await this.main!;
    this.pending++;
    await this.answered;
    this.pending--;
    main.end();
  }

  stats(): ReturnType<MultifdSender['stats']> {
    return this.sender?.stats() ?? [];
  }

  outBytes(): number {
    return this.bytesOut + this.stats().reduce((n, c) => n + c.bytes, 0);
  }

  failed(err: Error): void {
    this.sender?.fail(err);
    // B reads its main channel only once all its multifd channels connected: when A failed before
    // they were opened, B would wait in setup for ever. They connect and close at once, so B fails.
    if (this.main && this.channels.length === 0 && this.o.channels > 0) {
      for (let i = 0; i < this.o.channels; i++) {
        this.main.then(() => connectTo(this.o.to, 2000, this.o.tls)).then((s) => s.destroy(), () => {});
      }
    }
  }

  close(failing: boolean): void {
    clearInterval(this.watchdog);
    this.sender?.close();
    for (const s of this.sockets) {
      if (failing) s.destroy();
      else s.end(() => s.destroy());
    }
    if (!failing) setTimeout(() => { for (const s of this.sockets) s.destroy(); }, 2000).unref();
  }

  /** The relay completed or failed. */
  private over(): boolean {
    return this.source.finished || this.source.failure !== undefined;
  }

  private adopt(s: Socket, which: string): void {
    this.sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => {
      this.sockets.delete(s);
      if (s === this.mainSocket) this.resolveAnswered();
      // B gone before its verdict: A must not wait for a SHUT that never comes. Once the whole
      // stream went out, B closing its multifd channels is B finishing its load, not a failure.
      if (this.over() || this.shut !== undefined) return;
      // Once A's whole stream went out, B closing its multifd channels is B finishing.
      const complete = this.source.session.complete;
      if (s === this.mainSocket || !complete) {
        this.host.fail(new Error(`the destination closed ${which} ${complete ? 'without confirming the load' : `during ${this.source.phase}`} (QEMU gone or failed? see its log)`));
      }
    });
    if (this.over()) s.destroy();
  }

  private async writeChannel(i: number, bufs: readonly Buffer[]): Promise<void> {
    const s = await this.channels[i]!;
    await this.track(gatherWrite(s, bufs), `its multifd channel ${i}`);
  }

  private async track(write: Promise<void>, where: string): Promise<void> {
    this.pending++;
    try {
      await write;
      this.progressAt = Date.now();
    } catch (e) {
      // The destination's own verdict may still be in flight on the return path.
      await Promise.race([this.answered, new Promise((r) => setTimeout(r, 500).unref())]);
      throw this.error(`the destination closed ${where} (${(e as Error).message})`);
    } finally {
      this.pending--;
    }
  }

  error(what: string): Error {
    if (this.shut !== undefined && this.shut !== 0) return new Error(`the destination failed to load the migration (SHUT ${this.shut}); see its log`);
    return new Error(what);
  }

  private listenReturnPath(s: Socket): void {
    const rp = new ReturnPathParser();
    s.on('data', (chunk: Buffer) => {
      this.progressAt = Date.now();
      try {
        rp.push(chunk);
        for (let m = rp.next(); m !== null; m = rp.next()) {
          if (m.type === ReturnPathMessage.SHUT) this.shut = m.payload.readUInt32BE(0);
          if (m.type === ReturnPathMessage.REQ_PAGES || m.type === ReturnPathMessage.REQ_PAGES_ID) this.pageRequests++;
          publish('relay-return-path', { type: m.type });
          // Forwarded message by message: A may have opened its return path after ours.
          this.host.toSource(m.type, m.payload);
          if (m.type === ReturnPathMessage.SHUT) {
            this.resolveAnswered();
            if (this.shut !== 0) this.host.fail(this.error(''));
          }
        }
      } catch (e) {
        this.host.fail(new ProtocolError('BAD_RECORD', `destination return path: ${(e as Error).message}`));
      }
    });
    s.on('end', () => {
      this.resolveAnswered();
      this.host.ended();
    });
  }
}
