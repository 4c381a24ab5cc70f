// A source's main-channel page records (PAGE, ZERO, XBZRLE) turned into multifd packets for a
// destination that has multifd on (relay 0 → N). Three things a multifd destination relies on that
// a main-channel stream does not give:
//
// - Order. Pages of one round may land in any order across channels; a page sent twice must not
//   have its newer copy overtaken by its older one. QEMU orders rounds with syncs (docs/protocol.md
//   §2.6, §3.7), but a main-channel stream has no round markers. So one bit per guest page says
//   "sent since the last sync"; a page seen again while its bit is set needs a sync first
//   (needsSync), which the caller performs with sync() and a MULTIFD_FLUSH (or EOS) on B's main.
// - Packets. Pages are gathered per block into packets of up to MULTIFD_PAGES_PER_PACKET pages.
// - XBZRLE. A delta applies onto the page last sent (docs/protocol.md §2.8). A relay with a tee
//   reads that page back from its snapshot (the caller decodes, then calls page()); without one,
//   this keeps a copy. QEMU's source inserts pages into its xbzrle cache only once its first full
//   pass is over (ram.c: xbzrle_started), so every page a delta can name was sent at least twice,
//   or first sent after that pass (pages a free-page hint let the first pass skip): copies are
//   kept from a page's second sending on, and of every page once some page was sent twice (the
//   first pass is then over). No fixed size is exact: QEMU's cache is direct-mapped by ram_addr
//   (which the stream does not carry), sized by the source's xbzrle-cache-size, and keeps
//   entries younger than two dirty syncs (page_cache.c), so it can hold a page sent long ago that
//   an LRU of its size dropped (seen with QEMU 10: a 64 MiB copy for a 64 MiB source cache,
//   128 MiB guest that re-sent ~100 MiB in round 2). So the copies live in memory up to
//   `cacheBytes`, the most recently sent kept (LRU), and the page sent longest ago goes to a
//   `spill` file (page-spill.ts, at most guest-RAM sized) instead of being dropped: every page
//   kept can be read back. Memory stays the first place: a copy there costs one memcpy, one in the
//   file a pwrite when it leaves memory and a pread per delta (about twice the CPU of this
//   conversion when every copy goes through the file; page-spill.ts). Without a spill, a delta for
//   a dropped page fails with a clear error instead of being applied onto the wrong bytes.

import { MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { applyXbzrle } from '../codec/xbzrle.js';
import type { PageSpill } from './page-spill.js';

/** What this needs of a MultifdSender. */
export interface PacketSink {
  sendPacket(block: string, offsets: ArrayLike<number>, normal: number, zero: number, data: readonly Buffer[]): Promise<void>;
  sync(): Promise<void>;
}

export interface MainPagesOptions {
  sink: PacketSink;
  /** used_length of a RAM block (the block list's); undefined for a block the stream never listed. */
  blockLength(name: string): number | undefined;
  /** Bytes of memory for page copies kept for XBZRLE deltas (more go to `spill`); 0 = none (the caller decodes them). Default DEFAULT_XBZRLE_COPY_BYTES. */
  cacheBytes?: number;
  /** Where copies go when memory is full (see the head of this file); none: they are dropped. */
  spill?: PageSpill;
  /** Packets written at once before page() waits for the oldest (default 8). */
  inFlight?: number;
}

/** Above QEMU's default xbzrle-cache-size (64 MiB): a direct-mapped cache keeps pages an LRU of its size drops (see above). */
export const DEFAULT_XBZRLE_COPY_BYTES = 256 * 1024 * 1024;
/** Copies are allocated in slabs of this many pages as they are needed (nothing for a stream without repeats). */
const SLAB_PAGES = 256;
const PAGE = TARGET_PAGE_SIZE;

interface BlockState {
  pages: number;
  /** Sent since the last sync. */
  sent: Uint8Array;
  /** Sent at all (copies start with the second sending). */
  seen: Uint8Array;
  /** A copy is kept (in memory or in the spill). */
  kept: Uint8Array;
  /** Where its pages start in the spill file (and in the copies' keys). */
  base: number;
}

export class MainPagesToMultifd {
  /** Syncs performed (each is one SYNC on every channel). */
  syncs = 0;
  packets = 0;
  xbzrlePages = 0;
  /** Copies dropped or spilled to make room (LRU). */
  evictions = 0;
  /** Deltas whose page was read back from the spill. */
  spillReads = 0;
  private readonly blocks = new Map<string, BlockState>();
  private readonly cachePages: number;
  private readonly slabs: Buffer[] = [];
  private slotsUsed = 0;
  /** key (spill position: block base + offset) → slot, in order of last sending (oldest first). */
  private readonly lru = new Map<number, number>();
  private readonly inFlight: Promise<void>[] = [];
  private readonly maxInFlight: number;
  private nextBase = 0;
  /** Some page was sent twice: the source's first pass is over, every page sent from now on is kept. */
  private repeats = false;
  /** A page read back from the spill, for its delta. */
  private readonly scratch = Buffer.alloc(PAGE);
  // The packet being gathered: one block, normal pages first, zero pages kept apart.
  private block = '';
  private normal: number[] = [];
  private zero: number[] = [];
  private data: Buffer = Buffer.allocUnsafe(MULTIFD_PAGES_PER_PACKET * PAGE);

  constructor(private readonly o: MainPagesOptions) {
    this.cachePages = Math.floor((o.cacheBytes ?? DEFAULT_XBZRLE_COPY_BYTES) / PAGE);
    this.maxInFlight = o.inFlight ?? 8;
  }

  /** Whether this page went out since the last sync: sync() first, or it could overtake itself. */
  needsSync(block: string, offset: number): boolean {
    const b = this.state(block, offset);
    const n = offset / PAGE;
    return (b.sent[n >>> 3]! & (1 << (n & 7))) !== 0;
  }

  /** A page's bytes (copied: `data` may be reused once this resolves). */
  async page(block: string, offset: number, data: readonly Buffer[]): Promise<void> {
    const b = this.mark(block, offset);
    const at = await this.slotInPacket(block);
    this.normal.push(offset);
    let p = at;
    for (const d of data) p += d.copy(this.data, p);
    if (p - at !== PAGE) throw new RangeError(`page of ${p - at} bytes at 0x${offset.toString(16)} (pages are ${PAGE})`);
    this.remember(b, offset, this.data.subarray(at, at + PAGE));
  }

  async zeroPage(block: string, offset: number): Promise<void> {
    const b = this.mark(block, offset);
    await this.slotInPacket(block, true);
    this.zero.push(offset);
    this.remember(b, offset, undefined);
  }

  /** An XBZRLE delta, applied onto the copy kept of the page (cacheBytes > 0). */
  async xbzrle(block: string, offset: number, delta: Buffer, at?: number): Promise<void> {
    const b = this.state(block, offset);
    const slot = this.lru.get(b.base + offset);
    const n = offset / PAGE;
    let copy: Buffer;
    if (slot !== undefined) {
      copy = this.slot(slot);
    } else if (this.o.spill && b.kept[n >>> 3]! & (1 << (n & 7))) {
      copy = this.o.spill.read(b.base + offset, this.scratch);
      this.spillReads++;
    } else {
      const history = b.seen[n >>> 3]! & (1 << (n & 7))
        ? (this.o.spill ? '; the page was sent once only, before the source\'s first pass was over (QEMU caches none of those)' : `; the page was sent before, ${this.evictions} copies were evicted so far`)
        : '; the page was not sent before';
      const why = this.cachePages === 0
        ? 'the relay keeps no page copies (xbzrle cache 0)'
        : this.o.spill
          ? 'the relay holds no copy of it'
          : `no copy of it is kept (the relay keeps the last ${this.cachePages} pages sent more than once; a source xbzrle-cache-size above ${this.cachePages * PAGE} bytes needs more, or a --tee)`;
      throw new ProtocolError('UNSUPPORTED', `XBZRLE delta for block "${block}" offset 0x${offset.toString(16)}: ${why}${history}`, at === undefined ? {} : { offset: at });
    }
    // Checked whole before the copy changes (applyXbzrle), so a bad delta leaves it intact.
    applyXbzrle(delta, copy, at);
    this.xbzrlePages++;
    await this.page(block, offset, [copy]);
  }

  /** The packet being gathered goes out. */
  async flush(): Promise<void> {
    const normal = this.normal.length;
    const count = normal + this.zero.length;
    if (count === 0) return;
    const offsets = this.normal.concat(this.zero);
    const data = normal > 0 ? [this.data.subarray(0, normal * PAGE)] : [];
    this.normal = [];
    this.zero = [];
    if (normal > 0) this.data = Buffer.allocUnsafe(MULTIFD_PAGES_PER_PACKET * PAGE);
    this.packets++;
    const sent = this.o.sink.sendPacket(this.block, offsets, normal, count - normal, data);
    sent.catch(() => {});
    this.inFlight.push(sent);
    if (this.inFlight.length >= this.maxInFlight) await this.inFlight.shift();
  }

  /** Everything gathered goes out, then one SYNC per channel; every page may be sent again after it. */
  async sync(): Promise<void> {
    await this.flush();
    await this.o.sink.sync();
    // sync() wrote every earlier packet; their promises only hold errors the sink already raised.
    this.inFlight.length = 0;
    for (const b of this.blocks.values()) b.sent.fill(0);
    this.syncs++;
  }

  /** Bytes held in page copies. */
  get copyBytes(): number {
    return this.slabs.length * SLAB_PAGES * PAGE;
  }

  private state(block: string, offset: number): BlockState {
    let b = this.blocks.get(block);
    if (!b) {
      const length = this.o.blockLength(block);
      if (length === undefined) throw new ProtocolError('UNKNOWN_BLOCK', `page for block "${block}", which the block list does not name`);
      const pages = Math.ceil(length / PAGE);
      const bytes = Math.ceil(pages / 8);
      b = { pages, sent: new Uint8Array(bytes), seen: new Uint8Array(bytes), kept: new Uint8Array(bytes), base: this.nextBase };
      this.nextBase += pages * PAGE;
      this.blocks.set(block, b);
    }
    if (offset % PAGE !== 0 || offset / PAGE >= b.pages) {
      throw new ProtocolError('OFFSET_OUT_OF_RANGE', `page offset 0x${offset.toString(16)} in block "${block}" is not a page of it`);
    }
    return b;
  }

  private mark(block: string, offset: number): BlockState {
    const b = this.state(block, offset);
    const n = offset / PAGE;
    const bit = 1 << (n & 7);
    if (b.sent[n >>> 3]! & bit) throw new RangeError(`page 0x${offset.toString(16)} of "${block}" sent twice without a sync between (needsSync)`);
    b.sent[n >>> 3]! |= bit;
    return b;
  }

  /** Room in the packet for one more page of `block` (zero pages take no data room). */
  private async slotInPacket(block: string, zero = false): Promise<number> {
    if (this.block !== block || this.normal.length + this.zero.length === MULTIFD_PAGES_PER_PACKET) await this.flush();
    this.block = block;
    return zero ? 0 : this.normal.length * PAGE;
  }

  /** Keeps the page as last sent, from its second sending on (see the head of this file). */
  private remember(b: BlockState, offset: number, page: Buffer | undefined): void {
    if (this.cachePages === 0) return;
    const n = offset / PAGE;
    const bit = 1 << (n & 7);
    const key = b.base + offset;
    const slot = this.lru.get(key);
    if (slot !== undefined) {
      this.lru.delete(key);
      this.lru.set(key, slot);
      this.keep(slot, page);
      return;
    }
    if (b.seen[n >>> 3]! & bit) this.repeats = true;
    b.seen[n >>> 3]! |= bit;
    if (!this.repeats) return;
    b.kept[n >>> 3]! |= bit;
    if (this.slotsUsed < this.cachePages) {
      if (this.slotsUsed === this.slabs.length * SLAB_PAGES) this.slabs.push(Buffer.alloc(SLAB_PAGES * PAGE));
      this.lru.set(key, this.slotsUsed);
      this.keep(this.slotsUsed++, page);
      return;
    }
    // The page sent longest ago makes room: to the spill, or dropped.
    const [oldest, free] = this.lru.entries().next().value as [number, number];
    this.lru.delete(oldest);
    this.evictions++;
    this.lru.set(key, free);
    this.o.spill?.write(oldest, this.slot(free));
    this.keep(free, page);
  }

  private keep(slot: number, page: Buffer | undefined): void {
    const copy = this.slot(slot);
    if (page === undefined) copy.fill(0);
    else if (page.buffer !== copy.buffer || page.byteOffset !== copy.byteOffset) page.copy(copy);
  }

  private slot(i: number): Buffer {
    const s = this.slabs[Math.floor(i / SLAB_PAGES)]!;
    const at = (i % SLAB_PAGES) * PAGE;
    return s.subarray(at, at + PAGE);
  }
}
