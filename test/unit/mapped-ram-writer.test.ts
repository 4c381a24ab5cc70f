// MappedRamWriter's two page paths (O_DIRECT from aligned slots, and buffered) must produce the
// same file: every page at pagesOffset + offset, the bitmap marking exactly the pages written.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, existsSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { MappedRamWriter } from '../../src/engine/mapped-ram-writer.js';
import { decodeMappedRamHeader, PageBitmap } from '../../src/codec/mapped-ram.js';
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
