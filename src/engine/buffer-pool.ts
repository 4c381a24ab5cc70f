// Fixed-size buffers taken and given back, at most `capacity` of them kept. A restore from S3 read
// ~400 fresh 8 MiB buffers per 3 GiB object: each one page-faulted in and zeroed by the kernel,
// freed only when the garbage collector got to it, and (above glibc's adaptive mmap threshold)
// left in malloc's heap afterwards, so RSS wandered 60-90 MiB above the live bytes
// (docs/performance.md). Reused buffers cost their memory once.

export interface BufferPoolStats {
  /** Buffers made (each `size` bytes). */
  allocated: number;
  /** take() answered from the free list. */
  reused: number;
  /** Given back while `capacity` were already free: left to the garbage collector. */
  dropped: number;
}

export class BufferPool {
  private readonly free: Buffer[] = [];
  readonly stats: BufferPoolStats = { allocated: 0, reused: 0, dropped: 0 };

  constructor(readonly size: number, readonly capacity: number) {
    if (!Number.isInteger(size) || size <= 0) throw new RangeError(`buffer size ${size} is not a positive integer`);
    if (!Number.isInteger(capacity) || capacity < 0) throw new RangeError(`pool capacity ${capacity} is not a non-negative integer`);
  }

  /** A buffer of `size` bytes, contents undefined. Never fails for want of free ones: a new one is made. */
  take(): Buffer {
    const b = this.free.pop();
    if (b) {
      this.stats.reused++;
      return b;
    }
    this.stats.allocated++;
    return Buffer.allocUnsafeSlow(this.size);
  }

  /**
   * Gives a buffer back; nothing may write to it or read it afterwards. A buffer not from this pool
   * (another size, or a view) is refused: a view given back would hand out memory still in use.
   */
  give(b: Buffer): void {
    if (b.length !== this.size || b.byteOffset !== 0 || b.buffer.byteLength !== this.size) throw new RangeError(`a buffer of ${b.length} bytes at offset ${b.byteOffset} does not belong to a pool of ${this.size}-byte buffers`);
    if (this.free.includes(b)) throw new Error('internal: a buffer given back to the pool twice');
    if (this.free.length >= this.capacity) {
      this.stats.dropped++;
      return;
    }
    this.free.push(b);
  }

  /** Free buffers held. */
  get idle(): number {
    return this.free.length;
  }

  /** Lets go of the free buffers. */
  clear(): void {
    this.free.length = 0;
  }
}
