// XBZRLE deltas (src/codec/xbzrle.ts): QEMU's run-length format applied onto a page, with the
// limits of its loader (ram.c load_xbzrle, xbzrle.c xbzrle_decode_buffer).

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { ProtocolError } from '../../src/codec/errors.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { encodeMainEvent } from '../../src/codec/main-event-encode.js';
import { applyXbzrle, decodeXbzrle, encodeXbzrle, XBZRLE_MAX_DELTA } from '../../src/codec/xbzrle.js';
import { encodeBlockEntry, encodeCommand, encodeEos, encodeFooter, encodeMemSize, encodePageRecordHeader, encodeSectionFull, encodeStreamHeader, encodeXbzrleRecord } from '../../src/codec/stream-encode.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { Command, SectionType } from '../../src/codec/constants.js';

const PAGE = 4096;
const runs = process.env.MULTIFD_PROPERTY_RUNS ? Number(process.env.MULTIFD_PROPERTY_RUNS) : 200;

function rejects(delta: number[] | Buffer, what: RegExp, page = Buffer.alloc(PAGE, 0x11)): void {
  const before = Buffer.from(page);
  assert.throws(() => applyXbzrle(Buffer.from(delta), page), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_RECORD' && what.test(e.message));
  assert.ok(page.equals(before), 'a rejected delta leaves the page as it was');
}

describe('XBZRLE decoder', () => {
  test('a zero run then a non-zero run: bytes land after the unchanged ones', () => {
    const page = Buffer.alloc(PAGE, 0x11);
    applyXbzrle(Buffer.from([3, 2, 0xaa, 0xbb, 1, 1, 0xcc]), page);
    assert.deepEqual([...page.subarray(0, 9)], [0x11, 0x11, 0x11, 0xaa, 0xbb, 0x11, 0xcc, 0x11, 0x11]);
  });

  test('two-byte counts (ULEB128): 200 unchanged bytes, then one', () => {
    const page = Buffer.alloc(PAGE);
    applyXbzrle(Buffer.from([0xc8, 0x01, 1, 0x42]), page);
    assert.equal(page[200], 0x42);
    assert.equal(page.filter((b) => b !== 0).length, 1);
  });

  test('an empty delta changes nothing (QEMU sends none for an unchanged page)', () => {
    const page = Buffer.alloc(PAGE, 7);
    applyXbzrle(Buffer.alloc(0), page);
    assert.ok(page.every((b) => b === 7));
  });

  test('a first zero run of 0 is allowed, a later one is not', () => {
    const page = Buffer.alloc(PAGE);
    applyXbzrle(Buffer.from([0, 1, 9]), page);
    assert.equal(page[0], 9);
    rejects([0, 1, 9, 0, 1, 8], /empty zero run/);
  });

  test('limits: past the page, past the delta, 3-byte counts, cut pairs, empty non-zero runs, over 4096 bytes', () => {
    rejects([0x81, 0x20, 1, 1], /zero run reaches byte 4097/); // 4097 unchanged bytes: past the page
    rejects([0x80, 0x20, 1, 1], /non-zero run of 1 at page byte 4096 goes past/); // 4096, then one more
    rejects([0xfe, 0x1f, 5, 1, 2, 3, 4, 5], /goes past/); // 4094 + 5 > 4096
    rejects([0, 5, 1, 2], /needs 3 bytes more/);
    rejects([0x80, 0x80, 0x01, 1, 1], /longer than 2 bytes/);
    rejects([5], /ends inside a pair/);
    rejects([5, 1, 7, 3], /ends inside a pair/);
    rejects([5, 1], /ends before a non-zero run/);
    rejects([5, 0, 0], /empty non-zero run/);
    rejects(Buffer.alloc(XBZRLE_MAX_DELTA + 1, 1), /at most 4096/);
  });

  test('the last byte of the page can be written, not one beyond', () => {
    const page = Buffer.alloc(PAGE);
    applyXbzrle(Buffer.from([0xff, 0x1f, 1, 0x55]), page); // 4095 unchanged, then 1
    assert.equal(page[4095], 0x55);
  });
});

describe('XBZRLE properties', () => {
  test('encode then apply onto the old page gives the new page', () => {
    fc.assert(fc.property(
      fc.uint8Array({ minLength: PAGE, maxLength: PAGE }),
      fc.array(fc.record({ at: fc.integer({ min: 0, max: PAGE - 1 }), len: fc.integer({ min: 1, max: 300 }), v: fc.integer({ min: 0, max: 255 }) }), { maxLength: 20 }),
      (oldArr, edits) => {
        const old = Buffer.from(oldArr);
        const cur = Buffer.from(old);
        for (const e of edits) cur.fill(e.v, e.at, Math.min(PAGE, e.at + e.len));
        const delta = encodeXbzrle(old, cur);
        if (delta === undefined) return; // would not fit: QEMU sends the page whole
        const page = Buffer.from(old);
        applyXbzrle(delta, page);
        assert.ok(page.equals(cur));
      },
    ), { numRuns: runs });
  });

  test('any bytes: either a typed error with the page untouched, or runs inside page and delta', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 600 }), (arr) => {
      const page = Buffer.alloc(PAGE, 0x33);
      try {
        const rs = decodeXbzrle(arr, PAGE);
        for (const r of rs) {
          assert.ok(r.length >= 1 && r.pageOffset >= 0 && r.pageOffset + r.length <= PAGE);
          assert.ok(r.deltaOffset + r.length <= arr.length);
        }
        applyXbzrle(arr, page);
      } catch (e) {
        assert.ok(e instanceof ProtocolError, String(e));
        assert.ok(page.every((b) => b === 0x33));
      }
    }), { numRuns: runs });
  });
});

describe('XBZRLE and page-size records in the main stream', () => {
  const head = (advise?: Buffer) => Buffer.concat([
    encodeStreamHeader(),
    encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
    ...(advise ? [encodeCommand(Command.POSTCOPY_ADVISE, advise)] : []),
    encodeSectionFull(SectionType.START, 1, 'ram', 0, 4),
  ]);
  const parse = (b: Buffer) => {
    const p = new MainStreamParser();
    p.push(b);
    const evs = [];
    for (let ev = p.next(); ev !== null; ev = p.next()) evs.push(ev);
    return evs;
  };

  test('an XBZRLE record (with and without CONTINUE) parses and re-encodes byte for byte', () => {
    const delta = Buffer.from([0, 2, 1, 2]);
    const stream = Buffer.concat([
      head(), encodeMemSize(2 * PAGE), encodeBlockEntry('pc.ram', 2 * PAGE), encodeEos(), encodeFooter(1),
      Buffer.from([SectionType.PART, 0, 0, 0, 1]),
      encodePageRecordHeader(0x08, 0, 'pc.ram'), Buffer.alloc(PAGE, 5),
      ...encodeXbzrleRecord(0, undefined, delta), ...encodeXbzrleRecord(PAGE, 'pc.ram', delta), encodeEos(), encodeFooter(1),
    ]);
    const evs = parse(stream);
    const x = evs.filter((e) => e.type === 'ram-xbzrle');
    assert.equal(x.length, 2);
    assert.deepEqual(x.map((e) => e.type === 'ram-xbzrle' && [e.block, e.offset, e.continued, e.delta.toString('hex')]), [['pc.ram', 0, true, '00020102'], ['pc.ram', PAGE, false, '00020102']]);
    assert.ok(Buffer.concat(evs.flatMap(encodeMainEvent)).equals(stream));
  });

  test('XBZRLE header limits: encoding byte, length over a page, offset outside the block', () => {
    const pre = Buffer.concat([head(), encodeMemSize(PAGE), encodeBlockEntry('pc.ram', PAGE), encodeEos(), encodeFooter(1), Buffer.from([SectionType.PART, 0, 0, 0, 1])]);
    const rec = (offset: number, enc: number, len: number) => {
      const [h] = encodeXbzrleRecord(offset, 'pc.ram', Buffer.alloc(0));
      h![h!.length - 3] = enc;
      h!.writeUInt16BE(len, h!.length - 2);
      return Buffer.concat([pre, h!, Buffer.alloc(len)]);
    };
    assert.throws(() => parse(rec(0, 2, 4)), /encoding 0x2/);
    assert.throws(() => parse(rec(0, 1, PAGE + 1)), /at most 4096/);
    assert.throws(() => parse(rec(PAGE, 1, 4)), /outside block/);
  });

  test('postcopy-ram: the page size after used_length is read where ADVISE\'s summary has it', () => {
    const advise = Buffer.alloc(16);
    advise.writeBigUInt64BE(0x201000n, 0);
    advise.writeBigUInt64BE(0x1000n, 8);
    const stream = Buffer.concat([
      head(advise), encodeMemSize(0x1000000 + 0x20000),
      encodeBlockEntry('pc.ram', 0x1000000, { pageSize: 0x200000 }), encodeBlockEntry('pc.rom', 0x20000), encodeEos(), encodeFooter(1),
    ]);
    const blocks = parse(stream).flatMap((e) => (e.type === 'ram-block' ? [e.block] : []));
    assert.deepEqual(blocks.map((b) => [b.name, b.usedLength, b.pageSize]), [['pc.ram', 0x1000000, 0x200000], ['pc.rom', 0x20000, undefined]]);
    assert.ok(Buffer.concat(parse(stream).flatMap(encodeMainEvent)).equals(stream));
    // Without ADVISE the same bytes are misread, as QEMU's own loader would (it would not expect the field).
    assert.throws(() => parse(Buffer.concat([head(), stream.subarray(head(advise).length)])));
  });
});
