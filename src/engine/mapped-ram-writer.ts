// Writes a mapped-ram snapshot (docs/protocol.md §5): pages straight to their final offsets with
// positioned writes (contiguous pages coalesced into one writev), the main stream around them,
// the bitmaps at the end. The file lives under a temporary name and is renamed only by commit(),
// so a migration that did not complete never leaves anything that looks like a snapshot.

import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import { dirname } from 'node:path';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { OutputFileError, ProtocolError } from '../codec/errors.js';
import { encodeMappedRamHeader, planBlock, SparsePageBitmap, type MappedRamHeader } from '../codec/mapped-ram.js';
import { encodeBlockEntry } from '../codec/stream-encode.js';
import { coalescePages, type PageRun } from './coalesce.js';
import { removeStalePartials, syncDirectory, temporaryName, writeExactly } from './write-exactly.js';
import { AlignedSlots, alignedBuffer, DIRECT_ALIGN, PACKET_SLOT_BYTES, PACKET_SLOTS } from './aligned-slots.js';
import { StagedRuns } from './staged-runs.js';
import type { PageStore, RamBlock } from './page-store.js';

/** Page bytes between early writebacks (see startWriteback). */
const WRITEBACK_BYTES = 64 * 1024 * 1024;

/**
 * Staging for pages that come one at a time (stagePage): buffers × bytes, allocated at the first
 * such page. One buffer is filled while the others are written. 218 MB of a background snapshot
 * replayed into receive (O_DIRECT): with 4 buffers written one at a time the stream waited for a
 * free buffer 1-71 times per run (14-2631 ms), 4 written at once 9-21 times (64-116 ms), 8 at
 * once never.
 */
const STAGING_BUFFERS = 8;
const STAGING_BUFFER_BYTES = 1024 * 1024;

interface BlockLayout extends RamBlock {
  header: MappedRamHeader & { headerOffset: number; end: number };
  /** Sparse: a block's used_length is the peer's claim; memory follows the pages written. */
  bitmap: SparsePageBitmap;
}

export class MappedRamWriter implements PageStore {
  private readonly blocks = new Map<string, BlockLayout>();
  private order: BlockLayout[] = [];
  private streamCursor = 0;
  private streamChain: Promise<void> = Promise.resolve();
  private pageChain: Promise<void> = Promise.resolve();
  /** Bytes written since the last early writeback was started, and the one in flight. */
  private unsynced = 0;
  private writeback: Promise<void> | undefined;
  private writebackError: Error | undefined;
  private committed = false;
  private closed = false;

  private readonly slots: AlignedSlots | undefined;
  /** Read handle for readPage (XBZRLE deltas apply onto the page held). */
  private reader: FileHandle | undefined;
  /** Pages given one at a time (stagePage), on their way to the file as runs. */
  private staged: StagedRuns | undefined;

  private constructor(
    readonly finalPath: string,
    readonly tempPath: string,
    private readonly fh: FileHandle,
    private readonly pageSize: number,
    private direct: FileHandle | undefined,
    slots: number,
  ) {
    if (direct) this.slots = new AlignedSlots(PACKET_SLOT_BYTES, slots);
  }

  /**
   * Creates the temporary file next to `finalPath` (same file system, so rename is atomic).
   * Pages are written with O_DIRECT where the file system allows it (directIo, default on):
   * buffered writes of a whole guest cost a page-cache page each, which on this kind of VM is
   * the most expensive part of a save (perf: copy into fresh page-cache pages dominated), and
   * a fresh snapshot is not read back soon. Everything else in the file is written buffered.
   */
  /**
   * baseOffset: where QEMU's stream starts in the file (`file:PATH,offset=N`; a libvirt image puts
   * its header before it, see writePrologue); block headers hold absolute offsets, as QEMU's do.
   */
  static async create(finalPath: string, opts: { pageSize?: number; directIo?: boolean; slots?: number; baseOffset?: number } = {}): Promise<MappedRamWriter> {
    if (opts.slots !== undefined && !(Number.isInteger(opts.slots) && opts.slots >= 1 && opts.slots <= 1024)) {
      throw new RangeError(`slots must be an integer from 1 to 1024 (got ${opts.slots})`);
    }
    await removeStalePartials(finalPath);
    const tempPath = temporaryName(finalPath);
    const pageSize = opts.pageSize ?? TARGET_PAGE_SIZE;
    let fh: FileHandle;
    try {
      fh = await open(tempPath, 'wx', 0o600);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new OutputFileError('OUTPUT_FAILED', finalPath, `cannot create the snapshot in ${dirname(finalPath)}: ${err.message}`, { cause: err });
    }
    let direct: FileHandle | undefined;
    if ((opts.directIo ?? true) && fsConstants.O_DIRECT !== undefined && pageSize % DIRECT_ALIGN === 0) {
      // A file system without O_DIRECT refuses the open (EINVAL): buffered writes then.
      direct = await open(tempPath, fsConstants.O_WRONLY | fsConstants.O_DIRECT).catch(() => undefined);
    }
    const w = new MappedRamWriter(finalPath, tempPath, fh, pageSize, direct, opts.slots ?? PACKET_SLOTS);
    w.baseOffset = opts.baseOffset ?? 0;
    return w;
  }

  private baseOffset = 0;

  /** Bytes before QEMU's stream (at most baseOffset of them), e.g. a libvirt image header. */
  writePrologue(bytes: Buffer): Promise<void> {
    if (bytes.length > this.baseOffset) throw new RangeError(`a prologue of ${bytes.length} bytes does not fit before the stream at ${this.baseOffset}`);
    return this.writeAll([bytes], 0);
  }

  /** Whether page data goes to disk with O_DIRECT (see create). */
  get directIo(): boolean {
    return this.direct !== undefined;
  }

  /**
   * Lays out the file: `head` is the main stream up to and including the MEM_SIZE record; then
   * every block's entry and mapped-ram header, with its bitmap and pages regions reserved.
   * Returns the offset where the main stream continues.
   */
  async writeHead(head: Buffer, blocks: readonly (RamBlock & { mrAddr?: number })[]): Promise<number> {
    await this.writeAll([head], this.baseOffset);
    let pos = this.baseOffset + head.length;
    for (const b of blocks) {
      if (this.blocks.has(b.name)) throw new ProtocolError('BAD_RECORD', `RAM block "${b.name}" listed twice`);
      const entry = encodeBlockEntry(b.name, b.usedLength, b.mrAddr === undefined ? {} : { mrAddr: b.mrAddr });
      const header = planBlock(pos + entry.length, b.usedLength, this.pageSize);
      const layout: BlockLayout = { name: b.name, usedLength: b.usedLength, header, bitmap: new SparsePageBitmap(b.usedLength / this.pageSize) };
      this.blocks.set(b.name, layout);
      this.order.push(layout);
      await this.writeAll([entry, encodeMappedRamHeader(header)], pos);
      // The next block's entry follows this block's pages region (§5.2).
      pos = header.end;
    }
    this.streamCursor = pos;
    return pos;
  }

  /** Appends main-stream bytes after the last block; calls are applied in order. */
  appendStream(bufs: readonly Buffer[]): Promise<void> {
    const total = bufs.reduce((n, b) => n + b.length, 0);
    if (total === 0) return this.streamChain;
    const at = this.streamCursor;
    this.streamCursor += total;
    const copy = [...bufs];
    this.streamChain = this.streamChain.then(() => this.writeAll(copy, at));
    return this.streamChain;
  }

  get streamEnd(): number {
    return this.streamCursor;
  }

  async writePages(block: string, offsets: ArrayLike<number>, count: number, data: readonly Buffer[]): Promise<void> {
    const b = this.blockOrThrow(block);
    const runs = coalescePages(offsets, count, data, this.pageSize);
    for (const r of runs) {
      const first = r.offset / this.pageSize;
      for (let p = 0; p < r.pages; p++) b.bitmap.set(first + p);
    }
    if (this.slots && count * this.pageSize <= this.slots.slotBytes) return this.writeDirect(b.header.pagesOffset, runs, this.slots);
    const writes: Promise<void>[] = [];
    for (const r of runs) writes.push(this.queuePageWrite(() => this.writeAll(r.data, b.header.pagesOffset + r.offset), r.pages));
    // Settled, not just the first failure: the caller may reuse `data` once this returns.
    const failed = (await Promise.allSettled(writes)).find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /**
   * Stores one page as writePages does, without a write per page: the page is copied into a
   * staging buffer, consecutive pages go out as one positioned write, and the stream goes on
   * meanwhile (see staged-runs.ts). For the main channel's pages, one record at a time. Returns a
   * promise only when all staging buffers are being written: await it before the next page. A
   * write error is thrown by a later call, flushPages or commit. Pages given to writePages and
   * here must not overlap unless flushPages ran in between (multifd and the main channel meet
   * only at sync points and the postcopy switch).
   */
  stagePage(block: string, offset: number, data: readonly Buffer[]): void | Promise<void> {
    const b = this.blockOrThrow(block);
    if (offset % this.pageSize !== 0 || offset + this.pageSize > b.usedLength) {
      throw new ProtocolError('OFFSET_OUT_OF_RANGE', `page offset 0x${offset.toString(16)} is outside block "${block}"`);
    }
    if (this.closed) throw new Error('the snapshot is closed');
    b.bitmap.set(offset / this.pageSize);
    this.staged ??= new StagedRuns(
      this.pageSize,
      alignedBuffer(STAGING_BUFFERS * STAGING_BUFFER_BYTES),
      STAGING_BUFFERS,
      (bytes, at) => (this.direct ? this.writeAllDirect(bytes, at) : this.writeAll([bytes], at)),
      (bytes) => this.startWriteback(bytes),
      // O_DIRECT writes wait for the device: several at once. Buffered ones: one (see queuePageWrite).
      this.direct === undefined,
    );
    return this.staged.add(b.header.pagesOffset + offset, data);
  }

  /** Every staged page written (before another writer may touch the same pages). */
  async flushPages(): Promise<void> {
    await this.staged?.flush();
  }

  /**
   * One page write at a time: buffered writes to one file take its inode lock exclusively, so
   * parallel ones only spin on it (perf showed ~10% of a save's CPU in rwsem_spin_on_owner); and
   * O_DIRECT writes into holes allocate blocks under the same lock.
   */
  private queuePageWrite(write: () => Promise<void>, pages: number): Promise<void> {
    const w = this.pageChain.then(write).then(() => this.startWriteback(pages * this.pageSize));
    this.pageChain = w.catch(() => {});
    return w;
  }

  /** Copies the runs into an aligned slot, then writes each run from there with O_DIRECT. */
  private async writeDirect(pagesOffset: number, runs: PageRun[], slots: AlignedSlots): Promise<void> {
    const got = slots.acquire();
    const slot = got instanceof Promise ? await got : got;
    try {
      const spans: { at: number; from: number; to: number }[] = [];
      let pos = 0;
      for (const r of runs) {
        const from = pos;
        for (const v of r.data) pos += v.copy(slot, pos);
        spans.push({ at: pagesOffset + r.offset, from, to: pos });
      }
      // Direct writes wait for the device, so several may be in flight: as many as slots.
      for (const sp of spans) await this.writeAllDirect(slot.subarray(sp.from, sp.to), sp.at);
      this.startWriteback(pos);
    } finally {
      slots.release(slot);
    }
  }

  private async writeAllDirect(buf: Buffer, position: number): Promise<void> {
    const direct = this.direct;
    if (direct) {
      try {
        const { bytesWritten } = await direct.write(buf, 0, buf.length, position);
        if (bytesWritten === buf.length) return;
        // A short direct write (rare: near a quota) ends on a block boundary; the rest goes buffered.
        return this.writeAll([buf.subarray(bytesWritten)], position + bytesWritten);
      } catch (e) {
        // Some file systems accept O_DIRECT at open and refuse it at write: buffered from now on.
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.direct = undefined;
        await direct.close().catch(() => {});
      }
    }
    await this.writeAll([buf], position);
  }

  zeroPages(block: string, offsets: ArrayLike<number>, start: number, count: number): void {
    const b = this.blockOrThrow(block);
    // The old bytes stay in the pages region (as QEMU leaves them); a clear bit means "zero".
    for (let i = start; i < start + count; i++) b.bitmap.clear(offsets[i]! / this.pageSize);
  }

  /**
   * The page as the snapshot holds it now: what an XBZRLE delta applies onto (the copy a QEMU
   * destination holds is the page itself). Zeros where the bit is clear (a zero page, or none
   * yet). A staged page is read from its staging buffer; callers await their earlier writePages
   * of the page first. The read goes through the page cache, which O_DIRECT writes keep coherent.
   * `into`: where to read it (pageSize bytes; a new buffer if not given).
   */
  async readPage(block: string, offset: number, into?: Buffer): Promise<Buffer> {
    const b = this.blockOrThrow(block);
    if (offset % this.pageSize !== 0 || offset + this.pageSize > b.usedLength) {
      throw new ProtocolError('OFFSET_OUT_OF_RANGE', `page offset 0x${offset.toString(16)} is outside block "${block}"`);
    }
    if (into !== undefined && into.length !== this.pageSize) throw new RangeError(`readPage into ${into.length} bytes (pages are ${this.pageSize})`);
    const page = into ?? Buffer.alloc(this.pageSize);
    if (!b.bitmap.test(offset / this.pageSize)) return page.fill(0);
    const held = this.staged?.find(b.header.pagesOffset + offset);
    if (held) {
      held.copy(page);
      return page;
    }
    // The main handle is write-only ('wx'); a read handle is opened the first time it is needed.
    this.reader ??= await open(this.tempPath, 'r');
    let done = 0;
    while (done < page.length) {
      const { bytesRead } = await this.reader.read(page, done, page.length - done, b.header.pagesOffset + offset + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    // Past the end of what was written: a hole, zeros (into may hold an older page).
    page.fill(0, done);
    return page;
  }

  bitmap(block: string): SparsePageBitmap | undefined {
    return this.blocks.get(block)?.bitmap;
  }

  /**
   * The final fsync would otherwise write the whole snapshot out after the last byte arrived (the
   * kernel starts background writeback only at 10% of RAM dirty): start it early, in the
   * background, so that commit() finds little left to do. At most one runs at a time.
   */
  private startWriteback(bytes: number): void {
    this.unsynced += bytes;
    if (this.unsynced < WRITEBACK_BYTES || this.writeback || this.closed) return;
    this.unsynced = 0;
    this.writeback = this.fh.datasync().then(
      () => { this.writeback = undefined; },
      (e: Error) => {
        // Kept for commit(): Linux reports a writeback error to an fd once, so the final fsync
        // might succeed although pages were lost.
        this.writebackError ??= e;
        this.writeback = undefined;
      },
    );
  }

  /**
   * Writes bitmaps, makes everything durable, and renames the file into place. `pointOfNoReturn`
   * runs right before the rename, in the same turn: if it throws (an interrupt came), the file is
   * not renamed (abort() removes it) and the error is thrown; once it returned, the rename is made.
   */
  async commit(pointOfNoReturn?: () => void): Promise<void> {
    await this.staged?.flush();
    await this.streamChain;
    await this.pageChain;
    await this.writeback;
    if (this.writebackError) throw new OutputFileError('OUTPUT_FAILED', this.finalPath, `writing the snapshot failed: ${this.writebackError.message}`, { cause: this.writebackError });
    // Only the bitmap chunks that hold a set bit: the rest of each bitmap region was never
    // written in this fresh file, so it reads as zero (a hole).
    // Adjacent chunks go out as one writev (a dense 1 TiB guest has 8192 of them).
    for (const b of this.order) {
      let run: Buffer[] = [];
      let runAt = 0;
      let runEnd = -1;
      for (const [at, bytes] of b.bitmap.pieces()) {
        if (at !== runEnd && run.length > 0) {
          await this.writeAll(run, b.header.bitmapOffset + runAt);
          run = [];
        }
        if (run.length === 0) runAt = at;
        run.push(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length));
        runEnd = at + bytes.length;
      }
      if (run.length > 0) await this.writeAll(run, b.header.bitmapOffset + runAt);
    }
    // A file shorter than its last pages region would not load: extend to the stream's end.
    await this.fh.truncate(this.streamCursor);
    await this.fh.sync();
    await this.fh.close();
    await this.direct?.close();
    await this.reader?.close();
    this.closed = true;
    pointOfNoReturn?.();
    await rename(this.tempPath, this.finalPath);
    syncDirectory(dirname(this.finalPath));
    this.committed = true;
  }

  /** Removes the temporary file; a no-op after commit. */
  async abort(): Promise<void> {
    if (this.committed) return;
    await this.staged?.close(new Error('the snapshot was aborted'));
    await this.writeback;
    if (!this.closed) {
      this.closed = true;
      await this.fh.close().catch(() => {});
      await this.direct?.close().catch(() => {});
      await this.reader?.close().catch(() => {});
    }
    await unlink(this.tempPath).catch(() => {});
  }

  private blockOrThrow(name: string): BlockLayout {
    const b = this.blocks.get(name);
    if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `unknown RAM block "${name}"`);
    return b;
  }

  private writeAll(bufs: readonly Buffer[], position: number): Promise<void> {
    return writeExactly(this.fh, bufs, position, this.tempPath);
  }
}
