// The postcopy phase of a restore (docs/protocol.md §6.2–§6.3): once the destination has LISTEN and RUN,
// every page not sent before the switch goes out exactly once. Requested pages first: on the
// preempt channel when there is one (bare page records, own CONTINUE state), otherwise ahead of
// the next background batch on the main channel. The background scan sends the rest in file
// order in RAM PART sections (PAGE / ZERO records, EOS, footer; never MULTIFD_FLUSH, which QEMU's
// postcopy loader refuses), pages the snapshot lacks as ZERO records: a page the destination
// never receives would stay missing in its guest.
//
// Memory is bounded: a sent bitmap (PostcopyPages), a few read buffers of one batch for the main
// channel and one for the preempt channel, whatever the guest size. A batch is whole host pages of
// the destination (2 MiB for a hugetlbfs block): each host page's records go on one channel, in
// order, with nothing in between, as QEMU's destination needs to place it.

import { encodePageRecords, type PageRecordState } from '../codec/postcopy.js';
import { SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeEos, encodeFooter, encodeSectionShort } from '../codec/stream-encode.js';
import type { PageBatchPlan, PostcopyPages } from '../engine/postcopy-pages.js';
import type { SnapshotSource } from '../engine/snapshot.js';

export interface PostcopyPhaseOptions {
  source: SnapshotSource;
  pages: PostcopyPages;
  /** Writes to the main channel (gather write; resolves once the buffers may be reused). */
  writeMain(bufs: Buffer[]): Promise<void>;
  /** Writes to the preempt channel; requested pages go there when given. */
  writePreempt?: (bufs: Buffer[]) => Promise<void>;
  /** The main channel's CONTINUE state (it carries on from the precopy phase's page records). */
  mainRecords: PageRecordState;
  /** Bytes/s for background pages; requested pages are never held back. Default: unlimited. */
  bandwidth?: number;
  /** Pages per background batch (one positioned read per run of present pages). Default 128. */
  batchPages?: number;
  /** Pages per answer to a request. Default 64. */
  requestPages?: number;
  /** Background batches read ahead of the one being written (unthrottled). Default 3. */
  readAhead?: number;
  /** Rejects once the conversation failed (stops the loops). */
  failed: Promise<never>;
  /**
   * The background scan starts once this settles (at most BACKGROUND_GATE_MS later); requests are
   * served meanwhile. Send passes PONG(3), the destination's "devices loaded": pages QEMU touches
   * while it loads the devices (before the guest can run) then do not queue behind the scan's
   * first large reads.
   */
  backgroundAfter?: Promise<unknown>;
}

export interface PostcopyPhaseStats {
  /** Pages sent as data (PAGE records) after the switch, on main and preempt. */
  normal: number;
  /** Pages sent as ZERO records after the switch. */
  zero: number;
  mainBytes: number;
  preemptBytes: number;
  preemptPages: number;
  /** When the last page was handed to the kernel (ms since the epoch). */
  completedAt: number;
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
/** The longest the background scan runs without letting I/O callbacks in. */
const YIELD_MS = 2;
/** The longest the background scan waits for backgroundAfter. */
const BACKGROUND_GATE_MS = 2000;

interface Loaded {
  plan: PageBatchPlan;
  offsets: Float64Array;
  data: (Buffer | undefined)[];
}

export class PostcopyPhase {
  readonly stats: PostcopyPhaseStats = { normal: 0, zero: 0, mainBytes: 0, preemptBytes: 0, preemptPages: 0, completedAt: 0 };
  private readonly batchPages: number;
  private readonly requestPages: number;
  /** Read buffers for background batches: one being written plus the ones read ahead. */
  private readonly freeScratch: Buffer[];
  private readonly requestScratch: Buffer;
  private readonly readAhead: number;
  private preemptScratch: Buffer | undefined;
  private readonly preemptRecords: PageRecordState = {};
  private backgroundBytes = 0;
  private startedAt = 0;
  private lastYield = performance.now();
  private readonly sid: number;

  constructor(private readonly o: PostcopyPhaseOptions) {
    // Whole host pages per batch: a hugepage block's pages go 512 at a time (PostcopyPages rounds).
    const hostPage = o.pages.maxHostPagePages;
    this.batchPages = Math.max(o.batchPages ?? 128, hostPage);
    this.requestPages = Math.max(o.requestPages ?? 64, hostPage);
    const bytes = o.source.scratchBytes(Math.max(this.batchPages, this.requestPages));
    // Main: one batch being written while the next ones are read (file reads, O_DIRECT where
    // possible, take longer than a socket write), plus one for a request answered in between.
    this.readAhead = Math.max(1, o.readAhead ?? 3);
    this.freeScratch = Array.from({ length: this.readAhead + 1 }, () => Buffer.allocUnsafe(bytes));
    this.requestScratch = Buffer.allocUnsafe(bytes);
    this.sid = o.source.ramSection.sectionId;
  }

  /** Sends every page not sent yet; resolves once all of them are written. */
  async run(): Promise<void> {
    this.startedAt = Date.now();
    const loops = [this.mainLoop()];
    if (this.o.writePreempt) loops.push(this.preemptLoop());
    await Promise.all(loops);
    this.stats.completedAt = Date.now();
  }

  private async mainLoop(): Promise<void> {
    const pages = this.o.pages;
    const serveRequests = !this.o.writePreempt;
    const ahead: { loaded: Promise<Loaded>; scratch: Buffer }[] = [];
    let gateOpen = this.o.backgroundAfter === undefined;
    let timer: NodeJS.Timeout | undefined;
    const gate = gateOpen ? undefined : Promise.race([
      this.o.backgroundAfter!.then(() => {}, () => {}),
      new Promise<void>((r) => { timer = setTimeout(r, BACKGROUND_GATE_MS); }),
    ]).then(() => { gateOpen = true; clearTimeout(timer); });
    try {
      for (;;) {
        if (serveRequests) {
          // Requests jump ahead of the background batches already read.
          const req = pages.nextRequested(this.requestPages);
          if (req) {
            await this.writeSection(await this.load(req, this.requestScratch), 'main');
            continue;
          }
        }
        if (!gateOpen) {
          await Promise.race([gate, ...(serveRequests ? [pages.requestArrived()] : []), this.o.failed]);
          continue;
        }
        // Under a bandwidth limit the wait comes before the next batch is planned, so that pages
        // the guest asks for meanwhile are not stuck in a batch waiting for its turn.
        if (ahead.length === 0) {
          await this.throttle();
          // The wait ends early for a request: serve it first.
          if (serveRequests && pages.pendingRequests) continue;
          const next = this.loadNextBackground();
          if (!next) break;
          ahead.push(next);
        }
        const current = ahead.shift()!;
        // Unthrottled, the next batches are read while this one is written.
        if (!this.o.bandwidth) {
          while (ahead.length < this.readAhead) {
            const next = this.loadNextBackground();
            if (!next) break;
            ahead.push(next);
          }
        }
        const batch = await current.loaded;
        await this.writeSection(batch, 'main');
        this.freeScratch.push(current.scratch);
        this.backgroundBytes += batch.plan.pages * TARGET_PAGE_SIZE;
        await this.yieldSometimes();
      }
    } finally {
      clearTimeout(timer);
      // A failure leaves reads in flight; their rejections are the failure already reported.
      for (const a of ahead) a.loaded.catch(() => {});
    }
  }

  /**
   * Lets I/O callbacks run every few ms. Socket writes that fit the kernel's buffer complete in
   * the same tick, and absent pages need no read, so without this the background scan runs on
   * microtasks alone and starves the return path (PONGs, page requests) and QMP: measured 130–380 ms
   * of event-loop stall right after RUN, during which the guest's first page requests waited.
   */
  private async yieldSometimes(): Promise<void> {
    const now = performance.now();
    if (now - this.lastYield < YIELD_MS) return;
    await new Promise<void>((r) => setImmediate(r));
    this.lastYield = performance.now();
  }

  private loadNextBackground(): { loaded: Promise<Loaded>; scratch: Buffer } | undefined {
    const scratch = this.freeScratch.pop();
    if (!scratch) throw new Error('internal: no free read buffer');
    const plan = this.o.pages.nextBackground(this.batchPages);
    if (!plan) {
      this.freeScratch.push(scratch);
      return undefined;
    }
    const loaded = this.load(plan, scratch);
    loaded.catch(() => {});
    return { loaded, scratch };
  }

  /** Answers requests on the preempt channel until every page has been handed out. */
  private async preemptLoop(): Promise<void> {
    const pages = this.o.pages;
    this.preemptScratch ??= Buffer.allocUnsafe(this.o.source.scratchBytes(this.requestPages));
    for (;;) {
      const req = pages.nextRequested(this.requestPages);
      if (req) {
        const loaded = await this.load(req, this.preemptScratch);
        const bufs = encodePageRecords(this.preemptRecords, loaded.plan.block, loaded.offsets, loaded.data);
        this.count(loaded);
        const n = bufs.reduce((s, b) => s + b.length, 0);
        await this.o.writePreempt!(bufs);
        this.stats.preemptBytes += n;
        this.stats.preemptPages += loaded.plan.pages;
        continue;
      }
      if (pages.done) return;
      // A request, or the main loop finishing the last pages, whichever comes first.
      await Promise.race([pages.requestArrived(), pages.allHandedOut(), this.o.failed]);
    }
  }

  private async load(plan: PageBatchPlan, scratch: Buffer): Promise<Loaded> {
    const runs: number[] = [];
    for (const s of plan.spans) if (s.present) runs.push(s.first, s.count);
    const views = runs.length > 0 ? await this.o.source.loadRuns(plan.block, runs, runs.length / 2, scratch, { urgent: plan.requested }) : [];
    const offsets = new Float64Array(plan.pages);
    const data: (Buffer | undefined)[] = new Array(plan.pages);
    let k = 0;
    let v = 0;
    let vPos = 0;
    for (const s of plan.spans) {
      for (let p = s.first; p < s.first + s.count; p++, k++) {
        offsets[k] = p * TARGET_PAGE_SIZE;
        if (!s.present) {
          data[k] = undefined;
          continue;
        }
        while (vPos >= views[v]!.length) { v++; vPos = 0; }
        const page = views[v]!.subarray(vPos, vPos + TARGET_PAGE_SIZE);
        vPos += TARGET_PAGE_SIZE;
        data[k] = page.equals(ZERO_PAGE) ? undefined : page;
      }
    }
    return { plan, offsets, data };
  }

  private count(l: Loaded): void {
    for (const d of l.data) {
      if (d) this.stats.normal++;
      else this.stats.zero++;
    }
  }

  /** One RAM PART section on the main channel: the records, EOS, footer. */
  private async writeSection(l: Loaded, _where: 'main'): Promise<void> {
    const bufs = [
      encodeSectionShort(SectionType.PART, this.sid),
      ...encodePageRecords(this.o.mainRecords, l.plan.block, l.offsets, l.data),
      encodeEos(),
      encodeFooter(this.sid),
    ];
    this.count(l);
    const n = bufs.reduce((s, b) => s + b.length, 0);
    await this.o.writeMain(bufs);
    this.stats.mainBytes += n;
  }

  /** Holds background batches to the bandwidth limit; a request (main channel only) ends the wait. */
  private async throttle(): Promise<void> {
    const bw = this.o.bandwidth;
    if (!bw || bw <= 0) return;
    const due = this.startedAt + (this.backgroundBytes / bw) * 1000;
    const wait = due - Date.now();
    if (wait <= 0) return;
    let timer: NodeJS.Timeout | undefined;
    const sleep = new Promise<void>((r) => { timer = setTimeout(r, wait); });
    const woken = this.o.writePreempt ? [] : [this.o.pages.requestArrived()];
    try {
      await Promise.race([sleep, ...woken, this.o.failed]);
    } finally {
      clearTimeout(timer);
    }
  }
}
