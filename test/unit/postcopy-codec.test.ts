// Postcopy wire structures: discards, packages and their device sections, page requests, and the
// preempt channel's bare page records (split at every byte, as the parsers in pg-protocol are tested).

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { Command, RamFlag, ReturnPathMessage, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import {
  PageRecordParser,
  decodeDiscard,
  decodePageRequest,
  encodeDiscards,
  encodePageRequest,
  encodePostcopyListen,
  encodePostcopyRun,
  findDeviceSections,
  splitPackage,
  synthesizeVmdesc,
  encodeEofAndVmdesc,
  type PageRecordEvent,
} from '../../src/codec/postcopy.js';
import { ReturnPathParser } from '../../src/codec/return-path.js';
import { encodeCommand, encodePing, encodeEos, encodeFooter, encodePageRecordHeader, encodeSectionFull, encodeZeroRecord } from '../../src/codec/stream-encode.js';
import { walkDeviceState, parseVmdesc } from '../../src/codec/vmdesc.js';

const section = (id: number, idstr: string, body: Buffer): Buffer => Buffer.concat([encodeSectionFull(SectionType.FULL, id, idstr, 0, 1), body, encodeFooter(id)]);

describe('postcopy codec', () => {
  test('discard commands round-trip and split into several commands', () => {
    const ranges = Array.from({ length: 300 }, (_, i) => ({ start: i * 2 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }));
    const cmds = encodeDiscards('pc.ram', ranges);
    assert.equal(cmds.length, 2);
    const back = cmds.flatMap((c) => {
      assert.equal(c[0], SectionType.COMMAND);
      assert.equal(c.readUInt16BE(1), Command.POSTCOPY_RAM_DISCARD);
      assert.equal(c.readUInt16BE(3), c.length - 5);
      const d = decodeDiscard(c.subarray(5));
      assert.equal(d.block, 'pc.ram');
      return d.ranges;
    });
    assert.deepEqual(back, ranges);
  });

  test('bad discards are typed errors', () => {
    const good = encodeDiscards('pc.ram', [{ start: 0, length: 4096 }])[0]!.subarray(5);
    for (const bad of [good.subarray(0, 10), Buffer.concat([good, Buffer.alloc(3)]), Buffer.from([1, ...good.subarray(1)])]) {
      assert.throws(() => decodeDiscard(bad), ProtocolError);
    }
    const noNul = Buffer.from(good);
    noNul[2 + 6] = 0x41;
    assert.throws(() => decodeDiscard(noNul), /NUL/);
  });

  test('a package splits into LISTEN, device sections, PINGs and RUN; sections are found by their footers', () => {
    // The second body holds a false footer of its own id followed by a FULL byte, and the third
    // ends with bytes that look like the start of a PING.
    const fake = Buffer.concat([Buffer.from('abc'), encodeFooter(7), Buffer.from([SectionType.FULL, 1, 2])]);
    const devs = [section(3, 'timer', Buffer.alloc(20, 1)), section(7, 'cpu', fake), section(9, 'rtc', Buffer.from([8, 0, 2, 0, 4]))];
    const pkg = Buffer.concat([encodePostcopyListen(), ...devs, encodePing(3), encodePing(0x42), encodePostcopyRun()]);
    const parts = splitPackage(pkg);
    assert.deepEqual(parts.leading.map((c) => c.cmd), [Command.POSTCOPY_LISTEN]);
    assert.deepEqual(parts.trailing.map((c) => c.cmd), [Command.PING, Command.PING, Command.POSTCOPY_RUN]);
    assert.deepEqual(parts.trailing.slice(0, 2).map((c) => c.payload.readUInt32BE(0)), [3, 0x42]);
    assert.ok(parts.devices.equals(Buffer.concat(devs)));
    const found = findDeviceSections(parts.devices);
    assert.deepEqual(found.map((s) => [s.idstr, s.sectionId, s.length]), devs.map((d, i) => [['timer', 'cpu', 'rtc'][i], [3, 7, 9][i], d.length]));
    // The synthesized description walks the sections exactly, as our file readers require.
    const tail = Buffer.concat([parts.devices, ...encodeEofAndVmdesc(synthesizeVmdesc(found))]);
    const vmdescAt = parts.devices.length + 1;
    const layout = walkDeviceState(tail, parseVmdesc(tail.subarray(vmdescAt + 5)), 0);
    assert.equal(layout.sections.length, 3);
    assert.equal(layout.end, tail.length);
  });

  test('malformed packages are typed errors', () => {
    const dev = section(3, 'timer', Buffer.alloc(4));
    for (const bad of [
      Buffer.alloc(0),
      Buffer.concat([encodePostcopyListen(), dev.subarray(0, dev.length - 1), encodePostcopyRun()]),
      Buffer.concat([encodePostcopyListen(), Buffer.from([SectionType.COMMAND, 0, 4])]),
      Buffer.concat([encodeCommand(Command.PACKAGED, Buffer.alloc(4)), encodePostcopyRun()]),
    ]) {
      assert.throws(() => splitPackage(bad), ProtocolError, bad.toString('hex'));
    }
    assert.throws(() => findDeviceSections(Buffer.concat([dev, Buffer.from([1, 2, 3])])), /delimited/);
  });

  test('findDeviceSections stays bounded on a body full of false footers', () => {
    const body = Buffer.concat(Array.from({ length: 5000 }, () => Buffer.concat([encodeFooter(5), Buffer.from([SectionType.FULL])])));
    assert.throws(() => findDeviceSections(Buffer.concat([encodeSectionFull(SectionType.FULL, 5, 'x', 0, 1), body]), 20000), ProtocolError);
  });

  test('page requests round-trip through the return-path parser', () => {
    const msgs = [encodePageRequest({ block: 'pc.ram', start: 0x1234000, length: 4096 }), encodePageRequest({ start: 0x5000, length: 8192 })];
    const p = new ReturnPathParser();
    p.push(Buffer.concat(msgs));
    const a = p.next()!;
    const b = p.next()!;
    assert.equal(a.type, ReturnPathMessage.REQ_PAGES_ID);
    assert.deepEqual(decodePageRequest(a.type, a.payload), { block: 'pc.ram', start: 0x1234000, length: 4096 });
    assert.deepEqual(decodePageRequest(b.type, b.payload), { start: 0x5000, length: 8192 });
    const bad = Buffer.from(a.payload);
    bad[12] = 50;
    assert.throws(() => decodePageRequest(a.type, bad), /name length/);
  });

  test('preempt page records parse the same at every split point', () => {
    const blocks = new Map([['pc.ram', 64 * TARGET_PAGE_SIZE], ['vga.vram', 4 * TARGET_PAGE_SIZE]]);
    const page = (fill: number): Buffer => Buffer.alloc(TARGET_PAGE_SIZE, fill);
    const stream = Buffer.concat([
      encodePageRecordHeader(RamFlag.PAGE, 5 * TARGET_PAGE_SIZE, 'pc.ram'), page(1),
      encodePageRecordHeader(RamFlag.PAGE, 6 * TARGET_PAGE_SIZE, undefined), page(2),
      encodeZeroRecord(7 * TARGET_PAGE_SIZE, undefined),
      encodePageRecordHeader(RamFlag.PAGE, 3 * TARGET_PAGE_SIZE, 'vga.vram'), page(3),
      encodeEos(),
    ]);
    const summary = (evs: PageRecordEvent[]): string[] => evs.map((e) => e.type === 'eos' ? 'eos' : `${e.type} ${e.block} ${e.offset / TARGET_PAGE_SIZE}${e.type === 'page' ? ` ${Buffer.concat(e.data)[0]}` : ''}`);
    const expected = ['page pc.ram 5 1', 'page pc.ram 6 2', 'zero pc.ram 7', 'page vga.vram 3 3', 'eos'];
    fc.assert(fc.property(fc.array(fc.integer({ min: 1, max: stream.length }), { maxLength: 6 }), (cuts) => {
      const p = new PageRecordParser(blocks);
      const evs: PageRecordEvent[] = [];
      let at = 0;
      for (const cut of [...cuts.sort((x, y) => x - y), stream.length]) {
        if (cut <= at) continue;
        p.push(stream.subarray(at, cut));
        at = cut;
        for (let e = p.next(); e; e = p.next()) evs.push(e);
      }
      assert.deepEqual(summary(evs), expected);
      assert.ok(p.atBoundary);
    }), { numRuns: 200 });
  });

  test('preempt records outside a block, of an unknown block or with other flags are typed errors', () => {
    const blocks = new Map([['pc.ram', 4 * TARGET_PAGE_SIZE]]);
    for (const bad of [
      encodePageRecordHeader(RamFlag.PAGE, 4 * TARGET_PAGE_SIZE, 'pc.ram'),
      encodePageRecordHeader(RamFlag.PAGE, 0, 'nope'),
      encodePageRecordHeader(RamFlag.PAGE, 0, undefined),
      Buffer.from([0, 0, 0, 0, 0, 0, 2, 0]),
    ]) {
      const p = new PageRecordParser(blocks);
      p.push(Buffer.concat([bad, Buffer.alloc(TARGET_PAGE_SIZE)]));
      assert.throws(() => p.next(), ProtocolError, bad.toString('hex'));
    }
  });
});
