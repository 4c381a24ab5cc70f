// Where received pages go. The engine knows RAM blocks and page offsets, not whether they end up
// in a mapped-ram file, a guest's memory or a Node Buffer.

export interface RamBlock {
  name: string;
  usedLength: number;
}

export interface PageStore {
  /**
   * Stores `count` pages of `block`: page i goes to offsets[i] and its bytes are the i-th
   * pageSize bytes of `data` (views that may split anywhere). Resolves once the data is stored;
   * the views may be reused after that.
   */
  writePages(block: string, offsets: ArrayLike<number>, count: number, data: readonly Buffer[]): Promise<void>;
  /** Makes pages offsets[start .. start+count) zero (received as zero after possibly data). */
  zeroPages(block: string, offsets: ArrayLike<number>, start: number, count: number): void | Promise<void>;
  /**
   * Optional: one packet whole, for stores that pass packets on (a relay) rather than place pages.
   * offsets[0 .. normal) are the pages of `data`, offsets[normal .. normal+zero) are zero pages.
   * When present the receiver calls it instead of writePages and zeroPages.
   */
  writePacket?(block: string, offsets: Float64Array, normal: number, zero: number, data: readonly Buffer[]): Promise<void>;
  /**
   * Optional: whether packets compressed with `method` may reach writeEncodedPacket still
   * encoded (a relay whose next hop uses the same method on the same channels).
   */
  acceptsEncoded?(method: string): boolean;
  /** With acceptsEncoded: whether writeEncodedPacket needs the decoded pages as well (it keeps a copy). */
  readonly keepsPages?: boolean;
  /**
   * One packet as it arrived on source channel `channel`: `payload` is still encoded; `pages` are
   * its decoded pages when keepsPages. offsets as for writePacket.
   */
  writeEncodedPacket?(channel: number, block: string, offsets: Float64Array, normal: number, zero: number, payload: readonly Buffer[], pages: readonly Buffer[] | undefined): Promise<void>;
}
