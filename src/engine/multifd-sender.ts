// The sending half of multifd (docs/protocol.md §3, §3.7): N channels, each writing its init message,
// data packets and SYNC packets. A batch of pages (one block, ≤ 128 pages) goes to the next
// channel with a free slot, searching round-robin from the last one used, as QEMU's
// multifd_send_pages does. Each slot owns a scratch buffer: the page loader fills it with
// positioned reads, the method's prepare turns it into I/O vectors, and the channel writes header
// and payload with one gather write; the slot is reused once the write completed. Reads of
// several slots run in parallel; prepare and write run in assignment order per channel, which
// compression methods need (their stream state carries from one packet to the next).
//
// flush (push out a partial batch) is the caller's business: it decides when a batch is handed
// over. sync() is the barrier: everything assigned so far is written, then one SYNC per channel.

import { isZeroPage } from './zero-page.js';
import { EventEmitter } from 'node:events';
import { InvalidOptionError } from '../codec/errors.js';
import { MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeMultifdInit } from '../codec/multifd-init.js';
import { encodeMultifdPacketHeader, encodeSyncPacket } from '../codec/multifd-packet.js';
import type { MultifdMethod, SendMethodChannel } from './methods/method.js';

/**
 * Batches in flight over all channels when they are loaded (a snapshot read with O_DIRECT waits
 * for the device): with two per channel, one channel's reads and writes took turns. 1 GiB send
 * from a snapshot, ours only, A/B/A/B/A/B of 3 reps: 1 ch 697–1046 ms at depth 2 against 487–789
 * at 6; 2 ch 589–849 against 535–892 at 4 (medians 743 and 669). 4 GiB 1 ch, 2 × 2 reps at depth
 * 2 and 8 (what 1 ch gets now): 2547–3833 against 2446–3132 ms.
 */
const LOADER_BATCHES = 8;

/** Where a channel's bytes go (a socket, a pipe, a test sink). */
export interface SendChannel {
  /** Writes the buffers in order as one gather write; resolves once the buffers may be reused. */
  write(bufs: readonly Buffer[]): Promise<void>;
}

/** Fills `scratch` with the pages of `runs` (flat firstPage,count pairs) and returns views of them in order. */
export interface PageLoader {
  scratchBytes(pages: number): number;
  /**
   * Optional: memory for one slot's scratch. A loader that reads with O_DIRECT hands out
   * page-aligned memory that it can read pages into directly, without a staging copy.
   */
  allocScratch?(bytes: number): Buffer;
  loadRuns(block: string, runs: ArrayLike<number>, runCount: number, scratch: Buffer): Promise<Buffer[]>;
}

export interface PageBatch {
  block: string;
  /** Flat (firstPage, count) pairs, ascending or not; pages of one block. */
  runs: number[];
  pages: number;
}

export interface MultifdSenderOptions {
  channels: readonly SendChannel[];
  method: MultifdMethod;
  /** Where send() batches get their bytes; not needed by callers that only use sendPacket(). */
  loader?: PageLoader;
  /** The destination's -uuid (16 bytes), zeros when unset. */
  uuid?: Buffer;
  /**
   * Batches in flight per channel: one being written while the next is read. Default 2, and
   * with a loader enough for about LOADER_BATCHES in flight over all channels.
   */
  depth?: number;
  /** 'multifd' lists all-zero pages in the packet's zero list instead of sending them (QEMU's default). */
  zeroPageDetection?: 'multifd' | 'none';
  /** Compression level for the method (QEMU's multifd-zlib-level / multifd-zstd-level). */
  level?: number;
  pageSize?: number;
}

export interface SendChannelStats {
  id: number;
  packets: number;
  syncs: number;
  normalPages: number;
  zeroPages: number;
  bytes: number;
}

interface Slot {
  scratch: Buffer;
  header: Buffer;
  normal: Float64Array;
  zero: Float64Array;
}

interface Prepared {
  payload: Buffer[];
  size: number;
  normal: number;
  zero: number;
  /** The payload came from this channel's method (so goes back to it once written). */
  fromMethod: boolean;
}

interface Channel {
  id: number;
  sink: SendChannel;
  method: SendMethodChannel;
  free: Slot[];
  /** Callers of sendEncodedPacket waiting for a slot of this channel, in call order. */
  slotWaiters: ((slot: Slot) => void)[];
  /** Writes (and syncs) in assignment order. */
  tail: Promise<void>;
  /** Prepares in assignment order, one at a time. */
  prepareTail: Promise<void>;
  stats: SendChannelStats;
}

export class MultifdSender extends EventEmitter {
  private readonly channels: Channel[];
  private readonly pageSize: number;
  private readonly zeroDetect: boolean;
  private nextChannel = 0;
  private packetNum = 0n;
  private failure: Error | undefined;
  private waiters: (() => void)[] = [];

  constructor(private readonly opts: MultifdSenderOptions) {
    super();
    this.pageSize = opts.pageSize ?? TARGET_PAGE_SIZE;
    this.zeroDetect = (opts.zeroPageDetection ?? 'multifd') === 'multifd';
    const depth = opts.depth ?? (opts.loader ? Math.max(2, Math.ceil(LOADER_BATCHES / opts.channels.length)) : 2);
    const scratchBytes = opts.loader ? opts.loader.scratchBytes(MULTIFD_PAGES_PER_PACKET) : 0;
    this.channels = opts.channels.map((sink, id) => ({
      id,
      sink,
      method: opts.method.sendSetup(id, this.pageSize, opts.level !== undefined ? { level: opts.level } : {}),
      free: Array.from({ length: depth }, () => ({
        scratch: opts.loader?.allocScratch?.(scratchBytes) ?? Buffer.allocUnsafe(scratchBytes),
        header: Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE),
        normal: new Float64Array(MULTIFD_PAGES_PER_PACKET),
        zero: new Float64Array(MULTIFD_PAGES_PER_PACKET),
      })),
      slotWaiters: [],
      tail: Promise.resolve(),
      prepareTail: Promise.resolve(),
      stats: { id, packets: 0, syncs: 0, normalPages: 0, zeroPages: 0, bytes: 0 },
    }));
  }

  get channelCount(): number {
    return this.channels.length;
  }

  /** The compression method's name (none, zlib, zstd). */
  get methodName(): string {
    return this.opts.method.name;
  }

  /** Init message and the setup SYNC on every channel (pairs with the setup FLUSH or EOS). */
  async setup(): Promise<void> {
    await Promise.all(this.channels.map((ch) => this.setupChannel(ch.id)));
  }

  /** Setup of one channel, for callers that write each channel's first bytes as soon as it connects. */
  async setupChannel(id: number): Promise<void> {
    await this.initChannel(id, true);
  }

  /**
   * The init message alone (with `withSync`, the setup SYNC too). A relay sends only the init and
   * leaves every SYNC, the setup one included, to its source's sync points.
   */
  async initChannel(id: number, withSync = false, uuid = this.opts.uuid): Promise<void> {
    const ch = this.channels[id]!;
    const bufs = [encodeMultifdInit(id, uuid)];
    if (withSync) bufs.push(encodeSyncPacket(this.packetNum++));
    ch.tail = ch.tail.then(async () => {
      this.check();
      await ch.sink.write(bufs);
      if (withSync) ch.stats.syncs++;
      ch.stats.bytes += bufs.reduce((n, b) => n + b.length, 0);
    });
    await ch.tail;
  }

  /**
   * One packet whose pages are already in memory (a relay's decoded packet): offsets[0 .. normal)
   * are the pages of `data`, offsets[normal .. normal+zero) zero pages. Goes to the next channel
   * with a free slot like send(); resolves once written, when `data` may be reused.
   */
  async sendPacket(block: string, offsets: ArrayLike<number>, normal: number, zero: number, data: readonly Buffer[]): Promise<void> {
    if (normal + zero === 0) return;
    checkPageCount(normal + zero, 'packet');
    const [ch, slot] = await this.acquire();
    for (let i = 0; i < normal + zero; i++) slot.normal[i] = offsets[i]!;
    const prepared = ch.prepareTail.then(async () => {
      this.check();
      const p = normal > 0 ? await ch.method.prepare(data, normal) : { payload: [], size: 0 };
      this.encodeHeader(slot, block, normal, zero, p.size);
      return { ...p, normal, zero, fromMethod: normal > 0 };
    });
    return this.enqueueWrite(ch, slot, prepared);
  }

  /**
   * One packet whose payload is already encoded with this sender's method (a relay passing A's
   * compressed packets on as they are), on channel `id` and no other: a compressed stream
   * continues only on its own channel, in order. Calls for one channel are written in call order.
   * Resolves once written, when `payload` may be reused.
   */
  async sendEncodedPacket(id: number, block: string, offsets: ArrayLike<number>, normal: number, zero: number, payload: readonly Buffer[]): Promise<void> {
    if (normal + zero === 0) return;
    checkPageCount(normal + zero, 'packet');
    const ch = this.channels[id];
    if (!ch) throw new RangeError(`no channel ${id} (the sender has ${this.channels.length})`);
    this.check();
    // FIFO per channel: a free slot only if nobody is queued before this call.
    const free = ch.slotWaiters.length === 0 ? ch.free.pop() : undefined;
    const slot = free ?? (await new Promise<Slot>((resolve) => ch.slotWaiters.push(resolve)));
    for (let i = 0; i < normal + zero; i++) slot.normal[i] = offsets[i]!;
    const size = payload.reduce((n, b) => n + b.length, 0);
    const prepared = ch.prepareTail.then(() => {
      this.check();
      this.encodeHeader(slot, block, normal, zero, size);
      return { payload: [...payload], size, normal, zero, fromMethod: false };
    });
    return this.enqueueWrite(ch, slot, prepared);
  }

  /** Hands a batch to the next channel with a free slot; resolves when assigned (not yet written). */
  async send(batch: PageBatch): Promise<void> {
    if (batch.pages === 0) return;
    checkPageCount(batch.pages, 'batch');
    if (!this.opts.loader) throw new InvalidOptionError('send() needs a page loader');
    const [ch, slot] = await this.acquire();
    const load = this.opts.loader.loadRuns(batch.block, batch.runs, batch.runs.length / 2, slot.scratch);
    // The rejection is seen by the chain below; this only keeps Node from calling it unhandled
    // while earlier packets of the channel are still being written.
    load.catch(() => {});
    // Two ordered stages per channel: prepare (compression) of this packet may run while the
    // previous one is still being written. prepare calls never overlap on a channel, since a
    // method's stream state runs from packet to packet.
    const prepared = ch.prepareTail.then(async () => {
      this.check();
      return this.preparePacket(ch, slot, batch, await load);
    });
    void this.enqueueWrite(ch, slot, prepared);
  }

  /**
   * Chains a prepared packet onto its channel: prepares run one at a time per channel, and the
   * write follows the previous one. Resolves once written; a failure fails the sender and rejects.
   */
  private enqueueWrite(ch: Channel, slot: Slot, prepared: Promise<Prepared>): Promise<void> {
    prepared.catch(() => {});
    ch.prepareTail = prepared.then(
      () => {},
      () => {},
    );
    const written = ch.tail.then(async () => {
      this.check();
      const p = await prepared;
      try {
        await ch.sink.write([slot.header, ...p.payload]);
      } finally {
        if (p.fromMethod) ch.method.release?.(p);
      }
      ch.stats.packets++;
      ch.stats.normalPages += p.normal;
      ch.stats.zeroPages += p.zero;
      ch.stats.bytes += MULTIFD_PACKET_HEADER_SIZE + p.size;
      this.emit('packet', ch.id, p.normal, p.zero);
    });
    ch.tail = written.then(
      () => this.release(ch, slot),
      (e: Error) => {
        this.release(ch, slot);
        this.fail(e);
      },
    );
    // The tail swallows the error (after failing the sender); a caller awaiting `written` sees it.
    written.catch(() => {});
    return written;
  }

  /** Barrier: every assigned packet written, then one SYNC on each channel, written. */
  async sync(): Promise<void> {
    await Promise.all(
      this.channels.map((ch) => {
        ch.tail = ch.tail.then(async () => {
          this.check();
          const sync = encodeSyncPacket(this.packetNum++);
          await ch.sink.write([sync]);
          ch.stats.syncs++;
          ch.stats.bytes += sync.length;
        });
        return ch.tail;
      }),
    );
    this.check();
  }

  /** Waits for everything assigned so far without adding a SYNC. */
  async drain(): Promise<void> {
    await Promise.all(this.channels.map((ch) => ch.tail));
    this.check();
  }

  stats(): SendChannelStats[] {
    return this.channels.map((c) => ({ ...c.stats }));
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    for (const w of this.waiters.splice(0)) w();
    // Their sendEncodedPacket calls go on to a write that fails at once (check()).
    for (const ch of this.channels) for (const w of ch.slotWaiters.splice(0)) w(ch.free.pop() ?? this.spareSlot());
    for (const ch of this.channels) ch.method.cleanup();
    this.emit('error', err);
  }

  close(): void {
    for (const ch of this.channels) ch.method.cleanup();
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  /**
   * The next channel with a free slot, and the slot: taken in the same synchronous step as the
   * search, since concurrent callers (a relay's source channels) resume between awaits.
   */
  private async acquire(): Promise<[Channel, Slot]> {
    for (;;) {
      this.check();
      const n = this.channels.length;
      for (let i = 0; i < n; i++) {
        const ch = this.channels[(this.nextChannel + i) % n]!;
        const slot = ch.free.pop();
        if (slot) {
          this.nextChannel = (ch.id + 1) % n;
          return [ch, slot];
        }
      }
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  private release(ch: Channel, slot: Slot): void {
    const next = ch.slotWaiters.shift();
    if (next) return next(slot);
    ch.free.push(slot);
    this.waiters.shift()?.();
  }

  /** A throwaway slot for a waiter released by fail(): its write never happens. */
  private spareSlot(): Slot {
    return { scratch: Buffer.alloc(0), header: Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE), normal: new Float64Array(MULTIFD_PAGES_PER_PACKET), zero: new Float64Array(MULTIFD_PAGES_PER_PACKET) };
  }

  private encodeHeader(slot: Slot, block: string, normal: number, zero: number, size: number): void {
    encodeMultifdPacketHeader(
      {
        flags: this.opts.method.flags,
        normalPages: normal,
        zeroPages: zero,
        nextPacketSize: size,
        packetNum: this.packetNum++,
        ramblock: block,
        offsets: slot.normal,
      },
      slot.header,
    );
  }

  /** Zero detection, the method's prepare and the header; the slot holds the result until written. */
  private async preparePacket(ch: Channel, slot: Slot, batch: PageBatch, views: Buffer[]): Promise<Prepared> {
    const ps = this.pageSize;
    let normal = 0;
    let zero = 0;
    const pagesData: Buffer[] = [];
    // Walk runs (guest pages) and views (their bytes) together; consecutive non-zero pages of one
    // view stay one view, so a contiguous run costs one iovec whatever its length.
    let v = 0;
    let vPos = 0;
    let spanStart = -1;
    const closeSpan = (end: number): void => {
      if (spanStart >= 0) {
        pagesData.push(spanStart === 0 && end === views[v]!.length ? views[v]! : views[v]!.subarray(spanStart, end));
        spanStart = -1;
      }
    };
    for (let r = 0; r < batch.runs.length; r += 2) {
      const first = batch.runs[r]!;
      const count = batch.runs[r + 1]!;
      for (let p = first; p < first + count; p++) {
        while (vPos >= views[v]!.length) {
          closeSpan(vPos);
          v++;
          vPos = 0;
        }
        const view = views[v]!;
        if (this.zeroDetect && isZeroPage(view, vPos, vPos + ps)) {
          closeSpan(vPos);
          slot.zero[zero++] = p * ps;
        } else {
          if (spanStart < 0) spanStart = vPos;
          slot.normal[normal++] = p * ps;
        }
        vPos += ps;
      }
    }
    if (v < views.length) closeSpan(vPos);
    slot.normal.set(slot.zero.subarray(0, zero), normal);
    const prepared = normal > 0 ? await ch.method.prepare(pagesData, normal) : { payload: [], size: 0 };
    this.encodeHeader(slot, batch.block, normal, zero, prepared.size);
    return { payload: prepared.payload, size: prepared.size, normal, zero, fromMethod: normal > 0 };
  }
}

/** A packet (or the batch for one) holds at most MULTIFD_PAGES_PER_PACKET pages. */
function checkPageCount(pages: number, what: 'packet' | 'batch'): void {
  if (pages > MULTIFD_PAGES_PER_PACKET) throw new RangeError(`a ${what} holds at most ${MULTIFD_PAGES_PER_PACKET} pages (got ${pages})`);
}
