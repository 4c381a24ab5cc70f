// XBZRLE deltas (src/codec/xbzrle.ts) and the extended captures' main streams (background
// snapshot, XBZRLE records, dirty-bitmap sections, hugepage block lists) through MainStreamParser.

import { TARGET_PAGE_SIZE } from '../../../src/codec/constants.js';
import { ProtocolError } from '../../../src/codec/errors.js';
import { MainStreamParser } from '../../../src/codec/main-stream-parser.js';
import { applyXbzrle, encodeXbzrle } from '../../../src/codec/xbzrle.js';
import { streamScenarios } from '../../helpers/fixtures.js';
import { unique } from '../seeds.js';
import { check, type Seed, type Target } from '../target.js';
import { isProtocolError, protocolSignature, runBoth } from './stream.js';

const PAGE = TARGET_PAGE_SIZE;

/**
 * A second decoder written straight from QEMU's description (xbzrle.c: it writes as it goes and
 * returns -1 on the first error): the two must agree on every input.
 */
function reference(src: Uint8Array, dst: Uint8Array): boolean {
  const uleb = (i: number): [number, number] | undefined => {
    if (!(src[i]! & 0x80)) return [src[i]!, 1];
    if (src[i + 1]! & 0x80) return undefined;
    return [(src[i]! & 0x7f) | (src[i + 1]! << 7), 2];
  };
  if (src.length > PAGE) return false;
  let i = 0;
  let d = 0;
  while (i < src.length) {
    if (src.length - i < 2) return false;
    const z = uleb(i);
    if (!z || (i && !z[0])) return false;
    i += z[1];
    d += z[0];
    if (d > dst.length) return false;
    if (src.length - i < 2) return false;
    const n = uleb(i);
    if (!n || !n[0]) return false;
    i += n[1];
    if (d + n[0] > dst.length || i + n[0] > src.length) return false;
    dst.set(src.subarray(i, i + n[0]), d);
    d += n[0];
    i += n[0];
  }
  return true;
}

/** Deltas QEMU sent in the xbzrle captures (first ones of each), and a few made here. */
function deltaSeeds(): Seed[] {
  const out: Seed[] = [];
  for (const s of streamScenarios((e) => e.scenario === 'xbzrle')) {
    const p = new MainStreamParser();
    p.push(s.main());
    let n = 0;
    for (let ev = p.next(); ev !== null && n < 4; ev = p.next()) {
      if (ev.type === 'ram-xbzrle') out.push({ name: `${s.label} delta ${n++}`, data: ev.delta });
    }
  }
  const old = Buffer.alloc(PAGE);
  const cur = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 97) cur[i] = i & 0xff;
  out.push({ name: 'scattered', data: encodeXbzrle(old, cur)! });
  cur.fill(0x5a, 1000, 1300);
  out.push({ name: 'long run', data: encodeXbzrle(old, cur)! });
  return out;
}

export const xbzrleTarget: Target = {
  name: 'xbzrle',
  what: 'applyXbzrle onto a 4 KiB page between guard bytes: never writes outside the page, leaves it untouched on error, agrees with a reference decoder written from xbzrle.c',
  seeds: deltaSeeds,
  run(input) {
    const base = Buffer.alloc(PAGE);
    for (let i = 0; i < PAGE; i++) base[i] = (i * 7) & 0xff;
    const area = Buffer.alloc(PAGE + 128, 0xcc);
    base.copy(area, 64);
    const page = area.subarray(64, 64 + PAGE);
    const ref = Buffer.from(base);
    const refOk = reference(input, ref);
    let ok = true;
    try {
      applyXbzrle(input, page);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      ok = false;
      check(page.equals(base), 'a rejected delta changed the page');
    }
    check(area.subarray(0, 64).every((b) => b === 0xcc) && area.subarray(64 + PAGE).every((b) => b === 0xcc), 'wrote outside the page');
    check(ok === refOk, `decoder says ${ok ? 'valid' : 'invalid'}, the reference ${refOk ? 'valid' : 'invalid'}`);
    if (ok) check(page.equals(ref), 'decoder and reference produce different pages');
    if (!ok) throw new ProtocolError('BAD_RECORD', 'XBZRLE delta rejected');
    return `ok ${Math.min(input.length, 64) >> 4}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 2 * PAGE,
};

/**
 * The extended captures cut to the parts that hold what is new: the head (configuration, the
 * block list with its page sizes, commands) and a window around the first XBZRLE record or the
 * first dirty-bitmap chunks, behind the same head.
 */
function extendedSeeds(): Seed[] {
  const out: Seed[] = [];
  for (const s of streamScenarios()) {
    const main = s.main();
    const p = new MainStreamParser();
    p.push(main);
    let headEnd = 0;
    let windowAt = -1;
    let sectionAt = 0;
    for (let ev = p.next(); ev !== null; ev = p.next()) {
      if (ev.type === 'footer' && headEnd === 0) headEnd = p.offset;
      if (ev.type === 'section') sectionAt = p.offset - 5;
      if (windowAt < 0 && (ev.type === 'ram-xbzrle' || (ev.type === 'iterable-data' && ev.data.length > 1))) windowAt = sectionAt;
      if (ev.type === 'device-state') break;
    }
    const head = main.subarray(0, headEnd);
    const body = windowAt > 0 ? main.subarray(windowAt, windowAt + 48 * 1024) : main.subarray(headEnd, headEnd + 16 * 1024);
    out.push({ name: s.label, data: Buffer.concat([head, body]) });
  }
  return unique(out);
}

export const extendedStreamTarget: Target = {
  name: 'extended-streams',
  what: 'MainStreamParser over the background-snapshot, xbzrle, dirty-bitmaps, switchover-ack and postcopy-hugepages captures (XBZRLE records, dirty-bitmap chunks, block page sizes), whole and re-chunked: same events, pages inside their blocks',
  seeds: extendedSeeds,
  run: (input, rng) => runBoth(input, rng),
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 1 << 20,
};
