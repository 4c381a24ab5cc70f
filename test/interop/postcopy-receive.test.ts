/**
 * receive() from a real QEMU source that switches to postcopy (docs/protocol.md §6.2–6.4, issue #8):
 * QEMU 11.1 with multifd + postcopy-ram, with and without postcopy-preempt; QEMU 10.0 with
 * postcopy-ram alone (10.0 refuses it with multifd). The dirtying guest runs while precopy keeps
 * iterating (downtime-limit 1 ms never converges), then migrate-start-postcopy switches.
 *
 * Checks: the source completes; every page of the snapshot equals the paused source's RAM after
 * completion (so no precopy page overwrote a newer postcopy one, and every page arrived); the
 * guest's own invariant holds in the snapshot; QEMU restores the snapshot (device state from the
 * PACKAGED command) and the guest runs on.
 */
import { describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, startQemu, waitGuestPasses, waitMigration, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { firstDifference, restoreSnapshot } from '../helpers/snapshot.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { receive, type ReceiveHandle, type ReceiveSummary } from '../../src/conversations/receive.js';

const MiB = 1024 * 1024;
const MEM_MIB = 128;

interface Variant {
  version: QemuVersion;
  channels: number;
  preempt: boolean;
}

const variants: Variant[] = [
  { version: '11', channels: 2, preempt: false },
  { version: '11', channels: 2, preempt: true },
  { version: '10', channels: 0, preempt: false },
  { version: '10', channels: 0, preempt: true },
];

async function waitProgress(h: ReceiveHandle, pred: (bytes: number) => boolean, timeoutMs: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => { h.off('progress', on); reject(new Error('progress condition not reached')); }, timeoutMs);
    const on = (p: { transferred: number }): void => {
      if (pred(p.transferred)) {
        clearTimeout(timer);
        h.off('progress', on);
        resolve();
      }
    };
    h.on('progress', on);
    h.done.catch((e: Error) => { clearTimeout(timer); reject(e); });
  });
}

async function migratePostcopy(t: TestContext, v: Variant, src: QemuInstance, out: string): Promise<ReceiveSummary> {
  const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: v.channels, progressIntervalMs: 100 });
  const addr = await h.listening;
  const caps = [{ capability: 'postcopy-ram', state: true }];
  if (v.channels > 0) caps.push({ capability: 'multifd', state: true });
  if (v.preempt) caps.push({ capability: 'postcopy-preempt', state: true });
  await src.qmp.execute('migrate-set-capabilities', { capabilities: caps });
  await src.qmp.execute('migrate-set-parameters', {
    'max-bandwidth': 107374182400,
    // Precopy never converges: the switch to postcopy is what ends it.
    'downtime-limit': 1,
    ...(v.channels > 0 ? { 'multifd-channels': v.channels } : {}),
  });
  await src.qmp.execute('migrate', { uri: addr });
  // Well into precopy (the whole RAM once, and more), then switch.
  await waitProgress(h, (b) => b > 160 * MiB, 60_000);
  await src.qmp.execute('migrate-start-postcopy');
  let summary: ReceiveSummary;
  try {
    summary = await Promise.race([
      h.done,
      (async () => {
        const st = await waitMigration(src.qmp, { timeoutMs: 90_000 });
        if (st.status !== 'completed') throw new Error(`source migration ${st.status}: ${st['error-desc'] ?? ''}`);
        return await h.done;
      })(),
    ]);
  } catch (e) {
    h.abort(e as Error);
    throw new Error(`${(e as Error).message}\nsource stderr:\n${src.stderr()}`);
  }
  const st = await waitMigration(src.qmp, { timeoutMs: 30_000 });
  assert.equal(st.status, 'completed', `source: ${JSON.stringify(st)}`);
  t.diagnostic(`summary: transferred=${summary.transferred} normal=${summary.normal} syncs=${summary['multifd-syncs']} postcopy=${JSON.stringify(summary.postcopy)} device-state=${summary['device-state-bytes']}`);
  return summary;
}

for (const v of variants) {
  const name = `QEMU ${v.version}: postcopy-ram${v.channels > 0 ? ` + multifd ${v.channels} ch` : ''}${v.preempt ? ' + postcopy-preempt' : ''}`;
  describe(`receive from a source that switches to postcopy, ${name}`, { skip: haveQemu(v.version) ? false : `QEMU ${v.version} not installed` }, () => {
    test('the snapshot equals the source\'s final RAM page for page, holds the invariant, and restores', { timeout: 180_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-postcopy-rx-');
      const out = join(dir, 'pc.mig');
      const src = await startQemu({ version: v.version, memMiB: MEM_MIB, bootSector: true });
      try {
        await waitGuestPasses(src, 2, 30_000);
        const before = countPasses(src.serialLog());
        const summary = await migratePostcopy(t, v, src, out);
        assert.ok(summary.postcopy, 'the source switched to postcopy');
        assert.ok(summary.postcopy['main-pages'] > 0, 'pages came on the main channel after the switch');
        assert.equal(summary.postcopy['preempt-channel'], v.preempt, 'preempt channel taken exactly when enabled');
        if (v.channels > 0) assert.ok(summary['multifd-syncs'] >= 2, 'setup and prepare syncs');
        assert.ok(countPasses(src.serialLog()) > before, 'the guest ran during precopy');

        // The source is paused (postmigrate): its RAM is the final state the snapshot must hold.
        const ram = await dumpGuestMemory(src, 0, MEM_MIB * MiB);
        const snap = await MappedRamSnapshot.open(out);
        try {
          const pages = await snap.readPages('pc.ram', 0, (MEM_MIB * MiB) / 4096);
          assert.ok(pages.equals(ram), `snapshot pc.ram differs from the source's final RAM: ${firstDifference(pages, ram)}`);
          assert.ok(snap.deviceState.sections.length > 10, `device sections found (${snap.deviceState.sections.length})`);
          const r = checkDirtyInvariant(pages.subarray(GUEST_DIRTY_START, GUEST_DIRTY_END));
          assert.ok(r.ok, `snapshot breaks the guest invariant: ${r.reason}`);
        } finally {
          await snap.close();
        }
      } finally {
        await src.kill();
      }

      const d = await restoreSnapshot({ version: v.version, memMiB: MEM_MIB, file: out, bootSector: true });
      try {
        const r0 = checkDirtyInvariant(await dumpGuestMemory(d, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START));
        assert.ok(r0.ok, `restored guest inconsistent: ${r0.reason}`);
        await d.qmp.execute('cont');
        await waitGuestPasses(d, 2, 30_000);
        await d.qmp.execute('stop');
        const r1 = checkDirtyInvariant(await dumpGuestMemory(d, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START));
        assert.ok(r1.ok, `restored guest broke the invariant after running: ${r1.reason}`);
      } finally {
        await d.kill();
      }
      rmSync(dir, { recursive: true, force: true });
      await sleep(0);
    });
  });
}
