// Socket reads into one reused ring of memory per connection. Node otherwise allocates a fresh
// 64 KiB buffer for every read; with the zeroing and page faults that go with it, that cost ~0.1
// CPU-s per GiB received on the bench machine (a multifd channel carries GiBs). The consumer
// says which stream bytes it no longer references (release); their ring space is not reused
// before that, and the socket stops reading while the ring has no room.
//
// Node has the mechanism as public API — net.Socket's `onread` option (`new net.Socket({ fd,
// onread })`, and connect()) reads into a buffer the caller provides — but only for sockets it
// creates; a listening side gets its sockets from the server, already reading, and Node offers
// no public way to their fd. Those are switched over here through the same per-socket state that
// `onread` sets up (lib/net.js: the kBuffer, kBufferCb, kBufferGen symbols and the handle's
// useUserBuffer; the same in Node 20, 22 and 24), found by the symbols' names. Where that is not
// possible (TLS, a Node without them, a socket already at its end) ringSource returns undefined
// and the caller reads the socket as a stream: slower, never wrong. test/unit/ring-reader.test.ts
// fails loudly on a Node where the internals are gone, so the lost gain does not go unnoticed.
// Whether to try at all is the caller's option (receive's and relay's `readRing`).

import type { Socket } from 'node:net';
import { Socket as NetSocket } from 'node:net';

/**
 * Chunks of one connection, with a way to give their bytes back (the engine's ReleasingSource,
 * by shape: the layers do not import each other).
 */
export interface RingSource extends AsyncIterable<Buffer> {
  /**
   * Stream bytes before `offset` (counted from the connection's first byte, the prefix included)
   * are no longer referenced by the consumer: their memory may be read into again.
   */
  release(offset: number): void;
}

export interface RingOptions {
  /** Ring size; must hold the largest structure the consumer waits for whole, plus a read. */
  capacity: number;
  /** Most bytes one read may take (default 256 KiB). */
  readBytes?: number;
}

interface OnreadSymbols { buffer: symbol; callback: symbol; generator: symbol }
let symbols: OnreadSymbols | null | undefined;

/** The symbols under which net.Socket keeps its `onread` state (null: this Node has none). */
function onreadSymbols(): OnreadSymbols | null {
  if (symbols !== undefined) return symbols;
  symbols = null;
  try {
    // `onread` is a constructor option at run time (lib/net.js), typed only for connect().
    const probe = new NetSocket({ onread: { buffer: () => Buffer.alloc(1), callback: () => true } } as ConstructorParameters<typeof NetSocket>[0]);
    const byName = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
    const buffer = byName.get('kBuffer');
    const callback = byName.get('kBufferCb');
    const generator = byName.get('kBufferGen');
    if (buffer && callback && generator) symbols = { buffer, callback, generator };
    probe.destroy();
  } catch {
    // symbols stays null: streams then.
  }
  return symbols;
}

/** Whether this Node keeps net.Socket's `onread` state where ringSource looks for it. */
export function ringAvailable(): boolean {
  return onreadSymbols() !== null;
}

/**
 * Reads `sock` (whose first bytes, `prefix`, were already read) into a ring from now on. Returns
 * undefined where the socket cannot be switched; read it as a stream then.
 */
export function ringSource(sock: Socket, prefix: Buffer, opts: RingOptions): RingSource | undefined {
  const sym = onreadSymbols();
  const s = sock as Socket & Record<symbol, unknown> & { _handle?: { useUserBuffer?: (b: Uint8Array) => void }; encrypted?: boolean; _readableState?: { ended?: boolean } };
  const handle = s._handle;
  if (!sym || !handle || typeof handle.useUserBuffer !== 'function' || s.encrypted || sock.destroyed || s._readableState?.ended !== false) return undefined;
  // Bytes Node read past the prefix before this point wait in the stream's buffer.
  const head: Buffer[] = prefix.length > 0 ? [prefix] : [];
  for (let c = sock.read() as Buffer | null; c !== null; c = sock.read() as Buffer | null) head.push(c);
  const reader = new RingReader(sock, head, opts);
  s[sym.generator] = () => reader.nextBuffer();
  s[sym.callback] = (n: number, buf: Buffer) => reader.onRead(n, buf);
  const first = reader.nextBuffer();
  s[sym.buffer] = first;
  handle.useUserBuffer(first);
  sock.resume();
  return reader;
}

/** Ring bytes of one read: where they sit, and the stream offset just past them. */
interface Segment { end: number; pos: number }

const MIN_READ = 64 * 1024;

class RingReader implements RingSource {
  private ring: Buffer | undefined;
  private readonly capacity: number;
  private readonly readBytes: number;
  /** Where libuv reads first, and while the ring is full (the socket is paused then; one read may land). */
  private spare: Buffer | undefined;
  /** Ring bytes the consumer may still reference, in stream order. */
  private readonly segs: Segment[] = [];
  private segHead = 0;
  /** Ring position of the next read. */
  private headPos = 0;
  /** Where the buffer handed to libuv for the next read starts. */
  private current = -1;
  /** Stream offset of the next byte read. */
  private offset: number;
  private released = 0;
  private paused = false;
  /** Times reading stopped because the ring was full (tests, diagnostics). */
  pauses = 0;
  private reads = 0;
  private readonly queue: Buffer[];
  private qHead = 0;
  private waiter: { resolve: (r: IteratorResult<Buffer>) => void; reject: (e: Error) => void } | undefined;
  private ended = false;
  private failure: Error | undefined;

  constructor(private readonly sock: Socket, head: Buffer[], opts: RingOptions) {
    this.readBytes = Math.max(MIN_READ, opts.readBytes ?? 256 * 1024);
    this.capacity = Math.max(opts.capacity, 2 * this.readBytes);
    this.queue = head;
    this.offset = head.reduce((n, b) => n + b.length, 0);
    sock.on('end', () => this.finish());
    sock.on('error', (e: Error) => this.finish(e));
    sock.on('close', () => {
      if (!this.ended) {
        const e = new Error('the connection closed before its end') as NodeJS.ErrnoException;
        e.code = 'ERR_STREAM_PREMATURE_CLOSE';
        this.finish(e);
      }
    });
  }

  /** Called by Node for the buffer of the next read (after every read, and once at the start). */
  nextBuffer(): Buffer {
    // The ring comes with the first read: a connection closed before it sends anything more (a
    // channel beyond the count) never costs one.
    if (!this.ring && this.reads > 0) this.ring = Buffer.allocUnsafeSlow(this.capacity);
    const pos = this.ring ? this.room() : -1;
    if (pos < 0) {
      if (!this.paused && this.ring) {
        this.paused = true;
        this.pauses++;
        this.sock.pause();
      }
      this.current = -1;
      this.spare ??= Buffer.allocUnsafeSlow(MIN_READ);
      return this.spare;
    }
    this.headPos = pos;
    this.current = pos;
    return this.ring!.subarray(pos, pos + Math.min(this.readBytes, this.contiguousAt(pos)));
  }

  /** Called by Node after a read of `n` bytes into `buf` (the last nextBuffer()). */
  onRead(n: number, buf: Buffer): boolean {
    this.reads++;
    let chunk: Buffer;
    if (buf === this.spare || this.current < 0) {
      // A read that landed in the spare (the first one, or one while paused): copied out.
      chunk = Buffer.from(buf.subarray(0, n));
    } else {
      const pos = this.current;
      this.segs.push({ end: this.offset + n, pos });
      this.headPos = pos + n;
      chunk = this.ring!.subarray(pos, pos + n);
    }
    this.offset += n;
    this.deliver(chunk);
    return true;
  }

  release(offset: number): void {
    if (offset <= this.released) return;
    this.released = offset;
    const segs = this.segs;
    while (this.segHead < segs.length && segs[this.segHead]!.end <= offset) this.segHead++;
    if (this.segHead > 256 && this.segHead * 2 > segs.length) {
      segs.splice(0, this.segHead);
      this.segHead = 0;
    }
    if (this.paused && this.room() >= 0 && !this.sock.destroyed) {
      this.paused = false;
      this.sock.resume();
    }
  }

  /**
   * Ring position where a read of at least MIN_READ bytes fits, or -1. Live bytes run from the
   * oldest segment's position to headPos, wrapping at the end of the ring.
   */
  private room(): number {
    if (this.segHead === this.segs.length) {
      // Nothing referenced; the buffer libuv holds (if any) is the only thing in use.
      return this.current >= 0 ? this.current : 0;
    }
    const tail = this.segs[this.segHead]!.pos;
    if (this.headPos > tail) {
      if (this.capacity - this.headPos >= MIN_READ) return this.headPos;
      return tail >= MIN_READ ? 0 : -1;
    }
    return tail - this.headPos >= MIN_READ ? this.headPos : -1;
  }

  /** Free bytes from `pos` up to the next live byte or the ring's end. */
  private contiguousAt(pos: number): number {
    if (this.segHead === this.segs.length) return this.capacity - pos;
    const tail = this.segs[this.segHead]!.pos;
    return tail > pos ? tail - pos : this.capacity - pos;
  }

  private deliver(chunk: Buffer): void {
    const w = this.waiter;
    if (w && this.qHead === this.queue.length) {
      this.waiter = undefined;
      w.resolve({ value: chunk, done: false });
      return;
    }
    this.queue.push(chunk);
  }

  private finish(err?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.failure = err;
    const w = this.waiter;
    if (w && this.qHead === this.queue.length) {
      this.waiter = undefined;
      if (err) w.reject(err);
      else w.resolve({ value: undefined, done: true });
    }
  }

  [Symbol.asyncIterator](): AsyncIterator<Buffer> {
    return {
      next: (): Promise<IteratorResult<Buffer>> => {
        if (this.qHead < this.queue.length) {
          const value = this.queue[this.qHead]!;
          this.queue[this.qHead++] = undefined as unknown as Buffer;
          if (this.qHead > 1024 && this.qHead * 2 > this.queue.length) {
            this.queue.splice(0, this.qHead);
            this.qHead = 0;
          }
          return Promise.resolve({ value, done: false });
        }
        if (this.ended) return this.failure ? Promise.reject(this.failure) : Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => { this.waiter = { resolve, reject }; });
      },
      return: (): Promise<IteratorResult<Buffer>> => {
        // As a stream's iterator does: a consumer that stops early closes the connection.
        this.sock.destroy();
        return Promise.resolve({ value: undefined, done: true });
      },
    };
  }
}
