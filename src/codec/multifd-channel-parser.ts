// Incremental parser for one multifd socket channel: init message, then packets. Pure: the
// caller pushes bytes and pulls events; payloads are returned as views of the pushed chunks.

import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE, MultifdFlag, TARGET_PAGE_SIZE } from './constants.js';
import { ByteQueue } from './byte-queue.js';
import { NeedMoreData, ProtocolError } from './errors.js';
import { decodeMultifdInit, type MultifdInit } from './multifd-init.js';
import { decodeMultifdPacketHeader, payloadSize, type MultifdPacketHeader } from './multifd-packet.js';

export type ChannelEvent =
  | { type: 'init'; init: MultifdInit }
  | { type: 'packet'; header: MultifdPacketHeader; payload: Buffer[]; wireBytes: number };

export class MultifdChannelParser {
  private readonly q = new ByteQueue();
  private sawInit = false;
  private header: MultifdPacketHeader | undefined;

  constructor(
    private expectedCompressionFlags: number | undefined = MultifdFlag.NOCOMP,
    private readonly pageSize = TARGET_PAGE_SIZE,
  ) {}

  setExpectedCompression(flags: number | undefined): void {
    this.expectedCompressionFlags = flags;
  }

  push(chunk: Buffer): void {
    this.q.push(chunk);
  }

  /** Bytes buffered but not yet returned as events. */
  get buffered(): number {
    return this.q.length;
  }

  /** True when the stream ended exactly between two structures. */
  get atBoundary(): boolean {
    return this.q.length === 0 && this.header === undefined;
  }

  /** Stream offset of the next unread byte, for error messages. */
  get offset(): number {
    return this.q.streamOffset;
  }

  /** Next complete event, or null if more bytes are needed. Throws ProtocolError on bad input. */
  next(): ChannelEvent | null {
    try {
      if (!this.sawInit) {
        const c = this.q.cursor();
        const raw = c.take(MULTIFD_INIT_SIZE);
        const init = this.at(() => decodeMultifdInit(raw));
        this.q.consume(MULTIFD_INIT_SIZE);
        this.sawInit = true;
        return { type: 'init', init };
      }
      if (this.header === undefined) {
        if (this.q.length < 12) return null;
        const flags = this.q.contiguous(8, 4).readUInt32BE(0);
        if (flags & MultifdFlag.DEVICE_STATE) {
          throw new ProtocolError('UNSUPPORTED', 'device-state packet (VFIO multifd device state) is not supported', { offset: this.q.streamOffset });
        }
        if (this.q.length < MULTIFD_PACKET_HEADER_SIZE) return null;
        const raw = this.q.contiguous(0, MULTIFD_PACKET_HEADER_SIZE);
        this.header = this.at(() => decodeMultifdPacketHeader(raw, this.expectedCompressionFlags));
        this.q.consume(MULTIFD_PACKET_HEADER_SIZE);
      }
      const h = this.header;
      const size = payloadSize(h, this.pageSize);
      if (this.q.length < size) return null;
      const payload = size === 0 ? [] : this.q.slices(0, size);
      this.q.consume(size);
      this.header = undefined;
      return { type: 'packet', header: h, payload, wireBytes: MULTIFD_PACKET_HEADER_SIZE + size };
    } catch (e) {
      if (e instanceof NeedMoreData) return null;
      throw e;
    }
  }

  private at<T>(fn: () => T): T {
    const offset = this.q.streamOffset;
    try {
      return fn();
    } catch (e) {
      if (e instanceof ProtocolError && e.offset === undefined) e.offset = offset;
      throw e;
    }
  }
}
