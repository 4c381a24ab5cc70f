/**
 * Starts real QEMU processes (for `demo` and the interop tests). Every instance lives in its
 * own mkdtemp directory under /tmp because the QEMU 11 wrapper runs QEMU in a chroot that
 * only shares /tmp with us.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../transports/qmp-client.js';
import { writeBootSector } from './bootsector.js';

export type QemuVersion = '10' | '11';

const DEFAULT_BINARIES: Record<QemuVersion, string> = {
  '10': 'qemu-system-x86_64',
  '11': 'qemu-system-x86_64-latest',
};

/** MULTIFD_QEMU10 / MULTIFD_QEMU11 override the binaries, e.g. for a locally built QEMU. */
export function qemuBinary(version: QemuVersion): string {
  return process.env[`MULTIFD_QEMU${version}`] || DEFAULT_BINARIES[version];
}

/** The installed QEMU's version string, or undefined when `bin` does not run. */
export function qemuVersionOf(bin: string): { major: number; text: string } | undefined {
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8', timeout: 20_000 });
  const m = /QEMU emulator version (\d+)\.[^\s]*/.exec(r.stdout ?? '');
  if (r.status !== 0 || !m) return undefined;
  return { major: Number(m[1]), text: m[0] };
}

const haveCache = new Map<QemuVersion, boolean>();

/** True when the binary for `version` runs and reports that major version. */
export function haveQemu(version: QemuVersion): boolean {
  const cached = haveCache.get(version);
  if (cached !== undefined) return cached;
  const r = spawnSync(qemuBinary(version), ['--version'], { encoding: 'utf8', timeout: 20_000 });
  const m = /QEMU emulator version (\d+)\./.exec(r.stdout ?? '');
  const ok = r.status === 0 && m !== null && m[1] === version;
  haveCache.set(version, ok);
  return ok;
}

export interface StartQemuOptions {
  version: QemuVersion;
  /** Overrides the binary chosen by `version`. */
  binary?: string;
  memMiB: number;
  /** Default 'tcg': nested KVM here is slow for guests that write memory. "kvm:tcg" falls back to TCG. */
  accel?: string;
  /** Default 'pc'. Cross-version migration needs a versioned type both sides know, e.g. pc-i440fx-10.0. */
  machine?: string;
  paused?: boolean;
  /** Value for -incoming, e.g. 'defer'. */
  incoming?: string;
  /**
   * Boot the dirtying guest from a raw IDE disk. A migration destination should set this
   * too: the device layout must match the source even though the disk is never read there.
   */
  bootSector?: boolean;
  extraArgs?: string[];
  /** How long to wait for the QMP socket. Default 15 s. */
  startTimeoutMs?: number;
}

export interface QemuInstance {
  qmp: QmpClient;
  dir: string;
  proc: ChildProcess;
  pid: number;
  version: QemuVersion;
  qmpAddress: string;
  serialPath: string;
  args: string[];
  stderr(): string;
  /** What the guest wrote to COM1 so far. */
  serialLog(): string;
  /** Resolves when the process has exited (immediately if it already has). */
  exited(): Promise<void>;
  kill(): Promise<void>;
}

const MAX_CAPTURE = 1 << 20;
const live = new Set<{ proc: ChildProcess; dir: string }>();

// A failing test can leave QEMU running; this keeps `node --test` from hanging on orphans
// and /tmp from filling with 128 MiB memory dumps.
process.on('exit', () => {
  for (const inst of live) {
    try { inst.proc.kill('SIGKILL'); } catch { /* already gone */ }
    try { rmSync(inst.dir, { recursive: true, force: true }); } catch { /* best effort */ }
  }
});

/** `-accel` arguments for an accelerator name or a colon-separated fallback list ("kvm:tcg"). */
export function accelArgs(accel: string): string[] {
  return accel.split(':').filter((a) => a !== '').flatMap((a) => ['-accel', a]);
}

export async function startQemu(opts: StartQemuOptions): Promise<QemuInstance> {
  const dir = mkdtempSync('/tmp/multifd-qemu-');
  const qmpPath = join(dir, 'qmp.sock');
  const serialPath = join(dir, 'serial.log');
  const args = [
    '-nodefaults', '-no-user-config', '-display', 'none',
    '-machine', opts.machine ?? 'pc',
    // "kvm:tcg" (the old -machine accel= list syntax) becomes -accel kvm -accel tcg: -accel
    // itself rejects the list, and repeating it gives the same first-that-works fallback.
    ...accelArgs(opts.accel ?? 'tcg'),
    '-m', String(opts.memMiB),
    '-qmp', `unix:${qmpPath},server=on,wait=off`,
    '-serial', `file:${serialPath}`,
  ];
  if (opts.paused) args.push('-S');
  if (opts.incoming !== undefined) args.push('-incoming', opts.incoming);
  if (opts.bootSector) {
    const img = join(dir, 'boot.img');
    writeBootSector(img);
    args.push('-drive', `file=${img},format=raw,if=ide,index=0,media=disk`);
  }
  if (opts.extraArgs) args.push(...opts.extraArgs);

  const bin = opts.binary ?? qemuBinary(opts.version);
  const proc = spawn(bin, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
  const entry = { proc, dir };
  live.add(entry);

  let captured = '';
  const capture = (b: Buffer) => {
    if (captured.length < MAX_CAPTURE) captured += b.toString('utf8');
  };
  proc.stdout!.on('data', capture);
  proc.stderr!.on('data', capture);

  let exitInfo: string | undefined;
  const exitedP = new Promise<void>((resolve) => {
    proc.once('exit', (code, signal) => {
      exitInfo = signal ? `killed by ${signal}` : `exited with code ${code}`;
      resolve();
    });
    proc.once('error', (err) => {
      exitInfo = `failed to start ${bin}: ${err.message}`;
      resolve();
    });
  });

  const cleanupDir = () => {
    live.delete(entry);
    rmSync(dir, { recursive: true, force: true });
  };

  const qmpAddress = `unix:${qmpPath}`;
  const deadline = Date.now() + (opts.startTimeoutMs ?? 15_000);
  let qmp: QmpClient | undefined;
  let lastErr: unknown;
  while (!qmp) {
    if (exitInfo !== undefined) {
      // Give the stderr pipe a moment to drain so the error shows QEMU's own message.
      await sleep(50);
      cleanupDir();
      throw new Error(`QEMU ${opts.version} (${bin}) ${exitInfo} before QMP came up.\nargs: ${args.join(' ')}\nstderr:\n${captured}`);
    }
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      await exitedP;
      cleanupDir();
      throw new Error(`QEMU ${opts.version} QMP socket ${qmpPath} not ready after ${opts.startTimeoutMs ?? 15_000} ms (${String(lastErr)}).\nstderr:\n${captured}`);
    }
    if (existsSync(qmpPath)) {
      try {
        qmp = await QmpClient.connect(qmpAddress, { timeoutMs: 5_000 });
        break;
      } catch (err) {
        lastErr = err;
      }
    }
    await sleep(50);
  }

  let killing: Promise<void> | undefined;
  const kill = (): Promise<void> => {
    killing ??= (async () => {
      if (exitInfo === undefined && !qmp!.closed) {
        try {
          await qmp!.execute('quit', undefined, { timeoutMs: 3_000 });
        } catch {
          // The socket usually closes before the reply arrives; either way we wait for exit below.
        }
      }
      qmp!.close();
      const gone = await Promise.race([exitedP.then(() => true), sleep(5_000, undefined, { ref: false }).then(() => false)]);
      if (!gone) {
        proc.kill('SIGKILL');
        await exitedP;
      }
      live.delete(entry);
      await rm(dir, { recursive: true, force: true });
    })();
    return killing;
  };

  return {
    qmp,
    dir,
    proc,
    pid: proc.pid!,
    version: opts.version,
    qmpAddress,
    serialPath,
    args,
    stderr: () => captured,
    serialLog: () => {
      try { return readFileSync(serialPath, 'latin1'); } catch { return ''; }
    },
    exited: () => exitedP,
    kill,
  };
}

/**
 * Reads guest-physical memory through QMP pmemsave. The file goes into the instance
 * directory so QEMU (possibly chrooted) can write it and kill() removes it.
 */
export async function dumpGuestMemory(q: QemuInstance, addr: number, size: number): Promise<Buffer> {
  const file = join(q.dir, `pmem-${addr.toString(16)}-${size.toString(16)}-${Date.now()}.bin`);
  await q.qmp.execute('pmemsave', { val: addr, size, filename: file }, { timeoutMs: 60_000 });
  try {
    const buf = await readFile(file);
    if (buf.length !== size) throw new Error(`pmemsave wrote ${buf.length} bytes, expected ${size}`);
    return buf;
  } finally {
    await rm(file, { force: true });
  }
}

const TERMINAL_MIGRATION_STATES = new Set(['completed', 'failed', 'cancelled']);

/**
 * Polls query-migrate until the migration ends. A failed (or cancelled) migration is
 * returned, not thrown, so callers can assert on error-desc; only a timeout throws.
 */
export async function waitMigration(qmp: QmpClient, opts: { timeoutMs?: number; intervalMs?: number } = {}): Promise<any> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const deadline = Date.now() + timeoutMs;
  let last: any;
  for (;;) {
    last = await qmp.execute('query-migrate', undefined, { timeoutMs: 10_000 });
    if (last && TERMINAL_MIGRATION_STATES.has(last.status)) return last;
    if (Date.now() > deadline) {
      throw new Error(`migration did not finish within ${timeoutMs} ms; last query-migrate: ${JSON.stringify(last)}`);
    }
    await sleep(opts.intervalMs ?? 100);
  }
}

/** Waits until the guest has reported at least `passes` completed passes on COM1. */
export async function waitGuestPasses(q: QemuInstance, passes: number, timeoutMs = 30_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const n = countPasses(q.serialLog());
    if (n >= passes) return n;
    if (Date.now() > deadline) {
      throw new Error(`guest completed only ${n} of ${passes} passes in ${timeoutMs} ms.\nQEMU stderr:\n${q.stderr()}`);
    }
    await sleep(50);
  }
}

export function countPasses(serial: string): number {
  let n = 0;
  for (let i = 0; i < serial.length; i++) if (serial.charCodeAt(i) === 0x42) n++;
  return n;
}
