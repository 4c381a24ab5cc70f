// What both file writers (the mapped-ram snapshot writer and convert/extract's outputs) need:
// positioned gather writes that store every byte or fail, and the temporary-name-then-rename
// discipline that keeps an unfinished file from looking finished.

import { closeSync, fsyncSync, openSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { OutputFileError } from '../codec/errors.js';

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

/** A name next to `finalPath` (same file system, so the final rename is atomic). */
export function temporaryName(finalPath: string): string {
  return join(dirname(finalPath), `.${basename(finalPath)}.partial-${process.pid}-${Date.now()}`);
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
