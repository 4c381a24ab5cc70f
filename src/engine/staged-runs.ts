// Pages that arrive one record at a time (the main channel: a background snapshot sends every page
// there, QEMU refusing multifd with it) written as runs. Awaiting one positioned write per page
// made a 128 MiB background save take 6-27 s on a loaded 2-core VM; here each page is copied into
// one of a few fixed staging buffers, pages at consecutive file positions become one run, and a
// run goes out as one positioned write while the stream is parsed on. Memory is the buffers, and
// nothing is allocated per page.
//
// Order is the order pages were added: a buffer's runs are written in order, and a buffer whose
// file range meets that of a buffer handed over earlier is written only after it (all buffers one
// after another when `serial`), so a page added twice ends with its later bytes (write after
// write); a page still held here (staged or being written) is read from here (read after write:
// an XBZRLE delta applies onto the page as last received, docs/protocol.md §4).

export type RunWrite = (bytes: Buffer, position: number) => Promise<void>;

interface StagingBuffer {
  mem: Buffer;
  /** Bytes of mem holding pages. */
  used: number;
  runs: number;
  /** Run i: its file position and where its bytes start in mem (they end where run i+1 starts, or at used). */
  runPos: Float64Array;
  runStart: Float64Array;
  /** The file range its runs cover, [lo, hi). */
  lo: number;
  hi: number;
  /** Settles once its writes are done (never rejects). */
  done: Promise<void>;
}

export class StagedRuns {
  private readonly free: StagingBuffer[] = [];
  /** The buffer being filled. */
  private current: StagingBuffer | undefined;
  /** Buffers handed to the writer, oldest first, until their writes are done. */
  private readonly pending: StagingBuffer[] = [];
  /** The first write error: later adds throw it, flush rejects with it. */
  private error: Error | undefined;
  /** Set while an add waits for a buffer: later adds queue behind it, keeping their order. */
  private waiting: Promise<void> | undefined;
  private wake: (() => void) | undefined;

  /**
   * `memory`: count × bufferBytes bytes, split into the staging buffers (page-aligned memory for
   * O_DIRECT). `write` stores one run; `written` is told the bytes of each buffer once written.
   * `serial`: one write at a time (buffered writes to one file only contend for its inode lock);
   * otherwise buffers of disjoint file ranges are written at once (O_DIRECT waits for the device).
   */
  constructor(
    private readonly pageSize: number,
    memory: Buffer,
    count: number,
    private readonly write: RunWrite,
    private readonly written: (bytes: number) => void = () => {},
    private readonly serial = true,
  ) {
    const bufferBytes = Math.floor(memory.length / count);
    if (count < 1 || bufferBytes < pageSize || bufferBytes % pageSize !== 0) {
      throw new RangeError(`staging memory of ${memory.length} bytes cannot hold ${count} buffers of whole ${pageSize}-byte pages`);
    }
    const pages = bufferBytes / pageSize;
    for (let i = 0; i < count; i++) {
      this.free.push({ mem: memory.subarray(i * bufferBytes, (i + 1) * bufferBytes), used: 0, runs: 0, runPos: new Float64Array(pages), runStart: new Float64Array(pages), lo: 0, hi: 0, done: Promise.resolve() });
    }
  }

  /**
   * Stages one page (views that may split anywhere, pageSize bytes in all) for file position
   * `position`. Returns a promise only when every buffer is being written: await it before the
   * next add (adds made meanwhile still keep their order).
   */
  add(position: number, data: readonly Buffer[]): void | Promise<void> {
    if (this.error) throw this.error;
    if (this.waiting) return this.waiting.then(() => this.add(position, data));
    const cur = this.current ?? this.free.pop();
    if (!cur) {
      this.waiting = new Promise<void>((resolve) => { this.wake = resolve; });
      return this.add(position, data);
    }
    this.current = cur;
    let bytes = 0;
    for (const v of data) bytes += v.length;
    if (bytes !== this.pageSize) throw new RangeError(`a page of ${bytes} bytes (pages are ${this.pageSize})`);
    let at = cur.used;
    for (const v of data) at += v.copy(cur.mem, at);
    const n = cur.runs;
    if (n === 0 || cur.runPos[n - 1]! + (cur.used - cur.runStart[n - 1]!) !== position) {
      cur.runPos[n] = position;
      cur.runStart[n] = cur.used;
      cur.runs = n + 1;
    }
    cur.used = at;
    if (n === 0 || position < cur.lo) cur.lo = position;
    if (n === 0 || position + this.pageSize > cur.hi) cur.hi = position + this.pageSize;
    if (cur.used + this.pageSize > cur.mem.length) this.submit();
  }

  /**
   * The bytes of the page at `position` as last added, if they are still held here (a view,
   * valid until the next add); undefined when every write of it is done (the file has it).
   */
  find(position: number): Buffer | undefined {
    const now = this.current ? this.findIn(this.current, position) : undefined;
    if (now) return now;
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const h = this.findIn(this.pending[i]!, position);
      if (h) return h;
    }
    return undefined;
  }

  /** The page's newest copy in `b` (later runs first). */
  private findIn(b: StagingBuffer, position: number): Buffer | undefined {
    for (let i = b.runs - 1; i >= 0; i--) {
      const pos = b.runPos[i]!;
      const end = i + 1 < b.runs ? b.runStart[i + 1]! : b.used;
      if (position >= pos && position < pos + (end - b.runStart[i]!)) {
        const at = b.runStart[i]! + (position - pos);
        return b.mem.subarray(at, at + this.pageSize);
      }
    }
    return undefined;
  }

  /** Writes everything staged and waits for it; rejects with the first write error. */
  async flush(): Promise<void> {
    if (this.waiting) await this.waiting;
    this.submit();
    await this.settled();
    if (this.error) throw this.error;
  }

  /** Stops writing (what is staged is dropped) and waits for writes under way; never rejects. */
  async close(reason: Error): Promise<void> {
    this.error ??= reason;
    this.current = undefined;
    await this.settled();
  }

  private async settled(): Promise<void> {
    while (this.pending.length > 0) await this.pending[this.pending.length - 1]!.done;
  }

  private submit(): void {
    const b = this.current;
    if (!b || b.runs === 0) return;
    this.current = undefined;
    // Written after every earlier buffer that holds any of its pages (or after all, when serial):
    // those wait the same way, so waiting for them orders b after every earlier copy of its pages.
    const before: Promise<void>[] = [];
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const p = this.pending[i]!;
      if (this.serial) {
        before.push(p.done);
        break;
      }
      if (p.lo < b.hi && b.lo < p.hi) before.push(p.done);
    }
    this.pending.push(b);
    b.done = (before.length === 0 ? this.writeBuffer(b) : Promise.all(before).then(() => this.writeBuffer(b)));
  }

  private async writeBuffer(b: StagingBuffer): Promise<void> {
    try {
      if (!this.error) {
        for (let i = 0; i < b.runs; i++) {
          const end = i + 1 < b.runs ? b.runStart[i + 1]! : b.used;
          await this.write(b.mem.subarray(b.runStart[i]!, end), b.runPos[i]!);
        }
        this.written(b.used);
      }
    } catch (e) {
      this.error ??= e as Error;
    } finally {
      this.pending.splice(this.pending.indexOf(b), 1);
      b.used = 0;
      b.runs = 0;
      this.free.push(b);
      const wake = this.wake;
      this.waiting = undefined;
      this.wake = undefined;
      wake?.();
    }
  }
}
