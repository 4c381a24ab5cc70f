// The framing of the "dirty-bitmap" iterable section (the `dirty-bitmaps` capability: a disk's
// dirty bitmaps migrate with the VM). QEMU's migration/block-dirty-bitmap.c writes, per section,
// chunks until one with the EOS flag; the section body has no length, so carrying it as bytes
// needs the chunk boundaries and nothing more. A chunk is:
//   flags: 1 byte; 2 if bit 0x80 is set, 4 if the second byte has 0x80 too (big endian)
//   [u8-counted node alias]    if flags & DEVICE_NAME (0x08)
//   [u8-counted bitmap alias]  if flags & BITMAP_NAME (0x04)
//   START (0x10):    be32 granularity, u8 bitmap flags
//   BITS (0x40):     be64 start sector, be32 sector count, and unless ZEROES (0x02): be64 size, bytes
//   COMPLETE (0x20): nothing more
// EOS (0x01) ends the section (its footer follows). The bitmap's meaning (granularity, bits,
// aliases) is left to the QEMU that loads it.
//
// The reader follows QEMU's loader (dirty_bitmap_load, qemu_get_bitmap_flags) exactly, so the
// bytes we cut are the bytes QEMU would read: the flags end up as the LAST flag byte read (the
// loader keeps them in a uint8_t), and a chunk's fields are START's, else COMPLETE's, else BITS'.
// Limit: a BITS chunk holds at most 10 × CHUNK_SIZE = 10 KiB (the loader refuses more: "buffer
// allocation request is too large"; the sender writes about 1 KiB).

import type { Cursor } from './byte-queue.js';
import { ProtocolError } from './errors.js';

export const DIRTY_BITMAP_SECTION = 'dirty-bitmap';

export const DirtyBitmapFlag = {
  EOS: 0x01,
  ZEROES: 0x02,
  BITMAP_NAME: 0x04,
  DEVICE_NAME: 0x08,
  START: 0x10,
  COMPLETE: 0x20,
  BITS: 0x40,
  EXTRA_FLAGS: 0x80,
} as const;

/** QEMU's loader refuses a BITS chunk larger than 10 × CHUNK_SIZE (1 KiB). */
export const MAX_BITMAP_CHUNK_BYTES = 10 * 1024;

export interface DirtyBitmapChunk {
  flags: number;
  /** The chunk has EOS: the section's footer comes next. */
  last: boolean;
}

/**
 * Reads one chunk at the cursor (NeedMoreData when it is not all buffered; the caller retries it
 * whole) and leaves the cursor after it. `at` is its stream offset, for errors.
 */
export function readDirtyBitmapChunk(c: Cursor, at: number): DirtyBitmapChunk {
  let flags = c.u8();
  if (flags & DirtyBitmapFlag.EXTRA_FLAGS) {
    flags = c.u8();
    if (flags & DirtyBitmapFlag.EXTRA_FLAGS) flags = c.u16() & 0xff;
  }
  if (flags & DirtyBitmapFlag.DEVICE_NAME) c.countedString();
  if (flags & DirtyBitmapFlag.BITMAP_NAME) c.countedString();
  if (flags & DirtyBitmapFlag.START) {
    c.u32();
    c.u8();
  } else if (flags & DirtyBitmapFlag.COMPLETE) {
    // nothing more
  } else if (flags & DirtyBitmapFlag.BITS) {
    c.u64();
    c.u32();
    if (!(flags & DirtyBitmapFlag.ZEROES)) {
      const size = c.u64();
      if (size > BigInt(MAX_BITMAP_CHUNK_BYTES)) {
        throw new ProtocolError('LIMIT_EXCEEDED', `dirty-bitmap chunk of ${size} bytes (at most ${MAX_BITMAP_CHUNK_BYTES}, as QEMU's loader)`, { offset: at });
      }
      c.skip(Number(size));
    }
  }
  return { flags, last: (flags & DirtyBitmapFlag.EOS) !== 0 };
}
