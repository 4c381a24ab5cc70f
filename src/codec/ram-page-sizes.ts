// RAM block page sizes for postcopy (docs/protocol.md §2.2, §6.2): what a destination's QEMU
// reports about its blocks, and what a source announces from that — the block list's per-block
// page size and POSTCOPY_ADVISE's summary.

import { TARGET_PAGE_SIZE } from './constants.js';

/**
 * The largest host page we send as one unit. QEMU's destination places a host page only once all
 * of its target pages arrived (ram_load_postcopy), so send reads and writes whole host pages: its
 * buffers grow with the page size (2 MiB hugetlbfs pages fit; 1 GiB ones would need GiB buffers).
 */
export const MAX_POSTCOPY_HOST_PAGE = 32 * 1024 * 1024;

const UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4 };

/**
 * Page size per RAM block from the text of QMP `x-query-ramblock` (HMP `info ramblock`, QEMU 6.2+):
 * a header line, then one line per block — name, PSize as QEMU's size_to_str writes it ("4 KiB",
 * "2 MiB"), offset, used, total, HVA, RO. Names are right-aligned and may not contain blanks in
 * what QEMU creates; a line that does not parse is skipped.
 */
export function parseRamblockText(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split(/\r?\n/)) {
    const m = /^\s*(\S.*?)\s+(\d+(?:\.\d+)?) (B|KiB|MiB|GiB|TiB)\s+0x[0-9a-f]+\s/i.exec(line);
    if (!m) continue;
    const unit = UNITS[m[3]!];
    if (unit === undefined) continue;
    out.set(m[1]!, Math.round(Number(m[2]) * unit));
  }
  return out;
}

/** True for a page size postcopy can use: a power of two of at least the target page. */
export function isPageSize(n: number): boolean {
  return Number.isSafeInteger(n) && n >= TARGET_PAGE_SIZE && Number.isInteger(Math.log2(n));
}

/** POSTCOPY_ADVISE's first field: the OR of every block's page size (ram_pagesize_summary). */
export function pageSizeSummary(blocks: readonly string[], pageSizes: ReadonlyMap<string, number>): number {
  let summary = 0n;
  for (const b of blocks) summary |= BigInt(pageSizes.get(b) ?? TARGET_PAGE_SIZE);
  return Number(summary);
}
