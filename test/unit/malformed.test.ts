// Malformed input, built by corrupting real QEMU captures at known offsets: every case must end in
// a ProtocolError carrying the expected code — never another exception type, never a parser that
// just waits for more bytes.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { MultifdChannelParser } from '../../src/codec/multifd-channel-parser.js';
import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE, MultifdFlag, RamFlag, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError, type ProtocolErrorCode } from '../../src/codec/errors.js';
import { decodeMultifdInit } from '../../src/codec/multifd-init.js';
import { decodeMultifdPacketHeader, validatePacketPages } from '../../src/codec/multifd-packet.js';
import { decodeMappedRamHeader, encodeMappedRamHeader } from '../../src/codec/mapped-ram.js';
import { findTrailingVmdesc, parseVmdesc, walkDeviceState } from '../../src/codec/vmdesc.js';
import { encodeCommand, encodeSectionFull, encodeSectionShort } from '../../src/codec/stream-encode.js';
import { findScenario, prng } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

function isCode(code: ProtocolErrorCode, msg?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `expected a ProtocolError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    if (msg) assert.match(e.message, msg);
    return true;
  };
}

/** Runs a parser to the end of `data`; the error must come whatever the chunking. */
function mainError(data: Buffer, code: ProtocolErrorCode, msg?: RegExp): ProtocolError {
  let err: ProtocolError | undefined;
  for (const chunking of ['whole', 'random'] as const) {
    const p = new MainStreamParser();
    const r = prng(data.length);
    assert.throws(() => {
      let pos = 0;
      while (pos < data.length) {
        const n = chunking === 'whole' ? data.length : 1 + Math.floor(r() * 700);
        p.push(data.subarray(pos, pos + n));
        pos += n;
        for (let guard = 0; p.next() !== null; guard++) assert.ok(guard < 1e6);
      }
    }, (e: unknown) => {
      isCode(code, msg)(e);
      err = e as ProtocolError;
      return true;
    }, `${chunking}: no error raised`);
  }
  return err!;
}

function channelError(data: Buffer, code: ProtocolErrorCode, compression: number = MultifdFlag.NOCOMP, msg?: RegExp): ProtocolError {
  let err: ProtocolError | undefined;
  for (const chunk of [data.length, 1, 97]) {
    const p = new MultifdChannelParser(compression);
    assert.throws(() => {
      for (let pos = 0; pos < data.length; pos += chunk) {
        p.push(data.subarray(pos, pos + chunk));
        for (let guard = 0; p.next() !== null; guard++) assert.ok(guard < 1e5);
      }
    }, (e: unknown) => {
      isCode(code, msg)(e);
      err = e as ProtocolError;
      return true;
    }, `chunk ${chunk}: no error raised`);
  }
  return err!;
}

const copy = (b: Buffer): Buffer => Buffer.from(b);

describe('main stream', () => {
  const pp = findScenario('10.0', 'precopy-plain');
  const m2 = findScenario('11.1', 'multifd-2ch');
  const ppOff = pp.check.main.offsets;
  // First record of the PART section: a ZERO record naming pc.ram at offset 0.
  const firstRec = ppOff.ram_START_end! + 5;

  test('the unmodified captures parse cleanly (baseline for the mutations below)', () => {
    for (const s of [pp, m2]) {
      const p = new MainStreamParser();
      p.push(s.main());
      let n = 0;
      while (p.next() !== null) n++;
      assert.ok(n > 10 && p.inDeviceState);
    }
    const b = pp.main();
    assert.equal(b.readBigUInt64BE(firstRec), BigInt(RamFlag.ZERO));
    assert.equal(b.toString('latin1', firstRec + 9, firstRec + 15), 'pc.ram');
  });

  test('bad QEVM magic', () => {
    const b = copy(pp.main());
    b[3] = 0x4e;
    const e = mainError(b, 'BAD_MAGIC', /bad magic 0x5145564e/);
    assert.equal(e.offset, 0);
  });

  for (const v of [2, 4]) {
    test(`stream version ${v}`, () => {
      const b = copy(pp.main());
      b.writeUInt32BE(v, 4);
      mainError(b, 'BAD_VERSION', v === 2 ? /obsolete/ : /unsupported version 4/);
    });
  }

  for (const t of [0x05, 0x06, 0x09, 0x7e, 0xff]) {
    test(`unknown top-level record type 0x${t.toString(16)}`, () => {
      const b = copy(pp.main());
      b[ppOff.ram_START!] = t;
      const e = mainError(b, 'BAD_RECORD', /unknown top-level record type/);
      assert.equal(e.offset, ppOff.ram_START);
    });
  }

  for (const cmd of [0, 12, 0xffff]) {
    test(`unknown command ${cmd}`, () => {
      const b = copy(m2.main());
      b.writeUInt16BE(cmd, m2.check.main.offsets.cmd_SWITCHOVER_START! + 1);
      const e = mainError(b, 'BAD_RECORD', /unknown command/);
      assert.equal(e.offset, m2.check.main.offsets.cmd_SWITCHOVER_START);
    });
  }

  test('wrong length for a fixed-length command', () => {
    const b = copy(m2.main());
    b.writeUInt16BE(4, m2.check.main.offsets.cmd_SWITCHOVER_START! + 3);
    mainError(b, 'BAD_RECORD', /command 11 has length 4, expected 0/);
    // PING must be exactly 4 bytes, POSTCOPY_ADVISE 0 or 16.
    const head = m2.main().subarray(0, m2.check.main.config_end);
    mainError(Buffer.concat([head, encodeCommand(2, Buffer.alloc(3))]), 'BAD_RECORD', /command 2 has length 3/);
    mainError(Buffer.concat([head, encodeCommand(3, Buffer.alloc(8))]), 'BAD_RECORD', /POSTCOPY_ADVISE/);
  });

  test('bad footer: wrong id, wrong type', () => {
    const footer = ppOff.ram_START_end! - 5;
    assert.equal(pp.main()[footer], 0x7e);
    const b = copy(pp.main());
    b.writeUInt32BE(2, footer + 1);
    const e = mainError(b, 'BAD_FOOTER', /got type 0x7e id 2/);
    assert.equal(e.offset, footer);
    const c = copy(pp.main());
    c[footer] = 0x7f;
    mainError(c, 'BAD_FOOTER');
  });

  test('PART (or END) before any START', () => {
    const head = pp.main().subarray(0, pp.check.main.config_end);
    mainError(Buffer.concat([head, encodeSectionShort(0x02, 1), Buffer.alloc(16)]), 'BAD_RECORD', /never started/);
    mainError(Buffer.concat([head, encodeSectionShort(0x03, 1), Buffer.alloc(16)]), 'BAD_RECORD', /never started/);
    // ...and with RAM started, a PART for another id.
    const b = copy(pp.main());
    b.writeUInt32BE(7, ppOff.ram_START_end! + 1);
    mainError(b, 'BAD_RECORD', /section 7/);
  });

  test('an iterable section other than ram is unsupported; a ram section of another version is rejected', () => {
    const head = pp.main().subarray(0, pp.check.main.config_end);
    mainError(Buffer.concat([head, encodeSectionFull(0x01, 2, 'block', 0, 1), Buffer.alloc(16)]), 'UNSUPPORTED', /"block"/);
    const b = copy(pp.main());
    b.writeUInt32BE(5, ppOff.ram_START! + 1 + 4 + 1 + 3 + 4);
    mainError(b, 'BAD_VERSION', /ram section version 5/);
  });

  for (const flags of [0x001, 0x100, 0x400, 0x800, RamFlag.EOS | RamFlag.CONTINUE, RamFlag.ZERO | RamFlag.PAGE, RamFlag.MULTIFD_FLUSH | RamFlag.EOS]) {
    test(`unknown RAM record flags 0x${flags.toString(16)}`, () => {
      const b = copy(pp.main());
      b.writeBigUInt64BE(BigInt(flags), firstRec);
      const e = mainError(b, 'BAD_FLAGS', /unknown RAM record flags/);
      assert.equal(e.offset, firstRec);
    });
  }

  test('RDMA hook records are unsupported; a page record turned into XBZRLE is a bad record', () => {
    // XBZRLE is decoded since issue #25; here the page's first bytes are read as its header
    // (encoding byte 0, not ENCODING_FLAG_XBZRLE).
    for (const [f, code] of [[RamFlag.XBZRLE, 'BAD_RECORD'], [RamFlag.HOOK, 'UNSUPPORTED']] as const) {
      const b = copy(pp.main());
      b.writeBigUInt64BE(BigInt(f), firstRec);
      mainError(b, code);
    }
  });

  test('CONTINUE without a previous block', () => {
    const b = copy(pp.main());
    b.writeBigUInt64BE(BigInt(RamFlag.ZERO | RamFlag.CONTINUE), firstRec);
    mainError(b, 'BAD_RECORD', /CONTINUE page record with no previous block/);
  });

  test('page record naming an unknown block', () => {
    const b = copy(pp.main());
    b.write('pc.rom', firstRec + 9, 'latin1');
    b.write('x', firstRec + 9 + 5, 'latin1');
    mainError(b, 'UNKNOWN_BLOCK', /"pc.rox"/);
  });

  test('page offset at or beyond used_length', () => {
    for (const off of [16 << 20, (16 << 20) + PAGE, 2 ** 40]) {
      const b = copy(pp.main());
      b.writeBigUInt64BE(BigInt(off) | BigInt(RamFlag.ZERO), firstRec);
      mainError(b, 'OFFSET_OUT_OF_RANGE', /outside block "pc.ram"/);
    }
    // The last page itself is fine: the record is accepted and parsing goes on to the next one.
    const ok = copy(pp.main());
    ok.writeBigUInt64BE(BigInt((16 << 20) - PAGE) | BigInt(RamFlag.ZERO), firstRec);
    const p = new MainStreamParser();
    p.push(ok);
    while (p.next() !== null);
    // A PAGE record (CONTINUE) far out: find the first PAGE record and move it.
    const c = copy(pp.main());
    let at = firstRec + 16; // first ZERO record is 16 bytes (flags, "pc.ram", fill)
    while ((c.readBigUInt64BE(at) & 0xfffn) !== BigInt(RamFlag.PAGE | RamFlag.CONTINUE)) {
      assert.equal(c.readBigUInt64BE(at) & 0xfffn, BigInt(RamFlag.ZERO | RamFlag.CONTINUE));
      at += 9;
    }
    c.writeBigUInt64BE(BigInt(16 << 20) | BigInt(RamFlag.PAGE | RamFlag.CONTINUE), at);
    const e = mainError(c, 'OFFSET_OUT_OF_RANGE');
    assert.equal(e.offset, at);
  });

  test('zero record with a non-zero fill byte', () => {
    const b = copy(pp.main());
    b[firstRec + 15] = 0x01;
    mainError(b, 'BAD_RECORD', /fill byte 0x1/);
  });

  test('MEM_SIZE block list: misaligned, oversized, duplicate blocks', () => {
    const start = ppOff.ram_START! + 1 + 4 + 1 + 3 + 4 + 4;
    const b0 = pp.main();
    assert.equal(Number(b0.readBigUInt64BE(start) & 0xfffn), RamFlag.MEM_SIZE);
    const name = start + 8; // u8 6 "pc.ram" be64 used_length
    const used = name + 7;
    const b = copy(b0);
    b.writeBigUInt64BE(BigInt((16 << 20) + 1), used);
    mainError(b, 'BAD_RECORD', /not page aligned/);
    const c = copy(b0);
    c.writeBigUInt64BE(BigInt(1 << 30), used);
    mainError(c, 'BAD_RECORD', /exceeds the MEM_SIZE total/);
    const d = copy(b0);
    d.writeBigUInt64BE(2n ** 63n, used);
    mainError(d, 'LIMIT_EXCEEDED');
    // Rename the second block (/rom@etc/acpi/tables) to a second "pc.ram": same length field.
    const second = used + 8;
    const n2 = b0[second]!;
    const e = copy(b0);
    e[second] = 6;
    e.write('pc.ram', second + 1, 'latin1');
    e.copy(e, second + 7, second + 1 + n2, b0.length); // shift the rest left
    mainError(e.subarray(0, b0.length - (n2 - 6)), 'BAD_RECORD', /listed twice/);
  });

  test('configuration: overlong machine name, unknown subsection, bad subsection version', () => {
    const b = copy(pp.main());
    b.writeUInt32BE(257, 9);
    mainError(b, 'LIMIT_EXCEEDED', /machine name length 257/);
    const mr = findScenario('10.0', 'mapped-ram-file').main();
    const sub = mr.indexOf('configuration/capabilities');
    const c = copy(mr.subarray(0, 8192));
    c.write('configuration/capabilitieZ', sub, 'latin1');
    mainError(c, 'UNSUPPORTED', /unknown configuration subsection/);
    const d = copy(mr.subarray(0, 8192));
    d.writeUInt32BE(2, sub + 'configuration/capabilities'.length);
    mainError(d, 'BAD_VERSION');
    const e = copy(mr.subarray(0, 8192));
    e.writeUInt32BE(65, sub + 'configuration/capabilities'.length + 4);
    mainError(e, 'LIMIT_EXCEEDED');
  });
});

describe('mapped-ram', () => {
  const s = findScenario('11.1', 'mapped-ram-file');
  const ram = s.check.main.ram_blocks[0]!.mapped_ram!;

  test('header page_size 8192 (stream and decoder)', () => {
    const b = copy(s.main());
    b.writeBigUInt64BE(8192n, ram.header_offset + 4);
    const e = mainError(b, 'BAD_MAPPED_RAM', /invalid page_size 8192 \(expected 4096\)/);
    assert.equal(e.offset, ram.header_offset);
    const h = encodeMappedRamHeader({ version: 1, pageSize: 8192, bitmapOffset: 142, pagesOffset: 0x100000 });
    assert.throws(() => decodeMappedRamHeader(h), isCode('BAD_MAPPED_RAM'));
  });

  test('misaligned pages_offset', () => {
    const b = copy(s.main());
    b.writeBigUInt64BE(BigInt(ram.pages_offset + 512), ram.header_offset + 20);
    mainError(b, 'BAD_MAPPED_RAM', /not page aligned/);
  });

  test('pages region before the header, version 0 and 2, absurd offsets', () => {
    // A small block whose pages region would end before its own header: the stream cannot resume.
    const small = s.check.main.ram_blocks.find((x) => x.used_length === PAGE)!.mapped_ram!;
    const b = copy(s.main());
    b.writeBigUInt64BE(0n, small.header_offset + 20);
    mainError(b, 'BAD_MAPPED_RAM', /before its header/);
    for (const v of [0, 2]) {
      const c = copy(s.main());
      c.writeUInt32BE(v, ram.header_offset);
      mainError(c, 'BAD_VERSION');
    }
    const d = copy(s.main());
    d.writeBigUInt64BE(2n ** 60n, ram.header_offset + 20);
    mainError(d, 'BAD_MAPPED_RAM', /too large/);
    assert.throws(() => decodeMappedRamHeader(Buffer.alloc(27)), isCode('TRUNCATED'));
  });

  test('page records and MULTIFD_FLUSH are refused in a mapped-ram stream', () => {
    const file = s.main();
    const partAt = s.check.main.offsets.ram_START_end!;
    // PART header, then replace its EOS with a ZERO record / a FLUSH.
    assert.equal(file.readBigUInt64BE(partAt + 5), BigInt(RamFlag.EOS));
    const b = copy(file);
    b.writeBigUInt64BE(BigInt(RamFlag.ZERO | RamFlag.CONTINUE), partAt + 5);
    mainError(b.subarray(0, partAt + 32), 'BAD_RECORD', /mapped-ram/);
    const c = copy(file);
    c.writeBigUInt64BE(BigInt(RamFlag.MULTIFD_FLUSH), partAt + 5);
    mainError(c.subarray(0, partAt + 32), 'BAD_RECORD', /MULTIFD_FLUSH in a mapped-ram stream/);
  });
});

describe('multifd channel', () => {
  const s = findScenario('10.0', 'multifd-2ch');
  const file = s.channelFiles.find((c) => s.check.channels![c.file]!.normal_pages > 0)!.file;
  const ch = s.file(file);
  const P1 = MULTIFD_INIT_SIZE + MULTIFD_PACKET_HEADER_SIZE; // first data packet (after the setup SYNC)
  /** Offset of the first data packet with normal pages. */
  const withPages = ((): number => {
    let at = MULTIFD_INIT_SIZE;
    for (;;) {
      const normal = ch.readUInt32BE(at + 16);
      if (normal > 0 && (ch.readUInt32BE(at + 8) & MultifdFlag.SYNC) === 0) return at;
      at += MULTIFD_PACKET_HEADER_SIZE + normal * PAGE;
    }
  })();

  test('baseline: the capture parses', () => {
    const p = new MultifdChannelParser();
    p.push(ch);
    let n = 0;
    while (p.next() !== null) n++;
    assert.equal(n, 1 + s.check.channels![file]!.packets);
    assert.ok(ch.readUInt32BE(withPages + 16) > 0 && ch.readUInt32BE(withPages + 16) < 128);
  });

  test('init: bad magic, bad version, short', () => {
    const b = copy(ch);
    b.writeUInt32BE(0x11223345, 0);
    channelError(b, 'BAD_MAGIC', MultifdFlag.NOCOMP, /multifd init has bad magic 0x11223345/);
    const c = copy(ch);
    c.writeUInt32BE(2, 4);
    channelError(c, 'BAD_VERSION', MultifdFlag.NOCOMP, /multifd init has version 2/);
    // A QEVM stream on a multifd channel.
    channelError(s.main(), 'BAD_MAGIC');
    assert.throws(() => decodeMultifdInit(ch.subarray(0, 63)), isCode('TRUNCATED'));
  });

  test('packet: bad magic, bad version', () => {
    const b = copy(ch);
    b.writeUInt32BE(0xdeadbeef, P1);
    const e = channelError(b, 'BAD_MAGIC', MultifdFlag.NOCOMP, /packet has bad magic 0xdeadbeef/);
    assert.equal(e.offset, P1);
    const c = copy(ch);
    c.writeUInt32BE(0, MULTIFD_INIT_SIZE + 4);
    channelError(c, 'BAD_VERSION', MultifdFlag.NOCOMP, /packet has version 0/);
  });

  test('pages_alloc > 128', () => {
    const b = copy(ch);
    b.writeUInt32BE(129, P1 + 12);
    channelError(b, 'COUNT_TOO_LARGE', MultifdFlag.NOCOMP, /pages_alloc 129 exceeds 128/);
    const c = copy(ch);
    c.writeUInt32BE(0xffffffff, MULTIFD_INIT_SIZE + 12); // on the SYNC packet too
    channelError(c, 'COUNT_TOO_LARGE');
  });

  test('normal_pages > pages_alloc', () => {
    const b = copy(ch);
    const normal = b.readUInt32BE(withPages + 16);
    b.writeUInt32BE(normal - 1, withPages + 12);
    channelError(b, 'COUNT_TOO_LARGE', MultifdFlag.NOCOMP, /normal_pages \d+ exceeds pages_alloc/);
    const c = copy(ch);
    c.writeUInt32BE(0xffffffff, withPages + 16);
    channelError(c, 'COUNT_TOO_LARGE');
  });

  test('zero_pages > pages_alloc - normal_pages', () => {
    const b = copy(ch);
    const normal = b.readUInt32BE(withPages + 16);
    b.writeUInt32BE(128 - normal + 1, withPages + 32);
    channelError(b, 'COUNT_TOO_LARGE', MultifdFlag.NOCOMP, /zero_pages \d+ exceeds pages_alloc 128 - normal_pages/);
    const c = copy(ch);
    c.writeUInt32BE(0xffffffff, withPages + 32);
    channelError(c, 'COUNT_TOO_LARGE');
  });

  for (const f of [0x80, 0x100, 0x80000000, MultifdFlag.SYNC | 0x200]) {
    test(`unknown flag bits 0x${f.toString(16)}`, () => {
      const b = copy(ch);
      b.writeUInt32BE(f, MULTIFD_INIT_SIZE + 8);
      channelError(b, 'BAD_FLAGS', MultifdFlag.NOCOMP, /unknown flags/);
    });
  }

  test('device-state packet', () => {
    for (const f of [MultifdFlag.DEVICE_STATE, MultifdFlag.DEVICE_STATE | MultifdFlag.SYNC]) {
      const b = copy(ch);
      b.writeUInt32BE(f, P1 + 8);
      const e = channelError(b, 'UNSUPPORTED', MultifdFlag.NOCOMP, /device-state packet/);
      assert.equal(e.offset, P1);
      assert.throws(() => decodeMultifdPacketHeader(b.subarray(P1, P1 + MULTIFD_PACKET_HEADER_SIZE), 0), isCode('UNSUPPORTED'));
    }
    // Detected from the first 12 bytes: a 276-byte device-state header never waits for 1344.
    const b = copy(ch.subarray(0, P1 + 12));
    b.writeUInt32BE(MultifdFlag.DEVICE_STATE, P1 + 8);
    channelError(b, 'UNSUPPORTED');
  });

  describe('compressed packets', () => {
    const z = findScenario('11.1', 'multifd-2ch-zlib');
    const zfile = z.channelFiles[0]!.file;
    const zc = z.file(zfile);
    const find = (pred: (at: number) => boolean): number => {
      for (let at = MULTIFD_INIT_SIZE; at < zc.length; at += MULTIFD_PACKET_HEADER_SIZE + zc.readUInt32BE(at + 20)) {
        if (pred(at)) return at;
      }
      throw new Error('no such packet');
    };
    const dataAt = find((at) => zc.readUInt32BE(at + 16) > 0);
    const zeroOnlyAt = find((at) => zc.readUInt32BE(at + 16) === 0 && zc.readUInt32BE(at + 32) > 0);

    test('next_packet_size > 1 MiB', () => {
      const b = copy(zc);
      b.writeUInt32BE(1024 * 1024 + 1, dataAt + 20);
      channelError(b, 'LIMIT_EXCEEDED', MultifdFlag.ZLIB, /next_packet_size 1048577 exceeds allocated 1048576/);
      const c = copy(zc);
      c.writeUInt32BE(0xffffffff, dataAt + 20);
      channelError(c, 'LIMIT_EXCEEDED', MultifdFlag.ZLIB);
      // Exactly 1 MiB is allowed: the parser then waits for the payload.
      const d = copy(zc.subarray(0, dataAt + MULTIFD_PACKET_HEADER_SIZE));
      d.writeUInt32BE(1024 * 1024, dataAt + 20);
      const p = new MultifdChannelParser(MultifdFlag.ZLIB);
      p.push(d);
      while (p.next() !== null);
      assert.equal(p.atBoundary, false);
    });

    test('next_packet_size non-zero in a packet without normal pages', () => {
      const b = copy(zc);
      b.writeUInt32BE(16, zeroOnlyAt + 20);
      channelError(b, 'BAD_RECORD', MultifdFlag.ZLIB, /expected empty packet/);
    });
  });

  describe('validatePacketPages', () => {
    const header = (): ReturnType<typeof decodeMultifdPacketHeader> => decodeMultifdPacketHeader(ch.subarray(withPages, withPages + MULTIFD_PACKET_HEADER_SIZE), 0);
    const used = 16 << 20;

    test('baseline and unknown block', () => {
      const h = header();
      const lengths: Record<string, number> = Object.fromEntries(s.check.main.ram_blocks.map((b) => [b.name, b.used_length]));
      validatePacketPages(h, lengths[h.ramblock]);
      assert.throws(() => validatePacketPages(h, undefined), isCode('UNKNOWN_BLOCK', new RegExp(`"${h.ramblock.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}"`)));
      // A packet without pages names no block and needs none.
      const sync = decodeMultifdPacketHeader(ch.subarray(MULTIFD_INIT_SIZE, P1), 0);
      validatePacketPages(sync, undefined);
    });

    test('offset out of range or misaligned', () => {
      for (const bad of [used, used + PAGE, 1, PAGE + 8, 2 ** 53 + 4096]) {
        const b = copy(ch.subarray(withPages, withPages + MULTIFD_PACKET_HEADER_SIZE));
        b.writeBigUInt64BE(BigInt(bad), 320);
        assert.throws(() => validatePacketPages(decodeMultifdPacketHeader(b, 0), used), isCode('OFFSET_OUT_OF_RANGE'), `offset ${bad}`);
      }
      const b = copy(ch.subarray(withPages, withPages + MULTIFD_PACKET_HEADER_SIZE));
      b.writeBigUInt64BE(0xffffffffffffffffn, 320);
      assert.throws(() => validatePacketPages(decodeMultifdPacketHeader(b, 0), used), isCode('OFFSET_OUT_OF_RANGE'));
      // Zero-page entries are checked too: the last listed entry.
      const h = header();
      const last = 320 + 8 * (h.normalPages + h.zeroPages - 1);
      const c = copy(ch.subarray(withPages, withPages + MULTIFD_PACKET_HEADER_SIZE));
      c.writeBigUInt64BE(BigInt(used), last);
      assert.throws(() => validatePacketPages(decodeMultifdPacketHeader(c, 0), used), isCode('OFFSET_OUT_OF_RANGE'));
      // A block smaller than one page holds no page at all.
      assert.throws(() => validatePacketPages(h, 0), isCode('OFFSET_OUT_OF_RANGE'));
    });
  });
});

describe('device state walk with the VMDESCRIPTION', () => {
  const s = findScenario('10.0', 'multifd-2ch');
  const dev = s.main().subarray(s.check.main.offsets.first_device!);
  const { vmdesc } = findTrailingVmdesc(dev)!;
  const first = s.check.main.devices[0]!; // [idstr, instance, version, section_id, body]
  const bodyAt = 1 + 4 + 1 + first[0].length + 8;
  const footerAt = bodyAt + first[4];

  test('baseline', () => {
    assert.equal(walkDeviceState(dev, vmdesc).sections.length, 30);
    assert.equal(dev[footerAt], 0x7e);
  });

  test('a section not in the vmdesc', () => {
    const b = copy(dev);
    b.write('tamer', 6, 'latin1');
    assert.throws(() => walkDeviceState(b, vmdesc, 0, 1000), isCode('BAD_VMDESC', /"tamer" instance 0 is not in the VMDESCRIPTION/));
    const c = copy(dev);
    c.writeUInt32BE(7, 6 + first[0].length);
    assert.throws(() => walkDeviceState(c, vmdesc), isCode('BAD_VMDESC', /instance 7/));
  });

  test('missing or wrong footer', () => {
    const b = copy(dev);
    b[footerAt] = 0x00;
    const e = (() => { try { walkDeviceState(b, vmdesc, 0, 1000); } catch (x) { return x; } return undefined; })();
    isCode('BAD_VMDESC', /footer of device section "timer" \(id 0\) missing/)(e);
    assert.equal((e as ProtocolError).offset, 1000 + footerAt);
    const c = copy(dev);
    c.writeUInt32BE(99, footerAt + 1);
    assert.throws(() => walkDeviceState(c, vmdesc), isCode('BAD_VMDESC', /footer/));
  });

  test('truncated device state', () => {
    for (const cut of [0, 3, bodyAt, footerAt, footerAt + 3, Math.floor(dev.length / 20)]) {
      assert.throws(() => walkDeviceState(dev.subarray(0, cut), vmdesc), isCode('TRUNCATED'), `cut at ${cut}`);
    }
    // Cut right after EOF: no vmdesc, a valid (vmdesc-less) end.
    const eof = s.check.main.offsets.eof! - s.check.main.offsets.first_device!;
    const l = walkDeviceState(dev.subarray(0, eof + 1), vmdesc);
    assert.equal(l.vmdescOffset, undefined);
    assert.equal(l.end, eof + 1);
    // Cut inside the VMDESCRIPTION record.
    assert.throws(() => walkDeviceState(dev.subarray(0, eof + 100), vmdesc), isCode('TRUNCATED'));
    // ...and without its trailing vmdesc the stream has none to find.
    assert.equal(findTrailingVmdesc(dev.subarray(0, dev.length - 1)), undefined);
  });

  test('bytes after EOF that are not a VMDESCRIPTION; a subsection the vmdesc does not expect', () => {
    const eof = s.check.main.offsets.eof! - s.check.main.offsets.first_device!;
    const b = copy(dev);
    b[eof + 1] = 0x07;
    assert.throws(() => walkDeviceState(b, vmdesc), isCode('BAD_VMDESC', /not a VMDESCRIPTION/));
    const at = dev.indexOf('\x05\x14cpu/poll_control_msr', 0, 'latin1');
    assert.ok(at > 0);
    const c = copy(dev);
    c.write('X', at + 2, 'latin1');
    assert.throws(() => walkDeviceState(c, vmdesc), isCode('BAD_VMDESC', /subsection "Xpu\/poll_control_msr"/));
    const d = copy(dev);
    d[at] = 0x04;
    assert.throws(() => walkDeviceState(d, vmdesc), isCode('BAD_VMDESC', /subsection cpu\/poll_control_msr not found/));
  });

  test('a VMDESCRIPTION with lists that are not lists of objects, or huge arrays', () => {
    const timerDesc = vmdesc.devices.find((d) => d.name === 'timer')!;
    const withTimer = (t: unknown): typeof vmdesc => ({ ...vmdesc, devices: [t as (typeof vmdesc.devices)[number], ...vmdesc.devices.filter((d) => d !== timerDesc)] });
    for (const bad of [
      { ...vmdesc, devices: [null] },
      withTimer({ ...timerDesc, fields: 5 }),
      withTimer({ ...timerDesc, fields: [null] }),
      withTimer({ ...timerDesc, subsections: 'x' }),
      withTimer({ ...timerDesc, subsections: [7] }),
    ]) {
      assert.throws(() => walkDeviceState(dev, parseVmdesc(JSON.stringify(bad))), isCode('BAD_VMDESC'));
    }
    // 2^50 elements of an empty struct read nothing; 2^50 one-byte structs run out of bytes.
    const t0 = Date.now();
    const empty = withTimer({ ...timerDesc, fields: [{ name: 'e', type: 'struct', size: 0, array_len: 2 ** 50, struct: { fields: [] } }, ...timerDesc.fields!] });
    assert.equal(walkDeviceState(dev, empty).sections.length, 30);
    const big = withTimer({ ...timerDesc, fields: [{ name: 'b', type: 'struct', size: 1, array_len: 2 ** 50, struct: { fields: [{ name: 'x', type: 'uint8', size: 1 }] } }] });
    assert.throws(() => walkDeviceState(dev, big), isCode('TRUNCATED'));
    const deep = withTimer({ ...timerDesc, fields: [{ name: 'd', type: 'struct', size: 0, array_len: 2 ** 40, struct: { fields: [{ name: 'd2', type: 'struct', size: 0, array_len: 2 ** 40, struct: { fields: [{ name: 'x', type: 'uint8', size: 1 }] } }] } }] });
    assert.throws(() => walkDeviceState(dev, deep), isCode('TRUNCATED'));
    assert.ok(Date.now() - t0 < 2000, 'bounded work');
  });

  test('VMDESCRIPTION that is not JSON or has no devices', () => {
    assert.throws(() => parseVmdesc('{"devices": ['), isCode('BAD_VMDESC', /not valid JSON/));
    assert.throws(() => parseVmdesc('{"page_size": 4096}'), isCode('BAD_VMDESC', /no "devices" array/));
    assert.throws(() => parseVmdesc('null'), isCode('BAD_VMDESC'));
    assert.throws(() => parseVmdesc(Buffer.from([0xff, 0xfe])), isCode('BAD_VMDESC'));
  });
});
