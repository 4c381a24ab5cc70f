// A running guest saved by QEMU to a plain stream file with xbzrle on (several rounds of page
// deltas): the file tools read it (inspect counts the deltas, verify passes) and restore sends the
// pages the deltas leave; QEMU loading the same file itself holds the same memory, and the restored
// guest's invariant holds and it runs on. QEMU 10 only: decoding the file is ours.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START } from '../guest/bootsector.js';
import { restore } from '../../src/conversations/restore.js';
import { checkInvariant, runsOn } from '../helpers/guest-checks.js';
import { dumpGuestMemory, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration } from '../helpers/qemu.js';
import { cli, startDestination } from '../helpers/send.js';
import { mainEvents } from '../helpers/stream-memory.js';

const MEM = 128;
const skip = haveQemu('10') ? false : `QEMU 10 not available (${qemuBinary('10')})`;

describe('a stream file with XBZRLE records, QEMU 10', { skip, timeout: 300_000 }, () => {
  test('inspect counts the deltas, verify passes, restore from the file = QEMU\'s own load; the invariant holds and the guest runs on', async (t) => {
    const dir = mkdtempSync('/tmp/multifd-stream-xbzrle-');
    const file = join(dir, 'vm.mig');
    const src = await startQemu({ version: '10', memMiB: MEM, bootSector: true });
    let qemuLoaded: Awaited<ReturnType<typeof startQemu>> | undefined;
    let dst: Awaited<ReturnType<typeof startDestination>> | undefined;
    try {
      await waitGuestPasses(src, 2);
      await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
      // Slow enough that the running guest dirties pages between rounds, which go as deltas.
      await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 * 1024, 'downtime-limit': 1 });
      await src.qmp.execute('migrate', { uri: `file:${file}` });
      for (;;) {
        const m = await src.qmp.execute('query-migrate');
        if ((m.ram?.['dirty-sync-count'] ?? 0) >= 4 || ['completed', 'failed', 'cancelled'].includes(m.status)) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 100000, 'max-bandwidth': 107374182400 });
      const ma = await waitMigration(src.qmp, { timeoutMs: 120_000 });
      assert.equal(ma.status, 'completed', ma['error-desc']);
      const deltas = ma['xbzrle-cache']?.pages ?? 0;
      assert.ok(deltas > 1000, `XBZRLE pages ${deltas}`);
      await src.kill();

      const r = await cli(['inspect', file, '--json']);
      assert.equal(r.code, 0, r.stderr);
      const info = JSON.parse(r.stdout);
      assert.equal(info.format, 'stream');
      // QEMU's xbzrle-cache.pages also counts pages it found unchanged and skipped (ram.c
      // save_xbzrle_page counts before the skip), so the file holds at most that many records:
      // inspect's count is checked against the file's own records, parsed here.
      const inFile = mainEvents(readFileSync(file)).filter((ev) => ev.type === 'ram-xbzrle').length;
      const counted = info.blocks.reduce((n: number, b: { 'xbzrle-records'?: number }) => n + (b['xbzrle-records'] ?? 0), 0);
      assert.equal(counted, inFile, 'inspect counts every XBZRLE record of the file');
      assert.ok(inFile <= deltas && inFile > 1000, `${inFile} records in the file, QEMU counted ${deltas} pages`);
      const v = await cli(['verify', file]);
      assert.equal(v.code, 0, v.stdout + v.stderr);

      // QEMU's own loader applies the deltas: the reference.
      qemuLoaded = await startQemu({ version: '10', memMiB: MEM, bootSector: true, incoming: 'defer', paused: true });
      await qemuLoaded.qmp.execute('migrate-incoming', { uri: `file:${file}`, 'exit-on-error': false });
      const ql = await waitMigration(qemuLoaded.qmp, { timeoutMs: 120_000 });
      assert.equal(ql.status, 'completed', ql['error-desc']);
      const reference = await dumpGuestMemory(qemuLoaded, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
      await qemuLoaded.kill();
      qemuLoaded = undefined;

      dst = await startDestination(dir, { version: '10', memMiB: MEM, bootSector: true });
      const s = await restore({ file, qmp: dst.qmp, channels: 0 }).done;
      assert.equal(s.status, 'completed');
      const restored = await checkInvariant(dst.q, 'restored from the stream file');
      assert.ok(restored.equals(reference), 'restore sent what QEMU\'s own loader makes of the file');
      await runsOn(dst.q, restored);
      t.diagnostic(`QEMU 10: ${ma.ram['dirty-sync-count']} dirty syncs, ${deltas} XBZRLE pages, file ${info['file-size']} bytes; restore sent ${s.normal} pages in ${s['total-time']} ms`);
    } finally {
      await src.kill();
      await qemuLoaded?.kill();
      await dst?.q.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
