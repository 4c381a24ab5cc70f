// The packed snapshot layout (codec/packed-snapshot.ts): rank lookups agree with counting,
// encode/decode round trips, the file rebuilt from an object is the original byte for byte, and
// malformed objects (truncated, flipped bytes, wrong sizes) fail with a code and an offset.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ProtocolError } from '../../src/codec/errors.js';
import {
  blockBitmaps, countBits, crc32, cutStart, decodePackedLayout, decodePackedPreamble, encodePackedPrefix, filePieces,
  packedPageOffset, packedPrefixLength, RankIndex, skeletonOffsetOf, PACKED_PREAMBLE_SIZE, type PackedLayout,
} from '../../src/codec/packed-snapshot.js';

const PAGE = 4096;

function naiveRank(bm: Uint8Array, page: number): number {
  let n = 0;
  for (let p = 0; p < page; p++) if (bm[p >>> 3]! & (1 << (p & 7))) n++;
  return n;
}

const bitmapArb = fc.integer({ min: 1, max: 3000 }).chain((pages) =>
  fc.tuple(fc.constant(pages), fc.uint8Array({ minLength: Math.ceil(pages / 64) * 8, maxLength: Math.ceil(pages / 64) * 8 }), fc.integer({ min: 0, max: pages })));

/** A mapped-ram-like file: per block a 64-byte header area, its bitmap, a page-aligned pages region; then a tail. */
interface FakeFile { file: Buffer; blocks: { name: string; usedLength: number; pagesOffset: number; bitmapOffset: number; bitmap: Buffer }[] }

function fakeFile(specs: { pages: number; bits: Uint8Array; seed: number }[], tail: Buffer): FakeFile {
  const parts: Buffer[] = [];
  let at = 0;
  const push = (b: Buffer): void => { parts.push(b); at += b.length; };
  push(Buffer.from('QEVM head bytes'));
  const blocks: FakeFile['blocks'] = [];
  specs.forEach((s, i) => {
    push(Buffer.alloc(64, 0x40 + i));
    const bitmap = Buffer.alloc(Math.ceil(s.pages / 64) * 8);
    Buffer.from(s.bits).copy(bitmap);
    // Bits beyond `pages` in the last word are padding: clear them as QEMU does.
    for (let p = s.pages; p < bitmap.length * 8; p++) bitmap[p >>> 3]! &= ~(1 << (p & 7));
    const bitmapOffset = at;
    push(bitmap);
    push(Buffer.alloc(Math.ceil(at / PAGE) * PAGE - at));
    const pagesOffset = at;
    const region = Buffer.alloc(s.pages * PAGE);
    for (let p = 0; p < s.pages; p++) {
      if (bitmap[p >>> 3]! & (1 << (p & 7))) region.fill((p * 7 + s.seed) & 0xff, p * PAGE, p * PAGE + 16).writeUInt32BE(p, p * PAGE + 16);
    }
    push(region);
    blocks.push({ name: `block${i}`, usedLength: s.pages * PAGE, pagesOffset, bitmapOffset, bitmap });
  });
  push(tail);
  return { file: Buffer.concat(parts), blocks };
}

function pack(f: FakeFile): { object: Buffer; layout: PackedLayout } {
  const skeleton: Buffer[] = [];
  let cursor = 0;
  for (const b of f.blocks) {
    skeleton.push(f.file.subarray(cursor, cutStart(b, PAGE)));
    cursor = b.pagesOffset + b.usedLength;
  }
  skeleton.push(f.file.subarray(cursor));
  const { prefix, layout } = encodePackedPrefix({ pageSize: PAGE, fileSize: f.file.length, blocks: f.blocks, skeleton });
  const pages: Buffer[] = [];
  for (const b of f.blocks) {
    for (let p = 0; p < b.usedLength / PAGE; p++) {
      if (b.bitmap[p >>> 3]! & (1 << (p & 7))) pages.push(f.file.subarray(b.pagesOffset + p * PAGE, b.pagesOffset + (p + 1) * PAGE));
    }
  }
  return { object: Buffer.concat([prefix, ...pages]), layout };
}

/** The file an object expands to, rebuilt only through the codec's description of it. */
function expand(object: Buffer): Buffer {
  const l = decodePackedLayout(object, object.length);
  const skeleton = object.subarray(l.skeletonOffset, l.skeletonOffset + l.skeletonLength);
  const bitmaps = blockBitmaps(l, skeleton);
  const out = Buffer.alloc(l.fileSize);
  for (const piece of filePieces(l)) {
    if (piece.kind === 'skeleton') {
      skeleton.copy(out, piece.fileOffset, piece.skeletonOffset, piece.skeletonOffset + piece.length);
      continue;
    }
    if (piece.kind === 'zero') continue;
    const { rank } = bitmaps.get(piece.block.name)!;
    for (let p = 0; p < rank.pages; p++) {
      if (!rank.test(p)) continue;
      const at = packedPageOffset(l, piece.block, rank.rank(p));
      object.copy(out, piece.fileOffset + p * PAGE, at, at + PAGE);
    }
  }
  return out;
}

function expectProtocolError(fn: () => unknown, code?: string): ProtocolError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ProtocolError, `expected a ProtocolError, got ${String(e)}`);
    if (code) assert.equal(e.code, code, e.message);
    assert.equal(typeof e.offset, 'number', `no offset in "${e.message}"`);
    return e;
  }
  assert.fail('no error');
}

const fileArb = fc.tuple(
  fc.array(fc.integer({ min: 1, max: 700 }).chain((pages) => fc.record({
    pages: fc.constant(pages),
    bits: fc.uint8Array({ minLength: Math.ceil(pages / 8), maxLength: Math.ceil(pages / 8) }),
    seed: fc.integer({ min: 0, max: 255 }),
  })), { minLength: 1, maxLength: 3 }),
  fc.uint8Array({ maxLength: 3000 }),
).map(([specs, tail]) => fakeFile(specs, Buffer.from(tail)));

describe('packed snapshot layout', () => {
  test('crc32 matches the IEEE check value', () => {
    assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
    assert.equal(crc32(Buffer.from('6789'), crc32(Buffer.from('12345'))), 0xcbf43926);
  });

  test('rank(page) is the number of set bits before the page', () => {
    fc.assert(fc.property(bitmapArb, ([pages, bm, page]) => {
      const r = new RankIndex(bm, pages);
      assert.equal(r.rank(page), naiveRank(bm, page));
      assert.equal(r.total, countBits(bm, pages));
      assert.equal(r.total, naiveRank(bm, pages));
    }), { numRuns: 300 });
  });

  test('rank index on a large all-set bitmap: O(1) per lookup, exact at stride edges', () => {
    const pages = 1 << 20; // 4 GiB of guest RAM
    const bm = new Uint8Array(pages / 8).fill(0xff);
    const r = new RankIndex(bm, pages);
    for (const p of [0, 1, 511, 512, 513, 4095, 4096, pages - 1, pages]) assert.equal(r.rank(p), p);
    assert.throws(() => r.rank(pages + 1), RangeError);
  });

  test('round trip: the object expands to the original file, byte for byte', () => {
    fc.assert(fc.property(fileArb, (f) => {
      const { object, layout } = pack(f);
      const present = f.blocks.reduce((n, b) => n + countBits(b.bitmap, b.usedLength / PAGE), 0);
      assert.equal(object.length, layout.pagesOffset + present * PAGE, 'object size follows the pages present');
      assert.equal(layout.pagesOffset % PAGE, 0);
      assert.ok(expand(object).equals(f.file));
      const d = decodePackedLayout(object.subarray(0, packedPrefixLength(decodePackedPreamble(object))), object.length);
      assert.deepEqual(d.blocks, layout.blocks);
    }), { numRuns: 150 });
  });

  test('a 1 GiB block with 10 present pages is an object of prefix + 10 pages', () => {
    const pages = 262144;
    const bits = new Uint8Array(pages / 8);
    for (const p of [0, 1, 2, 1000, 70000, 70001, 200000, 262140, 262141, 262143]) bits[p >>> 3]! |= 1 << (p & 7);
    // Build the 1 GiB file's layout without materialising its pages region.
    const bitmap = Buffer.from(bits);
    const pagesOffset = 0x100000;
    const skeleton = [Buffer.alloc(0x1000 + bitmap.length, 1), Buffer.from('device state')];
    const { prefix, layout } = encodePackedPrefix({ pageSize: PAGE, fileSize: pagesOffset + pages * PAGE + 12, blocks: [{ name: 'pc.ram', usedLength: pages * PAGE, pagesOffset, bitmapOffset: 0x1000, bitmap }], skeleton });
    assert.equal(layout.objectSize, prefix.length + 10 * PAGE);
    Buffer.from(bitmap).copy(prefix, layout.skeletonOffset + 0x1000);
    // The bitmap was written into the skeleton after the CRC: decoding must notice.
    expectProtocolError(() => decodePackedLayout(prefix), 'BAD_PACKED');
  });

  test('skeletonOffsetOf refuses offsets inside pages regions', () => {
    const f = fakeFile([{ pages: 3, bits: new Uint8Array([7]), seed: 1 }], Buffer.from('x'));
    const { layout } = pack(f);
    const b = layout.blocks[0]!;
    assert.equal(skeletonOffsetOf(layout, b.bitmapOffset), b.bitmapOffset);
    assert.equal(skeletonOffsetOf(layout, b.pagesOffset + b.usedLength), cutStart(b, PAGE));
    assert.throws(() => skeletonOffsetOf(layout, b.pagesOffset), /pages region/);
    assert.throws(() => skeletonOffsetOf(layout, cutStart(b, PAGE)), /padding/);
  });
});

describe('malformed packed objects', () => {
  const f = fakeFile([{ pages: 40, bits: new Uint8Array([0xff, 0, 0x0f, 0x80, 1]), seed: 3 }, { pages: 9, bits: new Uint8Array([0x55, 1]), seed: 4 }], Buffer.from('device state and vmdesc'));
  const { object } = pack(f);
  const prefixLen = packedPrefixLength(decodePackedPreamble(object));

  test('wrong magic, version, page size', () => {
    const m = Buffer.from(object);
    m[0] = 0x51;
    assert.equal(expectProtocolError(() => decodePackedLayout(m), 'BAD_MAGIC').offset, 0);
    const v = Buffer.from(object);
    v.writeUInt32BE(2, 8);
    assert.equal(expectProtocolError(() => decodePackedLayout(v), 'BAD_VERSION').offset, 8);
    const p = Buffer.from(object);
    p.writeUInt32BE(3000, 12);
    assert.equal(expectProtocolError(() => decodePackedLayout(p), 'BAD_PACKED').offset, 12);
  });

  test('every truncation of the prefix fails with TRUNCATED at the length it has', () => {
    for (let n = 0; n < prefixLen; n += n < 128 ? 1 : 7) {
      const e = expectProtocolError(() => decodePackedLayout(object.subarray(0, n)), 'TRUNCATED');
      assert.equal(e.offset, n);
    }
  });

  test('a truncated object is told by its size', () => {
    for (const size of [object.length - 1, object.length - PAGE, prefixLen]) {
      const e = expectProtocolError(() => decodePackedLayout(object, size), 'TRUNCATED');
      assert.match(e.message, /truncated/);
      assert.equal(e.offset, size);
    }
    expectProtocolError(() => decodePackedLayout(object, object.length + 1), 'BAD_PACKED');
  });

  test('any flipped byte before the pages is detected', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: prefixLen - 1 }), fc.integer({ min: 1, max: 255 }), (at, x) => {
      const c = Buffer.from(object);
      c[at]! ^= x;
      expectProtocolError(() => {
        const l = decodePackedLayout(c, c.length);
        blockBitmaps(l, c.subarray(l.skeletonOffset, l.skeletonOffset + l.skeletonLength));
      });
    }), { numRuns: 400 });
  });

  test('an index that lies consistently (CRC recomputed) is still refused', () => {
    const lie = (mutate: (b: Buffer) => void): Buffer => {
      const c = Buffer.from(object.subarray(0, prefixLen));
      mutate(c);
      const crc = crc32(c.subarray(PACKED_PREAMBLE_SIZE, prefixLen), crc32(c.subarray(0, 56)));
      c.writeUInt32BE(crc, 56);
      return c;
    };
    // First block's present count (name "block0": 1 + 6 bytes, then 4 u64 before it).
    const presentAt = PACKED_PREAMBLE_SIZE + 1 + 6 + 4 * 8;
    expectProtocolError(() => decodePackedLayout(lie((b) => b.writeBigUInt64BE(1n, presentAt))), 'BAD_PACKED');
    // Pages region moved beyond the file.
    expectProtocolError(() => decodePackedLayout(lie((b) => b.writeBigUInt64BE(1n << 40n, PACKED_PREAMBLE_SIZE + 7 + 8))), 'BAD_PACKED');
    // Block count larger than the index holds.
    expectProtocolError(() => decodePackedLayout(lie((b) => b.writeUInt32BE(3, 20))), 'BAD_PACKED');
    // Present counts moved between blocks keep the total but not the bitmaps.
    const l = decodePackedLayout(object);
    const second = PACKED_PREAMBLE_SIZE + 7 + 5 * 8 + 7;
    const shifted = lie((b) => {
      b.writeBigUInt64BE(BigInt(l.blocks[0]!.present - 1), presentAt);
      b.writeBigUInt64BE(BigInt(l.blocks[1]!.firstRank - 1), second + 3 * 8);
      b.writeBigUInt64BE(BigInt(l.blocks[1]!.present + 1), second + 4 * 8);
    });
    const dl = decodePackedLayout(shifted);
    expectProtocolError(() => blockBitmaps(dl, shifted.subarray(dl.skeletonOffset, dl.skeletonOffset + dl.skeletonLength)), 'BAD_PACKED');
  });
});
