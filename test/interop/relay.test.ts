/**
 * relay against real QEMU 10 and 11, per version: a running test guest on QEMU A migrates live
 * through the relay to QEMU B (started with -S, so its memory can be read before it runs):
 *  1. 2 → 4 channels (library), A with the return path: A completes only once B confirmed;
 *  2. 4 → 1 channels, none → zstd, with --tee (CLI as a child process): B loads it, and the tee,
 *     restored into a third QEMU, holds the same memory as B;
 *  3. per-section sync (multifd-flush-after-each-section=on on A and B), zstd → zlib;
 *  4. B killed mid-migration: the relay fails, A's migration fails, A's guest runs on, and a
 *     second migration through a new relay to a new B succeeds;
 *  5. A killed mid-migration: the relay fails, B's incoming migration fails, no tee file;
 *  6. multifd off on both sides, A without a return path (the relay opens its own to B);
 *  7. zstd and zlib on 2 channels on both sides: A's compressed packets go on to B as they came.
 * On B: the guest's memory invariant holds after the migration, and again after it ran on.
 * Every path QEMU sees is under /tmp (QEMU 11 runs in a chroot that only shares /tmp).
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, qemuBinary, runStateSoon, startQemu, waitGuestPasses, waitMigration, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { cli, freePort, settle, startDestination, startListeningCli, type Destination } from '../helpers/send.js';
import { relay, type RelayHandle, type RelayOptions, type RelaySummary } from '../../src/conversations/relay.js';
import type { RestoreSummary } from '../../src/conversations/restore.js';

const MEM_MIB = 128;
const DIRTY_RANGE = GUEST_DIRTY_END - GUEST_DIRTY_START;
const PER_SECTION = ['-global', 'migration.multifd-flush-after-each-section=on'];

interface Side {
  channels: number;
  compression?: string;
  extraArgs?: string[];
}

/** A running guest, dirtying memory. */
async function startSource(version: QemuVersion, extraArgs: string[] = []): Promise<QemuInstance> {
  const q = await startQemu({ version, memMiB: MEM_MIB, bootSector: true, extraArgs });
  await waitGuestPasses(q, 2, 30_000);
  return q;
}

/** QEMU B: -incoming defer, -S, multifd set up, listening on a fresh port. */
async function startB(dir: string, version: QemuVersion, o: Side): Promise<{ d: Destination; uri: string }> {
  const d = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true, ...(o.extraArgs ? { extraArgs: o.extraArgs } : {}) });
  if (o.channels > 0) {
    await d.q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
    await d.q.qmp.execute('migrate-set-parameters', { 'multifd-channels': o.channels, 'multifd-compression': o.compression ?? 'none' });
  }
  const uri = `tcp:127.0.0.1:${await freePort()}`;
  await d.q.qmp.execute('migrate-incoming', { uri, 'exit-on-error': false });
  return { d, uri };
}

/** Starts A's migration to `uri` with multifd (and the return path unless told otherwise). */
async function migrateA(a: QemuInstance, uri: string, o: Side & { returnPath?: boolean; maxBandwidth?: number; downtimeLimitMs?: number }): Promise<void> {
  const have: { capability: string }[] = await a.qmp.execute('query-migrate-capabilities');
  await a.qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'multifd', state: o.channels > 0 },
      { capability: 'return-path', state: o.returnPath ?? true },
      ...(have.some((c) => c.capability === 'mapped-ram') ? [{ capability: 'mapped-ram', state: false }] : []),
    ],
  });
  await a.qmp.execute('migrate-set-parameters', {
    'max-bandwidth': o.maxBandwidth ?? 107374182400,
    // A TCG guest dirties memory fast; a generous downtime lets the migration converge. With
    // compression QEMU estimates its bandwidth from the compressed bytes it wrote but the time
    // left from the uncompressed bytes it still holds, so a guest whose pages compress ~100:1
    // could iterate for ever under 20 s (seen: 140 rounds, expected downtime 68 s, on a loaded
    // machine); 300 s lets it switch over after the next round.
    'downtime-limit': o.downtimeLimitMs ?? (o.compression ? 300_000 : 20000),
    ...(o.channels > 0 ? { 'multifd-channels': o.channels, 'multifd-compression': o.compression ?? 'none' } : {}),
  });
  await a.qmp.execute('migrate', { uri });
}

/**
 * Keeps A iterating (a downtime it cannot meet) until it has synced its dirty bitmap `rounds`
 * times, then lets it converge: many rounds re-send the same pages, which is what ordering needs.
 */
async function holdRounds(a: QemuInstance, rounds: number): Promise<number> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const st = await a.qmp.execute('query-migrate');
    const n: number = st.ram?.['dirty-sync-count'] ?? 0;
    if (st.status !== 'active' && st.status !== 'setup') throw new Error(`A's migration is ${st.status} (${st['error-desc'] ?? ''}) while holding it in iteration`);
    if (n >= rounds || Date.now() > deadline) {
      await a.qmp.execute('migrate-set-parameters', { 'downtime-limit': 20000 });
      return n;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** B loaded a consistent guest, which runs on with the invariant intact. Returns B's memory as loaded. */
async function assertGuestRunsOn(t: { diagnostic(s: string): void }, b: QemuInstance, what: string): Promise<Buffer> {
  const st = await waitMigration(b.qmp, { timeoutMs: 60_000 });
  assert.equal(st.status, 'completed', `${what}: B's incoming migration completed`);
  assert.equal((await b.qmp.execute('query-status')).running, false, 'the -S destination is paused after loading');
  const mem0 = await dumpGuestMemory(b, GUEST_DIRTY_START, DIRTY_RANGE);
  const r0 = checkDirtyInvariant(mem0);
  t.diagnostic(`${what}: B loaded value=${r0.value} boundary=${r0.boundary}${r0.reason ? ` (${r0.reason})` : ''}`);
  assert.ok(r0.ok, `${what}: B's guest memory is inconsistent: ${r0.reason}`);
  const passes = countPasses(b.serialLog());
  await b.qmp.execute('cont');
  await waitGuestPasses(b, passes + 2, 30_000);
  await b.qmp.execute('stop');
  const mem1 = await dumpGuestMemory(b, GUEST_DIRTY_START, DIRTY_RANGE);
  const r1 = checkDirtyInvariant(mem1);
  assert.ok(r1.ok, `${what}: B's guest broke the invariant after running: ${r1.reason}`);
  assert.ok(!mem1.equals(mem0), `${what}: B's guest memory changed after cont`);
  return mem0;
}

function assertRelaySummary(s: RelaySummary, inn: Side, out: Side, what: string): void {
  assert.equal(s.status, 'completed');
  assert.equal(s.destination, 'confirmed');
  assert.equal(s['channels-in'].length, inn.channels, `${what}: channels in`);
  assert.equal(s['channels-out'].length, out.channels, `${what}: channels out`);
  assert.equal(s['compression-in'], inn.compression ?? 'none');
  assert.equal(s['compression-out'], out.compression ?? 'none');
  assert.ok(s.normal > DIRTY_RANGE / 4096, `${what}: the dirtied range went over at least once (normal=${s.normal})`);
  assert.ok(s['multifd-syncs'] >= 2, `${what}: setup sync and at least one round`);
  for (const c of s['channels-out']) assert.equal(c.syncs, s['multifd-syncs'], `${what}: B channel ${c.id} carried one SYNC per sync point`);
  const pagesOut = s['channels-out'].reduce((n, c) => n + c.normalPages, 0);
  const pagesIn = s['channels-in'].reduce((n, c) => n + c.normalPages, 0);
  assert.equal(pagesOut, pagesIn, `${what}: every multifd page that came in went out`);
}

function line(s: RelaySummary): string {
  return `${s['total-time']} ms, ${s['bytes-in']} bytes in, ${s['bytes-out']} out, ${s.normal} pages, ${s.duplicate} zero, ${s['multifd-syncs']} syncs (${s['sync-mode']}), ${s['compression-in']} → ${s['compression-out']}, ${s['channels-in'].length} → ${s['channels-out'].length} channels`;
}

async function killAll(...qs: (QemuInstance | Destination | undefined)[]): Promise<void> {
  await Promise.all(qs.map((x) => (x ? ('q' in x ? x.q : x).kill() : undefined)));
}

type MigrateSide = Side & { returnPath?: boolean; maxBandwidth?: number; downtimeLimitMs?: number };

/**
 * The skeleton of most tests below: a running guest on A migrates through a library relay to B
 * (started for `out`); `check` gets the relay's summary while A and B are still up, and both are
 * torn down whatever happens. holdRounds: A's rounds to hold in iteration first (see holdRounds).
 */
async function relayRun(
  version: QemuVersion,
  o: { sourceArgs?: string[]; inn: MigrateSide; out: Side; relay?: Partial<RelayOptions>; holdRounds?: number },
  check: (run: { a: QemuInstance; b: Destination; s: RelaySummary; held: number }) => Promise<void>,
): Promise<void> {
  const dir = mkdtempSync('/tmp/multifd-relay-');
  let a: QemuInstance | undefined;
  let b: Destination | undefined;
  let r: RelayHandle | undefined;
  try {
    a = await startSource(version, o.sourceArgs);
    const B = await startB(dir, version, o.out);
    b = B.d;
    r = relay({ listen: 'tcp:127.0.0.1:0', to: B.uri, channelsIn: o.inn.channels, channelsOut: o.out.channels, ...o.relay });
    await migrateA(a, await r.listening, o.inn);
    const held = o.holdRounds ? await holdRounds(a, o.holdRounds) : 0;
    await check({ a, b, s: await r.done, held });
  } finally {
    r?.abort(new Error('test over'));
    await r?.done.catch(() => {});
    await killAll(a, b);
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)} does not run)`;

  describe(`relay with QEMU ${version}`, { skip }, () => {
    test('running guest, 2 → 4 channels: A completes once B confirmed; B runs on with the invariant', { timeout: 150_000 }, async (t) => {
      const inn: Side = { channels: 2 };
      const out: Side = { channels: 4 };
      await relayRun(version, { inn: { ...inn, downtimeLimitMs: 1, maxBandwidth: 512 * 1024 * 1024 }, out, holdRounds: 6 }, async ({ a, b, s, held }) => {
        t.diagnostic(`relay: ${line(s)}`);
        const stA = await waitMigration(a.qmp, { timeoutMs: 30_000 });
        assert.equal(stA.status, 'completed', 'A completed');
        assertRelaySummary(s, inn, out, '2 → 4');
        assert.ok(held >= 6, `A iterated at least 6 rounds before converging (${held})`);
        assert.ok(s['multifd-syncs'] >= 6, `every round was a sync point through the relay (${s['multifd-syncs']})`);
        assert.equal(s['return-path'], true, 'A opened the return path and the relay answered on it');
        assert.equal(s['sync-mode'], 'round');
        t.diagnostic(`A: downtime ${stA.downtime} ms, dirty-sync-count ${stA.ram?.['dirty-sync-count']}`);
        await assertGuestRunsOn(t, b.q, '2 → 4');
      });
    });

    test('running guest, 4 → 1 channels, none → zstd, --tee (CLI): B and the tee restored in a third QEMU hold the same memory', { timeout: 240_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-relay-');
      let a: QemuInstance | undefined;
      let b: Destination | undefined;
      let c: Destination | undefined;
      try {
        a = await startSource(version);
        const inn: Side = { channels: 4 };
        const out: Side = { channels: 1, compression: 'zstd' };
        const B = await startB(dir, version, out);
        b = B.d;
        const tee = join(dir, 'tee.mig');
        const port = await freePort();
        const cliRelay = await startListeningCli(['relay', '--listen', `tcp:127.0.0.1:${port}`, '--to', B.uri, '--channels-in', '4', '--channels-out', '1', '--compression-out', 'zstd', '--tee', tee, '--json']);
        await migrateA(a, `tcp:127.0.0.1:${port}`, inn);
        const res = await settle(cliRelay.done, 120_000, 'relay CLI');
        assert.ok(res.ok);
        assert.equal(res.value.code, 0, `relay CLI failed: ${res.value.stderr}`);
        const s = JSON.parse(res.value.stdout) as RelaySummary;
        t.diagnostic(`relay CLI: ${line(s)}; tee ${s.tee?.['file-size']} bytes, committed in ${s.tee?.['commit-time']} ms`);
        assertRelaySummary(s, inn, out, '4 → 1 zstd');
        assert.ok(s['channels-out'][0]!.bytes < s['channels-in'].reduce((n, ch) => n + ch.bytes, 0), 'zstd made the outgoing channel smaller than what came in');
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', 'A completed');
        const memB = await assertGuestRunsOn(t, b.q, '4 → 1 zstd');
        await killAll(a, b);
        a = undefined;
        b = undefined;

        assert.ok(existsSync(tee), 'the tee file exists');
        assert.deepEqual(readdirSync(dir).filter((f) => f.includes('tee')), ['tee.mig'], 'no temporary tee files left');
        c = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true });
        const rr = await cli(['restore', tee, '--qmp', c.qmp, '--channels', '2', '--json']);
        assert.equal(rr.code, 0, `restore of the tee failed: ${rr.stderr}`);
        const rs = JSON.parse(rr.stdout) as RestoreSummary;
        assert.equal(rs.destinationQemu.status, 'completed');
        const memC = await dumpGuestMemory(c.q, GUEST_DIRTY_START, DIRTY_RANGE);
        assert.ok(memC.equals(memB), 'the tee restored in a third QEMU holds exactly the memory B loaded');
        await assertGuestRunsOn(t, c.q, 'tee restored');
      } finally {
        await killAll(a, b, c);
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('running guest, per-section sync on both sides, zstd → zlib, 2 → 3 channels', { timeout: 150_000 }, async (t) => {
      const inn: Side = { channels: 2, compression: 'zstd' };
      const out: Side = { channels: 3, compression: 'zlib', extraArgs: PER_SECTION };
      await relayRun(version, { sourceArgs: PER_SECTION, inn, out, relay: { compressionOut: 'zlib' } }, async ({ a, b, s }) => {
        t.diagnostic(`relay: ${line(s)}`);
        assertRelaySummary(s, inn, out, 'per-section');
        assert.equal(s['sync-mode'], 'section');
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', 'A completed');
        await assertGuestRunsOn(t, b.q, 'per-section');
      });
    });

    for (const method of ['zstd', 'zlib'] as const) {
      test(`running guest, ${method} on 2 channels on both sides: packets passed on as they came`, { timeout: 150_000 }, async (t) => {
        const side: Side = { channels: 2, compression: method };
        await relayRun(version, { inn: side, out: side, relay: { compressionOut: method } }, async ({ a, b, s }) => {
          t.diagnostic(`relay: ${line(s)}, ${s['passed-encoded']} passed encoded`);
          assertRelaySummary(s, side, side, `${method} passed on`);
          const dataPackets = s['channels-in'].reduce((n, c) => n + c.packets - c.syncs, 0);
          assert.ok(dataPackets > 0);
          assert.equal(s['passed-encoded'], dataPackets, 'every packet with pages went on still compressed');
          assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', 'A completed');
          await assertGuestRunsOn(t, b.q, `${method} passed on`);
        });
      });
    }

    test('running guest, multifd off on both sides, A without a return path: the relay learns B\'s verdict on its own', { timeout: 150_000 }, async (t) => {
      await relayRun(version, { inn: { channels: 0, returnPath: false }, out: { channels: 0 } }, async ({ a, b, s }) => {
        t.diagnostic(`relay: ${line(s)}`);
        assert.equal(s.destination, 'confirmed', "B's SHUT(0) came back on the relay's own return path");
        assert.equal(s['return-path'], false);
        assert.equal(s['sync-mode'], 'none');
        assert.deepEqual([s['channels-in'].length, s['channels-out'].length], [0, 0]);
        assert.ok(s.normal > DIRTY_RANGE / 4096, `pages went over the main channel (normal=${s.normal})`);
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', 'A completed');
        await assertGuestRunsOn(t, b.q, 'no multifd');
      });
    });

    test('A killed mid-migration: the relay fails, B\'s incoming migration fails, the tee is not finalised', { timeout: 150_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-relay-');
      let a: QemuInstance | undefined;
      let b: Destination | undefined;
      let r: RelayHandle | undefined;
      try {
        a = await startSource(version);
        const B = await startB(dir, version, { channels: 2 });
        b = B.d;
        const tee = join(dir, 'tee.mig');
        // Progress every 10 ms and a kill after 8 MiB: A's multifd traffic outruns its
        // max-bandwidth here (the whole test takes under 0.5 s), and with 100 ms ticks and 24 MiB
        // the relay once finished, A presumably killed only after it had completed.
        r = relay({ listen: 'tcp:127.0.0.1:0', to: B.uri, channelsIn: 2, tee, progressIntervalMs: 10 });
        const aq = a;
        let killed = false;
        r.on('progress', (p: { bytesIn: number }) => {
          if (!killed && p.bytesIn > 8 * 1024 * 1024) {
            killed = true;
            aq.proc.kill('SIGKILL');
          }
        });
        await migrateA(a, await r.listening, { channels: 2, maxBandwidth: 32 * 1024 * 1024 });
        const res = await settle(r.done, 90_000, 'relay');
        assert.ok(killed, 'A was killed during the migration');
        assert.ok(!res.ok, 'the relay failed');
        t.diagnostic(`relay error: ${res.error.message}`);
        assert.match(res.error.message, /source/i, 'the error names the source');
        const stB = await waitMigration(b.q.qmp, { timeoutMs: 30_000 });
        t.diagnostic(`B: ${stB.status} ${stB['error-desc'] ?? ''}`);
        assert.equal(stB.status, 'failed', "B's incoming migration failed");
        assert.deepEqual(readdirSync(dir).filter((f) => f.includes('tee')), [], 'no tee file, not even a temporary one');
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await killAll(a, b);
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('B killed mid-migration: A fails and runs on; a second migration through a new relay succeeds', { timeout: 240_000 }, async (t) => {
      const dir = mkdtempSync('/tmp/multifd-relay-');
      let a: QemuInstance | undefined;
      let b: Destination | undefined;
      let b2: Destination | undefined;
      let r: RelayHandle | undefined;
      try {
        a = await startSource(version);
        const B = await startB(dir, version, { channels: 2 });
        b = B.d;
        // 10 ms ticks and 8 MiB, as in the test above: A's max-bandwidth does not hold it back
        // enough to leave a 100 ms tick room before the migration is over.
        r = relay({ listen: 'tcp:127.0.0.1:0', to: B.uri, channelsIn: 2, progressIntervalMs: 10 });
        const bq = b.q;
        let killed = false;
        r.on('progress', (p: { bytesOut: number }) => {
          if (!killed && p.bytesOut > 8 * 1024 * 1024) {
            killed = true;
            bq.proc.kill('SIGKILL');
          }
        });
        await migrateA(a, await r.listening, { channels: 2, maxBandwidth: 32 * 1024 * 1024 });
        const res = await settle(r.done, 90_000, 'relay');
        assert.ok(killed, 'B was killed during the migration');
        assert.ok(!res.ok, 'the relay failed');
        t.diagnostic(`relay error: ${res.error.message}`);
        assert.match(res.error.message, /destination/i, 'the error names the destination');
        const stA = await waitMigration(a.qmp, { timeoutMs: 30_000 });
        t.diagnostic(`A: ${stA.status} ${stA['error-desc'] ?? ''}`);
        assert.equal(stA.status, 'failed', "A's migration failed");
        assert.equal(await runStateSoon(a, 'running'), 'running', 'A runs on');
        const passes = countPasses(a.serialLog());
        await waitGuestPasses(a, passes + 1, 30_000);
        await killAll(b);
        b = undefined;

        const B2 = await startB(dir, version, { channels: 2 });
        b2 = B2.d;
        r = relay({ listen: 'tcp:127.0.0.1:0', to: B2.uri, channelsIn: 2 });
        await migrateA(a, await r.listening, { channels: 2 });
        const s = await r.done;
        t.diagnostic(`second relay: ${line(s)}`);
        assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', "A's second migration completed");
        await assertGuestRunsOn(t, b2.q, 'second migration');
      } finally {
        r?.abort(new Error('test over'));
        await r?.done.catch(() => {});
        await killAll(a, b, b2);
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}
