// This VM reports free memory to its host (virtio-balloon free page reporting), and the host
// drops what is reported. A process that later touches such memory pays a fault on the host for
// every page: ~2 CPU-s per GiB against ~0.4 for memory that stayed backed. QEMU's destination
// touches its whole guest RAM, so a QEMU→QEMU run took 1.2 s or 0.25 s for the same 1 GiB
// depending on whether the memory it got had been reported meanwhile (it is after ~20 s idle).
// A bare-metal host has no such cost, so the bench holds reporting back while it runs and warms
// the memory the runs will get; both are undone at exit. MULTIFD_BENCH_HOST_REPORTING=keep
// measures the machine as it is.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { freemem } from 'node:os';

const PARAMS = '/sys/module/page_reporting/parameters';
const GiB = 1024 ** 3;
/** The longest this kernel lets freed memory wait before it is reported (it refuses more). */
const HOLD_MS = 300_000;

export interface HostMemory {
  /** 'held': reporting held back; 'as-is': left alone; 'absent': no such knob. */
  reporting: 'held' | 'as-is' | 'absent';
  /**
   * Touches `gib` of memory in a child that then exits, so the runs that follow get memory the
   * host still backs (only while held; memory left unused for HOLD_MS is reported again, so call
   * it again before each group of runs). Returns what it did.
   */
  warm(gib: number): { gib: number; ms: number };
  /** MiB the kernel reported to the host since the bench started (read when called). */
  reportedMiB(): number;
}

function read(name: string): string | undefined {
  try {
    return readFileSync(`${PARAMS}/${name}`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

function touch(want: number): { gib: number; ms: number } {
  // Never more than leaves 2 GiB free: the warm-up must not push the machine into reclaim.
  const gib = Math.max(0, Math.min(want, Math.floor(freemem() / GiB) - 2));
  const t0 = performance.now();
  if (gib > 0) {
    // A child, so the memory goes back to the kernel (and stays backed) when it exits.
    const code = `const b=[];for(let i=0;i<${gib * 16};i++){const x=Buffer.allocUnsafeSlow(64<<20);for(let o=0;o<x.length;o+=4096)x[o]=1;b.push(x)}`;
    const r = spawnSync(process.execPath, ['-e', code], { stdio: 'inherit' });
    if (r.status !== 0) console.error(`bench: warming ${gib} GiB of memory failed (status ${r.status}); going on`);
  }
  return { gib, ms: Math.round(performance.now() - t0) };
}

/**
 * Holds free page reporting back: freed memory must stay free for HOLD_MS before it is
 * reported, and up to 64 GiB may wait. The original settings come back when the process exits,
 * however it exits.
 */
export function holdHostMemory(): HostMemory {
  const reported0 = Number(read('reported_kib') ?? NaN);
  const reportedMiB = (): number => Math.round((Number(read('reported_kib') ?? NaN) - reported0) / 1024);
  const none = (reporting: HostMemory['reporting']): HostMemory => ({ reporting, warm: () => ({ gib: 0, ms: 0 }), reportedMiB });
  if (!existsSync(`${PARAMS}/min_free_ms`)) return none('absent');
  if (process.env.MULTIFD_BENCH_HOST_REPORTING === 'keep') return none('as-is');
  const saved = { min_free_ms: read('min_free_ms'), max_waiting_mib: read('max_waiting_mib') };
  try {
    writeFileSync(`${PARAMS}/min_free_ms`, String(HOLD_MS));
    writeFileSync(`${PARAMS}/max_waiting_mib`, '65536');
  } catch (e) {
    console.error(`bench: cannot hold free page reporting back (${(e as Error).message}); measuring as is`);
    return none('as-is');
  }
  const restore = (): void => {
    for (const [k, v] of Object.entries(saved)) if (v !== undefined) try { writeFileSync(`${PARAMS}/${k}`, v); } catch { /* best effort at exit */ }
  };
  process.once('exit', restore);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { restore(); process.exit(130); });
  return { reporting: 'held', warm: touch, reportedMiB };
}
