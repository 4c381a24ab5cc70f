// send's pages and device state. Pages: every present page once, in batches of ≤ 128 pages of one block in block
// order — as multifd packets when there are channels, else as PAGE records in RAM PART sections
// of the main channel. With a budget (postcopy's pages before the switch) it stops at the first
// batch boundary past it.

import { MULTIFD_PAGES_PER_PACKET, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodePageRecords, type PageRecordState } from '../codec/postcopy.js';
import { encodeEos, encodeFooter, encodeSectionShort } from '../codec/stream-encode.js';
import { BatchPlanner } from '../engine/batch-planner.js';
import { MultifdSender, type MultifdSenderOptions, type PageBatch } from '../engine/multifd-sender.js';
import type { PostcopyPages } from '../engine/postcopy-pages.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import { isZeroPage } from '../engine/zero-page.js';
import type { OutboundSide } from './outbound-side.js';

const DEVICE_CHUNK = 1024 * 1024;

export interface PageSenderOptions {
  source: SnapshotSource;
  /** Absent: the pages go over main. */
  multifd: MultifdSender | undefined;
  writeMain(bufs: Buffer[]): Promise<void>;
  /** The main channel's CONTINUE state (carried on by the postcopy phase). */
  mainRecords: PageRecordState;
  /** Pages found all-zero are left out (main) or listed (multifd); 'none' sends them as data. */
  zeroPageDetection: 'multifd' | 'none';
  /** Throws the conversation's failure, if any. */
  check(): void;
}

export class PageSender {
  /** Pages that went as data, and all-zero pages left out, over main. */
  mainPages = 0;
  mainZero = 0;
  /** Set at a postcopy switch: every page handed out is marked sent there. */
  pages: PostcopyPages | undefined;
  private scratch: Buffer | undefined;

  constructor(private readonly o: PageSenderOptions) {}

  /** Every present page (or as many as the budget allows); pages sent per block. */
  async sendAll(budget?: { bytes: number; deadline?: number }): Promise<Map<string, number>> {
    const src = this.o.source;
    const perBlock = new Map<string, number>(src.blockList.map((b) => [b.name, 0]));
    const planner = new BatchPlanner(src, src.blockList.map((b) => b.name), MULTIFD_PAGES_PER_PACKET);
    let spent = 0;
    const exhausted = (): boolean => budget !== undefined && (spent >= budget.bytes || (budget.deadline !== undefined && Date.now() >= budget.deadline));
    for (let batch = exhausted() ? undefined : planner.next(); batch; batch = exhausted() ? undefined : planner.next()) {
      if (this.o.multifd) {
        // QEMU ≥ 11.1 with postcopy-ram writes multifd zero pages too, so all of them count as placed.
        if (this.pages) for (let i = 0; i < batch.runs.length; i += 2) this.pages.markSent(batch.block, batch.runs[i]!, batch.runs[i + 1]!);
        await this.o.multifd.send(batch);
      } else {
        await this.sendOnMain(batch);
      }
      perBlock.set(batch.block, perBlock.get(batch.block)! + batch.pages);
      spent += batch.pages * TARGET_PAGE_SIZE;
      this.o.check();
    }
    return perBlock;
  }

  /** Copies [position, position + length) of the file to main (the device state, byte for byte). */
  async forward(position: number, length: number): Promise<void> {
    const buf = Buffer.allocUnsafe(Math.min(DEVICE_CHUNK, Math.max(1, length)));
    for (let done = 0; done < length; ) {
      const n = Math.min(buf.length, length - done);
      await this.o.writeMain([await this.o.source.readAt(position + done, n, buf)]);
      done += n;
    }
  }

  /**
   * Without multifd, pages travel as PAGE records in a PART section of the main channel. All-zero
   * pages stay at home: a fresh destination's RAM is zero (with postcopy they are left to the
   * postcopy phase, which must place every page the destination has not received).
   */
  private async sendOnMain(batch: PageBatch): Promise<void> {
    const src = this.o.source;
    this.scratch ??= Buffer.allocUnsafe(src.scratchBytes(MULTIFD_PAGES_PER_PACKET));
    const views = await src.loadRuns(batch.block, batch.runs, batch.runs.length / 2, this.scratch);
    const offsets: number[] = [];
    const data: Buffer[] = [];
    let v = 0;
    let vPos = 0;
    const zeroDetect = this.o.zeroPageDetection === 'multifd';
    for (let r = 0; r < batch.runs.length; r += 2) {
      for (let p = batch.runs[r]!; p < batch.runs[r]! + batch.runs[r + 1]!; p++) {
        while (vPos >= views[v]!.length) { v++; vPos = 0; }
        const view = views[v]!;
        const at = vPos;
        vPos += TARGET_PAGE_SIZE;
        if (zeroDetect && isZeroPage(view, at, at + TARGET_PAGE_SIZE)) {
          if (!this.pages) this.mainZero++;
          continue;
        }
        offsets.push(p * TARGET_PAGE_SIZE);
        data.push(view.subarray(at, at + TARGET_PAGE_SIZE));
        this.pages?.markSent(batch.block, p, 1);
        this.mainPages++;
      }
    }
    if (data.length === 0) return;
    // CONTINUE refers to the block of the previous record on the channel, across sections.
    await this.o.writeMain([
      encodeSectionShort(SectionType.PART, src.ramSection.sectionId),
      ...encodePageRecords(this.o.mainRecords, batch.block, offsets, data),
      encodeEos(),
      encodeFooter(src.ramSection.sectionId),
    ]);
  }
}

/**
 * send's multifd channels, connected all at once after main (whose prologue went out already):
 * each writes its init and setup SYNC as soon as it is connected; `ready` once all did.
 */
export function openMultifd(out: OutboundSide, count: number, opts: Omit<MultifdSenderOptions, 'channels'>, fail: (e: Error) => void): { sender: MultifdSender; ready: Promise<void> } {
  const sender = new MultifdSender({ ...opts, channels: Array.from({ length: count }, (_, i) => ({ write: (bufs: readonly Buffer[]) => out.writeChannel(i, bufs) })) });
  sender.on('error', fail);
  out.openChannels(count, Promise.resolve());
  const ready = Promise.all(Array.from({ length: count }, async (_, i) => {
    await out.channel(i);
    await sender.setupChannel(i);
  })).then(() => {});
  return { sender, ready };
}
