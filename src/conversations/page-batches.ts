// Reads a snapshot's present pages block by block in bounded batches (runs of consecutive pages
// become one positioned read in the snapshot readers), with the next batch read while the
// caller writes the current one. Memory stays at two scratch buffers whatever the file size.

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { BatchPlanner } from '../engine/batch-planner.js';
import type { PageBatch } from '../engine/multifd-sender.js';
import type { SnapshotSource } from '../engine/snapshot.js';

/** A planned batch with its pages read. */
export interface LoadedBatch extends PageBatch {
  /** The pages of `runs`, in order, as views into scratch (valid until the next batch is pulled). */
  views: Buffer[];
}

export const DEFAULT_BATCH_PAGES = 2048;

/**
 * Yields every present page of `blocks` in file-independent order (block list order, ascending
 * pages). The caller must be done with a batch's views before it asks for the next batch.
 */
export async function* presentPageBatches(src: SnapshotSource, blocks: readonly string[], batchPages = DEFAULT_BATCH_PAGES): AsyncGenerator<LoadedBatch> {
  const scratch = [Buffer.allocUnsafe(src.scratchBytes(batchPages)), Buffer.allocUnsafe(src.scratchBytes(batchPages))];
  const planner = new BatchPlanner(src, blocks, batchPages);
  let turn = 0;
  const load = (): Promise<LoadedBatch> | undefined => {
    const p = planner.next();
    if (!p) return undefined;
    const buf = scratch[turn]!;
    turn ^= 1;
    return src.loadRuns(p.block, p.runs, p.runs.length / 2, buf).then((views) => ({ ...p, views }));
  };
  let pending = load();
  while (pending) {
    let current: LoadedBatch;
    try {
      current = await pending;
    } catch (e) {
      pending = undefined;
      throw e;
    }
    pending = load();
    // A read-ahead that fails while the caller is busy must not become an unhandled rejection.
    pending?.catch(() => {});
    yield current;
  }
}

/** Total present pages of the listed blocks. */
export function countPresent(src: SnapshotSource, blocks: readonly string[]): number {
  return blocks.reduce((n, b) => n + src.presentPages(b), 0);
}

/** Byte offsets (within the block) of every page of a batch, in view order. */
export function batchOffsets(b: PageBatch): Float64Array {
  const out = new Float64Array(b.pages);
  let k = 0;
  for (let i = 0; i < b.runs.length; i += 2) {
    const first = b.runs[i]!;
    for (let p = 0; p < b.runs[i + 1]!; p++) out[k++] = (first + p) * TARGET_PAGE_SIZE;
  }
  return out;
}
