// StreamSnapshot against QEMU's own plain stream files (10.0 and 11.1) and against synthetic files
// that exercise what a paused guest never produces: pages sent twice, pages zeroed later, CONTINUE
// chains to coalesce; plus truncated and foreign files, which must fail with a clear typed error.

import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Command, RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { ProtocolError, type ProtocolErrorCode } from '../../src/codec/errors.js';
import {
  encodeBlockEntry,
  encodeCommand,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeMultifdFlush,
  encodePageRecordHeader,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
  encodeSwitchoverStart,
  encodeZeroRecord,
} from '../../src/codec/stream-encode.js';
import { StreamSnapshot } from '../../src/engine/stream-snapshot.js';
import { BLOB_OFFSET, FIXTURES_DIR, guestBlob, scenarios, type CheckBlockMemory } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;
const STRIDE = PAGE + 8;

const dir = mkdtempSync(join(tmpdir(), 'stream-snapshot-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let fileNo = 0;

function tempFile(data: Buffer): string {
  const p = join(dir, `f${fileNo++}.mig`);
  writeFileSync(p, data);
  return p;
}

function isCode(code: ProtocolErrorCode, msg?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `expected a ProtocolError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    if (msg) assert.match(e.message, msg);
    return true;
  };
}

const openFds = (): number => readdirSync('/proc/self/fd').length;
const haveProcFds = existsSync('/proc/self/fd');

async function openBytes(data: Buffer): Promise<StreamSnapshot> {
  return StreamSnapshot.open(tempFile(data));
}

/** Reads every present page of `block` through loadRuns, in batches, into a full image. */
async function readBlock(s: StreamSnapshot, block: string, usedLength: number, batchPages = 128): Promise<{ image: Buffer; pages: number }> {
  const image = Buffer.alloc(usedLength);
  const scratch = Buffer.allocUnsafe(s.scratchBytes(batchPages));
  let next = 0;
  let total = 0;
  for (;;) {
    const runs: number[] = [];
    let pages = 0;
    s.forEachRun(block, (first, count) => {
      const take = Math.min(count, batchPages - pages);
      runs.push(first, take);
      pages += take;
      next = first + take;
      return pages < batchPages;
    }, next);
    if (pages === 0) break;
    const views = await s.loadRuns(block, runs, runs.length / 2, scratch);
    const data = Buffer.concat(views);
    assert.equal(data.length, pages * PAGE, 'views cover exactly the requested pages');
    let at = 0;
    for (let r = 0; r < runs.length; r += 2) {
      data.copy(image, runs[r]! * PAGE, at, at + runs[r + 1]! * PAGE);
      at += runs[r + 1]! * PAGE;
    }
    total += pages;
  }
  return { image, pages: total };
}

// ---------------------------------------------------------------------------------------------
// QEMU captures

for (const sc of scenarios((e) => e.scenario === 'stream-file')) {
  describe(`StreamSnapshot on QEMU ${sc.label}`, () => {
    const m = sc.check.main;
    const bytes = (): Buffer => sc.main();

    test('prologue, blocks and device state match check.json', async () => {
      const s = await openBytes(bytes());
      try {
        assert.equal(s.format, 'stream');
        assert.equal(s.fileSize, m.bytes);
        assert.equal(s.configuration.machine, m.machine);
        assert.deepEqual(s.configuration.capabilities, []);
        assert.deepEqual(s.blockList, m.ram_blocks.map((b) => ({ name: b.name, usedLength: b.used_length })));
        assert.deepEqual(s.ramSection, { sectionId: m.ram_section_id, instanceId: 0, versionId: 4 });
        assert.equal(s.switchoverStart, true);
        assert.equal(s.deviceState.sections.length, m.device_sections);
        assert.deepEqual(s.deviceState.sections.map((d) => d.idstr), m.device_order);
        assert.equal(s.deviceState.fileOffset, m.offsets['first_device']);
        assert.equal(s.deviceState.fileOffset + s.deviceState.eofOffset, m.offsets['eof']);
        assert.equal(s.deviceState.fileOffset + s.deviceState.vmdescOffset!, m.vmdesc_offset);
        assert.equal(s.deviceState.fileOffset + s.deviceState.end, s.fileSize);
      } finally {
        await s.close();
      }
    });

    test('pc.ram: present runs rebuild the blob at BLOB_OFFSET, every other page is zero', async () => {
      const s = await openBytes(bytes());
      try {
        const blob = guestBlob();
        const runs: [number, number][] = [];
        s.forEachRun('pc.ram', (f, c) => void runs.push([f, c]));
        // Only non-zero pages are present: the blob's 20 pages, nothing else.
        assert.deepEqual(runs, [[BLOB_OFFSET / PAGE, blob.length / PAGE]]);
        assert.equal(s.presentPages('pc.ram'), blob.length / PAGE);
        const { image, pages } = await readBlock(s, 'pc.ram', 16 * 1024 * 1024);
        assert.equal(pages, blob.length / PAGE);
        assert.ok(image.subarray(BLOB_OFFSET, BLOB_OFFSET + blob.length).equals(blob), 'blob bytes');
        assert.ok(image.subarray(0, BLOB_OFFSET).every((b) => b === 0), 'below the blob is zero');
        assert.ok(image.subarray(BLOB_OFFSET + blob.length).every((b) => b === 0), 'above the blob is zero');
      } finally {
        await s.close();
      }
    });

    test('every block rebuilt from its present pages has the sha256 capture.py computed', async () => {
      const mem = sc.check.memory;
      assert.ok(mem, 'check.json has memory facts');
      const s = await openBytes(bytes());
      try {
        for (const b of s.blockList) {
          const facts: CheckBlockMemory | undefined = mem.blocks[b.name];
          assert.ok(facts, `memory facts for ${b.name}`);
          assert.equal(s.presentPages(b.name), facts.nonzero_pages, `${b.name} present pages`);
          // Small batches: runs get split across loadRuns calls and resumed with fromPage.
          const { image, pages } = await readBlock(s, b.name, b.usedLength, 7);
          assert.equal(pages, facts.nonzero_pages);
          assert.equal(createHash('sha256').update(image).digest('hex'), facts.sha256, `${b.name} sha256`);
        }
      } finally {
        await s.close();
      }
    });

    test('readAt returns the device state bytes of the file', async () => {
      const data = bytes();
      const s = await openBytes(data);
      try {
        const at = s.deviceState.fileOffset;
        const got = await s.readAt(at, s.deviceState.end);
        assert.ok(got.equals(data.subarray(at)));
        const into = Buffer.alloc(100);
        const part = await s.readAt(at, 64, into);
        assert.equal(part.buffer, into.buffer);
        assert.ok(part.equals(data.subarray(at, at + 64)));
        await assert.rejects(s.readAt(data.length - 10, 20), isCode('TRUNCATED'));
        await assert.rejects(s.readAt(0, 200, into), RangeError);
      } finally {
        await s.close();
      }
    });

    test('truncated copies are refused with TRUNCATED and a message saying where', async () => {
      const data = bytes();
      const blob = guestBlob();
      const blobData = data.indexOf(blob.subarray(0, PAGE));
      assert.ok(blobData > 0, 'blob page found in the file');
      const cuts: [string, number, RegExp][] = [
        ['empty', 0, /shorter than the 8-byte stream header/],
        ['inside the header', 5, /shorter than the 8-byte stream header/],
        ['inside the configuration', m.config_end - 3, /inside the configuration record/],
        ['inside the RAM START section', m.offsets['ram_START']! + 20, /inside RAM section 1/],
        ['inside a PAGE record', blobData + 100, /inside RAM section 1/],
        ['before the device state', m.offsets['first_device']!, /after the RAM section, before the device state/],
        ['inside the device state', m.offsets['first_device']! + 50, /does not end with a VMDESCRIPTION/],
        ['at EOF, before the vmdesc', m.vmdesc_offset, /does not end with a VMDESCRIPTION/],
        ['inside the vmdesc JSON', m.vmdesc_offset + 1000, /does not end with a VMDESCRIPTION/],
        ['one byte short', data.length - 1, /does not end with a VMDESCRIPTION/],
      ];
      const fds = haveProcFds ? openFds() : 0;
      for (const [what, cut, msg] of cuts) {
        await assert.rejects(openBytes(data.subarray(0, cut)), (e: unknown) => {
          isCode('TRUNCATED', msg)(e);
          assert.match((e as Error).message, /truncated/, what);
          return true;
        }, what);
      }
      if (haveProcFds) assert.equal(openFds(), fds, 'every failed open closed its file');
    });
  });
}

for (const sc of scenarios((e) => e.scenario === 'mapped-ram-file')) {
  test(`StreamSnapshot refuses the mapped-ram file ${sc.label}`, async () => {
    await assert.rejects(openBytes(sc.main()), isCode('BAD_RECORD', /mapped-ram file/));
  });
}

// ---------------------------------------------------------------------------------------------
// Synthetic files

const SID = 2;
const RAM = 'ram0';
const ROM = 'rom';
const RAM_PAGES = 64;
const ROM_PAGES = 4;
const CHAIN_FIRST = 10;
const CHAIN_LAST = 20;
const ROM_TAG = 0x7001;

function pageOf(tag: number): Buffer {
  const b = Buffer.alloc(PAGE, tag & 0xff);
  b.writeUInt32BE(tag, 0);
  b.writeUInt32BE(~tag >>> 0, PAGE - 4);
  return b;
}

const page = (flag: typeof RamFlag.PAGE | typeof RamFlag.ZERO, p: number, block: string | undefined): Buffer => encodePageRecordHeader(flag, p * PAGE, block);

type Piece = [label: string, bytes: Buffer];

/**
 * The expected final state of the synthetic guest: ram0 page 5 = v2 (sent twice), 6 zero (data
 * then ZERO), 7 zero (PAGE of zeros), 8 zero (data then a PAGE of zeros), 10..20 a CONTINUE
 * chain, 30 after a ZERO record; rom page 1.
 */
const expectedRam = new Map<number, Buffer>([[5, pageOf(0x5002)], ...Array.from({ length: CHAIN_LAST - CHAIN_FIRST + 1 }, (_, i) => [CHAIN_FIRST + i, pageOf(0x1000 + i)] as [number, Buffer]), [30, pageOf(0x3000)]]);

function syntheticPieces(): Piece[] {
  const state = Buffer.from('synthetic device state!');
  const vmdesc = Buffer.from(JSON.stringify({
    page_size: PAGE,
    devices: [{ name: 'test-device', instance_id: 0, vmsd_name: 'test-device', version: 1, fields: [{ name: 'state', type: 'buffer', size: state.length }] }],
  }));
  const vmdescLen = Buffer.alloc(4);
  vmdescLen.writeUInt32BE(vmdesc.length);
  const chain: Piece[] = [];
  for (let p = CHAIN_FIRST; p <= CHAIN_LAST; p++) chain.push([`chain-${p}`, Buffer.concat([page(RamFlag.PAGE, p, undefined), pageOf(0x1000 + p - CHAIN_FIRST)])]);
  return [
    ['header', encodeStreamHeader()],
    ['config', encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] })],
    ['start', encodeSectionFull(SectionType.START, SID, 'ram', 0, 4)],
    ['mem-size', encodeMemSize((RAM_PAGES + ROM_PAGES) * PAGE)],
    ['block-ram', encodeBlockEntry(RAM, RAM_PAGES * PAGE)],
    ['block-rom', encodeBlockEntry(ROM, ROM_PAGES * PAGE)],
    ['start-eos', encodeEos()],
    ['start-footer', encodeFooter(SID)],
    ['part1', encodeSectionShort(SectionType.PART, SID)],
    ['p5-v1', Buffer.concat([page(RamFlag.PAGE, 5, RAM), pageOf(0x5001)])],
    ['p6-data', Buffer.concat([page(RamFlag.PAGE, 6, undefined), pageOf(0x6001)])],
    ['p7-zeros', Buffer.concat([page(RamFlag.PAGE, 7, undefined), Buffer.alloc(PAGE)])],
    ['p8-data', Buffer.concat([page(RamFlag.PAGE, 8, undefined), pageOf(0x8001)])],
    ...chain,
    ['rom-p1', Buffer.concat([page(RamFlag.PAGE, 1, ROM), pageOf(ROM_TAG)])],
    ['part1-eos', encodeEos()],
    ['part1-footer', encodeFooter(SID)],
    ['part2', encodeSectionShort(SectionType.PART, SID)],
    // CONTINUE across sections: the last block named was rom.
    ['rom-p2-zero', encodeZeroRecord(2 * PAGE, undefined)],
    ['p5-v2', Buffer.concat([page(RamFlag.PAGE, 5, RAM), pageOf(0x5002)])],
    ['p6-zero', encodeZeroRecord(6 * PAGE, undefined)],
    ['p8-zeros', Buffer.concat([page(RamFlag.PAGE, 8, undefined), Buffer.alloc(PAGE)])],
    ['p30', Buffer.concat([page(RamFlag.PAGE, 30, undefined), pageOf(0x3000)])],
    ['part2-eos', encodeEos()],
    ['part2-footer', encodeFooter(SID)],
    ['switchover', encodeSwitchoverStart()],
    ['end', encodeSectionShort(SectionType.END, SID)],
    ['end-eos', encodeEos()],
    ['end-footer', encodeFooter(SID)],
    ['device', Buffer.concat([encodeSectionFull(SectionType.FULL, 3, 'test-device', 0, 1), state, encodeFooter(3)])],
    ['eof', Buffer.from([SectionType.EOF])],
    ['vmdesc', Buffer.concat([Buffer.from([SectionType.VMDESCRIPTION]), vmdescLen, vmdesc])],
  ];
}

function assemble(pieces: Piece[]): { data: Buffer; at: (label: string) => number } {
  const offsets = new Map<string, number>();
  let n = 0;
  for (const [label, b] of pieces) {
    offsets.set(label, n);
    n += b.length;
  }
  return {
    data: Buffer.concat(pieces.map((p) => p[1])),
    at: (label) => {
      const o = offsets.get(label);
      assert.ok(o !== undefined, `no piece ${label}`);
      return o;
    },
  };
}

/** The synthetic pieces with `insert` placed before the piece labelled `before` (or `label` replaced). */
function edited(edit: { before?: string; replace?: string; piece: Piece }): Buffer {
  const pieces = syntheticPieces();
  const i = pieces.findIndex(([l]) => l === (edit.before ?? edit.replace));
  assert.ok(i >= 0);
  pieces.splice(i, edit.replace ? 1 : 0, edit.piece);
  return assemble(pieces).data;
}

/** Counts positioned reads on the snapshot's file handle. */
function countReads(s: StreamSnapshot): { calls: number } {
  const fh = (s as unknown as { fh: { read: (...a: unknown[]) => Promise<unknown> } }).fh;
  const counter = { calls: 0 };
  const orig = fh.read.bind(fh);
  fh.read = (...a: unknown[]) => {
    counter.calls++;
    return orig(...a);
  };
  return counter;
}

describe('StreamSnapshot on a synthetic running-guest file', () => {
  const built = assemble(syntheticPieces());

  test('prologue, block list and device state', async () => {
    const s = await openBytes(built.data);
    try {
      assert.deepEqual(s.blockList, [{ name: RAM, usedLength: RAM_PAGES * PAGE }, { name: ROM, usedLength: ROM_PAGES * PAGE }]);
      assert.deepEqual(s.ramSection, { sectionId: SID, instanceId: 0, versionId: 4 });
      assert.equal(s.switchoverStart, true);
      assert.equal(s.deviceState.fileOffset, built.at('device'));
      assert.deepEqual(s.deviceState.sections.map((d) => [d.idstr, d.sectionId]), [['test-device', 3]]);
      assert.equal(s.deviceState.eofOffset + s.deviceState.fileOffset, built.at('eof'));
      assert.equal(s.deviceState.fileOffset + s.deviceState.end, built.data.length);
      assert.equal(s.fileSize, built.data.length);
    } finally {
      await s.close();
    }
  });

  test('the last copy of a page wins; ZERO records and all-zero PAGE records leave a page absent', async () => {
    const s = await openBytes(built.data);
    try {
      const runs: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void runs.push([f, c]));
      assert.deepEqual(runs, [[5, 1], [CHAIN_FIRST, CHAIN_LAST - CHAIN_FIRST + 1], [30, 1]]);
      assert.equal(s.presentPages(RAM), expectedRam.size);
      assert.equal(s.presentPages(ROM), 1);
      const { image } = await readBlock(s, RAM, RAM_PAGES * PAGE);
      for (let p = 0; p < RAM_PAGES; p++) {
        const want = expectedRam.get(p) ?? Buffer.alloc(PAGE);
        assert.ok(image.subarray(p * PAGE, (p + 1) * PAGE).equals(want), `ram0 page ${p}`);
      }
      const rom = await readBlock(s, ROM, ROM_PAGES * PAGE);
      assert.equal(rom.pages, 1);
      assert.ok(rom.image.subarray(PAGE, 2 * PAGE).equals(pageOf(ROM_TAG)));
    } finally {
      await s.close();
    }
  });

  test('forEachRun clips at fromPage and stops when visit returns false', async () => {
    const s = await openBytes(built.data);
    try {
      const from: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void from.push([f, c]), 15);
      assert.deepEqual(from, [[15, CHAIN_LAST - 15 + 1], [30, 1]]);
      const first: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => {
        first.push([f, c]);
        return false;
      });
      assert.deepEqual(first, [[5, 1]]);
      const none: number[] = [];
      s.forEachRun(RAM, (f) => void none.push(f), 31);
      assert.deepEqual(none, []);
    } finally {
      await s.close();
    }
  });

  test('loadRuns reads a CONTINUE chain with one positioned read and skips the record headers', async () => {
    const s = await openBytes(built.data);
    try {
      const reads = countReads(s);
      const count = CHAIN_LAST - CHAIN_FIRST + 1;
      const scratch = Buffer.alloc(s.scratchBytes(count + 2), 0xee);
      const runs = [5, 1, CHAIN_FIRST, count, 30, 1];
      const views = await s.loadRuns(RAM, runs, 3, scratch);
      assert.equal(reads.calls, 3, 'one read for page 5, one for the chain, one for page 30');
      const want = Buffer.concat([expectedRam.get(5)!, ...Array.from({ length: count }, (_, i) => expectedRam.get(CHAIN_FIRST + i)!), expectedRam.get(30)!]);
      assert.ok(Buffer.concat(views).equals(want));
      for (const v of views) assert.equal(v.buffer, scratch.buffer, 'views point into scratch');
      // Scratch: page 5 and page 10 back to back (one view), pages 11..20 one record apart with
      // the CONTINUE headers read in between (one view each), page 30 right after page 20.
      const starts = views.map((v) => v.byteOffset - scratch.byteOffset);
      assert.deepEqual(views.map((v) => v.length / PAGE), [2, ...Array<number>(count - 2).fill(1), 2]);
      assert.equal(starts[0], 0);
      assert.ok(scratch.subarray(2 * PAGE, 2 * PAGE + 8).equals(page(RamFlag.PAGE, CHAIN_FIRST + 1, undefined)), 'the CONTINUE header of page 11 lies between pages 10 and 11');
      for (let i = 1; i < views.length - 1; i++) assert.equal(starts[i]! - (i === 1 ? PAGE : starts[i - 1]!), i === 1 ? PAGE + 8 : STRIDE, `chain view ${i}`);
    } finally {
      await s.close();
    }
  });

  test('loadRuns reads isolated pages one by one and packs them into one view', async () => {
    const s = await openBytes(built.data);
    try {
      const reads = countReads(s);
      const scratch = Buffer.alloc(s.scratchBytes(2));
      const views = await s.loadRuns(RAM, [5, 1, 30, 1], 2, scratch);
      assert.equal(reads.calls, 2);
      assert.equal(views.length, 1, 'back-to-back pages in scratch share a view');
      assert.ok(views[0]!.equals(Buffer.concat([expectedRam.get(5)!, expectedRam.get(30)!])));
    } finally {
      await s.close();
    }
  });

  test('loadRuns fills pages that are not present with zeros instead of failing', async () => {
    const s = await openBytes(built.data);
    try {
      const scratch = Buffer.alloc(s.scratchBytes(5), 0xee);
      // 5 present, 6..8 zero in the final state, and 9 never sent.
      const views = await s.loadRuns(RAM, [5, 5], 1, scratch);
      const data = Buffer.concat(views);
      assert.equal(data.length, 5 * PAGE);
      assert.ok(data.subarray(0, PAGE).equals(expectedRam.get(5)!));
      assert.ok(data.subarray(PAGE).every((b) => b === 0));
    } finally {
      await s.close();
    }
  });

  test('loadRuns: exact scratchBytes suffices, less is a RangeError, bad runs and blocks are refused', async () => {
    const s = await openBytes(built.data);
    try {
      const count = CHAIN_LAST - CHAIN_FIRST + 1;
      const exact = Buffer.alloc(s.scratchBytes(count));
      assert.equal(Buffer.concat(await s.loadRuns(RAM, [CHAIN_FIRST, count], 1, exact)).length, count * PAGE);
      // count × 4096 holds the pages but not the headers read between them.
      await assert.rejects(s.loadRuns(RAM, [CHAIN_FIRST, count], 1, Buffer.alloc(count * PAGE)), (e: unknown) => e instanceof RangeError && /too small/.test(e.message));
      await assert.rejects(s.loadRuns(RAM, [5, 1], 1, Buffer.alloc(PAGE - 1)), RangeError);
      await assert.rejects(s.loadRuns(RAM, [RAM_PAGES - 1, 2], 1, Buffer.alloc(s.scratchBytes(2))), RangeError);
      await assert.rejects(s.loadRuns(RAM, [-1, 1], 1, Buffer.alloc(s.scratchBytes(1))), RangeError);
      await assert.rejects(s.loadRuns('nope', [0, 1], 1, Buffer.alloc(s.scratchBytes(1))), isCode('UNKNOWN_BLOCK', /"nope"/));
      assert.throws(() => s.presentPages('nope'), isCode('UNKNOWN_BLOCK'));
      assert.throws(() => s.forEachRun('nope', () => {}), isCode('UNKNOWN_BLOCK'));
    } finally {
      await s.close();
    }
  });

  test('concurrent loadRuns with distinct scratch buffers', async () => {
    const s = await openBytes(built.data);
    try {
      const count = CHAIN_LAST - CHAIN_FIRST + 1;
      const a = Buffer.alloc(s.scratchBytes(count));
      const b = Buffer.alloc(s.scratchBytes(2));
      const [va, vb] = await Promise.all([s.loadRuns(RAM, [CHAIN_FIRST, count], 1, a), s.loadRuns(RAM, [5, 1, 30, 1], 2, b)]);
      assert.ok(Buffer.concat(va).equals(Buffer.concat(Array.from({ length: count }, (_, i) => expectedRam.get(CHAIN_FIRST + i)!))));
      assert.ok(Buffer.concat(vb).equals(Buffer.concat([expectedRam.get(5)!, expectedRam.get(30)!])));
    } finally {
      await s.close();
    }
  });

  test('a file shortened after open: loadRuns fails with TRUNCATED', async () => {
    const path = tempFile(built.data);
    const s = await StreamSnapshot.open(path);
    try {
      writeFileSync(path, built.data.subarray(0, built.at('chain-15')));
      const scratch = Buffer.alloc(s.scratchBytes(11));
      await assert.rejects(s.loadRuns(RAM, [CHAIN_FIRST, 11], 1, scratch), isCode('TRUNCATED', /truncated or changed/));
    } finally {
      await s.close();
    }
  });

  test('truncated synthetic files', async () => {
    const cuts: [string, number, RegExp][] = [
      ['inside the header', 3, /stream header/],
      ['right after the header', 8, /right after the stream header, before the configuration record/],
      ['inside the configuration', built.at('start') - 2, /inside the configuration record/],
      ['inside the block list', built.at('block-rom') + 3, /inside RAM section 2 \(before its END\)/],
      ['inside a PAGE record', built.at('chain-12') + 8 + 1000, /inside RAM section 2/],
      ['inside a ZERO record', built.at('p6-zero') + 4, /inside RAM section 2/],
      ['before the END footer', built.at('end-footer'), /inside RAM section 2 \(in its END part, before the footer\)/],
      ['after the RAM section', built.at('device'), /after the RAM section, before the device state$/],
      ['inside the first device section header', built.at('device') + 12, /after the RAM section, before the device state, in the record that starts at 0x/],
      ['inside the device state', built.at('device') + 30, /does not end with a VMDESCRIPTION/],
      ['just before the vmdesc', built.at('vmdesc'), /does not end with a VMDESCRIPTION/],
    ];
    for (const [what, cut, msg] of cuts) {
      await assert.rejects(openBytes(built.data.subarray(0, cut)), isCode('TRUNCATED', msg), what);
    }
  });

  test('a MULTIFD_FLUSH record is refused', async () => {
    await assert.rejects(openBytes(edited({ before: 'start-eos', piece: ['flush', encodeMultifdFlush()] })), isCode('BAD_RECORD', /MULTIFD_FLUSH/));
    await assert.rejects(openBytes(edited({ before: 'part2-eos', piece: ['flush', encodeMultifdFlush()] })), isCode('BAD_RECORD', /MULTIFD_FLUSH/));
  });

  test('commands other than SWITCHOVER_START are refused, naming the command; POSTCOPY_ADVISE is tolerated', async () => {
    await assert.rejects(openBytes(edited({ before: 'start', piece: ['orp', encodeCommand(Command.OPEN_RETURN_PATH)] })), isCode('UNSUPPORTED', /command 1 \(OPEN_RETURN_PATH\)/));
    await assert.rejects(openBytes(edited({ before: 'end', piece: ['ping', encodeCommand(Command.PING, Buffer.from([0, 0, 0, 1]))] })), isCode('UNSUPPORTED', /command 2 \(PING\)/));
    const s = await openBytes(edited({ before: 'start', piece: ['advise', encodeCommand(Command.POSTCOPY_ADVISE, Buffer.alloc(16))] }));
    assert.equal(s.presentPages(RAM), expectedRam.size);
    await s.close();
  });

  test('no SWITCHOVER_START: opens, switchoverStart false', async () => {
    const pieces = syntheticPieces().filter(([l]) => l !== 'switchover');
    const s = await openBytes(assemble(pieces).data);
    try {
      assert.equal(s.switchoverStart, false);
    } finally {
      await s.close();
    }
  });

  test('RAM section structure: a second START, a PART after END, device state before END', async () => {
    await assert.rejects(openBytes(edited({ before: 'device', piece: ['start2', encodeSectionFull(SectionType.START, 9, 'ram', 0, 4)] })), isCode('BAD_RECORD', /second RAM section START/));
    await assert.rejects(
      openBytes(edited({ before: 'device', piece: ['part3', Buffer.concat([encodeSectionShort(SectionType.PART, SID), encodeEos(), encodeFooter(SID)])] })),
      isCode('BAD_RECORD', /after the section's END/),
    );
    const noEnd = syntheticPieces().filter(([l]) => !['end', 'end-eos', 'end-footer'].includes(l));
    await assert.rejects(openBytes(assemble(noEnd).data), isCode('BAD_RECORD', /before the END of RAM section 2/));
  });

  test('no configuration record, bad magic, device state that disagrees with the vmdesc', async () => {
    await assert.rejects(openBytes(edited({ replace: 'config', piece: ['config', Buffer.alloc(0)] })), isCode('BAD_RECORD', /no configuration record/));
    const bad = Buffer.from(built.data);
    bad.writeUInt32BE(0x12345678, 0);
    await assert.rejects(openBytes(bad), isCode('BAD_MAGIC'));
    const pieces = syntheticPieces();
    const dev = pieces.find(([l]) => l === 'device')!;
    // One byte more of state than the vmdesc describes: the footer is not where it must be.
    dev[1] = Buffer.concat([encodeSectionFull(SectionType.FULL, 3, 'test-device', 0, 1), Buffer.from('synthetic device state!!'), encodeFooter(3)]);
    await assert.rejects(openBytes(assemble(pieces).data), isCode('BAD_VMDESC', /footer/));
  });
});

describe('StreamSnapshot: the page index follows the pages in the file, not the claimed block size', () => {
  /** Pieces of the synthetic file with ram0 claiming `ramBytes` and `extra` data pages of ram0 added. */
  function hugeBlockFile(ramBytes: number, extra: number[]): Buffer {
    const pieces = syntheticPieces();
    const set = (label: string, bytes: Buffer): void => {
      pieces.find(([l]) => l === label)![1] = bytes;
    };
    set('mem-size', encodeMemSize(ramBytes + ROM_PAGES * PAGE));
    set('block-ram', encodeBlockEntry(RAM, ramBytes));
    const i = pieces.findIndex(([l]) => l === 'part2-eos');
    pieces.splice(i, 0, ...extra.map((p, k): Piece => [`extra-${p}`, Buffer.concat([page(RamFlag.PAGE, p, RAM), pageOf(0x9000 + k)])]));
    return assemble(pieces).data;
  }
  const chainPieces = (maxRun: number): [number, number][] => {
    const out: [number, number][] = [];
    for (let f = CHAIN_FIRST; f <= CHAIN_LAST; f += maxRun) out.push([f, Math.min(maxRun, CHAIN_LAST + 1 - f)]);
    return out;
  };
  const chunksOf = (s: StreamSnapshot, block: string): number => (s as unknown as { blocks: Map<string, { index: { chunkCount: number } }> }).blocks.get(block)!.index.chunkCount;

  test('a 16 TiB block with pages at both ends and a run across an index chunk boundary', async () => {
    const huge = 2 ** 44;
    const last = huge / PAGE - 1;
    const extra = [510, 511, 512, 513, 2 ** 31, last];
    const s = await openBytes(hugeBlockFile(huge, extra));
    try {
      assert.deepEqual(s.blockList[0], { name: RAM, usedLength: huge });
      const runs: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void runs.push([f, c]));
      assert.deepEqual(runs, [[5, 1], [CHAIN_FIRST, CHAIN_LAST - CHAIN_FIRST + 1], [30, 1], [510, 4], [2 ** 31, 1], [last, 1]]);
      assert.equal(s.presentPages(RAM), expectedRam.size + extra.length);
      // Pages 0..511 share a chunk, 512.. the next; one each for 2^31 and the last page.
      assert.equal(chunksOf(s, RAM), 4);
      const from: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void from.push([f, c]), 512);
      assert.deepEqual(from, [[512, 2], [2 ** 31, 1], [last, 1]]);
      // maxRun cuts a run into adjacent pieces, across the chunk boundary too.
      const pieces: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void pieces.push([f, c]), 0, 3);
      assert.deepEqual(pieces, [[5, 1], ...chainPieces(3), [30, 1], [510, 3], [513, 1], [2 ** 31, 1], [last, 1]]);
      const one: [number, number][] = [];
      s.forEachRun(RAM, (f, c) => void one.push([f, c]), 511, 1);
      assert.deepEqual(one, [[511, 1], [512, 1], [513, 1], [2 ** 31, 1], [last, 1]]);
      const scratch = Buffer.alloc(s.scratchBytes(6));
      const views = await s.loadRuns(RAM, [510, 4, 2 ** 31, 1, last, 1], 3, scratch);
      assert.ok(Buffer.concat(views).equals(Buffer.concat(extra.map((_, k) => pageOf(0x9000 + k)))));
    } finally {
      await s.close();
    }
  });

  test('a claim near 2^53 bytes opens without allocating for it; the fuzz fixture is refused as truncated', async () => {
    const huge = Math.floor(Number.MAX_SAFE_INTEGER / PAGE) * PAGE - ROM_PAGES * PAGE;
    const s = await openBytes(hugeBlockFile(huge, [huge / PAGE - 1]));
    try {
      assert.equal(s.presentPages(RAM), expectedRam.size + 1);
      assert.equal(chunksOf(s, RAM), 2);
    } finally {
      await s.close();
    }
    const fixture = readFileSync(join(FIXTURES_DIR, 'fuzz-regressions', 'stream-file-577026ee19fdd142.bin'));
    await assert.rejects(openBytes(fixture), isCode('TRUNCATED', /inside RAM section/));
  });
});
