// A queue of received chunks that parsers read through a Cursor without copying. Parsers try to
// decode a whole structure; if the bytes end early the Cursor throws NeedMoreData, nothing is
// consumed, and the parser retries when more bytes arrive (the pg-protocol approach).

import { NeedMoreData, ProtocolError } from './errors.js';

export class ByteQueue {
  private chunks: Buffer[] = [];
  private headOffset = 0;
  private size = 0;
  /** Bytes consumed since the queue was created: the stream offset of the queue's first byte. */
  private consumedTotal = 0;

  get length(): number {
    return this.size;
  }

  get streamOffset(): number {
    return this.consumedTotal;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
  }

  /** Drops n bytes from the front. */
  consume(n: number): void {
    if (n > this.size) throw new RangeError(`consume ${n} > ${this.size}`);
    this.size -= n;
    this.consumedTotal += n;
    // Dropped chunks are removed with one splice: shift() per chunk is quadratic when a payload
    // arrived in many small chunks (a peer sending tiny segments).
    let drop = 0;
    while (n > 0) {
      const first = this.chunks[drop]!;
      const avail = first.length - this.headOffset;
      if (n < avail) {
        this.headOffset += n;
        break;
      }
      n -= avail;
      drop++;
      this.headOffset = 0;
    }
    if (drop > 0) this.chunks.splice(0, drop);
  }

  /** Removes and returns everything buffered, as views. */
  drain(): Buffer[] {
    const out = this.slices(0, this.size);
    this.consume(this.size);
    return out;
  }

  /** Views covering [start, start+n) relative to the queue head; no copy. */
  slices(start: number, n: number): Buffer[] {
    if (start + n > this.size) throw new NeedMoreData(start + n);
    const out: Buffer[] = [];
    let skip = start + this.headOffset;
    for (const c of this.chunks) {
      if (n === 0) break;
      if (skip >= c.length) {
        skip -= c.length;
        continue;
      }
      const take = Math.min(n, c.length - skip);
      out.push(c.subarray(skip, skip + take));
      n -= take;
      skip = 0;
    }
    return out;
  }

  /** [start, start+n) as one Buffer: a view when it lies in one chunk, else a copy. */
  contiguous(start: number, n: number): Buffer {
    const parts = this.slices(start, n);
    if (parts.length === 1) return parts[0]!;
    return Buffer.concat(parts, n);
  }

  byteAt(i: number): number {
    if (i >= this.size) throw new NeedMoreData(i + 1);
    let idx = i + this.headOffset;
    for (const c of this.chunks) {
      if (idx < c.length) return c[idx]!;
      idx -= c.length;
    }
    throw new NeedMoreData(i + 1);
  }

  cursor(): Cursor {
    return new Cursor(this);
  }
}

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

/** Reads forward from the head of a ByteQueue; `pos` is relative to the head. */
export class Cursor {
  pos = 0;
  constructor(private readonly q: ByteQueue) {}

  get available(): number {
    return this.q.length - this.pos;
  }

  /** Stream offset of the cursor position, for error messages. */
  get streamOffset(): number {
    return this.q.streamOffset + this.pos;
  }

  need(n: number): void {
    if (this.pos + n > this.q.length) throw new NeedMoreData(this.pos + n);
  }

  peekU8(ahead = 0): number {
    return this.q.byteAt(this.pos + ahead);
  }

  u8(): number {
    const v = this.q.byteAt(this.pos);
    this.pos += 1;
    return v;
  }

  u16(): number {
    const b = this.take(2);
    return b.readUInt16BE(0);
  }

  u32(): number {
    const b = this.take(4);
    return b.readUInt32BE(0);
  }

  u64(): bigint {
    const b = this.take(8);
    return b.readBigUInt64BE(0);
  }

  /** A be64 that must fit a JS number (sizes and offsets); larger values are a protocol error. */
  u64n(what: string): number {
    const v = this.u64();
    if (v > MAX_SAFE) {
      throw new ProtocolError('LIMIT_EXCEEDED', `${what} 0x${v.toString(16)} is too large`, {
        offset: this.streamOffset - 8,
      });
    }
    return Number(v);
  }

  /** n bytes as one Buffer (a view when possible). */
  take(n: number): Buffer {
    const b = this.q.contiguous(this.pos, n);
    this.pos += n;
    return b;
  }

  /** n bytes as views, never copied. */
  takeSlices(n: number): Buffer[] {
    const s = this.q.slices(this.pos, n);
    this.pos += n;
    return s;
  }

  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }

  /** u8 length + bytes, decoded as latin1 (QEMU ids are ASCII; latin1 round-trips any byte). */
  countedString(): string {
    const len = this.u8();
    return this.take(len).toString('latin1');
  }
}
