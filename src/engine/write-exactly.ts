// What both file writers (the mapped-ram snapshot writer and convert/extract's outputs) need:
// positioned gather writes that store every byte or fail, and the temporary-name-then-rename
// discipline that keeps an unfinished file from looking finished.

import { closeSync, fsyncSync, openSync } from 'node:fs';
import { readdir, unlink, type FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { OutputFileError } from '../codec/errors.js';
import { publish } from './diagnostics.js';

/** Linux IOV_MAX; libuv would split larger vectors anyway, but fewer syscalls is the point. */
const IOV_MAX = 1024;

/** Writes `bufs` back to back at `position` with writev, resuming after short writes. */
export async function writeExactly(fh: FileHandle, bufs: readonly Buffer[], position: number, what: string): Promise<void> {
  let list = bufs.filter((b) => b.length > 0);
  let pos = position;
  while (list.length > 0) {
    const batch = list.length > IOV_MAX ? list.slice(0, IOV_MAX) : list;
    const want = batch.reduce((n, b) => n + b.length, 0);
    const { bytesWritten } = await fh.writev(batch, pos);
    if (bytesWritten === 0) throw new OutputFileError('OUTPUT_FAILED', what, `write at offset ${pos} of ${what} made no progress`);
    pos += bytesWritten;
    if (bytesWritten === want) {
      list = list.slice(batch.length);
      continue;
    }
    // Short write (rare, e.g. near a quota): resume exactly where it stopped.
    let skip = bytesWritten;
    const rest: Buffer[] = [];
    for (const b of list) {
      if (skip >= b.length) { skip -= b.length; continue; }
      rest.push(skip > 0 ? b.subarray(skip) : b);
      skip = 0;
    }
    list = rest;
  }
}

/**
 * This host in temporary names: a PID means something only on the host (PID namespace) that
 * made it, and an output directory may be shared (NFS) by several.
 */
const HOST = hostname().replace(/[^A-Za-z0-9.-]+/g, '_').slice(0, 64) || 'host';

/**
 * A name next to `finalPath` (same file system, so the final rename is atomic):
 * `.NAME.partial-PID-TIME-HOST`, which removeStalePartials() reads back.
 */
export function temporaryName(finalPath: string): string {
  return join(dirname(finalPath), `.${basename(finalPath)}.partial-${process.pid}-${Date.now()}-${HOST}`);
}

/** Whether process `pid` of this host is gone: signal 0 checks without sending (ESRCH: none; EPERM: another user's, alive). */
export function processGone(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid < 1) return false;
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

/**
 * Removes the temporary files of `finalPath` that earlier runs on this host left behind when
 * they were killed (SIGKILL, a crash: nothing of theirs ran to remove them), judged by the PID
 * in the name: only when that process is gone. A file of a live process (a concurrent writer of
 * the same output), of this process, of another host, or named otherwise is kept; files that
 * cannot be listed or removed are left as they are. Returns what was removed.
 */
export async function removeStalePartials(finalPath: string): Promise<{ path: string; pid: number }[]> {
  const dir = dirname(finalPath);
  const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  // save's libvirt output stages its inner snapshot as TEMPNAME.mig.
  const ours = new RegExp(`^\\.${esc(basename(finalPath))}\\.partial-(\\d+)-\\d+-${esc(HOST)}(?:\\.mig)?$`);
  const names = await readdir(dir).catch(() => [] as string[]);
  const removed: { path: string; pid: number }[] = [];
  for (const name of names) {
    const pid = Number(ours.exec(name)?.[1]);
    if (!pid || pid === process.pid || !processGone(pid)) continue;
    const path = join(dir, name);
    if (await unlink(path).then(() => true, () => false)) {
      removed.push({ path, pid });
      publish('output', 'stale-partial-removed', { path, pid });
    }
  }
  return removed;
}

/** fsync of the directory makes the rename durable; some file systems refuse it, which is harmless. */
export function syncDirectory(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try { fsyncSync(fd); } finally { closeSync(fd); }
  } catch {
    // The rename has happened either way.
  }
}
