// What the fuzzing of issue #7 found in src/codec, each pinned by a deterministic test (the inputs
// themselves are in test/fixtures/fuzz-regressions and replayed by fuzz.test.ts). The quadratic
// ones are checked by counting work (calls into the buffer layer), not by timing, so that a slow
// CI machine cannot make them flaky.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ByteQueue } from '../../src/codec/byte-queue.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { decodeDeviceFields } from '../../src/codec/device-fields.js';
import { DeviceStateTail } from '../../src/codec/device-state-tail.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { QmpLineSplitter, QmpProtocolError } from '../../src/codec/qmp.js';
import { encodeBlockEntry, encodeMemSize, encodePageRecordHeader, encodeSectionFull, encodeStreamHeader } from '../../src/codec/stream-encode.js';
import { encodeQemuJson, vmdescForConfiguration } from '../../src/codec/vmdesc-config.js';
import { findTrailingVmdesc, walkDeviceState, type Vmdesc, type VmdescDevice } from '../../src/codec/vmdesc.js';

const PAGE = TARGET_PAGE_SIZE;

/** Counts calls of a prototype method while `fn` runs. */
function countCalls<T extends object>(proto: T, name: keyof T & string, fn: () => void): number {
  const orig = proto[name] as unknown as (...a: unknown[]) => unknown;
  let n = 0;
  (proto as Record<string, unknown>)[name] = function (this: unknown, ...a: unknown[]) {
    n++;
    return orig.apply(this, a);
  };
  try {
    fn();
  } finally {
    (proto as Record<string, unknown>)[name] = orig;
  }
  return n;
}

/** Device state whose every 8 bytes look like the start of a VMDESCRIPTION record. */
function fakeHeaders(bytes: number, lenPointsToEnd: boolean): Buffer {
  const b = Buffer.alloc(bytes, 0x20);
  for (let p = 1; p + 7 < bytes; p += 8) {
    b[p - 1] = 0x00;
    b[p] = SectionType.VMDESCRIPTION;
    b.writeUInt32BE(lenPointsToEnd ? bytes - p - 5 : 10, p + 1);
    b[p + 5] = 0x7b;
    b[p + 6] = 0x7d;
  }
  b[bytes - 1] = 0x7d;
  return b;
}

describe('quadratic work on hostile chunking or content (hangs)', () => {
  test('MainStreamParser parses a page record that arrives byte by byte once it is whole, not once per byte', () => {
    const head = Buffer.concat([
      encodeStreamHeader(),
      encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
      encodeSectionFull(SectionType.START, 1, 'ram', 0, 4),
      encodeMemSize(16 * PAGE),
      encodeBlockEntry('pc.ram', 16 * PAGE),
    ]);
    const records = Buffer.concat([encodePageRecordHeader(RamFlag.PAGE, 0, 'pc.ram'), Buffer.alloc(PAGE, 1), encodePageRecordHeader(RamFlag.PAGE, PAGE, undefined), Buffer.alloc(PAGE, 2)]);
    const p = new MainStreamParser();
    p.push(head);
    while (p.next() !== null);
    let pages = 0;
    const reads = countCalls(ByteQueue.prototype, 'slices', () => {
      for (let i = 0; i < records.length; i++) {
        p.push(records.subarray(i, i + 1));
        for (let ev = p.next(); ev !== null; ev = p.next()) if (ev.type === 'ram-page') pages++;
      }
    });
    assert.equal(pages, 2);
    // Before the fix every pushed byte re-read the record from its start: ~2 × 4096 attempts.
    assert.ok(reads < 64, `${reads} ByteQueue reads for 2 page records pushed byte by byte`);
  });

  test('DeviceStateTail keeps only the candidates that can still be the VMDESCRIPTION (fake headers do not pile up)', () => {
    const data = fakeHeaders(64 * 1024, false);
    const tail = new DeviceStateTail();
    const reads = countCalls(Buffer.prototype, 'readUInt32BE', () => {
      for (let at = 0; at < data.length; at += 8) tail.append([data.subarray(at, at + 8)]);
    });
    assert.equal(tail.isComplete, false);
    // Before: every append ending in "}" looked at every earlier candidate (8192 × 8192 / 2).
    assert.ok(reads < 4 * 8192, `${reads} length reads for 8192 appends`);
  });

  test('one append holding more candidates than a call takes arguments is not a RangeError', () => {
    const tail = new DeviceStateTail();
    assert.equal(tail.append([fakeHeaders(2 << 20, false)]), false);
  });

  test('findTrailingVmdesc tries only the latest candidates: a file full of headers that all reach the end is not quadratic', () => {
    const data = fakeHeaders(64 * 1024, true);
    let found: unknown;
    const parses = countCalls(Buffer.prototype, 'toString', () => {
      found = findTrailingVmdesc(data);
    });
    assert.equal(found, undefined);
    // Before: 8192 candidates, each converting the rest of the buffer to a string for JSON.parse.
    assert.ok(parses < 16, `${parses} conversions`);
  });
});

describe('the VMDESCRIPTION walk and the field decoder agree; hostile descriptions stay bounded', () => {
  const section = (idstr: string, body: Buffer): Buffer => {
    const head = Buffer.concat([Buffer.from([SectionType.FULL, 0, 0, 0, 9, idstr.length]), Buffer.from(idstr, 'latin1'), Buffer.alloc(8)]);
    return Buffer.concat([head, body, Buffer.from([SectionType.FOOTER, 0, 0, 0, 9])]);
  };
  const stateWith = (dev: VmdescDevice, body: Buffer): { buf: Buffer; vmdesc: Vmdesc } => {
    const vmdesc: Vmdesc = { devices: [dev] };
    const json = Buffer.from(JSON.stringify(vmdesc));
    const rec = Buffer.alloc(5);
    rec[0] = SectionType.VMDESCRIPTION;
    rec.writeUInt32BE(json.length, 1);
    return { buf: Buffer.concat([section(dev.name, body), Buffer.from([SectionType.EOF]), rec, json]), vmdesc };
  };
  const bodyStart = (dev: VmdescDevice): number => 14 + dev.name.length;

  for (const [what, field, bytes] of [
    ['a field without a name', { type: 'uint32', size: 4 }, 4],
    ['a field without a type', { name: 'x', size: 4 }, 4],
    ['an array_len beyond 2^53', { name: 'a', type: 'uint8', size: 0, array_len: 2 ** 60 }, 0],
  ] as const) {
    test(`${what}: both refuse it (walkDeviceState used to accept it, decodeDeviceFields did not)`, () => {
      const dev = { name: 'dev', instance_id: 0, fields: [field] } as unknown as VmdescDevice;
      const { buf, vmdesc } = stateWith(dev, Buffer.alloc(bytes));
      assert.throws(() => walkDeviceState(buf, vmdesc), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_VMDESC');
      assert.throws(() => decodeDeviceFields(buf, dev, bodyStart(dev)), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_VMDESC');
    });
  }

  test('a struct field whose "struct" is not an object is a plain field of its size in both (the walk read it as an empty struct)', () => {
    const dev = { name: 'dev', instance_id: 0, fields: [{ name: 's', type: 'struct', size: 4, struct: 5 }] } as unknown as VmdescDevice;
    const { buf, vmdesc } = stateWith(dev, Buffer.alloc(4));
    assert.equal(walkDeviceState(buf, vmdesc).sections[0]!.length, 14 + 3 + 4 + 5);
    assert.equal(decodeDeviceFields(buf, dev, bodyStart(dev)).end, bodyStart(dev) + 4);
  });

  test('a capability field reads a counted string in both', () => {
    const dev = { name: 'dev', instance_id: 0, fields: [{ name: 'c', type: 'capability', size: 11, array_len: 2 }] } as unknown as VmdescDevice;
    const body = Buffer.from('\x03abc\x01z', 'latin1');
    const { buf, vmdesc } = stateWith(dev, body);
    assert.equal(walkDeviceState(buf, vmdesc).sections[0]!.length, 14 + 3 + body.length + 5);
    assert.equal(decodeDeviceFields(buf, dev, bodyStart(dev)).end, bodyStart(dev) + body.length);
  });

  test('decodeDeviceFields: a huge array of elements that occupy no bytes fails fast instead of building millions of values', () => {
    for (const field of [
      { name: 'e', type: 'struct', size: 0, array_len: 2 ** 50, struct: { fields: [] } },
      { name: 'z', type: 'buffer', size: 0, array_len: 3_999_999 },
    ]) {
      const dev = { name: 'dev', instance_id: 0, fields: [field] } as unknown as VmdescDevice;
      const before = process.memoryUsage().heapUsed;
      assert.throws(() => decodeDeviceFields(Buffer.alloc(16), dev, 0), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_VMDESC' && /occupy no bytes/.test(e.message));
      // Before: 4 million values, ~600 MB and over a second for a 16-byte input.
      assert.ok(process.memoryUsage().heapUsed - before < 64 * 1024 * 1024, 'bounded memory');
    }
  });
});

describe('convert and QMP on deeply nested or odd JSON', () => {
  const deep = (n: number): unknown => JSON.parse('['.repeat(n) + ']'.repeat(n));

  test('encodeQemuJson: the same bytes as before, and no stack overflow on JSON.parse-able nesting', () => {
    const v = { a: [1, { b: 'x', c: undefined, d: [null, true, -1.5] }], e: 'é', f: {} , g: [] };
    assert.equal(encodeQemuJson(v), '{"a": [1, {"b": "x", "d": [null, true, -1.5]}], "e": "é", "f": {}, "g": []}');
    assert.equal(encodeQemuJson(deep(50_000)).length, 100_000);
  });

  test('vmdescForConfiguration: configuration subsections that are not objects do not crash the sort', () => {
    const vmdesc = { devices: [], configuration: { vmsd_name: 'configuration', subsections: [null, 7, { vmsd_name: 'configuration/uuid', version: 1 }] } } as unknown as Vmdesc;
    const next = vmdescForConfiguration(vmdesc, { machine: 'pc', capabilities: ['mapped-ram'] });
    assert.ok(next);
    assert.equal(JSON.parse(encodeQemuJson(next)).configuration.subsections.length, 4);
  });

  test('a QMP line nested deeper than JSON.stringify can print is a QmpProtocolError, not a RangeError', () => {
    for (const line of [JSON.stringify(deep(2)).replace('[[]]', '['.repeat(6000) + ']'.repeat(6000)), `{"unknown": ${'['.repeat(6000)}${']'.repeat(6000)}}`]) {
      assert.throws(() => new QmpLineSplitter().push(Buffer.from(line + '\n')), (e: unknown) => e instanceof QmpProtocolError && e.code === 'UNKNOWN_MESSAGE');
    }
  });
});
