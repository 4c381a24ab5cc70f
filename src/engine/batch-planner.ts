// The one batch planner: a snapshot's present pages, block by block in list order and ascending
// within a block, cut into batches of at most `maxPages` pages as (firstPage, count) runs, so
// each run is one positioned read in the snapshot readers. send plans multifd packets with it
// (≤ 128 pages), the file tools their read batches.

import type { PageBatch } from './multifd-sender.js';
import type { SnapshotSource } from './snapshot.js';

export class BatchPlanner {
  private blockIdx = 0;
  private nextPage = 0;

  constructor(
    private readonly src: Pick<SnapshotSource, 'forEachRun'>,
    private readonly blocks: readonly string[],
    private readonly maxPages: number,
  ) {}

  /** The next batch, or undefined when every present page was planned. */
  next(): PageBatch | undefined {
    while (this.blockIdx < this.blocks.length) {
      const block = this.blocks[this.blockIdx]!;
      const runs: number[] = [];
      let pages = 0;
      this.src.forEachRun(block, (first, count) => {
        const take = Math.min(count, this.maxPages - pages);
        runs.push(first, take);
        pages += take;
        this.nextPage = first + take;
        return pages < this.maxPages;
      }, this.nextPage, this.maxPages);
      if (pages > 0) return { block, runs, pages };
      this.blockIdx++;
      this.nextPage = 0;
    }
    return undefined;
  }
}
