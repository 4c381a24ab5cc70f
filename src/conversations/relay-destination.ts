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
import { MultifdSender } from '../engine/multifd-sender.js';
import { connectTo, gatherWrite } from '../transports/connect.js';
import type { TlsCreds } from '../transports/tls.js';
import { StallError } from './send.js';

export interface DestinationOptions {
  to: string;
  tls?: TlsCreds | undefined;
  channels: number;
  method: MultifdMethod;
  level?: number | undefined;
  connectTimeoutMs?: number | undefined;
  stallTimeoutMs?: number | undefined;
  /** A return-path message of B's, to go to A when A has a return path. */
  toSource(type: number, payload: Buffer): void;
  /** B closed its return path after its SHUT. */
  ended(): void;
  /** Whether A's whole stream went out (B closing its multifd channels is then B finishing). */
  streamComplete(): boolean;
  /** Whether the relay is already over (completed or failed). */
  over(): boolean;
  phase(): string;
  fail(e: Error): void;
}

export class RelayDestination {
  readonly sender: MultifdSender | undefined;
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

  constructor(private readonly o: DestinationOptions) {
    this.answered = new Promise((resolve) => { this.resolveAnswered = resolve; });
    if (o.channels > 0) {
      this.sender = new MultifdSender({
        channels: Array.from({ length: o.channels }, (_, i) => ({ write: (bufs: readonly Buffer[]) => this.writeChannel(i, bufs) })),
        method: o.method,
        ...(o.level !== undefined ? { level: o.level } : {}),
      });
      this.sender.on('error', (e: Error) => o.fail(e));
    }
    const stall = o.stallTimeoutMs ?? 60000;
    this.watchdog = setInterval(() => {
      if (this.pending > 0 && Date.now() - this.progressAt > stall) {
        o.fail(new StallError(`the destination accepted nothing for ${Math.round(stall / 1000)} s; does it expect ${o.channels} multifd channel(s) (multifd-channels), the same multifd-compression (${o.method.name}) and the same sync mode (multifd-flush-after-each-section)?`));
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
    this.main.catch((e: Error) => this.o.fail(e));
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
      this.sender.initChannel(i, false, uuid).catch((e: Error) => this.o.fail(e));
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

  private adopt(s: Socket, which: string): void {
    this.sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => {
      this.sockets.delete(s);
      if (s === this.mainSocket) this.resolveAnswered();
      // B gone before its verdict: A must not wait for a SHUT that never comes. Once the whole
      // stream went out, B closing its multifd channels is B finishing its load, not a failure.
      if (this.o.over() || this.shut !== undefined) return;
      const complete = this.o.streamComplete();
      if (s === this.mainSocket || !complete) {
        this.o.fail(new Error(`the destination closed ${which} ${complete ? 'without confirming the load' : `during ${this.o.phase()}`} (QEMU gone or failed? see its log)`));
      }
    });
    if (this.o.over()) s.destroy();
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
          this.o.toSource(m.type, m.payload);
          if (m.type === ReturnPathMessage.SHUT) {
            this.resolveAnswered();
            if (this.shut !== 0) this.o.fail(this.error(''));
          }
        }
      } catch (e) {
        this.o.fail(new ProtocolError('BAD_RECORD', `destination return path: ${(e as Error).message}`));
      }
    });
    s.on('end', () => {
      this.resolveAnswered();
      this.o.ended();
    });
  }
}
