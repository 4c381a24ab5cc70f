/**
 * Helpers for the send/restore interop tests: destinations with a second QMP socket for
 * restore (QEMU serves one client per QMP socket and the harness holds the default one),
 * QEMU's own saves to a file, the CLI as a child process, free ports, and timing a promise
 * that must settle (so a hang fails the test instead of stalling it).
 *
 * Every path QEMU is given lives under /tmp (QEMU 11 runs in a chroot that shares only /tmp).
 */
import { execFile, spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import { startQemu, waitMigration, type QemuInstance, type QemuVersion, type StartQemuOptions } from './qemu.js';

export const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs `node bin/multifd.js ARGS`; never rejects (a non-zero exit is in `code`). */
export function cli(args: string[], timeoutMs = 120_000): Promise<CliResult> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: timeoutMs, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof err.code === 'number' ? err.code : -1) : 0;
      resolve({ code, stdout, stderr: err && err.killed ? `${stderr}\n[killed after ${timeoutMs} ms]` : stderr, ms: Date.now() - t0 });
    });
  });
}

/**
 * A CLI command that listens (receive, relay) as a child process; resolves once it printed its
 * "listening on" line on stderr (it does so also with --json), so the source can be started.
 */
export function startListeningCli(args: string[]): Promise<{ done: Promise<Omit<CliResult, 'ms'>> }> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (b: Buffer) => { stdout += b.toString(); });
    const done = new Promise<Omit<CliResult, 'ms'>>((res) => p.on('exit', (code) => res({ code: code ?? -1, stdout, stderr })));
    p.stderr.on('data', (b: Buffer) => {
      stderr += b.toString();
      if (/^listening on /m.test(stderr)) resolve({ done });
    });
    void done.then((r) => reject(new Error(`CLI exited (${r.code}) before listening: ${r.stderr}`)));
  });
}

/** A TCP port on 127.0.0.1 that nobody listened on a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('no port'))));
    });
  });
}

export interface Destination {
  q: QemuInstance;
  /** The second QMP socket, for restore (unix:PATH). */
  qmp: string;
}

let destinations = 0;

/**
 * A fresh QEMU started with -incoming defer (paused with -S unless `paused: false`) and a second
 * QMP socket in `dir` (which must be under /tmp) for restore to drive.
 */
export async function startDestination(dir: string, o: Omit<StartQemuOptions, 'incoming'>): Promise<Destination> {
  const sock = join(dir, `restore-qmp-${process.pid}-${++destinations}.sock`);
  const q = await startQemu({
    paused: true,
    ...o,
    incoming: 'defer',
    extraArgs: [...(o.extraArgs ?? []), '-qmp', `unix:${sock},server=on,wait=off`],
  });
  return { q, qmp: `unix:${sock}` };
}

export interface QemuSaveOptions {
  /** mapped-ram file (default) or QEMU's plain stream format. */
  mappedRam?: boolean;
  /** multifd channels; 0 = multifd off. Only with mapped-ram (QEMU refuses multifd to a plain file). */
  channels?: number;
  downtimeLimitMs?: number;
  timeoutMs?: number;
}

/** QEMU saves itself to `file` with `migrate file:`; returns the final query-migrate. Throws unless completed. */
export async function qemuSave(q: QemuInstance, file: string, o: QemuSaveOptions = {}): Promise<any> {
  const mappedRam = o.mappedRam ?? true;
  const channels = mappedRam ? (o.channels ?? 2) : 0;
  await q.qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'mapped-ram', state: mappedRam },
      { capability: 'multifd', state: channels > 0 },
    ],
  });
  await q.qmp.execute('migrate-set-parameters', {
    'max-bandwidth': 107374182400,
    ...(channels > 0 ? { 'multifd-channels': channels } : {}),
    ...(o.downtimeLimitMs !== undefined ? { 'downtime-limit': o.downtimeLimitMs } : {}),
  });
  await q.qmp.execute('migrate', { uri: `file:${file}` });
  const st = await waitMigration(q.qmp, { timeoutMs: o.timeoutMs ?? 120_000 });
  if (st.status !== 'completed') {
    throw new Error(`QEMU ${q.version} failed to save to ${file}: ${st.status} ${st['error-desc'] ?? ''}\nstderr:\n${q.stderr()}`);
  }
  return st;
}

/** Pages the snapshot holds (what a sender must send), per block and in total. */
export async function presentPages(file: string): Promise<{ total: number; blocks: Map<string, number>; format: string; machine: string }> {
  const s = await openSnapshot(file);
  try {
    const blocks = new Map<string, number>();
    let total = 0;
    for (const b of s.blockList) {
      const n = s.presentPages(b.name);
      blocks.set(b.name, n);
      total += n;
    }
    return { total, blocks, format: s.format, machine: s.configuration.machine };
  } finally {
    await s.close();
  }
}

export type Outcome<T> = { ok: true; value: T; ms: number } | { ok: false; error: Error; ms: number };

/** Settles `p` or fails after `timeoutMs` (a hang must fail the test, not stall it). */
export async function settle<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<Outcome<T>> {
  const t0 = Date.now();
  const timer = new AbortController();
  const r = await Promise.race([
    p.then((value) => ({ ok: true as const, value, ms: Date.now() - t0 }), (error: Error) => ({ ok: false as const, error, ms: Date.now() - t0 })),
    sleep(timeoutMs, undefined, { signal: timer.signal }).then(() => undefined, () => undefined),
  ]);
  timer.abort();
  if (!r) throw new Error(`${what} neither completed nor failed within ${timeoutMs} ms`);
  return r;
}

/** The error `p` rejects with; fails the test when it resolves or hangs. */
export async function rejection<T>(p: Promise<T>, timeoutMs: number, what: string): Promise<Error & { qemuError?: string }> {
  const r = await settle(p, timeoutMs, what);
  if (r.ok) throw new Error(`${what} succeeded although it should have failed: ${JSON.stringify(r.value).slice(0, 500)}`);
  return r.error;
}

/** Mbit/s for `bytes` in `ms`. */
export function mbitps(bytes: number, ms: number): string {
  return ms > 0 ? ((bytes * 8) / (ms * 1000)).toFixed(1) : 'n/a';
}

export type { QemuVersion };
