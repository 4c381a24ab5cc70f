// Streams beyond plain precopy against real QEMU 10 and 11 (issues #24, #25): `save --background`
// (QEMU's background-snapshot) on the running dirtying guest, and XBZRLE rounds into `receive`.
// Every check looks at the guest's memory.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { migrateToReceive, restoreSnapshot } from '../helpers/snapshot.js';
import { save } from '../../src/conversations/save.js';
import { send } from '../../src/conversations/send.js';
import { relay } from '../../src/conversations/relay.js';
import { verify } from '../../src/conversations/verify.js';
import { freePort, startDestination } from '../helpers/send.js';
import { DestinationError, restore } from '../../src/conversations/restore.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { checkInvariant, runsOn } from '../helpers/guest-checks.js';

const MEM = 128;

/** The dirtied range as the snapshot holds it. */
/**
 * Keeps a source that started with a 1 ms downtime limit iterating until it synced its dirty bitmap
 * `rounds` times (so XBZRLE deltas flow), then lets it switch over.
 */
async function holdRounds(src: QemuInstance, rounds: number): Promise<void> {
  for (;;) {
    const m = await src.qmp.execute('query-migrate');
    if ((m.ram?.['dirty-sync-count'] ?? 0) >= rounds || ['completed', 'failed', 'cancelled'].includes(m.status)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': 100000 });
}

/**
 * B's query-migrate for a failure message, not waited for long: a B whose incoming migration waits
 * on a sync that never comes did not answer QMP at all (the test then hung until its timeout
 * instead of reporting the relay's own error).
 */
async function stateForError(q: QemuInstance): Promise<unknown> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      q.qmp.execute('query-migrate').catch((e: Error) => ({ status: `query-migrate failed: ${e.message}` })),
      new Promise((res) => { timer = setTimeout(() => res({ status: 'no answer to query-migrate within 5 s' }), 5000); }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** The relay's summary; when it fails, the error also says what B reported and how B ended. */
async function relayDone(r: ReturnType<typeof relay>, dst: QemuInstance): Promise<Awaited<ReturnType<typeof relay>['done']>> {
  return r.done.catch(async (e: Error) => {
    const mb = await stateForError(dst);
    await Promise.race([dst.exited(), new Promise((res) => setTimeout(res, 2000))]);
    throw new Error(`${e.message}; B: ${JSON.stringify(mb)}, exit ${dst.proc.exitCode} ${dst.proc.signalCode}: ${dst.stderr().slice(-2000)}`);
  });
}

async function snapshotRange(file: string): Promise<Buffer> {
  const snap = await MappedRamSnapshot.open(file);
  try {
    return await snap.readPages('pc.ram', GUEST_DIRTY_START, (GUEST_DIRTY_END - GUEST_DIRTY_START) / 4096);
  } finally {
    await snap.close();
  }
}

/** Loads the snapshot into a fresh QEMU (its own mapped-ram loader), checks the invariant, runs it on. */
async function restoresAndRuns(version: QemuVersion, file: string, want?: Buffer): Promise<void> {
  const dst = await restoreSnapshot({ version, memMiB: MEM, file, bootSector: true });
  try {
    const restored = await checkInvariant(dst, 'restored memory');
    if (want) assert.ok(restored.equals(want), 'QEMU loaded what the snapshot holds');
    await runsOn(dst, restored);
  } finally {
    await dst.kill();
  }
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`;

  describe(`save --background with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('the guest runs throughout and after (no cont); the snapshot holds its invariant; QEMU restores it and it runs on', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-bg-test-');
      const out = join(dir, 'vm.mig');
      const qmpSock = join(dir, 'save.sock');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: ['-qmp', `unix:${qmpSock},server=on,wait=off`] });
      try {
        await waitGuestPasses(src, 3);
        const capsBefore = await src.qmp.execute('query-migrate-capabilities');
        const paramsBefore = await src.qmp.execute('query-migrate-parameters');
        const passesAtStart = countPasses(src.serialLog());
        const h = save({ qmp: `unix:${qmpSock}`, out, background: true });
        const s = await h.done;
        const passesAtEnd = countPasses(src.serialLog());
        t.diagnostic(`QEMU ${version}: ${s.transferred} bytes in ${s['total-time']} ms, QEMU total ${s.source['total-time']} ms, downtime ${s.source.downtime} ms; guest passes during the save: ${passesAtEnd - passesAtStart}`);
        assert.equal(s.source.status, 'completed');
        assert.equal(s['background-snapshot'], true, 'receive saw a background snapshot');
        assert.equal(s['return-path'], false);
        assert.equal(s.channels.length, 0);
        assert.equal(typeof s.source.downtime, 'number');
        assert.equal(typeof s.source['total-time'], 'number');
        assert.equal(s.source['run-state-after'], 'running', 'running after the save, without cont');
        assert.ok(passesAtEnd > passesAtStart, `the guest made progress during the save (${passesAtStart} -> ${passesAtEnd} passes)`);
        await waitGuestPasses(src, passesAtEnd + 2);
        assert.deepEqual(await src.qmp.execute('query-migrate-capabilities'), capsBefore, 'capabilities put back');
        const paramsAfter = await src.qmp.execute('query-migrate-parameters');
        assert.equal(paramsAfter['max-bandwidth'], paramsBefore['max-bandwidth'], 'max-bandwidth put back');
        assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('.')), [], 'no temporary file left');

        const held = await snapshotRange(out);
        const inv = checkDirtyInvariant(held);
        assert.ok(inv.ok, `snapshot: ${inv.reason}`);
        await restoresAndRuns(version, out, held);
      } finally {
        await src.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('our side killed mid-save: QEMU\'s snapshot fails, the guest runs on, no complete-looking file', async () => {
      const dir = mkdtempSync('/tmp/multifd-bg-test-');
      const out = join(dir, 'vm.mig');
      const qmpSock = join(dir, 'save.sock');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: ['-qmp', `unix:${qmpSock},server=on,wait=off`] });
      try {
        await waitGuestPasses(src, 2);
        const ac = new AbortController();
        const h = save({ qmp: `unix:${qmpSock}`, out, background: true, signal: ac.signal, progressIntervalMs: 20 });
        // Abort once pages are arriving (the guest is write-protected then).
        await new Promise<void>((resolve) => h.on('progress', (p: { transferred: number }) => { if (p.transferred > 8 * 1024 * 1024) resolve(); }));
        ac.abort(new Error('killed by the test'));
        await assert.rejects(h.done, /killed by the test/);
        const m = await waitMigration(src.qmp, { timeoutMs: 30_000 });
        assert.ok(m.status === 'failed' || m.status === 'cancelled', `QEMU's snapshot ended ${m.status}`);
        assert.equal((await src.qmp.execute('query-status')).status, 'running');
        const passes = countPasses(src.serialLog());
        await waitGuestPasses(src, passes + 2, 20_000); // write protection dropped: the guest does not hang
        assert.equal(existsSync(out), false, 'no snapshot file');
        assert.deepEqual(readdirSync(dir).filter((f) => f.endsWith('.mig') || f.startsWith('.')), [], 'no temporary file left');
      } finally {
        await src.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe(`background snapshot through relay with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('A saves a background snapshot into relay (main channel); B loads it with the invariant and runs on; A never stopped', async () => {
      const dir = mkdtempSync('/tmp/multifd-bg-relay-test-');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true });
      let dst: Awaited<ReturnType<typeof startQemu>> | undefined;
      let r: ReturnType<typeof relay> | undefined;
      try {
        await waitGuestPasses(src, 2);
        const port = await freePort();
        dst = await startQemu({ version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true });
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
        r = relay({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}`, channelsIn: 0, channelsOut: 0 });
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }] });
        await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 107374182400 });
        const passesAtStart = countPasses(src.serialLog());
        await src.qmp.execute('migrate', { uri: await r.listening });
        await r.done;
        const ma = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        const mb = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        assert.equal(ma.status, 'completed');
        assert.equal(mb.status, 'completed', mb['error-desc']);
        assert.equal((await src.qmp.execute('query-status')).status, 'running', 'A runs on without cont');
        await waitGuestPasses(src, passesAtStart + 2);
        await runsOn(dst, await checkInvariant(dst, 'the destination'));
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe(`XBZRLE through relay with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('relay 0 -> 0 passes the deltas on; B loads with the invariant and runs on', async (t) => {
      const src = await startQemu({ version, memMiB: MEM, bootSector: true });
      let dst: Awaited<ReturnType<typeof startQemu>> | undefined;
      let r: ReturnType<typeof relay> | undefined;
      try {
        await waitGuestPasses(src, 2);
        const port = await freePort();
        dst = await startQemu({ version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
        r = relay({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}`, channelsIn: 0, channelsOut: 0 });
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
        await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 107374182400, 'downtime-limit': 1, 'xbzrle-cache-size': 256 * 1024 * 1024 });
        await src.qmp.execute('migrate', { uri: await r.listening });
        await holdRounds(src, 4);
        await r.done;
        const ma = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        const mb = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        t.diagnostic(`QEMU ${version}: ${ma.ram['dirty-sync-count']} syncs, xbzrle pages ${ma['xbzrle-cache']?.pages}`);
        assert.equal(ma.status, 'completed');
        assert.equal(mb.status, 'completed', mb['error-desc']);
        assert.ok((ma['xbzrle-cache']?.pages ?? 0) > 1000, 'XBZRLE pages went through');
        await runsOn(dst, await checkInvariant(dst, 'the destination'));
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await src.kill();
        await dst?.kill();
      }
    });
  });

  // Ours, not QEMU's: the conversion is the relay's. So the two versions take different paths
  // through it instead of repeating one: QEMU 10 decodes the deltas from the relay's in-memory
  // copy of re-sent pages and syncs B once per round (B's default); QEMU 11 reads each page back
  // from the --tee file (then checks that file as docs/relay.md describes it) and syncs B per
  // section (B with multifd-flush-after-each-section on, which --sync-mode section is for).
  const teePath = version === '11';
  const syncMode = teePath ? 'section' : 'round';
  describe(`XBZRLE through relay 0 -> 2 with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test(`A on its main channel with xbzrle, B with multifd 2 channels (${teePath ? '--tee, per-section syncs' : 'in-memory copy, per-round syncs'}): deltas decoded, pages as packets, B loads with the invariant and runs on${teePath ? '; the tee is a snapshot verify accepts holding B\'s memory' : ''}`, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-relay0n-');
      const tee = teePath ? join(dir, 'tee.mig') : undefined;
      const src = await startQemu({ version, memMiB: MEM, bootSector: true });
      let dst: Awaited<ReturnType<typeof startQemu>> | undefined;
      let r: ReturnType<typeof relay> | undefined;
      try {
        await waitGuestPasses(src, 2);
        const port = await freePort();
        dst = await startQemu({
          version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true,
          // A has multifd off, so only B's side of the property matters: it syncs at every RAM EOS.
          ...(syncMode === 'section' ? { extraArgs: ['-global', 'migration.multifd-flush-after-each-section=on'] } : {}),
        });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
        await dst.qmp.execute('migrate-set-parameters', { 'multifd-channels': 2 });
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
        r = relay({
          listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}`, channelsIn: 0, channelsOut: 2,
          // A's machine type says per round: B's property is what only --sync-mode can tell the relay.
          ...(syncMode === 'section' ? { syncMode } : {}),
          ...(tee ? { tee } : {}),
        });
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
        // QEMU's default cache size, which the relay's default copy matches.
        await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 107374182400, 'downtime-limit': 1, 'xbzrle-cache-size': 64 * 1024 * 1024 });
        await src.qmp.execute('migrate', { uri: await r.listening });
        await holdRounds(src, 4);
        const s = await relayDone(r, dst);
        const ma = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        const mb = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        const out = s['channels-out'];
        t.diagnostic(`QEMU ${version}: ${ma.ram['dirty-sync-count']} dirty syncs, xbzrle pages ${ma['xbzrle-cache']?.pages}; relay: ${s['multifd-syncs']} ${s['sync-mode']} syncs towards B, packets ${out.map((c) => c.packets).join('+')}${s.tee ? `; tee ${s.tee['file-size']} bytes` : ''}`);
        assert.equal(ma.status, 'completed');
        assert.equal(mb.status, 'completed', mb['error-desc']);
        assert.ok((ma['xbzrle-cache']?.pages ?? 0) > 1000, 'XBZRLE pages went through');
        assert.equal(s['sync-mode'], syncMode);
        assert.ok(s['multifd-syncs'] >= 2, 'a sync before re-sent pages and one at the end');
        assert.equal(out.length, 2);
        for (const c of out) assert.ok(c.packets > 0 && c.syncs === s['multifd-syncs'], `channel ${JSON.stringify(c)}`);
        const memB = await checkInvariant(dst, 'the destination');
        if (tee) {
          assert.equal(s.tee?.file, tee);
          assert.deepEqual(readdirSync(dir), ['tee.mig'], 'the tee committed, no temporary file left');
          const v = await verify(tee);
          assert.ok(v.ok && v.errors === 0 && v.format === 'mapped-ram', `verify accepts the tee: ${JSON.stringify(v.problems.slice(0, 3))}`);
          // docs/relay.md: a tee file that exists is the state B runs.
          const teeMem = await snapshotRange(tee);
          const inv = checkDirtyInvariant(teeMem);
          assert.ok(inv.ok, `the tee's memory: ${inv.reason}`);
          assert.ok(teeMem.equals(memB), 'the tee holds exactly the memory B loaded');
        }
        await runsOn(dst, memB);
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe(`switchover-ack with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('a source with switchover-ack on: save answers it as a QEMU destination, completes, the snapshot restores and runs on', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-swack-test-');
      const out = join(dir, 'vm.mig');
      const qmpSock = join(dir, 'save.sock');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: ['-qmp', `unix:${qmpSock},server=on,wait=off`] });
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'return-path', state: true }, { capability: 'switchover-ack', state: true }] });
        const capsBefore = await src.qmp.execute('query-migrate-capabilities');
        const h = save({ qmp: `unix:${qmpSock}`, out, downtimeLimitMs: 20000, idleTimeoutMs: 60_000 });
        const s = await Promise.race([h.done, new Promise<never>((_, rej) => setTimeout(() => rej(new Error('save did not complete within 120 s (switchover never acknowledged?)')), 120_000))]);
        t.diagnostic(`QEMU ${version} (${s.machine}): completed in ${s['total-time']} ms, downtime ${s.source.downtime} ms`);
        assert.equal(s.source.status, 'completed');
        assert.deepEqual(await src.qmp.execute('query-migrate-capabilities'), capsBefore, 'capabilities put back');
        await src.kill();
        const held = await snapshotRange(out);
        assert.ok(checkDirtyInvariant(held).ok, checkDirtyInvariant(held).reason);
        await restoresAndRuns(version, out, held);
      } finally {
        await src.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });

  describe(`XBZRLE into receive with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('several rounds of deltas, receive --channels 0 applies them; restore holds the invariant and runs on', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-xbzrle-test-');
      const out = join(dir, 'vm.mig');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true });
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
        // The dirtying guest never converges: small downtime first (rounds go by), then let it end.
        const h = await migrateToReceive(src, { channels: 0, out, params: { 'downtime-limit': 1, 'xbzrle-cache-size': 256 * 1024 * 1024 } });
        await holdRounds(src, 4);
        const s = await h.done;
        const m = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        t.diagnostic(`QEMU ${version}: ${m.ram['dirty-sync-count']} syncs, xbzrle ${JSON.stringify(m['xbzrle-cache'])}; receive applied ${s['xbzrle-pages']} deltas`);
        assert.equal(m.status, 'completed');
        assert.ok((s['xbzrle-pages'] ?? 0) > 1000, `XBZRLE deltas were applied (${s['xbzrle-pages']})`);
        const held = await snapshotRange(out);
        const inv = checkDirtyInvariant(held);
        assert.ok(inv.ok, `snapshot: ${inv.reason}`);
        await restoresAndRuns(version, out, held);
      } finally {
        await src.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}

/** A qcow2 disk with a dirty bitmap that recorded writes, on a fresh QEMU of the given side. */
function diskArgs(disk: string): string[] {
  return ['-drive', `file=${disk},format=qcow2,if=none,id=drive0,node-name=disk0`, '-device', 'virtio-blk-pci,drive=drive0,id=vblk0'];
}

async function bitmapOf(q: { qmp: { execute(c: string, a?: unknown): Promise<any> } }): Promise<{ count: number; granularity: number; sha256: string } | undefined> {
  const blocks = await q.qmp.execute('query-block');
  const bm = blocks.flatMap((b: any) => b.inserted?.['dirty-bitmaps'] ?? []).find((x: any) => x.name === 'bitmap0');
  if (!bm) return undefined;
  const sha = await q.qmp.execute('x-debug-block-dirty-bitmap-sha256', { node: 'disk0', name: 'bitmap0' });
  return { count: bm.count, granularity: bm.granularity, sha256: sha.sha256 };
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`;
  describe(`dirty-bitmaps with QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    test('save (2 channels) -> QEMU loads the snapshot, and our send replays it: the bitmap exists with the same count, granularity and content; the guest runs on', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-bitmap-test-');
      const out = join(dir, 'vm.mig');
      const disk = join(dir, 'disk.qcow2');
      const qmpSock = join(dir, 'save.sock');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: [...diskArgs(disk), '-qmp', `unix:${qmpSock},server=on,wait=off`] });
      let dst: Awaited<ReturnType<typeof startQemu>> | undefined;
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bitmap0', granularity: 65536 });
        for (const w of ['write -P 0x5a 0 192k', 'write -P 0xa5 4M 64k', 'write 9M 4k']) {
          await src.qmp.execute('human-monitor-command', { 'command-line': `qemu-io drive0 "${w}"` });
        }
        const want = await bitmapOf(src);
        assert.equal(want?.count, 320 * 1024, 'the bitmap recorded the writes');
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'dirty-bitmaps', state: true }] });
        const s = await save({ qmp: `unix:${qmpSock}`, out, channels: 2, downtimeLimitMs: 20000 }).done;
        t.diagnostic(`QEMU ${version}: bitmap ${JSON.stringify(want)}; saved in ${s['total-time']} ms`);
        assert.equal(s.source.status, 'completed');
        await src.kill();

        dst = await startQemu({ version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true, extraArgs: diskArgs(disk) });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
        await dst.qmp.execute('migrate-incoming', { uri: `file:${out}` });
        const m = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        assert.equal(m.status, 'completed', `${m['error-desc'] ?? ''} ${dst.stderr()}`);
        assert.deepEqual(await bitmapOf(dst), want, 'the bitmap as the source had it');
        const restored = await checkInvariant(dst, 'the destination');
        await runsOn(dst, restored);
        await dst.kill();

        // Our sender replays the same snapshot into a QEMU waiting on a socket (2 channels).
        const port = await freePort();
        dst = await startQemu({ version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true, extraArgs: diskArgs(disk) });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }, { capability: 'return-path', state: true }] });
        await dst.qmp.execute('migrate-set-parameters', { 'multifd-channels': 2 });
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
        await send({ file: out, to: `tcp:127.0.0.1:${port}`, channels: 2 }).done;
        const m2 = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        assert.equal(m2.status, 'completed', `${m2['error-desc'] ?? ''} ${dst.stderr()}`);
        assert.deepEqual(await bitmapOf(dst), want, 'the bitmap as the source had it, through send');
        const sent = await dumpGuestMemory(dst, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
        assert.ok(sent.equals(restored), 'send loaded the same memory as QEMU\'s own loader');
      } finally {
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('relay 2 -> 4 channels: B has the bitmap with the same count, granularity and content; the guest runs on', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-bitmap-test-');
      const disk = join(dir, 'disk.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '16M']);
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: diskArgs(disk) });
      let dst: Awaited<ReturnType<typeof startQemu>> | undefined;
      let r: ReturnType<typeof relay> | undefined;
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'bitmap0', granularity: 65536 });
        for (const w of ['write -P 0x5a 0 192k', 'write -P 0xa5 4M 64k']) {
          await src.qmp.execute('human-monitor-command', { 'command-line': `qemu-io drive0 "${w}"` });
        }
        const want = await bitmapOf(src);
        // B opens the same image (shared storage, as for a real migration), after A let go of it.
        const port = await freePort();
        dst = await startQemu({ version, memMiB: MEM, bootSector: true, incoming: 'defer', paused: true, extraArgs: ['-drive', `file=${disk},format=qcow2,if=none,id=drive0,node-name=disk0,file.locking=off`, '-device', 'virtio-blk-pci,drive=drive0,id=vblk0'] });
        await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
        await dst.qmp.execute('migrate-set-parameters', { 'multifd-channels': 4 });
        await dst.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}` });
        r = relay({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}`, channelsIn: 2, channelsOut: 4 });
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }, { capability: 'dirty-bitmaps', state: true }] });
        await src.qmp.execute('migrate-set-parameters', { 'multifd-channels': 2, 'max-bandwidth': 107374182400, 'downtime-limit': 20000 });
        await src.qmp.execute('migrate', { uri: await r.listening });
        const s = await relayDone(r, dst);
        const ma = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        const mb = await waitMigration(dst.qmp, { timeoutMs: 60_000 });
        t.diagnostic(`QEMU ${version}: relay ${JSON.stringify(s).slice(0, 160)}`);
        assert.equal(ma.status, 'completed');
        assert.equal(mb.status, 'completed', mb['error-desc']);
        assert.deepEqual(await bitmapOf(dst), want, 'B has the bitmap as A had it');
        await runsOn(dst, await checkInvariant(dst, 'the destination'));
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await src.kill();
        await dst?.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}

const HUGE_DIR = '/tmp/multifd-hugepages';

/** Mounts hugetlbfs (and in the 11.1 chroot, whose /tmp bind mount does not see later mounts); a reason to skip when it cannot. */
function hugepagesReady(version: QemuVersion, mib: number): string | undefined {
  try {
    const free = () => Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    const need = mib / 2;
    if (free() < need) {
      const total = Number(readFileSync('/proc/sys/vm/nr_hugepages', 'utf8'));
      writeFileSync('/proc/sys/vm/nr_hugepages', String(total + need - free() + 4));
    }
    if (free() < need) return `only ${free()} free 2 MiB huge pages (need ${need})`;
    const dirs = [HUGE_DIR, ...(version === '11' ? ['/opt/qemu-latest' + HUGE_DIR] : [])];
    for (const d of dirs) {
      mkdirSync(d, { recursive: true });
      try {
        execFileSync('mountpoint', ['-q', d]);
      } catch {
        execFileSync('mount', ['-t', 'hugetlbfs', '-o', 'pagesize=2M', 'none', d]);
      }
    }
    return undefined;
  } catch (e) {
    return `hugepages unavailable (needs root): ${(e as Error).message.split('\n')[0]}`;
  }
}

/** pc.ram backed by 2 MiB hugetlbfs pages. */
const hugeRam = (mib: number): string[] => ['-object', `memory-backend-file,id=pc.ram,size=${mib}M,mem-path=${HUGE_DIR},share=off`, '-machine', 'memory-backend=pc.ram'];
const HUGE_PAGE = 2 * 1024 * 1024;

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`;
  describe(`hugepage-backed guest with postcopy-ram, QEMU ${version}`, { skip, timeout: 240_000 }, () => {
    let why: string | undefined;
    let dir = '';
    /** The hugepage guest's snapshot, by the first test; the restore test uses it. */
    let snapshot: string | undefined;
    before(() => {
      // A and B of the relay test are both hugepage-backed.
      why = hugepagesReady(version, 2 * MEM);
      dir = mkdtempSync('/tmp/multifd-huge-test-');
    });
    after(() => rmSync(dir, { recursive: true, force: true }));

    test('receive reads the block list with its page size; QEMU restores the snapshot and the guest runs on', async (t) => {
      if (why) {
        t.skip(why);
        return;
      }
      const out = join(dir, 'vm.mig');
      const src = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: hugeRam(MEM) });
      try {
        await waitGuestPasses(src, 2);
        await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'postcopy-ram', state: true }] });
        const h = await migrateToReceive(src, { channels: 0, out, params: { 'downtime-limit': 20000 } });
        const s = await h.done;
        const m = await waitMigration(src.qmp, { timeoutMs: 60_000 });
        t.diagnostic(`QEMU ${version}: ${s.transferred} bytes, blocks ${JSON.stringify(s.blocks.map((b) => b.name))}`);
        assert.equal(m.status, 'completed');
        assert.equal(s['return-path'], true);
        await src.kill();
        const held = await snapshotRange(out);
        assert.ok(checkDirtyInvariant(held).ok, checkDirtyInvariant(held).reason);
        await restoresAndRuns(version, out, held);
        snapshot = out;
      } finally {
        await src.kill();
      }
    });

    test('restore --postcopy into a hugepage-backed destination: 2 MiB pages learnt over QMP, announced, sent whole; the guest runs during postcopy, its invariant holds and it runs on', async (t) => {
      if (why || !snapshot) {
        t.skip(why ?? 'no snapshot (the receive test failed)');
        return;
      }
      const d = await startDestination(dir, { version, memMiB: MEM, bootSector: true, paused: false, extraArgs: hugeRam(MEM) });
      try {
        // Told a page size the destination contradicts: refused before the migration starts.
        await assert.rejects(restore({ file: snapshot, qmp: d.qmp, channels: 0, postcopy: { pageSizes: { 'pc.ram': 4096 } } }).done,
          (e: Error) => e instanceof DestinationError && /--page-size pc\.ram=4096, but the destination QEMU reports 2097152-byte pages/.test(e.message));
        assert.equal((await d.q.qmp.execute('query-migrate')).status ?? 'none', 'none', 'no migration was started');
        // Precopy ends inside a huge page (3 MiB + 4 KiB of pages): that host page goes again, whole, after the switch.
        // QEMU 11: multifd before the switch and requested pages on the preempt channel.
        const preempt = version === '11';
        const h = restore({ file: snapshot, qmp: d.qmp, channels: version === '11' ? 2 : 0, postcopy: { preempt, precopyBytes: 3 * 1024 * 1024 + 4096, bandwidth: 32 * 1024 * 1024 } });
        let s;
        try {
          s = await h.done;
        } catch (e) {
          throw new Error(`${(e as Error).message}\ndestination stderr:\n${d.q.stderr()}`);
        }
        const pc = s.postcopy!;
        t.diagnostic(`QEMU ${version}: ${s.channels.length} ch${preempt ? ' + preempt' : ''}, running after ${s['time-to-running']} ms, complete after ${s['time-to-complete']} ms; ${pc['precopy-pages']} pages before the switch, ${pc['postcopy-pages']} after, ${pc.requests} requests, ${pc['requested-pages']} pages for them (${pc['preempt-pages']} on preempt), ${pc['discard-ranges']} discard ranges${s.notes ? `; notes: ${s.notes.join('; ')}` : ''}`);
        assert.deepEqual(pc['page-sizes'], { 'pc.ram': HUGE_PAGE }, 'pc.ram announced with 2 MiB pages, the other blocks with none');
        assert.equal(s.destinationQemu.status, 'completed');
        assert.ok(s['time-to-running'] !== undefined && s['time-to-running'] < s['time-to-complete'], 'the guest ran before every page was there');
        assert.ok(pc.requests > 0, 'the running guest asked for (huge) pages');
        assert.equal(pc['requested-pages'] % (HUGE_PAGE / 4096), 0, 'requests answered with whole huge pages');
        if (preempt) assert.ok(pc['preempt-pages'] > 0 && pc['preempt-pages'] % (HUGE_PAGE / 4096) === 0, `whole huge pages on the preempt channel (${pc['preempt-pages']} pages)`);
        const totalPages = s.blocks.reduce((n, b) => n + b['used-length'] / 4096, 0);
        assert.equal(pc['precopy-pages'] + pc['postcopy-pages'], totalPages, 'every page once, the partly sent huge page counted after the switch');
        await d.q.qmp.execute('stop');
        await runsOn(d.q, await checkInvariant(d.q, 'the destination after restore --postcopy'));
      } finally {
        await d.q.kill();
      }
    });

    test(`relay, A and B hugepage-backed, switched to postcopy mid-way${version === '11' ? ' (multifd 2 ch, postcopy-preempt)' : ''}: B asks A for pages through the relay, both complete, B\'s invariant holds and it runs on`, async (t) => {
      if (why) {
        t.skip(why);
        return;
      }
      const channels = version === '11' ? 2 : 0;
      // QEMU 11 also with postcopy-preempt: requested huge pages come back on their own channel.
      const preempt = version === '11';
      const caps = [{ capability: 'postcopy-ram', state: true }, ...(channels > 0 ? [{ capability: 'multifd', state: true }] : []), ...(preempt ? [{ capability: 'postcopy-preempt', state: true }] : [])];
      const a = await startQemu({ version, memMiB: MEM, bootSector: true, extraArgs: hugeRam(MEM) });
      const b = await startDestination(dir, { version, memMiB: MEM, bootSector: true, paused: false, extraArgs: hugeRam(MEM) });
      let r: ReturnType<typeof relay> | undefined;
      try {
        await waitGuestPasses(a, 2);
        await b.q.qmp.execute('migrate-set-capabilities', { capabilities: caps });
        if (channels > 0) await b.q.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels });
        const bUri = `tcp:127.0.0.1:${await freePort()}`;
        await b.q.qmp.execute('migrate-incoming', { uri: bUri, 'exit-on-error': false });
        r = relay({ listen: 'tcp:127.0.0.1:0', to: bUri, channelsIn: channels, channelsOut: channels });
        await a.qmp.execute('migrate-set-capabilities', { capabilities: caps });
        // After the switch A's background scan crawls, so B's guest faults run ahead of it.
        await a.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 107374182400, 'downtime-limit': 1, 'max-postcopy-bandwidth': 1024 * 1024, ...(channels > 0 ? { 'multifd-channels': channels } : {}) });
        await a.qmp.execute('migrate', { uri: await r.listening });
        for (const deadline = Date.now() + 60_000; ;) {
          const st = await a.qmp.execute('query-migrate');
          if (st.status !== 'active' && st.status !== 'setup') throw new Error(`A's migration is ${st.status} before the switch: ${st['error-desc'] ?? ''}`);
          // Mid-way: a part of RAM went in precopy (placed as precopy pages, then discarded where dirtied).
          if ((st.ram?.transferred ?? 0) >= 32 * 1024 * 1024 || Date.now() > deadline) break;
          await new Promise((res) => setTimeout(res, 50));
        }
        await a.qmp.execute('migrate-start-postcopy');
        for (const until = Date.now() + 20_000; ;) {
          const st = await a.qmp.execute('query-migrate');
          if ((st.ram?.['postcopy-requests'] ?? 0) >= 8 || ['completed', 'failed', 'cancelled', 'postcopy-paused'].includes(st.status) || Date.now() > until) break;
          await new Promise((res) => setTimeout(res, 20));
        }
        await a.qmp.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });
        let s;
        try {
          s = await r.done;
        } catch (e) {
          throw new Error(`${(e as Error).message}\nA: ${JSON.stringify(await a.qmp.execute('query-migrate').catch(() => undefined))}\nB stderr:\n${b.q.stderr()}`);
        }
        t.diagnostic(`QEMU ${version}, ${channels} ch: relay ${s['total-time']} ms, postcopy ${JSON.stringify(s.postcopy)}`);
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 60_000 })).status, 'completed', 'A completed');
        const mb = await waitMigration(b.q.qmp, { timeoutMs: 60_000 });
        assert.equal(mb.status, 'completed', `B completed ${mb['error-desc'] ?? ''}`);
        assert.ok(s.postcopy, 'the relay saw the switch');
        assert.ok(s.postcopy['page-requests'] > 0, 'B asked for pages and the requests went to A');
        assert.equal(s.postcopy['preempt-channel'], preempt);
        if (preempt) assert.ok(s.postcopy['preempt-pages'] > 0 && s.postcopy['preempt-pages'] % 512 === 0, `whole huge pages on the relayed preempt channel (${s.postcopy['preempt-pages']} pages)`);
        await b.q.qmp.execute('stop');
        await runsOn(b.q, await checkInvariant(b.q, 'B after the relayed postcopy'));
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await a.kill();
        await b.q.kill();
      }
    });
  });
}
