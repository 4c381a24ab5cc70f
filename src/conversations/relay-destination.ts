// Relay's side towards B (its migrate-incoming address): B's main channel with the records A's
// stream session passed on, B's multifd channels fed by a MultifdSender, a preempt channel of
// our own, and B's return path (its messages go back to A). The connections, the return path and
// the stall watchdog are the shared outbound side's, as for send. A SHUT(0) from B is what
// completes the relay; B going away or refusing fails it.

import type { Socket } from 'node:net';
import { Command, ReturnPathMessage } from '../codec/constants.js';
import { DestinationClosedError, DestinationRefusedError, InvalidOptionError, StallError } from '../codec/errors.js';
import { encodeMainEvent } from '../codec/main-event-encode.js';
import type { MainEvent } from '../codec/main-stream-parser.js';
import { encodeCommand } from '../codec/stream-encode.js';
import { publish } from '../engine/diagnostics.js';
import type { MultifdMethod } from '../engine/methods/method.js';
import { checkLevel, getMethod } from '../engine/methods/registry.js';
import { MultifdSender } from '../engine/multifd-sender.js';
import { connectTo } from '../transports/connect.js';
import type { InboundSide } from './inbound-side.js';
import { OutboundSide } from './outbound-side.js';
import type { RelayOptions } from './relay-types.js';

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
  private readonly side: OutboundSide;
  private main: Promise<Socket> | undefined;
  private out: Buffer[] = [];
  private returnPath = false;

  constructor(private readonly o: DestinationOptions, private readonly channels: number, private readonly host: DestinationHost, source: InboundSide) {
    const method = this.method = getMethod(o.compressionOut ?? 'none');
    checkLevel(method, o.levelOut);
    if (method.name !== 'none' && channels === 0) throw new InvalidOptionError(`compression ${method.name} needs multifd channels towards the destination`);
    this.side = new OutboundSide({
      to: o.to,
      ...(o.tlsOut ? { tls: o.tlsOut } : {}),
      ...(o.connectTimeoutMs !== undefined ? { connectTimeoutMs: o.connectTimeoutMs } : {}),
      ...(o.stallTimeoutMs !== undefined ? { stallTimeoutMs: o.stallTimeoutMs } : {}),
      // Silence from B while nothing is owed to it is A's business (the idle watch).
      stallWhen: 'while-busy',
      stallError: (s) => new StallError(`the destination accepted nothing for ${s} s; does it expect ${channels} multifd channel(s) (multifd-channels), the same multifd-compression (${method.name}) and the same sync mode (multifd-flush-after-each-section)?`),
      closedError: (where, detail) => this.error(where, detail, `the destination closed its ${where} (${detail})`),
      onMessage: (m) => {
        if (m.type === ReturnPathMessage.REQ_PAGES || m.type === ReturnPathMessage.REQ_PAGES_ID) this.pageRequests++;
        publish('relay', 'destination-return-path', { type: m.type });
        // Forwarded message by message: A may have opened its return path after ours.
        host.toSource(m.type, m.payload);
        if (m.type === ReturnPathMessage.SHUT && this.shut !== 0) host.fail(this.error('main channel', `SHUT ${this.shut}`, ''));
      },
      onMainEnd: () => host.ended(),
      onClose: (where, isMain) => {
        // B gone before its verdict: A must not wait for a SHUT that never comes. Once A's whole
        // stream went out, B closing its multifd channels is B finishing its load, not a failure.
        if (source.finished || source.failure !== undefined || this.shut !== undefined) return;
        const complete = source.session.complete;
        if (isMain || !complete) {
          host.fail(new DestinationClosedError(where, 'closed', `the destination closed its ${where} ${complete ? 'without confirming the load' : `during ${source.phase}`} (QEMU gone or failed? see its log)`));
        }
      },
      fail: (e) => host.fail(e),
      failure: () => source.failure,
    });
    if (channels > 0) {
      this.sender = new MultifdSender({
        channels: Array.from({ length: channels }, (_, i) => ({ write: (bufs: readonly Buffer[]) => this.side.writeChannel(i, bufs) })),
        method,
        ...(o.levelOut !== undefined ? { level: o.levelOut } : {}),
      });
      this.sender.on('error', (e: Error) => host.fail(e));
    }
    this.side.watch();
  }

  /** B's SHUT value, once it came. */
  get shut(): number | undefined {
    return this.side.shut;
  }

  /** Something is being written to B or awaited from it (A's silence is then no idleness). */
  get busy(): boolean {
    return this.side.busy;
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
    // B's return path is always followed: it is either A's or our own.
    this.main = this.side.connectMain(true).then((s) => {
      publish('relay', 'destination', { to: this.o.to });
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
    if (this.side.channelsOpened > 0 || !this.sender) return;
    this.connectMain();
    this.side.openChannels(this.channels, this.main!);
    // Queued before any packet can be: the sender writes each channel's buffers in order.
    for (let i = 0; i < this.channels; i++) {
      this.sender.initChannel(i, false, uuid).catch((e: Error) => this.host.fail(e));
    }
    publish('relay', 'destination-channels', { channelsOut: this.channels });
  }

  /** A preempt channel of our own, opened after B's main and multifd channels so B takes it as preempt too. */
  openPreempt(): { chunk(c: Buffer): Promise<void>; end(): Promise<void>; resetIsEnd(): boolean } {
    const b = (async () => {
      await this.main;
      for (let i = 0; i < this.side.channelsOpened; i++) await this.side.channel(i);
      return this.side.connect('postcopy preempt channel');
    })();
    b.catch(() => {});
    publish('relay', 'preempt-channel', {});
    return {
      chunk: async (c) => this.side.write(await b, [c]),
      end: async () => void (await b).end(),
      resetIsEnd: () => this.shut === 0,
    };
  }

  async flush(): Promise<void> {
    if (this.out.length === 0) return;
    const bufs = this.out;
    this.out = [];
    await this.side.write(await this.main!, bufs);
    this.bytesOut += bufs.reduce((n, b) => n + b.length, 0);
  }

  /**
   * A's stream is all out: B's main channel stays open until B's SHUT arrived on the return path:
   * a destination may close its side when it sees our end, and its verdict would be lost.
   */
  async verdict(): Promise<void> {
    await this.flush();
    const main = await this.main!;
    await this.side.verdict();
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
    if (this.main && this.side.channelsOpened === 0 && this.channels > 0) {
      for (let i = 0; i < this.channels; i++) {
        this.main.then(() => connectTo(this.o.to, 2000, this.o.tlsOut)).then((s) => s.destroy(), () => {});
      }
    }
  }

  close(failing: boolean): void {
    this.sender?.close();
    if (failing) this.side.destroy();
    else this.side.end(2000);
  }

  /** B's SHUT(n ≠ 0) says more than a closed connection: it failed to load. */
  error(where: string, detail: string, what: string): Error {
    const shut = this.shut;
    if (shut !== undefined && shut !== 0) return new DestinationRefusedError(shut, `the destination failed to load the migration (SHUT ${shut}); see its log`);
    return new DestinationClosedError(where, detail, what);
  }
}
