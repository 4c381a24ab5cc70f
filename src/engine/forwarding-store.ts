// A page store that passes each received packet on: to a multifd sender (the next hop of a relay)
// and, optionally, to a second store that keeps a copy (a snapshot written as pages pass). A
// packet counts as stored once both are done with its bytes, so the receiver's window and sync
// barrier cover the next hop too: nothing of a round is left in flight when its sync goes out.

import type { MultifdSender } from './multifd-sender.js';
import type { PageStore } from './page-store.js';

export interface ForwardingOptions {
  /**
   * Compressed packets whose method is the sender's go on as they came, on the channel of the
   * same number, without decoding and re-encoding (needs as many channels on both sides, and the
   * same level is then the source's). Default false.
   */
  passEncoded?: boolean;
}

export class ForwardingStore implements PageStore {
  constructor(
    private readonly sender: MultifdSender,
    private readonly copy?: PageStore,
    private readonly opts: ForwardingOptions = {},
  ) {}

  acceptsEncoded(method: string): boolean {
    return this.opts.passEncoded === true && method !== 'none' && method === this.sender.methodName;
  }

  get keepsPages(): boolean {
    return this.copy !== undefined;
  }

  writeEncodedPacket(channel: number, block: string, offsets: Float64Array, normal: number, zero: number, payload: readonly Buffer[], pages: readonly Buffer[] | undefined): Promise<void> {
    const sent = this.sender.sendEncodedPacket(channel, block, offsets, normal, zero, payload);
    if (!this.copy) return sent;
    const kept = this.keep(block, offsets, normal, zero, pages ?? []);
    return Promise.all([sent, kept]).then(() => {});
  }

  writePacket(block: string, offsets: Float64Array, normal: number, zero: number, data: readonly Buffer[]): Promise<void> {
    const sent = this.sender.sendPacket(block, offsets, normal, zero, data);
    if (!this.copy) return sent;
    const kept = this.keep(block, offsets, normal, zero, data);
    return Promise.all([sent, kept]).then(() => {});
  }

  writePages(block: string, offsets: ArrayLike<number>, count: number, data: readonly Buffer[]): Promise<void> {
    return this.writePacket(block, Float64Array.from({ length: count }, (_, i) => offsets[i]!), count, 0, data);
  }

  async zeroPages(block: string, offsets: ArrayLike<number>, start: number, count: number): Promise<void> {
    await this.writePacket(block, Float64Array.from({ length: count }, (_, i) => offsets[start + i]!), 0, count, []);
  }

  private async keep(block: string, offsets: Float64Array, normal: number, zero: number, data: readonly Buffer[]): Promise<void> {
    if (zero > 0) await this.copy!.zeroPages(block, offsets, normal, zero);
    if (normal > 0) await this.copy!.writePages(block, offsets, normal, data);
  }
}
