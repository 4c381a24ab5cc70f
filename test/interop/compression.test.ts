/**
 * multifd compression (zlib, zstd) against real QEMU 10 and 11, per version:
 *  1. QEMU compresses → our receive: save() with zlib / zstd at levels 1 and 9 set on the source,
 *     and receive's auto-detection with a source driven by hand; fewer bytes on the wire than page
 *     bytes, and the snapshot equals QEMU's own mapped-ram save of the same paused guest page for page;
 *  2. we compress → QEMU: restore() with zlib / zstd at levels 1 and 9; the blob is back, and a QEMU
 *     re-save of the destination equals the input snapshot page for page;
 *  3. a running guest: `save --compression zstd` (CLI, live) → `restore --compression zlib` (CLI);
 *     the guest's memory invariant holds and it runs on;
 *  4. mismatches: `send --compression zlib` into a zstd destination, a zstd source into
 *     receive({ compression: 'zlib' }) (the source runs on and migrates again);
 *  5. a compressed payload corrupted in transit (TCP proxy between a QEMU source with the return
 *     path on and receive): receive fails cleanly, nothing is left behind, the source runs on; once
 *     through receive() in this process, once through the `receive` CLI as a child process.
 *
 * The guest blob (32 MiB at 16 MiB) is half random (incompressible), half dictionary text (compressible).
 * Every path QEMU sees is under /tmp (QEMU 11 runs in a chroot that only shares /tmp).
 *
 * Product bugs these tests show (as found; the tests fail until they are fixed):
 *  - MultifdReceiver.runChannel drops a failed page write (a payload that does not decode) unless
 *    the channel happens to be waiting on its write window at that moment: `tracked` removes itself
 *    from `windowed`/`inflight` in its finally() before rejecting, so neither the SYNC's
 *    Promise.all(windowed) nor finish()'s Promise.all(inflight) sees it. The rejection is unhandled;
 *    under node --test it ends the corruption test with failureType 'unhandledRejection'
 *    ("zlib payload decodes to more than ...", "Data corruption detected"), or receive completes
 *    and commits a snapshot without the packet's pages. The CLI crashes on it with a Node stack
 *    trace instead of "multifd: error: ...", leaving .NAME.partial-PID-TS in the output directory.
 *    Whether the window wait catches it is a race, so each corruption test fails most of the time.
 *  - send's error for a compression mismatch blames devices: QEMU checks the method in its multifd
 *    receive threads after RAM setup, and the hint for that stage does not mention compression.
 * Minor: a zstd decode failure reads "multifd channel N: Data corruption detected" (libzstd's text,
 * without the method's name); zlib's name themselves ("zlib payload decodes to ...").
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import {
  countPasses,
  dumpGuestMemory,
  haveQemu,
  qemuBinary,
  runStateSoon,
  startQemu,
  waitGuestPasses,
  waitMigration,
  type QemuInstance,
  type QemuVersion,
} from '../helpers/qemu.js';
import { compareMappedRamFiles, type BlockComparison, firstDifference } from '../helpers/snapshot.js';
import { BIN, cli, freePort, qemuSave, rejection, settle, startDestination, type Destination } from '../helpers/send.js';
import { migrateCompressed, snapshotRam, startCliReceive, startCorruptingProxy, writeMixedBlob, type Corruption, type CorruptingProxy, type MixedBlob, type ProxyReport } from '../helpers/compression.js';
import { receive, type ReceiveHandle, type ReceiveSummary } from '../../src/conversations/receive.js';
import { restore, type RestoreSummary } from '../../src/conversations/restore.js';
import { save, type SaveSummary } from '../../src/conversations/save.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const MEM_MIB = 128;
const BLOB_ADDR = 0x1000000; // pc.ram offset == guest-physical address below the PCI hole
const BLOB_SIZE = 32 * MiB;
const RANDOM_BYTES = BLOB_SIZE / 2;
const DIRTY_RANGE = GUEST_DIRTY_END - GUEST_DIRTY_START;
const METHODS = ['zlib', 'zstd'] as const;
const LEVELS = [1, 9] as const;

let work = '';
let blobPath = '';
let mixed: MixedBlob;

before(() => {
  work = mkdtempSync('/tmp/multifd-compression-test-');
  blobPath = join(work, 'blob.bin');
  mixed = writeMixedBlob(blobPath, BLOB_SIZE, [0, 1, 513, 2048, 4095]);
});

// A receive left listening by a failed test would keep the process alive.
const handles = new Map<ReceiveHandle, { label: string; settled: boolean; phase: string }>();
function track(h: ReceiveHandle, label: string): ReceiveHandle {
  const info = { label, settled: false, phase: 'listening' };
  handles.set(h, info);
  h.on('progress', (p: { phase: string }) => { info.phase = p.phase; });
  h.done.then(() => { info.settled = true; }, () => { info.settled = true; });
  return h;
}

after(async () => {
  try {
    for (const h of handles.keys()) h.abort(new Error('test finished'));
    // Bounded: a receive that never settles must not keep the temp directory around.
    const r = await settle(Promise.allSettled([...handles.keys()].map((h) => h.done)), 15_000, 'aborted receives').catch((e: Error) => e);
    if (r instanceof Error) {
      const stuck = [...handles.values()].filter((i) => !i.settled).map((i) => `${i.label} (last phase ${i.phase})`);
      process.stderr.write(`# ${r.message}: done still pending 15 s after abort() for ${stuck.join(', ')}\n`);
    }
  } finally {
    if (work) rmSync(work, { recursive: true, force: true });
  }
});

const loader = (): string[] => ['-device', `loader,file=${blobPath},addr=0x${BLOB_ADDR.toString(16)},force-raw=on`];

function assertBlob(mem: Buffer, what: string): void {
  assert.ok(mem.equals(mixed.blob), `${what}: memory at 0x${BLOB_ADDR.toString(16)} differs from the blob: ${firstDifference(mem, mixed.blob)}`);
}

function assertSamePages(cmp: BlockComparison[], what: string): void {
  assert.ok(cmp.some((c) => c.name === 'pc.ram' && c.pages === MEM_MIB * MiB / PAGE), `${what}: pc.ram is compared`);
  for (const c of cmp) {
    assert.equal(c.differingPages, 0, `${what}: block ${c.name}: ${c.differingPages} pages differ (first: ${c.firstDiffering.join(', ')})`);
  }
}

const pct = (a: number, b: number): string => `${((100 * a) / b).toFixed(1)}%`;

/** Wire bytes against page bytes: compression must have had an effect, and cannot beat the random half. */
function assertCompressed(s: { transferred: number; normal: number; 'normal-bytes': number }, what: string): void {
  assert.equal(s['normal-bytes'], s.normal * PAGE);
  assert.ok(s.normal >= mixed.nonZeroPages, `${what}: at least the blob's ${mixed.nonZeroPages} non-zero pages were data pages (normal=${s.normal})`);
  assert.ok(s.transferred < s['normal-bytes'], `${what}: ${s.transferred} bytes on the wire < ${s['normal-bytes']} bytes of non-zero pages`);
  // Half the blob is text that compresses several-fold: well below 80% overall.
  assert.ok(s.transferred < 0.8 * s['normal-bytes'], `${what}: ${s.transferred} bytes on the wire is ${pct(s.transferred, s['normal-bytes'])} of the page bytes; the text half should compress`);
  assert.ok(s.transferred > RANDOM_BYTES, `${what}: ${s.transferred} bytes on the wire cannot be less than the ${RANDOM_BYTES} random bytes`);
}

function wireLine(s: { transferred: number; 'normal-bytes': number; 'total-time': number; channels: { bytes: number }[] }): string {
  return `${s.transferred} bytes on the wire for ${s['normal-bytes']} bytes of non-zero pages (${pct(s.transferred, s['normal-bytes'])}), ` +
    `${s['total-time']} ms, channels [${s.channels.map((c) => c.bytes).join(', ')}] bytes`;
}

/** Completes a receive driven by hand; fails fast if the source fails. */
async function finish(h: ReceiveHandle, src: QemuInstance, timeoutMs = 60_000): Promise<ReceiveSummary> {
  let stop = false;
  const watch = (async () => {
    while (!stop) {
      await new Promise((r) => setTimeout(r, 250));
      const st = await src.qmp.execute('query-migrate').catch(() => undefined);
      if (!stop && (st?.status === 'failed' || st?.status === 'cancelled')) {
        h.abort(new Error(`source migration ${st.status}: ${st['error-desc'] ?? ''}`));
        return;
      }
    }
  })();
  try {
    const r = await settle(h.done, timeoutMs, 'receive');
    if (!r.ok) throw r.error;
    const st = await waitMigration(src.qmp, { timeoutMs: 30_000 });
    assert.equal(st.status, 'completed', `source: ${st.status} ${st['error-desc'] ?? ''}`);
    return r.value;
  } finally {
    stop = true;
    await watch;
  }
}

async function killAll(...qs: (QemuInstance | Destination | undefined)[]): Promise<void> {
  await Promise.all(qs.map((x) => (x ? ('q' in x ? x.q : x).kill() : undefined)));
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)} does not run)`;

  describe(`multifd compression with QEMU ${version}`, { skip }, () => {
    let dir = '';
    /** QEMU's own mapped-ram save of the paused guest with the blob. */
    let fileA = '';

    /**
     * A paused guest with the blob and a second QMP socket for save(). A fresh one per migration:
     * QEMU refuses to migrate a VM again once a migration paused it ("Can't migrate the vm that was
     * paused due to previous migration"), and identical paused guests have identical RAM.
     */
    async function pausedSource(): Promise<{ q: QemuInstance; qmp: string }> {
      const sock = join(dir, `save-qmp-${++sources}.sock`);
      const q = await startQemu({ version, memMiB: MEM_MIB, paused: true, extraArgs: [...loader(), '-qmp', `unix:${sock},server=on,wait=off`] });
      return { q, qmp: `unix:${sock}` };
    }
    let sources = 0;

    before(async () => {
      dir = mkdtempSync(join(work, `v${version}-`));
      fileA = join(dir, 'qemu-mapped-ram.mig');
      const { q } = await pausedSource();
      try {
        const st = await qemuSave(q, fileA, { channels: 2 });
        process.stderr.write(`# QEMU ${version}: own mapped-ram save ${statSync(fileA).size} bytes in ${st['total-time']} ms\n`);
      } finally {
        await q.kill();
      }
    }, { timeout: 60_000 });

    after(() => {
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    for (const method of METHODS) {
      test(`QEMU ${method} source → save() at levels 1 and 9: summary names ${method}, fewer bytes than pages, snapshot equals QEMU's own save page for page`, { timeout: 120_000 }, async (t) => {
        const wire = new Map<number, number>();
        for (const level of LEVELS) {
          const out = join(dir, `save-${method}-${level}.mig`);
          const src = await pausedSource();
          const t0 = Date.now();
          let s: SaveSummary;
          try {
            const r = await settle(save({ qmp: src.qmp, out, channels: 2, compression: method, level }).done, 90_000, `save ${method} level ${level}`);
            if (!r.ok) {
              t.diagnostic(`save ${method} level ${level} failed: ${r.error.message}\nsource stderr: ${src.q.stderr()}`);
              throw r.error;
            }
            s = r.value;
            const params = await src.q.qmp.execute('query-migrate-parameters');
            assert.equal(params['multifd-compression'], 'none', 'save() put the source\'s multifd-compression back');
            assert.equal(params[`multifd-${method}-level`], 1, `save() put the source's multifd-${method}-level back`);
          } finally {
            await src.q.kill();
          }
          wire.set(level, s.transferred);
          t.diagnostic(`${method} level ${level}: ${wireLine(s)}; save() ${Date.now() - t0} ms wall, source total-time ${s.source['total-time']} ms, ` +
            `QEMU's ram.transferred=${s.source.ram?.transferred} ram.normal=${s.source.ram?.normal} (ours: normal=${s.normal})`);
          assert.equal(s.status, 'completed');
          assert.equal(s.source.status, 'completed');
          assert.equal(s.compression, method, 'the summary names the source\'s method');
          assert.equal(s.channels.length, 2);
          assertCompressed(s, `${method} level ${level}`);

          const t1 = Date.now();
          const cmp = await compareMappedRamFiles(fileA, out);
          assertSamePages(cmp, `${method} level ${level} vs QEMU's own save`);
          assertBlob(await snapshotRam(out, BLOB_ADDR, BLOB_SIZE), `${method} level ${level} snapshot`);
          t.diagnostic(`${method} level ${level}: page-for-page comparison with QEMU's file in ${Date.now() - t1} ms`);
          rmSync(out, { force: true });
        }
        // The level reached the source: 9 searches harder than 1 on the text half.
        t.diagnostic(`${method}: level 9 sent ${wire.get(9)} bytes, level 1 ${wire.get(1)} (${pct(wire.get(9)!, wire.get(1)!)})`);
        assert.ok(wire.get(9)! < wire.get(1)!, `${method}: level 9 (${wire.get(9)} bytes) compresses better than level 1 (${wire.get(1)} bytes)`);
      });
    }

    test('receive with default compression (auto) detects zlib and zstd from a QEMU source driven by hand', { timeout: 90_000 }, async (t) => {
      for (const method of METHODS) {
        const out = join(dir, `auto-${method}.mig`);
        const src = await pausedSource();
        const t0 = Date.now();
        let s: ReceiveSummary;
        try {
          const h = track(receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2 }), `QEMU ${version} auto ${method}`);
          await migrateCompressed(src.q, await h.listening, { compression: method });
          s = await finish(h, src.q);
        } finally {
          await src.q.kill();
        }
        t.diagnostic(`auto → ${s.compression}: ${wireLine(s)}; ${Date.now() - t0} ms wall`);
        assert.equal(s.compression, method, `receive detected ${method}`);
        assertCompressed(s, `auto ${method}`);
        assertSamePages(await compareMappedRamFiles(fileA, out), `auto ${method} vs QEMU's own save`);
        rmSync(out, { force: true });
      }
    });

    for (const method of METHODS) {
      test(`restore() with ${method} at levels 1 and 9 → QEMU: the blob is back; QEMU re-saves the input snapshot page for page`, { timeout: 120_000 }, async (t) => {
        const wire = new Map<number, number>();
        for (const level of LEVELS) {
          const d = await startDestination(dir, { version, memMiB: MEM_MIB });
          try {
            const r = await settle(restore({ file: fileA, qmp: d.qmp, channels: 2, compression: method, level }).done, 90_000, `restore ${method} level ${level}`);
            if (!r.ok) {
              t.diagnostic(`restore ${method} level ${level} failed: ${r.error.message}\ndestination stderr: ${d.q.stderr()}`);
              throw r.error;
            }
            const s: RestoreSummary = r.value;
            wire.set(level, s.transferred);
            t.diagnostic(`${method} level ${level}: ${wireLine(s)}; ${s.mbps} Mbit/s`);
            assert.equal(s.compression, method);
            assert.equal(s.destination, 'confirmed', 'the destination acknowledged the load');
            assert.equal(s.destinationQemu.status, 'completed');
            assert.equal(s.channels.length, 2);
            assertCompressed(s, `${method} level ${level}`);
            const params = await d.q.qmp.execute('query-migrate-parameters');
            assert.equal(params['multifd-compression'], method, 'restore set the destination\'s multifd-compression');
            assertBlob(await dumpGuestMemory(d.q, BLOB_ADDR, BLOB_SIZE), `${method} level ${level} destination`);

            if (level === 9) {
              // mapped-ram refuses multifd compression: the re-save goes without it.
              await d.q.qmp.execute('migrate-set-parameters', { 'multifd-compression': 'none' });
              const fileB = join(dir, `resaved-${method}.mig`);
              const st = await qemuSave(d.q, fileB, { channels: 2 });
              const cmp = await compareMappedRamFiles(fileA, fileB);
              t.diagnostic(`${method} level ${level}: destination re-saved by QEMU in ${st['total-time']} ms; ${cmp.map((c) => `${c.name} ${c.differingPages}/${c.pages} differ`).join(', ')}`);
              assertSamePages(cmp, `${method}: input snapshot vs QEMU's re-save of the destination`);
              rmSync(fileB, { force: true });
            }
          } finally {
            await d.q.kill();
          }
        }
        t.diagnostic(`${method}: level 9 sent ${wire.get(9)} bytes, level 1 ${wire.get(1)} (${pct(wire.get(9)!, wire.get(1)!)})`);
        assert.ok(wire.get(9)! < wire.get(1)!, `${method}: our level 9 (${wire.get(9)} bytes) compresses better than level 1 (${wire.get(1)} bytes)`);
      });
    }

    test('running guest: save CLI --compression zstd (live) → restore CLI --compression zlib; invariant holds, runs on', { timeout: 150_000 }, async (t) => {
      const tdir = mkdtempSync(join(dir, 'live-'));
      const sock = join(tdir, 'save-qmp.sock');
      const file = join(tdir, 'live.mig');
      let live: QemuInstance | undefined;
      let d: Destination | undefined;
      try {
        live = await startQemu({ version, memMiB: MEM_MIB, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
        await waitGuestPasses(live, 2, 30_000);
        assert.equal((await live.qmp.execute('query-status')).status, 'running');
        const passes0 = countPasses(live.serialLog());
        // QEMU estimates its bandwidth from the compressed bytes it wrote and the time left from the
        // page bytes it still holds: with pages that compress ~100:1 a 20 s limit may never be met
        // (relay's zlib runs iterated for 150 s in CI). 300 s switches over after the next round.
        const r = await cli(['save', '--qmp', `unix:${sock}`, '--out', file, '--channels', '2', '--compression', 'zstd', '--downtime-limit', '300000', '--json']);
        assert.equal(r.code, 0, `save CLI failed (exit ${r.code}): ${r.stderr}`);
        const s = JSON.parse(r.stdout) as SaveSummary;
        const passesDuring = countPasses(live.serialLog()) - passes0;
        t.diagnostic(`save --compression zstd (${r.ms} ms wall): ${wireLine(s)}; source downtime ${s.source.downtime} ms, dirty-sync-count ${s['dirty-sync-count']}, guest passes during save ${passesDuring}`);
        assert.equal(s.status, 'completed');
        assert.equal(s.source.status, 'completed');
        assert.equal(s.compression, 'zstd');
        assert.ok(s.normal > 20_000, `the dirtied range went over (normal=${s.normal})`);
        assert.ok(s.transferred < s['normal-bytes'], `${s.transferred} bytes on the wire < ${s['normal-bytes']} page bytes`);
        assert.ok(passesDuring > 0, 'the guest ran during the save');
        await live.kill();
        live = undefined;

        d = await startDestination(tdir, { version, memMiB: MEM_MIB, bootSector: true });
        const rr = await cli(['restore', file, '--qmp', d.qmp, '--channels', '2', '--compression', 'zlib', '--json']);
        assert.equal(rr.code, 0, `restore CLI failed (exit ${rr.code}): ${rr.stderr}`);
        const rs = JSON.parse(rr.stdout) as RestoreSummary;
        t.diagnostic(`restore --compression zlib (${rr.ms} ms wall): ${wireLine(rs)}`);
        assert.equal(rs.compression, 'zlib');
        assert.equal(rs.destination, 'confirmed');
        assert.equal(rs.destinationQemu.status, 'completed');
        assert.ok(rs.transferred < rs['normal-bytes'], `${rs.transferred} bytes on the wire < ${rs['normal-bytes']} page bytes`);
        assert.equal((await d.q.qmp.execute('query-status')).running, false, 'the -S destination is paused after loading');

        const mem0 = await dumpGuestMemory(d.q, GUEST_DIRTY_START, DIRTY_RANGE);
        const r0 = checkDirtyInvariant(mem0);
        t.diagnostic(`restored: value=${r0.value} boundary=${r0.boundary}${r0.reason ? ` (${r0.reason})` : ''}`);
        assert.ok(r0.ok, `restored guest memory is inconsistent: ${r0.reason}`);
        const passes = countPasses(d.q.serialLog());
        await d.q.qmp.execute('cont');
        await waitGuestPasses(d.q, passes + 2, 30_000);
        await d.q.qmp.execute('stop');
        const mem1 = await dumpGuestMemory(d.q, GUEST_DIRTY_START, DIRTY_RANGE);
        const r1 = checkDirtyInvariant(mem1);
        t.diagnostic(`after ${countPasses(d.q.serialLog()) - passes} more passes: value=${r1.value} boundary=${r1.boundary}`);
        assert.ok(r1.ok, `the restored guest broke the invariant after running: ${r1.reason}`);
        assert.ok(!mem1.equals(mem0), 'guest memory changed after cont');
      } finally {
        await killAll(live, d);
        rmSync(tdir, { recursive: true, force: true });
      }
    });

    test('mismatch: send CLI --compression zlib into a destination set to zstd fails clearly; QEMU reports failed', { timeout: 60_000 }, async (t) => {
      const q = await startQemu({ version, memMiB: MEM_MIB, paused: true, incoming: 'defer' });
      try {
        await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
        await q.qmp.execute('migrate-set-parameters', { 'multifd-channels': 2, 'multifd-compression': 'zstd' });
        const port = await freePort();
        await q.qmp.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${port}`, 'exit-on-error': false });
        const r = await cli(['send', fileA, '--to', `tcp:127.0.0.1:${port}`, '--channels', '2', '--compression', 'zlib'], 60_000);
        t.diagnostic(`send CLI: exit ${r.code} after ${r.ms} ms: ${r.stderr.trim()}`);
        const st = await waitMigration(q.qmp, { timeoutMs: 15_000 });
        t.diagnostic(`destination query-migrate: status=${st.status} error-desc=${JSON.stringify(st['error-desc'])}`);
        assert.equal(r.code, 1, 'send fails');
        assert.match(r.stderr, /^multifd: error: /m);
        assert.equal(st.status, 'failed', 'the destination\'s incoming migration failed');
        assert.ok(st['error-desc'], 'QEMU gave an error-desc');
        // Observed error-desc (QEMU's zstd receive checks each data packet's flags; 0x2 = zlib, 0x4 = zstd),
        // identical on both versions (the channel number is whichever channel's packet came first):
        //   QEMU 10.0.2: "multifd 0: flags received 2 flags expected 4"
        //   QEMU 11.1.3: "multifd 0: flags received 2 flags expected 4"
        assert.match(st['error-desc'], /^multifd \d+: flags received 2 flags expected 4$/);
        // The sender cannot see QEMU's error-desc, but it knows the destination closed on it.
        assert.match(r.stderr, /closed|reset|EPIPE|failure/i, 'the error says the destination gave up');
        // QEMU only checks the method in its multifd receive threads, after RAM setup: the hint for
        // that stage must name the compression method as a possible cause, not only devices.
        assert.match(r.stderr, /compression/i, `the error points at the compression method as a possible cause: ${r.stderr.trim()}`);
      } finally {
        await q.kill();
      }
    });

    test('mismatch: QEMU zstd source into receive({ compression: \'zlib\' }) fails naming both; the source runs on and migrates again', { timeout: 90_000 }, async (t) => {
      const tdir = mkdtempSync(join(dir, 'mismatch-'));
      const q = await startQemu({ version, memMiB: MEM_MIB, extraArgs: loader() });
      try {
        assert.equal((await q.qmp.execute('query-status')).status, 'running');
        const h1 = track(receive({ listen: 'tcp:127.0.0.1:0', out: join(tdir, 'first.mig'), channels: 2, compression: 'zlib' }), `QEMU ${version} mismatch first`);
        const t0 = Date.now();
        await migrateCompressed(q, await h1.listening, { compression: 'zstd', returnPath: true });
        const err = await rejection(h1.done, 30_000, 'receive zlib from a zstd source');
        t.diagnostic(`receive rejected after ${Date.now() - t0} ms: ${err.message}`);
        assert.match(err.message, /zstd/, 'the message names the source\'s method');
        assert.match(err.message, /zlib/, 'the message names the expected method');
        assert.match(err.message, /multifd channel \d/, 'the message names the channel');
        assert.deepEqual(readdirSync(tdir), [], 'no snapshot and no temporary file left behind');
        const st = await waitMigration(q.qmp, { timeoutMs: 30_000 });
        t.diagnostic(`source: ${st.status} ${JSON.stringify(st['error-desc'])}`);
        assert.equal(st.status, 'failed');
        const run = await q.qmp.execute('query-status');
        assert.equal(run.status, 'running', 'the source VM keeps running');

        const out2 = join(tdir, 'second.mig');
        const t1 = Date.now();
        const h2 = track(receive({ listen: 'tcp:127.0.0.1:0', out: out2, channels: 2, compression: 'zstd' }), `QEMU ${version} mismatch second`);
        await migrateCompressed(q, await h2.listening, { compression: 'zstd', returnPath: true });
        const s = await finish(h2, q);
        t.diagnostic(`second attempt: ${wireLine(s)}; ${Date.now() - t1} ms wall`);
        assert.equal(s.compression, 'zstd');
        assertCompressed(s, 'second attempt');
        assert.deepEqual(readdirSync(tdir), ['second.mig']);
        assertBlob(await snapshotRam(out2, BLOB_ADDR, BLOB_SIZE), 'second attempt snapshot');
      } finally {
        await q.kill();
        rmSync(tdir, { recursive: true, force: true });
      }
    });

    for (const method of METHODS) {
      test(`${method} payload corrupted in transit: receive fails clearly, nothing left behind, the source runs on`, { timeout: 60_000 }, async (t) => {
        const tdir = mkdtempSync(join(dir, `corrupt-${method}-`));
        const q = await startQemu({ version, memMiB: MEM_MIB, extraArgs: loader() });
        const out = join(tdir, 'vm.mig');
        let proxy: CorruptingProxy | undefined;
        try {
          const h = track(receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2, compression: method }), `QEMU ${version} corrupt ${method}`);
          // A packet of 128 text pages: its payload is entropy-coded, so flipped bytes cannot decode
          // cleanly. (The first packet with normal pages holds 2 firmware pages among 126 zero ones;
          // observed on QEMU 10: a zstd payload of ~740 bytes whose flipped bytes decoded without
          // error, as raw literals do. Nothing can notice that, in QEMU's receiver either.)
          const explain = (c: Corruption, rep: ProxyReport): string =>
            `proxy: ${rep.connections} connections (${rep.mainConnections} main, ${rep.multifdConnections} multifd); ` +
            `flipped bytes ${c.flipped[0]}..${c.flipped[c.flipped.length - 1]} of a ${c.payloadSize}-byte payload (${c.normalPages} normal + ${c.zeroPages} zero pages, ` +
            `packet_num ${c.packetNum}, flags 0x${c.flags.toString(16)}) on multifd connection ${c.connection} after ${rep.packetsBefore} packets`;
          // Logged at once: a decode failure the receiver loses surfaces as an unhandled rejection,
          // which ends this test on the spot (see the report on product bugs at the top).
          proxy = await startCorruptingProxy({ target: await h.listening, minNormalPages: 128, onCorrupt: (c, rep) => t.diagnostic(explain(c, rep)) });
          const t0 = Date.now();
          // With the return path, the receiver's SHUT(1) fails the source's migration even if the
          // source has written everything by then (without it, QEMU would report completed).
          await migrateCompressed(q, proxy.address, { compression: method, returnPath: true });
          const r = await settle(h.done, 30_000, `receive of a corrupted ${method} stream`);
          const c = proxy.report.corruption;
          assert.ok(c, `the proxy corrupted a compressed payload (${proxy.report.connections} connections, ${proxy.report.multifdConnections} multifd)`);
          assert.equal(c.flags & 0x3e, method === 'zlib' ? 0x2 : 0x4, `the corrupted packet is ${method}`);
          if (r.ok) {
            // Show what the "completed" snapshot holds: the corrupted packet's pages (and those of
            // later packets on that channel) never reached it.
            const s = r.value;
            const mem = await snapshotRam(out, BLOB_ADDR, BLOB_SIZE);
            const present = s.blocks.find((b) => b.name === 'pc.ram')?.['pages-present'];
            t.diagnostic(`receive COMPLETED after ${r.ms} ms despite the corruption: normal=${s.normal} pc.ram pages-present=${present}; ` +
              `blob region of the snapshot vs the blob: ${firstDifference(mem, mixed.blob)}; files: ${readdirSync(tdir).join(', ')}`);
            assert.fail(`receive completed although a ${method} payload was corrupted in transit (decode failure lost, snapshot silently incomplete)`);
          }
          const err = r.error;
          t.diagnostic(`receive rejected after ${Date.now() - t0} ms: ${err.message}`);
          assert.match(err.message, /^multifd channel \d+: /, 'the error names the channel');
          assert.match(err.message, method === 'zlib' ? /zlib stream error|decodes to/ : /zstd|corrupt/i, 'the error says the payload does not decode');
          assert.deepEqual(readdirSync(tdir), [], 'no snapshot and no temporary file left behind');
          const st = await waitMigration(q.qmp, { timeoutMs: 30_000 });
          t.diagnostic(`source: ${st.status} ${JSON.stringify(st['error-desc'])}`);
          assert.equal(st.status, 'failed', 'the source\'s migration failed');
          assert.equal(await runStateSoon(q, 'running'), 'running', 'the source VM keeps running');
        } finally {
          await proxy?.close();
          await q.kill();
          rmSync(tdir, { recursive: true, force: true });
        }
      });
    }

    test('receive CLI, zlib and zstd payloads corrupted in transit: exits 1 with "multifd: error: ...", nothing left behind, the source runs on', { timeout: 90_000 }, async (t) => {
      // Out of the test runner's process: a decode failure the receiver loses cannot end this test
      // as an unhandled rejection here; the CLI process shows what a user gets.
      for (const method of METHODS) {
        await t.test(method, async (st) => {
          const tdir = mkdtempSync(join(dir, `corrupt-cli-${method}-`));
          const q = await startQemu({ version, memMiB: MEM_MIB, extraArgs: loader() });
          let rx: Awaited<ReturnType<typeof startCliReceive>> | undefined;
          let proxy: CorruptingProxy | undefined;
          try {
            rx = await startCliReceive(BIN, join(tdir, 'vm.mig'), ['--channels', '2', '--compression', method]);
            proxy = await startCorruptingProxy({ target: rx.address, minNormalPages: 128 });
            await migrateCompressed(q, proxy.address, { compression: method, returnPath: true });
            const r = await settle(rx.exited, 30_000, `multifd receive of a corrupted ${method} stream`);
            assert.ok(r.ok);
            const c = proxy.report.corruption;
            st.diagnostic(c ? `flipped bytes in a ${c.payloadSize}-byte payload (${c.normalPages} normal pages, flags 0x${c.flags.toString(16)})` : 'the proxy corrupted nothing');
            st.diagnostic(`receive CLI: exit ${r.value.code}${r.value.signal ? ` (${r.value.signal})` : ''} after ${r.value.ms} ms; stderr: ${r.value.stderr.trim().split('\n').slice(0, 8).join(' | ')}`);
            const left = readdirSync(tdir);
            st.diagnostic(`output directory afterwards: ${JSON.stringify(left)}`);
            assert.ok(c, 'the proxy corrupted a compressed payload');
            assert.equal(r.value.code, 1, 'receive exits 1');
            assert.match(r.value.stderr, /^multifd: error: multifd channel \d+: /m, 'a one-line error naming the channel, not a crash');
            assert.doesNotMatch(r.value.stderr, /^\s+at /m, 'no stack trace');
            assert.deepEqual(left, [], 'no snapshot and no temporary file left behind');
            const mig = await waitMigration(q.qmp, { timeoutMs: 30_000 });
            st.diagnostic(`source: ${mig.status} ${JSON.stringify(mig['error-desc'])}`);
            assert.equal(mig.status, 'failed', 'the source\'s migration failed');
            assert.equal(await runStateSoon(q, 'running'), 'running', 'the source VM keeps running');
          } finally {
            rx?.kill();
            await proxy?.close();
            await q.kill();
            rmSync(tdir, { recursive: true, force: true });
          }
        });
      }
    });
  });
}
