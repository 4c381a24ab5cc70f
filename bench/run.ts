// npm run bench: our save/restore (receive/send) measured against QEMU doing the same job, in the
// same run, on the same paused guests (75% random data), as ratios. Results go to bench/results/
// as JSON, a Markdown table and an SVG chart of throughput against channel count.
//
//   npm run bench                       full: 1 and 4 GiB, 1/2/4 channels, none/zlib/zstd, 3 reps
//   npm run bench -- --quick            smoke: 256 MiB, 2 channels, none, 1 rep (what CI runs)
//   npm run bench -- --sizes 1 --channels 2,4 --methods none --reps 5
//   npm run bench -- --methods zlib,zstd --name compressed   results in bench/results/compressed.*
//   npm run bench -- --scenarios relay --sizes 1 --channels 2 --methods none --reps 1 --name relay-try
//   MULTIFD_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" npm run bench -- --ours-only ...
//   MULTIFD_BENCH_MEM=1 (peak heap/external/array buffers of our side on stderr),
//   MULTIFD_BENCH_DIRECT_IO=0 (our saves without O_DIRECT), MULTIFD_BENCH_DOWNTIME_MS (live runs)
//
// Pairs (same guest, same channel count, same method):
//   receive  QEMU → our save (receive)      vs  QEMU → QEMU          throughput, goal ≥ 1
//   send     our restore (send phase)       vs  QEMU → QEMU          throughput, goal ≥ 1
//   save     our save, wall time            vs  QEMU migrate file:   time ratio, goal ≤ 1.2
//   restore  our restore, wall time         vs  QEMU → QEMU          throughput, goal ≥ 1; QEMU's file restore is the floor
//   live     running guest → our save       vs  running QEMU → QEMU  total time and downtime (method none; --no-live skips)
//   relay    QEMU A → our relay → QEMU B   vs  QEMU → QEMU          throughput, goal ≥ 0.8; relay peak RSS goal ≤ 256 MiB (4 GiB guest);
//            with socat installed, QEMU A → socat → QEMU B (a byte pipe) is the floor
//   receive, save, live, send and restore also get the disk's own time for the snapshot's bytes,
//   written or read with O_DIRECT in the same repetition (bench/disk-floor.ts): the least they can take.
//   postcopy our restore --postcopy [--postcopy-preempt] vs our plain restore, both --resume: time until
//            the guest runs and until every page is in place (multifd with postcopy needs --qemu 11;
//            QEMU 10 restores over the main channel). Not part of the default set:
//   npm run bench -- --scenarios postcopy --qemu 11 --sizes 1,4 --channels 2 --methods none --reps 3 --name postcopy
//   s3       save to / restore from S3 (s3://, a real store: S3_ENDPOINT or AWS_ENDPOINT_URL and keys in
//            the environment, e.g. . /tmp/rgw-root.env) against the same jobs on a local file, the store's
//            own parallel PUT/GET of the same bytes (bench/s3-floor.ts), and instant restore (--postcopy
//            --resume) from both: restore goal ≥ 0.8 of the store's GET throughput. Not in the default set:
//   npm run bench -- --scenarios s3 --sizes 1,4 --channels 2 --methods none --reps 3 --name s3
//   background  our save --background (QEMU's background-snapshot, main channel only) against our save
//            (multifd, the live row's settings, --resume) of the same running dirtying guest, one
//            after the other in each rep: QEMU's total time and the guest's downtime (query-migrate).
//            Not in the default set:
//   npm run bench -- --scenarios background --sizes 0.25,1 --channels 2 --methods none --reps 3 --name background
//   relay-0n  a running dirtying guest on A's main channel with xbzrle on: A → our relay 0 → N
//            (B with multifd on `ch` channels, the deltas decoded into packets) against A → B direct
//            (multifd off on both, as QEMU has xbzrle only without it), in the same rep, the order
//            alternating; A held at a 1 ms downtime limit for 4 dirty syncs, then made to switch over;
//            from A's migrate to B's completed, ratio = direct ÷ relay. Not in the default set:
//   npm run bench -- --scenarios relay-0n --sizes 0.25,1 --channels 2 --methods none --reps 3 --name relay-0n
// --scenarios receive,send,save,restore,live,relay picks pairs (default all; live not with --quick
// or --no-live). The QEMU → QEMU run is measured once per rep and shared by receive/send/restore/relay.
// CPU: each job's CPU time, ours plus the QEMU peer's (both QEMUs for relay), against QEMU's two
// sides (or QEMU alone for file jobs); our process's own CPU time is recorded too (oursCpuMs).
// Peak RSS of our process (a child of this harness) is recorded for every run.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { closeSync, fsyncSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, existsSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { countPasses, haveQemu, qemuVersionOf, startQemu, waitGuestPasses, waitMigration, type QemuInstance } from '../src/demo/qemu.js';
import { diskFloor } from './disk-floor.js';
import { CreateBucketCommand, DeleteBucketCommand, DeleteObjectCommand } from '@aws-sdk/client-s3';
import { parseObjectUrl, s3Client } from '../src/transports/s3.js';
import { getFloor, storeFloor, type GetFloor } from './s3-floor.js';
import { holdHostMemory } from './host-memory.js';
import { hostCpuSince, sampleHostCpu } from './host-cpu.js';
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
  /** Only our side (for profiling): QEMU's runs are skipped and no ratios come out. */
  oursOnly: boolean;
  /** Also the running-guest runs (method none): total time and downtime. */
  live: boolean;
  /** The pairs to measure (--scenarios; default all, live only without --quick/--no-live). */
  scenarios: Scenario[];
  /** File stem under bench/results/ (default latest; quick for --quick). */
  name: string | undefined;
  /** Where the snapshot files of save/restore go, ours and QEMU's (--dir; default WORK). */
  dir: string;
}

const SCENARIOS = ['receive', 'send', 'save', 'restore', 'live', 'relay', 'postcopy', 's3', 'background', 'relay-0n'] as const;
/** Measured only when asked for with --scenarios. */
const OPT_IN: readonly Scenario[] = ['postcopy', 's3', 'background', 'relay-0n'];
type Scenario = (typeof SCENARIOS)[number];

const USAGE = `usage: npm run bench -- [options]
  --scenarios LIST   ${SCENARIOS.join(',')} (default: all but ${OPT_IN.join(', ')})
  --sizes LIST       guest sizes in GiB (default 1,4; --quick 0.25)
  --channels LIST    multifd channels (default 1,2,4; --quick 2)
  --methods LIST     none,zlib,zstd (default all; --quick none)
  --reps N           repetitions per job (default 3; --quick 1)
  --qemu 10|11       QEMU version (default 10)
  --ours-only        skip the QEMU counterparts (for profiling)
  --no-live          skip the running-guest runs
  --quick            a short smoke run
  --name NAME        write bench/results/NAME.{json,md,svg} (default: latest)
  --dir DIR          where the snapshot files go, ours and QEMU's (default ${WORK};
                     /dev/shm takes the disk out of receive, save, send and restore)
  --help             this text`;

const KNOWN_FLAGS = new Set(['--scenarios', '--sizes', '--channels', '--methods', '--reps', '--qemu', '--name', '--dir', '--ours-only', '--no-live', '--quick', '--help', '-h']);

function parseArgs(argv: string[]): Args {
  if (argv.includes('--help') || argv.includes('-h')) {
    console.log(USAGE);
    process.exit(0);
  }
  // An unknown flag must not start an hour of benchmarks that overwrites the latest results.
  const bad = argv.filter((a) => a.startsWith('-') && !KNOWN_FLAGS.has(a));
  if (bad.length) {
    console.error(`bench: unknown option(s) ${bad.join(', ')}\n${USAGE}`);
    process.exit(2);
  }
  const get = (name: string): string | undefined => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const quick = argv.includes('--quick');
  const list = (name: string, dflt: string): string[] => (get(name) ?? dflt).split(',').filter(Boolean);
  const liveByDefault = !argv.includes('--no-live') && !quick;
  const scenarios = list('scenarios', SCENARIOS.filter((x) => (x !== 'live' || liveByDefault) && !OPT_IN.includes(x)).join(','));
  const unknown = scenarios.filter((x) => !(SCENARIOS as readonly string[]).includes(x));
  if (unknown.length) {
    console.error(`bench: unknown scenario(s) ${unknown.join(', ')}; known: ${SCENARIOS.join(', ')}`);
    process.exit(2);
  }
  return {
    quick,
    sizes: list('sizes', quick ? '0.25' : '1,4').map(Number),
    channels: list('channels', quick ? '2' : '1,2,4').map(Number),
    methods: list('methods', quick ? 'none' : 'none,zlib,zstd'),
    reps: Number(get('reps') ?? (quick ? 1 : 3)),
    version: (get('qemu') ?? '10') as '10' | '11',
    oursOnly: argv.includes('--ours-only'),
    live: scenarios.includes('live'),
    scenarios: scenarios as Scenario[],
    name: get('name'),
    dir: get('dir') ?? WORK,
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

/** CPU time (user + system, ms) QEMU has used so far, from /proc. */
function qemuCpuMs(q: QemuInstance): number {
  try {
    const f = readFileSync(`/proc/${q.pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / CLOCK_TICKS;
  } catch {
    return NaN;
  }
}
const CLOCK_TICKS = 100;

interface ChildResult { ok: boolean; wallMs: number; cpuMs: number; maxRssKiB: number; summary?: any; error?: string }

interface ChildRun {
  /** The address a relay child listens on (its first stdout line); rejects if it exits first. */
  listening: Promise<string>;
  result: Promise<ChildResult>;
  /** Kills the child if it is still running (a relay whose source never came). */
  kill(): void;
}

function startChild(job: unknown): ChildRun {
  // MULTIFD_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles our side of every run.
  const nodeArgs = (process.env.MULTIFD_BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
  const p = spawn(process.execPath, [...nodeArgs, CHILD, JSON.stringify(job)], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  let exited = false;
  let onListening: (addr: string) => void = () => {};
  let noListening: (e: Error) => void = () => {};
  const listening = new Promise<string>((res, rej) => { onListening = res; noListening = rej; });
  listening.catch(() => {});
  p.stdout.on('data', (d) => {
    out += d;
    const m = /^\{"listening":"([^"]+)"\}$/m.exec(out);
    if (m) onListening(m[1]!);
  });
  const result = new Promise<ChildResult>((resolve, reject) => {
    p.on('error', reject);
    p.on('close', () => {
      exited = true;
      noListening(new Error(`bench child exited before listening: ${out}`));
      try {
        resolve(JSON.parse(out.trim().split('\n').at(-1)!));
      } catch {
        reject(new Error(`bench child printed no result: ${out}`));
      }
    });
  });
  return { listening, result, kill: () => { if (!exited) p.kill('SIGKILL'); } };
}

async function child(job: unknown): Promise<ChildResult> {
  return startChild(job).result;
}

async function setMigration(q: QemuInstance, channels: number, method: string, caps: Record<string, boolean> = {}, extra: Record<string, unknown> = {}): Promise<void> {
  await q.qmp.execute('migrate-set-capabilities', {
    capabilities: Object.entries({ multifd: channels > 0, ...caps }).map(([capability, state]) => ({ capability, state })),
  });
  const params: Record<string, unknown> = { 'max-bandwidth': 100 * GiB, ...extra };
  if (channels > 0) Object.assign(params, { 'multifd-channels': channels, 'multifd-compression': method });
  await q.qmp.execute('migrate-set-parameters', params);
}

// Below the kernel's ephemeral range (32768–60999 by default): ports picked from inside it
// collided with the local ports of the bench's own outgoing connections ("Address already in
// use" from QEMU's migrate-incoming). Offset by pid, so runs after one another do not meet
// each other's TIME_WAIT sockets either.
let port = 20000 + (process.pid % 10) * 1000;

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
  // Loading GiBs of loader blobs can take QEMU longer than the default 15 s to bring QMP up.
  return startQemu({ version: c.version, memMiB: c.memMiB, paused: true, accel, extraArgs: [...c.blobs, ...extra], startTimeoutMs: 60_000 });
}

async function destination(c: Ctx, extra: string[] = []): Promise<QemuInstance> {
  return startQemu({ version: c.version, memMiB: c.memMiB, paused: true, accel, incoming: 'defer', extraArgs: extra, startTimeoutMs: 60_000 });
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
    const cpu0 = qemuCpuMs(src) + qemuCpuMs(dst);
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri });
    const m = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    const ms = performance.now() - t0;
    if (m.status !== 'completed') throw new Error(`QEMU → QEMU ${m.status}: ${m['error-desc']}`);
    const cpuMs = qemuCpuMs(src) + qemuCpuMs(dst) - cpu0;
    const s = await waitMigration(src.qmp, { timeoutMs: 60_000, intervalMs: 5 });
    return { ms, wireBytes: s.ram?.transferred ?? 0, cpuMs };
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
    const cpu0 = qemuCpuMs(src);
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri: `file:${file}` });
    const m = await waitMigration(src.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    if (m.status !== 'completed') throw new Error(`QEMU file save ${m.status}: ${m['error-desc']}`);
    const ms = performance.now() - t0;
    // QEMU's file migration does not fsync: at `completed` its pages may be in the page cache
    // only. Our save is durable when it reports done; durableMs is QEMU's time to the same point.
    const fd = openSync(file, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    return { ms, durableMs: performance.now() - t0, wireBytes: 0, cpuMs: qemuCpuMs(src) - cpu0 };
  } finally {
    await src.kill();
  }
}

/** QEMU's own load of a mapped-ram file (the floor for restore). */
async function qemuFileRestore(c: Ctx, file: string): Promise<Row['result']> {
  const dst = await destination(c);
  try {
    await setMigration(dst, c.channels, 'none', { 'mapped-ram': true });
    const cpu0 = qemuCpuMs(dst);
    const t0 = performance.now();
    await dst.qmp.execute('migrate-incoming', { uri: `file:${file}` });
    const m = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    if (m.status !== 'completed') throw new Error(`QEMU file restore ${m.status}: ${m['error-desc']}`);
    return { ms: performance.now() - t0, wireBytes: 0, cpuMs: qemuCpuMs(dst) - cpu0 };
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
    const cpu0 = qemuCpuMs(src);
    const r = await child({ op: 'save', opts: { qmp: `unix:${qmp}`, out: file, channels: c.channels, compression: c.method, ...BUFFERED } });
    if (!r.ok) throw new Error(`save: ${r.error}`);
    // The job's CPU: ours plus the QEMU source's (QEMU→QEMU counts both of its sides likewise).
    const cpuMs = r.cpuMs + qemuCpuMs(src) - cpu0;
    return {
      save: { ms: r.wallMs, wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs, oursCpuMs: r.cpuMs },
      receive: { ms: r.summary['total-time'], wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs, oursCpuMs: r.cpuMs },
    };
  } finally {
    await src.kill();
  }
}

/** MULTIFD_BENCH_DIRECT_IO=0: our saves write pages through the page cache (for A/B runs). */
const BUFFERED = process.env.MULTIFD_BENCH_DIRECT_IO === '0' ? { directIo: false } : {};

/** Our restore (QMP + send over tcp) in a child process; `onStart` runs as the child is started (QEMU is up). */
async function oursRestore(c: Ctx, file: string, onStart?: () => void): Promise<{ restore: Row['result']; send: Row['result'] }> {
  const qmp = join(WORK, `restore-${process.pid}-${port++}.sock`);
  const dst = await destination(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    const cpu0 = qemuCpuMs(dst);
    const host0 = sampleHostCpu();
    onStart?.();
    const r = await child({ op: 'restore', opts: { file, qmp: `unix:${qmp}`, channels: c.channels, compression: c.method, incoming: `tcp:127.0.0.1:${port++}` } });
    const host = hostCpuSince(host0);
    if (!r.ok) throw new Error(`restore: ${r.error}`);
    const cpuMs = r.cpuMs + qemuCpuMs(dst) - cpu0;
    return {
      restore: { ms: r.wallMs, wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs, oursCpuMs: r.cpuMs, ...(host ? { host } : {}) },
      send: { ms: r.summary['total-time'], wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs, oursCpuMs: r.cpuMs },
    };
  } finally {
    await dst.kill();
  }
}

/**
 * The reference for instant restore: QEMU → QEMU with postcopy-ram, switched at once
 * (migrate-start-postcopy right after migrate), unlimited postcopy bandwidth. ms = until the
 * destination completed; runningMs = until it reported postcopy-active (RUN; it stays paused
 * there with -S, so this is when its guest could run). QEMU 10 refuses multifd with postcopy: 0 channels there.
 */
async function qemuPostcopy(c: Ctx): Promise<Row['result']> {
  const src = await source(c);
  const dst = await destination(c);
  try {
    const channels = c.version === '10' ? 0 : c.channels;
    await setMigration(src, channels, 'none', { 'postcopy-ram': true }, { 'max-postcopy-bandwidth': 0 });
    await setMigration(dst, channels, 'none', { 'postcopy-ram': true });
    const uri = `tcp:127.0.0.1:${port++}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    const cpu0 = qemuCpuMs(src) + qemuCpuMs(dst);
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri });
    await src.qmp.execute('migrate-start-postcopy');
    let runningMs: number | undefined;
    for (;;) {
      const m = await dst.qmp.execute('query-migrate');
      if (runningMs === undefined && m.status === 'postcopy-active') runningMs = performance.now() - t0;
      if (m.status === 'completed') break;
      if (m.status === 'failed') throw new Error(`QEMU → QEMU postcopy: ${m['error-desc']}`);
      if (performance.now() - t0 > 600_000) throw new Error('QEMU → QEMU postcopy did not complete');
      await new Promise((r) => setTimeout(r, 5));
    }
    const ms = performance.now() - t0;
    const cpuMs = qemuCpuMs(src) + qemuCpuMs(dst) - cpu0;
    const s = await waitMigration(src.qmp, { timeoutMs: 60_000, intervalMs: 5 });
    return { ms, ...(runningMs !== undefined ? { runningMs } : {}), requests: s.ram?.['postcopy-requests'] ?? 0, wireBytes: s.ram?.transferred ?? 0, cpuMs };
  } finally {
    await src.kill();
    await dst.kill();
  }
}

/**
 * Our restore of `file` into a paused destination with --resume: plainly, or with postcopy. ms =
 * until the destination completed; runningMs = until its guest ran (RESUME).
 */
async function oursRestoreTimed(c: Ctx, file: string, postcopy: { preempt?: boolean } | undefined): Promise<Row['result']> {
  const qmp = join(WORK, `restore-${process.pid}-${port++}.sock`);
  const dst = await destination(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    const cpu0 = qemuCpuMs(dst);
    const r = await child({ op: 'restore', opts: { file, qmp: `unix:${qmp}`, channels: c.channels, incoming: `tcp:127.0.0.1:${port++}`, resume: true, ...(postcopy ? { postcopy } : {}) } });
    if (!r.ok) throw new Error(`restore${postcopy ? ' --postcopy' : ''}: ${r.error}`);
    const s = r.summary;
    if (s['time-to-running'] === undefined) throw new Error(`restore${postcopy ? ' --postcopy' : ''}: the guest did not run (${s.destinationQemu?.['run-state-after']})`);
    return {
      ms: s['time-to-complete'],
      runningMs: s['time-to-running'],
      ...(s.postcopy ? { requests: s.postcopy.requests, ...(s.postcopy['run-time'] !== undefined ? { sendRunMs: s.postcopy['run-time'], sendSwitchMs: s.postcopy['switch-time'] } : {}) } : {}),
      ...(s.store ? { openMs: s.store['open-ms'] } : {}),
      wireBytes: s.transferred,
      rssMiB: r.maxRssKiB / 1024,
      cpuMs: r.cpuMs + qemuCpuMs(dst) - cpu0,
      oursCpuMs: r.cpuMs,
    };
  } finally {
    await dst.kill();
  }
}

/**
 * QEMU A → our relay (a child process) → QEMU B, both QEMUs set up exactly as for QEMU → QEMU and
 * timed the same way: from A's `migrate` to B's `completed`. The relay takes A's channel count and
 * method on both sides. cpuMs is the job's (the relay plus both QEMUs, against QEMU → QEMU's two
 * sides); oursCpuMs and rssMiB are the relay process's alone.
 */
async function oursRelay(c: Ctx): Promise<Row['result']> {
  let r: ChildRun | undefined;
  try {
    return await throughMiddle(c, 'relay', async (to) => {
      r = startChild({ op: 'relay', opts: { listen: `tcp:127.0.0.1:${port++}`, to, channelsIn: c.channels, channelsOut: c.channels, compressionIn: c.method, compressionOut: c.method } });
      return r.listening;
    }, async (src, ms, qemuCpu) => {
      const s = await waitMigration(src.qmp, { timeoutMs: 60_000, intervalMs: 5 });
      if (s.status !== 'completed') throw new Error(`relay: QEMU A ${s.status}: ${s['error-desc']}`);
      const res = await r!.result;
      if (!res.ok) throw new Error(`relay: ${res.error}`);
      if (res.summary.destination !== 'confirmed') throw new Error(`relay: B did not confirm (${JSON.stringify(res.summary.destination)})`);
      return { ms, wireBytes: res.summary['bytes-out'], rssMiB: res.maxRssKiB / 1024, cpuMs: res.cpuMs + qemuCpu, oursCpuMs: res.cpuMs };
    });
  } finally {
    r?.kill();
  }
}

/**
 * QEMU A → a middle → QEMU B, both QEMUs set up as for QEMU → QEMU. `middle` gets B's incoming
 * address and returns where A migrates to; the time runs from A's migrate to B's completed, and
 * `done` turns it and both QEMUs' CPU over that time into the row (A and B still up).
 */
async function throughMiddle(
  c: Ctx,
  what: string,
  middle: (to: string) => Promise<string>,
  done: (src: QemuInstance, ms: number, qemuCpu: number) => Promise<Row['result']>,
): Promise<Row['result']> {
  const src = await source(c);
  const dst = await destination(c);
  try {
    await setMigration(src, c.channels, c.method);
    await setMigration(dst, c.channels, c.method);
    const to = `tcp:127.0.0.1:${port++}`;
    await dst.qmp.execute('migrate-incoming', { uri: to });
    const uri = await middle(to);
    const cpu0 = qemuCpuMs(src) + qemuCpuMs(dst);
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri });
    const m = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    const ms = performance.now() - t0;
    if (m.status !== 'completed') throw new Error(`${what}: QEMU B ${m.status}: ${m['error-desc']}`);
    return await done(src, ms, qemuCpuMs(src) + qemuCpuMs(dst) - cpu0);
  } finally {
    await src.kill();
    await dst.kill();
  }
}

/** socat, when installed: the byte-pipe control of the relay scenario. */
const SOCAT = ['/usr/bin/socat', '/usr/local/bin/socat'].find((f) => existsSync(f));

/** Whether something listens on 127.0.0.1:port (from /proc/net/tcp, without connecting to it). */
function listening(port: number): boolean {
  const hex = `0100007F:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  return readFileSync('/proc/net/tcp', 'utf8').split('\n').some((l) => {
    const f = l.trim().split(/\s+/);
    return f[1] === hex && f[3] === '0A';
  });
}

/**
 * The relay's control: QEMU A → socat → QEMU B, a byte pipe (a forked socat per connection, so
 * channels run in parallel) that parses nothing, timed like oursRelay. What a relay costs on this
 * machine before any protocol work: every byte crosses loopback twice instead of once.
 */
async function pipeRelay(c: Ctx, socat: string): Promise<Row['result']> {
  let pipe: ChildProcess | undefined;
  // socat's own CPU is not counted (its forks are not ours to measure): QEMUs only.
  try {
    return await throughMiddle(c, 'socat relay', async (to) => {
      const listenPort = port++;
      const p = spawn(socat, [`TCP-LISTEN:${listenPort},bind=127.0.0.1,fork,reuseaddr`, to.replace(/^tcp:/, 'TCP:')], { stdio: 'ignore' });
      pipe = p;
      for (let i = 0; !listening(listenPort); i++) {
        if (i > 200 || p.exitCode !== null) throw new Error('socat did not listen');
        await new Promise((r) => setTimeout(r, 10));
      }
      return `tcp:127.0.0.1:${listenPort}`;
    }, async (_src, ms, qemuCpu) => ({ ms, wireBytes: 0, cpuMs: qemuCpu }));
  } finally {
    pipe?.kill();
  }
}

/**
 * Downtime QEMU may plan for in the running-guest runs, the same for both: QEMU's default. The
 * final round grows with it (QEMU stops the guest once the rest fits the limit at the measured
 * bandwidth), so a large limit measures QEMU's switchover choice more than either destination.
 * MULTIFD_BENCH_DOWNTIME_MS overrides it (the boot-sector guest dirties ~25k pages per pass under
 * TCG; a slow destination may never converge at 300 ms).
 */
const LIVE_DOWNTIME_MS = Number(process.env.MULTIFD_BENCH_DOWNTIME_MS ?? 300);

/** The dirtying boot-sector guest (TCG: nested KVM makes its writes crawl) on top of the blobs. */
async function liveSource(c: Ctx, extra: string[] = []): Promise<QemuInstance> {
  const q = await startQemu({ version: c.version, memMiB: c.memMiB, accel: 'tcg', bootSector: true, extraArgs: [...c.blobs, ...extra] });
  await waitGuestPasses(q, 2, 120_000);
  return q;
}

/** Running guest QEMU → QEMU: the source's total time and downtime; the guest must run on. */
async function liveQemuToQemu(c: Ctx): Promise<Row['result']> {
  const src = await liveSource(c);
  const dst = await startQemu({ version: c.version, memMiB: c.memMiB, accel: 'tcg', bootSector: true, incoming: 'defer' });
  try {
    await setMigration(src, c.channels, c.method, {}, { 'downtime-limit': LIVE_DOWNTIME_MS });
    await setMigration(dst, c.channels, c.method);
    const uri = `tcp:127.0.0.1:${port++}`;
    await dst.qmp.execute('migrate-incoming', { uri });
    await src.qmp.execute('migrate', { uri });
    const m = await waitMigration(src.qmp, { timeoutMs: 600_000, intervalMs: 20 });
    if (m.status !== 'completed') throw new Error(`live QEMU → QEMU ${m.status}: ${m['error-desc']}`);
    const d = await waitMigration(dst.qmp, { timeoutMs: 60_000, intervalMs: 20 });
    if (d.status !== 'completed') throw new Error(`live QEMU → QEMU destination ${d.status}: ${d['error-desc']}`);
    const run = await dst.qmp.execute('query-status');
    if (run.status !== 'running') throw new Error(`live QEMU → QEMU: the destination is ${run.status}, not running`);
    return { ms: m['total-time'], wireBytes: m.ram?.transferred ?? 0, downtimeMs: m.downtime };
  } finally {
    await src.kill();
    await dst.kill();
  }
}

/** Running guest → our save: the source's total time and downtime as QEMU reports them. */
async function liveOursSave(c: Ctx, file: string): Promise<Row['result']> {
  const qmp = join(WORK, `live-${process.pid}-${port++}.sock`);
  const src = await liveSource(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    rmSync(file, { force: true });
    const r = await child({ op: 'save', opts: { qmp: `unix:${qmp}`, out: file, channels: c.channels, compression: c.method, downtimeLimitMs: LIVE_DOWNTIME_MS } });
    if (!r.ok) throw new Error(`live save: ${r.error}`);
    return { ms: r.summary.source['total-time'], wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, downtimeMs: r.summary.source.downtime };
  } finally {
    await src.kill();
    rmSync(file, { force: true });
  }
}

/**
 * save --background against save on one running dirtying guest (TCG, on top of the blobs), in
 * the order given: QEMU's total time and downtime for each. The plain save uses `c.channels`,
 * the live row's downtime limit and --resume, so the guest runs on into the next save; before
 * each save the guest is seen making progress again.
 */
async function backgroundJobs(c: Ctx, file: string, backgroundFirst: boolean, record: (impl: Row['impl'], result: Row['result']) => void): Promise<void> {
  const qmp = join(WORK, `bg-${process.pid}-${port++}.sock`);
  const src = await liveSource(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    const jobs: { impl: Row['impl']; opts: Record<string, unknown> }[] = [
      { impl: 'save --background', opts: { background: true } },
      { impl: 'save', opts: { channels: c.channels, compression: c.method, downtimeLimitMs: LIVE_DOWNTIME_MS, resume: true } },
    ];
    for (const j of backgroundFirst ? jobs : jobs.reverse()) {
      await waitGuestPasses(src, countPasses(src.serialLog()) + 1, 120_000);
      rmSync(file, { force: true });
      const cpu0 = qemuCpuMs(src);
      const r = await child({ op: 'save', opts: { qmp: `unix:${qmp}`, out: file, ...j.opts, ...BUFFERED } });
      if (!r.ok) throw new Error(`${j.impl}: ${r.error}`);
      const q = r.summary.source;
      if (q['run-state-after'] !== 'running') throw new Error(`${j.impl}: the guest is ${q['run-state-after']} after the save, not running`);
      record(j.impl, { ms: q['total-time'], downtimeMs: q.downtime, wireBytes: r.summary.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs: r.cpuMs + qemuCpuMs(src) - cpu0, oursCpuMs: r.cpuMs });
    }
  } finally {
    await src.kill();
    rmSync(file, { force: true });
  }
}

/** relay-0n: dirty syncs A makes with a 1 ms downtime limit before it switches over, so XBZRLE deltas flow (they start in round 3). */
const RELAY_0N_ROUNDS = 4;
/**
 * relay-0n: the downtime limit that then makes A switch over at its next check (as the interop
 * tests do). Not the live rows' 300 ms: through the relay A did not converge at that limit with the
 * dirtying guest (a 0.25 GiB run took 262 s and 48 GB, direct 1 s), so the time would measure
 * convergence luck, not the same work on both paths.
 */
const RELAY_0N_SWITCH_DOWNTIME_MS = 100_000;

/**
 * One relay-0n job: a fresh running dirtying guest A (TCG, on top of the blobs), multifd off,
 * xbzrle on (QEMU's default cache), held at a 1 ms downtime limit for RELAY_0N_ROUNDS dirty syncs,
 * then made to switch over: the same rounds on both paths. Through our relay (a child, `--channels-in 0 --channels-out
 * ch`) to B with multifd on `ch` channels, or directly to B with multifd off. ms = from A's migrate
 * to B's completed; downtime is A's; wire is what reached B (the relay's bytes out: pages there
 * are whole again). A migration in which no XBZRLE page went out measured nothing of it: an error.
 */
async function relay0nJob(c: Ctx, viaRelay: boolean): Promise<Row['result']> {
  const what = viaRelay ? 'relay 0 → N' : 'xbzrle QEMU → QEMU';
  const src = await liveSource(c);
  const dst = await startQemu({ version: c.version, memMiB: c.memMiB, accel: 'tcg', bootSector: true, incoming: 'defer', paused: true });
  let r: ChildRun | undefined;
  try {
    await setMigration(src, 0, 'none', { xbzrle: true }, { 'downtime-limit': 1 });
    await setMigration(dst, viaRelay ? c.channels : 0, 'none');
    const to = `tcp:127.0.0.1:${port++}`;
    await dst.qmp.execute('migrate-incoming', { uri: to });
    let uri = to;
    if (viaRelay) {
      r = startChild({ op: 'relay', opts: { listen: `tcp:127.0.0.1:${port++}`, to, channelsIn: 0, channelsOut: c.channels } });
      uri = await r.listening;
    }
    const t0 = performance.now();
    await src.qmp.execute('migrate', { uri });
    for (;;) {
      const m = await src.qmp.execute('query-migrate');
      if ((m.ram?.['dirty-sync-count'] ?? 0) >= RELAY_0N_ROUNDS || ['completed', 'failed', 'cancelled'].includes(m.status)) break;
      await new Promise((res) => setTimeout(res, 20));
    }
    await src.qmp.execute('migrate-set-parameters', { 'downtime-limit': RELAY_0N_SWITCH_DOWNTIME_MS });
    const d = await waitMigration(dst.qmp, { timeoutMs: 600_000, intervalMs: 5 });
    const ms = performance.now() - t0;
    if (d.status !== 'completed') throw new Error(`${what}: QEMU B ${d.status}: ${d['error-desc']}`);
    const m = await waitMigration(src.qmp, { timeoutMs: 60_000, intervalMs: 5 });
    if (m.status !== 'completed') throw new Error(`${what}: QEMU A ${m.status}: ${m['error-desc']}`);
    if (!(m['xbzrle-cache']?.pages > 0)) throw new Error(`${what}: no XBZRLE page went out (${m.ram?.['dirty-sync-count']} dirty syncs)`);
    if (!r) return { ms, wireBytes: m.ram?.transferred ?? 0, downtimeMs: m.downtime };
    const res = await r.result;
    if (!res.ok) throw new Error(`${what}: ${res.error}`);
    if (res.summary.destination !== 'confirmed') throw new Error(`${what}: B did not confirm (${JSON.stringify(res.summary.destination)})`);
    return { ms, wireBytes: res.summary['bytes-out'], downtimeMs: m.downtime, rssMiB: res.maxRssKiB / 1024, oursCpuMs: res.cpuMs };
  } finally {
    r?.kill();
    await src.kill();
    await dst.kill();
  }
}

function want0(a: Args, s: Scenario): boolean {
  return a.scenarios.includes(s);
}

/** A bucket of this run's own; the children find the store through AWS_ENDPOINT_URL. */
async function benchBucket(): Promise<string> {
  const endpoint = process.env.AWS_ENDPOINT_URL ?? process.env.S3_ENDPOINT;
  if (!endpoint || !process.env.AWS_ACCESS_KEY_ID) {
    console.error('bench: --scenarios s3 needs a store: S3_ENDPOINT or AWS_ENDPOINT_URL and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (. /tmp/rgw-root.env)');
    process.exit(2);
  }
  process.env.AWS_ENDPOINT_URL = endpoint;
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
  const bucket = `multifd-bench-${process.pid}-${Date.now().toString(36)}`;
  await (await s3Client({})).send(new CreateBucketCommand({ Bucket: bucket }));
  return bucket;
}

/**
 * Save and restore to/from S3 next to the same jobs on a local file, the store's own PUT/GET of
 * the object's bytes, and instant restore from both. The file jobs use `file`, the S3 jobs an
 * object of the bench's bucket.
 */
async function s3Jobs(c: Ctx, rep: number, file: string, bucket: string, record: (impl: Row['impl'], result: Row['result']) => void): Promise<void> {
  const key = `ours-${c.memMiB}m-${c.channels}.mig`;
  const url = `s3://${bucket}/${key}`;
  try {
    await s3JobsOn(c, rep, file, bucket, url, record);
  } finally {
    // A 4 GiB run leaves a 3.2 GB object otherwise, in a store that other runs and tests share.
    await (await s3Client({})).send(new DeleteObjectCommand({ Bucket: bucket, Key: key })).catch(() => {});
  }
}

async function s3JobsOn(c: Ctx, rep: number, file: string, bucket: string, url: string, record: (impl: Row['impl'], result: Row['result']) => void): Promise<void> {
  const local = await oursSave(c, file);
  record('save file', local.save);
  const remote = await oursSaveSummary(c, url);
  record('save s3', remote.result);
  const objectBytes = remote.summary.store['object-size'] as number;
  const floor = await storeFloor(bucket, objectBytes);
  record('store put', { ms: floor.putMs, wireBytes: objectBytes });
  record('store get fresh', { ms: floor.getMs, wireBytes: objectBytes, ...(floor.getHost ? { host: floor.getHost } : {}) });
  record('restore file', (await oursRestore(c, file)).restore);
  // The restore's floor reads the snapshot object itself, right before or after the restore (the
  // order alternating by rep: whichever goes second finds what the first left in the store's caches).
  const snapshotGet = async (): Promise<void> => {
    const g = await getFloor(parseObjectUrl(url));
    record('store get', { ms: g.getMs, wireBytes: g.bytes, ...(g.host ? { host: g.host } : {}) });
  };
  if (rep % 2 === 1) await snapshotGet();
  record('restore s3', (await oursRestore(c, url)).restore);
  if (rep % 2 === 0) await snapshotGet();
  const beside = await getBesideRestore(c, file, url);
  record('store get beside', { ms: beside.get.getMs, wireBytes: beside.get.bytes, besideMs: beside.restoreMs, ...(beside.get.host ? { host: beside.get.host } : {}) });
  record('instant file', await oursRestoreTimed(c, file, {}));
  record('instant s3', await oursRestoreTimed(c, url, {}));
}

/**
 * The store's GET of the snapshot object while our restore from the local file delivers the same
 * guest into QEMU beside it: the two halves of a restore from S3, side by side and not coupled.
 * On a machine the store shares with the restore (this bench's), the GET cannot be faster here
 * than in a restore from S3 that does both, so this is what the machine leaves the GET. The GET
 * starts as the restore's child process does (its QEMU is up; its first page goes out some
 * 0.1–0.2 s later, once Node and our modules have loaded).
 */
async function getBesideRestore(c: Ctx, file: string, url: string): Promise<{ get: GetFloor; restoreMs: number }> {
  let started!: () => void;
  const go = new Promise<void>((r) => (started = r));
  const get = go.then(() => getFloor(parseObjectUrl(url)));
  get.catch(() => {});
  const r = await oursRestore(c, file, started);
  return { get: await get, restoreMs: r.restore.ms };
}

/** oursSave for an s3:// output, keeping the summary (its store entry has the upload). */
async function oursSaveSummary(c: Ctx, out: string): Promise<{ result: Row['result']; summary: any }> {
  const qmp = join(WORK, `save-${process.pid}-${port++}.sock`);
  const src = await source(c, ['-qmp', `unix:${qmp},server=on,wait=off`]);
  try {
    const cpu0 = qemuCpuMs(src);
    const r = await child({ op: 'save', opts: { qmp: `unix:${qmp}`, out, channels: c.channels, compression: c.method } });
    if (!r.ok) throw new Error(`save to ${out}: ${r.error}`);
    const s = r.summary;
    return {
      result: { ms: r.wallMs, wireBytes: s.transferred, rssMiB: r.maxRssKiB / 1024, cpuMs: r.cpuMs + qemuCpuMs(src) - cpu0, oursCpuMs: r.cpuMs, uploadMs: s.store['upload-ms'] },
      summary: s,
    };
  } finally {
    await src.kill();
  }
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  if (!haveQemu(a.version)) {
    console.error(`bench: QEMU ${a.version} is not installed; nothing to compare against (see README).`);
    process.exit(1);
  }
  mkdirSync(WORK, { recursive: true });
  mkdirSync(a.dir, { recursive: true });
  mkdirSync(RESULTS, { recursive: true });
  const s3Bucket = want0(a, 's3') ? await benchBucket() : undefined;
  const hostMemory = holdHostMemory();
  const warmed: { sizeGiB: number; gib: number; ms: number }[] = [];
  const rows: Row[] = [];
  const want = (s: Scenario): boolean => a.scenarios.includes(s);
  const started = new Date().toISOString();
  const record = (r: Omit<Row, 'version'>, log = true): void => {
    const row = { ...r, version: a.version };
    rows.push(row);
    if (!log) return;
    const rss = (row.result.runningMs !== undefined ? ` running after ${row.result.runningMs.toFixed(0)} ms` : '') +
      (row.result.requests !== undefined ? ` ${row.result.requests} requests` : '') +
      (row.result.oursCpuMs !== undefined ? ` own cpu ${row.result.oursCpuMs.toFixed(0)} ms` : '') +
      (row.result.rssMiB !== undefined ? ` rss ${row.result.rssMiB.toFixed(0)} MiB` : '') +
      (row.result.cpuMs !== undefined ? ` cpu ${row.result.cpuMs.toFixed(0)} ms` : '') +
      (row.result.downtimeMs !== undefined ? ` downtime ${row.result.downtimeMs} ms` : '');
    console.error(`  ${row.pair.padEnd(8)} ${row.impl.padEnd(12)} ${row.sizeGiB} GiB ${row.channels} ch ${row.method.padEnd(4)} rep ${row.rep}: ${row.result.ms.toFixed(0)} ms${rss}`);
  };
  // One channel count for the running-guest runs (2, QEMU's default, when measured): each boots
  // the guest under TCG and waits for it to dirty memory, which takes a while.
  const liveChannels = a.channels.includes(2) ? 2 : a.channels[0];
  for (const sizeGiB of a.sizes) {
    const { args: blobs, randomBytes } = guestBlobs(sizeGiB);
    // Before every repetition: a source and a destination of this size, and the page cache
    // beside them. Memory the host took back before the bench started is cold until touched;
    // with reporting stopped, a warm-up after the first costs ~0.5 s per GiB.
    const warm = (): void => {
      if ((hostMemory.reporting !== 'stopped' && hostMemory.reporting !== 'held') || a.quick) return;
      const w = hostMemory.warm(2 * sizeGiB + 4);
      warmed.push({ sizeGiB, ...w });
      console.error(`bench: free page reporting ${hostMemory.reporting}; warmed ${w.gib} GiB in ${w.ms} ms`);
    };
    const memMiB = Math.round(sizeGiB * 1024);
    for (const channels of a.channels) {
      for (const method of a.methods) {
        const c: Ctx = { version: a.version, memMiB, blobs, guestBytes: randomBytes, channels, method };
        const file = join(a.dir, `ours-${sizeGiB}g-${channels}-${method}.mig`);
        const qfile = join(a.dir, `qemu-${sizeGiB}g-${channels}.mig`);
        const base = { sizeGiB, channels, method, guestBytes: randomBytes };
        const liveNow = a.live && method === 'none' && channels === liveChannels;
        for (let rep = 1; rep <= a.reps; rep++) {
          warm();
          // The disk alone, for the jobs that store or load the snapshot: the least they can take.
          const diskJobs = (['receive', 'save', 'send', 'restore', 'live'] as const).filter((p) => (p === 'live' ? liveNow : want(p)));
          if (diskJobs.length) {
            const d = await diskFloor(a.dir, randomBytes);
            for (const pair of diskJobs) {
              const ms = pair === 'send' || pair === 'restore' ? d.readMs : d.writeMs;
              record({ ...base, rep, pair, impl: 'disk', result: { ms, wireBytes: 0, direct: d.direct } }, false);
            }
            console.error(`  disk     ${d.direct ? 'O_DIRECT' : 'buffered'}     ${sizeGiB} GiB rep ${rep}: write ${d.writeMs.toFixed(0)} ms, read ${d.readMs.toFixed(0)} ms`);
          }
          // Which side runs first alternates: on this VM memory that was just freed is cheaper to
          // touch again than memory the host took back, and that favours whoever comes second.
          const qemuFirst = rep % 2 === 1;
          // The QEMU → QEMU run is the baseline of receive, send, restore and relay alike.
          const direct = ['receive', 'send', 'restore', 'relay'] as const;
          const runQemu = async (): Promise<void> => {
            if (a.oursOnly) return;
            if (direct.some(want)) {
              const qq = await qemuToQemu(c);
              for (const pair of direct) if (want(pair)) record({ ...base, rep, pair, impl: 'qemu→qemu', result: qq });
            }
            if (want('relay') && SOCAT) record({ ...base, rep, pair: 'relay', impl: 'socat pipe', result: await pipeRelay(c, SOCAT) });
            if (want('postcopy')) record({ ...base, rep, pair: 'postcopy', impl: 'qemu→qemu postcopy', result: await qemuPostcopy(c) });
            if (method === 'none' && (want('save') || want('restore'))) {
              const saved = await qemuFileSave(c, qfile);
              if (want('save')) record({ ...base, rep, pair: 'save', impl: 'qemu file', result: saved });
              if (want('restore')) record({ ...base, rep, pair: 'restore', impl: 'qemu file', result: await qemuFileRestore(c, qfile) });
            }
          };
          const runOurs = async (): Promise<void> => {
            // Our restore sends the file our save wrote, so send/restore need the save too.
            if (want('receive') || want('save') || want('send') || want('restore')) {
              const ours = await oursSave(c, file);
              if (want('receive')) record({ ...base, rep, pair: 'receive', impl: 'ours', result: ours.receive });
              if (want('save')) record({ ...base, rep, pair: 'save', impl: 'ours', result: ours.save });
              if (want('send') || want('restore')) {
                const back = await oursRestore(c, file);
                if (want('send')) record({ ...base, rep, pair: 'send', impl: 'ours', result: back.send });
                if (want('restore')) record({ ...base, rep, pair: 'restore', impl: 'ours', result: back.restore });
              }
            }
            if (want('relay')) record({ ...base, rep, pair: 'relay', impl: 'ours', result: await oursRelay(c) });
            if (want('s3')) await s3Jobs(c, rep, file, s3Bucket!, (impl, result) => record({ ...base, rep, pair: 's3', impl, result }));
            if (want('postcopy')) {
              if (!existsSync(file)) await oursSave(c, file);
              // Alternating order, as above.
              const variants: ({ preempt?: boolean } | undefined)[] = [undefined, {}, { preempt: true }];
              const order = rep % 2 === 1 ? variants : [...variants].reverse();
              for (const v of order) {
                const impl = v === undefined ? 'restore' : v.preempt ? 'postcopy+preempt' : 'postcopy';
                record({ ...base, rep, pair: 'postcopy', impl, result: await oursRestoreTimed(c, file, v) });
              }
            }
          };
          if (qemuFirst) {
            await runQemu();
            await runOurs();
          } else {
            await runOurs();
            await runQemu();
          }
          if (want('background') && method === 'none' && channels === liveChannels) {
            await backgroundJobs(c, file, qemuFirst, (impl, result) => record({ ...base, rep, pair: 'background', impl, result }));
          }
          if (want('relay-0n') && method === 'none' && channels === liveChannels) {
            for (const viaRelay of qemuFirst ? [false, true] : [true, false]) {
              if (viaRelay || !a.oursOnly) record({ ...base, rep, pair: 'relay-0n', impl: viaRelay ? 'ours' : 'qemu→qemu', result: await relay0nJob(c, viaRelay) });
            }
          }
          if (liveNow) {
            const runLiveQemu = async (): Promise<void> => {
              if (!a.oursOnly) record({ ...base, rep, pair: 'live', impl: 'qemu→qemu', result: await liveQemuToQemu(c) });
            };
            const runLiveOurs = async (): Promise<void> => record({ ...base, rep, pair: 'live', impl: 'ours', result: await liveOursSave(c, file) });
            if (qemuFirst) {
              await runLiveQemu();
              await runLiveOurs();
            } else {
              await runLiveOurs();
              await runLiveQemu();
            }
          }
        }
        rmSync(file, { force: true });
        rmSync(qfile, { force: true });
      }
    }
  }
  const machine = { cpus: cpus().length, cpuModel: cpus()[0]?.model, memGiB: Math.round(totalmem() / GiB), node: process.version,
    hostMemory: { reporting: hostMemory.reporting, warmed, reportedMiB: hostMemory.reportedMiB() },
    qemu: qemuVersionOf(a.version === '10' ? 'qemu-system-x86_64' : 'qemu-system-x86_64-latest')?.text, accel };
  const result = { started, finished: new Date().toISOString(), args: a, machine, rows };
  const stem = a.name ?? (a.quick ? 'quick' : a.oursOnly ? 'ours-only' : a.scenarios.length === 1 && a.scenarios[0] === 'postcopy' ? 'postcopy' : 'latest');
  writeFileSync(join(RESULTS, `${stem}.json`), JSON.stringify(result, null, 2) + '\n');
  const md = writeMarkdown(result);
  writeFileSync(join(RESULTS, `${stem}.md`), md);
  writeFileSync(join(RESULTS, `${stem}.svg`), writeChart(rows));
  if (s3Bucket) await (await s3Client({})).send(new DeleteBucketCommand({ Bucket: s3Bucket })).catch(() => {});
  process.stdout.write(md);
}

await main();
