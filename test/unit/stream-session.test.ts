// The stream session (codec/stream-session.ts): the record-order rules of the main stream.
//
// Every captured QEMU 10.0 / 11.1 stream must give the same events however it is chunked: one
// byte at a time (every record split at each of its bytes) and split in two at every byte of
// the places where records of every kind meet (as node-postgres's pg-protocol tests split each
// message). Then one violating stream per rule, the rules the four old copies disagreed on
// included: strict mode throws a ProtocolError with its code at the record's offset, lenient
// mode records it and goes on.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { Command, SectionType } from '../../src/codec/constants.js';
import { ProtocolError, type ProtocolErrorCode } from '../../src/codec/errors.js';
import { encodeDiscards, encodePackagedHeader, encodePostcopyAdvise, encodePostcopyListen, encodePostcopyRun } from '../../src/codec/postcopy.js';
import { encodeCommand, encodeEos, encodeFooter, encodeMemSize, encodeMultifdFlush, encodePing, encodeSectionFull, encodeSectionShort, encodeZeroRecord } from '../../src/codec/stream-encode.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { StreamSession, type SessionEvent, type StreamSessionOptions } from '../../src/codec/stream-session.js';
import { findScenario, scenarios, type Scenario } from '../helpers/fixtures.js';

interface Summary {
  /** Every event but device-state and complete, with its offset and what it says. */
  events: string[];
  pages: string;
  device: string;
  deviceBytes: number;
  deviceStart: number;
  complete: boolean;
  syncMode: string | undefined;
  syncPoints: { flush: number; eos: number };
  blocks: { name: string; usedLength: number }[];
  ramTotal: number;
}

function describeEvent(ev: SessionEvent): string | undefined {
  switch (ev.type) {
    case 'device-state':
    case 'complete':
    case 'page':
      return undefined;
    case 'configuration':
      return `${ev.at} configuration ${ev.config.machine}`;
    case 'ram-setup':
      return `${ev.at} ram-setup ${ev.sectionId} ${ev.totalBytes} ${ev.blocks.map((b) => b.name).join(',')}`;
    case 'ram-block':
      return `${ev.at} ram-block ${ev.block.name} ${ev.block.usedLength}`;
    case 'postcopy-switch':
      return `${ev.at} postcopy-switch ${ev.devices.length} ${ev.sections.length} ${ev.pings.join(',')}`;
    default: {
      const { record: _r, ...rest } = ev as SessionEvent & { record?: unknown };
      return JSON.stringify(rest);
    }
  }
}

/** Runs `chunks` through a session, draining after every push. */
function run(chunks: Iterable<Buffer>, opts: StreamSessionOptions): Summary {
  const s = new StreamSession(opts);
  const events: string[] = [];
  const pages = createHash('sha256');
  const device = createHash('sha256');
  let deviceBytes = 0;
  const syncPoints = { flush: 0, eos: 0 };
  for (const c of chunks) {
    s.push(c);
    for (let ev = s.next(); ev !== null; ev = s.next()) {
      if (ev.type === 'page') {
        pages.update(`${ev.block}@${ev.offset}${ev.postcopy ? 'p' : ''}:`);
        for (const d of ev.data) pages.update(d);
      } else if (ev.type === 'device-state') {
        for (const d of ev.data) {
          device.update(d);
          deviceBytes += d.length;
        }
      }
      if (ev.type === 'sync-point') syncPoints[ev.cause]++;
      const line = describeEvent(ev);
      if (line !== undefined) events.push(line);
    }
  }
  return {
    events,
    pages: pages.digest('hex'),
    device: device.digest('hex'),
    deviceBytes,
    deviceStart: s.deviceStateOffset,
    complete: s.complete,
    syncMode: s.syncMode,
    syncPoints,
    blocks: s.blocks.map((b) => ({ name: b.name, usedLength: b.usedLength })),
    ramTotal: s.ramTotal,
  };
}

function* bytes(b: Buffer): Generator<Buffer> {
  for (let i = 0; i < b.length; i++) yield b.subarray(i, i + 1);
}

function kindOf(s: Scenario): StreamSessionOptions['kind'] {
  return s.entry.transport === 'file' ? 'file' : 'live';
}

/**
 * Regions whose every byte is tried as the one split point: where records of each kind meet
 * (header, configuration, START, MEM_SIZE and the block list, FLUSH, EOS, footers; SWITCHOVER,
 * END and the first device section; EOF, the VMDESCRIPTION and the end). Each region's runs stop
 * a little after it (`limit`), except near the end, where completeness is decided.
 */
function splitRegions(s: Scenario, len: number): { from: number; to: number; limit: number }[] {
  const o = s.check.main.offsets as Record<string, number>;
  const r = (from: number, to: number, limit: number): { from: number; to: number; limit: number } => ({ from: Math.max(1, from), to: Math.min(len, to), limit: Math.min(len, limit) });
  return [
    r(0, o['ram_START_end']! + 16, o['ram_START_end']! + 8192),
    r(o['cmd_SWITCHOVER_START']! - 8, o['first_device']! + 32, o['first_device']! + 8192),
    r(o['eof']! - 2, o['eof']! + 8, len),
    r(len - 8, len, len),
  ];
}

// The 23 MB mapped-ram files are read by seeking over their pages regions; their order rules are
// those of the stream files, covered with the rest in file-tools and stream-snapshot tests.
const CAPTURES = scenarios((e) => e.scenario !== 'mapped-ram-file');

describe('StreamSession on every QEMU capture, however it is chunked', () => {
  for (const s of CAPTURES) {
    test(`${s.label}: one byte at a time and split in two at every record boundary region`, () => {
      const data = s.main();
      const kind = kindOf(s);
      const whole = run([data], { kind });
      const m = s.check.main;
      // What capture.py found independently.
      assert.deepEqual(whole.blocks, m.ram_blocks.map((b) => ({ name: b.name, usedLength: b.used_length })));
      assert.equal(whole.ramTotal, m.mem_size_total);
      assert.equal(whole.deviceStart, m.offsets['first_device']);
      assert.equal(whole.deviceBytes, m.bytes - m.offsets['first_device']!);
      assert.ok(whole.events.includes(JSON.stringify({ type: 'section', at: m.offsets['ram_START'], kind: 'start', sectionId: m.ram_section_id, instanceId: 0, versionId: 4 })));
      assert.ok(whole.events.includes(JSON.stringify({ type: 'switchover-start', at: m.offsets['cmd_SWITCHOVER_START'] })));
      if (kind === 'live') {
        assert.equal(whole.complete, true, 'the stream proves complete');
        const flushes = m.ram_record_counts.FLUSH;
        if (flushes > 0) {
          assert.equal(whole.syncMode, 'round');
          assert.deepEqual(whole.syncPoints, { flush: flushes, eos: 0 });
        } else {
          assert.equal(whole.syncMode, 'section');
          assert.deepEqual(whole.syncPoints, { flush: 0, eos: m.ram_record_counts.EOS });
        }
      } else {
        assert.equal(whole.syncMode, undefined, 'a file has no sync points');
        assert.deepEqual(whole.syncPoints, { flush: 0, eos: 0 });
      }
      assert.deepEqual(run(bytes(data), { kind }), whole, 'one byte at a time');
      for (const { from, to, limit } of splitRegions(s, data.length)) {
        const cut = data.subarray(0, limit);
        const ref = limit === data.length ? whole : run([cut], { kind });
        for (let at = from; at < to; at++) {
          const r = run([cut.subarray(0, at), cut.subarray(at)], { kind });
          // Cheaper than deepEqual on every split; the first difference is shown when there is one.
          if (r.pages !== ref.pages || r.device !== ref.device || r.events.join('\n') !== ref.events.join('\n') || r.complete !== ref.complete) {
            assert.deepEqual(r, ref, `split at ${at}`);
          }
        }
      }
    });
  }
});

// ---- violating streams -------------------------------------------------------------------------

const CAP = findScenario('10.0', 'multifd-2ch');
const MAIN = CAP.main();
const OFF = CAP.check.main.offsets as Record<string, number>;
const SID = CAP.check.main.ram_section_id;
/** Header and configuration. */
const HEAD = MAIN.subarray(0, OFF['ram_START']);
/** START through the last PART (FLUSHes, EOSes and footers included). */
const PRECOPY_RAM = MAIN.subarray(OFF['ram_START'], OFF['cmd_SWITCHOVER_START']);
/** The 30 device sections QEMU wrote, EOF not included. */
const DEVICES = MAIN.subarray(OFF['first_device'], OFF['eof']);
const TAIL = MAIN.subarray(OFF['first_device']);

/** Offsets of the records of a clean run, to splice at. */
function recordAt(data: Buffer, pred: (ev: SessionEvent) => boolean, kind: StreamSessionOptions['kind'] = 'live'): number {
  const s = new StreamSession({ kind, mode: 'lenient' });
  s.push(data);
  for (let ev = s.next(); ev !== null; ev = s.next()) if (pred(ev)) return ev.at;
  throw new Error('no such record');
}

const insert = (data: Buffer, at: number, ...pieces: Buffer[]): Buffer => Buffer.concat([data.subarray(0, at), ...pieces, data.subarray(at)]);

/** Strict: the first broken rule throws with its code, at the offset of the record that broke it. */
function assertStrict(data: Buffer, code: ProtocolErrorCode, message: RegExp, offset?: number, opts: Partial<StreamSessionOptions> = {}): void {
  assert.throws(() => run([data], { kind: 'live', ...opts }), (e: unknown) => {
    assert.ok(e instanceof ProtocolError, String(e));
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    if (offset !== undefined) assert.equal(e.offset, offset, e.message);
    return true;
  });
}

/** Lenient: the same problem is recorded, and the walk goes on to the end unless it cannot. */
function lenientProblems(data: Buffer, kind: StreamSessionOptions['kind'] = 'live'): { problems: StreamSession['problems']; halted: boolean; deviceStart: number } {
  const s = new StreamSession({ kind, mode: 'lenient' });
  s.push(data);
  while (s.next() !== null);
  return { problems: s.problems, halted: s.halted, deviceStart: s.deviceStateOffset };
}

const sec = (kind: 'start' | 'full', id: number): Buffer => encodeSectionFull(kind === 'start' ? SectionType.START : SectionType.FULL, id, 'ram', 0, 4);
const part = (id: number, ...records: Buffer[]): Buffer => Buffer.concat([encodeSectionShort(SectionType.PART, id), ...records, encodeEos(), encodeFooter(id)]);
const endSection = (id: number, ...records: Buffer[]): Buffer => Buffer.concat([encodeSectionShort(SectionType.END, id), ...records, encodeEos(), encodeFooter(id)]);
const pkg = (...pings: number[]): Buffer => {
  const body = Buffer.concat([encodePostcopyListen(), DEVICES, ...pings.map((v) => encodePing(v)), encodePostcopyRun()]);
  return Buffer.concat([encodePackagedHeader(body.length), body]);
};
const ORP = encodeCommand(Command.OPEN_RETURN_PATH);
const ADVISE = encodePostcopyAdvise();
const DISCARD = encodeDiscards('pc.ram', [{ start: 0, length: 0x2000 }])[0]!;
const EOF = Buffer.from([SectionType.EOF]);

/** A postcopy migration as QEMU sends it: advise, precopy rounds, discards, the package, pages, END, EOF. */
function postcopyStream(o: { advise?: Buffer | null; orp?: boolean; discardAfter?: boolean; after?: Buffer[]; end?: Buffer } = {}): Buffer {
  return Buffer.concat([
    HEAD,
    o.orp === false ? Buffer.alloc(0) : ORP,
    o.advise === null ? Buffer.alloc(0) : o.advise ?? ADVISE,
    PRECOPY_RAM,
    o.discardAfter ? Buffer.alloc(0) : DISCARD,
    pkg(7),
    o.discardAfter ? DISCARD : Buffer.alloc(0),
    part(SID, encodeZeroRecord(0x3000, 'pc.ram')),
    ...(o.after ?? []),
    endSection(SID),
    o.end ?? EOF,
  ]);
}

describe('StreamSession: a postcopy stream', () => {
  test('advise → discard → package → postcopy pages → END → EOF completes, at every split', () => {
    const data = postcopyStream();
    const whole = run([data], { kind: 'live' });
    assert.equal(whole.complete, true);
    const sw = whole.events.find((e) => / postcopy-switch /.test(e))!;
    assert.match(sw, new RegExp(` postcopy-switch ${DEVICES.length + 0} 30 7$`));
    assert.ok(whole.events.some((e) => e.includes('"type":"zero"') && e.includes('"postcopy":true')), 'pages after the switch are marked');
    assert.ok(whole.events.some((e) => e.includes('"type":"discard"') && e.includes('"ranges":1')));
    // The EOS after the switch is no sync point, whatever the sync mode.
    // QEMU's third FLUSH was in its END section, which this stream replaces.
    assert.deepEqual(whole.syncPoints, { flush: CAP.check.main.ram_record_counts.FLUSH - 1, eos: 0 });
    const pkgAt = recordAt(data, (ev) => ev.type === 'postcopy-switch');
    // Split everywhere but inside the package's device sections (sampled there).
    for (let at = 1; at < data.length; at += at > pkgAt + 32 && at < pkgAt + DEVICES.length ? 97 : 1) {
      const r = run([data.subarray(0, at), data.subarray(at)], { kind: 'live' });
      if (r.device !== whole.device || r.events.join('\n') !== whole.events.join('\n') || !r.complete) assert.deepEqual(r, whole, `split at ${at}`);
    }
  });

  test('POSTCOPY_ADVISE with another target page size is refused (receive alone checked it)', () => {
    const data = postcopyStream({ advise: encodePostcopyAdvise(0x1000, 0x10000) });
    assertStrict(data, 'UNSUPPORTED', /target page size 65536/, HEAD.length + ORP.length);
  });

  test('POSTCOPY_RAM_DISCARD needs ADVISE before it and comes before the package', () => {
    assertStrict(postcopyStream({ advise: null }), 'BAD_RECORD', /POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE/, HEAD.length + ORP.length + PRECOPY_RAM.length);
    const late = postcopyStream({ discardAfter: true });
    assertStrict(late, 'BAD_RECORD', /POSTCOPY_RAM_DISCARD after the switch/, HEAD.length + ORP.length + ADVISE.length + PRECOPY_RAM.length + pkg(7).length);
    const unknown = Buffer.concat([HEAD, ORP, ADVISE, PRECOPY_RAM, encodeDiscards('nope', [{ start: 0, length: 4096 }])[0]!]);
    assertStrict(unknown, 'UNKNOWN_BLOCK', /"nope"/, HEAD.length + ORP.length + ADVISE.length + PRECOPY_RAM.length);
    const outside = Buffer.concat([HEAD, ORP, ADVISE, PRECOPY_RAM, encodeDiscards('pc.ram', [{ start: 16 * 1024 * 1024 - 4096, length: 0x2000 }])[0]!]);
    assertStrict(outside, 'OFFSET_OUT_OF_RANGE', /outside block "pc.ram"/);
  });

  test('PACKAGED needs ADVISE, a return path, the block list, and comes once, before END', () => {
    // Without ADVISE the DISCARD fails first; without both, the package.
    const noAdvise = Buffer.concat([HEAD, ORP, PRECOPY_RAM, pkg()]);
    assertStrict(noAdvise, 'BAD_RECORD', /PACKAGED command without POSTCOPY_ADVISE/, HEAD.length + ORP.length + PRECOPY_RAM.length);
    // dirty-bitmaps' length-0 ADVISE (postcopy-ram off): its postcopy is named for what it is.
    const emptyAdvise = encodeCommand(Command.POSTCOPY_ADVISE, Buffer.alloc(0));
    const bitmapsOnly = Buffer.concat([HEAD, ORP, emptyAdvise, PRECOPY_RAM, pkg()]);
    assertStrict(bitmapsOnly, 'UNSUPPORTED', /postcopy of dirty bitmaps alone/, HEAD.length + ORP.length + emptyAdvise.length + PRECOPY_RAM.length);
    const noRp = Buffer.concat([HEAD, ADVISE, PRECOPY_RAM, pkg()]);
    assertStrict(noRp, 'BAD_RECORD', /without a return path/, HEAD.length + ADVISE.length + PRECOPY_RAM.length);
    assertStrict(postcopyStream({ after: [pkg()] }), 'BAD_RECORD', /a second PACKAGED command/);
    // relay only asked for a START, receive for the block list: a START without MEM_SIZE is not enough.
    const noBlocks = Buffer.concat([HEAD, ORP, ADVISE, sec('start', SID), encodeEos(), encodeFooter(SID), pkg()]);
    assertStrict(noBlocks, 'BAD_RECORD', /outside the RAM migration/);
    const afterEnd = Buffer.concat([HEAD, ORP, ADVISE, PRECOPY_RAM, endSection(SID), pkg()]);
    assertStrict(afterEnd, 'BAD_RECORD', /outside the RAM migration/, HEAD.length + ORP.length + ADVISE.length + PRECOPY_RAM.length + endSection(SID).length);
  });

  test('no MULTIFD_FLUSH after the switch; only EOF after its END', () => {
    assertStrict(postcopyStream({ after: [part(SID, encodeMultifdFlush())] }), 'BAD_RECORD', /MULTIFD_FLUSH after the switch to postcopy/);
    assertStrict(postcopyStream({ end: Buffer.concat([EOF, Buffer.from([1, 2, 3])]) }), 'BAD_RECORD', /unexpected bytes after RAM END in a postcopy stream/);
    assertStrict(postcopyStream({ end: TAIL }), 'BAD_RECORD', /unexpected bytes after RAM END/);
  });
});

describe('StreamSession: one violating stream per rule', () => {
  const sectionStart = OFF['ram_START'];
  const switchover = OFF['cmd_SWITCHOVER_START'];

  test('one START: a second one is refused (also by MainStreamParser alone)', () => {
    const data = insert(MAIN, switchover, sec('start', SID), encodeEos(), encodeFooter(SID));
    assertStrict(data, 'BAD_RECORD', /second RAM section START/, switchover);
    const l = lenientProblems(data);
    assert.deepEqual(l.problems.map((p) => [p.code, p.offset, p.fatal]), [['BAD_RECORD', switchover, false]]);
    assert.equal(l.halted, false, 'lenient mode walks on');
    assert.equal(l.deviceStart, OFF['first_device']! + sec('start', SID).length + 13);
  });

  test('two STARTs of the ram section: MainStreamParser read alone refuses the second as the session does, at every split', () => {
    const data = insert(MAIN, switchover, sec('start', SID), encodeEos(), encodeFooter(SID));
    const refused = (e: unknown): boolean => {
      assert.ok(e instanceof ProtocolError, String(e));
      assert.equal(e.code, 'BAD_RECORD', e.message);
      assert.match(e.message, /second RAM section START \(id \d+\); a stream holds exactly one RAM section/);
      assert.equal(e.offset, switchover, e.message);
      return true;
    };
    const parse = (chunks: Buffer[]): number => {
      const p = new MainStreamParser();
      let blocks = 0;
      for (const c of chunks) {
        p.push(c);
        for (let ev = p.next(); ev !== null; ev = p.next()) if (ev.type === 'ram-block') blocks++;
      }
      return blocks;
    };
    // Split at every byte of the second START and the records around it: the same refusal.
    for (let at = switchover - 16; at <= switchover + sec('start', SID).length + 8; at++) {
      assert.throws(() => parse([data.subarray(0, at), data.subarray(at)]), refused, `split at ${at}`);
      assert.throws(() => run([data.subarray(0, at), data.subarray(at)], { kind: 'live' }), refused, `session, split at ${at}`);
    }
    // A third START of a different id, and a FULL after the START: no way past the first one.
    assert.throws(() => parse([insert(MAIN, switchover, sec('start', SID + 1))]), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_RECORD' && /second RAM section START \(id \d+\)/.test(e.message));
    assert.throws(() => parse([insert(MAIN, switchover, sec('full', SID))]), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_RECORD' && /second RAM section FULL/.test(e.message));
    // The capture itself (one START) still parses whole, with its block list read once.
    assert.equal(parse([MAIN]), CAP.check.main.ram_blocks.length);
  });

  test('RAM as a FULL section, PART before START, PART after END', () => {
    assertStrict(insert(MAIN, switchover, sec('full', SID), encodeEos(), encodeFooter(SID)), 'BAD_RECORD', /second RAM section FULL/, switchover);
    assertStrict(Buffer.concat([HEAD, sec('full', SID), encodeEos(), encodeFooter(SID)]), 'BAD_RECORD', /RAM sent as a FULL section/, HEAD.length);
    const afterEnd = insert(MAIN, OFF['first_device']!, part(SID));
    assertStrict(afterEnd, 'BAD_RECORD', /RAM section PART after the section's END/, OFF['first_device']);
    // The parser refuses a section id it never saw started, before the session could.
    assertStrict(Buffer.concat([HEAD, part(SID)]), 'BAD_RECORD', /never started/, HEAD.length);
  });

  test('MEM_SIZE only in the START section, and once (receive and relay checked this differently)', () => {
    const ramSetupEnd = recordAt(MAIN, (ev) => ev.type === 'sync-point');
    // A second MEM_SIZE of 0 right after the block list: relay's old check let it through.
    assertStrict(insert(MAIN, ramSetupEnd, encodeMemSize(0)), 'BAD_RECORD', /second MEM_SIZE/, ramSetupEnd);
    const partStart = OFF['ram_START_end']!;
    const inPart = insert(MAIN, partStart + 5, encodeMemSize(0));
    assertStrict(inPart, 'BAD_RECORD', /MEM_SIZE record in a PART section/, partStart + 5);
  });

  test('pages only after the block list', () => {
    // Before MEM_SIZE: no block is known yet (the parser names it; the session's rule is the same).
    const at = sectionStart + sec('start', SID).length;
    assert.throws(() => run([insert(MAIN, at, encodeZeroRecord(0, 'pc.ram'))], { kind: 'live' }), (e: unknown) => e instanceof ProtocolError && ['BAD_RECORD', 'UNKNOWN_BLOCK'].includes(e.code) && e.offset === at);
  });

  test('device state only after END; a configuration record first', () => {
    const noEnd = Buffer.concat([HEAD, PRECOPY_RAM, TAIL]);
    assertStrict(noEnd, 'BAD_RECORD', /device state begins before the END of RAM section 1/, HEAD.length + PRECOPY_RAM.length);
    const file = findScenario('10.0', 'stream-file');
    const fo = file.check.main.offsets as Record<string, number>;
    const fileNoEnd = Buffer.concat([file.main().subarray(0, fo['ram_END']), file.main().subarray(fo['first_device'])]);
    assertStrict(fileNoEnd, 'BAD_RECORD', /before the END/, fo['ram_END'], { kind: 'file' });
    assertStrict(Buffer.concat([HEAD, TAIL]), 'BAD_RECORD', /device state begins before any RAM section/, HEAD.length);
    assertStrict(Buffer.concat([MAIN.subarray(0, 8), PRECOPY_RAM]), 'BAD_RECORD', /no configuration record after the stream header/, 8);
    const l = lenientProblems(Buffer.concat([MAIN.subarray(0, 8), PRECOPY_RAM]));
    assert.equal(l.halted, true, 'without a configuration the walk cannot go on');
  });

  test('sync points: FLUSH in either mode, EOS only in per-section mode, as given or inferred', () => {
    const round = run([MAIN], { kind: 'live' });
    assert.equal(round.syncMode, 'round');
    const section = run([MAIN], { kind: 'live', syncMode: 'section' });
    assert.deepEqual(section.syncPoints, { flush: CAP.check.main.ram_record_counts.FLUSH, eos: CAP.check.main.ram_record_counts.EOS });
    const perSection = findScenario('10.0', 'multifd-2ch-per-section').main();
    assert.deepEqual(run([perSection], { kind: 'live', syncMode: 'round' }).syncPoints, { flush: 0, eos: 0 });
    // A file never has a sync point: a FLUSH there is corruption.
    assertStrict(MAIN, 'BAD_RECORD', /MULTIFD_FLUSH record in a plain stream file/, recordAt(MAIN, (ev) => ev.type === 'sync-point'), { kind: 'file' });
  });

  test('the return path: PING only after OPEN_RETURN_PATH; unknown commands are named without claiming postcopy is unsupported', () => {
    const ping = encodePing(5);
    assertStrict(insert(MAIN, switchover, ping), 'BAD_RECORD', /PING before OPEN_RETURN_PATH/, switchover);
    const ok = run([insert(MAIN, switchover, ORP, ping)], { kind: 'live' });
    assert.ok(ok.events.includes(JSON.stringify({ type: 'ping', at: switchover + ORP.length, value: 5 })));
    const colo = insert(MAIN, switchover, encodeCommand(Command.ENABLE_COLO));
    assertStrict(colo, 'UNSUPPORTED', /command 8 \(ENABLE_COLO\) is not supported \(COLO and postcopy recovery are not/, switchover);
    assert.throws(() => run([colo], { kind: 'live' }), (e: Error) => !/postcopy and COLO are not/.test(e.message));
  });

  test('files: live-peer commands and PACKAGED are refused; lenient mode lists every problem with its offset', () => {
    const data = insert(insert(MAIN, switchover, ORP), sectionStart, encodeCommand(Command.ENABLE_COLO));
    assertStrict(data, 'UNSUPPORTED', /command 8 \(ENABLE_COLO\) in a migration file/, sectionStart, { kind: 'file' });
    const l = lenientProblems(data, 'file');
    const flush = recordAt(data, (ev) => ev.type === 'flush', 'file');
    assert.deepEqual(l.problems.map((p) => [p.code, p.offset]).slice(0, 2), [['UNSUPPORTED', sectionStart], ['BAD_RECORD', flush]]);
    assert.ok(l.problems.some((p) => p.code === 'UNSUPPORTED' && p.offset === switchover + encodeCommand(Command.ENABLE_COLO).length && /OPEN_RETURN_PATH/.test(p.message)));
    assert.equal(l.halted, false);
    const file = findScenario('10.0', 'stream-file');
    const at = file.check.main.offsets['cmd_SWITCHOVER_START']!;
    assertStrict(insert(file.main(), at, pkg()), 'UNSUPPORTED', /PACKAGED\) in a migration file/, at, { kind: 'file' });
  });

  test('live streams refuse mapped-ram', () => {
    const mapped = findScenario('10.0', 'mapped-ram-file');
    // One byte past the configuration: it ends where the next record's type byte says so.
    const head = mapped.main().subarray(0, mapped.check.main.offsets['ram_START']! + 1);
    assertStrict(head, 'UNSUPPORTED', /mapped-ram on; turn it off/, 8);
  });
});
