// What a destination's RAM holds after a main stream's records: shared by the unit tests that
// check a conversion (relay 0 -> N, receive, stream files with XBZRLE) against the capture it
// replays; and the spill files such a conversion holds open.

import { readdirSync, readlinkSync } from 'node:fs';
import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
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

/** Every event of a whole main stream, parsed in one push. */
export function mainEvents(main: Buffer): MainEvent[] {
  const p = new MainStreamParser();
  p.push(main);
  const out: MainEvent[] = [];
  for (let ev = p.next(); ev !== null; ev = p.next()) out.push(ev);
  return out;
}

/** Files this process holds open under `dir` (a spill file is unlinked: "... (deleted)"). */
export function openFilesUnder(dir: string): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const l = readlinkSync(`/proc/self/fd/${fd}`);
      if (l.startsWith(`${dir}/`)) out.push(l);
    } catch {
      // closed meanwhile (readdir's own fd)
    }
  }
  return out;
}
