/**
 * Proves the dirtying guest and the QEMU harness work on each installed QEMU, so a
 * migration test that fails the invariant points at the migration, not the guest.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  GUEST_DIRTY_END,
  GUEST_DIRTY_START,
  checkDirtyInvariant,
} from '../guest/bootsector.js';
import {
  countPasses,
  dumpGuestMemory,
  haveQemu,
  qemuBinary,
  startQemu,
  waitGuestPasses,
  type QemuVersion,
} from '../helpers/qemu.js';
import { QmpClient, QmpCommandError } from '../../src/transports/qmp-client.js';

const RANGE = GUEST_DIRTY_END - GUEST_DIRTY_START;

for (const version of ['10', '11'] as QemuVersion[]) {
  const present = haveQemu(version);
  const skip = present ? false : `QEMU ${version} not available (${qemuBinary(version)} does not run)`;

  describe(`QEMU ${version}`, { skip, timeout: 60_000 }, () => {
    test('boot-sector guest keeps dirtying memory and holds the invariant', async (t) => {
      const q = await startQemu({ version, memMiB: 128, bootSector: true });
      try {
        const started = Date.now();
        const stopEvent = q.qmp.waitForEvent('STOP', 10_000);
        await waitGuestPasses(q, 2, 20_000);
        await q.qmp.execute('stop');
        await stopEvent;
        const status = await q.qmp.execute('query-status');
        assert.equal(status.running, false);

        const passes1 = countPasses(q.serialLog());
        const elapsed = (Date.now() - started) / 1000;
        t.diagnostic(`QEMU ${version}: ${passes1} passes in ${elapsed.toFixed(2)} s after QMP came up`);

        const mem1 = await dumpGuestMemory(q, GUEST_DIRTY_START, RANGE);
        const r1 = checkDirtyInvariant(mem1);
        assert.ok(r1.ok, `first dump: ${r1.reason}`);

        const resumed = q.qmp.waitForEvent('RESUME', 10_000);
        const contAt = Date.now();
        await q.qmp.execute('cont');
        await resumed;
        await waitGuestPasses(q, passes1 + 3, 20_000);
        await q.qmp.execute('stop');
        const passes2 = countPasses(q.serialLog());
        const rate = (passes2 - passes1) / ((Date.now() - contAt) / 1000);
        t.diagnostic(`QEMU ${version}: ${passes2 - passes1} passes after cont, ~${rate.toFixed(0)} passes/s steady state`);

        const mem2 = await dumpGuestMemory(q, GUEST_DIRTY_START, RANGE);
        const r2 = checkDirtyInvariant(mem2);
        assert.ok(r2.ok, `second dump: ${r2.reason}`);
        assert.notDeepEqual([r2.value, r2.boundary], [r1.value, r1.boundary], 'guest memory did not change after cont');
        assert.notEqual(r2.value, r1.value, 'at least one full pass happened, so the value must move');
      } catch (err) {
        t.diagnostic(`QEMU stderr:\n${q.stderr()}`);
        throw err;
      } finally {
        await q.kill();
      }
    });

    test('QMP client: greeting, command errors, closed connection', async () => {
      const q = await startQemu({ version, memMiB: 32, paused: true });
      try {
        assert.equal(q.qmp.greeting?.QMP.version.qemu.major, Number(version));
        await assert.rejects(
          q.qmp.execute('no-such-command'),
          (e: unknown) => e instanceof QmpCommandError && e.errorClass === 'CommandNotFound' && e.command === 'no-such-command',
        );
        await assert.rejects(
          q.qmp.execute('pmemsave', { val: 0 }),
          (e: unknown) => e instanceof QmpCommandError && /^QMP pmemsave failed: /.test(e.message),
        );
        const status = await q.qmp.execute('query-status');
        assert.equal(status.status, 'prelaunch');
        const quitting = q.qmp.waitForEvent('SHUTDOWN', 10_000);
        await q.qmp.execute('quit');
        await quitting;
        await q.exited();
        await assert.rejects(q.qmp.execute('query-status'), /QMP connection to unix:.* closed/);
      } finally {
        await q.kill();
      }
    });
  });
}

test('QMP connect to a missing socket names the address', async () => {
  await assert.rejects(
    QmpClient.connect('unix:/tmp/multifd-no-such-dir/qmp.sock', { timeoutMs: 2_000 }),
    /unix:\/tmp\/multifd-no-such-dir\/qmp\.sock.*does not exist/,
  );
});
