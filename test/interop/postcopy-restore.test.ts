/**
 * Instant restore (restore --postcopy) into real QEMU destinations:
 *  - QEMU 11.1: postcopy + multifd over 2 channels, without and with postcopy-preempt;
 *  - QEMU 10.0: postcopy without multifd (10.0 refuses the combination: restore falls back to
 *    channels 0 and says so), without and with postcopy-preempt.
 * The snapshot is of the running dirtying guest, saved by our `save`. For each configuration:
 *  1. "instant": a destination started without -S runs the guest from RUN on, while the pages are
 *     still coming (background held to 32 MiB/s so the guest has to ask for pages); afterwards its
 *     pass counter advanced, the dirty-area invariant holds, and memory outside the area the guest
 *     writes equals the snapshot;
 *  2. "exact": a destination started with -S stays paused at RUN; its memory is dumped while
 *     postcopy is still running (pmemsave faults the missing pages in through page requests) and
 *     again after completion: both equal the snapshot's pages; then `cont` and the guest runs on;
 *  3. the destination SIGKILLed in postcopy: restore fails promptly saying the guest is lost.
 *
 * Every path QEMU sees is under /tmp (QEMU 11 runs in a chroot that only shares /tmp).
 */
import { after, before, describe, test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, haveQemu, qemuBinary, startQemu, waitGuestPasses, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { firstDifference } from '../helpers/snapshot.js';
import { cli, settle, startDestination, type Destination } from '../helpers/send.js';
import { restore, type RestoreHandle, type RestoreSummary } from '../../src/conversations/restore.js';
import { save } from '../../src/conversations/save.js';
import { PostcopyDestinationLostError, type PostcopyOptions } from '../../src/conversations/send.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';

const MiB = 1024 * 1024;
const PAGE = 4096;
const MEM_MIB = 128;
/** Legacy VGA and ROM windows: guest-physical reads there do not show pc.ram. */
const HOLE_START = 0xa0000;
const HOLE_END = 0x100000;
const BANDWIDTH = 32 * MiB;

let work = '';

before(() => {
  work = mkdtempSync('/tmp/multifd-postcopy-test-');
});

after(() => {
  if (work) rmSync(work, { recursive: true, force: true });
});

interface Config {
  version: QemuVersion;
  /** Channels asked for; QEMU 10 gets 0 (restore falls back). */
  channels: number;
  preempt: boolean;
  /** Pages before the switch. */
  precopyBytes?: number;
}

const CONFIGS: Config[] = [
  { version: '11', channels: 2, preempt: false, precopyBytes: 16 * MiB },
  { version: '11', channels: 2, preempt: true },
  { version: '10', channels: 2, preempt: false },
  { version: '10', channels: 0, preempt: true, precopyBytes: 16 * MiB },
];

/** The snapshot's pc.ram bytes [from, to). */
async function snapshotRam(file: string, from: number, to: number): Promise<Buffer> {
  const s = await MappedRamSnapshot.open(file);
  try {
    return await s.readPages('pc.ram', from, (to - from) / PAGE);
  } finally {
    await s.close();
  }
}

function describeRestore(s: RestoreSummary): string {
  const pc = s.postcopy!;
  return `${s.machine}, ${s.channels.length} ch${pc.preempt ? ' + preempt' : ''}: running after ${s['time-to-running'] ?? '-'} ms, complete after ${s['time-to-complete']} ms; ` +
    `${pc['precopy-pages']} pages before the switch, ${pc['postcopy-pages']} after, ${pc.requests} requests (${pc['requested-pages']} pages sent for them, ` +
    `${pc['preempt-pages']} on preempt, ${pc['requests-already-sent']} already on their way), ${pc['discard-ranges']} discard ranges${s.notes ? `; notes: ${s.notes.join('; ')}` : ''}`;
}

function assertPostcopySummary(s: RestoreSummary, c: Config, totalPages: number): void {
  assert.equal(s.status, 'completed');
  assert.equal(s.destination, 'confirmed', 'SHUT(0) on the return path');
  assert.equal(s.destinationQemu.status, 'completed');
  const pc = s.postcopy;
  assert.ok(pc, 'a postcopy summary');
  assert.equal(pc.preempt, c.preempt);
  const channels = c.version === '10' ? 0 : c.channels;
  assert.equal(s.channels.length, channels, `${channels} multifd channels`);
  if (c.version === '10' && c.channels > 0) assert.match(s.notes?.join(' ') ?? '', /multifd/, 'restore says it left multifd off');
  assert.equal(pc['precopy-pages'] + pc['postcopy-pages'], totalPages, 'every page of every block exactly once');
  assert.equal(s.normal + s.duplicate, totalPages);
  if (c.precopyBytes) assert.ok(pc['precopy-pages'] >= c.precopyBytes / PAGE, `at least ${c.precopyBytes} bytes before the switch (${pc['precopy-pages']} pages)`);
  else assert.equal(pc['precopy-pages'], 0, 'switch at once');
  assert.ok(pc['run-time'] !== undefined && pc['devices-loaded-time'] !== undefined, 'PONG(3) and PONG(0x42) arrived');
  if (!c.preempt) assert.equal(pc['preempt-pages'], 0);
}

/** The summary of a restore that must succeed, checked; QEMU's stderr in the log when it failed. */
async function completed(t: TestContext, h: RestoreHandle, q: QemuInstance, c: Config, totalPages: number, what: string): Promise<RestoreSummary> {
  const r = await settle(h.done, 90_000, what);
  if (!r.ok) {
    t.diagnostic(`destination stderr: ${q.stderr()}`);
    throw r.error;
  }
  t.diagnostic(describeRestore(r.value));
  assertPostcopySummary(r.value, c, totalPages);
  return r.value;
}

async function killAll(...qs: (QemuInstance | Destination | undefined)[]): Promise<void> {
  await Promise.all(qs.map((x) => (x ? ('q' in x ? x.q : x).kill() : undefined)));
}

for (const version of ['11', '10'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)} does not run)`;

  describe(`restore --postcopy into QEMU ${version}`, { skip }, () => {
    let dir = '';
    let file = '';
    let totalPages = 0;
    /** Snapshot pages outside the guest's dirty area (it never writes there). */
    let low: Buffer;
    let high: Buffer;

    before(async () => {
      dir = mkdtempSync(join(work, `v${version}-`));
      file = join(dir, 'running.mig');
      const sock = join(dir, 'save-qmp.sock');
      const src = await startQemu({ version, memMiB: MEM_MIB, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
      try {
        await waitGuestPasses(src, 2, 60_000);
        const saved = await save({ qmp: `unix:${sock}`, out: file, channels: 2, downtimeLimitMs: 20_000 }).done;
        process.stderr.write(`# QEMU ${version}: running guest saved by save(): ${saved.transferred} bytes in ${saved['total-time']} ms, file ${statSync(file).size} bytes\n`);
      } finally {
        await src.kill();
      }
      const s = await MappedRamSnapshot.open(file);
      try {
        totalPages = s.blockList.reduce((n, b) => n + Math.ceil(b.usedLength / PAGE), 0);
      } finally {
        await s.close();
      }
      low = await snapshotRam(file, 0, HOLE_START);
      high = await snapshotRam(file, GUEST_DIRTY_END, MEM_MIB * MiB);
    }, { timeout: 120_000 });

    for (const c of CONFIGS.filter((x) => x.version === version)) {
      const label = `${c.channels} ch asked${c.preempt ? ', preempt' : ''}${c.precopyBytes ? `, ${c.precopyBytes / MiB} MiB before the switch` : ''}`;
      const postcopy: PostcopyOptions = { preempt: c.preempt, bandwidth: BANDWIDTH, ...(c.precopyBytes ? { precopyBytes: c.precopyBytes } : {}) };

      test(`instant (${label}): the guest runs while its pages arrive; afterwards consistent, untouched memory equals the snapshot`, { timeout: 120_000 }, async (t) => {
        let d: Destination | undefined;
        try {
          d = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true, paused: false });
          const dq = d.q;
          const h = restore({ file, qmp: d.qmp, channels: c.channels, postcopy });
          let runningEvent: number | undefined;
          h.on('postcopy-running', (e: { elapsedMs: number }) => { runningEvent = e.elapsedMs; });
          const s = await completed(t, h, dq, c, totalPages, 'restore --postcopy');
          assert.ok(runningEvent !== undefined, 'postcopy-running was emitted');
          assert.ok(s['time-to-running'] !== undefined, 'the destination guest ran (RESUME)');
          assert.ok(s['time-to-running'] < s['time-to-complete'], `the guest ran (${s['time-to-running']} ms) before every page was there (${s['time-to-complete']} ms)`);
          assert.ok(s.postcopy!.requests > 0, 'the running guest asked for pages');
          if (c.preempt) assert.ok(s.postcopy!['preempt-pages'] > 0, 'requested pages went over the preempt channel');
          assert.equal(s.destinationQemu['run-state-after'], 'running');

          const passes = countPasses(dq.serialLog());
          t.diagnostic(`passes on the destination by completion: ${passes}`);
          await waitGuestPasses(dq, passes + 2, 30_000);
          await dq.qmp.execute('stop');
          const mem = await dumpGuestMemory(dq, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
          const inv = checkDirtyInvariant(mem);
          t.diagnostic(`after ${countPasses(dq.serialLog())} passes: value=${inv.value} boundary=${inv.boundary}${inv.reason ? ` (${inv.reason})` : ''}`);
          assert.ok(inv.ok, `the restored guest's memory is inconsistent: ${inv.reason}`);
          const dLow = await dumpGuestMemory(dq, 0, HOLE_START);
          assert.ok(dLow.equals(low), `low memory differs from the snapshot: ${firstDifference(dLow, low)}`);
          const dHigh = await dumpGuestMemory(dq, GUEST_DIRTY_END, MEM_MIB * MiB - GUEST_DIRTY_END);
          assert.ok(dHigh.equals(high), `memory above the dirty area differs from the snapshot: ${firstDifference(dHigh, high)}`);
        } finally {
          await killAll(d);
        }
      });

      test(`exact (${label}): a paused destination's RAM equals the snapshot, read while postcopy runs and after; then it runs on`, { timeout: 120_000 }, async (t) => {
        let d: Destination | undefined;
        try {
          d = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true });
          const dq = d.q;
          const h = restore({ file, qmp: d.qmp, channels: c.channels, postcopy });
          // Read the guest's dirty area as soon as RUN is reached: most of it is not there yet, so
          // QEMU's own reads fault and ask us for the pages. QEMU 11.1 refuses pmemsave while an
          // incoming migration runs ("Guest memory access not allowed during migration").
          const readDuring = version === '10';
          let during: Promise<Buffer> | undefined;
          let ran = false;
          h.on('postcopy-running', () => {
            ran = true;
            if (!readDuring) return;
            during = dumpGuestMemory(dq, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
            during.catch(() => {});
          });
          const s = await completed(t, h, dq, c, totalPages, 'restore --postcopy into a paused destination');
          assert.equal(s['time-to-running'], undefined, 'the guest stays paused (-S, no --resume)');
          assert.equal(s.destinationQemu['run-state-after'], 'paused');
          assert.ok(ran, 'postcopy-running was emitted');
          const snapDirty = await snapshotRam(file, GUEST_DIRTY_START, GUEST_DIRTY_END);
          if (during) {
            const memDuring = await during;
            assert.ok(memDuring.equals(snapDirty), `the dirty area read during postcopy differs from the snapshot: ${firstDifference(memDuring, snapDirty)}`);
            assert.ok(s.postcopy!.requests > 0, 'QEMU\'s reads of missing pages became page requests');
          }
          const all = await dumpGuestMemory(dq, 0, MEM_MIB * MiB);
          const snapAll = await snapshotRam(file, 0, MEM_MIB * MiB);
          snapAll.fill(0, HOLE_START, HOLE_END);
          all.fill(0, HOLE_START, HOLE_END);
          assert.ok(all.equals(snapAll), `destination RAM after postcopy differs from the snapshot: ${firstDifference(all, snapAll)}`);
          assert.ok(checkDirtyInvariant(snapDirty).ok, 'the snapshot itself is consistent');

          await dq.qmp.execute('cont');
          await waitGuestPasses(dq, 2, 30_000);
          await dq.qmp.execute('stop');
          const mem = await dumpGuestMemory(dq, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
          const inv = checkDirtyInvariant(mem);
          assert.ok(inv.ok, `the guest broke the invariant after cont: ${inv.reason}`);
          assert.ok(!mem.equals(snapDirty), 'the guest changed its memory after cont');
        } finally {
          await killAll(d);
        }
      });
    }

    test('the destination killed in postcopy: restore fails promptly, saying the guest is lost', { timeout: 90_000 }, async (t) => {
      let d: Destination | undefined;
      try {
        d = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true, paused: false });
        const dq = d.q;
        const c = CONFIGS.find((x) => x.version === version && x.preempt)!;
        // Slow enough that the kill lands long before the last page.
        const h = restore({ file, qmp: d.qmp, channels: c.channels, postcopy: { preempt: true, bandwidth: 8 * MiB } });
        h.on('postcopy-running', () => {
          setTimeout(() => dq.proc.kill('SIGKILL'), 300);
        });
        const t0 = Date.now();
        const r = await settle(h.done, 60_000, 'restore with the destination killed');
        assert.ok(!r.ok, 'restore failed');
        t.diagnostic(`after ${Date.now() - t0} ms: ${r.error.name}: ${r.error.message}`);
        assert.ok(r.error instanceof PostcopyDestinationLostError, `a PostcopyDestinationLostError (${r.error.name})`);
        assert.match(r.error.message, /postcopy/);
        assert.match(r.error.message, /lost/);
        assert.match(r.error.message, /snapshot file is intact/);
        assert.ok(Date.now() - t0 < 20_000, 'no hang');
      } finally {
        await killAll(d);
      }
    });

    if (version === '10') {
      test('restore CLI --postcopy --json with 2 channels: that multifd was left off is said on stderr too, not only in the JSON notes', { timeout: 120_000 }, async () => {
        let d: Destination | undefined;
        try {
          d = await startDestination(dir, { version, memMiB: MEM_MIB, bootSector: true });
          const r = await cli(['restore', file, '--qmp', d.qmp, '--channels', '2', '--postcopy', '--json']);
          assert.equal(r.code, 0, r.stderr);
          const s = JSON.parse(r.stdout) as RestoreSummary;
          assert.match(s.notes?.join(' ') ?? '', /multifd/, 'the JSON notes say it');
          assert.match(r.stderr, /^multifd: note: .*multifd.*channels 0/m, 'stderr says it');
        } finally {
          await killAll(d);
        }
      });
    }
  });
}
