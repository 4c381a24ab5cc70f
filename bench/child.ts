// One of our operations in a process of its own, so the benchmark sees its wall time and peak
// RSS apart from the harness (and from QEMU): node dist/bench/child.js '<json>'.

import { restore, type RestoreOptions } from '../src/conversations/restore.js';
import { save, type SaveOptions } from '../src/conversations/save.js';

type Job = { op: 'save'; opts: SaveOptions } | { op: 'restore'; opts: RestoreOptions };

const job = JSON.parse(process.argv[2]!) as Job;
const t0 = performance.now();
try {
  const summary = job.op === 'save' ? await save(job.opts).done : await restore(job.opts).done;
  const wallMs = performance.now() - t0;
  const u = process.resourceUsage();
  // CPU of the whole process (all threads: main, thread pool, zstd workers).
  const cpuMs = (u.userCPUTime + u.systemCPUTime) / 1000;
  process.stdout.write(JSON.stringify({ ok: true, wallMs, cpuMs, maxRssKiB: u.maxRSS, summary }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: (e as Error).message, maxRssKiB: process.resourceUsage().maxRSS }) + '\n');
  process.exitCode = 1;
}
