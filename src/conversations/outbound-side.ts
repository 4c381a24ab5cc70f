// The side of a conversation that migrates into a destination QEMU (send, and relay towards B):
// its connections (main, multifd channels, preempt), gather writes that notice the destination
// going away, the return path (PONG, SHUT, page requests; docs/protocol.md §6.1) and the stall
// watchdog. What a failure means (stage hints, postcopy loss) is the caller's policy, given as
// callbacks; this side only knows sockets and return-path messages.

import type { Socket } from 'node:net';
import { ReturnPathMessage } from '../codec/constants.js';
import { MultifdError, ProtocolError } from '../codec/errors.js';
import { decodePageRequest, type PageRequest } from '../codec/postcopy.js';
import { ReturnPathParser, type ReturnPathEvent } from '../codec/return-path.js';
import { connectTo, gatherWrite } from '../transports/connect.js';
import type { TlsCreds } from '../transports/tls.js';

export interface OutboundOptions {
  /** The destination: tcp:HOST:PORT or unix:PATH. */
  to: string;
  tls?: TlsCreds;
  /** Default 10 s. */
  connectTimeoutMs?: number;
  /** Default 60 s. */
  stallTimeoutMs?: number;
  /**
   * 'always': any stretch without a completed write or a return-path byte is a stall (send, which
   * always has something to write or an answer to wait for). 'while-busy': only while a write or
   * the wait for the verdict is under way (relay, which also waits on its source).
   */
  stallWhen?: 'always' | 'while-busy';
  stallError: (seconds: number) => Error;
  /**
   * The error for a write to `where` ("main channel", "multifd channel 1", "preempt channel") that
   * failed with `detail`. Asked only after the destination's verdict had its chance to arrive
   * (its PONGs and SHUT may still sit unread on main when a write fails), so `shut` is as good as
   * it gets.
   */
  closedError: (where: string, detail: string) => Error;
  /** A return-path page request (REQ_PAGES / REQ_PAGES_ID); throwing fails the conversation. */
  onPageRequest?: (req: PageRequest) => void;
  /** Every return-path message, after the side's own bookkeeping; throwing fails the conversation. */
  onMessage?: (m: ReturnPathEvent) => void;
  /** A connection closed (after the side's bookkeeping); `where` names it. */
  onClose?: (where: string, isMain: boolean) => void;
  /** The destination ended its side of main (it does after its SHUT). */
  onMainEnd?: () => void;
  /** Fails the conversation (the side calls it once per problem; the first one wins there). */
  fail: (e: Error) => void;
  /** The conversation's failure, if any: a write failing after it rethrows it. */
  failure: () => Error | undefined;
}

export class OutboundSide {
  readonly sockets = new Set<Socket>();
  main: Socket | undefined;
  /** The destination's SHUT value, once it came: 0 = loaded. */
  shut: number | undefined;
  /** PONG values answered, with when they came (ms since the side was made). */
  readonly pongs = new Map<number, number>();
  /** Resolves once the destination gave its verdict (SHUT) or closed main. */
  readonly answered: Promise<void>;
  private resolveAnswered!: () => void;
  private readonly stopped: Promise<never>;
  private rejectStopped!: (e: Error) => void;
  private readonly pongWaiters = new Map<number, (() => void)[]>();
  private readonly channels: Promise<Socket>[] = [];
  private readonly names = new Map<Socket, string>();
  private readonly startedAt = Date.now();
  private lastActivity = Date.now();
  private pending = 0;
  private watchdog: NodeJS.Timeout | undefined;

  constructor(private readonly opts: OutboundOptions) {
    this.answered = new Promise((resolve) => { this.resolveAnswered = resolve; });
    this.stopped = new Promise<never>((_, reject) => { this.rejectStopped = reject; });
    this.stopped.catch(() => {});
  }

  /** Starts the stall watchdog. */
  watch(): void {
    const stall = this.opts.stallTimeoutMs ?? 60000;
    const always = (this.opts.stallWhen ?? 'always') === 'always';
    this.watchdog = setInterval(() => {
      if ((always || this.pending > 0) && Date.now() - this.lastActivity > stall) this.opts.fail(this.opts.stallError(Math.round(stall / 1000)));
    }, Math.min(1000, stall));
    this.watchdog.unref();
  }

  /** Connects main; with `returnPath`, what the destination says on it is followed. */
  async connectMain(returnPath: boolean): Promise<Socket> {
    const s = await this.connect('main channel');
    this.main = s;
    if (returnPath) this.followReturnPath(s);
    return s;
  }

  /** A further connection (preempt), adopted like the others. */
  async connect(where: string): Promise<Socket> {
    const s = await connectTo(this.opts.to, this.opts.connectTimeoutMs ?? 10000, this.opts.tls);
    this.adopt(s, where);
    return s;
  }

  /**
   * Connects `count` multifd channels once main is connected (the destination takes the first
   * connection as main), all at once; `channel(i)` waits for one.
   */
  openChannels(count: number, main: Promise<unknown>): void {
    for (let i = 0; i < count; i++) {
      const s = main.then(() => this.connect(`multifd channel ${i}`));
      s.catch(() => {});
      this.channels.push(s);
    }
  }

  /** A write or the wait for the verdict is under way. */
  get busy(): boolean {
    return this.pending > 0;
  }

  get channelsOpened(): number {
    return this.channels.length;
  }

  channel(i: number): Promise<Socket> {
    return this.channels[i]!;
  }

  /** A gather write to multifd channel `i` (waits for its connection). */
  async writeChannel(i: number, bufs: readonly Buffer[]): Promise<void> {
    await this.write(await this.channels[i]!, bufs);
  }

  /**
   * A gather write; a failure becomes the conversation's failure or the caller's closedError,
   * judged once the destination's verdict arrived or 500 ms passed.
   */
  async write(sock: Socket, bufs: readonly Buffer[]): Promise<void> {
    const known = this.opts.failure();
    if (known) throw known;
    this.pending++;
    try {
      await gatherWrite(sock, bufs);
      this.lastActivity = Date.now();
    } catch (e) {
      const first = this.opts.failure();
      if (first) throw first;
      await Promise.race([this.answered, new Promise((r) => setTimeout(r, 500).unref())]);
      throw this.opts.failure() ?? this.opts.closedError(this.names.get(sock) ?? 'connection', (e as Error).message);
    } finally {
      this.pending--;
    }
  }

  /** Waits for the verdict (SHUT or main closed); the wait counts as busy for the watchdog. */
  async verdict(): Promise<void> {
    this.pending++;
    try {
      await this.answered;
    } finally {
      this.pending--;
    }
  }

  /** Resolves when PONG(value) arrived; stop() ends the wait with its error. */
  pongArrived(value: number): Promise<void> {
    if (this.pongs.has(value)) return Promise.resolve();
    return Promise.race([
      new Promise<void>((resolve) => {
        const list = this.pongWaiters.get(value) ?? [];
        list.push(resolve);
        this.pongWaiters.set(value, list);
      }),
      this.stopped,
    ]);
  }

  /** The conversation failed: waits end with `err`, every connection is cut, the watchdog stops. */
  stop(err: Error): void {
    this.rejectStopped(err);
    this.halt();
    for (const s of this.sockets) s.destroy();
  }

  /** Ends every connection gracefully (each is destroyed after `graceMs` at the latest), stops the watchdog. */
  end(graceMs?: number): void {
    this.halt();
    for (const s of this.sockets) {
      if (graceMs === undefined) s.end();
      else s.end(() => s.destroy());
    }
    if (graceMs !== undefined) setTimeout(() => { for (const s of this.sockets) s.destroy(); }, graceMs).unref();
  }

  /** Destroys every connection, stops the watchdog. */
  destroy(): void {
    this.halt();
    for (const s of this.sockets) s.destroy();
  }

  private halt(): void {
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = undefined;
  }

  private adopt(s: Socket, where: string): void {
    this.sockets.add(s);
    this.names.set(s, where);
    // Write errors surface through write(); this keeps an EPIPE from crashing the process.
    s.on('error', () => {});
    s.on('close', () => {
      this.sockets.delete(s);
      if (s === this.main) this.resolveAnswered();
      this.opts.onClose?.(where, s === this.main);
    });
    if (this.opts.failure()) s.destroy();
  }

  private followReturnPath(s: Socket): void {
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
          } else if (m.type === ReturnPathMessage.SHUT) {
            this.shut = m.payload.readUInt32BE(0);
          } else if (m.type === ReturnPathMessage.REQ_PAGES || m.type === ReturnPathMessage.REQ_PAGES_ID) {
            this.opts.onPageRequest?.(decodePageRequest(m.type, m.payload));
          }
          // SWITCHOVER_ACK and the others need no answer from a sender that never waits on them.
          this.opts.onMessage?.(m);
          if (m.type === ReturnPathMessage.SHUT) this.resolveAnswered();
        }
      } catch (e) {
        this.opts.fail(e instanceof MultifdError ? e : new ProtocolError('BAD_RECORD', `return path: ${(e as Error).message}`));
      }
    });
    s.on('end', () => {
      this.resolveAnswered();
      this.opts.onMainEnd?.();
    });
  }
}
