// A mapped-ram snapshot file as the bytes of a packed object (docs/s3-layout.md), produced in
// parts of a given size: the prefix (index, skeleton) and then every present page in bitmap
// order, read with the reader's positioned reads straight into the part buffers.

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { cutStart, encodePackedPrefix, type PackedLayout } from '../codec/packed-snapshot.js';
import type { MappedRamSnapshot, SnapshotBlock } from './mapped-ram-reader.js';

/** Prefix and layout of the object `src` packs into. */
export async function packedPrefixOf(src: MappedRamSnapshot): Promise<{ prefix: Buffer; layout: PackedLayout }> {
  const blocks = orderedBlocks(src);
  const skeleton: Buffer[] = [];
  let cursor = 0;
  for (const b of blocks) {
    const from = cutStart({ bitmapOffset: b.header.bitmapOffset, usedLength: b.usedLength }, TARGET_PAGE_SIZE);
    skeleton.push(await src.readAt(cursor, from - cursor));
    // The padding before the pages is not stored: it must read as zero (a hole, as QEMU leaves it).
    const pad = await src.readAt(from, b.header.pagesOffset - from);
    const nonZero = pad.findIndex((x) => x !== 0);
    if (nonZero >= 0) throw new ProtocolError('BAD_MAPPED_RAM', `${src.path}: block "${b.name}" has data between its bitmap and its pages (not a mapped-ram file as QEMU writes them)`, { offset: from + nonZero });
    cursor = b.header.pagesOffset + b.usedLength;
  }
  skeleton.push(await src.readAt(cursor, src.fileSize - cursor));
  return encodePackedPrefix({
    pageSize: TARGET_PAGE_SIZE,
    fileSize: src.fileSize,
    blocks: blocks.map((b) => ({ name: b.name, usedLength: b.usedLength, pagesOffset: b.header.pagesOffset, bitmapOffset: b.header.bitmapOffset, bitmap: b.bitmap.bytes })),
    skeleton,
  });
}

function orderedBlocks(src: MappedRamSnapshot): SnapshotBlock[] {
  return src.blockList.map((b) => src.blocks.get(b.name)!).sort((a, b) => a.header.pagesOffset - b.header.pagesOffset);
}

/**
 * The object's bytes in parts of `partSize` (the last one shorter), each from `alloc` (default: a
 * fresh buffer the consumer may keep; a pool lets it recycle them). The total is
 * layout.objectSize exactly, or it throws.
 */
export async function* packedParts(src: MappedRamSnapshot, prefix: Buffer, layout: PackedLayout, partSize: number, alloc: (bytes: number) => Buffer = Buffer.allocUnsafe): AsyncGenerator<Buffer> {
  if (partSize % TARGET_PAGE_SIZE !== 0 || partSize <= 0) throw new RangeError(`part size ${partSize} is not a positive multiple of ${TARGET_PAGE_SIZE}`);
  const total = layout.objectSize;
  let sent = 0;
  let part = alloc(Math.min(partSize, total));
  let fill = 0;
  const full = (): boolean => fill === part.length && part.length > 0;
  const next = (): Buffer => {
    const out = part;
    sent += out.length;
    part = total > sent ? alloc(Math.min(partSize, total - sent)) : Buffer.alloc(0);
    fill = 0;
    return out;
  };
  for (let at = 0; at < prefix.length;) {
    const n = prefix.copy(part, fill, at);
    fill += n;
    at += n;
    if (full()) yield next();
  }
  for (const b of orderedBlocks(src)) {
    let from = 0;
    for (;;) {
      const room = (part.length - fill) / TARGET_PAGE_SIZE;
      const runs: number[] = [];
      let pages = 0;
      src.forEachRun(b.name, (first, count) => {
        const take = Math.min(count, room - pages);
        runs.push(first, take);
        pages += take;
        from = first + take;
        return pages < room;
      }, from, room);
      if (pages === 0) break;
      const into = part.subarray(fill, fill + pages * TARGET_PAGE_SIZE);
      // A source may hand back views of its own buffers instead of filling `into`.
      let at = 0;
      for (const v of await src.loadRuns(b.name, runs, runs.length / 2, into)) {
        if (v.buffer !== into.buffer || v.byteOffset !== into.byteOffset + at) v.copy(into, at);
        at += v.length;
      }
      fill += pages * TARGET_PAGE_SIZE;
      if (full()) yield next();
    }
  }
  if (sent !== total || fill !== 0) throw new Error(`internal: ${sent} of ${total} object bytes produced (the snapshot changed while it was packed?)`);
}
