// demo: the main job end to end on a guest of our own. With QEMU ≥ 10: boot our dirtying guest,
// `save` it while it runs, restore the snapshot into a fresh QEMU, and verify the memory (equal
// to the saved source, the guest's invariant holds, and it runs on). Without QEMU: our synthetic
// source → `receive` → read the snapshot back and compare every page.

import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { save, type SaveProgress, type SaveSummary } from '../conversations/save.js';
import { receive, type ReceiveProgress, type ReceiveSummary } from '../conversations/receive.js';
import { MappedRamSnapshot } from '../engine/mapped-ram-reader.js';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from './bootsector.js';
import { countPasses, dumpGuestMemory, qemuVersionOf, startQemu, waitGuestPasses, waitMigration, type QemuInstance } from './qemu.js';
import { dirtySyntheticGuest, makeSyntheticGuest, sendSyntheticMigration } from './synthetic-source.js';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';

export interface DemoOptions {
  qemu?: string;
  channels?: number;
  keep?: boolean;
  log: (line: string) => void;
  onProgress?: (p: ReceiveProgress | SaveProgress) => void;
}

export interface DemoResult {
  mode: 'qemu' | 'synthetic';
  ok: boolean;
  snapshot: string;
  checks: { name: string; ok: boolean; detail: string }[];
  summary: ReceiveSummary | SaveSummary;
}

export async function runDemo(opts: DemoOptions): Promise<DemoResult> {
  const bin = opts.qemu ?? 'qemu-system-x86_64';
  const v = qemuVersionOf(bin);
  if (!v || v.major < 10) {
    opts.log(v ? `${bin} is ${v.text}; multifd needs QEMU 10 or newer.` : `QEMU (${bin}) is not installed.`);
    opts.log('Install it with:  sudo bash scripts/install-qemu.sh   (or pass --qemu PATH)');
    opts.log('Running the built-in synthetic source instead.');
    return runSynthetic(opts);
  }
  opts.log(`using ${v.text} (${bin})`);
  return runWithQemu(bin, opts);
}

async function runWithQemu(bin: string, opts: DemoOptions): Promise<DemoResult> {
  const dir = mkdtempSync('/tmp/multifd-demo-');
  const out = join(dir, 'vm.mig');
  const channels = opts.channels ?? 2;
  const checks: DemoResult['checks'] = [];
  let src: QemuInstance | undefined;
  let dst: QemuInstance | undefined;
  try {
    opts.log('starting the source VM (a boot-sector guest that keeps rewriting 99 MiB)...');
    // QEMU serves one client per QMP socket: `save` gets a socket of its own, as a user's would.
    const saveQmp = join(dir, 'save-qmp.sock');
    src = await startQemu({ version: '10', binary: bin, memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${saveQmp},server=on,wait=off`] });
    await waitGuestPasses(src, 3, 30_000);
    opts.log(`saving it while it runs, over ${channels} multifd channels, to ${out}...`);
    const h = save({ qmp: `unix:${saveQmp}`, out, channels, downtimeLimitMs: 20_000 });
    if (opts.onProgress) h.on('progress', opts.onProgress);
    const summary = await h.done;
    opts.log(`saved: ${summary.transferred} bytes in ${summary['total-time']} ms; source now ${summary.source['run-state-after']}`);
    const saved = await dumpGuestMemory(src, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
    await src.kill();
    src = undefined;

    opts.log('restoring the snapshot into a fresh QEMU...');
    dst = await startQemu({ version: '10', binary: bin, memMiB: 128, bootSector: true, incoming: 'defer', paused: true });
    await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }, { capability: 'multifd', state: true }] });
    await dst.qmp.execute('migrate-set-parameters', { 'multifd-channels': channels });
    await dst.qmp.execute('migrate-incoming', { uri: `file:${out}` });
    const m = await waitMigration(dst.qmp, { timeoutMs: 120_000 });
    checks.push({ name: 'QEMU loads the snapshot', ok: m.status === 'completed', detail: `${m.status}${m['error-desc'] ? `: ${m['error-desc']}` : ''}` });
    if (m.status === 'completed') {
      const restored = await dumpGuestMemory(dst, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
      checks.push({ name: 'restored memory equals the saved VM', ok: restored.equals(saved), detail: `${restored.length} bytes compared` });
      const inv = checkDirtyInvariant(restored);
      checks.push({ name: "guest's memory invariant holds", ok: inv.ok, detail: inv.ok ? `value ${inv.value}, boundary page ${inv.boundary}` : inv.reason ?? '' });
      const before = countPasses(dst.serialLog());
      await dst.qmp.execute('cont');
      await waitGuestPasses(dst, before + 3, 30_000);
      await dst.qmp.execute('stop');
      const later = await dumpGuestMemory(dst, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
      const inv2 = checkDirtyInvariant(later);
      checks.push({ name: 'guest runs on after restore', ok: inv2.ok && !later.equals(restored), detail: `${countPasses(dst.serialLog()) - before} more passes; invariant ${inv2.ok ? 'holds' : `broken: ${inv2.reason}`}` });
    }
    return { mode: 'qemu', ok: checks.every((c) => c.ok), snapshot: out, checks, summary };
  } finally {
    await src?.kill();
    await dst?.kill();
    if (!opts.keep) rmSync(dir, { recursive: true, force: true });
  }
}

async function runSynthetic(opts: DemoOptions): Promise<DemoResult> {
  const dir = mkdtempSync('/tmp/multifd-demo-');
  const out = join(dir, 'vm.mig');
  const channels = opts.channels ?? 2;
  try {
    const guest = makeSyntheticGuest(64);
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out, channels });
    if (opts.onProgress) rx.on('progress', opts.onProgress);
    const addr = await rx.listening;
    opts.log(`receiving on ${addr}; sending a 64 MiB synthetic guest over ${channels} channels...`);
    // The source mutates its guest between rounds; compare against a copy made the same way.
    const expected = makeSyntheticGuest(64);
    const [summary] = await Promise.all([rx.done, sendSyntheticMigration(addr, guest, { channels, rounds: 3 })]);
    for (let r = 2; r <= 3; r++) dirtySyntheticGuest(expected, r);
    const snap = await MappedRamSnapshot.open(out);
    const checks: DemoResult['checks'] = [];
    try {
      for (const b of expected.blocks) {
        const got = await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE);
        checks.push({ name: `block ${b.name} equals the source`, ok: got.equals(b.data), detail: `${b.data.length} bytes` });
      }
      checks.push({ name: 'device state verified by its VMDESCRIPTION', ok: snap.deviceState.sections.length === 1, detail: `${snap.deviceState.sections.length} section(s)` });
    } finally {
      await snap.close();
    }
    return { mode: 'synthetic', ok: checks.every((c) => c.ok), snapshot: out, checks, summary };
  } finally {
    if (!opts.keep) rmSync(dir, { recursive: true, force: true });
  }
}
