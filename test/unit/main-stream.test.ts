// The main-stream parser against every captured QEMU 10.0 / 11.1 main stream and file: the facts
// capture.py derived independently (check.json) must come out of our parser, however the bytes
// are chunked.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { MainStreamParser, type MainEvent, type RamBlockInfo } from '../../src/codec/main-stream-parser.js';
import { Command, MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HEADER_SIZE, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { PageBitmap, bitmapBytes, encodeMappedRamHeader, planBlock } from '../../src/codec/mapped-ram.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { encodeBlockEntry, encodeMemSize, encodeSectionFull, encodeStreamHeader } from '../../src/codec/stream-encode.js';
import { findTrailingVmdesc, trailingVmdesc, vmdescCandidates, walkDeviceState } from '../../src/codec/vmdesc.js';
import { BLOB_OFFSET, guestBlob, prng, scenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

/** An event with its views flattened, so events from different chunkings compare with deepEqual. */
type Flat =
  | Exclude<MainEvent, { type: 'ram-page' } | { type: 'device-state' }>
  | { type: 'ram-page'; block: string; offset: number; data: Buffer };

interface Parsed {
  /** Every event but device-state, each with the parser offset right after it. */
  events: { ev: Flat; end: number }[];
  /** All device-state bytes, concatenated. */
  device: Buffer;
  /** Parser offset when device state began (-1 if never). */
  deviceStart: number;
  parser: MainStreamParser;
  /** Bytes the reader seeked over instead of pushing. */
  seeked: number;
}

function flatten(ev: MainEvent): Flat {
  if (ev.type === 'ram-page') return { type: 'ram-page', block: ev.block, offset: ev.offset, data: Buffer.concat(ev.data) };
  return ev as Flat;
}

/**
 * Pushes `data` in the chunk sizes `nextSize` picks, draining events after every push. With
 * `seek`, behaves like a file reader: whenever the parser asks for a skip, it jumps over it.
 */
function parse(data: Buffer, nextSize: (pos: number) => number, opts: { seek?: boolean } = {}): Parsed {
  const parser = new MainStreamParser();
  const out: Parsed = { events: [], device: Buffer.alloc(0), deviceStart: -1, parser, seeked: 0 };
  const device: Buffer[] = [];
  const drain = (): void => {
    for (let guard = 0; ; guard++) {
      assert.ok(guard < 1e6, 'parser keeps returning events without consuming');
      const ev = parser.next();
      if (ev === null) return;
      if (ev.type === 'device-state') {
        if (out.deviceStart < 0) out.deviceStart = parser.offset - ev.data.reduce((n, d) => n + d.length, 0);
        device.push(...ev.data.map((d) => Buffer.from(d)));
      } else {
        out.events.push({ ev: flatten(ev), end: parser.offset });
      }
    }
  };
  let pos = 0;
  while (pos < data.length) {
    if (opts.seek && parser.pendingSkip > 0) {
      const s = parser.pendingSkip;
      assert.ok(pos + s <= data.length, 'skip runs past the end of the file');
      parser.skipped(s);
      pos += s;
      out.seeked += s;
      drain();
      continue;
    }
    const n = Math.max(1, Math.min(nextSize(pos), data.length - pos));
    parser.push(data.subarray(pos, pos + n));
    pos += n;
    drain();
  }
  out.device = Buffer.concat(device);
  return out;
}

const whole = (): number => Number.MAX_SAFE_INTEGER;

/** Byte by byte inside the windows, `big` bytes at a time elsewhere. */
function windows(ws: [number, number][], big = 1 << 16): (pos: number) => number {
  return (pos) => {
    for (const [a, b] of ws) {
      if (pos >= a && pos < b) return 1;
      if (pos < a) return Math.min(big, a - pos);
    }
    return big;
  };
}

function randomSizes(seed: number, max: number): (pos: number) => number {
  const r = prng(seed);
  return () => {
    const x = r();
    // Mostly small chunks, some single bytes, some large ones: boundaries land everywhere.
    if (x < 0.1) return 1;
    if (x < 0.8) return 1 + Math.floor(r() * 64);
    return 1 + Math.floor(r() * max);
  };
}

function rle(seq: string[]): string[] {
  const out: [string, number][] = [];
  for (const s of seq) {
    const last = out[out.length - 1];
    if (last && last[0] === s) last[1]++;
    else out.push([s, 1]);
  }
  return out.map(([s, n]) => (n === 1 ? s : `${s} x${n}`));
}

const COMMAND_NAMES = new Map<number, string>(Object.entries(Command).map(([k, v]) => [v, k]));

function ramSections(p: Parsed): string[] {
  const secs: string[] = [];
  let kind = '';
  let recs: string[] = [];
  for (const { ev } of p.events) {
    switch (ev.type) {
      case 'section':
        if (ev.idstr === 'ram') { kind = ev.kind.toUpperCase(); recs = []; }
        break;
      case 'ram-mem-size': recs.push('MEM_SIZE'); break;
      case 'ram-zero': recs.push('ZERO'); break;
      case 'ram-page': recs.push('PAGE'); break;
      case 'ram-flush': recs.push('FLUSH'); break;
      case 'ram-eos':
        recs.push('EOS');
        secs.push(`${kind}[${rle(recs).join(',')}]`);
        break;
      default: break;
    }
  }
  return rle(secs);
}

function count(p: Parsed, type: Flat['type']): number {
  return p.events.filter((e) => e.ev.type === type).length;
}

function blocksOf(p: Parsed): RamBlockInfo[] {
  return p.events.flatMap(({ ev }) => (ev.type === 'ram-block' ? [ev.block] : []));
}

/** End offset of the event before the first one matching `pred`: where that event starts. */
function startOf(p: Parsed, pred: (ev: Flat) => boolean): number {
  const i = p.events.findIndex((e) => pred(e.ev));
  assert.ok(i > 0, 'event not found');
  return p.events[i - 1]!.end;
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function assertSameParse(got: Parsed, want: Parsed, what: string): void {
  assert.equal(got.events.length, want.events.length, `${what}: event count`);
  for (let i = 0; i < want.events.length; i++) {
    assert.deepEqual(got.events[i], want.events[i], `${what}: event ${i}`);
  }
  assert.equal(got.deviceStart, want.deviceStart, `${what}: device state start`);
  assert.ok(got.device.equals(want.device), `${what}: device state bytes`);
}

const all = scenarios();
const streams = all.filter((s) => s.entry.scenario !== 'mapped-ram-file');

describe('main stream: every socket and stream-file capture', () => {
  for (const s of streams) {
    test(`${s.label}: records, blocks, sections and device state match check.json`, () => {
      const main = s.main();
      const c = s.check.main;
      assert.equal(main.length, c.bytes);
      const p = parse(main, whole);
      const first = p.events[0]!.ev;
      assert.deepEqual(first, { type: 'header', version: 3 });
      const cfg = p.events[1]!.ev;
      assert.equal(cfg.type, 'configuration');
      if (cfg.type !== 'configuration') return;
      assert.equal(cfg.config.machine, s.meta.machine_type);
      assert.equal(cfg.config.machine, c.machine);
      assert.equal(p.events[1]!.end, c.config_end);
      assert.deepEqual(cfg.config.capabilities, c.config_subsections['configuration/capabilities']?.caps ?? []);
      const uuid = c.config_subsections['configuration/uuid']?.uuid;
      assert.equal(cfg.config.uuid?.toString('hex'), uuid);
      if (uuid !== undefined) assert.equal(uuid, s.meta.uuid!.replace(/-/g, ''));
      assert.equal(cfg.config.targetPageBits, undefined, 'never sent on x86');

      const memSize = p.events.find((e) => e.ev.type === 'ram-mem-size')!.ev;
      assert.deepEqual(memSize, { type: 'ram-mem-size', totalBytes: c.mem_size_total });
      assert.deepEqual(blocksOf(p).map((b) => ({ name: b.name, used_length: b.usedLength })), c.ram_blocks);
      assert.deepEqual([...p.parser.ramBlocks.keys()], c.ram_blocks.map((b) => b.name));
      assert.equal(blocksOf(p).reduce((n, b) => n + b.usedLength, 0), c.mem_size_total);

      const counts = c.ram_record_counts;
      assert.equal(count(p, 'ram-flush'), counts.FLUSH);
      assert.equal(count(p, 'ram-eos'), counts.EOS);
      assert.equal(count(p, 'ram-zero'), counts.ZERO);
      assert.equal(count(p, 'ram-page'), counts.PAGE);
      assert.equal(count(p, 'footer'), counts.EOS, 'one footer per RAM section');
      assert.deepEqual(ramSections(p), c.ram_sections);
      for (const { ev } of p.events) {
        if (ev.type === 'section' || ev.type === 'footer') assert.equal(ev.sectionId, c.ram_section_id);
      }

      const cmds = p.events.filter((e) => e.ev.type === 'command').map((e) => e.ev);
      assert.deepEqual(cmds, [{ type: 'command', cmd: Command.SWITCHOVER_START, payload: Buffer.alloc(0) }]);
      assert.equal(startOf(p, (ev) => ev.type === 'command'), c.offsets.cmd_SWITCHOVER_START);
      assert.equal(startOf(p, (ev) => ev.type === 'section' && ev.kind === 'start'), c.offsets.ram_START);
      assert.equal(startOf(p, (ev) => ev.type === 'section' && ev.kind === 'end'), c.offsets.ram_END);
      assert.equal(p.events.find((e) => e.ev.type === 'footer')!.end, c.offsets.ram_START_end);

      // Device state: handed out raw from the first device section to the end of the stream.
      assert.equal(p.deviceStart, c.offsets.first_device);
      assert.equal(p.events[p.events.length - 1]!.end, c.offsets.first_device);
      assert.ok(p.device.equals(main.subarray(c.offsets.first_device)));
      assert.equal(p.parser.offset, main.length);
      assert.ok(p.parser.inDeviceState);
      assert.ok(p.parser.atBoundary);

      const found = findTrailingVmdesc(p.device);
      assert.ok(found, 'trailing VMDESCRIPTION found');
      assert.equal(p.deviceStart + found.vmdescOffset, c.vmdesc_offset);
      assert.equal(p.device.length - found.vmdescOffset - 5, c.vmdesc_length);
      assert.equal(found.vmdesc.devices.length, c.vmdesc_devices);
      assert.equal(found.vmdesc.page_size, c.vmdesc_page_size);
      const layout = walkDeviceState(p.device, found.vmdesc, 0, p.deviceStart);
      assert.equal(layout.sections.length, 30);
      assert.equal(layout.sections.length, c.device_sections);
      assert.equal(layout.end, p.device.length, 'the walk ends exactly at the end of the capture');
      assert.equal(layout.vmdescOffset, found.vmdescOffset);
      assert.equal(p.deviceStart + layout.eofOffset, c.offsets.eof);
      assert.deepEqual(
        layout.sections.map((d) => [d.idstr, d.instanceId, d.versionId, d.sectionId, d.length - (14 + d.idstr.length) - 5]),
        c.devices,
      );
      assert.equal(layout.sections[0]!.idstr, s.entry.qemu === '10.0' ? 'timer' : 'apic');

      const top = p.events.flatMap(({ ev }) => {
        if (ev.type === 'section') return [`${ev.kind.toUpperCase()} ram`];
        if (ev.type === 'command') return [`CMD ${COMMAND_NAMES.get(ev.cmd)}`];
        return [];
      });
      top.push(...layout.sections.map((d) => `${d.type.toUpperCase()} device`), 'EOF', 'VMDESCRIPTION');
      assert.deepEqual(rle(top), c.top_level);
    });
  }

  for (const s of streams.filter((x) => x.entry.scenario === 'precopy-plain' || x.entry.scenario === 'stream-file')) {
    test(`${s.label}: pages on the main channel rebuild RAM, blob at pc.ram+0x100000`, () => {
      const p = parse(s.main(), whole);
      const mem = new Map<string, Buffer>();
      const sent = new Map<string, Uint8Array>();
      for (const b of blocksOf(p)) {
        mem.set(b.name, Buffer.alloc(b.usedLength, 0xee)); // poisoned: every page must be sent
        sent.set(b.name, new Uint8Array(b.usedLength / PAGE));
      }
      for (const { ev } of p.events) {
        if (ev.type === 'ram-page') {
          assert.equal(ev.data.length, PAGE);
          ev.data.copy(mem.get(ev.block)!, ev.offset);
          sent.get(ev.block)![ev.offset / PAGE]!++;
        } else if (ev.type === 'ram-zero') {
          mem.get(ev.block)!.fill(0, ev.offset, ev.offset + PAGE);
          sent.get(ev.block)![ev.offset / PAGE]!++;
        }
      }
      for (const [name, counts] of sent) {
        assert.ok(counts.every((n) => n === 1), `${name}: every page sent exactly once`);
        assert.equal(sha256(mem.get(name)!), s.check.memory!.blocks[name]!.sha256, `${name}: sha256`);
      }
      const ram = mem.get('pc.ram')!;
      const blob = guestBlob();
      assert.ok(ram.subarray(BLOB_OFFSET, BLOB_OFFSET + blob.length).equals(blob), 'blob at 0x100000');
      assert.ok(ram.subarray(0, BLOB_OFFSET).every((b) => b === 0));
      assert.ok(ram.subarray(BLOB_OFFSET + blob.length).every((b) => b === 0));
      assert.equal(count(p, 'ram-page') + count(p, 'ram-zero'), s.check.main.mem_size_total / PAGE);
    });
  }
});

describe('main stream: chunking never changes the events', () => {
  for (const s of streams) {
    test(`${s.label}: byte by byte around the structures, random chunks for the rest`, () => {
      const main = s.main();
      const ref = parse(main, whole);
      const dev = s.check.main.offsets.first_device!;

      // A truncated prefix fed byte by byte gives the same events as the prefix in one piece,
      // and those are the first events of the whole stream.
      const prefix = main.subarray(0, 4096);
      const prefRef = parse(prefix, whole);
      assertSameParse(parse(prefix, () => 1), prefRef, 'prefix byte by byte');
      assert.deepEqual(prefRef.events, ref.events.slice(0, prefRef.events.length));
      assert.ok(ref.events.length === prefRef.events.length || ref.events[prefRef.events.length]!.end > 4096);
      if (prefRef.deviceStart >= 0) assert.ok(ref.device.subarray(0, prefRef.device.length).equals(prefRef.device));

      // Byte by byte into and out of the device state, and over the last 2 KiB.
      const ws: [number, number][] = [[Math.max(0, dev - 2048), Math.min(main.length, dev + 256)]];
      if (main.length - 2048 > ws[0]![1]) ws.push([main.length - 2048, main.length]);
      assertSameParse(parse(main, windows(ws)), ref, 'device-state windows byte by byte');

      for (const seed of [1, 2, 3]) {
        assertSameParse(parse(main, randomSizes(seed * 7919 + main.length, 4096)), ref, `random chunks seed ${seed}`);
      }
    });
  }

  for (const s of streams.filter((x) => x.entry.scenario === 'precopy-plain' || x.entry.scenario === 'multifd-2ch')) {
    test(`${s.label}: every two-piece split of the first 4 KiB`, () => {
      const prefix = s.main().subarray(0, 4096);
      const ref = parse(prefix, whole);
      for (let k = 1; k < prefix.length; k++) {
        let first = true;
        const got = parse(prefix, () => (first ? ((first = false), k) : Number.MAX_SAFE_INTEGER));
        assertSameParse(got, ref, `split at ${k}`);
      }
    });
  }

  test('incremental vmdesc candidate scanning finds the VMDESCRIPTION in any chunking', () => {
    for (const s of streams) {
      const p = parse(s.main(), whole);
      const want = findTrailingVmdesc(p.device)!.vmdescOffset;
      const r = prng(p.device.length);
      const candidates = new Set<number>();
      let scanned = 0;
      let found: number | undefined;
      while (scanned < p.device.length) {
        const to = Math.min(p.device.length, scanned + 1 + Math.floor(r() * 3000));
        const tail = p.device.subarray(0, to);
        for (const c of vmdescCandidates(tail, Math.max(1, scanned - 6))) candidates.add(c);
        const hit = trailingVmdesc(tail, [...candidates]);
        if (hit) {
          assert.equal(to, p.device.length, `${s.label}: no false end of stream at ${to}`);
          found = hit.vmdescOffset;
        }
        scanned = to;
      }
      assert.equal(found, want, s.label);
    }
  });
});

describe('mapped-ram file with x-ignore-shared (QEMU 11 layout)', () => {
  /** Stream header to the last block entry: a shared block (offsets 0, nothing else) then one with its regions. */
  function file(caps: string[]): { data: Buffer; resumeAt: number; sharedEnd: number } {
    const head = Buffer.concat([encodeStreamHeader(), encodeConfiguration({ machine: 'pc-test', capabilities: caps }), encodeSectionFull(SectionType.START, 1, 'ram', 0, 4), encodeMemSize(64 * PAGE + 2 * PAGE)]);
    const mr = (a: number) => (caps.includes('x-ignore-shared') ? { mrAddr: a } : {});
    const shared = Buffer.concat([encodeBlockEntry('mem', 64 * PAGE, mr(0)), encodeMappedRamHeader({ version: 1, pageSize: PAGE, bitmapOffset: 0, pagesOffset: 0 })]);
    const entry = encodeBlockEntry('rom', 2 * PAGE, mr(0x100000));
    const plan = planBlock(head.length + shared.length + entry.length, 2 * PAGE);
    const data = Buffer.alloc(plan.end);
    Buffer.concat([head, shared, entry, encodeMappedRamHeader(plan)]).copy(data);
    return { data, resumeAt: plan.end, sharedEnd: head.length + shared.length };
  }

  test('the shared block is marked, has no region, and the next entry follows its header', () => {
    const { data, resumeAt, sharedEnd } = file(['x-ignore-shared', 'mapped-ram']);
    for (const seek of [true, false]) {
      const p = parse(data, () => 7, { seek });
      const blocks = p.events.filter((e) => e.ev.type === 'ram-block');
      assert.deepEqual(blocks.map((e) => e.ev.type === 'ram-block' && [e.ev.block.name, e.ev.block.mrAddr, e.ev.block.shared]), [['mem', 0, true], ['rom', 0x100000, undefined]]);
      assert.equal(blocks[0]!.end, sharedEnd, 'nothing skipped after the shared block');
      assert.equal(p.parser.offset, resumeAt, 'the rom block\'s region skipped as usual');
    }
  });

  test('offsets 0 without x-ignore-shared: BAD_MAPPED_RAM at the entry', () => {
    const { data } = file(['mapped-ram']);
    const parser = new MainStreamParser();
    parser.push(data);
    assert.throws(() => { while (parser.next() !== null); }, (e: Error & { code?: string }) => e.code === 'BAD_MAPPED_RAM' && /block "mem" has no bitmap and no pages region/.test(e.message));
  });
});

describe('mapped-ram file', () => {
  for (const s of all.filter((x) => x.entry.scenario === 'mapped-ram-file')) {
    test(`${s.label}: blocks carry their mapped-ram headers and a reader can seek over pages`, () => {
      const file = s.main();
      const c = s.check.main;
      assert.equal(file.length, c.bytes);
      const seeking = parse(file, () => 65536, { seek: true });
      const pushed = parse(file, whole);
      assertSameParse(seeking, pushed, 'seeking reader vs. pushing everything');

      const cfg = seeking.events[1]!.ev;
      assert.ok(cfg.type === 'configuration');
      assert.deepEqual(cfg.config.capabilities, ['mapped-ram']);
      assert.equal(cfg.config.machine, s.meta.machine_type);
      assert.deepEqual(seeking.events.filter((e) => e.ev.type === 'command').map((e) => e.ev), [{ type: 'command', cmd: Command.SWITCHOVER_START, payload: Buffer.alloc(0) }]);
      assert.equal(startOf(seeking, (ev) => ev.type === 'command'), c.offsets.cmd_SWITCHOVER_START);
      assert.equal(startOf(seeking, (ev) => ev.type === 'section' && ev.kind === 'end'), c.offsets.ram_END);
      const blocks = blocksOf(seeking);
      assert.equal(blocks.length, c.ram_blocks.length);
      let regions = 0;
      for (const [i, b] of blocks.entries()) {
        const want = c.ram_blocks[i]!;
        assert.equal(b.name, want.name);
        assert.equal(b.usedLength, want.used_length);
        const h = b.mappedRam!;
        assert.ok(h, `${b.name}: mapped-ram header`);
        const mr = want.mapped_ram!;
        assert.deepEqual(h, { version: mr.version, pageSize: mr.page_size, bitmapOffset: mr.bitmap_offset, pagesOffset: mr.pages_offset });
        assert.equal(h.version, 1);
        assert.equal(h.pageSize, PAGE);
        assert.equal(h.bitmapOffset, mr.header_offset + MAPPED_RAM_HEADER_SIZE, 'bitmap right after the header');
        assert.equal(h.pagesOffset % MAPPED_RAM_FILE_OFFSET_ALIGNMENT, 0, 'pages region 1 MiB aligned');
        assert.ok(h.pagesOffset >= h.bitmapOffset + bitmapBytes(b.usedLength));
        assert.equal(bitmapBytes(b.usedLength), mr.bitmap_bytes);
        // The stream resumes at pages_offset + used_length: the event ends right after the header.
        const ev = seeking.events.find((e) => e.ev.type === 'ram-block' && e.ev.block.name === b.name)!;
        assert.equal(ev.end, mr.header_offset + MAPPED_RAM_HEADER_SIZE);
        regions += h.pagesOffset + b.usedLength - ev.end;

        const bitmap = new PageBitmap(b.usedLength / PAGE, file.subarray(h.bitmapOffset, h.bitmapOffset + bitmapBytes(b.usedLength)));
        assert.equal(bitmap.count(), mr.bits_set, `${b.name}: bits set`);
        assert.equal(bitmap.count(), s.check.memory!.blocks[b.name]!.nonzero_pages);
        // Set bits are exactly the non-zero pages of the pages region.
        for (let k = 0; k < bitmap.pages; k++) {
          const pg = file.subarray(h.pagesOffset + k * PAGE, h.pagesOffset + (k + 1) * PAGE);
          assert.equal(bitmap.test(k), pg.some((x) => x !== 0), `${b.name}: page ${k}`);
        }
      }
      // Bytes of a region already pushed with a chunk are skipped by the parser itself.
      assert.ok(seeking.seeked <= regions && seeking.seeked > regions - blocks.length * 65536, 'the reader seeked over the regions, nothing else');

      // pc.ram's bitmap is exactly the blob's pages, and those pages hold the blob.
      const ram = blocks.find((b) => b.name === 'pc.ram')!;
      const h = ram.mappedRam!;
      const bitmap = new PageBitmap(ram.usedLength / PAGE, file.subarray(h.bitmapOffset, h.bitmapOffset + bitmapBytes(ram.usedLength)));
      const blob = guestBlob();
      const blobPages = blob.length / PAGE;
      const nonZeroBlobPages = Array.from({ length: blobPages }, (_, i) => i).filter((i) => blob.subarray(i * PAGE, (i + 1) * PAGE).some((x) => x !== 0));
      assert.deepEqual([...bitmap.runs()], [[BLOB_OFFSET / PAGE, blobPages]]);
      assert.deepEqual(nonZeroBlobPages.map((i) => i + BLOB_OFFSET / PAGE), Array.from({ length: bitmap.count() }, (_, i) => BLOB_OFFSET / PAGE + i));
      const at = h.pagesOffset + BLOB_OFFSET;
      assert.ok(file.subarray(at, at + blob.length).equals(blob));

      assert.equal(count(seeking, 'ram-eos'), c.ram_record_counts.EOS);
      assert.equal(count(seeking, 'ram-flush'), 0);
      assert.equal(count(seeking, 'ram-page') + count(seeking, 'ram-zero'), 0);
      assert.deepEqual(ramSections(seeking), c.ram_sections);
      assert.equal(seeking.deviceStart, c.offsets.first_device);
      assert.equal(seeking.parser.offset, file.length, 'offset counts the bytes seeked over');
      const found = findTrailingVmdesc(seeking.device)!;
      assert.equal(seeking.deviceStart + found.vmdescOffset, c.vmdesc_offset);
      const layout = walkDeviceState(seeking.device, found.vmdesc, 0, seeking.deviceStart);
      assert.equal(layout.sections.length, 30);
      assert.equal(layout.end, seeking.device.length);
    });

    test(`${s.label}: byte by byte over every block header and the region edges`, () => {
      const file = s.main();
      const ref = parse(file, whole);
      const ws: [number, number][] = [[0, 4096]];
      for (const b of s.check.main.ram_blocks.slice(1)) {
        // From 64 bytes before the previous pages region ends, over this block's name and header.
        const name = b.mapped_ram!.header_offset - 1 - b.name.length - 8;
        ws.push([name - 64, b.mapped_ram!.bitmap_offset + 64]);
      }
      const dev = s.check.main.offsets.first_device!;
      ws.push([dev - 2048, dev + 256]);
      assertSameParse(parse(file, windows(ws)), ref, 'windows byte by byte');
      assertSameParse(parse(file, windows(ws), { seek: true }), ref, 'windows byte by byte, seeking');
      assertSameParse(parse(file, randomSizes(42, 1 << 20), { seek: true }), ref, 'random chunks, seeking');
    });
  }
});
