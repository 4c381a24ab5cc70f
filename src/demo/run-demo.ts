// demo: both main jobs end to end on a guest of our own. With QEMU ≥ 10: boot our dirtying guest,
// `save` it while it runs, `restore` the snapshot into a fresh QEMU with our sender, and verify
// the memory (equal to the saved source, the guest's invariant holds, and it runs on). Without
// QEMU: our synthetic source → `receive` → snapshot → `send` → `receive` again, every page compared.

import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { save, type SaveProgress, type SaveSummary } from '../conversations/save.js';
import { receive, type ReceiveProgress, type ReceiveSummary } from '../conversations/receive.js';
import { restore, type RestoreSummary } from '../conversations/restore.js';
import { send, type SendProgress, type SendSummary } from '../conversations/send.js';
import { MappedRamSnapshot } from '../engine/mapped-ram-reader.js';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from './bootsector.js';
import { countPasses, dumpGuestMemory, qemuVersionOf, startQemu, waitGuestPasses, waitMigration, type QemuInstance } from './qemu.js';
import { dirtySyntheticGuest, makeSyntheticGuest, sendSyntheticMigration } from './synthetic-source.js';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';

export interface DemoOptions {
  /**
   * The QEMU binary. Named explicitly, it must run and be QEMU >= 10 (else DemoError); unset,
   * qemu-system-x86_64 is used when installed and the synthetic run otherwise.
   */
  qemu?: string;
  channels?: number;
  keep?: boolean;
  log: (line: string) => void;
  onProgress?: (p: ReceiveProgress | SaveProgress | SendProgress) => void;
}

export interface DemoResult {
  mode: 'qemu' | 'synthetic';
  ok: boolean;
  snapshot: string;
  checks: { name: string; ok: boolean; detail: string }[];
  summary: ReceiveSummary | SaveSummary;
  /** How the snapshot was sent back: into QEMU (restore) or into a second receive (send). */
  restore?: RestoreSummary | SendSummary;
}

export class DemoError extends Error {
  constructor(
    readonly code: 'QEMU_NOT_FOUND' | 'QEMU_TOO_OLD',
    message: string,
  ) {
    super(message);
    this.name = 'DemoError';
  }
}

/** How to run the QEMU installer from this shell: root has no sudo on a minimal system. */
function installHint(): string {
  return process.getuid?.() === 0 ? 'bash scripts/install-qemu.sh' : 'sudo bash scripts/install-qemu.sh';
}

export async function runDemo(opts: DemoOptions): Promise<DemoResult> {
  const bin = opts.qemu ?? 'qemu-system-x86_64';
  const v = qemuVersionOf(bin);
  if (opts.qemu !== undefined && (!v || v.major < 10)) {
    // A binary the user named is not silently replaced by the synthetic run.
    if (v) throw new DemoError('QEMU_TOO_OLD', `--qemu ${bin} is ${v.text}; multifd needs QEMU 10 or newer (install it with: ${installHint()})`);
    const missing = bin.includes('/') && !existsSync(bin);
    throw new DemoError('QEMU_NOT_FOUND', `--qemu ${bin}: ${missing ? 'no such file' : 'is not QEMU (`${bin} --version` printed no QEMU version)'}`);
  }
  if (!v || v.major < 10) {
    opts.log(v ? `${bin} is ${v.text}; multifd needs QEMU 10 or newer.` : `QEMU (${bin}) is not installed.`);
    opts.log(`Install it with:  ${installHint()}   (or pass --qemu PATH)`);
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
  let restored: RestoreSummary | Error | undefined;
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

    opts.log(`restoring the snapshot into a fresh QEMU with our sender (${channels} channels)...`);
    const restoreQmp = join(dir, 'restore-qmp.sock');
    dst = await startQemu({ version: '10', binary: bin, memMiB: 128, bootSector: true, incoming: 'defer', paused: true, extraArgs: ['-qmp', `unix:${restoreQmp},server=on,wait=off`] });
    const r = restore({ file: out, qmp: `unix:${restoreQmp}`, channels });
    if (opts.onProgress) r.on('progress', opts.onProgress);
    restored = await r.done.catch((e: Error) => e);
    if (restored instanceof Error) {
      checks.push({ name: 'restore into QEMU', ok: false, detail: restored.message });
      return { mode: 'qemu', ok: false, snapshot: out, checks, summary };
    }
    opts.log(`restored: ${restored.transferred} bytes in ${restored['total-time']} ms`);
    const m = await waitMigration(dst.qmp, { timeoutMs: 10_000 });
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
    return { mode: 'qemu', ok: checks.every((c) => c.ok), snapshot: out, checks, summary, restore: restored };
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
    // Our sender streams the snapshot into a second receive: the round trip of both main jobs.
    const out2 = join(dir, 'vm-copy.mig');
    const rx2 = receive({ listen: 'tcp:127.0.0.1:0', out: out2, channels });
    const addr2 = await rx2.listening;
    opts.log(`sending the snapshot back with our sender to ${addr2}...`);
    const tx = send({ file: out, to: addr2, channels });
    if (opts.onProgress) tx.on('progress', opts.onProgress);
    const [, sent] = await Promise.all([rx2.done, tx.done]);
    const checks: DemoResult['checks'] = [];
    for (const [label, file] of [['received', out], ['sent and received again', out2]] as const) {
      const snap = await MappedRamSnapshot.open(file);
      try {
        for (const b of expected.blocks) {
          const got = await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE);
          checks.push({ name: `${label}: block ${b.name} equals the source`, ok: got.equals(b.data), detail: `${b.data.length} bytes` });
        }
        checks.push({ name: `${label}: device state verified by its VMDESCRIPTION`, ok: snap.deviceState.sections.length === 1, detail: `${snap.deviceState.sections.length} section(s)` });
      } finally {
        await snap.close();
      }
    }
    checks.push({ name: 'the receiver confirmed the load to the sender', ok: sent.destination === 'confirmed', detail: sent.destination });
    return { mode: 'synthetic', ok: checks.every((c) => c.ok), snapshot: out, checks, summary, restore: sent };
  } finally {
    if (!opts.keep) rmSync(dir, { recursive: true, force: true });
  }
}
