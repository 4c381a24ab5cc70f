// Property tests: encoders and decoders agree, the parsers survive any input (events or a
// ProtocolError, bounded work and memory), page coalescing preserves pages and bytes, and the sync
// barrier releases a round only when everybody is there. Bounded to a few seconds in total.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from '../../src/codec/byte-queue.js';
import { encodeConfiguration, readConfiguration, withCapability, type Configuration } from '../../src/codec/configuration.js';
import { MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HEADER_SIZE, MULTIFD_MAGIC, MULTIFD_PACKET_HEADER_SIZE, MultifdFlag, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
import { PageBitmap, bitmapBytes, decodeMappedRamHeader, encodeMappedRamHeader, planBlock } from '../../src/codec/mapped-ram.js';
import { MultifdChannelParser, type ChannelEvent } from '../../src/codec/multifd-channel-parser.js';
import { decodeMultifdInit, encodeMultifdInit } from '../../src/codec/multifd-init.js';
import { decodeMultifdPacketHeader, encodeMultifdPacketHeader, payloadSize } from '../../src/codec/multifd-packet.js';
import { findTrailingVmdesc, parseVmdesc, walkDeviceState, type Vmdesc } from '../../src/codec/vmdesc.js';
import { coalescePages, sliceViews } from '../../src/engine/coalesce.js';
import { SyncBarrier } from '../../src/engine/sync-barrier.js';
import { findScenario } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;
const latin1Char = fc.integer({ min: 1, max: 255 }).map((c) => String.fromCharCode(c));
const latin1 = (maxLength: number): fc.Arbitrary<string> => fc.string({ unit: latin1Char, maxLength });
/** MULTIFD_FUZZ_SCALE=50 (say) runs every property 50 times longer, for a deeper search by hand. */
const SCALE = Math.max(1, Number(process.env.MULTIFD_FUZZ_SCALE ?? 1) || 1);
const runs = (n: number): { numRuns: number } => ({ numRuns: Math.round(n * SCALE) });
const RUNS = runs(300);

describe('round trips', () => {
  test('multifd init', () => {
    fc.assert(fc.property(fc.integer({ min: 0, max: 255 }), fc.uint8Array({ minLength: 16, maxLength: 16 }), (id, u) => {
      const uuid = Buffer.from(u);
      const b = encodeMultifdInit(id, uuid);
      assert.equal(b.length, 64);
      assert.ok(b.subarray(25).every((x) => x === 0), 'reserved bytes zero');
      assert.deepEqual(decodeMultifdInit(b), { magic: MULTIFD_MAGIC, version: 1, uuid, id });
    }), RUNS);
  });

  const compression = fc.constantFrom(MultifdFlag.NOCOMP, MultifdFlag.ZLIB, MultifdFlag.ZSTD, MultifdFlag.QPL, MultifdFlag.UADK, MultifdFlag.QATZIP);
  const header = fc
    .record({
      comp: compression,
      sync: fc.boolean(),
      pagesAlloc: fc.integer({ min: 0, max: 128 }),
      normalFrac: fc.double({ min: 0, max: 1, noNaN: true }),
      zeroFrac: fc.double({ min: 0, max: 1, noNaN: true }),
      size: fc.integer({ min: 0, max: 1 << 20 }),
      packetNum: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      ramblock: latin1(255),
      offsets: fc.array(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), { minLength: 128, maxLength: 128 }),
    })
    .map((r) => {
      const normalPages = Math.floor(r.normalFrac * r.pagesAlloc);
      const zeroPages = Math.floor(r.zeroFrac * (r.pagesAlloc - normalPages));
      // Compressed packets without normal pages must announce an empty payload.
      const nextPacketSize = r.comp === MultifdFlag.NOCOMP ? normalPages * PAGE : normalPages === 0 ? 0 : r.size;
      return {
        flags: r.comp | (r.sync ? MultifdFlag.SYNC : 0),
        pagesAlloc: r.pagesAlloc,
        normalPages,
        zeroPages,
        nextPacketSize,
        packetNum: r.packetNum,
        ramblock: r.ramblock,
        offsets: r.offsets.slice(0, normalPages + zeroPages),
      };
    });

  test('multifd packet offsets: every 64-bit value decodes exactly, or as MAX_SAFE_INTEGER from 2^53 on', () => {
    const edges = [0n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 64n - 1n];
    const offset = fc.oneof(fc.constantFrom(...edges), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), fc.bigInt({ min: 0n, max: 2n ** 53n }));
    fc.assert(fc.property(offset, (v) => {
      const b = encodeMultifdPacketHeader({ flags: MultifdFlag.NOCOMP, pagesAlloc: 128, normalPages: 0, zeroPages: 1, nextPacketSize: 0, packetNum: 1n, ramblock: 'pc.ram', offsets: [0] });
      b.writeBigUInt64BE(v, 320);
      const want = v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
      assert.equal(decodeMultifdPacketHeader(b, MultifdFlag.NOCOMP).offsets[0], want);
    }), { numRuns: 2000 });
  });

  test('multifd packet header (fresh and reused buffers)', () => {
    const reused = Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE, 0xaa);
    fc.assert(fc.property(header, (o) => {
      const b = encodeMultifdPacketHeader(o);
      assert.equal(b.length, MULTIFD_PACKET_HEADER_SIZE);
      assert.ok(encodeMultifdPacketHeader(o, reused).equals(b), 'a reused buffer leaves nothing behind');
      const h = decodeMultifdPacketHeader(b, o.flags & MultifdFlag.COMPRESSION_MASK);
      assert.deepEqual({ ...h, offsets: [...h.offsets] }, o);
      assert.equal(payloadSize(h), (o.flags & MultifdFlag.COMPRESSION_MASK) === 0 ? o.normalPages * PAGE : o.nextPacketSize);
    }), RUNS);
  });

  const config: fc.Arbitrary<Configuration> = fc
    .record({
      machine: latin1(256),
      capabilities: fc.array(latin1(255), { maxLength: 64 }),
      uuid: fc.option(fc.uint8Array({ minLength: 16, maxLength: 16 }), { nil: undefined }),
      targetPageBits: fc.option(fc.integer({ min: 0, max: 0xffffffff }), { nil: undefined }),
    })
    .map((r) => {
      const c: Configuration = { machine: r.machine, capabilities: r.capabilities };
      if (r.uuid) c.uuid = Buffer.from(r.uuid);
      if (r.targetPageBits !== undefined) c.targetPageBits = r.targetPageBits;
      return c;
    });

  test('configuration record', () => {
    fc.assert(fc.property(config, fc.constantFrom(0x00, 0x01, 0x04, 0x08), (c, next) => {
      const enc = encodeConfiguration(c);
      // The end of the record is found by peeking at the next byte, so one must follow.
      const q = new ByteQueue();
      q.push(Buffer.concat([enc, Buffer.from([next])]));
      const cur = q.cursor();
      assert.deepEqual(readConfiguration(cur), c);
      assert.equal(cur.pos, enc.length);
    }), RUNS);
  });

  test('withCapability keeps QAPI order and set semantics', () => {
    const cap = fc.constantFrom('x-ignore-shared', 'mapped-ram') as fc.Arbitrary<'x-ignore-shared' | 'mapped-ram'>;
    fc.assert(fc.property(config, cap, fc.boolean(), (c, name, on) => {
      const r = withCapability(c, name, on);
      assert.equal(r.capabilities.includes(name), on);
      assert.equal(new Set(r.capabilities).size, r.capabilities.length);
      for (const x of c.capabilities) if (x !== name) assert.ok(r.capabilities.includes(x));
      const known = r.capabilities.filter((x) => x === 'x-ignore-shared' || x === 'mapped-ram');
      assert.deepEqual(known, ['x-ignore-shared', 'mapped-ram'].filter((x) => (known as string[]).includes(x)));
    }), RUNS);
  });

  test('mapped-ram header, block plan and bitmap', () => {
    const max = Math.floor(Number.MAX_SAFE_INTEGER / 2);
    fc.assert(fc.property(
      fc.integer({ min: 0, max }),
      fc.integer({ min: 0, max: Math.floor(max / PAGE) }),
      fc.integer({ min: 0, max: 1 << 40 }),
      fc.integer({ min: 0, max: 1 << 30 }).map((n) => n * PAGE),
      (bitmapOffset, pagesPage, headerOffset, usedLength) => {
        const h = { version: 1, pageSize: PAGE, bitmapOffset, pagesOffset: pagesPage * PAGE };
        const b = encodeMappedRamHeader(h);
        assert.equal(b.length, MAPPED_RAM_HEADER_SIZE);
        assert.deepEqual(decodeMappedRamHeader(b), h);
        const plan = planBlock(headerOffset, usedLength);
        assert.equal(plan.bitmapOffset, headerOffset + MAPPED_RAM_HEADER_SIZE);
        assert.equal(plan.pagesOffset % MAPPED_RAM_FILE_OFFSET_ALIGNMENT, 0);
        assert.ok(plan.pagesOffset >= plan.bitmapOffset + bitmapBytes(usedLength));
        assert.ok(plan.pagesOffset < plan.bitmapOffset + bitmapBytes(usedLength) + MAPPED_RAM_FILE_OFFSET_ALIGNMENT);
        assert.equal(plan.end, plan.pagesOffset + usedLength);
        const { headerOffset: _h, end: _e, ...onWire } = plan;
        assert.deepEqual(decodeMappedRamHeader(encodeMappedRamHeader(onWire)), onWire);
      },
    ), RUNS);
    fc.assert(fc.property(fc.integer({ min: 1, max: 3000 }).chain((n) => fc.tuple(fc.constant(n), fc.uniqueArray(fc.integer({ min: 0, max: n - 1 }), { maxLength: n }))), ([pages, set]) => {
      const bm = new PageBitmap(pages);
      for (const p of set) bm.set(p);
      assert.equal(bm.bytes.length, bitmapBytes(pages * PAGE));
      assert.equal(bm.count(), set.length);
      const fromRuns = [...bm.runs()].flatMap(([s, n]) => Array.from({ length: n }, (_, i) => s + i));
      assert.deepEqual(fromRuns, [...set].sort((a, b) => a - b));
      const again = new PageBitmap(pages, Buffer.from(bm.bytes));
      for (const p of set) assert.ok(again.test(p));
    }), runs(100));
  });

  test('PageBitmap runs cut at maxRun are the whole runs in adjacent pieces of at most maxRun pages', () => {
    fc.assert(fc.property(fc.integer({ min: 1, max: 3000 }).chain((n) => fc.tuple(fc.constant(n), fc.array(fc.tuple(fc.integer({ min: 0, max: n - 1 }), fc.integer({ min: 1, max: 600 })), { maxLength: 12 }), fc.integer({ min: 0, max: n - 1 }), fc.integer({ min: 1, max: 200 }))), ([pages, spans, from, maxRun]) => {
      const bm = new PageBitmap(pages);
      for (const [at, len] of spans) for (let p = at; p < Math.min(pages, at + len); p++) bm.set(p);
      const whole = [...bm.runs(from)];
      const pieces = [...bm.runs(from, maxRun)];
      for (const [, n] of pieces) assert.ok(n >= 1 && n <= maxRun, `piece of ${n} pages, maxRun ${maxRun}`);
      // Joining adjacent pieces gives back the whole runs.
      const joined: [number, number][] = [];
      for (const [f, n] of pieces) {
        const last = joined[joined.length - 1];
        if (last && last[0] + last[1] === f) last[1] += n;
        else joined.push([f, n]);
      }
      assert.deepEqual(joined, whole);
    }), runs(100));
  });
});

type Run = { events: unknown[]; error?: ProtocolError; eventBytes: number };

/** Pushes `data` split at `cuts` into a parser and drains events; returns them and the error (if any). */
function drive<E extends MainEvent | ChannelEvent>(p: { push(b: Buffer): void; next(): E | null }, data: Buffer, cuts: number[], slack: number, flat: (ev: E) => unknown): Run {
  const events: unknown[] = [];
  let eventBytes = 0;
  const bounds = [...new Set(cuts.map((c) => c % (data.length + 1)))].sort((a, b) => a - b);
  bounds.push(data.length);
  let pos = 0;
  try {
    for (const end of bounds) {
      if (end <= pos) continue;
      p.push(data.subarray(pos, end));
      pos = end;
      for (let ev = p.next(), guard = 0; ev !== null; ev = p.next(), guard++) {
        assert.ok(guard <= data.length + slack, 'more events than input bytes');
        eventBytes += sizeOf(ev);
        events.push(flat(ev));
      }
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    return { events, error: e, eventBytes };
  }
  return { events, eventBytes };
}

function runMain(data: Buffer, cuts: number[]): Run {
  const r = drive<MainEvent>(new MainStreamParser(), data, cuts, 8, (ev) => (ev.type === 'ram-page' || ev.type === 'device-state' ? { ...ev, data: Buffer.concat(ev.data) } : ev));
  return { ...r, events: mergeDevice(r.events) };
}

function runChannel(data: Buffer, cuts: number[], comp: number): Run {
  return drive<ChannelEvent>(new MultifdChannelParser(comp), data, cuts, 0, (ev) => (ev.type === 'packet' ? { ...ev, payload: Buffer.concat(ev.payload) } : ev));
}

/** Device state comes out in whatever pieces were pushed: compare it as one run. */
function mergeDevice(events: unknown[]): unknown[] {
  const out: unknown[] = [];
  const dev: Buffer[] = [];
  for (const e of events) {
    if ((e as { type: string }).type === 'device-state') dev.push((e as { data: Buffer }).data);
    else out.push(e);
  }
  if (dev.length) out.push({ type: 'device-state', data: Buffer.concat(dev) });
  return out;
}

function sizeOf(ev: MainEvent | ChannelEvent): number {
  switch (ev.type) {
    case 'ram-page':
    case 'device-state':
      return ev.data.reduce((n, d) => n + d.length, 0);
    case 'packet':
      return ev.payload.reduce((n, d) => n + d.length, 0);
    case 'command':
      return ev.payload.length;
    default:
      return 0;
  }
}

const mutations = fc.array(fc.record({ pos: fc.nat(), val: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 6 });
const cuts = fc.array(fc.nat(), { maxLength: 12 });

function mutate(base: Buffer, muts: { pos: number; val: number }[], truncate: number): Buffer {
  const b = Buffer.from(base.subarray(0, Math.max(1, base.length - (truncate % base.length))));
  for (const m of muts) b[m.pos % b.length] = m.val;
  return b;
}

describe('parsers on hostile input: events or ProtocolError, same result in any chunking', () => {
  const qevm = Buffer.from('5145564d00000003', 'hex');
  const mainSamples = [
    findScenario('10.0', 'precopy-plain').main().subarray(0, 6144),
    findScenario('11.1', 'multifd-2ch').main().subarray(0, 1024),
    findScenario('10.0', 'multifd-1ch-legacy-zero').main().subarray(0, 2048),
    findScenario('11.1', 'mapped-ram-file').main().subarray(0, 1024),
    findScenario('10.0', 'multifd-2ch-uuid').main().subarray(0, 512),
  ];

  const check = (r: { events: unknown[]; error?: ProtocolError; eventBytes: number }, again: typeof r, input: Buffer): void => {
    // Every event byte is a distinct input byte: nothing is invented or allocated ahead of the data.
    assert.ok(r.eventBytes <= input.length, `events carry ${r.eventBytes} bytes from ${input.length} input bytes`);
    assert.deepEqual(again.events, r.events);
    assert.equal(again.error?.code, r.error?.code);
  };

  test('MainStreamParser on arbitrary bytes (raw, and after a valid header)', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 600 }), fc.boolean(), cuts, (u, withHeader, cs) => {
      const input = withHeader ? Buffer.concat([qevm, Buffer.from(u)]) : Buffer.from(u);
      check(runMain(input, []), runMain(input, cs), input);
    }), runs(500));
  });

  test('MainStreamParser on mutated real captures', () => {
    fc.assert(fc.property(fc.constantFrom(...mainSamples.keys()), mutations, fc.nat(), cuts, (i, muts, trunc, cs) => {
      const input = mutate(mainSamples[i]!, muts, trunc);
      check(runMain(input, []), runMain(input, cs), input);
    }), runs(400));
  });

  const channel = findScenario('10.0', 'multifd-2ch');
  const chFile = channel.channelFiles.find((c) => channel.check.channels![c.file]!.normal_pages > 0)!.file;
  const zch = findScenario('11.1', 'multifd-2ch-zlib');
  const chSamples: [Buffer, number][] = [
    [channel.file(chFile).subarray(0, 64 + 6 * MULTIFD_PACKET_HEADER_SIZE + 4 * PAGE), MultifdFlag.NOCOMP],
    [zch.file(zch.channelFiles[1]!.file).subarray(0, 16384), MultifdFlag.ZLIB],
  ];

  test('MultifdChannelParser on arbitrary bytes (raw, and after a valid init)', () => {
    const init = encodeMultifdInit(0);
    const comp = fc.constantFrom(MultifdFlag.NOCOMP, MultifdFlag.ZLIB, MultifdFlag.ZSTD);
    fc.assert(fc.property(fc.uint8Array({ maxLength: 3000 }), fc.boolean(), comp, cuts, (u, withInit, c, cs) => {
      const input = withInit ? Buffer.concat([init, Buffer.from(u)]) : Buffer.from(u);
      check(runChannel(input, [], c), runChannel(input, cs, c), input);
    }), runs(300));
  });

  test('MultifdChannelParser on mutated real channels', () => {
    fc.assert(fc.property(fc.constantFrom(0, 1), mutations, fc.nat(), cuts, (i, muts, trunc, cs) => {
      const [base, comp] = chSamples[i]!;
      // Aim most mutations at the headers, where the checks are.
      const aimed = muts.map((m) => ({ pos: m.pos % 3 === 0 ? m.pos : 64 + (m.pos % 40), val: m.val }));
      const input = mutate(base, aimed, trunc);
      check(runChannel(input, [], comp), runChannel(input, cs, comp), input);
    }), runs(300));
  });

  const dev = (() => {
    const s = findScenario('11.1', 'multifd-2ch');
    return s.main().subarray(s.check.main.offsets.first_device!);
  })();
  const realVmdesc = findTrailingVmdesc(dev)!.vmdesc;

  test('vmdesc walk on mutated device state', () => {
    fc.assert(fc.property(mutations, fc.nat(), (muts, trunc) => {
      const input = mutate(dev, muts.map((m) => ({ pos: m.pos % 13000, val: m.val })), trunc % 20 === 0 ? trunc : 0);
      try {
        const l = walkDeviceState(input, realVmdesc);
        assert.ok(l.end <= input.length);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
      }
      findTrailingVmdesc(input);
    }), runs(200));
  });

  test('vmdesc walk with a mutated VMDESCRIPTION: ProtocolError, bounded work', () => {
    // The vmdesc comes from the stream, so it is as untrusted as the bytes it describes.
    const paths: (string | number)[][] = [];
    const visit = (v: unknown, path: (string | number)[]): void => {
      paths.push(path);
      if (Array.isArray(v)) v.forEach((x, i) => visit(x, [...path, i]));
      else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) visit(x, [...path, k]);
    };
    visit(realVmdesc, []);
    const value = fc.oneof(
      fc.jsonValue({ maxDepth: 2 }),
      fc.constantFrom(1e9, 2 ** 53, -1, 1.5, null, 'struct', [], {}, { fields: 5 }, { subsections: 'x' }, [null]),
    );
    fc.assert(fc.property(fc.array(fc.tuple(fc.nat(), value), { minLength: 1, maxLength: 3 }), (edits) => {
      const v = structuredClone(realVmdesc) as unknown as Record<string | number, unknown>;
      for (const [i, val] of edits) {
        const path = paths[i % paths.length]!;
        if (path.length === 0) continue;
        let o: Record<string | number, unknown> = v;
        for (const k of path.slice(0, -1)) {
          const next = o?.[k];
          if (next === null || typeof next !== 'object') { o = undefined as never; break; }
          o = next as Record<string | number, unknown>;
        }
        if (o) o[path[path.length - 1]!] = val;
      }
      let desc: Vmdesc;
      try {
        desc = parseVmdesc(JSON.stringify(v));
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
        return;
      }
      const t0 = Date.now();
      try {
        walkDeviceState(dev, desc);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
      }
      assert.ok(Date.now() - t0 < 500, 'walk took too long');
    }), runs(300));
  });
});

describe('coalescePages', () => {
  const input = fc
    .record({
      pageSize: fc.constantFrom(1, 16, 4096),
      segments: fc.array(fc.record({ start: fc.nat(200), len: fc.integer({ min: 1, max: 9 }) }), { maxLength: 20 }),
      dropTail: fc.nat(5),
      cuts: fc.array(fc.nat(), { maxLength: 10 }),
      seed: fc.integer(),
    })
    .map((r) => {
      const pages = r.segments.flatMap((s) => Array.from({ length: s.len }, (_, i) => s.start + i));
      const offsets = new Float64Array(pages.map((p) => p * r.pageSize));
      const count = Math.max(0, pages.length - r.dropTail);
      const total = count * r.pageSize;
      const bytes = Buffer.alloc(total);
      for (let i = 0; i < total; i++) bytes[i] = (i * 31 + r.seed) & 0xff;
      // The payload arrives as views of several chunks, some empty.
      const bounds = [...new Set(r.cuts.map((c) => c % (total + 1)))].sort((a, b) => a - b);
      const parts: Buffer[] = [];
      let pos = 0;
      for (const b of [...bounds, total]) {
        parts.push(bytes.subarray(pos, b));
        pos = b;
      }
      return { pageSize: r.pageSize, offsets, count, bytes, parts };
    });

  test('runs hold exactly the input pages and bytes, maximal, as views', () => {
    fc.assert(fc.property(input, ({ pageSize, offsets, count, bytes, parts }) => {
      const runs = coalescePages(offsets, count, parts, pageSize);
      assert.equal(runs.reduce((n, r) => n + r.pages, 0), count);
      const flat = runs.flatMap((r) => Array.from({ length: r.pages }, (_, i) => r.offset + i * pageSize));
      assert.deepEqual(flat, [...offsets.subarray(0, count)]);
      for (const r of runs) {
        assert.ok(r.pages >= 1);
        assert.equal(r.data.reduce((n, d) => n + d.length, 0), r.pages * pageSize);
        for (const d of r.data) assert.equal(d.buffer, bytes.buffer, 'a view, not a copy');
      }
      assert.ok(Buffer.concat(runs.flatMap((r) => r.data)).equals(bytes));
      for (let i = 1; i < runs.length; i++) {
        assert.notEqual(runs[i]!.offset, runs[i - 1]!.offset + runs[i - 1]!.pages * pageSize, 'adjacent runs would have merged');
      }
    }), runs(400));
  });

  test('sliceViews is the byte range of the concatenation', () => {
    fc.assert(fc.property(fc.array(fc.uint8Array({ maxLength: 20 }), { maxLength: 8 }), fc.nat(), fc.nat(), (arrs, a, b) => {
      const parts = arrs.map((x) => Buffer.from(x));
      const all = Buffer.concat(parts);
      const from = Math.min(a, b) % (all.length + 1);
      const to = from + (Math.max(a, b) % (all.length - from + 1));
      assert.ok(Buffer.concat(sliceViews(parts, from, to)).equals(all.subarray(from, to)));
    }), runs(400));
  });
});

describe('SyncBarrier', () => {
  const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

  test('a round is released only when every party and the main channel arrived, in any order', async () => {
    const plan = fc.integer({ min: 1, max: 5 }).chain((n) =>
      fc.tuple(
        fc.constant(n),
        fc.array(
          fc.tuple(
            fc.shuffledSubarray([...Array(n).keys()], { minLength: n, maxLength: n }),
            fc.integer({ min: 0, max: n }),
          ),
          { minLength: 1, maxLength: 4 },
        ),
      ),
    );
    await fc.assert(fc.asyncProperty(plan, async ([n, rounds]) => {
      const b = new SyncBarrier(n);
      for (const [round, [order, waitAt]] of rounds.entries()) {
        const steps: (number | 'main')[] = [...order];
        steps.splice(waitAt, 0, 'main');
        const done = new Set<number | 'main'>();
        for (const [i, step] of steps.entries()) {
          const pr = step === 'main' ? b.wait() : b.arrive(step);
          void pr.then(() => done.add(step));
          await tick();
          if (i < steps.length - 1) {
            assert.equal(done.size, 0, `round ${round}: released after ${i + 1} of ${steps.length} arrivals`);
            assert.equal(b.completedRounds, round);
            assert.equal(b.waiting, steps.slice(0, i + 1).includes('main'));
          }
        }
        assert.equal(done.size, n + 1, `round ${round}: everybody released`);
        assert.equal(b.completedRounds, round + 1);
        assert.equal(b.arrivedCount, 0);
        assert.equal(b.waiting, false);
      }
    }), runs(150));
  });

  test('a party arriving twice in one round, a second waiter, and fail() are errors for everybody pending', async () => {
    const b = new SyncBarrier(2);
    const first = b.arrive(0);
    await assert.rejects(b.arrive(0), /arrived twice/);
    const w = b.wait();
    await assert.rejects(b.wait(), /already has a waiter/);
    const boom = new Error('channel 1 failed');
    b.fail(boom);
    await assert.rejects(first, boom);
    await assert.rejects(w, boom);
    await assert.rejects(b.arrive(1), boom);
    await assert.rejects(b.wait(), boom);
    assert.equal(b.completedRounds, 0);
  });
});
