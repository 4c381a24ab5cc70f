// This VM reports free memory to its host (virtio-balloon free page reporting), and the host
// drops what is reported. A process that later touches such memory pays a fault on the host for
// every page: ~2 CPU-s per GiB against ~0.4 for memory that stayed backed. QEMU's destination
// touches its whole guest RAM, so a QEMU→QEMU run took 1.2 s or 0.25 s for the same 1 GiB
// depending on whether the memory it got had been reported meanwhile. A bare-metal host has no
// such cost, so the bench stops reporting while it runs and warms the memory the runs will get
// (memory reported before the bench started stays cold until touched); both are undone at exit.
// MULTIFD_BENCH_HOST_REPORTING=keep measures the machine as it is.
//
// Stopping it takes page_reporting_order above the largest block the buddy allocator keeps
// (order 10 on x86-64), so that no free block qualifies. This kernel's own min_free_ms (freed
// memory waits that long before it is reported) does not hold: with it at its maximum, 4-11 GiB
// were reported within one 4 GiB repetition, seconds after QEMUs exited, apparently because a
// block allocated and freed between two of its passes looks as if it had been free all along.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { freemem } from 'node:os';

const PARAMS = '/sys/module/page_reporting/parameters';
const GiB = 1024 ** 3;
/** The longest this kernel lets freed memory wait before it is reported (it refuses more). */
const HOLD_MS = 300_000;
/** Above MAX_PAGE_ORDER (10 on x86-64): no free block is large enough to be reported. */
const NO_ORDER = '11';

export interface HostMemory {
  /**
   * 'stopped': nothing is reported while the bench runs; 'held': only delayed (this kernel's
   * min_free_ms, which leaks, see above); 'as-is': left alone; 'absent': no such knob.
   */
  reporting: 'stopped' | 'held' | 'as-is' | 'absent';
  /**
   * Touches `gib` of memory in a child that then exits, so the runs that follow get memory the
   * host still backs. Cheap once warm (~0.5 s per GiB), so it can run before each group of runs.
   * Returns what it did.
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
 * Stops free page reporting (or, where that knob is refused, delays it as long as this kernel
 * allows). The original settings come back when the process exits, however it exits.
 */
export function holdHostMemory(): HostMemory {
  const reported0 = Number(read('reported_kib') ?? NaN);
  const reportedMiB = (): number => Math.round((Number(read('reported_kib') ?? NaN) - reported0) / 1024);
  const none = (reporting: HostMemory['reporting']): HostMemory => ({ reporting, warm: () => ({ gib: 0, ms: 0 }), reportedMiB });
  if (!existsSync(`${PARAMS}/page_reporting_order`) && !existsSync(`${PARAMS}/min_free_ms`)) return none('absent');
  if (process.env.MULTIFD_BENCH_HOST_REPORTING === 'keep') return none('as-is');
  const knobs = ['page_reporting_order', 'min_free_ms', 'max_waiting_mib'] as const;
  const saved = new Map(knobs.map((k) => [k, read(k)] as const));
  const restore = (): void => {
    for (const [k, v] of saved) if (v !== undefined) try { writeFileSync(`${PARAMS}/${k}`, v); } catch { /* best effort at exit */ }
  };
  const set = (k: (typeof knobs)[number], v: string): boolean => {
    if (saved.get(k) === undefined) return false;
    try {
      writeFileSync(`${PARAMS}/${k}`, v);
      return read(k) === v;
    } catch {
      return false;
    }
  };
  process.once('exit', restore);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.once(sig, () => { restore(); process.exit(130); });
  if (set('page_reporting_order', NO_ORDER)) return { reporting: 'stopped', warm: touch, reportedMiB };
  if (set('min_free_ms', String(HOLD_MS)) && set('max_waiting_mib', '65536')) {
    console.error('bench: free page reporting could only be delayed, not stopped; 4 GiB runs may meet memory the host took back');
    return { reporting: 'held', warm: touch, reportedMiB };
  }
  console.error('bench: cannot stop free page reporting; measuring as is');
  restore();
  return none('as-is');
}
