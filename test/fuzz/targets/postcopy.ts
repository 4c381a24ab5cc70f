// Postcopy structures (issue #8): the PACKAGED command's contents (split from the end, device
// sections delimited by their footers, a synthesized VMDESCRIPTION that must walk them exactly),
// and the preempt channel's bare page records together with discards and page requests.

import { RamFlag, ReturnPathMessage, TARGET_PAGE_SIZE } from '../../../src/codec/constants.js';
import { ProtocolError } from '../../../src/codec/errors.js';
import {
  PageRecordParser,
  decodeDiscard,
  decodePageRequest,
  encodeDiscards,
  encodeEofAndVmdesc,
  encodePageRequest,
  encodePostcopyListen,
  encodePostcopyRun,
  findDeviceSections,
  splitPackage,
  synthesizeVmdesc,
} from '../../../src/codec/postcopy.js';
import { encodeEos, encodePing, encodePageRecordHeader, encodeZeroRecord } from '../../../src/codec/stream-encode.js';
import { parseVmdesc, walkDeviceState } from '../../../src/codec/vmdesc.js';
import { chunkPlan, chunks, findVmdescRecord } from '../mutators.js';
import { firstDevice, mainStreams, unique } from '../seeds.js';
import { check, type Target } from '../target.js';
import { isProtocolError, protocolSignature } from './stream.js';


export const postcopyPackageTarget: Target = {
  name: 'postcopy-package',
  what: 'splitPackage + findDeviceSections + synthesizeVmdesc on packages built from the captures\' device sections: typed error or a split whose sections tile the device bytes and whose synthesized VMDESCRIPTION walks them exactly',
  seeds: () =>
    unique(mainStreams().slice(0, 6).map(({ s, data }) => {
      const dev = data.subarray(firstDevice(data));
      // The device sections: everything up to the EOF byte before the VMDESCRIPTION.
      const v = findVmdescRecord(dev) ?? dev.length + 1;
      const sections = dev.subarray(0, v - 1);
      return { name: s.label, data: Buffer.concat([encodePostcopyListen(), sections, encodePing(3), encodePing(0x42), encodePostcopyRun()]) };
    })),
  run(input) {
    const pkg = splitPackage(input);
    check(pkg.devices.length <= input.length, 'device bytes longer than the package');
    if (pkg.devices.length === 0) return `empty ${pkg.leading.length}/${pkg.trailing.length}`;
    const found = findDeviceSections(pkg.devices);
    let at = 0;
    for (const s of found) {
      check(s.offset === at, `section ${s.idstr} starts at ${s.offset}, expected ${at}`);
      check(s.length > 0 && s.bodyLength >= 0 && s.bodyLength < s.length, `section ${s.idstr} sizes`);
      at += s.length;
    }
    check(at === pkg.devices.length, `sections cover ${at} of ${pkg.devices.length} device bytes`);
    const tail = Buffer.concat([pkg.devices, ...encodeEofAndVmdesc(synthesizeVmdesc(found))]);
    const layout = walkDeviceState(tail, parseVmdesc(tail.subarray(pkg.devices.length + 1 + 5)), 0);
    check(layout.sections.length === found.length && layout.end === tail.length, 'the synthesized VMDESCRIPTION does not walk the sections exactly');
    return `ok ${Math.min(found.length, 50)} ${pkg.leading.length}/${pkg.trailing.length}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 256 * 1024,
};

const BLOCKS = new Map([['pc.ram', 64 * TARGET_PAGE_SIZE], ['vga.vram', 8 * TARGET_PAGE_SIZE]]);

function runRecords(input: Buffer, plan: readonly number[]): { events: string[]; error?: string } {
  const p = new PageRecordParser(BLOCKS);
  const events: string[] = [];
  try {
    for (const c of chunks(input, plan)) {
      p.push(c);
      for (let e = p.next(); e !== null; e = p.next()) {
        if (e.type === 'eos') {
          events.push('eos');
          continue;
        }
        const used = BLOCKS.get(e.block);
        check(used !== undefined && e.offset % TARGET_PAGE_SIZE === 0 && e.offset + TARGET_PAGE_SIZE <= used, `page ${e.block}+0x${e.offset.toString(16)} outside its block`);
        if (e.type === 'page') check(e.data.reduce((n, d) => n + d.length, 0) === TARGET_PAGE_SIZE, 'page data is not one page');
        events.push(`${e.type}:${e.block}:${e.offset}`);
      }
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    return { events, error: e.code };
  }
  return { events };
}

export const preemptTarget: Target = {
  name: 'postcopy-records',
  what: 'PageRecordParser (preempt channel) whole and re-chunked: same events, same error, every page inside its block; plus decodeDiscard and decodePageRequest on the same bytes (typed error or values in range)',
  seeds: () => [
    {
      name: 'records',
      data: Buffer.concat([
        encodePageRecordHeader(RamFlag.PAGE, 5 * TARGET_PAGE_SIZE, 'pc.ram'), Buffer.alloc(TARGET_PAGE_SIZE, 1),
        encodePageRecordHeader(RamFlag.PAGE, 6 * TARGET_PAGE_SIZE, undefined), Buffer.alloc(TARGET_PAGE_SIZE, 2),
        encodeZeroRecord(7 * TARGET_PAGE_SIZE, undefined),
        encodePageRecordHeader(RamFlag.PAGE, 3 * TARGET_PAGE_SIZE, 'vga.vram'), Buffer.alloc(TARGET_PAGE_SIZE, 3),
        encodeEos(),
      ]),
    },
    { name: 'discard', data: encodeDiscards('pc.ram', [{ start: 0, length: 8 * TARGET_PAGE_SIZE }, { start: 32 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }])[0]!.subarray(5) },
    { name: 'request', data: encodePageRequest({ block: 'pc.ram', start: 0x3000, length: 4096 }).subarray(4) },
  ],
  run(input, rng) {
    const whole = runRecords(input, [input.length]);
    const split = runRecords(input, chunkPlan(input.length, rng));
    check(whole.events.join() === split.events.join() && whole.error === split.error, 'chunking changes the page records');
    let extra = '';
    try {
      const d = decodeDiscard(input);
      check(d.ranges.length > 0 && d.ranges.every((r) => Number.isSafeInteger(r.start) && Number.isSafeInteger(r.length)), 'discard ranges');
      extra += ' discard';
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
    }
    for (const type of [ReturnPathMessage.REQ_PAGES, ReturnPathMessage.REQ_PAGES_ID]) {
      try {
        const r = decodePageRequest(type, input);
        check(Number.isSafeInteger(r.start) && r.length >= 0, 'page request values');
        extra += ` req${type}`;
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
      }
    }
    return `${whole.error ?? 'ok'} ${new Set(whole.events.map((e) => e.split(':')[0])).size}${extra}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 64 * 1024,
};
