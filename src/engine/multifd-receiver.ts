// Receive side of the multifd channels: per-channel parsing, the method's recv, page stores with
// a bounded window of writes in flight, and the sync barrier shared with the main channel.

import { EventEmitter } from 'node:events';
import { MultifdChannelParser } from '../codec/multifd-channel-parser.js';
import { MULTIFD_PACKET_HEADER_SIZE, MultifdFlag, TARGET_PAGE_SIZE, compressionFromFlags } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { formatUuid } from '../codec/multifd-init.js';
import { isSync, validatePacketPages, type MultifdPacketHeader } from '../codec/multifd-packet.js';
import type { MultifdMethod, RecvMethodChannel } from './methods/method.js';
import { getMethod } from './methods/registry.js';
import type { PageStore, RamBlock } from './page-store.js';
import { SyncBarrier } from './sync-barrier.js';
import { publish } from './diagnostics.js';
import { isReleasingSource } from './chunk-source.js';

export interface ChannelStats {
  id: number;
  bytes: number;
  packets: number;
  normalPages: number;
  zeroPages: number;
  syncs: number;
}

export interface MultifdReceiverOptions {
  channels: number;
  /** The source's multifd-compression; undefined detects it from the first packet with pages. */
  method?: MultifdMethod;
  store: PageStore;
  /** The migration's blocks; filled in by the main channel's MEM_SIZE before any data packet. */
  blocks: ReadonlyMap<string, RamBlock>;
  /** Required uuid in every init message; undefined accepts any. */
  uuid?: Buffer;
  pageSize?: number;
  /**
   * Bytes of page writes a channel may have in flight before it stops reading its socket. Default
   * 8 MiB uncompressed, 4 MiB compressed: decoding holds each packet twice (compressed and
   * decoded, in a worker and here), and with zstd on 4 channels 8 MiB took a 4 GiB receive to
   * 274–285 MiB peak RSS (256 with 4 MiB, no slower).
   */
  windowBytes?: number;
  /** How long a sync waits for channels that never connected. */
  channelTimeoutMs?: number;
  /** Names a channel in errors, before its id (default "multifd channel"; a relay says "source multifd channel"). */
  channelName?: string;
}

/** QEMU's multifd-channels parameter is 1..255 (a uint8, and the init message's id is one byte). */
export const MAX_MULTIFD_CHANNELS = 255;

import { ChannelError } from '../codec/errors.js';
export { ChannelError } from '../codec/errors.js';

export class MultifdReceiver extends EventEmitter {
  readonly barrier: SyncBarrier;
  private readonly stats = new Map<number, ChannelStats>();
  private readonly closedChannels = new Set<number>();
  private readonly methods = new Map<number, RecvMethodChannel>();
  private readonly inflight = new Set<Promise<void>>();
  private failure: Error | undefined;
  private finished = false;
  private readonly pageSize: number;
  private readonly windowOption: number | undefined;
  private encodedCount = 0;

  private get windowBytes(): number {
    return this.windowOption ?? (this.method && this.method.name !== 'none' ? 4 : 8) * 1024 * 1024;
  }
  private method: MultifdMethod | undefined;
  /** Connections in runChannel, identified or not: at most opts.channels. */
  private open = 0;

  constructor(private readonly opts: MultifdReceiverOptions) {
    super();
    if (!Number.isInteger(opts.channels) || opts.channels < 1 || opts.channels > MAX_MULTIFD_CHANNELS) {
      throw new RangeError(`multifd channels must be 1..${MAX_MULTIFD_CHANNELS} (got ${opts.channels})`);
    }
    this.method = opts.method;
    this.barrier = new SyncBarrier(opts.channels);
    this.pageSize = opts.pageSize ?? TARGET_PAGE_SIZE;
    this.windowOption = opts.windowBytes;
  }

  get connected(): number {
    return this.stats.size;
  }

  /**
   * Connections being run, including those that have not sent their init message yet (a caller
   * that owns the sockets should refuse a new one when this reaches the channel count).
   */
  get openConnections(): number {
    return this.open;
  }

  channelStats(): ChannelStats[] {
    return [...this.stats.values()].sort((a, b) => a.id - b.id).map((s) => ({ ...s }));
  }

  /**
   * Runs one channel from its first byte (the init message) to EOF. Never rejects: failures go
   * to fail(), which fails the barrier and emits 'error' once.
   */
  async runChannel(source: AsyncIterable<Buffer>, label: string): Promise<void> {
    if (this.open >= this.opts.channels) {
      // A source opens exactly `channels` connections; more at once is a stray (or a flood) that
      // would otherwise hold a parser and a socket each while it never identifies itself. It is
      // refused, not failed: QEMU's own extra connection would fail on its id, a stray must not
      // fail the migration.
      const err = new ProtocolError('LIMIT_EXCEEDED', `${this.open} multifd connections are already open for ${this.opts.channels} channel(s); closed`);
      publish('receiver', 'refused', { where: label, error: err });
      this.emit('refused', new ChannelError(label, err));
      await source[Symbol.asyncIterator]().return?.();
      return;
    }
    this.open++;
    try {
      await this.runOpenChannel(source, label);
    } finally {
      this.open--;
    }
  }

  private async runOpenChannel(source: AsyncIterable<Buffer>, label: string): Promise<void> {
    const parser = new MultifdChannelParser(MultifdFlag.NOCOMP, this.pageSize);
    // Not yet known: accept any method here; methodFor() keeps all packets on the first one seen.
    parser.setExpectedCompression(this.method?.flags);
    let where = label;
    let id = -1;
    const windowed = new Set<Promise<void>>();
    let windowBytes = 0;
    // A source that reuses its memory (a ring) gets told which bytes are still referenced: those
    // of packets whose writes are in flight (in stream order), and what the parser holds.
    const ring = isReleasingSource(source) ? source : undefined;
    const held: { start: number; done: boolean }[] = [];
    let heldHead = 0;
    const releaseRing = (): void => {
      while (heldHead < held.length && held[heldHead]!.done) heldHead++;
      if (heldHead > 256 && heldHead * 2 > held.length) {
        held.splice(0, heldHead);
        heldHead = 0;
      }
      ring!.release(heldHead < held.length ? held[heldHead]!.start : parser.offset);
    };
    try {
      for await (const chunk of source) {
        if (this.failure) return;
        parser.push(chunk);
        for (let ev = parser.next(); ev !== null; ev = parser.next()) {
          if (ev.type === 'init') {
            id = this.register(ev.init.id, ev.init.uuid);
            where = `${this.opts.channelName ?? 'multifd channel'} ${id}`;
            continue;
          }
          const st = this.stats.get(id)!;
          st.bytes += ev.wireBytes;
          st.packets++;
          const h = ev.header;
          if (this.finished) throw new ProtocolError('BAD_RECORD', `packet after ${this.finishedAt}`);
          if (h.normalPages + h.zeroPages > 0) {
            const write = this.applyPages(id, h, ev.payload, st);
            if (write) {
              const bytes = h.normalPages * this.pageSize;
              windowBytes += bytes;
              const hold = ring ? { start: parser.offset - (ev.wireBytes - MULTIFD_PACKET_HEADER_SIZE), done: false } : undefined;
              if (hold) held.push(hold);
              // A failed write or decode fails the migration here, once: the tracking promise
              // itself never rejects, so no waiter can miss the failure or see it unhandled.
              const done = (): void => {
                windowed.delete(tracked);
                this.inflight.delete(tracked);
                windowBytes -= bytes;
                if (hold) {
                  hold.done = true;
                  releaseRing();
                }
              };
              const tracked: Promise<void> = write.then(done, (e: Error) => {
                done();
                this.fail(this.locate(e, where));
              });
              windowed.add(tracked);
              this.inflight.add(tracked);
              while (windowBytes > this.windowBytes) await Promise.race(windowed);
              if (this.failure) return;
            }
          }
          if (isSync(h)) {
            await Promise.all(windowed);
            if (this.failure) return;
            st.syncs++;
            publish('receiver', 'sync-arrive', { channel: id, round: st.syncs });
            await this.barrier.arrive(id);
          }
        }
        if (ring) releaseRing();
      }
      await Promise.all(windowed);
      if (this.failure) return;
      if (id < 0) throw new ProtocolError('TRUNCATED', `closed after ${parser.buffered} bytes, before its 64-byte init message`);
      if (!parser.atBoundary) {
        throw new ProtocolError('TRUNCATED', `closed mid-packet (${parser.buffered} bytes of a packet received at stream offset ${parser.offset})`);
      }
      this.closedChannels.add(id);
      if (this.barrier.waiting && !this.finished) {
        throw new ProtocolError('TRUNCATED', 'closed before reaching the sync the main channel waits for (source gone?)');
      }
    } catch (e) {
      await Promise.allSettled(windowed);
      // A peer killed outright resets the connection instead of closing it: same news.
      const code = (e as { code?: string }).code;
      const err = code === 'ECONNRESET' || code === 'EPIPE' ? new ProtocolError('TRUNCATED', 'the connection was reset mid-migration (source gone?)') : e;
      this.fail(this.locate(err instanceof Error ? err : new Error(String(err)), where));
    } finally {
      // Decodes still running use the method's stream state: let them settle before it goes.
      await Promise.allSettled(windowed);
      this.methods.get(id)?.cleanup();
    }
  }

  /**
   * Main channel reached a sync point (MULTIFD_FLUSH, or EOS in per-section mode). `whileHeld`
   * runs once every channel has stored its pages of the round, before any is released.
   */
  async sync(whileHeld?: () => Promise<void>): Promise<void> {
    if (this.failure) throw this.failure;
    for (const id of this.closedChannels) {
      throw new ChannelError(`multifd channel ${id}`, new ProtocolError('TRUNCATED', 'closed before the sync the main channel reached (source gone?)'));
    }
    let timer: NodeJS.Timeout | undefined;
    if (this.connected < this.opts.channels) {
      const ms = this.opts.channelTimeoutMs ?? 15000;
      timer = setTimeout(() => {
        const ids = [...this.stats.keys()].sort().join(', ') || 'none';
        this.fail(new ProtocolError('BAD_CHANNEL_ID', `only ${this.connected} of ${this.opts.channels} multifd channels connected within ${ms / 1000}s (ids: ${ids}); does the source use multifd-channels=${this.opts.channels}?`));
      }, ms);
    }
    try {
      await this.barrier.wait(whileHeld);
      publish('receiver', 'sync', { round: this.barrier.completedRounds });
      this.emit('sync', this.barrier.completedRounds);
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  /** After the main channel's final sync: later packets are errors; waits for writes in flight. */
  async finish(at = 'the final sync'): Promise<void> {
    if (!this.finished) this.finishedAt = at;
    this.finished = true;
    await Promise.all(this.inflight);
    if (this.failure) throw this.failure;
  }

  private finishedAt = 'the final sync';

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.barrier.fail(err);
    publish('receiver', 'error', { error: err });
    this.emit('error', err);
  }

  /** Resolves when every write in flight settled (used before removing a failed output). */
  async quiesce(): Promise<void> {
    await Promise.allSettled(this.inflight);
  }

  private locate(e: Error, where: string): Error {
    if (e instanceof ChannelError) return e;
    return new ChannelError(where, e);
  }

  private register(id: number, uuid: Buffer): number {
    if (id >= this.opts.channels) {
      throw new ProtocolError('BAD_CHANNEL_ID', `received channel id ${id} exceeds channel count ${this.opts.channels} (does the source use more multifd-channels?)`);
    }
    if (this.stats.has(id)) throw new ProtocolError('DUPLICATE_CHANNEL', `channel id ${id} already set up`);
    if (this.opts.uuid && !uuid.equals(this.opts.uuid)) {
      throw new ProtocolError('UUID_MISMATCH', `received uuid ${formatUuid(uuid)}, expected ${formatUuid(this.opts.uuid)}`);
    }
    this.stats.set(id, { id, bytes: 64, packets: 0, normalPages: 0, zeroPages: 0, syncs: 0 });
    publish('receiver', 'channel', { channel: id });
    this.emit('channel', id, uuid);
    return id;
  }

  /** The method of the first packet with pages; every later one must use the same. */
  private methodFor(h: MultifdPacketHeader): MultifdMethod {
    const comp = h.flags & MultifdFlag.COMPRESSION_MASK;
    if (!this.method) {
      const name = compressionFromFlags(comp);
      this.method = getMethod(name ?? `flags 0x${comp.toString(16)}`);
      publish('receiver', 'compression', { method: this.method.name });
      this.emit('compression', this.method.name);
    } else if (comp !== this.method.flags) {
      throw new ProtocolError('FLAG_MISMATCH', `packet uses ${compressionFromFlags(comp) ?? `flags 0x${comp.toString(16)}`}, earlier packets used ${this.method.name}`);
    }
    return this.method;
  }

  get compression(): string | undefined {
    return this.method?.name;
  }

  /** Packets passed to the store still encoded (writeEncodedPacket). */
  get encodedPackets(): number {
    return this.encodedCount;
  }

  private applyPages(id: number, h: MultifdPacketHeader, payload: Buffer[], st: ChannelStats): Promise<void> | undefined {
    const block = this.opts.blocks.get(h.ramblock);
    validatePacketPages(h, block?.usedLength, this.pageSize);
    const method = this.methodFor(h);
    let ch = this.methods.get(id);
    if (!ch) {
      ch = method.recvSetup(id, this.pageSize);
      this.methods.set(id, ch);
    }
    const store = this.opts.store;
    if (store.writeEncodedPacket && store.acceptsEncoded?.(method.name)) {
      // Passed on still encoded; decoded only for a store that keeps a copy.
      const pages = store.keepsPages && h.normalPages > 0 ? ch.recv(h, payload) : undefined;
      st.zeroPages += h.zeroPages;
      this.encodedCount++;
      return this.forwardEncoded(id, h, payload, pages, st, ch);
    }
    // Decoding starts now, in packet order: a compressed stream's state runs from packet to packet.
    const decoded = h.normalPages > 0 ? ch.recv(h, payload) : undefined;
    if (this.opts.store.writePacket) {
      st.zeroPages += h.zeroPages;
      return this.forwardPacket(h, decoded, st, ch);
    }
    // Awaited in writeNormal; this only keeps a rejection during the zero-page write from counting as unhandled.
    if (decoded instanceof Promise) decoded.catch(() => {});
    // Zero entries first is safe: a packet never lists one page twice, and the barrier orders rounds.
    if (h.zeroPages > 0) {
      st.zeroPages += h.zeroPages;
      const z = this.opts.store.zeroPages(h.ramblock, h.offsets, h.normalPages, h.zeroPages);
      if (z instanceof Promise) return decoded ? z.then(() => this.writeNormal(h, decoded, st, ch)) : z;
    }
    if (!decoded) return undefined;
    return this.writeNormal(h, decoded, st, ch);
  }

  private forwardPacket(h: MultifdPacketHeader, decoded: Buffer[] | Promise<Buffer[]> | undefined, st: ChannelStats, ch: RecvMethodChannel): Promise<void> {
    return this.storeDecoded(h, decoded, st, ch, (pages) => this.opts.store.writePacket!(h.ramblock, h.offsets, h.normalPages, h.zeroPages, pages ?? []));
  }

  private forwardEncoded(id: number, h: MultifdPacketHeader, payload: Buffer[], decoded: Promise<Buffer[]> | Buffer[] | undefined, st: ChannelStats, ch: RecvMethodChannel): Promise<void> {
    return this.storeDecoded(h, decoded, st, ch, (pages) => this.opts.store.writeEncodedPacket!(id, h.ramblock, h.offsets, h.normalPages, h.zeroPages, payload, pages));
  }

  /**
   * Waits for a packet's decoded pages (none when it has no normal pages, or when they were not
   * decoded), checks their size, counts them, hands them to `write`, and gives them back to the
   * method once the store is done with them (PageStore's contract: when its write settled).
   */
  private async storeDecoded(
    h: MultifdPacketHeader,
    decoded: Buffer[] | Promise<Buffer[]> | undefined,
    st: ChannelStats,
    ch: RecvMethodChannel,
    write: (pages: Buffer[] | undefined) => Promise<void>,
  ): Promise<void> {
    const pages = decoded ? await decoded : undefined;
    try {
      if (pages) this.checkDecoded(h, pages);
      st.normalPages += h.normalPages;
      await write(pages);
    } finally {
      if (pages) ch.release?.(pages);
    }
  }

  private checkDecoded(h: MultifdPacketHeader, pages: readonly Buffer[]): void {
    const got = pages.reduce((n, b) => n + b.length, 0);
    if (got !== h.normalPages * this.pageSize) {
      throw new ProtocolError('BAD_RECORD', `payload decodes to ${got} bytes, expected ${h.normalPages} pages (${h.normalPages * this.pageSize} bytes)`);
    }
  }

  private writeNormal(h: MultifdPacketHeader, decoded: Buffer[] | Promise<Buffer[]>, st: ChannelStats, ch: RecvMethodChannel): Promise<void> {
    return this.storeDecoded(h, decoded, st, ch, (pages) => this.opts.store.writePages(h.ramblock, h.offsets, h.normalPages, pages!));
  }
}
