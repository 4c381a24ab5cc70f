/**
 * Failures after the switch to postcopy (issue #8), against real QEMU 11.1 (multifd + postcopy)
 * and 10.0 (postcopy alone). Postcopy bandwidth is kept low so the postcopy phase lasts seconds.
 *  - relay, destination B killed in postcopy: the relay fails at once (no hang) and says the guest
 *    is lost; A does not complete and stays alive (paused, as QEMU leaves a postcopy source).
 *  - receive, source killed in postcopy: a clear error naming postcopy, no snapshot left.
 *  - receive aborted in postcopy: the source does not complete; its state is reported (QEMU
 *    leaves it paused), and nothing is left at out.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { haveQemu, startQemu, waitGuestPasses, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { freePort, startDestination } from '../helpers/send.js';
import { relay } from '../../src/conversations/relay.js';
import { receive, type ReceiveHandle } from '../../src/conversations/receive.js';

const MiB = 1024 * 1024;
const MEM_MIB = 128;

const versions: { version: QemuVersion; channels: number }[] = [
  { version: '11', channels: 2 },
  { version: '10', channels: 0 },
];

function caps(channels: number): { capability: string; state: boolean }[] {
  return [{ capability: 'postcopy-ram', state: true }, ...(channels > 0 ? [{ capability: 'multifd', state: true }] : [])];
}

/** Starts A's migration to `uri`, lets precopy run a while, switches, and waits until A is in postcopy. */
async function migrateAndSwitch(a: QemuInstance, uri: string, channels: number): Promise<void> {
  await a.qmp.execute('migrate-set-capabilities', { capabilities: caps(channels) });
  await a.qmp.execute('migrate-set-parameters', {
    'max-bandwidth': 107374182400,
    'downtime-limit': 1,
    'max-postcopy-bandwidth': 4 * MiB,
    ...(channels > 0 ? { 'multifd-channels': channels } : {}),
  });
  await a.qmp.execute('migrate', { uri });
  const deadline = Date.now() + 60_000;
  while ((((await a.qmp.execute('query-migrate')).ram?.['dirty-sync-count']) ?? 0) < 2) {
    if (Date.now() > deadline) throw new Error('A never reached its second dirty sync');
    await sleep(50);
  }
  await a.qmp.execute('migrate-start-postcopy');
  for (;;) {
    const st = await a.qmp.execute('query-migrate');
    if (st.status === 'postcopy-active') return;
    if (Date.now() > deadline || st.status === 'failed' || st.status === 'completed') throw new Error(`A is ${st.status}, not postcopy-active`);
    await sleep(50);
  }
}

async function sourceState(a: QemuInstance): Promise<string> {
  const m = await a.qmp.execute('query-migrate');
  const s = await a.qmp.execute('query-status');
  return `migration ${m.status}, vm ${s.status}`;
}

/** A's migration status once it has left postcopy-active (or after 20 s). */
async function settledSource(a: QemuInstance): Promise<string> {
  const deadline = Date.now() + 20_000;
  while ((await a.qmp.execute('query-migrate')).status === 'postcopy-active' && Date.now() < deadline) await sleep(100);
  return sourceState(a);
}

for (const v of versions) {
  describe(`postcopy failures, QEMU ${v.version}${v.channels > 0 ? ' with multifd' : ''}`, { skip: haveQemu(v.version) ? false : `QEMU ${v.version} not installed` }, () => {
    test('relay: destination killed in postcopy — the relay fails at once saying the guest is lost', { timeout: 120_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-pc-fault-');
      const a = await startQemu({ version: v.version, memMiB: MEM_MIB, bootSector: true });
      const b = await startDestination(dir, { version: v.version, memMiB: MEM_MIB, bootSector: true, paused: false });
      try {
        await waitGuestPasses(a, 2, 30_000);
        await b.q.qmp.execute('migrate-set-capabilities', { capabilities: caps(v.channels) });
        if (v.channels > 0) await b.q.qmp.execute('migrate-set-parameters', { 'multifd-channels': v.channels });
        const bUri = `tcp:127.0.0.1:${await freePort()}`;
        await b.q.qmp.execute('migrate-incoming', { uri: bUri, 'exit-on-error': false });
        const tee = join(dir, 'tee.mig');
        const h = relay({ listen: 'tcp:127.0.0.1:0', to: bUri, channelsIn: v.channels, channelsOut: v.channels, tee });
        await migrateAndSwitch(a, await h.listening, v.channels);
        await sleep(1000);
        const killedAt = Date.now();
        await b.q.kill();
        const err = await h.done.then(() => undefined, (e: Error) => e);
        const took = Date.now() - killedAt;
        assert.ok(err, 'the relay failed');
        t.diagnostic(`relay failed ${took} ms after B died: ${err.message}`);
        assert.ok(took < 15_000, `the relay did not hang (${took} ms)`);
        assert.match(err.message, /after the switch to postcopy: the guest is lost/);
        assert.equal(existsSync(tee), false, 'no tee snapshot');
        const st = await settledSource(a);
        t.diagnostic(`A afterwards: ${st}`);
        assert.doesNotMatch(st, /migration completed/);
      } finally {
        await a.kill();
        await b.q.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    for (const what of ['source killed', 'receive aborted'] as const) {
      test(`receive: ${what} in postcopy — a clear error, no snapshot`, { timeout: 120_000 }, async (t) => {
        const dir = mkdtempSync('/tmp/multifd-pc-fault-');
        const out = join(dir, 'vm.mig');
        const a = await startQemu({ version: v.version, memMiB: MEM_MIB, bootSector: true });
        let h: ReceiveHandle | undefined;
        try {
          await waitGuestPasses(a, 2, 30_000);
          h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: v.channels });
          await migrateAndSwitch(a, await h.listening, v.channels);
          await sleep(1000);
          if (what === 'source killed') await a.kill();
          else h.abort(new Error('stopped by the test'));
          const err = await h.done.then(() => undefined, (e: Error) => e);
          assert.ok(err, 'receive failed');
          t.diagnostic(`receive: ${err.message}`);
          assert.match(err.message, /after the switch to postcopy: the snapshot was not written/);
          if (what === 'source killed') assert.match(err.message, /source gone|reset|closed/);
          assert.deepEqual(readdirSync(dir), [], 'nothing left at out');
          if (what === 'receive aborted') {
            const st = await settledSource(a);
            t.diagnostic(`source afterwards: ${st}`);
            assert.doesNotMatch(st, /migration completed/);
          }
        } finally {
          h?.abort(new Error('test over'));
          await a.kill();
          rmSync(dir, { recursive: true, force: true });
        }
      });
    }
  });
}
