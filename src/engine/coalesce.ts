// Turns a packet's pages (offsets in payload order) into runs of contiguous offsets, each with the
// payload views that cover it, so one positioned writev stores a whole run. Allocates per run,
// never per page.

export interface PageRun {
  /** Byte offset of the run inside its block. */
  offset: number;
  pages: number;
  data: Buffer[];
}

/** Views of bytes [from, to) of the concatenation of `parts`. */
export function sliceViews(parts: readonly Buffer[], from: number, to: number): Buffer[] {
  const out: Buffer[] = [];
  let base = 0;
  for (const p of parts) {
    const end = base + p.length;
    if (end > from && base < to) {
      out.push(p.subarray(Math.max(0, from - base), Math.min(p.length, to - base)));
    }
    if (end >= to) break;
    base = end;
  }
  return out;
}

export function coalescePages(offsets: ArrayLike<number>, count: number, data: readonly Buffer[], pageSize: number): PageRun[] {
  const runs: PageRun[] = [];
  let i = 0;
  while (i < count) {
    const start = i;
    const offset = offsets[i]!;
    i++;
    while (i < count && offsets[i] === offset + (i - start) * pageSize) i++;
    runs.push({ offset, pages: i - start, data: sliceViews(data, start * pageSize, i * pageSize) });
  }
  return runs;
}
