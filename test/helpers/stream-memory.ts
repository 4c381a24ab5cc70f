// What a destination's RAM holds after a main stream's records: shared by the unit tests that
// check a conversion (relay 0 -> N, receive) against the capture it replays.

import type { MainEvent } from '../../src/codec/main-stream-parser.js';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { applyXbzrle } from '../../src/codec/xbzrle.js';

/** RAM as a destination holds it after the stream: pages, zero pages and XBZRLE deltas applied. */
export function rebuildMemory(evs: MainEvent[]): Map<string, Buffer> {
  const mem = new Map<string, Buffer>();
  for (const ev of evs) {
    if (ev.type === 'ram-block') mem.set(ev.block.name, Buffer.alloc(ev.block.usedLength));
    else if (ev.type === 'ram-page') Buffer.concat(ev.data).copy(mem.get(ev.block)!, ev.offset);
    else if (ev.type === 'ram-zero') mem.get(ev.block)!.fill(0, ev.offset, ev.offset + TARGET_PAGE_SIZE);
    else if (ev.type === 'ram-xbzrle') applyXbzrle(ev.delta, mem.get(ev.block)!.subarray(ev.offset, ev.offset + TARGET_PAGE_SIZE));
  }
  return mem;
}
