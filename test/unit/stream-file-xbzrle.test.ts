// A QEMU stream file (migrate file: without mapped-ram) with XBZRLE records: the reader applies each
// delta onto the page as it stands and keeps the result in an unlinked temporary file, so inspect,
// verify, convert and send read the pages the stream leaves. The files: QEMU 10.0's own
// (migrate file: with xbzrle on, capture stream-file-xbzrle) and the XBZRLE captures' main
// channels (10.0 and 11.1), which hold the same records.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { StreamSession } from '../../src/codec/stream-session.js';
import { convert } from '../../src/conversations/convert.js';
import { inspect } from '../../src/conversations/inspect.js';
import { verify } from '../../src/conversations/verify.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { StreamSnapshot } from '../../src/engine/stream-snapshot.js';
import { mainEvents, openFilesUnder, rebuildMemory } from '../helpers/stream-memory.js';
import { streamScenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;
const dir = mkdtempSync('/tmp/multifd-stream-xbzrle-test-');
const spillDir = join(dir, 'tmp');
mkdirSync(spillDir);
const savedTmp = process.env.MULTIFD_TMPDIR;
process.env.MULTIFD_TMPDIR = spillDir;
after(() => {
  if (savedTmp === undefined) delete process.env.MULTIFD_TMPDIR;
  else process.env.MULTIFD_TMPDIR = savedTmp;
  rmSync(dir, { recursive: true, force: true });
});



async function readAll(src: { forEachRun: StreamSnapshot['forEachRun']; loadRuns: StreamSnapshot['loadRuns']; scratchBytes(n: number): number }, block: string, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  const runs: number[] = [];
  src.forEachRun(block, (first, count) => { runs.push(first, count); });
  for (let i = 0; i < runs.length; i += 2) {
    const views = await src.loadRuns(block, [runs[i]!, runs[i + 1]!], 1, Buffer.alloc(src.scratchBytes(runs[i + 1]!)));
    Buffer.concat(views).copy(out, runs[i]! * PAGE);
  }
  return out;
}

const scenarios = streamScenarios((e) => e.scenario === 'xbzrle' || e.scenario === 'stream-file-xbzrle');

describe('a stream file with XBZRLE records', () => {
  test('the captures are there (a QEMU 10.0 file, the 10.0 and 11.1 main channels)', () => {
    assert.deepEqual(scenarios.map((s) => s.label).sort(), ['10.0/stream-file-xbzrle', '10.0/xbzrle', '11.1/xbzrle']);
    assert.equal(scenarios.find((s) => s.entry.scenario === 'stream-file-xbzrle')!.entry.transport, 'file');
  });

  for (const s of scenarios) {
    test(`${s.label}: the reader's pages, inspect, verify and convert --to mapped-ram hold the memory the records leave`, async () => {
      const main = s.main();
      const evs = mainEvents(main);
      const deltas = evs.filter((e) => e.type === 'ram-xbzrle').length;
      assert.ok(deltas > 1000);
      const want = rebuildMemory(evs);
      const file = join(dir, `${s.entry.qemu}-${s.entry.scenario}.mig`);
      writeFileSync(file, main);

      const snap = await StreamSnapshot.open(file);
      try {
        assert.equal(snap.xbzrleRecords, deltas);
        assert.equal(openFilesUnder(spillDir).length, 1, 'decoded pages in one unlinked temporary file');
        assert.deepEqual(readdirSync(spillDir), []);
        for (const [name, m] of want) {
          assert.ok((await readAll(snap, name, m.length)).equals(m), `block ${name}`);
          let nonZero = 0;
          for (let o = 0; o < m.length; o += PAGE) if (m.subarray(o, o + PAGE).some((b) => b !== 0)) nonZero++;
          assert.equal(snap.presentPages(name), nonZero, `present pages of ${name}`);
        }
      } finally {
        await snap.close();
      }
      assert.deepEqual(openFilesUnder(spillDir), [], 'the temporary file is closed with the snapshot');

      const info = await inspect(file);
      assert.equal(info.blocks.reduce((n, b) => n + (b['xbzrle-records'] ?? 0), 0), deltas);
      assert.equal(info.sections.reduce((n, x) => n + (x.xbzrleRecords ?? 0), 0), deltas);
      const v = await verify(file);
      assert.equal(v.ok, true, JSON.stringify(v.problems));

      const out = join(dir, `${s.entry.qemu}-${s.entry.scenario}-mapped.mig`);
      await convert({ input: file, output: out, to: 'mapped-ram' });
      const m = await MappedRamSnapshot.open(out);
      try {
        for (const [name, mem] of want) assert.ok((await m.readPages(name, 0, mem.length / PAGE)).equals(mem), `converted block ${name}`);
      } finally {
        await m.close();
      }
      assert.deepEqual(openFilesUnder(spillDir), []);
    });
  }

  test('a malformed delta fails the open with its file offset, the temporary file closed', async () => {
    const main = Buffer.from(scenarios.find((s) => s.entry.scenario === 'stream-file-xbzrle')!.main());
    // The 100th XBZRLE record's delta: a zero run of 16383 bytes, past any page.
    const session = new StreamSession({ kind: 'file' });
    session.push(main);
    let deltaAt = -1;
    let n = 0;
    for (let ev = session.next(); ev !== null; ev = session.next()) {
      if (ev.type === 'xbzrle' && ++n === 100) {
        deltaAt = session.offset - ev.delta.length;
        break;
      }
    }
    assert.ok(deltaAt > 0);
    main[deltaAt] = 0xff;
    main[deltaAt + 1] = 0x7f;
    const file = join(dir, 'hostile.mig');
    writeFileSync(file, main);
    await assert.rejects(StreamSnapshot.open(file), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_RECORD' && /XBZRLE delta/.test(e.message) && e.offset !== undefined && e.offset >= deltaAt && e.offset < deltaAt + 8);
    assert.deepEqual(openFilesUnder(spillDir), []);
    const v = await verify(file);
    assert.equal(v.ok, false);
  });
});
