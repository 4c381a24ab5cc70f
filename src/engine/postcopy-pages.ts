// Which page goes next once a restore is in postcopy (docs/protocol.md §6.2): the destination's page
// requests first, then every remaining page in file order. Each page is handed out exactly once
// after the switch — a page placed twice fails the destination's UFFDIO_COPY — so a page counts
// as sent the moment it is handed out, before it is read from the file or written; a request for
// a page already handed out is ignored (the page is on its way). Memory: one bit per page for
// "sent", plus a bounded queue of requested ranges whatever the guest size.
//
// A block whose destination pages are larger (hugetlbfs: 2 MiB) is handed out in whole host pages:
// QEMU's destination collects a host page's target pages on one channel and places it only once
// all of them arrived ("Non-same host page detected" when another page cuts in; §6.2), and its
// requests and discards are whole host pages too.

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { PageBitmap } from '../codec/mapped-ram.js';
import type { PageRequest } from '../codec/postcopy.js';

/** What a page scheduler needs from a snapshot: the blocks and where their present pages are. */
export interface PostcopyPageSource {
  readonly blockList: readonly { name: string; usedLength: number }[];
  forEachRun(block: string, visit: (firstPage: number, count: number) => boolean | void, fromPage?: number, maxRun?: number): void;
}

import { PageRequestError } from '../codec/errors.js';
export { PageRequestError, type PageRequestProblem } from '../codec/errors.js';

/**
 * presentRunAt asks for runs in pieces of at most this many pages (128 MiB): a request in the
 * middle of a multi-GiB run then scans 4 KiB of bitmap, not the rest of the run.
 */
const RUN_PIECE_PAGES = 32768;

/** Consecutive pages of one block; `present` pages are read from the snapshot, the others are zero. */
export interface PageSpan {
  first: number;
  count: number;
  present: boolean;
}

export interface PageBatchPlan {
  block: string;
  spans: PageSpan[];
  pages: number;
  /** Pages among them that the destination asked for. */
  requested: boolean;
}

export interface PostcopyPageStats {
  /** REQ_PAGES / REQ_PAGES_ID messages received. */
  requests: number;
  /** Pages handed out because they were requested (before the background scan reached them). */
  requestedPages: number;
  /** Requested pages that were already sent (or on their way) and so not sent again. */
  alreadySent: number;
  /** Requested ranges dropped because the queue was full (the background scan sends them anyway). */
  dropped: number;
  /** Pages handed out by the background scan. */
  backgroundPages: number;
}

interface BlockState {
  name: string;
  pages: number;
  /** Target pages per destination host page (1, or 512 for 2 MiB pages). */
  unit: number;
  sent: PageBitmap;
  unsent: number;
}

interface QueuedRange {
  block: BlockState;
  first: number;
  count: number;
}

export interface PostcopyPagesOptions {
  /** Requested ranges kept waiting at most; more are dropped (safe: every page is sent in the end). Default 4096. */
  maxQueuedRanges?: number;
  /** The destination's page size of blocks whose pages are larger than the target page (bytes). */
  pageSizes?: ReadonlyMap<string, number>;
}

export class PostcopyPages {
  private readonly blocks = new Map<string, BlockState>();
  private readonly order: BlockState[];
  private readonly queue: QueuedRange[] = [];
  private queueHead = 0;
  private readonly maxQueued: number;
  private lastRequestBlock: BlockState | undefined;
  private cursorBlock = 0;
  private cursorPage = 0;
  /** The present run found last by the background scan (forEachRun is not free for every file format). */
  private run: { block: BlockState; from: number; first: number; end: number } | undefined;
  private unsentTotal = 0;
  private arrival: { promise: Promise<void>; resolve: () => void } | undefined;
  private finished: { promise: Promise<void>; resolve: () => void } | undefined;
  readonly stats: PostcopyPageStats = { requests: 0, requestedPages: 0, alreadySent: 0, dropped: 0, backgroundPages: 0 };

  constructor(private readonly src: PostcopyPageSource, opts: PostcopyPagesOptions = {}) {
    this.maxQueued = opts.maxQueuedRanges ?? 4096;
    this.order = src.blockList.map((b) => {
      const pages = Math.ceil(b.usedLength / TARGET_PAGE_SIZE);
      const unit = (opts.pageSizes?.get(b.name) ?? TARGET_PAGE_SIZE) / TARGET_PAGE_SIZE;
      if (!Number.isInteger(unit) || unit < 1 || pages % unit !== 0) throw new RangeError(`block "${b.name}": ${pages} pages are no whole number of ${unit}-page host pages`);
      const st: BlockState = { name: b.name, pages, unit, sent: new PageBitmap(pages), unsent: pages };
      this.blocks.set(b.name, st);
      this.unsentTotal += pages;
      return st;
    });
  }

  /** Pages not handed out yet, over all blocks. */
  get unsent(): number {
    return this.unsentTotal;
  }

  get done(): boolean {
    return this.unsentTotal === 0;
  }

  /** Requests waiting to be served. */
  get pendingRequests(): boolean {
    this.skipServedRequests();
    return this.queueHead < this.queue.length;
  }

  /** Resolves when a request arrives (or at once if one waits). */
  requestArrived(): Promise<void> {
    if (this.pendingRequests) return Promise.resolve();
    this.arrival ??= deferred();
    return this.arrival.promise;
  }

  /** Resolves once every page has been handed out. */
  allHandedOut(): Promise<void> {
    if (this.done) return Promise.resolve();
    this.finished ??= deferred();
    return this.finished.promise;
  }

  isSent(block: string, page: number): boolean {
    const b = this.blocks.get(block);
    return b !== undefined && page < b.pages && b.sent.test(page);
  }

  /** Marks pages as sent (precopy pages before the switch, which the destination keeps). */
  markSent(block: string, first: number, count: number): void {
    const b = this.blocks.get(block);
    if (!b) throw new RangeError(`no block "${block}"`);
    if (first < 0 || first + count > b.pages) throw new RangeError(`pages [${first}, +${count}) outside block ${block}`);
    for (let p = first; p < first + count; p++) this.take(b, p);
  }

  /** Target pages per destination host page of `block`. */
  hostPagePages(block: string): number {
    return this.blocks.get(block)?.unit ?? 1;
  }

  /** The largest host page over all blocks, in target pages. */
  get maxHostPagePages(): number {
    return this.order.reduce((n, b) => Math.max(n, b.unit), 1);
  }

  /**
   * At the switch: a host page only some of whose target pages were sent before it becomes
   * unsent again, so that it is discarded and sent whole after the switch (QEMU's source does the
   * same: postcopy_chunk_hostpages). Returns the target pages made unsent.
   */
  alignToHostPages(): number {
    let undone = 0;
    for (const b of this.order) {
      if (b.unit === 1) continue;
      for (let h = 0; h < b.pages; h += b.unit) {
        let sent = 0;
        for (let p = h; p < h + b.unit; p++) if (b.sent.test(p)) sent++;
        if (sent === 0 || sent === b.unit) continue;
        for (let p = h; p < h + b.unit; p++) {
          if (!b.sent.test(p)) continue;
          b.sent.clear(p);
          b.unsent++;
          this.unsentTotal++;
          undone++;
        }
      }
    }
    return undone;
  }

  /** Byte ranges of `block` not sent yet: what POSTCOPY_RAM_DISCARD must cover before LISTEN. */
  unsentRanges(block: string): { start: number; length: number }[] {
    const b = this.blocks.get(block);
    if (!b) throw new RangeError(`no block "${block}"`);
    const out: { start: number; length: number }[] = [];
    let p = 0;
    while (p < b.pages) {
      p = this.nextUnsent(b, p);
      if (p >= b.pages) break;
      const start = p;
      // Eight unsent pages per byte: before the switch this scans the whole guest (4 GiB: 1M pages).
      const bytes = b.sent.bytes;
      while (p < b.pages && !b.sent.test(p)) p = (p & 7) === 0 && bytes[p >>> 3] === 0 && p + 8 <= b.pages ? p + 8 : p + 1;
      out.push({ start: start * TARGET_PAGE_SIZE, length: (p - start) * TARGET_PAGE_SIZE });
    }
    return out;
  }

  /**
   * Takes a page request off the return path. REQ_PAGES (no block) means the block of the previous
   * request. Pages already sent are ignored; the rest wait in the queue for nextRequested().
   */
  request(req: PageRequest): void {
    this.stats.requests++;
    let b: BlockState | undefined;
    if (req.block === undefined) {
      b = this.lastRequestBlock;
      if (!b) throw new PageRequestError('no-previous-block', req, `the destination sent REQ_PAGES (start 0x${req.start.toString(16)}, ${req.length} bytes) before naming a block with REQ_PAGES_ID`);
    } else {
      b = this.blocks.get(req.block);
      if (!b) throw new PageRequestError('unknown-block', req, `the destination asked for pages of RAM block "${req.block}", which the snapshot does not have (it has ${this.order.map((x) => `"${x.name}"`).join(', ')})`);
      this.lastRequestBlock = b;
    }
    const used = b.pages * TARGET_PAGE_SIZE;
    if (req.length === 0) throw new PageRequestError('empty', req, `the destination asked for 0 bytes of "${b.name}" at 0x${req.start.toString(16)}`);
    const hostPage = b.unit * TARGET_PAGE_SIZE;
    if (req.start % hostPage !== 0) throw new PageRequestError('unaligned', req, `the destination asked for "${b.name}" at 0x${req.start.toString(16)}, which is not a boundary of its ${hostPage}-byte pages`);
    if (req.start + req.length > used) {
      throw new PageRequestError('out-of-range', req, `the destination asked for [0x${req.start.toString(16)}, +0x${req.length.toString(16)}) of "${b.name}", beyond its used_length 0x${used.toString(16)}`);
    }
    const first = req.start / TARGET_PAGE_SIZE;
    // Whole host pages (used_length is a whole number of them).
    const count = Math.ceil(req.length / hostPage) * b.unit;
    let fresh = 0;
    for (let p = first; p < first + count; p++) if (!b.sent.test(p)) fresh++;
    this.stats.alreadySent += count - fresh;
    if (fresh === 0) return;
    if (this.queue.length - this.queueHead >= this.maxQueued) {
      this.stats.dropped++;
      return;
    }
    this.queue.push({ block: b, first, count });
    const a = this.arrival;
    this.arrival = undefined;
    a?.resolve();
  }

  /** The next requested pages not sent yet (one contiguous span, at most maxPages), marked sent. */
  nextRequested(maxPages: number): PageBatchPlan | undefined {
    this.skipServedRequests();
    if (this.queueHead >= this.queue.length) return undefined;
    const q = this.queue[this.queueHead]!;
    const b = q.block;
    const max = hostPagesOf(b, maxPages);
    let p = q.first;
    while (b.sent.test(p)) p++;
    const end = q.first + q.count;
    const start = p;
    // After the switch host pages are handed out whole, so a run of unsent pages ends on a host page boundary.
    while (p < end && p - start < max && !b.sent.test(p)) p++;
    // The rest of the range stays queued.
    q.count = end - p;
    q.first = p;
    const plan = this.plan(b, start, p - start, true);
    this.stats.requestedPages += plan.pages;
    return plan;
  }

  /**
   * The next pages in file order (blocks in list order, ascending pages) not sent yet: up to
   * maxPages of one block, as spans of present and absent pages, marked sent. Undefined when
   * every page has been handed out.
   */
  nextBackground(maxPages: number): PageBatchPlan | undefined {
    while (this.cursorBlock < this.order.length) {
      const b = this.order[this.cursorBlock]!;
      const p = this.nextUnsent(b, this.cursorPage);
      if (p >= b.pages) {
        this.cursorBlock++;
        this.cursorPage = 0;
        continue;
      }
      let end = p;
      const max = hostPagesOf(b, maxPages);
      while (end < b.pages && end - p < max && !b.sent.test(end)) end++;
      this.cursorPage = end;
      const plan = this.plan(b, p, end - p, false);
      this.stats.backgroundPages += plan.pages;
      return plan;
    }
    return undefined;
  }

  /** Splits [first, first+count) into present and absent spans and marks the pages sent. */
  private plan(b: BlockState, first: number, count: number, requested: boolean): PageBatchPlan {
    const spans: PageSpan[] = [];
    const end = first + count;
    let p = first;
    while (p < end) {
      const r = this.presentRunAt(b, p);
      const present = r.first <= p;
      const n = Math.min(end, present ? r.end : r.first) - p;
      spans.push({ first: p, count: n, present });
      p += n;
    }
    for (let q = first; q < end; q++) this.take(b, q);
    return { block: b.name, spans, pages: count, requested };
  }

  /**
   * The present run containing `page`, or else the next one after it ({first: end: b.pages} when
   * none is left in the block). The last answer is cached as "from `from` on, the first present
   * run is [first, end)": the pages between are absent, so later questions inside it cost nothing.
   */
  private presentRunAt(b: BlockState, page: number): { first: number; end: number } {
    const c = this.run;
    if (c && c.block === b && c.from <= page && page < c.end) return c;
    let first = b.pages;
    let end = b.pages;
    this.src.forEachRun(b.name, (f, n) => {
      first = f;
      end = f + n;
      return false;
    }, page, RUN_PIECE_PAGES);
    if (first >= b.pages) {
      first = b.pages;
      end = b.pages;
    }
    this.run = { block: b, from: page, first, end: Math.min(end, b.pages) };
    // "none left" is cached too: the whole rest of the block is absent.
    if (first === b.pages) this.run.end = b.pages + 1;
    return this.run;
  }

  private take(b: BlockState, p: number): void {
    if (b.sent.test(p)) throw new Error(`internal: page ${p} of "${b.name}" handed out twice`);
    b.sent.set(p);
    b.unsent--;
    this.unsentTotal--;
    if (this.unsentTotal === 0) this.finished?.resolve();
  }

  /** First page ≥ p whose sent bit is clear (b.pages if none). */
  private nextUnsent(b: BlockState, p: number): number {
    const bytes = b.sent.bytes;
    while (p < b.pages) {
      if ((p & 7) === 0 && bytes[p >>> 3] === 0xff) {
        p += 8;
        continue;
      }
      if (!b.sent.test(p)) return p;
      p++;
    }
    return b.pages;
  }

  private skipServedRequests(): void {
    while (this.queueHead < this.queue.length) {
      const q = this.queue[this.queueHead]!;
      while (q.count > 0 && q.block.sent.test(q.first)) {
        q.first++;
        q.count--;
      }
      if (q.count > 0) return;
      this.queueHead++;
    }
    if (this.queueHead > 1024 && this.queueHead * 2 > this.queue.length) {
      this.queue.splice(0, this.queueHead);
      this.queueHead = 0;
    }
  }
}

/** maxPages rounded down to whole host pages of `b`, at least one. */
function hostPagesOf(b: BlockState, maxPages: number): number {
  return Math.max(b.unit, maxPages - (maxPages % b.unit));
}

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => { resolve = r; });
  return { promise, resolve };
}
