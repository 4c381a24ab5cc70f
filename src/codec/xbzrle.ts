// XBZRLE page deltas (the `xbzrle` capability): a RAM record with RAM_SAVE_FLAG_XBZRLE carries,
// after its header, u8 ENCODING_FLAG_XBZRLE, be16 length and that many bytes of run-length
// encoded difference from the copy of the page the source sent before (QEMU migration/ram.c
// save_xbzrle_page / load_xbzrle). The encoding (migration/xbzrle.c) is a sequence of pairs:
//   zero run:     ULEB128 count of bytes unchanged (0 only for the first pair)
//   non-zero run: ULEB128 count n ≥ 1, then n new bytes
// with each ULEB128 at most 2 bytes (values < 2^14, util/cutils.c uleb128_decode_small).
// A destination applies it onto the page it already holds (its "cache" is the page itself).
//
// Limits, as QEMU's decoder enforces them: the delta is at most TARGET_PAGE_SIZE bytes (load_xbzrle
// refuses "len overflow"), every run stays inside the page and inside the delta, a pair is never
// cut after its zero run, a count never takes 3 bytes. Unlike xbzrle_decode_buffer, which writes
// as it goes and leaves a half-applied page behind on error, the whole delta is checked before
// one byte of the page changes.

import { TARGET_PAGE_SIZE } from './constants.js';
import { ProtocolError } from './errors.js';

/** ENCODING_FLAG_XBZRLE: the only encoding byte load_xbzrle accepts. */
export const XBZRLE_ENCODING_FLAG = 0x01;
/** Bytes of an XBZRLE record after the page header: encoding byte + be16 length. */
export const XBZRLE_HEADER_SIZE = 3;
/** Largest delta load_xbzrle accepts (TARGET_PAGE_SIZE). */
export const XBZRLE_MAX_DELTA = TARGET_PAGE_SIZE;

/** One run of new bytes: `length` bytes at `pageOffset`, taken from the delta at `deltaOffset`. */
export interface XbzrleRun {
  pageOffset: number;
  deltaOffset: number;
  length: number;
}

function uleb(delta: Uint8Array, i: number, where: number): [value: number, size: number] {
  const b0 = delta[i]!;
  if ((b0 & 0x80) === 0) return [b0, 1];
  const b1 = delta[i + 1];
  if (b1 === undefined) throw bad('run length cut after its first byte', where + i);
  if (b1 & 0x80) throw bad('run length longer than 2 bytes (over 14 bits)', where + i);
  return [(b0 & 0x7f) | (b1 << 7), 2];
}

function bad(what: string, offset: number | undefined): ProtocolError {
  return new ProtocolError('BAD_RECORD', `XBZRLE delta: ${what}`, offset === undefined ? {} : { offset });
}

/**
 * Checks a delta against a page of `pageSize` bytes and returns its runs of new bytes, in page
 * order. `offset` (stream offset of the delta's first byte) only goes into error messages.
 */
export function decodeXbzrle(delta: Uint8Array, pageSize: number = TARGET_PAGE_SIZE, offset?: number): XbzrleRun[] {
  if (delta.length > XBZRLE_MAX_DELTA) throw bad(`${delta.length} bytes (at most ${XBZRLE_MAX_DELTA})`, offset);
  const at = offset ?? 0;
  const where = offset === undefined ? undefined : at;
  const runs: XbzrleRun[] = [];
  let i = 0;
  let d = 0;
  while (i < delta.length) {
    // QEMU wants two bytes left before each count, even a one-byte count: a pair needs both.
    if (delta.length - i < 2) throw bad('ends inside a pair (after its zero run)', where === undefined ? undefined : at + i);
    const [zero, zs] = uleb(delta, i, at);
    if (zero === 0 && i !== 0) throw bad('empty zero run after the first pair', where === undefined ? undefined : at + i);
    i += zs;
    d += zero;
    if (d > pageSize) throw bad(`zero run reaches byte ${d} of a ${pageSize}-byte page`, where === undefined ? undefined : at + i);
    if (delta.length - i < 2) throw bad('ends before a non-zero run', where === undefined ? undefined : at + i);
    const [n, ns] = uleb(delta, i, at);
    if (n === 0) throw bad('empty non-zero run', where === undefined ? undefined : at + i);
    i += ns;
    if (d + n > pageSize) throw bad(`non-zero run of ${n} at page byte ${d} goes past the ${pageSize}-byte page`, where === undefined ? undefined : at + i);
    if (i + n > delta.length) throw bad(`non-zero run of ${n} needs ${i + n - delta.length} bytes more than the delta has`, where === undefined ? undefined : at + i);
    runs.push({ pageOffset: d, deltaOffset: i, length: n });
    d += n;
    i += n;
  }
  return runs;
}

/**
 * Applies a delta onto `page` (the copy the destination holds) in place. Throws, leaving the page
 * untouched, when the delta is malformed; never writes outside `page`.
 */
export function applyXbzrle(delta: Uint8Array, page: Uint8Array, offset?: number): void {
  const runs = decodeXbzrle(delta, page.length, offset);
  for (const r of runs) page.set(delta.subarray(r.deltaOffset, r.deltaOffset + r.length), r.pageOffset);
}

/**
 * The encoder's side, for tests and synthetic sources: the delta that turns `old` into `cur`
 * (pages of equal length), or undefined when it would not fit in XBZRLE_MAX_DELTA bytes (QEMU
 * then sends the page whole). Runs are cut at 2^14 - 1 so every count fits two bytes.
 */
export function encodeXbzrle(old: Uint8Array, cur: Uint8Array): Buffer | undefined {
  if (old.length !== cur.length) throw new RangeError('encodeXbzrle: pages differ in length');
  const MAX_RUN = (1 << 14) - 1;
  const out: number[] = [];
  const put = (v: number) => {
    if (v < 0x80) out.push(v);
    else out.push((v & 0x7f) | 0x80, v >> 7);
  };
  let i = 0;
  let first = true;
  while (i < cur.length) {
    let z = 0;
    while (i + z < cur.length && old[i + z] === cur[i + z] && z < MAX_RUN) z++;
    if (i + z === cur.length) break;
    if (z === 0 && !first) {
      // A run of new bytes cut at MAX_RUN continues here: QEMU forbids an empty zero run after
      // the first pair, so that cannot be expressed; give up (the page goes whole).
      return undefined;
    }
    i += z;
    let n = 0;
    while (i + n < cur.length && old[i + n] !== cur[i + n] && n < MAX_RUN) n++;
    put(z);
    put(n);
    for (let k = 0; k < n; k++) out.push(cur[i + k]!);
    i += n;
    first = false;
    if (out.length > XBZRLE_MAX_DELTA) return undefined;
  }
  return Buffer.from(out);
}
