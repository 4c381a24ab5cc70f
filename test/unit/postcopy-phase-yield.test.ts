// The postcopy background scan lets I/O in while it runs: socket writes that fit the kernel's
// buffer complete on microtasks and absent pages need no read, so without a yield the whole scan
// ran before any callback (the destination's PONGs and page requests, QMP) was looked at.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { PostcopyPhase } from '../../src/conversations/postcopy-phase.js';
import { PostcopyPages } from '../../src/engine/postcopy-pages.js';
import type { SnapshotSource } from '../../src/engine/snapshot.js';

test('the background scan of absent pages with writes that complete at once still lets callbacks run', async () => {
  const pages = 65536; // 256 MiB, no page present: ZERO records only, no reads
  const src = {
    blockList: [{ name: 'pc.ram', usedLength: pages * TARGET_PAGE_SIZE }],
    ramSection: { sectionId: 2, instanceId: 0, versionId: 4 },
    forEachRun: () => {},
    scratchBytes: (n: number) => n * TARGET_PAGE_SIZE,
    loadRuns: async () => [],
  } as unknown as SnapshotSource;
  const phase = new PostcopyPhase({
    source: src,
    pages: new PostcopyPages(src),
    mainRecords: {},
    writeMain: async () => {},
    failed: new Promise<never>(() => {}),
  });
  let seenAt: number | undefined;
  setImmediate(() => { seenAt = phase.stats.zero; });
  await phase.run();
  assert.equal(phase.stats.zero, pages);
  assert.ok(seenAt !== undefined && seenAt < pages, `a callback ran while the scan was under way (at ${seenAt} of ${pages} pages)`);
});
