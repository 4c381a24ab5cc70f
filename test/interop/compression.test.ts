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
 *  5. a compressed payload corrupted in transit (TCP proxy): receive fails cleanly, nothing is left
 *     behind, the source runs on.
 *
 * The guest blob is half random (incompressible), half dictionary text (compressible), at 16 MiB.
 * Every path QEMU sees is under /tmp (QEMU 11 runs in a chroot that only shares /tmp).
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
  startQemu,
  waitGuestPasses,
  waitMigration,
  type QemuInstance,
  type QemuVersion,
} from '../helpers/qemu.js';
import { compareMappedRamFiles, type BlockComparison } from '../helpers/snapshot.js';
import { cli, freePort, qemuSave, rejection, settle, startDestination, type Destination } from '../helpers/send.js';
import { migrateCompressed, snapshotRam, startCorruptingProxy, writeMixedBlob, type MixedBlob } from '../helpers/compression.js';
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
const handles = new Set<ReceiveHandle>();
function track(h: ReceiveHandle): ReceiveHandle {
  handles.add(h);
  return h;
}

after(async () => {
  for (const h of handles) h.abort(new Error('test finished'));
  await Promise.allSettled([...handles].map((h) => h.done));
  if (work) rmSync(work, { recursive: true, force: true });
});

const loader = (): string[] => ['-device', `loader,file=${blobPath},addr=0x${BLOB_ADDR.toString(16)},force-raw=on`];

function firstDifference(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `lengths differ: ${a.length} vs ${b.length}`;
  let diff = 0;
  let first = -1;
  for (let off = 0; off < a.length; off += PAGE) {
    if (a.compare(b, off, off + PAGE, off, off + PAGE) !== 0) {
      if (first < 0) first = off;
      diff++;
    }
  }
  return diff === 0 ? 'equal' : `${diff} pages differ, first at +0x${first.toString(16)}`;
}

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
          t.diagnostic(`${method} level ${level}: ${wireLine(s)}; save() ${Date.now() - t0} ms wall, source total-time ${s.source['total-time']} ms`);
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
          const h = track(receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2 }));
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
        const r = await cli(['save', '--qmp', `unix:${sock}`, '--out', file, '--channels', '2', '--compression', 'zstd', '--downtime-limit', '20000', '--json']);
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
        // Observed error-desc (the zstd receiver checks each packet's flags; 0x2 = zlib, 0x4 = zstd):
        //   QEMU 10: "multifd 0: flags received 2 flags expected 4" (or channel 1)
        //   QEMU 11: same text
        assert.match(st['error-desc'], /flags received 2 flags expected 4/);
        // The sender cannot see QEMU's error-desc, but it knows the destination closed on it.
        assert.match(r.stderr, /closed|reset|EPIPE|failure/i, 'the error says the destination gave up');
        assert.match(r.stderr, /compression/i, 'the error points at the compression method as a possible cause');
      } finally {
        await q.kill();
      }
    });

    test('mismatch: QEMU zstd source into receive({ compression: \'zlib\' }) fails naming both; the source runs on and migrates again', { timeout: 90_000 }, async (t) => {
      const tdir = mkdtempSync(join(dir, 'mismatch-'));
      const q = await startQemu({ version, memMiB: MEM_MIB, extraArgs: loader() });
      try {
        assert.equal((await q.qmp.execute('query-status')).status, 'running');
        const h1 = track(receive({ listen: 'tcp:127.0.0.1:0', out: join(tdir, 'first.mig'), channels: 2, compression: 'zlib' }));
        const t0 = Date.now();
        await migrateCompressed(q, await h1.listening, { compression: 'zstd' });
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
        const h2 = track(receive({ listen: 'tcp:127.0.0.1:0', out: out2, channels: 2, compression: 'zstd' }));
        await migrateCompressed(q, await h2.listening, { compression: 'zstd' });
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
        const h = track(receive({ listen: 'tcp:127.0.0.1:0', out: join(tdir, 'vm.mig'), channels: 2, compression: method }));
        const proxy = await startCorruptingProxy({ target: await h.listening });
        try {
          const t0 = Date.now();
          await migrateCompressed(q, proxy.address, { compression: method });
          const err = await rejection(h.done, 30_000, `receive of a corrupted ${method} stream`);
          const c = proxy.report.corruption;
          t.diagnostic(`proxy: ${proxy.report.connections} connections (${proxy.report.mainConnections} main, ${proxy.report.multifdConnections} multifd); ` +
            (c ? `flipped bytes ${c.flipped[0]}..${c.flipped[c.flipped.length - 1]} of a ${c.payloadSize}-byte payload (${c.normalPages} normal + ${c.zeroPages} zero pages, packet_num ${c.packetNum}, flags 0x${c.flags.toString(16)}) ` +
              `on multifd connection ${c.connection} after ${proxy.report.packetsBefore} packets` : 'corrupted nothing'));
          t.diagnostic(`receive rejected after ${Date.now() - t0} ms: ${err.message}`);
          assert.ok(c, 'the proxy corrupted a compressed payload');
          assert.equal(c.flags & 0x3e, method === 'zlib' ? 0x2 : 0x4, `the corrupted packet is ${method}`);
          assert.match(err.message, /^multifd channel \d+: /, 'the error names the channel');
          assert.match(err.message, new RegExp(method), `the error names ${method}`);
          assert.match(err.message, /stream error|decodes to|corrupt|invalid|incorrect|error/i, 'the error says the payload does not decode');
          assert.deepEqual(readdirSync(tdir), [], 'no snapshot and no temporary file left behind');
          const st = await waitMigration(q.qmp, { timeoutMs: 30_000 });
          t.diagnostic(`source: ${st.status} ${JSON.stringify(st['error-desc'])}`);
          assert.equal(st.status, 'failed', 'the source\'s migration failed');
          assert.equal((await q.qmp.execute('query-status')).status, 'running', 'the source VM keeps running');
        } finally {
          await proxy.close();
          await q.kill();
          rmSync(tdir, { recursive: true, force: true });
        }
      });
    }
  });
}
