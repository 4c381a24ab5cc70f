// npm run bench: our save/restore (receive/send) measured against QEMU doing the same job, in the
// same run, on the same paused guests (75% random data), as ratios. Results go to bench/results/
// as JSON, a Markdown table and an SVG chart of throughput against channel count.
//
//   npm run bench                       full: 1 and 4 GiB, 1/2/4 channels, none/zlib/zstd, 3 reps
//   npm run bench -- --quick            smoke: 256 MiB, 2 channels, none, 1 rep (what CI runs)
//   npm run bench -- --sizes 1 --channels 2,4 --methods none --reps 5
//
// Pairs (same guest, same channel count, same method):
//   receive  QEMU → our save (receive)      vs  QEMU → QEMU          throughput, goal ≥ 1
//   send     our restore (send phase)       vs  QEMU → QEMU          throughput, goal ≥ 1
//   save     our save, wall time            vs  QEMU migrate file:   time ratio, goal ≤ 1.2
//   restore  our restore, wall time         vs  QEMU → QEMU          throughput, goal ≥ 1; QEMU's file restore is the floor
// Peak RSS of our process (a child of this harness) is recorded for every run.

import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, mkdirSync, openSync, rmSync, writeFileSync, writeSync, existsSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { haveQemu, qemuVersionOf, startQemu, waitMigration, type QemuInstance } from '../src/demo/qemu.js';
import { writeChart, writeMarkdown, type Row } from './report.js';

const GiB = 1024 ** 3;
const MiB = 1024 ** 2;
const CHILD = fileURLToPath(new URL('./child.js', import.meta.url));
const RESULTS = fileURLToPath(new URL('../../bench/results/', import.meta.url));
const WORK = '/tmp/multifd-bench';

interface Args {
  quick: boolean;
  sizes: number[];
  channels: number[];
  methods: string[];
  reps: number;
  version: '10' | '11';
}

function parseArgs(argv: string[]): Args {
  const get = (name: string): string | undefined => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const quick = argv.includes('--quick');
  const list = (name: string, dflt: string): string[] => (get(name) ?? dflt).split(',').filter(Boolean);
  return {
    quick,
    sizes: list('sizes', quick ? '0.25' : '1,4').map(Number),
    channels: list('channels', quick ? '2' : '1,2,4').map(Number),
    methods: list('methods', quick ? 'none' : 'none,zlib,zstd'),
    reps: Number(get('reps') ?? (quick ? 1 : 3)),
    version: (get('qemu') ?? '10') as '10' | '11',
  };
}

/** 75% random data as loader blobs: below the PCI hole from 16 MiB on, the rest above 4 GiB. */
function guestBlobs(sizeGiB: number): { args: string[]; randomBytes: number } {
  const total = sizeGiB * GiB;
  const random = Math.floor((total * 0.75) / MiB) * MiB;
  const lowRoom = Math.min(total, 3 * GiB) - 16 * MiB;
  const low = Math.min(random, lowRoom);
  const parts: [number, number][] = [[0x1000000, low]];
  if (random > low) parts.push([4 * GiB, random - low]);
  const args: string[] = [];
  parts.forEach(([addr, size], i) => {
    const file = join(WORK, `blob-${sizeGiB}g-${i}.bin`);
    if (!existsSync(file)) writeRandom(file, size);
    args.push('-device', `loader,file=${file},addr=0x${addr.toString(16)},force-raw=on`);
  });
  return { args, randomBytes: random };
}

function writeRandom(path: string, size: number): void {
  const fd = openSync(path, 'w');
  const chunk = Buffer.allocUnsafe(64 * MiB);
  for (let done = 0; done < size; done += chunk.length) {
    randomFillSync(chunk);
    writeSync(fd, chunk, 0, Math.min(chunk.length, size - done));
  }
  closeSync(fd);
}

async function child(job: unknown): Promise<{ ok: boolean; wallMs: number; maxRssKiB: number; summary?: any; error?: string }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CHILD, JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    p.stdout.on('data', (d) => { out += d; });
    p.on('error', reject);
    p.on('close', () => {
      try {
        resolve(JSON.parse(out.trim().split('\n').at(-1)!));
      } catch {
        reject(new Error(`bench child printed no result: ${out}`));
      }
    });
  });
}

async function setMigration(q: QemuInstance, channels: number, method: string, caps: Record<string, boolean> = {}): Promise<void> {
  await q.qmp.execute('migrate-set-capabilities', {
    capabilities: Object.entries({ multifd: channels > 0, ...caps }).map(([capability, state]) => ({ capability, state })),
  });
  const params: Record<string, unknown> = { 'max-bandwidth': 100 * GiB };
  if (channels > 0) Object.assign(params, { 'multifd-channels': channels, 'multifd-compression': method });
  await q.qmp.execute('migrate-set-parameters', params);
}

let port = 47000;

interface Ctx {
  version: '10' | '11';
  memMiB: number;
  blobs: string[];
  guestBytes: number;
  channels: number;
  method: string;
}

const accel = 'kvm:tcg';

async function source(c: Ctx, extra: string[] = []): Promise<QemuInstance> {
  return startQemu({ version: c.version, memMiB: c.memMiB, paused: true, accel, extraArgs: [...c.blobs, ...extra] });
}

async function destination(c: Ctx, extra: string[] = []): Promise<QemuInstance> {
  return startQemu({ version: c.version, memMiB: c.memMiB, paused: true, accel, incoming: 'defer', extraArgs: extra });
}

/** QEMU → QEMU over tcp: time from `migrate` to the destination's `completed`. */
async function qemuToQemu(c: Ctx): Promise<Row['result']> {
  const src = await source(c);
  const dst = await destination(c);
  try {
    await setMigration(src, c.channels, c.method);
    await setMigration(dst, c.channels, c.method);
    const uri = `tcp:127.0.0.1:${port++}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri });
    const m = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    const ms = performance.now() - t0;
    if (m.status !== 'completed') throw new Error(`QEMU → QEMU ${m.status}: ${m['error-desc']}`);
    const s = await waitMigration(src.qmp, { timeoutMs: 60_000, intervalMs: 5 });
    return { ms, wireBytes: s.ram?.transferred ?? 0 };
  } finally {
    await src.kill();
    await dst.kill();
  }
}

/** QEMU's own save to a mapped-ram file with multifd. */
async function qemuFileSave(c: Ctx, file: string): Promise<Row['result']> {
  const src = await source(c);
  try {
    await setMigration(src, c.channels, 'none', { 'mapped-ram': true });
    rmSync(file, { force: true });
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri: `file:${file}` });
    const m = await waitMigration(src.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    if (m.status !== 'completed') throw new Error(`QEMU file save ${m.status}: ${m['error-desc']}`);
    return { ms: performance.now() - t0, wireBytes: 0 };
  } finally {
    await src.kill();
  }
}

/** QEMU's own load of a mapped-ram file (the floor for restore). */
async function qemuFileRestore(c: Ctx, file: string): Promise<Row['result']> {
  const dst = await destination(c);
  try {
    await setMigration(dst, c.channels, 'none', { 'mapped-ram': true });
    const t0 = performance.now();
    await dst.qmp.execute('migrate-incoming', { uri: `file:${file}` });
    const m = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    if (m.status !== 'completed') throw new Error(`QEMU file restore ${m.status}: ${m['error-desc']}`);
    return { ms: performance.now() - t0, wireBytes: 0 };
  } finally {
    await dst.kill();
  }
}

/** Our save (QMP + receive) in a child process. */
async function oursSave(c: Ctx, file: string): Promise<{ save: Row['result']; receive: Row['result'] }> {
  const qmp = join(WORK, `save-${process.pid}-${port++}.sock`);
  const src = await source(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    rmSync(file, { force: true });
    const r = await child({ op: 'save', opts: { qmp: `unix:${qmp}`, out: file, channels: c.channels, compression: c.method } });
    if (!r.ok) throw new Error(`save: ${r.error}`);
    return {
      save: { ms: r.wallMs, wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024 },
      receive: { ms: r.summary['total-time'], wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024 },
    };
  } finally {
    await src.kill();
  }
}

/** Our restore (QMP + send over tcp) in a child process. */
async function oursRestore(c: Ctx, file: string): Promise<{ restore: Row['result']; send: Row['result'] }> {
  const qmp = join(WORK, `restore-${process.pid}-${port++}.sock`);
  const dst = await destination(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    const r = await child({ op: 'restore', opts: { file, qmp: `unix:${qmp}`, channels: c.channels, compression: c.method, incoming: `tcp:127.0.0.1:${port++}` } });
    if (!r.ok) throw new Error(`restore: ${r.error}`);
    return {
      restore: { ms: r.wallMs, wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024 },
      send: { ms: r.summary['total-time'], wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024 },
    };
  } finally {
    await dst.kill();
  }
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  if (!haveQemu(a.version)) {
    console.error(`bench: QEMU ${a.version} is not installed; nothing to compare against (see README).`);
    process.exit(1);
  }
  mkdirSync(WORK, { recursive: true });
  mkdirSync(RESULTS, { recursive: true });
  const rows: Row[] = [];
  const started = new Date().toISOString();
  const record = (r: Omit<Row, 'version'>): void => {
    const row = { ...r, version: a.version };
    rows.push(row);
    const rss = row.result.rssMiB !== undefined ? ` rss ${row.result.rssMiB.toFixed(0)} MiB` : '';
    console.error(`  ${row.pair.padEnd(8)} ${row.impl.padEnd(12)} ${row.sizeGiB} GiB ${row.channels} ch ${row.method.padEnd(4)} rep ${row.rep}: ${row.result.ms.toFixed(0)} ms${rss}`);
  };
  for (const sizeGiB of a.sizes) {
    const { args: blobs, randomBytes } = guestBlobs(sizeGiB);
    const memMiB = Math.round(sizeGiB * 1024);
    for (const channels of a.channels) {
      for (const method of a.methods) {
        const c: Ctx = { version: a.version, memMiB, blobs, guestBytes: randomBytes, channels, method };
        const file = join(WORK, `ours-${sizeGiB}g-${channels}-${method}.mig`);
        const qfile = join(WORK, `qemu-${sizeGiB}g-${channels}.mig`);
        const base = { sizeGiB, channels, method, guestBytes: randomBytes };
        for (let rep = 1; rep <= a.reps; rep++) {
          const qq = await qemuToQemu(c);
          for (const pair of ['receive', 'send', 'restore'] as const) record({ ...base, rep, pair, impl: 'qemu→qemu', result: qq });
          const ours = await oursSave(c, file);
          record({ ...base, rep, pair: 'receive', impl: 'ours', result: ours.receive });
          record({ ...base, rep, pair: 'save', impl: 'ours', result: ours.save });
          const back = await oursRestore(c, file);
          record({ ...base, rep, pair: 'send', impl: 'ours', result: back.send });
          record({ ...base, rep, pair: 'restore', impl: 'ours', result: back.restore });
          if (method === 'none') {
            record({ ...base, rep, pair: 'save', impl: 'qemu file', result: await qemuFileSave(c, qfile) });
            record({ ...base, rep, pair: 'restore', impl: 'qemu file', result: await qemuFileRestore(c, qfile) });
          }
        }
        rmSync(file, { force: true });
        rmSync(qfile, { force: true });
      }
    }
  }
  const machine = { cpus: cpus().length, cpuModel: cpus()[0]?.model, memGiB: Math.round(totalmem() / GiB), node: process.version, qemu: qemuVersionOf(a.version === '10' ? 'qemu-system-x86_64' : 'qemu-system-x86_64-latest')?.text, accel };
  const result = { started, finished: new Date().toISOString(), args: a, machine, rows };
  const stem = a.quick ? 'quick' : 'latest';
  writeFileSync(join(RESULTS, `${stem}.json`), JSON.stringify(result, null, 2) + '\n');
  const md = writeMarkdown(result);
  writeFileSync(join(RESULTS, `${stem}.md`), md);
  writeFileSync(join(RESULTS, `${stem}.svg`), writeChart(rows));
  process.stdout.write(md);
}

await main();
