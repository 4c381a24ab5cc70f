// MappedRamWriter's two page paths (O_DIRECT from aligned slots, and buffered) must produce the
// same file: every page at pagesOffset + offset, the bitmap marking exactly the pages written.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { MappedRamWriter } from '../../src/engine/mapped-ram-writer.js';
import { decodeMappedRamHeader, PageBitmap, SparsePageBitmap } from '../../src/codec/mapped-ram.js';
import { open } from 'node:fs/promises';
import { encodeBlockEntry } from '../../src/codec/stream-encode.js';

const PAGE = 4096;
const BLOCK = 'pc.ram';
const PAGES = 1024;

interface Written {
  file: Buffer;
  direct: boolean;
  expected: Map<number, Buffer>;
  headerAt: number;
}

async function writeSample(dir: string, directIo: boolean): Promise<Written> {
  const out = join(dir, `vm-${directIo}.mig`);
  const w = await MappedRamWriter.create(out, { directIo });
  const head = Buffer.from('head-of-stream');
  await w.writeHead(head, [{ name: BLOCK, usedLength: PAGES * PAGE }]);
  const expected = new Map<number, Buffer>();
  // Packets of contiguous runs, scattered pages, views that split pages, and one call larger
  // than a direct slot (200 pages).
  const calls: number[][] = [
    Array.from({ length: 128 }, (_, i) => i),
    [500, 3, 7, 8, 9, 1000],
    Array.from({ length: 200 }, (_, i) => 300 + i),
    [3, 1023],
  ];
  for (const pages of calls) {
    const data = randomBytes(pages.length * PAGE);
    pages.forEach((p, i) => expected.set(p, data.subarray(i * PAGE, (i + 1) * PAGE)));
    // Split the payload at odd places, as socket chunks do.
    const views = [data.subarray(0, 1000), data.subarray(1000, data.length - 5000), data.subarray(data.length - 5000)].filter((v) => v.length > 0);
    await w.writePages(BLOCK, pages.map((p) => p * PAGE), pages.length, views);
  }
  w.zeroPages(BLOCK, [8 * PAGE], 0, 1);
  expected.delete(8);
  await w.appendStream([Buffer.from('tail')]);
  const direct = w.directIo;
  await w.commit();
  return { file: readFileSync(out), direct, expected, headerAt: head.length + encodeBlockEntry(BLOCK, PAGES * PAGE).length };
}

function check(r: Written, what: string): void {
  const h = decodeMappedRamHeader(r.file.subarray(r.headerAt), r.headerAt);
  const bitmap = new PageBitmap(PAGES, r.file.subarray(h.bitmapOffset, h.bitmapOffset + PAGES / 8));
  for (let p = 0; p < PAGES; p++) {
    const want = r.expected.get(p);
    assert.equal(bitmap.test(p), want !== undefined, `${what}: bitmap bit of page ${p}`);
    if (want) assert.ok(r.file.subarray(h.pagesOffset + p * PAGE, h.pagesOffset + (p + 1) * PAGE).equals(want), `${what}: bytes of page ${p}`);
  }
}

test('MappedRamWriter: direct and buffered page writes give the same pages and bitmap', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-writer-'));
  try {
    const direct = await writeSample(dir, true);
    const buffered = await writeSample(dir, false);
    assert.equal(buffered.direct, false);
    check(direct, `directIo requested (used: ${direct.direct})`);
    check(buffered, 'buffered');
    assert.equal(readdirSync(dir).filter((f) => f.includes('.partial')).length, 0, 'no temporary files left');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('MappedRamWriter: abort removes the temporary file, direct writes included', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-writer-'));
  try {
    const w = await MappedRamWriter.create(join(dir, 'vm.mig'));
    await w.writeHead(Buffer.from('h'), [{ name: BLOCK, usedLength: PAGES * PAGE }]);
    await w.writePages(BLOCK, [0, PAGE], 2, [randomBytes(2 * PAGE)]);
    await w.abort();
    assert.deepEqual(readdirSync(dir), []);
    assert.equal(existsSync(join(dir, 'vm.mig')), false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('SparsePageBitmap: its pieces written over zeros give PageBitmap bytes', () => {
  // Odd page count: the last piece is clipped to the bitmap's 64-bit words.
  const pages = 3 * 32768 + 1000;
  const dense = new PageBitmap(pages);
  const sparse = new SparsePageBitmap(pages);
  let seed = 7;
  const next = (): number => (seed = (seed * 1103515245 + 12345) % 2 ** 31) % pages;
  for (let i = 0; i < 5000; i++) {
    const p = next();
    if (i % 3 === 2) {
      dense.clear(p);
      sparse.clear(p);
    } else {
      dense.set(p);
      sparse.set(p);
    }
  }
  sparse.set(pages - 1);
  dense.set(pages - 1);
  const out = Buffer.alloc(dense.bytes.length);
  for (const [at, bytes] of sparse.pieces()) out.set(bytes, at);
  assert.ok(out.equals(dense.bytes));
  assert.equal(sparse.count(), dense.count());
  for (let p = 0; p < pages; p += 97) assert.equal(sparse.test(p), dense.test(p), `page ${p}`);
  const untouched = new SparsePageBitmap(1 << 20);
  untouched.clear(5);
  assert.equal(untouched.allocatedBytes, 0, 'clearing allocates nothing');
  assert.deepEqual(untouched.pieces(), []);
});

test('MappedRamWriter: a 1 TiB block costs bitmap memory for the pages written only, and the file reads right', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-writer-'));
  try {
    const out = join(dir, 'vm.mig');
    const used = 2 ** 40;
    const last = used / PAGE - 1;
    const w = await MappedRamWriter.create(out, { directIo: false });
    const head = Buffer.from('head-of-stream');
    await w.writeHead(head, [{ name: BLOCK, usedLength: used }]);
    const pages = [0, 40_000, last];
    const data = randomBytes(pages.length * PAGE);
    await w.writePages(BLOCK, pages.map((p) => p * PAGE), pages.length, [data]);
    w.zeroPages(BLOCK, [40_000 * PAGE], 0, 1);
    assert.equal(w.bitmap(BLOCK)!.allocatedBytes, 3 * 4096, 'three bitmap chunks, not the 32 MiB bitmap of the whole block');
    assert.equal(w.bitmap(BLOCK)!.count(), 2);
    await w.commit();
    const fh = await open(out, 'r');
    try {
      const at = head.length + encodeBlockEntry(BLOCK, used).length;
      const hb = Buffer.alloc(64);
      await fh.read(hb, 0, hb.length, at);
      const h = decodeMappedRamHeader(hb, at);
      const byteAt = async (pos: number): Promise<number> => {
        const b = Buffer.alloc(1);
        await fh.read(b, 0, 1, pos);
        return b[0]!;
      };
      assert.equal(await byteAt(h.bitmapOffset), 0b1);
      assert.equal(await byteAt(h.bitmapOffset + (40_000 >>> 3)), 0, 'the zeroed page is clear');
      assert.equal(await byteAt(h.bitmapOffset + (last >>> 3)), 0x80);
      assert.equal(await byteAt(h.bitmapOffset + 12345), 0, 'an untouched chunk reads as zero');
      const lastPage = Buffer.alloc(PAGE);
      await fh.read(lastPage, 0, PAGE, h.pagesOffset + last * PAGE);
      assert.ok(lastPage.equals(data.subarray(2 * PAGE)));
    } finally {
      await fh.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
