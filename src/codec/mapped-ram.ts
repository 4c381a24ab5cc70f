// The mapped-ram file format's per-block header, bitmap and layout (docs/protocol.md §5).

import { MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HEADER_SIZE, MAPPED_RAM_VERSION, TARGET_PAGE_SIZE } from './constants.js';
import { ProtocolError } from './errors.js';

export interface MappedRamHeader {
  version: number;
  pageSize: number;
  bitmapOffset: number;
  pagesOffset: number;
}

export function encodeMappedRamHeader(h: MappedRamHeader): Buffer {
  const b = Buffer.alloc(MAPPED_RAM_HEADER_SIZE);
  b.writeUInt32BE(h.version, 0);
  b.writeBigUInt64BE(BigInt(h.pageSize), 4);
  b.writeBigUInt64BE(BigInt(h.bitmapOffset), 12);
  b.writeBigUInt64BE(BigInt(h.pagesOffset), 20);
  return b;
}

export function decodeMappedRamHeader(b: Buffer, offset?: number): MappedRamHeader {
  const at = offset === undefined ? {} : { offset };
  if (b.length < MAPPED_RAM_HEADER_SIZE) throw new ProtocolError('TRUNCATED', 'mapped-ram block header truncated', at);
  const version = b.readUInt32BE(0);
  if (version > MAPPED_RAM_VERSION || version === 0) {
    throw new ProtocolError('BAD_VERSION', `mapped-ram header version ${version} (supported: ${MAPPED_RAM_VERSION})`, at);
  }
  const big = (o: number, what: string): number => {
    const v = b.readBigUInt64BE(o);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('BAD_MAPPED_RAM', `mapped-ram ${what} 0x${v.toString(16)} is too large`, at);
    return Number(v);
  };
  const h = { version, pageSize: big(4, 'page_size'), bitmapOffset: big(12, 'bitmap_offset'), pagesOffset: big(20, 'pages_offset') };
  if (h.pageSize !== TARGET_PAGE_SIZE) {
    throw new ProtocolError('BAD_MAPPED_RAM', `mapped-ram header has invalid page_size ${h.pageSize} (expected ${TARGET_PAGE_SIZE})`, at);
  }
  if (h.pagesOffset % h.pageSize !== 0) {
    throw new ProtocolError('BAD_MAPPED_RAM', `mapped-ram pages_offset 0x${h.pagesOffset.toString(16)} is not page aligned`, at);
  }
  return h;
}

export function bitmapBytes(usedLength: number, pageSize = TARGET_PAGE_SIZE): number {
  const pages = Math.ceil(usedLength / pageSize);
  return Math.ceil(pages / 64) * 8;
}

export function alignUp(v: number, a: number): number {
  return Math.ceil(v / a) * a;
}

/** Where a block's header, bitmap and pages go, given the file offset right after its used_length. */
export function planBlock(headerOffset: number, usedLength: number, pageSize = TARGET_PAGE_SIZE): MappedRamHeader & { headerOffset: number; end: number } {
  const bitmapOffset = headerOffset + MAPPED_RAM_HEADER_SIZE;
  const pagesOffset = alignUp(bitmapOffset + bitmapBytes(usedLength, pageSize), MAPPED_RAM_FILE_OFFSET_ALIGNMENT);
  return { version: MAPPED_RAM_VERSION, pageSize, bitmapOffset, pagesOffset, headerOffset, end: pagesOffset + usedLength };
}

/**
 * One bit per page, stored as little-endian 64-bit words (host order on x86 and arm64), which is
 * byte k>>3, bit k&7: a Uint8Array with LSB-first bits is byte-identical.
 */
export class PageBitmap {
  readonly bytes: Buffer;
  constructor(readonly pages: number, from?: Buffer) {
    const size = Math.ceil(pages / 64) * 8;
    if (from) {
      if (from.length < size) throw new ProtocolError('BAD_MAPPED_RAM', `bitmap is ${from.length} bytes, expected ${size}`);
      this.bytes = from.subarray(0, size);
    } else {
      this.bytes = Buffer.alloc(size);
    }
  }
  set(page: number): void {
    this.bytes[page >>> 3]! |= 1 << (page & 7);
  }
  clear(page: number): void {
    this.bytes[page >>> 3]! &= ~(1 << (page & 7));
  }
  test(page: number): boolean {
    return (this.bytes[page >>> 3]! & (1 << (page & 7))) !== 0;
  }
  /** Set bits among the first `pages` (stray bits in the last word's padding do not count). */
  count(): number {
    let n = 0;
    const full = this.pages >>> 3;
    for (let i = 0; i < full; i++) {
      let v = this.bytes[i]!;
      while (v) { v &= v - 1; n++; }
    }
    for (let p = full * 8; p < this.pages; p++) if (this.test(p)) n++;
    return n;
  }
  /**
   * Runs of consecutive set bits as [firstPage, pageCount] from page `from` on; bits beyond `pages`
   * are ignored. A run longer than `maxRun` comes in adjacent pieces of at most `maxRun` pages, so
   * a caller that takes a few pages at a time does not scan the whole rest of a long run on every
   * call (a 3 GiB run asked for 128 pages at a time was 4 CPU-s of a 4 GiB restore).
   */
  *runs(from = 0, maxRun = Infinity): Generator<[number, number]> {
    let p = Math.max(0, from);
    while (p < this.pages) {
      const byte = this.bytes[p >>> 3]!;
      if (byte === 0 && (p & 7) === 0) { p += 8; continue; }
      if (!this.test(p)) { p++; continue; }
      const start = p;
      const stop = Math.min(this.pages, start + Math.max(1, maxRun));
      while (p < stop) {
        if ((p & 7) === 0 && this.bytes[p >>> 3] === 0xff && p + 8 <= stop) { p += 8; continue; }
        if (!this.test(p)) break;
        p++;
      }
      yield [start, p - start];
    }
  }
}

/** Bitmap bytes per SparsePageBitmap chunk: 32768 pages (128 MiB of guest memory). */
const SPARSE_CHUNK_BYTES = 4096;
const SPARSE_CHUNK_PAGES = SPARSE_CHUNK_BYTES * 8;

/**
 * The same bitmap (same bytes once written out) for a writer, held sparsely: a chunk of
 * SPARSE_CHUNK_BYTES is allocated when its first bit is set, so memory follows the pages written,
 * not the block's claimed used_length (a stream claiming a 16 TiB block would otherwise cost a
 * 512 MiB bitmap before a single page arrived). Chunks never allocated are all zero, which is
 * what the hole they leave in a fresh file reads as.
 */
export class SparsePageBitmap {
  private readonly chunks = new Map<number, Uint8Array>();
  private lastKey = -1;
  private lastChunk: Uint8Array | undefined;

  constructor(readonly pages: number) {}

  private chunk(key: number, create: boolean): Uint8Array | undefined {
    if (key === this.lastKey && this.lastChunk !== undefined) return this.lastChunk;
    let c = this.chunks.get(key);
    if (c === undefined) {
      if (!create) return undefined;
      c = new Uint8Array(SPARSE_CHUNK_BYTES);
      this.chunks.set(key, c);
    }
    this.lastKey = key;
    this.lastChunk = c;
    return c;
  }

  set(page: number): void {
    const c = this.chunk(Math.floor(page / SPARSE_CHUNK_PAGES), true)!;
    const i = page % SPARSE_CHUNK_PAGES;
    c[i >>> 3]! |= 1 << (i & 7);
  }
  clear(page: number): void {
    const c = this.chunk(Math.floor(page / SPARSE_CHUNK_PAGES), false);
    if (c === undefined) return;
    const i = page % SPARSE_CHUNK_PAGES;
    c[i >>> 3]! &= ~(1 << (i & 7));
  }
  test(page: number): boolean {
    const c = this.chunk(Math.floor(page / SPARSE_CHUNK_PAGES), false);
    if (c === undefined) return false;
    const i = page % SPARSE_CHUNK_PAGES;
    return (c[i >>> 3]! & (1 << (i & 7))) !== 0;
  }
  /** Set bits (bits are only ever set for pages < `pages`). */
  count(): number {
    let n = 0;
    for (const c of this.chunks.values()) {
      for (let i = 0; i < c.length; i++) {
        let v = c[i]!;
        while (v) { v &= v - 1; n++; }
      }
    }
    return n;
  }
  /** Bitmap bytes allocated so far. */
  get allocatedBytes(): number {
    return this.chunks.size * SPARSE_CHUNK_BYTES;
  }
  /**
   * The allocated chunks in file order, as [byte offset in the bitmap, bytes], clipped to the
   * bitmap's length (bitmapBytes): writing them at bitmap_offset over a region that reads zero
   * gives PageBitmap's bytes.
   */
  pieces(): [number, Uint8Array][] {
    const total = Math.ceil(this.pages / 64) * 8;
    return [...this.chunks.entries()]
      .sort((a, b) => a[0] - b[0])
      .map(([key, c]): [number, Uint8Array] => {
        const at = key * SPARSE_CHUNK_BYTES;
        return [at, c.subarray(0, Math.min(SPARSE_CHUNK_BYTES, total - at))];
      });
  }
}
