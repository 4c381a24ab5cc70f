// Main-channel pages staged into runs (src/engine/staged-runs.ts, MappedRamWriter.stagePage): the
// file must hold what awaiting one write per page would have left, in every order QEMU may send
// (a page sent again, an XBZRLE delta onto a page still staged), with memory bounded.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { StagedRuns } from '../../src/engine/staged-runs.js';
import { MappedRamWriter } from '../../src/engine/mapped-ram-writer.js';
import { bitmapBytes, decodeMappedRamHeader, PageBitmap } from '../../src/codec/mapped-ram.js';
import { encodeBlockEntry } from '../../src/codec/stream-encode.js';

const PAGE = 4096;

/** A file as a map of page positions, written by slow writes that check they never overlap in time. */
function fakeDisk(): { pages: Map<number, Buffer>; writes: number[]; write: (b: Buffer, at: number) => Promise<void>; maxInFlight: () => number } {
  const pages = new Map<number, Buffer>();
  const writes: number[] = [];
  let inFlight = 0;
  let max = 0;
  return {
    pages,
    writes,
    maxInFlight: () => max,
    write: async (b, at) => {
      inFlight++;
      max = Math.max(max, inFlight);
      writes.push(b.length / PAGE);
      const copy = Buffer.from(b);
      await new Promise((r) => setTimeout(r, Math.random() < 0.5 ? 0 : 1));
      for (let i = 0; i < copy.length / PAGE; i++) pages.set(at + i * PAGE, copy.subarray(i * PAGE, (i + 1) * PAGE));
      inFlight--;
    },
  };
}

function page(tag: number): Buffer {
  const b = Buffer.alloc(PAGE, tag & 0xff);
  b.writeUInt32LE(tag, 0);
  return b;
}

for (const serial of [true, false]) {
test(`StagedRuns (${serial ? 'serial' : 'concurrent'}): consecutive pages go out as runs; a page added again ends with its later bytes; find sees the newest copy`, async () => {
  const disk = fakeDisk();
  // 3 buffers of 4 pages: adds must wait for writes.
  const s = new StagedRuns(PAGE, Buffer.alloc(12 * PAGE), 3, disk.write, () => {}, serial);
  const want = new Map<number, Buffer>();
  let tag = 1;
  const add = async (p: number): Promise<void> => {
    const b = page(tag++);
    // Split at an odd place, as socket chunks are.
    const r = s.add(p * PAGE, [b.subarray(0, 100), b.subarray(100)]);
    if (r) await r;
    want.set(p * PAGE, b);
    assert.ok(s.find(p * PAGE)?.equals(b), `find sees page ${p} as last added`);
  };
  for (const p of [0, 1, 2, 3, 4, 5, 9, 10, 2, 3, 3, 7, 0, 1, 100, 101, 102, 103, 104, 3]) await add(p);
  await s.flush();
  if (serial) assert.equal(disk.maxInFlight(), 1, 'one write at a time');
  assert.deepEqual(disk.writes.slice(0, 2), [4, 2], 'runs: pages 0-3 in one write, then 4-5');
  for (const [at, b] of want) assert.ok(disk.pages.get(at)?.equals(b), `page at ${at} holds its last bytes`);
  assert.equal(disk.pages.size, want.size);
  assert.equal(s.find(0), undefined, 'nothing held once flushed');
});
}

test('StagedRuns (concurrent): buffers of disjoint ranges are written at once', async () => {
  const disk = fakeDisk();
  const s = new StagedRuns(PAGE, Buffer.alloc(4 * PAGE), 4, disk.write, () => {}, false);
  for (const p of [0, 10, 20]) await s.add(p * PAGE, [page(p)]);
  await s.flush();
  assert.equal(disk.maxInFlight(), 3);
});

test('StagedRuns: any order of adds, repeats and reads leaves the last bytes of each page (property)', async () => {
  await fc.assert(fc.asyncProperty(
    fc.array(fc.integer({ min: 0, max: 40 }), { minLength: 1, maxLength: 120 }),
    fc.integer({ min: 1, max: 4 }),
    fc.integer({ min: 1, max: 6 }),
    fc.boolean(),
    async (order, buffers, pagesPerBuffer, serial) => {
      const disk = fakeDisk();
      const s = new StagedRuns(PAGE, Buffer.alloc(buffers * pagesPerBuffer * PAGE), buffers, disk.write, () => {}, serial);
      const want = new Map<number, Buffer>();
      let tag = 1;
      for (const p of order) {
        const b = page(tag++);
        const r = s.add(p * PAGE, [b]);
        if (r) await r;
        want.set(p * PAGE, b);
        // What a reader gets: the staged copy, else the file (every write of it done).
        for (const [at, last] of want) assert.ok((s.find(at) ?? disk.pages.get(at))?.equals(last), `page at ${at} reads as last added`);
      }
      await s.flush();
      for (const [at, b] of want) assert.ok(disk.pages.get(at)?.equals(b), `page at ${at}`);
    },
  ), { numRuns: 100 });
});

test('StagedRuns: a write error is thrown by a later add and by flush; close waits for writes under way', async () => {
  let calls = 0;
  const s = new StagedRuns(PAGE, Buffer.alloc(2 * PAGE), 2, async () => {
    calls++;
    throw Object.assign(new Error('disk full'), { code: 'ENOSPC' });
  });
  // A full buffer (one page here) goes to the writer at once; its write fails meanwhile.
  await s.add(0, [page(1)]);
  await new Promise((r) => setImmediate(r));
  assert.throws(() => s.add(PAGE * 5, [page(2)]), /disk full/);
  await assert.rejects(s.flush(), /disk full/);
  await s.close(new Error('aborted'));
  assert.ok(calls >= 1);
  assert.throws(() => new StagedRuns(PAGE, Buffer.alloc(PAGE + 1), 1, async () => {}), RangeError);
  const t = new StagedRuns(PAGE, Buffer.alloc(PAGE), 1, async () => {});
  assert.throws(() => t.add(0, [Buffer.alloc(PAGE - 1)]), /4095 bytes/);
});

for (const directIo of [true, false]) {
  test(`MappedRamWriter.stagePage (${directIo ? 'O_DIRECT' : 'buffered'}): pages, repeats, zero pages and reads of staged pages give the file a per-page write would`, async () => {
    const dir = mkdtempSync(join(tmpdir(), 'multifd-staged-'));
    try {
      const out = join(dir, 'vm.mig');
      const PAGES = 3000;
      const w = await MappedRamWriter.create(out, { directIo });
      await w.writeHead(Buffer.from('head'), [{ name: 'pc.ram', usedLength: PAGES * PAGE }, { name: 'small', usedLength: 16 * PAGE }]);
      const want = new Map<string, Buffer>();
      const key = (b: string, p: number): string => `${b}/${p}`;
      const stage = async (b: string, p: number, data: Buffer): Promise<void> => {
        const r = w.stagePage(b, p * PAGE, [data]);
        if (r) await r;
        want.set(key(b, p), Buffer.from(data));
      };
      // A long run (more than all staging buffers), scattered pages, the other block.
      for (let p = 0; p < 2000; p++) await stage('pc.ram', p, randomBytes(PAGE));
      for (const p of [2500, 7, 2999, 1500]) await stage('pc.ram', p, randomBytes(PAGE));
      for (let p = 0; p < 16; p++) await stage('small', p, randomBytes(PAGE));
      // Reads as an XBZRLE delta needs them: one just staged, one long written, one zeroed.
      const scratch = Buffer.alloc(PAGE);
      for (const p of [2999, 3, 1999]) {
        const got = await w.readPage('pc.ram', p * PAGE, scratch);
        assert.ok(got.equals(want.get(key('pc.ram', p))!), `readPage ${p} gives the last bytes staged`);
        got[0]! ^= 0xff;
        await stage('pc.ram', p, got);
      }
      w.zeroPages('pc.ram', [10 * PAGE], 0, 1);
      want.delete(key('pc.ram', 10));
      assert.ok((await w.readPage('pc.ram', 10 * PAGE, scratch)).equals(Buffer.alloc(PAGE)), 'a zeroed page reads as zeros');
      await w.flushPages();
      assert.throws(() => w.stagePage('pc.ram', PAGES * PAGE, [Buffer.alloc(PAGE)]), /outside block/);
      await w.appendStream([Buffer.from('tail')]);
      await w.commit();

      // The file as the mapped-ram layout places it (docs/protocol.md §5): each block's entry,
      // its header, bitmap and pages; the next block's entry after its pages.
      const file = readFileSync(out);
      let at = 4;
      for (const [name, pages] of [['pc.ram', PAGES], ['small', 16]] as const) {
        const headerAt = at + encodeBlockEntry(name, pages * PAGE).length;
        const h = decodeMappedRamHeader(file.subarray(headerAt), headerAt);
        const bitmap = new PageBitmap(pages, file.subarray(h.bitmapOffset, h.bitmapOffset + bitmapBytes(pages * PAGE, PAGE)));
        for (let p = 0; p < pages; p++) {
          const wanted = want.get(key(name, p));
          assert.equal(bitmap.test(p), wanted !== undefined, `${name} page ${p}: bitmap bit`);
          if (wanted) assert.ok(file.subarray(h.pagesOffset + p * PAGE, h.pagesOffset + (p + 1) * PAGE).equals(wanted), `${name} page ${p}`);
        }
        at = h.pagesOffset + pages * PAGE;
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
}
