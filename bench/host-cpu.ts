// The whole host's CPU over a job, from /proc/stat: whether a job was bound by the machine (every
// CPU busy, including time the hypervisor took from us) rather than by the tool. With the store
// on the same host (the bench's Ceph), a restore from S3 and the store's own GET share two CPUs,
// so the restore's extra work (copying pages into QEMU's sockets, QEMU's load) shows up as time.

import { readFileSync } from 'node:fs';
import { cpus } from 'node:os';

/** USER_HZ: /proc/stat counts in hundredths of a second on Linux. */
const TICK_MS = 10;

export interface HostCpuSample {
  atMs: number;
  /** user, nice, system, irq, softirq. */
  busy: number;
  /** Time the hypervisor ran something else while our CPUs wanted to run. */
  steal: number;
}

export interface HostCpu {
  /** CPU-ms busy on this host (all processes) over the job. */
  busyMs: number;
  stealMs: number;
  /** CPU-ms the host had over the job: wall time × CPUs. */
  capacityMs: number;
}

export function sampleHostCpu(): HostCpuSample | undefined {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!.trim().split(/\s+/).slice(1).map(Number);
    const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = f;
    return { atMs: performance.now(), busy: (user + nice + system + irq + softirq) * TICK_MS, steal: steal * TICK_MS };
  } catch {
    return undefined; // not Linux
  }
}

export function hostCpuSince(a: HostCpuSample | undefined): HostCpu | undefined {
  const b = sampleHostCpu();
  if (!a || !b) return undefined;
  return { busyMs: b.busy - a.busy, stealMs: b.steal - a.steal, capacityMs: (b.atMs - a.atMs) * cpus().length };
}

/** "busy 84% + steal 13% of 2 CPUs (15.3 CPU-s)". */
export function describeHostCpu(h: HostCpu): string {
  const pct = (x: number): string => `${Math.round((100 * x) / h.capacityMs)}%`;
  return `host busy ${pct(h.busyMs)} + steal ${pct(h.stealMs)} (${((h.busyMs + h.stealMs) / 1000).toFixed(1)} CPU-s)`;
}
