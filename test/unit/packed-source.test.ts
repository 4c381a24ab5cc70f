// A packed object read through PackedSnapshot is the mapped-ram file it was packed from: QEMU's own
// mapped-ram files (golden captures, QEMU 10 and 11) packed by packedParts at awkward part sizes,
// read from memory through the RangeReader interface, compared with MappedRamSnapshot on the file.
// Also: sequential reads coalesce into chunk GETs, out-of-order reads go through read-around
// windows, and a truncated or corrupted object fails at open.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { PackedSnapshot, type RangeReader } from '../../src/engine/packed-snapshot-source.js';
import { packedParts, packedPrefixOf } from '../../src/engine/packed-snapshot-writer.js';
import { loadGz } from '../helpers/fixtures.js';

class MemoryObject implements RangeReader {
  reads: [number, number][] = [];
  constructor(readonly name: string, private readonly bytes: Buffer, readonly size = bytes.length) {}
  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    if (position + length > this.size) throw new Error(`read beyond ${this.size}`);
    this.reads.push([position, length]);
    const out = into ?? Buffer.alloc(length);
    this.bytes.copy(out, 0, position, position + length);
    return out;
  }
}

async function pack(file: string, partSize: number): Promise<{ object: Buffer; parts: number; file: MappedRamSnapshot }> {
  const src = await MappedRamSnapshot.open(file, { directIo: false });
  const { prefix, layout } = await packedPrefixOf(src);
  const parts: Buffer[] = [];
  for await (const p of packedParts(src, prefix, layout, partSize)) parts.push(p);
  for (const p of parts.slice(0, -1)) assert.equal(p.length, partSize);
  const object = Buffer.concat(parts);
  assert.equal(object.length, layout.objectSize);
  return { object, parts: parts.length, file: src };
}

for (const version of ['10.0', '11.1'] as const) {
  describe(`packed object of QEMU ${version}'s mapped-ram file`, () => {
    const dir = mkdtempSync('/tmp/multifd-packed-');
    const path = join(dir, 'file.mig');
    const bytes = loadGz(`qemu-${version}/mapped-ram-file/file.mig.gz`);
    writeFileSync(path, bytes);

    test('reads back as the file: stream, device state, every page, every byte', async () => {
      for (const partSize of [TARGET_PAGE_SIZE, 5 * TARGET_PAGE_SIZE, 1024 * 1024]) {
        const { object, file } = await pack(path, partSize);
        try {
          const obj = new MemoryObject('mem://o', object);
          const p = await PackedSnapshot.open(obj, { chunkBytes: 3 * TARGET_PAGE_SIZE, readAhead: 2 });
          assert.deepEqual(p.blockList, file.blockList);
          assert.deepEqual(p.ramSection, file.ramSection);
          assert.equal(p.switchoverStart, file.switchoverStart);
          assert.equal(p.configuration.machine, file.configuration.machine);
          assert.deepEqual(p.deviceState, file.deviceState);
          assert.equal(p.fileSize, file.fileSize);
          assert.ok(object.length < file.fileSize, 'the object is smaller than the sparse file');
          // The whole file through readAt (skeleton and pages regions alike).
          assert.ok((await p.readAt(0, p.fileSize)).equals(bytes.subarray(0, p.fileSize)));
          for (const b of p.blockList) {
            assert.equal(p.presentPages(b.name), file.presentPages(b.name));
            const runs: number[] = [];
            p.forEachRun(b.name, (f, n) => { runs.push(f, n); });
            const fileRuns: number[] = [];
            file.forEachRun(b.name, (f, n) => { fileRuns.push(f, n); });
            assert.deepEqual(runs, fileRuns);
            const pages = runs.reduce((n, x, i) => (i % 2 ? n + x : n), 0);
            if (pages === 0) continue;
            const a = Buffer.concat(await p.loadRuns(b.name, runs, runs.length / 2, Buffer.alloc(pages * TARGET_PAGE_SIZE)));
            const e = Buffer.concat(await file.loadRuns(b.name, runs, runs.length / 2, Buffer.alloc(pages * TARGET_PAGE_SIZE)));
            assert.ok(a.equals(e), `block ${b.name}: pages differ`);
            // A run over absent pages too: they read as zero.
            const all = b.usedLength / TARGET_PAGE_SIZE;
            const whole = Buffer.concat(await p.loadRuns(b.name, [0, all], 1, Buffer.alloc(b.usedLength)));
            assert.ok(whole.equals(await file.readPages(b.name, 0, all)));
          }
          await p.close();
        } finally {
          await file.close();
        }
      }
    });

    test('sequential reads coalesce into chunks; out-of-order reads use read-around windows', async () => {
      const { object, file } = await pack(path, 1024 * 1024);
      await file.close();
      const obj = new MemoryObject('mem://o', object);
      const chunk = 4 * TARGET_PAGE_SIZE;
      const p = await PackedSnapshot.open(obj, { chunkBytes: chunk, readAhead: 3, readAround: 2 * TARGET_PAGE_SIZE, firstRead: 0 });
      obj.reads = [];
      const pc = p.blockList[0]!.name;
      // Out of order: the last present page, then its neighbour in the object: one window.
      const present: number[] = [];
      p.forEachRun(pc, (f, n) => { for (let i = 0; i < n; i++) present.push(f + i); });
      assert.ok(present.length > 8, 'the fixture has present pages');
      const last = present[present.length - 1]!;
      const prev = present[present.length - 2]!;
      const scratch = Buffer.alloc(TARGET_PAGE_SIZE);
      const offLast = p.pageObjectOffset(pc, last)!;
      const offPrev = p.pageObjectOffset(pc, prev)!;
      await p.loadRuns(pc, [last, 1], 1, scratch);
      await p.loadRuns(pc, [prev, 1], 1, scratch);
      const window = 2 * TARGET_PAGE_SIZE;
      const sameWindow = Math.floor((offLast - p.layout.pagesOffset) / window) === Math.floor((offPrev - p.layout.pagesOffset) / window);
      assert.equal(p.stats.randomGets, sameWindow ? 1 : 2);
      assert.equal(p.stats.aroundHits, sameWindow ? 1 : 0);
      assert.ok(obj.reads.every(([, len]) => len <= window), 'read-around GETs are window sized');
      // Sequential from the start: chunk-sized GETs, each byte of the pages once.
      obj.reads = [];
      const runs: number[] = [];
      p.forEachRun(pc, (f, n) => { runs.push(f, n); });
      const pages = runs.reduce((n, x, i) => (i % 2 ? n + x : n), 0);
      for (let i = 0; i < runs.length; i += 2) {
        await p.loadRuns(pc, [runs[i]!, runs[i + 1]!], 1, Buffer.alloc(runs[i + 1]! * TARGET_PAGE_SIZE));
      }
      assert.ok(obj.reads.every(([pos, len]) => len <= chunk && (pos - p.layout.pagesOffset) % chunk === 0), 'sequential GETs are aligned chunks');
      const fetched = obj.reads.reduce((n, [, len]) => n + len, 0);
      assert.ok(fetched >= pages * TARGET_PAGE_SIZE && fetched <= pages * TARGET_PAGE_SIZE + (3 + 1) * chunk, `fetched ${fetched} for ${pages} pages: read-ahead is bounded`);
      await p.close();
      // A reader starting in the middle (extract --block) turns sequential at its second read.
      const q = await PackedSnapshot.open(obj, { chunkBytes: chunk, readAhead: 3, readAround: 2 * TARGET_PAGE_SIZE, firstRead: 0 });
      const mid = present[Math.floor(present.length / 2)]!;
      const ordered = present.filter((x) => x >= mid).slice(0, 12);
      for (const pg of ordered) await q.loadRuns(pc, [pg, 1], 1, Buffer.alloc(TARGET_PAGE_SIZE));
      assert.ok(q.stats.randomGets <= 2, `${q.stats.randomGets} out-of-order GETs for an in-order reader`);
      await q.close();
    });

    test('prefetch starts the first chunks and the read-ahead; the reader then finds them and fetches each byte once', async () => {
      const { object, file } = await pack(path, 1024 * 1024);
      await file.close();
      const obj = new MemoryObject('mem://p', object);
      const chunk = 4 * TARGET_PAGE_SIZE;
      const p = await PackedSnapshot.open(obj, { chunkBytes: chunk, readAhead: 3, firstRead: 0 });
      obj.reads = [];
      p.prefetch();
      p.prefetch();
      const pagesBytes = object.length - p.layout.pagesOffset;
      const chunks = Math.min(4, Math.ceil(pagesBytes / chunk));
      assert.deepEqual(obj.reads.map(([pos]) => pos), Array.from({ length: chunks }, (_, k) => p.layout.pagesOffset + k * chunk), 'chunks 0..readAhead, once');
      const pc = p.blockList[0]!.name;
      const runs: number[] = [];
      p.forEachRun(pc, (f, n) => { runs.push(f, n); });
      for (let i = 0; i < runs.length; i += 2) {
        const views = await p.loadRuns(pc, [runs[i]!, runs[i + 1]!], 1, Buffer.alloc(runs[i + 1]! * TARGET_PAGE_SIZE));
        const at = p.pageObjectOffset(pc, runs[i]!)!;
        assert.ok(Buffer.concat(views).equals(object.subarray(at, at + runs[i + 1]! * TARGET_PAGE_SIZE)));
      }
      const starts = obj.reads.map(([pos]) => pos);
      assert.equal(new Set(starts).size, starts.length, 'no chunk fetched twice');
      await p.close();
    });

    test('chunk buffers come from a bounded pool, reused only once no GET writes them, no copy reads them and no view handed out is held; a failed GET gives its buffer back', async () => {
      const { object, file } = await pack(path, 1024 * 1024);
      // GETs answer late and out of order, writing their bytes only when they answer: a buffer
      // handed to a new GET while an earlier copy still read it would show up as wrong pages.
      let failAt = -1;
      let n = 0;
      const slow: RangeReader = {
        name: 'mem://slow',
        size: object.length,
        read(position, length, into) {
          const k = n++;
          return new Promise((resolve, reject) => setTimeout(() => {
            if (k === failAt) return reject(new Error(`GET ${k} failed`));
            const out = into ?? Buffer.alloc(length);
            object.copy(out, 0, position, position + length);
            resolve(out);
          }, (k * 7) % 5));
        },
      };
      const chunk = TARGET_PAGE_SIZE;
      const readAhead = 2;
      // The open reads the prefix alone, so that every page comes through a chunk's GET.
      const p = await PackedSnapshot.open(slow, { chunkBytes: chunk, readAhead, firstRead: 0 });
      const pc = p.blockList[0]!.name;
      const runs: number[] = [];
      p.forEachRun(pc, (f, c) => { for (let i = 0; i < c; i++) runs.push(f + i, 1); });
      // Three batches in flight at once, each into its own scratch, as the multifd sender loads
      // them. A load's views (of the scratch or of a chunk) must stay intact until its scratch is
      // used again: they are checked right before that, after the other slots' loads went on.
      const slots = [0, 1, 2].map(() => Buffer.alloc(TARGET_PAGE_SIZE));
      const held: ({ views: Buffer[]; want: Buffer; at: number } | undefined)[] = [undefined, undefined, undefined];
      const verify = (slot: number): void => {
        const h = held[slot];
        if (h) assert.ok(Buffer.concat(h.views).equals(h.want), `pages ${runs[h.at]}+1, still intact before slot ${slot} is reused`);
      };
      const load = async (slot: number, i: number): Promise<void> => {
        verify(slot);
        const want = Buffer.concat(await file.loadRuns(pc, [runs[i]!, 1], 1, Buffer.alloc(TARGET_PAGE_SIZE)));
        const views = await p.loadRuns(pc, [runs[i]!, 1], 1, slots[slot]!);
        assert.ok(Buffer.concat(views).equals(want), `pages ${runs[i]}+1`);
        held[slot] = { views, want, at: i };
      };
      for (let i = 0; i < runs.length; i += 6) await Promise.all([i, i + 2, i + 4].filter((j) => j < runs.length).map((j, slot) => load(slot, j)));
      [0, 1, 2].forEach(verify);
      const pool = p.chunkPool;
      assert.ok(p.stats.chunkGets > 3 * (readAhead + 3), `${p.stats.chunkGets} chunk GETs: enough to need reuse`);
      assert.ok(pool.stats.allocated <= readAhead + 6, `${pool.stats.allocated} chunk buffers made for ${p.stats.chunkGets} GETs`);
      assert.ok(pool.stats.reused >= p.stats.chunkGets - pool.stats.allocated);
      await p.close();

      // A GET that fails: the read fails with its error, and its buffer is still given back.
      const q = await PackedSnapshot.open(slow, { chunkBytes: chunk, readAhead, firstRead: 0 });
      failAt = n + 2;
      let failed = 0;
      const one = Buffer.alloc(TARGET_PAGE_SIZE);
      for (let i = 0; i < runs.length; i += 2) {
        await q.loadRuns(pc, [runs[i]!, runs[i + 1]!], 1, one).catch((e: Error) => {
          assert.match(e.message, /GET \d+ failed/);
          failed++;
        });
      }
      assert.ok(failed >= 1, 'the failed GET failed the reads of its chunk');
      assert.ok(q.chunkPool.stats.allocated <= readAhead + 6, `${q.chunkPool.stats.allocated} chunk buffers with a failed GET among them`);
      await q.close();
      await file.close();
    });

    test('a truncated or corrupted object fails at open with a code and an offset', async () => {
      const { object, file } = await pack(path, 1024 * 1024);
      await file.close();
      for (const size of [0, 10, 100, object.length - 1]) {
        await assert.rejects(PackedSnapshot.open(new MemoryObject('mem://t', object, size)), (e: unknown) => e instanceof ProtocolError && e.code === 'TRUNCATED' && typeof e.offset === 'number' && /mem:\/\/t/.test(e.message));
      }
      const bad = Buffer.from(object);
      bad[300]! ^= 1;
      await assert.rejects(PackedSnapshot.open(new MemoryObject('mem://c', bad)), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_PACKED' && /checksum/.test(e.message));
      // The plain mapped-ram file is not a packed object.
      await assert.rejects(PackedSnapshot.open(new MemoryObject('mem://f', bytes)), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_MAGIC' && e.offset === 0);
      rmSync(dir, { recursive: true, force: true });
    });
  });
}
