// Pages that live in this process: RAM blocks backed by a Buffer, an ArrayBuffer or a
// WebAssembly.Memory. The sender reads them in place: loadRuns returns views of the memory
// itself, so a packet's payload goes from the block to the socket without a copy.

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import type { PageLoader } from './multifd-sender.js';

export type MemoryLike = Buffer | ArrayBuffer | WebAssembly.Memory;

function bytesOf(m: MemoryLike): Buffer {
  if (Buffer.isBuffer(m)) return m;
  if (m instanceof ArrayBuffer) return Buffer.from(m);
  return Buffer.from(m.buffer);
}

export class MemoryPages implements PageLoader {
  private readonly blocks = new Map<string, MemoryLike>();

  constructor(blocks: Record<string, MemoryLike> | Map<string, MemoryLike>, private readonly pageSize = TARGET_PAGE_SIZE) {
    for (const [name, mem] of blocks instanceof Map ? blocks : Object.entries(blocks)) {
      if (bytesOf(mem).length % pageSize !== 0) throw new RangeError(`block ${name}: length is not a multiple of the ${pageSize}-byte page`);
      this.blocks.set(name, mem);
    }
  }

  /** The block's bytes now (a WebAssembly.Memory may have grown since the last call). */
  bytes(block: string): Buffer {
    const m = this.blocks.get(block);
    if (!m) throw new ProtocolError('UNKNOWN_BLOCK', `no memory block "${block}"`);
    return bytesOf(m);
  }

  scratchBytes(): number {
    return 0;
  }

  async loadRuns(block: string, runs: ArrayLike<number>, runCount: number): Promise<Buffer[]> {
    const mem = this.bytes(block);
    const ps = this.pageSize;
    const views: Buffer[] = [];
    for (let i = 0; i < runCount; i++) {
      const first = runs[2 * i]!;
      const count = runs[2 * i + 1]!;
      if (first < 0 || count <= 0 || (first + count) * ps > mem.length) throw new RangeError(`pages [${first}, +${count}) outside block ${block}`);
      views.push(mem.subarray(first * ps, (first + count) * ps));
    }
    return views;
  }
}
