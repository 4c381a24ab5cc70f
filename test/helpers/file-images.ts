/**
 * An oracle for the file tools, independent of the snapshot readers' page indexing: the final
 * image of every RAM block, by replaying a stream file's records in order or by reading a
 * mapped-ram file's bitmap and pages region.
 */
import { readFileSync } from 'node:fs';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { snapshotFormat } from '../../src/engine/open-snapshot.js';

const PAGE = TARGET_PAGE_SIZE;

export async function imagesOf(file: string): Promise<Map<string, Buffer>> {
  const out = new Map<string, Buffer>();
  if ((await snapshotFormat(file)) === 'mapped-ram') {
    const s = await MappedRamSnapshot.open(file);
    try {
      for (const b of s.blocks.values()) out.set(b.name, await s.readPages(b.name, 0, b.usedLength / PAGE));
    } finally {
      await s.close();
    }
    return out;
  }
  const p = new MainStreamParser();
  p.push(readFileSync(file));
  for (let ev = p.next(); ev !== null; ev = p.next()) {
    if (ev.type === 'ram-block') out.set(ev.block.name, Buffer.alloc(ev.block.usedLength));
    else if (ev.type === 'ram-page') Buffer.concat(ev.data).copy(out.get(ev.block)!, ev.offset);
    else if (ev.type === 'ram-zero') out.get(ev.block)!.fill(0, ev.offset, ev.offset + PAGE);
    else if (ev.type === 'device-state') break;
  }
  return out;
}

/** Per block: "equal" or how many pages differ; blocks missing on either side are named. */
export function imageDifferences(a: Map<string, Buffer>, b: Map<string, Buffer>): string[] {
  const out: string[] = [];
  for (const [name, img] of a) {
    const other = b.get(name);
    if (!other) { out.push(`${name}: missing in the second file`); continue; }
    if (other.length !== img.length) { out.push(`${name}: ${img.length} vs ${other.length} bytes`); continue; }
    if (img.equals(other)) continue;
    let diff = 0;
    let first = -1;
    for (let off = 0; off < img.length; off += PAGE) {
      if (img.compare(other, off, off + PAGE, off, off + PAGE) !== 0) {
        if (first < 0) first = off / PAGE;
        diff++;
      }
    }
    out.push(`${name}: ${diff} pages differ, first page ${first}`);
  }
  for (const name of b.keys()) if (!a.has(name)) out.push(`${name}: missing in the first file`);
  return out;
}
