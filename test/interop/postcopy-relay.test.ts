/**
 * relay passes postcopy through (issue #8), against real QEMU: a running dirtying guest on A
 * migrates through the relay to B (not paused: B's guest runs from POSTCOPY_RUN on and faults on
 * pages it lacks), and A switches to postcopy while precopy still iterates. The background scan
 * crawls until B has asked for pages, so B's faults run ahead of it: B's page requests must reach
 * A through the relay, and with postcopy-preempt the answers come back on the relayed preempt
 * channel. Then the scan is let loose to finish.
 *
 * Checks: A and B complete; B's guest ran during postcopy and its memory invariant holds; with
 * --tee, the tee snapshot equals A's final RAM page for page (no precopy page overwrote a newer
 * postcopy one, none is missing). Variants: QEMU 11.1 multifd 2 → 2 (± preempt); QEMU 10.0
 * postcopy without multifd (± preempt).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, startQemu, waitGuestPasses, waitMigration, type QemuVersion } from '../helpers/qemu.js';
import { firstDifference } from '../helpers/snapshot.js';
import { freePort, startDestination } from '../helpers/send.js';
import { relay } from '../../src/conversations/relay.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';

const MiB = 1024 * 1024;
const MEM_MIB = 128;
/**
 * A's background scan during the crawl: 256 pages/s, slower than B's guest faults on pages.
 * QEMU answers a request on the preempt channel only if the page is still dirty on A when its
 * return-path thread gets the bitmap lock, and the scan holds that lock until it reaches its rate
 * limit (migration/ram.c lets go only around each page write). With 32 MiB/s, which the scan
 * never reached, QEMU 11 answered 0-22 of ~2000 requests on preempt: in one traced run a request
 * for a dirty page went unanswered there and the scan sent the page 180 ms later. A crawling scan
 * sleeps most of each 100 ms window without the lock, so requests are answered on preempt.
 */
const CRAWL_BYTES_PER_S = MiB;
/** Requests A must have counted before the crawl ends (A's query-migrate 'postcopy-requests'). */
const CRAWL_REQUESTS = 64;

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

function caps(v: Variant): { capability: string; state: boolean }[] {
  const c = [{ capability: 'postcopy-ram', state: true }];
  if (v.channels > 0) c.push({ capability: 'multifd', state: true });
  if (v.preempt) c.push({ capability: 'postcopy-preempt', state: true });
  return c;
}

for (const v of variants) {
  const name = `QEMU ${v.version}: postcopy-ram${v.channels > 0 ? ` + multifd ${v.channels} ch` : ''}${v.preempt ? ' + postcopy-preempt' : ''}`;
  describe(`relay passes postcopy through, ${name}`, { skip: haveQemu(v.version) ? false : `QEMU ${v.version} not installed` }, () => {
    test('B runs the guest from the switch on, its page requests reach A, the tee equals A\'s final RAM', { timeout: 180_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-postcopy-relay-');
      const tee = join(dir, 'tee.mig');
      const a = await startQemu({ version: v.version, memMiB: MEM_MIB, bootSector: true });
      const b = await startDestination(dir, { version: v.version, memMiB: MEM_MIB, bootSector: true, paused: false });
      try {
        await waitGuestPasses(a, 2, 30_000);
        await b.q.qmp.execute('migrate-set-capabilities', { capabilities: caps(v) });
        if (v.channels > 0) await b.q.qmp.execute('migrate-set-parameters', { 'multifd-channels': v.channels });
        const bUri = `tcp:127.0.0.1:${await freePort()}`;
        await b.q.qmp.execute('migrate-incoming', { uri: bUri, 'exit-on-error': false });

        const h = relay({ listen: 'tcp:127.0.0.1:0', to: bUri, channelsIn: v.channels, channelsOut: v.channels, tee });
        const addr = await h.listening;
        await a.qmp.execute('migrate-set-capabilities', { capabilities: caps(v) });
        await a.qmp.execute('migrate-set-parameters', {
          'max-bandwidth': 107374182400,
          'downtime-limit': 1,
          // The background scan crawls: see CRAWL_BYTES_PER_S.
          'max-postcopy-bandwidth': CRAWL_BYTES_PER_S,
          ...(v.channels > 0 ? { 'multifd-channels': v.channels } : {}),
        });
        await a.qmp.execute('migrate', { uri: addr });
        const deadline = Date.now() + 60_000;
        for (;;) {
          const st = await a.qmp.execute('query-migrate');
          if (st.status !== 'active' && st.status !== 'setup') throw new Error(`A's migration is ${st.status} before the switch: ${st['error-desc'] ?? ''}`);
          if ((st.ram?.['dirty-sync-count'] ?? 0) >= 3 || Date.now() > deadline) break;
          await sleep(50);
        }
        const passesOnB = countPasses(b.q.serialLog());
        await a.qmp.execute('migrate-start-postcopy');
        // Once B has asked for enough pages, the scan may finish at full speed.
        const crawlUntil = Date.now() + 30_000;
        for (;;) {
          const st = await a.qmp.execute('query-migrate');
          // Passes through 'active' (and on QEMU 11 'postcopy-device') before 'postcopy-active'.
          const over = ['completed', 'failed', 'cancelled', 'postcopy-paused'].includes(st.status);
          if ((st.ram?.['postcopy-requests'] ?? 0) >= CRAWL_REQUESTS || over || Date.now() > crawlUntil) break;
          await sleep(20);
        }
        await a.qmp.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });

        let summary;
        try {
          summary = await h.done;
        } catch (e) {
          throw new Error(`${(e as Error).message}\nA: ${JSON.stringify(await a.qmp.execute('query-migrate').catch(() => undefined))}\nB stderr:\n${b.q.stderr()}`);
        }
        t.diagnostic(`relay: ${summary['total-time']} ms, ${summary['bytes-in']} bytes in, syncs ${summary['multifd-syncs']}, postcopy ${JSON.stringify(summary.postcopy)}`);
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 60_000 })).status, 'completed', 'A completed');
        assert.equal((await waitMigration(b.q.qmp, { timeoutMs: 60_000 })).status, 'completed', 'B completed');
        assert.ok(summary.postcopy, 'the relay saw the switch');
        assert.equal(summary.postcopy['preempt-channel'], v.preempt, 'a preempt channel was relayed exactly when enabled');
        assert.ok(summary.postcopy['page-requests'] > 0, 'B asked for pages and the requests went to A');
        if (v.preempt) assert.ok(summary.postcopy['preempt-pages'] > 0, 'requested pages came back on the relayed preempt channel');
        else assert.equal(summary.postcopy['preempt-pages'], 0, 'no preempt pages without a preempt channel');

        // B's guest runs on (it ran during postcopy already) with its invariant intact.
        assert.equal((await b.q.qmp.execute('query-status')).status, 'running');
        await waitGuestPasses(b.q, passesOnB + 2, 30_000);
        await b.q.qmp.execute('stop');
        const r = checkDirtyInvariant(await dumpGuestMemory(b.q, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START));
        assert.ok(r.ok, `B's guest broke the invariant: ${r.reason}`);

        // A is paused after completion: its RAM is exactly what the tee must hold.
        const ram = await dumpGuestMemory(a, 0, MEM_MIB * MiB);
        const snap = await MappedRamSnapshot.open(tee);
        try {
          const pages = await snap.readPages('pc.ram', 0, (MEM_MIB * MiB) / 4096);
          assert.ok(pages.equals(ram), `tee pc.ram differs from A's final RAM: ${firstDifference(pages, ram)}`);
        } finally {
          await snap.close();
        }
      } finally {
        await a.kill();
        await b.q.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}
