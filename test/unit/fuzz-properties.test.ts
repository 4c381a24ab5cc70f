// Property tests (fast-check) next to the mutation fuzzer (fuzz.test.ts), for what random bytes
// rarely reach: the ByteQueue/Cursor that every incremental parser reads through, checked against
// a flat-buffer model; RAM records generated with offsets in and out of their blocks; and multifd
// packets generated the same way through the receiver into a recording store. The properties:
// no page is ever written or reported outside its block, an input is refused exactly when one of
// its records or packets is out of range, and the chunking never matters.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ByteQueue } from '../../src/codec/byte-queue.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { MULTIFD_PAGES_PER_PACKET, MultifdFlag, RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { NeedMoreData, ProtocolError } from '../../src/codec/errors.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { encodeMultifdInit } from '../../src/codec/multifd-init.js';
import { encodeMultifdPacketHeader, encodeSyncPacket } from '../../src/codec/multifd-packet.js';
import { encodeBlockEntry, encodeEos, encodeFooter, encodeMemSize, encodePageRecordHeader, encodeSectionFull, encodeStreamHeader, encodeZeroRecord } from '../../src/codec/stream-encode.js';
import { ChannelError } from '../../src/engine/multifd-receiver.js';
import { chunkPlan, chunks } from '../fuzz/mutators.js';
import { Rng } from '../fuzz/rng.js';
import { driveReceiver } from '../fuzz/targets/channel.js';

const PAGE = TARGET_PAGE_SIZE;
const SCALE = Math.max(1, Number(process.env.MULTIFD_FUZZ_SCALE ?? 1) || 1);
const runs = (n: number): { numRuns: number } => ({ numRuns: Math.round(n * SCALE) });

describe('ByteQueue and Cursor against a flat buffer', () => {
  type Op =
    | { op: 'push'; bytes: Uint8Array }
    | { op: 'consume'; n: number }
    | { op: 'read'; start: number; n: number }
    | { op: 'ints'; at: number };
  const op: fc.Arbitrary<Op> = fc.oneof(
    { weight: 4, arbitrary: fc.record({ op: fc.constant('push' as const), bytes: fc.uint8Array({ maxLength: 40 }) }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('consume' as const), n: fc.nat(60) }) },
    { weight: 3, arbitrary: fc.record({ op: fc.constant('read' as const), start: fc.nat(80), n: fc.nat(80) }) },
    { weight: 2, arbitrary: fc.record({ op: fc.constant('ints' as const), at: fc.nat(80) }) },
  );

  test('every read equals the model; reads past the end need more data; consumed bytes are gone', () => {
    fc.assert(fc.property(fc.array(op, { maxLength: 60 }), (ops) => {
      const q = new ByteQueue();
      let model = Buffer.alloc(0);
      let consumed = 0;
      for (const o of ops) {
        if (o.op === 'push') {
          q.push(Buffer.from(o.bytes));
          model = Buffer.concat([model, o.bytes]);
        } else if (o.op === 'consume') {
          if (o.n > model.length) {
            assert.throws(() => q.consume(o.n), RangeError);
            continue;
          }
          q.consume(o.n);
          model = model.subarray(o.n);
          consumed += o.n;
        } else if (o.op === 'read') {
          if (o.start + o.n > model.length) {
            assert.throws(() => q.contiguous(o.start, o.n), NeedMoreData);
            assert.throws(() => q.slices(o.start, o.n), NeedMoreData);
          } else {
            const want = model.subarray(o.start, o.start + o.n);
            assert.ok(q.contiguous(o.start, o.n).equals(want));
            const parts = q.slices(o.start, o.n);
            assert.ok(Buffer.concat(parts).equals(want));
            assert.ok(parts.every((p) => p.length > 0), 'no empty views');
          }
          if (o.start < model.length) assert.equal(q.byteAt(o.start), model[o.start]);
          else assert.throws(() => q.byteAt(o.start), NeedMoreData);
        } else {
          const c = q.cursor();
          c.pos = Math.min(o.at, model.length);
          const at = c.pos;
          const avail = model.length - at;
          for (const [w, read] of [[2, () => c.u16()], [4, () => c.u32()], [8, () => c.u64()]] as const) {
            c.pos = at;
            if (avail < w) assert.throws(read, NeedMoreData);
            else assert.equal(BigInt(read()), w === 2 ? BigInt(model.readUInt16BE(at)) : w === 4 ? BigInt(model.readUInt32BE(at)) : model.readBigUInt64BE(at));
          }
          assert.equal(c.streamOffset, consumed + c.pos);
        }
        assert.equal(q.length, model.length);
        assert.equal(q.streamOffset, consumed);
      }
    }), runs(300));
  });
});

// ---- RAM records ----------------------------------------------------------------------------

const blockName = fc.constantFrom('pc.ram', 'pc.bios', '/rom@etc/acpi/tables', 'x', 'a'.repeat(255));

const ramSection = fc
  .record({
    blocks: fc.uniqueArray(fc.record({ name: blockName, pages: fc.integer({ min: 1, max: 40 }) }), { minLength: 1, maxLength: 3, selector: (b) => b.name }),
    records: fc.array(
      fc.record({ zero: fc.boolean(), block: fc.nat(3), page: fc.integer({ min: 0, max: 44 }), cont: fc.boolean() }),
      { maxLength: 25 },
    ),
    cuts: fc.array(fc.nat(), { maxLength: 10 }),
  });

test('RAM records generated in and out of their blocks: each in-range record comes out as it went in, the first out-of-range one is refused, never a page outside its block', () => {
  fc.assert(fc.property(ramSection, ({ blocks, records, cuts }) => {
    const total = blocks.reduce((n, b) => n + b.pages * PAGE, 0);
    const parts: Buffer[] = [
      encodeStreamHeader(),
      encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
      encodeSectionFull(SectionType.START, 1, 'ram', 0, 4),
      encodeMemSize(total),
      ...blocks.map((b) => encodeBlockEntry(b.name, b.pages * PAGE)),
    ];
    // What the parser must do with each record: emit it, or refuse it (and stop there).
    const expected: string[] = [];
    let refusedAt: number | undefined;
    let last: string | undefined;
    records.forEach((r, i) => {
      const b = blocks[r.block % (blocks.length + 1)];
      const name = b?.name ?? 'no-such-block';
      // A CONTINUE record names no block: it is for the previous record's.
      const cont = r.cont && last !== undefined && last === name;
      const offset = r.page * PAGE;
      parts.push(r.zero ? encodeZeroRecord(offset, cont ? undefined : name) : Buffer.concat([encodePageRecordHeader(RamFlag.PAGE, offset, cont ? undefined : name), Buffer.alloc(PAGE, i)]));
      if (refusedAt !== undefined) return;
      if (!b || r.page >= b.pages) refusedAt = i;
      else {
        expected.push(`${r.zero ? 'zero' : 'page'} ${name} ${offset}`);
        last = name;
      }
    });
    parts.push(encodeEos(), encodeFooter(1));
    const stream = Buffer.concat(parts);
    const bounds = [...new Set(cuts.map((c) => c % (stream.length + 1)))].sort((a, b) => a - b);
    for (const plan of [[stream.length], [...bounds, stream.length]]) {
      const p = new MainStreamParser();
      const got: string[] = [];
      let error: unknown;
      try {
        for (const c of chunks(stream, plan)) {
          p.push(c);
          for (let ev = p.next(); ev !== null; ev = p.next()) {
            if (ev.type !== 'ram-page' && ev.type !== 'ram-zero') continue;
            const b = blocks.find((x) => x.name === ev.block)!;
            assert.ok(ev.offset + PAGE <= b.pages * PAGE && ev.offset % PAGE === 0, `record at ${ev.offset} outside ${ev.block}`);
            got.push(`${ev.type === 'ram-zero' ? 'zero' : 'page'} ${ev.block} ${ev.offset}`);
          }
        }
      } catch (e) {
        error = e;
      }
      assert.deepEqual(got, expected);
      if (refusedAt === undefined) assert.equal(error, undefined, String(error));
      else {
        assert.ok(error instanceof ProtocolError, String(error));
        assert.ok(['OFFSET_OUT_OF_RANGE', 'UNKNOWN_BLOCK'].includes(error.code), error.message);
      }
    }
  }), runs(150));
});

// ---- multifd packets through the receiver ----------------------------------------------------

const packetSpec = fc.record({
  block: fc.nat(3),
  normal: fc.array(fc.integer({ min: 0, max: 44 }), { maxLength: 6 }),
  zero: fc.array(fc.integer({ min: 0, max: 44 }), { maxLength: 6 }),
  misalign: fc.oneof({ weight: 9, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: PAGE - 1 }) }),
  sync: fc.boolean(),
});

test('multifd packets generated in and out of their blocks: the receiver writes exactly the in-range pages before the first bad packet, fails typed on it, never writes outside a block', async () => {
  const blocks = new Map([['pc.ram', { name: 'pc.ram', usedLength: 40 * PAGE }], ['pc.bios', { name: 'pc.bios', usedLength: 3 * PAGE }]]);
  const names = [...blocks.keys(), 'nope'];
  await fc.assert(fc.asyncProperty(fc.array(packetSpec, { maxLength: 8 }), fc.integer(), async (packets, seed) => {
    const parts: Buffer[] = [encodeMultifdInit(0), encodeSyncPacket(0n)];
    const expected: string[] = [];
    let bad = false;
    let num = 1n;
    for (const p of packets) {
      const name = names[p.block % names.length]!;
      const used = blocks.get(name)?.usedLength;
      const normal = [...new Set(p.normal)].slice(0, MULTIFD_PAGES_PER_PACKET);
      const zero = [...new Set(p.zero)].filter((z) => !normal.includes(z));
      const offsets = [...normal, ...zero].map((pg, i) => pg * PAGE + (i === 0 ? p.misalign : 0));
      if (normal.length + zero.length > 0) {
        parts.push(encodeMultifdPacketHeader({ flags: MultifdFlag.NOCOMP, normalPages: normal.length, zeroPages: zero.length, nextPacketSize: normal.length * PAGE, packetNum: num++, ramblock: name, offsets }));
        parts.push(Buffer.alloc(normal.length * PAGE, 7));
        const ok = used !== undefined && offsets.every((o) => o % PAGE === 0 && o + PAGE <= used);
        if (!ok) bad = true;
        if (!bad) {
          expected.push(...zero.map((z) => `zero ${name} ${z * PAGE}`), ...normal.map((n) => `page ${name} ${n * PAGE}`));
        }
      }
      if (p.sync) parts.push(encodeSyncPacket(num++));
    }
    parts.push(encodeSyncPacket(num++));
    const input = Buffer.concat(parts);
    const rng = new Rng(seed);
    const r = await driveReceiver(input, blocks, chunkPlan(input.length, rng), rng.pick([PAGE, 64 * 1024, 8 << 20]), true);
    assert.equal(r.store.violation, undefined, r.store.violation?.message);
    // Zero pages are stored at once, data pages once decoded: the order across packets may interleave.
    const log = [...r.store.log!].sort();
    if (!bad) {
      assert.equal(r.failure, undefined, r.failure?.message);
      assert.deepEqual(log, [...expected].sort());
    } else {
      assert.ok(r.failure instanceof ChannelError && r.failure.cause instanceof ProtocolError, String(r.failure));
      assert.ok(['OFFSET_OUT_OF_RANGE', 'UNKNOWN_BLOCK'].includes(r.failure.cause.code), r.failure.message);
      // Writes of earlier packets may be cut short when the bad one fails the channel: what was
      // written is part of what the good packets hold, and nothing else.
      const left = [...expected];
      for (const w of log) {
        const i = left.indexOf(w);
        assert.ok(i >= 0, `write ${w} is not from a packet before the bad one`);
        left.splice(i, 1);
      }
    }
  }), runs(100));
});
