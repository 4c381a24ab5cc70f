// `multifd save` as a user runs it: the CLI against a running guest's QMP socket, on QEMU 10 and 11.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { createServer, type AddressInfo, type Socket } from 'node:net';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration, type QemuVersion } from '../helpers/qemu.js';
import { checkInvariant, runsOn } from '../helpers/guest-checks.js';
import { restoreSnapshot } from '../helpers/snapshot.js';

const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: 120_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

/** The running test guest with a second QMP socket for `save` (QEMU serves one client per socket), in a fresh folder. */
async function guestWithSaveSocket(version: QemuVersion): Promise<{ dir: string; saveSock: string; out: string; src: Awaited<ReturnType<typeof startQemu>> }> {
  const dir = mkdtempSync('/tmp/multifd-save-test-');
  const saveSock = join(dir, 'save.sock');
  const src = await startQemu({ version, memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${saveSock},server=on,wait=off`] });
  return { dir, saveSock, out: join(dir, 'vm.mig'), src };
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`;
  describe(`save CLI with QEMU ${version}`, { skip, timeout: 180_000 }, () => {
    test('saves a running guest, restores settings, --resume keeps it running; the file restores and runs on', async (t) => {
      const { dir, saveSock, out, src } = await guestWithSaveSocket(version);
      let dst;
      try {
        await waitGuestPasses(src, 3);
        const before = await src.qmp.execute('query-migrate-parameters');
        const r = await cli(['save', '--qmp', `unix:${saveSock}`, '--out', out, '--channels', '4', '--downtime-limit', '20000', '--resume', '--json']);
        assert.equal(r.code, 0, `save failed: ${r.stderr}`);
        const s = JSON.parse(r.stdout);
        t.diagnostic(`QEMU ${version}: ${s.transferred} bytes in ${s['total-time']} ms (${s.mbps} Mbit/s), ${s['dirty-sync-count']} syncs, downtime ${s.source.downtime} ms`);
        assert.equal(s.status, 'completed');
        assert.equal(s.source.status, 'completed');
        assert.equal(s['dirty-sync-count'], s.source.ram['dirty-sync-count'], "dirty-sync-count is QEMU's own");
        assert.equal(s.channels.length, 4);
        assert.equal(s.source['run-state-after'], 'running', '--resume ran cont');
        assert.ok(s.transferred > 99 * 1024 * 1024, 'the dirtied range went over the wire');
        const after = await src.qmp.execute('query-migrate-parameters');
        assert.equal(after['max-bandwidth'], before['max-bandwidth'], 'max-bandwidth restored');
        assert.equal(after['multifd-channels'], before['multifd-channels'], 'multifd-channels restored');
        assert.equal(after['downtime-limit'], before['downtime-limit'], 'downtime-limit restored');
        const caps = await src.qmp.execute('query-migrate-capabilities');
        assert.equal(caps.find((c: { capability: string }) => c.capability === 'multifd').state, false, 'multifd capability restored');
        assert.equal(caps.find((c: { capability: string }) => c.capability === 'return-path').state, false, 'return-path capability restored');
        assert.equal(s['return-path'], true, 'save uses the return path');
        assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('.')), [], 'no temporary file left');
        await src.kill();

        dst = await startQemu({ version, memMiB: 128, bootSector: true, incoming: 'defer', paused: true });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
        await dst.qmp.execute('migrate-incoming', { uri: `file:${out}` });
        const m = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        assert.equal(m.status, 'completed', m['error-desc']);
        const restored = await dumpGuestMemory(dst, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
        const inv = checkDirtyInvariant(restored);
        assert.ok(inv.ok, inv.reason);
        const passes = countPasses(dst.serialLog());
        await dst.qmp.execute('cont');
        await waitGuestPasses(dst, passes + 2);
        await dst.qmp.execute('stop');
        const later = await dumpGuestMemory(dst, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
        assert.ok(checkDirtyInvariant(later).ok);
        assert.ok(!later.equals(restored), 'the guest ran on after restore');
      } finally {
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('a save that cannot write its file fails clearly and leaves the VM running', async () => {
      const { dir, saveSock, src } = await guestWithSaveSocket(version);
      try {
        await waitGuestPasses(src, 2);
        const r = await cli(['save', '--qmp', `unix:${saveSock}`, '--out', join(dir, 'missing-dir', 'vm.mig')]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /multifd: error: cannot create the snapshot in .*missing-dir/);
        const st = await src.qmp.execute('query-status');
        assert.equal(st.status, 'running');
        assert.equal(existsSync(join(dir, 'missing-dir')), false);
      } finally {
        await src.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('a save refuses a source that is already migrating, and leaves that migration alone', async () => {
      const dir = mkdtempSync('/tmp/multifd-save-test-');
      const saveSock = join(dir, 'save.sock');
      // A destination that accepts and never reads: the source's migration stays under way.
      const held: Socket[] = [];
      const sink = createServer((s) => held.push(s));
      sink.listen(0, '127.0.0.1');
      await once(sink, 'listening');
      const src = await startQemu({ version, memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${saveSock},server=on,wait=off`] });
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('migrate', { uri: `tcp:127.0.0.1:${(sink.address() as AddressInfo).port}` });
        const caps = await src.qmp.execute('query-migrate-capabilities');
        const r = await cli(['save', '--qmp', `unix:${saveSock}`, '--out', join(dir, 'vm.mig')]);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /the source already has a migration in state "(setup|active)"/);
        assert.equal(existsSync(join(dir, 'vm.mig')), false);
        const m = await src.qmp.execute('query-migrate');
        assert.ok(m.status === 'active' || m.status === 'setup', `the source's own migration went on (${m.status})`);
        assert.deepEqual(await src.qmp.execute('query-migrate-capabilities'), caps, 'capabilities untouched');
        assert.equal((await src.qmp.execute('query-status')).status, 'running');
      } finally {
        await src.qmp.execute('migrate_cancel').catch(() => {});
        await src.kill();
        for (const s of held) s.destroy();
        sink.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    // The watch and the forced switchover are ours; one QEMU version shows them.
    test('a save that cannot converge warns once with QEMU\'s numbers; --switchover-after ends it, --auto-converge is put back; the snapshot restores and runs on', { skip: version !== '11' && 'the convergence watch is ours; QEMU 11 shows it' }, async (t) => {
      const { dir, saveSock, out, src } = await guestWithSaveSocket(version);
      let dst;
      try {
        await waitGuestPasses(src, 2);
        const before = await src.qmp.execute('query-migrate-parameters');
        const capsBefore = await src.qmp.execute('query-migrate-capabilities');
        // 1 ms of downtime: the guest rewrites more than that between two rounds, for ever.
        const r = await cli(['save', '--qmp', `unix:${saveSock}`, '--out', out, '--downtime-limit', '1', '--switchover-after', '12', '--auto-converge', '--json']);
        assert.equal(r.code, 0, `save failed: ${r.stderr}`);
        const s = JSON.parse(r.stdout);
        t.diagnostic(`QEMU ${version}: ${s['dirty-sync-count']} syncs, not-converging ${JSON.stringify(s.source['not-converging'])}, forced after ${s.source['switchover-forced-after-ms']} ms, downtime ${s.source.downtime} ms`);
        assert.equal(r.stderr.match(/warning: the source is not converging/g)?.length, 1, `one warning: ${r.stderr}`);
        assert.match(r.stderr, /after \d+ rounds in [\d.]+ s QEMU still expects \d+ ms of downtime against a limit of 1 ms/);
        assert.match(r.stderr, /forcing the switchover after 1\d\.\d s of iterating/);
        const nc = s.source['not-converging'];
        assert.ok(nc.rounds >= 5 && nc['active-ms'] >= 10_000 && nc['expected-downtime'] > 1, JSON.stringify(nc));
        assert.ok(s.source['switchover-forced-after-ms'] >= 12_000, 'forced once 12 s of iterating had passed');
        assert.equal(s.source.status, 'completed');
        assert.ok(s['dirty-sync-count'] > nc.rounds, 'rounds went on after the warning');
        assert.equal((await src.qmp.execute('query-migrate-parameters'))['downtime-limit'], before['downtime-limit'], 'downtime-limit put back after the forced switchover');
        assert.deepEqual(await src.qmp.execute('query-migrate-capabilities'), capsBefore, 'auto-converge put back');
        await src.kill();

        dst = await restoreSnapshot({ version, memMiB: 128, file: out, bootSector: true });
        await runsOn(dst, await checkInvariant(dst, 'the snapshot of a forced switchover'));
      } finally {
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}
