// One of our operations in a process of its own, so the benchmark sees its wall time and peak
// RSS apart from the harness (and from QEMU): node dist/bench/child.js '<json>'.
// stdout: the result as the last line. A relay first prints {"listening":"tcp:HOST:PORT"} once it
// listens, so the harness knows where to send QEMU A.

import { readdirSync, readFileSync } from 'node:fs';
import { relay, type RelayOptions } from '../src/conversations/relay.js';
import { restore, type RestoreOptions } from '../src/conversations/restore.js';
import { save, type SaveOptions } from '../src/conversations/save.js';

/** MULTIFD_BENCH_CPU=1: user/system split, page faults and CPU per thread (main, pool, workers). */
function cpuBreakdown(u: NodeJS.ResourceUsage): string {
  const threads = new Map<string, number>(); // name/tid → ms
  for (const tid of readdirSync('/proc/self/task')) {
    try {
      const [comm, rest] = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8').split(/\((.*)\) /).slice(1);
      const f = rest!.split(' ');
      threads.set(`${comm}/${tid}`, (Number(f[11]) + Number(f[12])) * 10);
    } catch { /* the thread ended meanwhile */ }
  }
  const per = [...threads].sort((a, b) => b[1] - a[1]).map(([k, v]) => `${k} ${v}`).join(', ');
  return `cpu ms: user ${(u.userCPUTime / 1000).toFixed(0)}, system ${(u.systemCPUTime / 1000).toFixed(0)}; ` +
    `minor faults ${u.minorPageFault}; voluntary switches ${u.voluntaryContextSwitches}; threads: ${per}`;
}

/**
 * Peak RSS of this process in KiB: the kernel's VmHWM, which starts afresh with the program's own
 * memory. getrusage's maxRSS does not: Linux carries the parent's high-water mark over fork and
 * exec, so every child of the harness reported at least the harness's own RSS (208 MiB for a file
 * restore of 69, once the store floor had run in the harness).
 */
function peakRssKiB(): number {
  try {
    const m = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync('/proc/self/status', 'utf8'));
    if (m) return Number(m[1]);
  } catch { /* not Linux */ }
  return process.resourceUsage().maxRSS;
}

type Job = { op: 'save'; opts: SaveOptions } | { op: 'restore'; opts: RestoreOptions } | { op: 'relay'; opts: RelayOptions };

const job = JSON.parse(process.argv[2]!) as Job;
const t0 = performance.now();
// MULTIFD_BENCH_MEM=1: where the peak RSS goes (V8 heap, external, array buffers), sampled.
const memPeak: Record<string, number> = {};
const memTimer = process.env.MULTIFD_BENCH_MEM
  ? setInterval(() => {
      for (const [k, v] of Object.entries(process.memoryUsage())) memPeak[k] = Math.max(memPeak[k] ?? 0, v);
    }, 20).unref()
  : undefined;
try {
  let done: Promise<unknown>;
  if (job.op === 'save') done = save(job.opts).done;
  else if (job.op === 'restore') done = restore(job.opts).done;
  else {
    const h = relay(job.opts);
    void h.listening.then((addr) => process.stdout.write(JSON.stringify({ listening: addr }) + '\n'), () => {});
    done = h.done;
  }
  const summary = await done;
  const wallMs = performance.now() - t0;
  const u = process.resourceUsage();
  // CPU of the whole process (all threads: main, thread pool, zstd workers).
  const cpuMs = (u.userCPUTime + u.systemCPUTime) / 1000;
  if (memTimer) {
    clearInterval(memTimer);
    const mib = Object.entries(memPeak).map(([k, v]) => `${k} ${(v / 2 ** 20).toFixed(0)}`).join(', ');
    process.stderr.write(`peak MiB: ${mib}\n`);
  }
  if (process.env.MULTIFD_BENCH_CPU) process.stderr.write(`${cpuBreakdown(u)}\n`);
  process.stdout.write(JSON.stringify({ ok: true, wallMs, cpuMs, maxRssKiB: peakRssKiB(), summary }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: (e as Error).message, maxRssKiB: peakRssKiB() }) + '\n');
  process.exitCode = 1;
}
