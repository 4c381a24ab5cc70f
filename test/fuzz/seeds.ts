// Seeds from the real QEMU 10.0 / 11.1 captures in test/fixtures, with the byte ranges where
// their structure lives (record headers, lengths, flags; not page data or JSON text), found by
// parsing them. The mapped-ram captures are 23 MB files, almost all of it the pages of a 16 MiB
// guest; a compact copy with every block cut to a few pages (headers, bitmaps and the rest of
// the stream as QEMU wrote them, regions repacked) keeps each input small.

import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
import { encodeMainEvent } from '../../src/codec/main-event-encode.js';
import { MultifdChannelParser } from '../../src/codec/multifd-channel-parser.js';
import { MAPPED_RAM_HEADER_SIZE, MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE, RamFlag, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { alignUp, bitmapBytes, encodeMappedRamHeader } from '../../src/codec/mapped-ram.js';
import { scenarios, type Scenario } from '../helpers/fixtures.js';
import type { Mutator, Range } from './mutators.js';
import { sha256hex } from './rng.js';
import type { Seed } from './target.js';

const PAGE = TARGET_PAGE_SIZE;

/**
 * A main stream cut down for fuzzing: only the page records (data, zero, XBZRLE) of every
 * `stride`-th page kept, everything else as QEMU sent it. A 22 MB stream file becomes a few
 * hundred KB that still holds every kind of record, deltas onto pages sent before included; a
 * whole one takes seconds per input to open, scan and convert, which the hang watchdog (4 s)
 * calls a hang under load once a mutation no longer stops it early. CONTINUE is set anew (a dropped record may have named the block), and never across a
 * section: naming the block is always valid.
 */
export function compactStream(data: Buffer, stride = 64): Buffer {
  const p = new MainStreamParser();
  p.push(data);
  const out: Buffer[] = [];
  let last: string | undefined;
  for (let ev = p.next(); ev !== null; ev = p.next()) {
    if (ev.type === 'ram-page' || ev.type === 'ram-zero' || ev.type === 'ram-xbzrle') {
      if (Math.floor(ev.offset / PAGE) % stride !== 0) continue;
      out.push(...encodeMainEvent({ ...ev, continued: ev.block === last }));
      last = ev.block;
      continue;
    }
    if (ev.type === 'section' || ev.type === 'footer') last = undefined;
    out.push(...encodeMainEvent(ev));
  }
  if (!p.atBoundary) throw new Error('compactStream: the stream does not end between records');
  return Buffer.concat(out);
}

let all: Scenario[] | undefined;
export function captures(): Scenario[] {
  all ??= scenarios();
  return all;
}

/** Keeps the first seed of each distinct content. */
export function unique(seeds: Seed[]): Seed[] {
  const seen = new Set<string>();
  return seeds.filter((s) => {
    const h = sha256hex(s.data);
    if (seen.has(h)) return false;
    seen.add(h);
    return true;
  });
}

export function mergeRanges(r: Range[]): Range[] {
  const s = [...r].filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of s) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

/** The RAM blocks of the captures (identical in every capture of both versions). */
export function captureBlocks(): Map<string, { name: string; usedLength: number }> {
  const s = captures()[0]!;
  return new Map(s.check.main.ram_blocks.map((b) => [b.name, { name: b.name, usedLength: b.used_length }]));
}

/**
 * Byte ranges of a main stream's records (everything but page data), the first bytes of the
 * device state, and the configuration; found by running the parser over it.
 */
export function mainStructure(b: Buffer, deviceBytes = 256): Range[] {
  const p = new MainStreamParser();
  p.push(b);
  const ranges: Range[] = [];
  let at = 0;
  try {
    for (let ev: MainEvent | null = p.next(); ev !== null; ev = p.next()) {
      const end = p.offset;
      if (ev.type === 'ram-page') ranges.push([at, end - PAGE]);
      else if (ev.type === 'device-state') {
        ranges.push([at, Math.min(end, at + deviceBytes)]);
        break;
      } else if (ev.type === 'ram-block' && ev.block.mappedRam) {
        // Entry, header and bitmap; not the pages region.
        const h = ev.block.mappedRam;
        ranges.push([at, Math.min(end, h.bitmapOffset + bitmapBytes(ev.block.usedLength))]);
      } else ranges.push([at, end]);
      at = p.offset;
    }
  } catch {
    // A seed that does not parse to the end still has the ranges up to there.
  }
  return mergeRanges(ranges);
}

/** A mapped-ram file with every block cut to at most `keep` bytes, regions packed page-aligned. */
export function compactMappedRam(s: Scenario, keep = 8 * PAGE): Buffer {
  const orig = s.main();
  const m = s.check.main;
  const memSizeAt = m.offsets.ram_START! + 1 + 4 + 1 + 3 + 4 + 4;
  if (Number(orig.readBigUInt64BE(memSizeAt) & 0xfffn) !== RamFlag.MEM_SIZE) throw new Error(`${s.label}: no MEM_SIZE at ${memSizeAt}`);
  const sizes = m.ram_blocks.map((b) => Math.min(b.used_length, keep));
  const parts: Buffer[] = [orig.subarray(0, memSizeAt)];
  let len = memSizeAt;
  const push = (b: Buffer): void => {
    parts.push(b);
    len += b.length;
  };
  const mem = Buffer.alloc(8);
  mem.writeBigUInt64BE(BigInt(sizes.reduce((n, x) => n + x, 0)) | BigInt(RamFlag.MEM_SIZE));
  push(mem);
  let pos = memSizeAt + 8;
  m.ram_blocks.forEach((b, i) => {
    const mr = b.mapped_ram!;
    const nameLen = Buffer.byteLength(b.name, 'latin1');
    const entry = mr.header_offset - 8 - 1 - nameLen;
    if (entry !== pos) throw new Error(`${s.label}: block ${b.name} entry at ${entry}, expected ${pos}`);
    const used = sizes[i]!;
    push(orig.subarray(entry, entry + 1 + nameLen));
    const u = Buffer.alloc(8);
    u.writeBigUInt64BE(BigInt(used));
    push(u);
    const bitmapOffset = len + MAPPED_RAM_HEADER_SIZE;
    const bm = bitmapBytes(used);
    const pagesOffset = alignUp(bitmapOffset + bm, PAGE);
    push(encodeMappedRamHeader({ version: mr.version, pageSize: mr.page_size, bitmapOffset, pagesOffset }));
    const bitmap = Buffer.from(orig.subarray(mr.bitmap_offset, mr.bitmap_offset + bm));
    for (let p = used / PAGE; p < bm * 8; p++) bitmap[p >>> 3]! &= ~(1 << (p & 7));
    push(bitmap);
    push(Buffer.alloc(pagesOffset - len));
    push(orig.subarray(mr.pages_offset, mr.pages_offset + used));
    pos = mr.pages_offset + b.used_length;
  });
  push(orig.subarray(pos));
  return Buffer.concat(parts);
}

/** The main stream of every capture (mapped-ram ones compacted). */
export function mainStreams(): { s: Scenario; data: Buffer }[] {
  return captures().map((s) => ({ s, data: s.entry.scenario === 'mapped-ram-file' ? compactMappedRam(s) : s.main() }));
}

/** Offset of the first device section in a main stream (compacted ones included). */
export function firstDevice(data: Buffer): number {
  const p = new MainStreamParser();
  p.push(data);
  for (let ev = p.next(); ev !== null; ev = p.next()) {
    if (ev.type === 'device-state') return p.offset - ev.data.reduce((n, d) => n + d.length, 0);
  }
  throw new Error('no device state');
}

/** Every multifd channel capture, with its packets' header ranges as focus. */
export function channelSeeds(filter: (s: Scenario) => boolean = () => true): Seed[] {
  const out: Seed[] = [];
  for (const s of captures().filter(filter)) {
    for (const { file } of s.channelFiles) {
      const data = capChannel(s.file(file));
      out.push({ name: `${s.label}/${file}`, data, focus: channelStructure(data) });
    }
  }
  return out;
}

/**
 * A channel parser expecting `flags`, or any method for undefined (the constructor's parameter has
 * a default, so `new MultifdChannelParser(undefined)` would expect none).
 */
export function channelParser(flags: number | undefined): MultifdChannelParser {
  const p = new MultifdChannelParser();
  p.setExpectedCompression(flags);
  return p;
}

/**
 * A channel cut to its packets within the first `max` bytes plus its closing packets (the last two
 * SYNCs), so that no seed is much larger than the rest: zero-page-detection=none channels carry
 * megabytes of zero pages.
 */
export function capChannel(b: Buffer, max = 1 << 20): Buffer {
  if (b.length <= max) return b;
  const p = channelParser(undefined);
  p.push(b);
  let at = 0;
  const ends: number[] = [];
  for (let ev = p.next(); ev !== null; ev = p.next()) {
    at += ev.type === 'init' ? MULTIFD_INIT_SIZE : ev.wireBytes;
    ends.push(at);
  }
  const keep = ends.filter((e) => e <= max - 2 * MULTIFD_PACKET_HEADER_SIZE).pop() ?? MULTIFD_INIT_SIZE;
  return Buffer.concat([b.subarray(0, keep), b.subarray(b.length - 2 * MULTIFD_PACKET_HEADER_SIZE)]);
}

/** Init message, and per packet its fixed fields, block name and used offsets. */
export function channelStructure(b: Buffer): Range[] {
  const p = channelParser(undefined);
  p.push(b);
  const r: Range[] = [[0, MULTIFD_INIT_SIZE]];
  let at = MULTIFD_INIT_SIZE;
  try {
    for (let ev = p.next(); ev !== null; ev = p.next()) {
      if (ev.type !== 'packet') continue;
      const h = ev.header;
      r.push([at, at + 64 + 16], [at + 320, at + 320 + 8 * (h.normalPages + h.zeroPages + 1)]);
      // The first bytes of a compressed payload hold the stream's framing.
      if (h.normalPages > 0) r.push([at + MULTIFD_PACKET_HEADER_SIZE, at + MULTIFD_PACKET_HEADER_SIZE + 16]);
      at += ev.wireBytes;
    }
  } catch {
    // keep what we have
  }
  return mergeRanges(r);
}

/** Tokens of the main stream and channel formats. */
export function formatDictionary(): Buffer[] {
  const hex = (h: string): Buffer => Buffer.from(h, 'hex');
  const counted = (s: string): Buffer => Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]);
  return [
    hex('5145564d00000003'), // QEVM 3
    hex('11223344'), hex('1122334400000001'),
    hex('7e00000001'), hex('7e00000000'), hex('00'), hex('06'),
    hex('0800000000'), hex('080002000400000001'), hex('08000b0000'), // commands
    hex('0200000001'), hex('0300000001'), hex('0100000001'),
    hex('0000000000000010'), hex('0000000000000200'), hex('0000000000000004'), hex('0000000000000022'), hex('0000000000000028'),
    counted('pc.ram'), counted('ram'), counted('pc.bios'), counted('/rom@etc/acpi/tables'), counted('timer'), counted('apic'),
    counted('configuration/capabilities'), counted('configuration/uuid'), counted('configuration/target-page-bits'), counted('mapped-ram'), counted('x-ignore-shared'),
    hex('0500000001'), hex('05'), Buffer.from('pc-i440fx-10.0'),
    hex('00000001000000000000100000000000000000000000000000100000'), // mapped-ram header
    // A VMDESCRIPTION that describes no device, as a token inside device state; a bare header.
    Buffer.concat([hex('00060000000f'), Buffer.from('{"devices": []}')]),
    hex('00060000000a7b7d'),
  ];
}

/**
 * Resizes one RAM block of a main stream and keeps the MEM_SIZE total consistent with the list,
 * so the size is believed past the first check: two fields at once, which byte mutations rarely
 * get right together. Sizes are page multiples up to 2^52 (a 440 KB file claiming a 1 TiB block).
 */
export const BLOCK_SIZE_MUTATOR: Mutator = {
  name: 'block-size',
  weight: 4,
  apply(b, ctx) {
    const p = new MainStreamParser();
    p.push(b);
    let memAt = -1;
    const blocks: { at: number; used: bigint }[] = [];
    try {
      for (let ev = p.next(); ev !== null; ev = p.next()) {
        if (ev.type === 'ram-mem-size') memAt = p.offset - 8;
        else if (ev.type === 'ram-block') {
          const tail = 8 + (ev.block.mrAddr !== undefined ? 8 : 0) + (ev.block.mappedRam ? MAPPED_RAM_HEADER_SIZE : 0);
          blocks.push({ at: p.offset - tail, used: BigInt(ev.block.usedLength) });
        } else if (blocks.length > 0) break;
      }
    } catch {
      // a mutated list: resize what was found
    }
    if (memAt < 0 || blocks.length === 0) return Buffer.from(b);
    const out = Buffer.from(b);
    const blk = ctx.rng.pick(blocks);
    const used = ctx.rng.pick([0n, 0x1000n, 0x100000n, 1n << 30n, 1n << 34n, 1n << 36n, 1n << 40n, 1n << 44n, 1n << 48n, 1n << 52n, blk.used * 2n, blk.used + 0x1000n, blk.used - 0x1000n]);
    if (used < 0n) return out;
    out.writeBigUInt64BE(used, blk.at);
    const total = blocks.reduce((n, x) => n + x.used, 0n) - blk.used + used;
    out.writeBigUInt64BE(BigInt.asUintN(64, (total & ~0xfffn) | BigInt(RamFlag.MEM_SIZE)), memAt);
    return out;
  },
};
