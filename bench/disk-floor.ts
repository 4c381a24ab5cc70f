// The disk's own time for the bytes a snapshot holds, measured in the same run as the jobs:
// receive and save write that much to the disk before they report done (durably), send and
// restore read it back, while QEMU → QEMU touches no disk at all. So the disk's time is the least
// any tool can take for those jobs on this machine, and QEMU → QEMU's time divided by it is the
// best ratio the disk allows.
//
// Measured as the jobs use the disk at their best: O_DIRECT (no page cache to fill or to read
// from), 2 MiB blocks, a few in flight, from memory that is already random (no copy, and nothing
// a host could recognise as zeros), then fdatasync for the write. A file system that refuses
// O_DIRECT (tmpfs on older kernels) is measured buffered, and says so.

import { randomFillSync } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { alignedBuffer } from '../src/engine/aligned-slots.js';

const BLOCK = 2 * 1024 * 1024;
const IN_FLIGHT = 4;
/** Distinct random blocks written in turn. */
const SOURCE_BLOCKS = 32;

export interface DiskFloor {
  /** ms to write the bytes and fdatasync them. */
  writeMs: number;
  /** ms to read them back. */
  readMs: number;
  /** Whether both went around the page cache (O_DIRECT). */
  direct: boolean;
}

let source: Buffer | undefined;

/** Writes `bytes` (rounded up to whole blocks) to a scratch file in `dir`, reads them back, removes it. */
export async function diskFloor(dir: string, bytes: number): Promise<DiskFloor> {
  const blocks = Math.max(1, Math.ceil(bytes / BLOCK));
  if (!source) {
    source = alignedBuffer(SOURCE_BLOCKS * BLOCK);
    randomFillSync(source);
  }
  const src = source;
  const file = join(dir, `.disk-floor-${process.pid}`);
  const O_DIRECT = fsConstants.O_DIRECT ?? 0;
  const openWith = async (flags: number): Promise<{ fh: FileHandle; direct: boolean }> => {
    if (O_DIRECT) {
      const fh = await open(file, flags | O_DIRECT, 0o600).catch(() => undefined);
      if (fh) return { fh, direct: true };
    }
    return { fh: await open(file, flags, 0o600), direct: false };
  };
  // Blocks go out (or come in) IN_FLIGHT at a time, each at its own offset.
  const run = async (op: (block: number, lane: number) => Promise<unknown>): Promise<void> => {
    let next = 0;
    const lane = async (_: unknown, n: number): Promise<void> => {
      while (next < blocks) await op(next++, n);
    };
    await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, blocks) }, lane));
  };
  try {
    const w = await openWith(fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC);
    const t0 = performance.now();
    try {
      await run((i) => w.fh.write(src, (i % SOURCE_BLOCKS) * BLOCK, BLOCK, i * BLOCK));
      await w.fh.datasync();
    } finally {
      await w.fh.close();
    }
    const writeMs = performance.now() - t0;
    const r = await openWith(fsConstants.O_RDONLY);
    // Each lane reads into its own block of aligned memory.
    const into = alignedBuffer(IN_FLIGHT * BLOCK);
    const t1 = performance.now();
    try {
      await run((i, lane) => r.fh.read(into, lane * BLOCK, BLOCK, i * BLOCK));
    } finally {
      await r.fh.close();
    }
    return { writeMs, readMs: performance.now() - t1, direct: w.direct && r.direct };
  } finally {
    await rm(file, { force: true });
  }
}
