// A packed snapshot (docs/s3-layout.md) read by range from an object store: the prefix (index,
// bitmaps, device state) once at open, pages on demand. Pages read in file order (restore, send,
// convert, postcopy's background scan) come from large sequential GETs kept several in flight
// ahead of the reader; pages asked for out of order (postcopy's requests) get one small GET each.
// Memory: the prefix plus about `readAhead` + 4 chunk buffers, reused (engine/buffer-pool.ts),
// and 16 read-around windows, whatever the guest size.

import { Command, TARGET_PAGE_SIZE } from '../codec/constants.js';
import type { Configuration } from '../codec/configuration.js';
import { ProtocolError } from '../codec/errors.js';
import { MainStreamParser } from '../codec/main-stream-parser.js';
import { encodeMainEvent } from '../codec/main-event-encode.js';
import { PageBitmap } from '../codec/mapped-ram.js';
import {
  blockBitmaps, cutStart, decodePackedLayout, decodePackedPreamble, filePieces, packedPageOffset, packedPrefixLength,
  PACKED_PREAMBLE_SIZE, skeletonOffsetOf, type PackedBlock, type PackedLayout, type RankIndex,
} from '../codec/packed-snapshot.js';
import type { DeviceStateLayout } from '../codec/vmdesc.js';
import { BufferPool } from './buffer-pool.js';
import { verifiedDeviceState } from './read-exactly.js';
import type { SnapshotBlockInfo, SnapshotRamSection, SnapshotSource } from './snapshot.js';

/** What the source needs from an object: its size and exact ranged reads. */
export interface RangeReader {
  readonly name: string;
  readonly size: number;
  read(position: number, length: number, into?: Buffer): Promise<Buffer>;
  /** Bytes from 0 that came with opening the object (an S3 open's first GET), handed out once. */
  takeHead?(): Buffer | undefined;
}

export interface PackedReadOptions {
  /** Bytes per sequential GET (default 8 MiB). */
  chunkBytes?: number;
  /** Sequential GETs in flight ahead of the reader (default 6). */
  readAhead?: number;
  /**
   * Bytes fetched around a page read out of order (postcopy's page requests), kept for the
   * requests that follow: default 256 KiB, measured in docs/s3.md (a GET of up to 256 KiB costs
   * about what a 4 KiB one does; present neighbours of a faulting page are often next).
   */
  readAround?: number;
  /**
   * Bytes read at open when the reader brought none of its own (default PACKED_FIRST_READ); the
   * prefix is read whole in any case, and pages that come with it are not read again.
   */
  firstRead?: number;
}

/** Read-around windows kept (most recently used). */
const AROUND_WINDOWS = 16;

/** The prefix holds the device state (≤ 256 MiB, mapped-ram-reader's limit) and the bitmaps. */
const MAX_PREFIX = 512 * 1024 * 1024;
/**
 * The first read of an object: the prefix of typical snapshots, so that one GET opens them
 * (docs/s3.md, *Opening an object*: a 128 MiB pc guest's prefix is 116 KiB, and every GiB of
 * RAM adds 32 KiB of bitmap; a GET of 512 KiB costs about what one of 64 KiB does, 1 MiB more).
 */
export const PACKED_FIRST_READ = 512 * 1024;

/** A sequential GET's chunk: its buffer goes back to the pool once nothing reads or writes it any more. */
interface Chunk {
  buf: Buffer;
  /** The chunk's bytes once they arrived (a view of `buf`). */
  data: Promise<Buffer>;
  /** The GET is over: the store writes no more into `buf`. */
  settled: boolean;
  /** Copies out of it in progress. */
  users: number;
  /** Views of it handed out by loadRuns and not yet released (see `pins`). */
  pins: number;
  /** Dropped from the chunk map (the reader moved past it). */
  evicted: boolean;
  recycled: boolean;
}

interface BlockState {
  block: PackedBlock;
  pages: number;
  bitmap: PageBitmap;
  rank: RankIndex;
}

export interface PackedReadStats {
  /** GETs for pages: sequential chunks and out-of-order reads. */
  chunkGets: number;
  randomGets: number;
  /** Out-of-order reads served from an earlier read-around window. */
  aroundHits: number;
  bytesFetched: number;
}

export class PackedSnapshot implements SnapshotSource {
  readonly format = 'mapped-ram';
  readonly fileSize: number;
  readonly stats: PackedReadStats = { chunkGets: 0, randomGets: 0, aroundHits: 0, bytesFetched: 0 };
  private readonly chunkBytes: number;
  private readonly readAhead: number;
  private readonly readAround: number;
  /** Read-around windows by their first byte's offset among the pages (insertion order = LRU order). */
  private readonly around = new Map<number, Promise<Buffer>>();
  private readonly chunks = new Map<number, Chunk>();
  private readonly pool: BufferPool;
  /**
   * Chunks that views handed out by loadRuns point into, by the scratch they were loaded for.
   * A caller reuses its scratch only once it is done with the views of the last load into it
   * (every loader's contract: the non-view bytes are in the scratch), so the next loadRuns with
   * the same scratch releases them. Keyed by the Buffer object: a different object over the same
   * memory releases nothing (safe, only less reuse).
   */
  private readonly pins = new WeakMap<Buffer, Chunk[]>();
  /** Chunks of `chunks` whose GET has completed. */
  private readonly arrived = new Set<number>();
  /** The highest chunk a sequential read has touched. */
  private cursor = -1;
  /** Where the last read ended (relative to the first packed page). */
  private lastEnd = -1;
  private closed = false;
  /**
   * The pages that came with the open's first GET (what lies past pagesOffset in it): the chunks
   * they overlap copy them instead of reading them again; dropped once the last of those is made.
   */
  private openedPages: Buffer | undefined;
  /** Non-RAM iterable sections (dirty-bitmap) as stored, for send to replay after RAM's END. */
  iterableSections: Buffer | undefined;

  private constructor(
    readonly reader: RangeReader,
    readonly layout: PackedLayout,
    private readonly skeleton: Buffer,
    private readonly blocks: ReadonlyMap<string, BlockState>,
    readonly configuration: Configuration,
    readonly ramSection: SnapshotRamSection,
    readonly switchoverStart: boolean,
    readonly blockList: readonly SnapshotBlockInfo[],
    readonly deviceState: DeviceStateLayout & { fileOffset: number },
    opts: PackedReadOptions,
  ) {
    this.fileSize = layout.fileSize;
    this.chunkBytes = Math.max(TARGET_PAGE_SIZE, Math.floor((opts.chunkBytes ?? 8 * 1024 * 1024) / TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE);
    this.readAhead = Math.max(1, opts.readAhead ?? 6);
    this.readAround = Math.max(TARGET_PAGE_SIZE, Math.floor((opts.readAround ?? 256 * 1024) / TARGET_PAGE_SIZE) * TARGET_PAGE_SIZE);
    // Chunks alive at once: one behind the reader, the one or two it reads, readAhead ahead, and
    // about one more that views held by the sender point into.
    this.pool = new BufferPool(this.chunkBytes, this.readAhead + 4);
  }

  /** The chunk buffers' pool (tests, and the docs' numbers). */
  get chunkPool(): BufferPool {
    return this.pool;
  }

  get path(): string {
    return this.reader.name;
  }

  /** Reads and checks the prefix; a truncated or corrupt object fails here, before any page is read. */
  static async open(reader: RangeReader, opts: PackedReadOptions = {}): Promise<PackedSnapshot> {
    const size = reader.size;
    const at = (e: unknown): never => {
      if (e instanceof ProtocolError) e.message = `${reader.name}: ${e.message}`;
      throw e;
    };
    if (size < PACKED_PREAMBLE_SIZE) {
      throw new ProtocolError('TRUNCATED', `${reader.name} is ${size} bytes, too short for a packed snapshot (${PACKED_PREAMBLE_SIZE}-byte preamble)`, { offset: size });
    }
    const opened = reader.takeHead?.();
    let head = opened && opened.length >= Math.min(size, PACKED_PREAMBLE_SIZE) ? opened : await reader.read(0, Math.min(size, Math.max(PACKED_PREAMBLE_SIZE, opts.firstRead ?? PACKED_FIRST_READ)));
    let layout: PackedLayout;
    try {
      const pre = decodePackedPreamble(head, size);
      const need = packedPrefixLength(pre);
      if (need > MAX_PREFIX) throw new ProtocolError('LIMIT_EXCEEDED', `prefix of ${need} bytes (index, bitmaps, device state) is larger than ${MAX_PREFIX}`, { offset: 16 });
      if (need > head.length) head = Buffer.concat([head, await reader.read(head.length, need - head.length)]);
      layout = decodePackedLayout(head, size);
    } catch (e) {
      return at(e);
    }
    const skeleton = head.subarray(layout.skeletonOffset, layout.skeletonOffset + layout.skeletonLength);
    try {
      const maps = blockBitmaps(layout, skeleton);
      const blocks = new Map<string, BlockState>();
      for (const [name, m] of maps) {
        const pages = m.block.usedLength / layout.pageSize;
        blocks.set(name, { block: m.block, pages, bitmap: new PageBitmap(pages, m.bitmap), rank: m.rank });
      }
      const parsed = parseSkeleton(layout, skeleton);
      for (const b of parsed.blockList) {
        const s = blocks.get(b.name);
        if (!s || s.block.usedLength !== b.usedLength) throw new ProtocolError('BAD_PACKED', `block "${b.name}" of the stream is not in the index as such`, { offset: PACKED_PREAMBLE_SIZE });
      }
      if (parsed.blockList.length !== blocks.size) throw new ProtocolError('BAD_PACKED', `the index has ${blocks.size} blocks, the stream ${parsed.blockList.length}`, { offset: 20 });
      const snap = new PackedSnapshot(reader, layout, skeleton, blocks, parsed.configuration, parsed.ramSection, parsed.switchoverStart, parsed.blockList, parsed.deviceState, opts);
      if (head.length > layout.pagesOffset) snap.openedPages = head.subarray(layout.pagesOffset);
      snap.iterableSections = parsed.iterableSections;
      return snap;
    } catch (e) {
      return at(e);
    }
  }

  get objectSize(): number {
    return this.layout.objectSize;
  }

  private block(name: string): BlockState {
    const b = this.blocks.get(name);
    if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `no block "${name}" in ${this.path}`);
    return b;
  }

  presentPages(block: string): number {
    return this.block(block).rank.total;
  }

  forEachRun(block: string, visit: (firstPage: number, count: number) => boolean | void, fromPage = 0, maxRun = Infinity): void {
    for (const [first, count] of this.block(block).bitmap.runs(fromPage, maxRun)) if (visit(first, count) === false) return;
  }

  scratchBytes(pages: number): number {
    return pages * TARGET_PAGE_SIZE;
  }

  /**
   * Runs of present pages are contiguous in the object (consecutive ranks); pages with clear
   * bits in a run (a caller may ask for them) read as zero. A run wholly present and inside one
   * sequential chunk that has arrived comes back as a view of that chunk, not copied into
   * `scratch`; the chunk's buffer stays out of the pool until the next loadRuns with the same
   * `scratch` (with the body read straight into the chunk, transports/direct-get.ts, such a run
   * is never copied at all).
   */
  async loadRuns(block: string, runs: ArrayLike<number>, runCount: number, scratch: Buffer, opts: { urgent?: boolean } = {}): Promise<Buffer[]> {
    const urgent = opts.urgent === true;
    const b = this.block(block);
    this.unpin(scratch);
    const pinned: Chunk[] = [];
    this.pins.set(scratch, pinned);
    const views: Buffer[] = [];
    const spans: { obj: number; at: number; len: number }[] = [];
    const whole: Promise<void>[] = [];
    let total = 0;
    for (let i = 0; i < runCount; i++) {
      const first = runs[2 * i]!;
      const count = runs[2 * i + 1]!;
      if (first < 0 || count <= 0 || first + count > b.pages) throw new RangeError(`pages [${first}, +${count}) outside block ${block}`);
      const len = count * TARGET_PAGE_SIZE;
      if (total + len > scratch.length) throw new RangeError(`scratch of ${scratch.length} bytes is too small for the runs`);
      const region = scratch.subarray(total, total + len);
      views.push(region);
      const r0 = b.rank.rank(first);
      if (b.rank.rank(first + count) - r0 === count) {
        const k = views.length - 1;
        whole.push(this.fetch(packedPageOffset(this.layout, b.block, r0), len, region, urgent, pinned).then((v) => { views[k] = v; }));
        total += len;
        continue;
      }
      let p = first;
      while (p < first + count) {
        const present = b.rank.test(p);
        let q = p + 1;
        while (q < first + count && b.rank.test(q) === present) q++;
        const at = total + (p - first) * TARGET_PAGE_SIZE;
        const n = (q - p) * TARGET_PAGE_SIZE;
        if (!present) scratch.fill(0, at, at + n);
        else {
          const obj = packedPageOffset(this.layout, b.block, b.rank.rank(p));
          const last = spans[spans.length - 1];
          if (last && last.obj + last.len === obj && last.at + last.len === at) last.len += n;
          else spans.push({ obj, at, len: n });
        }
        p = q;
      }
      total += len;
    }
    await Promise.all([
      ...whole,
      ...spans.map((s) => this.fetch(s.obj, s.len, scratch.subarray(s.at, s.at + s.len), urgent)),
    ]);
    return views;
  }

  /** The first chunks and the read-ahead behind them, as the first sequential read would start them. */
  prefetch(): void {
    if (this.closed || this.chunks.size > 0 || this.layout.objectSize <= this.layout.pagesOffset) return;
    const lastChunk = Math.floor((this.layout.objectSize - this.layout.pagesOffset - 1) / this.chunkBytes);
    for (let k = 0; k <= Math.min(lastChunk, this.readAhead); k++) this.chunk(k);
  }

  /**
   * Object bytes [obj, obj+len): with `pinned`, a view of the chunk that holds them all (the chunk
   * pinned until released), else copied into `into` (from the chunks, or a read-around GET) and
   * `into` returned.
   */
  private async fetch(obj: number, len: number, into: Buffer, urgent = false, pinned?: Chunk[]): Promise<Buffer> {
    // A read after close(): a bug in the reader's user, not something a caller reacts to.
    if (this.closed) throw new Error(`${this.path} is closed`);
    const rel = obj - this.layout.pagesOffset;
    const c0 = Math.floor(rel / this.chunkBytes);
    const c1 = Math.floor((rel + len - 1) / this.chunkBytes);
    if (urgent) {
      // A page the guest waits for: from a chunk that has arrived, else its own small GET (read-
      // around window). Behind an 8 MiB chunk still on its way, the first request of an instant
      // restore (a page QEMU touches while loading the devices, before RUN) waited ~150 ms.
      if (c0 === c1 && this.arrived.has(c0)) {
        const from = rel - c0 * this.chunkBytes;
        return this.copyOut(this.chunks.get(c0)!, from, from + len, into, 0, pinned);
      }
      await this.fetchAround(rel, len, into);
      return into;
    }
    // Sequential: at, or just past, what was read before, or right where the last read ended (a
    // reader that starts in the middle, e.g. extract --block), or the very start.
    const sequential = this.chunks.has(c0) || c0 === this.cursor + 1 || c0 === this.cursor || rel === this.lastEnd || (this.cursor < 0 && c0 === 0);
    this.lastEnd = rel + len;
    if (!sequential) {
      await this.fetchAround(rel, len, into);
      return into;
    }
    if (c1 > this.cursor) this.cursor = c1;
    // Chunks behind the reader are done with: one back is kept for reads that finish late.
    for (const k of [...this.chunks.keys()]) if (k < c0 - 1) this.evict(k);
    const lastChunk = Math.floor((this.layout.objectSize - this.layout.pagesOffset - 1) / this.chunkBytes);
    for (let k = c0; k <= Math.min(lastChunk, c1 + this.readAhead); k++) this.chunk(k);
    if (c0 === c1) {
      const from = rel - c0 * this.chunkBytes;
      return this.copyOut(this.chunk(c0), from, from + len, into, 0, pinned);
    }
    let done = 0;
    for (let k = c0; k <= c1; k++) {
      const start = k * this.chunkBytes;
      const from = Math.max(rel, start) - start;
      const to = Math.min(rel + len, start + this.chunkBytes) - start;
      await this.copyOut(this.chunk(k), from, to, into, done);
      done += to - from;
    }
    return into;
  }

  /**
   * Chunk bytes [from, to): with `pinned`, a view of the chunk (which joins `pinned`), else copied
   * into `into` at `at` and `into` returned. The chunk's buffer is not reused meanwhile.
   */
  private async copyOut(c: Chunk, from: number, to: number, into: Buffer, at: number, pinned?: Chunk[]): Promise<Buffer> {
    c.users++;
    try {
      const buf = await c.data;
      if (to > buf.length) throw new Error(`internal: bytes ${from}..${to} of a ${buf.length}-byte chunk`);
      if (pinned && !this.closed) {
        c.pins++;
        pinned.push(c);
        return buf.subarray(from, to);
      }
      buf.copy(into, at, from, to);
      return into;
    } finally {
      c.users--;
      this.recycle(c);
    }
  }

  /** Releases the chunks the views of the last load into `scratch` point into. */
  private unpin(scratch: Buffer): void {
    const list = this.pins.get(scratch);
    if (!list) return;
    this.pins.delete(scratch);
    for (const c of list) {
      c.pins--;
      this.recycle(c);
    }
  }

  /**
   * An out-of-order read: through aligned read-around windows (one GET each, kept for the next
   * requests), or one GET of its own when it is larger than a window.
   */
  private async fetchAround(rel: number, len: number, into: Buffer): Promise<void> {
    const w = this.readAround;
    const w0 = Math.floor(rel / w);
    const w1 = Math.floor((rel + len - 1) / w);
    if (w1 - w0 > 1) {
      this.stats.randomGets++;
      this.stats.bytesFetched += len;
      await this.reader.read(this.layout.pagesOffset + rel, len, into);
      return;
    }
    const pagesBytes = this.layout.objectSize - this.layout.pagesOffset;
    let done = 0;
    for (let k = w0; k <= w1; k++) {
      let p = this.around.get(k);
      if (p) {
        this.stats.aroundHits++;
        this.around.delete(k);
      } else {
        const start = k * w;
        const n = Math.min(w, pagesBytes - start);
        this.stats.randomGets++;
        this.stats.bytesFetched += n;
        const got = this.reader.read(this.layout.pagesOffset + start, n);
        got.catch(() => { if (this.around.get(k) === got) this.around.delete(k); });
        p = got;
      }
      this.around.set(k, p);
      if (this.around.size > AROUND_WINDOWS) this.around.delete(this.around.keys().next().value!);
      const buf = await p;
      const from = Math.max(rel, k * w) - k * w;
      const to = Math.min(rel + len, k * w + buf.length) - k * w;
      buf.copy(into, done, from, to);
      done += to - from;
    }
  }

  private chunk(k: number): Chunk {
    let c = this.chunks.get(k);
    if (!c) {
      const start = this.layout.pagesOffset + k * this.chunkBytes;
      const len = Math.min(this.chunkBytes, this.layout.objectSize - start);
      const buf = this.pool.take();
      // The opened pages are a prefix of the pages region, so a chunk overlaps them at its start.
      const opened = this.openedPages;
      const rel = k * this.chunkBytes;
      const have = opened && rel < opened.length ? opened.copy(buf, 0, rel, Math.min(opened.length, rel + len)) : 0;
      if (opened && rel + len >= opened.length) this.openedPages = undefined;
      let data: Promise<Buffer>;
      if (have === len) data = Promise.resolve(buf.subarray(0, len));
      else {
        this.stats.chunkGets++;
        this.stats.bytesFetched += len - have;
        data = this.reader.read(start + have, len - have, buf.subarray(have, len)).then(() => buf.subarray(0, len));
      }
      const entry: Chunk = { buf, data, settled: false, users: 0, pins: 0, evicted: false, recycled: false };
      entry.data.then(() => {
        entry.settled = true;
        if (this.chunks.get(k) === entry) this.arrived.add(k);
        this.recycle(entry);
      }, () => {
        // A failed GET writes no more either (the reader retried inside read(), and gave up).
        entry.settled = true;
        this.recycle(entry);
      });
      this.chunks.set(k, entry);
      c = entry;
    }
    return c;
  }

  private evict(k: number): void {
    const c = this.chunks.get(k);
    if (!c) return;
    this.chunks.delete(k);
    this.arrived.delete(k);
    c.evicted = true;
    this.recycle(c);
  }

  /** Back to the pool once evicted, its GET over and no copy out of it in progress. */
  private recycle(c: Chunk): void {
    if (c.recycled || !c.evicted || !c.settled || c.users > 0 || c.pins > 0 || this.closed) return;
    c.recycled = true;
    this.pool.give(c.buf);
  }

  /** Bytes of the mapped-ram file this object expands to (outside pages regions: the skeleton). */
  async readAt(position: number, length: number, into?: Buffer): Promise<Buffer> {
    const out = into ?? Buffer.allocUnsafe(length);
    if (position + length > this.fileSize) throw new ProtocolError('TRUNCATED', `${this.path}: read of ${length} bytes at ${position} beyond the file's ${this.fileSize}`, { offset: position });
    let done = 0;
    while (done < length) {
      const pos = position + done;
      const piece = filePieces(this.layout).find((p) => pos >= p.fileOffset && pos < p.fileOffset + p.length)!;
      const n = Math.min(length - done, piece.fileOffset + piece.length - pos);
      if (piece.kind === 'skeleton') {
        const s = piece.skeletonOffset + (pos - piece.fileOffset);
        this.skeleton.copy(out, done, s, s + n);
      } else if (piece.kind === 'zero') {
        out.fill(0, done, done + n);
      } else {
        await this.readPagesRegion(piece.block.name, pos - piece.fileOffset, out.subarray(done, done + n));
      }
      done += n;
    }
    return out;
  }

  /** Region bytes (page aligned or not) of a block: present pages from the object, zero elsewhere. */
  private async readPagesRegion(block: string, offset: number, into: Buffer): Promise<void> {
    const first = Math.floor(offset / TARGET_PAGE_SIZE);
    const last = Math.floor((offset + into.length - 1) / TARGET_PAGE_SIZE);
    const tmp = Buffer.allocUnsafe((last - first + 1) * TARGET_PAGE_SIZE);
    try {
      const [view] = await this.loadRuns(block, [first, last - first + 1], 1, tmp);
      view!.copy(into, 0, offset - first * TARGET_PAGE_SIZE);
    } finally {
      this.unpin(tmp);
    }
  }

  /** The skeleton (everything but the pages regions) as file spans, for rebuilding the file. */
  skeletonSpans(): { fileOffset: number; bytes: Buffer }[] {
    return filePieces(this.layout).flatMap((p) => p.kind === 'skeleton' ? [{ fileOffset: p.fileOffset, bytes: this.skeleton.subarray(p.skeletonOffset, p.skeletonOffset + p.length) }] : []);
  }

  /** Object offset of a present page (inspect and tests). */
  pageObjectOffset(block: string, page: number): number | undefined {
    const b = this.block(block);
    return b.rank.test(page) ? packedPageOffset(this.layout, b.block, b.rank.rank(page)) : undefined;
  }

  async close(): Promise<void> {
    // GETs still in flight write into their buffers: those are left to the garbage collector.
    this.closed = true;
    this.chunks.clear();
    this.arrived.clear();
    this.around.clear();
    this.pool.clear();
  }
}

export interface PackedDescription {
  layout: 'packed';
  version: number;
  'object-size': number;
  'present-pages': number;
  'skeleton-offset': number;
  'skeleton-length': number;
  'pages-offset': number;
  /** Per block: where its pages start among the packed pages, and in the object. */
  blocks: { name: string; present: number; 'first-rank': number; 'object-offset': number }[];
}

export function describePacked(p: PackedSnapshot): PackedDescription {
  const l = p.layout;
  return {
    layout: 'packed',
    version: l.version,
    'object-size': l.objectSize,
    'present-pages': l.presentPages,
    'skeleton-offset': l.skeletonOffset,
    'skeleton-length': l.skeletonLength,
    'pages-offset': l.pagesOffset,
    blocks: l.blocks.map((b) => ({ name: b.name, present: b.present, 'first-rank': b.firstRank, 'object-offset': l.pagesOffset + b.firstRank * l.pageSize })),
  };
}

/**
 * The main stream of the file the object expands to, parsed as mapped-ram-reader parses a file:
 * the parser's skips over pages regions are taken without reading (they are not in the skeleton).
 */
function parseSkeleton(layout: PackedLayout, skeleton: Buffer): {
  configuration: Configuration; ramSection: SnapshotRamSection; switchoverStart: boolean; blockList: SnapshotBlockInfo[];
  deviceState: DeviceStateLayout & { fileOffset: number }; iterableSections: Buffer | undefined;
} {
  // Non-RAM iterable sections (dirty-bitmap), as the mapped-ram reader keeps them: their bytes.
  const iterable: Buffer[] = [];
  let iterableId: number | undefined;
  const parser = new MainStreamParser();
  const blockList: SnapshotBlockInfo[] = [];
  let ramSection: SnapshotRamSection | undefined;
  let switchoverStart = false;
  let deviceStart = -1;
  const device: Buffer[] = [];
  // The cuts: padding and pages region of each block, not in the skeleton.
  const regions = layout.blocks.map((b) => [cutStart(b, layout.pageSize), b.pagesOffset + b.usedLength] as const);
  let pos = 0;
  while (pos < layout.fileSize) {
    const skip = parser.pendingSkip;
    if (skip > 0) {
      if (pos + skip > layout.fileSize) throw new ProtocolError('TRUNCATED', `the stream skips beyond the file's end`, { offset: pos });
      parser.skipped(skip);
      pos += skip;
      continue;
    }
    const region = regions.find(([s, e]) => pos >= s && pos < e);
    if (region) throw new ProtocolError('BAD_PACKED', `the main stream reaches into a block's padding or pages region at file offset 0x${pos.toString(16)}`, { offset: pos });
    const next = regions.find(([s]) => s > pos);
    const end = Math.min(layout.fileSize, next ? next[0] : layout.fileSize, pos + 1024 * 1024);
    const s = skeletonOffsetOf(layout, pos);
    parser.push(Buffer.from(skeleton.subarray(s, s + (end - pos))));
    pos = end;
    for (let ev = parser.next(); ev !== null; ev = parser.next()) {
      if (ev.type === 'ram-block') {
        const mr = ev.block.mappedRam;
        const idx = layout.blocks.find((b) => b.name === ev.block.name);
        if (!mr || !idx || mr.pagesOffset !== idx.pagesOffset || mr.bitmapOffset !== idx.bitmapOffset) {
          throw new ProtocolError('BAD_PACKED', `block "${ev.block.name}": its mapped-ram header does not match the index`, { offset: parser.offset });
        }
        blockList.push({ name: ev.block.name, usedLength: ev.block.usedLength, ...(ev.block.mrAddr !== undefined ? { mrAddr: ev.block.mrAddr } : {}) });
      } else if (ev.type === 'section' && ev.idstr !== 'ram') {
        iterableId = ev.sectionId;
        iterable.push(...encodeMainEvent(ev));
      } else if (ev.type === 'iterable-data') {
        iterable.push(...encodeMainEvent(ev));
      } else if (ev.type === 'footer' && ev.sectionId === iterableId) {
        iterableId = undefined;
        iterable.push(...encodeMainEvent(ev));
      } else if (ev.type === 'section' && ev.kind === 'start') {
        ramSection = { sectionId: ev.sectionId, instanceId: ev.instanceId, versionId: ev.versionId };
      } else if (ev.type === 'command') {
        if (ev.cmd === Command.SWITCHOVER_START) switchoverStart = true;
        else if (ev.cmd !== Command.POSTCOPY_ADVISE) throw new ProtocolError('UNSUPPORTED', `command ${ev.cmd} in a snapshot (only SWITCHOVER_START belongs there)`, { offset: parser.offset });
      } else if (ev.type === 'package') {
        throw new ProtocolError('UNSUPPORTED', 'PACKAGED command in a snapshot', { offset: parser.offset });
      } else if (ev.type === 'ram-page' || ev.type === 'ram-zero' || ev.type === 'ram-flush') {
        throw new ProtocolError('BAD_RECORD', `${ev.type} record in a mapped-ram snapshot`, { offset: parser.offset });
      } else if (ev.type === 'device-state') {
        if (deviceStart < 0) deviceStart = parser.offset - ev.data.reduce((n, d) => n + d.length, 0);
        device.push(...ev.data);
      }
    }
  }
  const configuration = parser.configuration;
  if (!configuration) throw new ProtocolError('BAD_RECORD', 'no configuration record');
  if (!configuration.capabilities.includes('mapped-ram')) throw new ProtocolError('BAD_MAPPED_RAM', 'the stream lacks the mapped-ram capability');
  if (!ramSection) throw new ProtocolError('BAD_RECORD', 'no RAM section');
  if (deviceStart < 0) throw new ProtocolError('TRUNCATED', 'the snapshot ends before the device state');
  return {
    configuration, ramSection, switchoverStart, blockList, deviceState: verifiedDeviceState(Buffer.concat(device), deviceStart, layout.fileSize),
    iterableSections: iterable.length > 0 ? Buffer.concat(iterable.map((b) => Buffer.from(b))) : undefined,
  };
}
