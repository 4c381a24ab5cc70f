// The packed snapshot layout (docs/s3-layout.md): a mapped-ram snapshot as one object with no
// holes. An object store has no sparse objects, so a mapped-ram file's pages regions (mostly
// holes in a guest that has touched little of its RAM) are replaced by the present pages packed
// in bitmap order. A page's place is the rank of its bit (set bits before it), so any page is
// still one ranged GET away and the object's size follows the pages present.
//
//   preamble (64 bytes) | block index | skeleton | zero padding to pageSize | packed pages
//
// The skeleton is the mapped-ram file with every block's cut [end of its bitmap, pages_offset +
// used_length) taken out: the alignment padding before the pages (up to 1 MiB of zeros per block)
// and the pages region. What stays is byte for byte the stream header, configuration, block list
// with mapped-ram headers, bitmaps and the device state. The index says where the cuts were, so
// the original file is rebuilt exactly (padding zero, pages regions filled from the packed pages,
// holes where bits are clear). A CRC-32 covers preamble, index and skeleton; page bytes are not checksummed
// (a mapped-ram file has no checksum over them either).

import { ProtocolError } from './errors.js';

export const PACKED_MAGIC = Buffer.from('MFDPACK\n', 'latin1');
export const PACKED_VERSION = 1;
export const PACKED_PREAMBLE_SIZE = 64;
/** Index entry bytes besides the name: used_length, pages_offset, bitmap_offset, first_rank, present. */
const ENTRY_FIXED = 1 + 5 * 8;
/** A name is a counted string of at most 255 bytes, as in the migration stream's block list. */
const MAX_BLOCKS = 4096;

export interface PackedBlock {
  name: string;
  usedLength: number;
  /** Offsets in the mapped-ram file the object expands to. */
  pagesOffset: number;
  bitmapOffset: number;
  /** Packed-page index of the block's first present page (present pages of earlier blocks). */
  firstRank: number;
  present: number;
}

export interface PackedPreamble {
  version: number;
  pageSize: number;
  indexLength: number;
  blockCount: number;
  skeletonLength: number;
  /** Object offset of the first packed page (a multiple of pageSize). */
  pagesOffset: number;
  presentPages: number;
  /** Size of the mapped-ram file the object expands to. */
  fileSize: number;
  crc: number;
}

export interface PackedLayout extends PackedPreamble {
  blocks: PackedBlock[];
  /** Object offset of the skeleton. */
  skeletonOffset: number;
  /** The object's exact size. */
  objectSize: number;
}

// ---------------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, as zlib's crc32), table driven: the codec layer does no I/O and needs no zlib.

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32(data: Uint8Array, seed = 0): number {
  let c = ~seed >>> 0;
  for (let i = 0; i < data.length; i++) c = CRC_TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

// ---------------------------------------------------------------------------------------------
// Popcount and the per-block rank index.

const POP8 = (() => {
  const t = new Uint8Array(256);
  for (let i = 1; i < 256; i++) t[i] = (i & 1) + t[i >> 1]!;
  return t;
})();

/** Set bits among the first `pages` bits of an LSB-first bitmap (mapped-ram's, see PageBitmap). */
export function countBits(bitmap: Uint8Array, pages: number): number {
  const full = pages >>> 3;
  let n = 0;
  for (let i = 0; i < full; i++) n += POP8[bitmap[i]!]!;
  const rest = pages & 7;
  if (rest) n += POP8[bitmap[full]! & ((1 << rest) - 1)]!;
  return n;
}

/** Bitmap bytes per rank-index entry: 512 pages, so a lookup adds at most 63 byte popcounts. */
const RANK_STRIDE_BYTES = 64;
const RANK_STRIDE_PAGES = RANK_STRIDE_BYTES * 8;

/**
 * rank(page) = set bits before `page`, in O(1): cumulative popcounts every 512 pages (one
 * Uint32 per 2 MiB of guest RAM, 8 KiB per 4 GiB), computed once when the bitmap is loaded.
 */
export class RankIndex {
  private readonly cumulative: Uint32Array;
  readonly total: number;

  constructor(private readonly bitmap: Uint8Array, readonly pages: number) {
    if (bitmap.length * 8 < pages) throw new RangeError(`bitmap of ${bitmap.length} bytes is too short for ${pages} pages`);
    const strides = Math.ceil(pages / RANK_STRIDE_PAGES) + 1;
    this.cumulative = new Uint32Array(strides);
    let n = 0;
    for (let s = 0; s < strides - 1; s++) {
      this.cumulative[s] = n;
      const end = Math.min(pages, (s + 1) * RANK_STRIDE_PAGES);
      for (let p = s * RANK_STRIDE_PAGES; p < end; p += 8) {
        const byte = bitmap[p >>> 3]!;
        n += end - p >= 8 ? POP8[byte]! : POP8[byte & ((1 << (end - p)) - 1)]!;
      }
    }
    this.cumulative[strides - 1] = n;
    this.total = n;
  }

  test(page: number): boolean {
    return (this.bitmap[page >>> 3]! & (1 << (page & 7))) !== 0;
  }

  /** Set bits before `page` (0 ≤ page ≤ pages). */
  rank(page: number): number {
    if (!(page >= 0 && page <= this.pages)) throw new RangeError(`page ${page} outside 0..${this.pages}`);
    const s = Math.floor(page / RANK_STRIDE_PAGES);
    let n = this.cumulative[s]!;
    const lastByte = page >>> 3;
    for (let i = s * RANK_STRIDE_BYTES; i < lastByte; i++) n += POP8[this.bitmap[i]!]!;
    if (page & 7) n += POP8[this.bitmap[lastByte]! & ((1 << (page & 7)) - 1)]!;
    return n;
  }
}

// ---------------------------------------------------------------------------------------------
// Encoding.

export interface PackedBlockInput {
  name: string;
  usedLength: number;
  pagesOffset: number;
  bitmapOffset: number;
  /** The block's bitmap bytes (LSB-first, as in the file). */
  bitmap: Uint8Array;
}

/**
 * Everything before the packed pages: preamble, index, skeleton, padding. `skeleton` is the
 * mapped-ram file of `fileSize` bytes with the blocks' cuts (cutStart .. pages region's end)
 * taken out, in file order; the caller has checked that the padding in each cut is zero.
 */
/** Where a block's cut starts: the end of its bitmap (the padding after it is zero in the file). */
export function cutStart(b: { bitmapOffset: number; usedLength: number }, pageSize: number): number {
  return b.bitmapOffset + Math.ceil(b.usedLength / pageSize / 64) * 8;
}

export function encodePackedPrefix(opts: { pageSize: number; fileSize: number; blocks: readonly PackedBlockInput[]; skeleton: readonly Buffer[] }): { prefix: Buffer; layout: PackedLayout } {
  const { pageSize, fileSize } = opts;
  if (opts.blocks.length > MAX_BLOCKS) throw new RangeError(`more than ${MAX_BLOCKS} blocks`);
  const entries: Buffer[] = [];
  const blocks: PackedBlock[] = [];
  let rank = 0;
  for (const b of opts.blocks) {
    const name = Buffer.from(b.name, 'latin1');
    if (name.length === 0 || name.length > 255) throw new RangeError(`block name "${b.name}" must be 1..255 bytes`);
    const present = countBits(b.bitmap, b.usedLength / pageSize);
    const e = Buffer.alloc(ENTRY_FIXED + name.length);
    e.writeUInt8(name.length, 0);
    name.copy(e, 1);
    let o = 1 + name.length;
    for (const v of [b.usedLength, b.pagesOffset, b.bitmapOffset, rank, present]) {
      e.writeBigUInt64BE(BigInt(v), o);
      o += 8;
    }
    entries.push(e);
    blocks.push({ name: b.name, usedLength: b.usedLength, pagesOffset: b.pagesOffset, bitmapOffset: b.bitmapOffset, firstRank: rank, present });
    rank += present;
  }
  const index = Buffer.concat(entries);
  const skeleton = Buffer.concat(opts.skeleton);
  const skeletonOffset = PACKED_PREAMBLE_SIZE + index.length;
  const pagesOffset = Math.ceil((skeletonOffset + skeleton.length) / pageSize) * pageSize;
  const pre = Buffer.alloc(PACKED_PREAMBLE_SIZE);
  PACKED_MAGIC.copy(pre, 0);
  pre.writeUInt32BE(PACKED_VERSION, 8);
  pre.writeUInt32BE(pageSize, 12);
  pre.writeUInt32BE(index.length, 16);
  pre.writeUInt32BE(blocks.length, 20);
  pre.writeBigUInt64BE(BigInt(skeleton.length), 24);
  pre.writeBigUInt64BE(BigInt(pagesOffset), 32);
  pre.writeBigUInt64BE(BigInt(rank), 40);
  pre.writeBigUInt64BE(BigInt(fileSize), 48);
  const crc = crc32(skeleton, crc32(index, crc32(pre.subarray(0, 56))));
  pre.writeUInt32BE(crc, 56);
  const prefix = Buffer.alloc(pagesOffset);
  pre.copy(prefix, 0);
  index.copy(prefix, PACKED_PREAMBLE_SIZE);
  skeleton.copy(prefix, skeletonOffset);
  const layout: PackedLayout = {
    version: PACKED_VERSION, pageSize, indexLength: index.length, blockCount: blocks.length, skeletonLength: skeleton.length,
    pagesOffset, presentPages: rank, fileSize, crc, blocks, skeletonOffset, objectSize: pagesOffset + rank * pageSize,
  };
  validateLayout(layout);
  return { prefix, layout };
}

// ---------------------------------------------------------------------------------------------
// Decoding. Every check names what is wrong and the object offset it was found at.

function u64(b: Buffer, at: number, what: string, base: number): number {
  const v = b.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('BAD_PACKED', `${what} 0x${v.toString(16)} is too large`, { offset: base + at });
  return Number(v);
}

/** True when `b` starts with the packed layout's magic. */
export function isPacked(b: Buffer): boolean {
  return b.length >= PACKED_MAGIC.length && b.subarray(0, PACKED_MAGIC.length).equals(PACKED_MAGIC);
}

/** The 64-byte preamble; `objectSize` (when known) is checked against the size it implies. */
export function decodePackedPreamble(b: Buffer, objectSize?: number): PackedPreamble {
  if (b.length < PACKED_PREAMBLE_SIZE) throw new ProtocolError('TRUNCATED', `packed snapshot preamble truncated: ${b.length} of ${PACKED_PREAMBLE_SIZE} bytes`, { offset: b.length });
  if (!isPacked(b)) throw new ProtocolError('BAD_MAGIC', `not a packed snapshot (magic ${b.subarray(0, 8).toString('hex')}, expected ${PACKED_MAGIC.toString('hex')})`, { offset: 0 });
  const version = b.readUInt32BE(8);
  if (version !== PACKED_VERSION) throw new ProtocolError('BAD_VERSION', `packed snapshot version ${version} (supported: ${PACKED_VERSION})`, { offset: 8 });
  const pageSize = b.readUInt32BE(12);
  if (pageSize < 512 || pageSize > 65536 || (pageSize & (pageSize - 1)) !== 0) throw new ProtocolError('BAD_PACKED', `page size ${pageSize} is not a power of two in 512..65536`, { offset: 12 });
  const indexLength = b.readUInt32BE(16);
  const blockCount = b.readUInt32BE(20);
  if (blockCount > MAX_BLOCKS) throw new ProtocolError('LIMIT_EXCEEDED', `${blockCount} blocks (at most ${MAX_BLOCKS})`, { offset: 20 });
  if (indexLength < blockCount * (ENTRY_FIXED + 1) || indexLength > blockCount * (ENTRY_FIXED + 255)) {
    throw new ProtocolError('BAD_PACKED', `index length ${indexLength} does not fit ${blockCount} blocks`, { offset: 16 });
  }
  const skeletonLength = u64(b, 24, 'skeleton length', 0);
  const pagesOffset = u64(b, 32, 'pages offset', 0);
  const presentPages = u64(b, 40, 'present page count', 0);
  const fileSize = u64(b, 48, 'file size', 0);
  const crc = b.readUInt32BE(56);
  if (b.readUInt32BE(60) !== 0) throw new ProtocolError('BAD_PACKED', `reserved preamble word is 0x${b.readUInt32BE(60).toString(16)}, not 0`, { offset: 60 });
  const skeletonEnd = PACKED_PREAMBLE_SIZE + indexLength + skeletonLength;
  if (pagesOffset % pageSize !== 0 || pagesOffset < skeletonEnd || pagesOffset - skeletonEnd >= pageSize) {
    throw new ProtocolError('BAD_PACKED', `pages offset 0x${pagesOffset.toString(16)} is not the first page boundary after the skeleton (ends at 0x${skeletonEnd.toString(16)})`, { offset: 32 });
  }
  if (skeletonLength > fileSize) throw new ProtocolError('BAD_PACKED', `skeleton of ${skeletonLength} bytes is larger than the file (${fileSize})`, { offset: 24 });
  const size = pagesOffset + presentPages * pageSize;
  if (!Number.isSafeInteger(size)) throw new ProtocolError('BAD_PACKED', 'object size overflows', { offset: 40 });
  if (objectSize !== undefined && objectSize !== size) {
    throw new ProtocolError(objectSize < size ? 'TRUNCATED' : 'BAD_PACKED',
      `object is ${objectSize} bytes, its preamble says ${size} (${presentPages} pages from 0x${pagesOffset.toString(16)})${objectSize < size ? ': truncated' : ''}`,
      { offset: Math.min(objectSize, size) });
  }
  return { version, pageSize, indexLength, blockCount, skeletonLength, pagesOffset, presentPages, fileSize, crc };
}

/** Bytes from the object's start that decodePackedLayout needs (preamble, index, skeleton). */
export function packedPrefixLength(p: PackedPreamble): number {
  return PACKED_PREAMBLE_SIZE + p.indexLength + p.skeletonLength;
}

/**
 * The whole layout from the object's first packedPrefixLength() bytes: checks the CRC, the index
 * and that every block's cut and bitmap fit the file; the bitmaps' popcounts are checked by
 * checkBitmaps once the caller has them (they live in the skeleton).
 */
export function decodePackedLayout(b: Buffer, objectSize?: number): PackedLayout {
  const pre = decodePackedPreamble(b, objectSize);
  const need = packedPrefixLength(pre);
  if (b.length < need) throw new ProtocolError('TRUNCATED', `packed snapshot prefix truncated: ${b.length} of ${need} bytes`, { offset: b.length });
  const crc = crc32(b.subarray(PACKED_PREAMBLE_SIZE, need), crc32(b.subarray(0, 56)));
  if (crc !== pre.crc) throw new ProtocolError('BAD_PACKED', `checksum mismatch over the first ${need} bytes (stored 0x${pre.crc.toString(16)}, computed 0x${crc.toString(16)}): the object is corrupt`, { offset: 56 });
  const blocks: PackedBlock[] = [];
  let at = PACKED_PREAMBLE_SIZE;
  const end = PACKED_PREAMBLE_SIZE + pre.indexLength;
  for (let i = 0; i < pre.blockCount; i++) {
    const len = b.readUInt8(at);
    if (len === 0 || at + ENTRY_FIXED + len > end) throw new ProtocolError('BAD_PACKED', `index entry ${i} overruns the index`, { offset: at });
    const name = b.toString('latin1', at + 1, at + 1 + len);
    let o = at + 1 + len;
    const f = (what: string): number => {
      const v = u64(b, o, `block "${name}" ${what}`, 0);
      o += 8;
      return v;
    };
    blocks.push({ name, usedLength: f('used_length'), pagesOffset: f('pages_offset'), bitmapOffset: f('bitmap_offset'), firstRank: f('first rank'), present: f('present pages') });
    at = o;
  }
  if (at !== end) throw new ProtocolError('BAD_PACKED', `index has ${end - at} stray bytes after ${pre.blockCount} entries`, { offset: at });
  const layout: PackedLayout = { ...pre, blocks, skeletonOffset: end, objectSize: pre.pagesOffset + pre.presentPages * pre.pageSize };
  validateLayout(layout);
  return layout;
}

function validateLayout(l: PackedLayout): void {
  let rank = 0;
  let cut = 0;
  let fileCursor = 0;
  const names = new Set<string>();
  l.blocks.forEach((b, i) => {
    const at = { offset: PACKED_PREAMBLE_SIZE };
    const bad = (msg: string): never => { throw new ProtocolError('BAD_PACKED', `block ${i} "${b.name}": ${msg}`, at); };
    if (names.has(b.name)) bad('listed twice');
    names.add(b.name);
    if (b.usedLength % l.pageSize !== 0) bad(`used_length 0x${b.usedLength.toString(16)} is not page aligned`);
    if (b.pagesOffset % l.pageSize !== 0) bad(`pages_offset 0x${b.pagesOffset.toString(16)} is not page aligned`);
    if (b.firstRank !== rank) bad(`first rank ${b.firstRank}, expected ${rank}`);
    if (b.present > b.usedLength / l.pageSize) bad(`${b.present} present pages in a block of ${b.usedLength / l.pageSize}`);
    if (b.pagesOffset < fileCursor) bad(`pages region at 0x${b.pagesOffset.toString(16)} overlaps the previous one`);
    const bitmapEnd = cutStart(b, l.pageSize);
    if (b.bitmapOffset < fileCursor || bitmapEnd > b.pagesOffset) bad(`bitmap [0x${b.bitmapOffset.toString(16)}, 0x${bitmapEnd.toString(16)}) is not between the previous pages region and its own`);
    if (b.pagesOffset + b.usedLength > l.fileSize) bad(`pages region ends at 0x${(b.pagesOffset + b.usedLength).toString(16)}, beyond the file (0x${l.fileSize.toString(16)})`);
    rank += b.present;
    cut += b.pagesOffset + b.usedLength - bitmapEnd;
    fileCursor = b.pagesOffset + b.usedLength;
  });
  if (rank !== l.presentPages) throw new ProtocolError('BAD_PACKED', `blocks hold ${rank} present pages, the preamble says ${l.presentPages}`, { offset: 40 });
  if (l.fileSize - cut !== l.skeletonLength) throw new ProtocolError('BAD_PACKED', `skeleton is ${l.skeletonLength} bytes, the file minus its cuts is ${l.fileSize - cut}`, { offset: 24 });
}

/** File offset → skeleton offset; throws for an offset inside a cut (padding or pages region). */
export function skeletonOffsetOf(l: PackedLayout, fileOffset: number): number {
  let removed = 0;
  for (const b of l.blocks) {
    const from = cutStart(b, l.pageSize);
    if (fileOffset < from) break;
    if (fileOffset < b.pagesOffset + b.usedLength) throw new RangeError(`file offset 0x${fileOffset.toString(16)} lies in block "${b.name}"'s padding or pages region`);
    removed += b.pagesOffset + b.usedLength - from;
  }
  return fileOffset - removed;
}

export type FilePiece = { fileOffset: number; length: number } & ({ kind: 'skeleton'; skeletonOffset: number } | { kind: 'zero' } | { kind: 'pages'; block: PackedBlock });

/**
 * The pieces of the file in order: skeleton spans, the zero padding before each pages region,
 * and the pages regions; how the file is rebuilt and how a reader skips the regions.
 */
export function filePieces(l: PackedLayout): FilePiece[] {
  const out: FilePiece[] = [];
  let file = 0;
  let skel = 0;
  for (const b of l.blocks) {
    const from = cutStart(b, l.pageSize);
    if (from > file) out.push({ kind: 'skeleton', fileOffset: file, length: from - file, skeletonOffset: skel });
    skel += from - file;
    if (b.pagesOffset > from) out.push({ kind: 'zero', fileOffset: from, length: b.pagesOffset - from });
    out.push({ kind: 'pages', fileOffset: b.pagesOffset, length: b.usedLength, block: b });
    file = b.pagesOffset + b.usedLength;
  }
  if (l.fileSize > file) out.push({ kind: 'skeleton', fileOffset: file, length: l.fileSize - file, skeletonOffset: skel });
  return out;
}

/**
 * Each block's bitmap out of the skeleton, with its rank index; fails when a bitmap's popcount
 * is not the index's present count (the packed pages would be misplaced).
 */
export function blockBitmaps(l: PackedLayout, skeleton: Buffer): Map<string, { block: PackedBlock; bitmap: Buffer; rank: RankIndex }> {
  if (skeleton.length !== l.skeletonLength) throw new ProtocolError('TRUNCATED', `skeleton is ${skeleton.length} bytes, expected ${l.skeletonLength}`, { offset: l.skeletonOffset });
  const out = new Map<string, { block: PackedBlock; bitmap: Buffer; rank: RankIndex }>();
  for (const b of l.blocks) {
    const pages = b.usedLength / l.pageSize;
    const at = skeletonOffsetOf(l, b.bitmapOffset);
    const bitmap = skeleton.subarray(at, at + Math.ceil(pages / 64) * 8);
    const rank = new RankIndex(bitmap, pages);
    if (rank.total !== b.present) {
      throw new ProtocolError('BAD_PACKED', `block "${b.name}" bitmap has ${rank.total} set bits, the index says ${b.present}`, { offset: l.skeletonOffset + at });
    }
    out.set(b.name, { block: b, bitmap, rank });
  }
  return out;
}

/** Object offset of a present page's bytes. */
export function packedPageOffset(l: PackedLayout, block: PackedBlock, rank: number): number {
  return l.pagesOffset + (block.firstRank + rank) * l.pageSize;
}
