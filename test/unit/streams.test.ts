// The captures of streams beyond plain precopy/multifd (issues #24, #25; test/fixtures README):
// a background snapshot, XBZRLE rounds of a running guest, dirty-bitmap sections, switchover-ack
// and postcopy-ram with a hugepage-backed pc.ram, from QEMU 10.0 and 11.1. The parser reads them,
// re-encodes them byte for byte, and `receive` turns them into snapshots that hold what QEMU sent.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { once } from 'node:events';
import { join } from 'node:path';
import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
import { encodeMainEvent } from '../../src/codec/main-event-encode.js';
import { Command, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { StreamSession } from '../../src/codec/stream-session.js';
import { encodeCommand } from '../../src/codec/stream-encode.js';
import { receive } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { inspect } from '../../src/conversations/inspect.js';
import { convert } from '../../src/conversations/convert.js';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import { PackedSnapshot } from '../../src/engine/packed-snapshot-source.js';
import { packedParts, packedPrefixOf } from '../../src/engine/packed-snapshot-writer.js';
import { inspectText } from '../../src/cli/file-format.js';
import { rebuildMemory } from '../helpers/stream-memory.js';
import { streamScenarios, type Scenario } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function events(main: Buffer, chunk = 65_521): MainEvent[] {
  const p = new MainStreamParser();
  const out: MainEvent[] = [];
  for (let at = 0; at < main.length; at += chunk) {
    p.push(main.subarray(at, at + chunk));
    for (let ev = p.next(); ev !== null; ev = p.next()) out.push(ev);
  }
  assert.ok(p.atBoundary, 'the stream ends between records');
  return out;
}

const all = streamScenarios();

describe('extended captures: parse', () => {
  test('every extended scenario is there for both versions', () => {
    const names = new Set(all.map((s) => s.label));
    for (const v of ['10.0', '11.1']) {
      for (const n of ['background-snapshot', 'xbzrle', 'dirty-bitmaps', 'switchover-ack', 'postcopy-hugepages']) assert.ok(names.has(`${v}/${n}`), `${v}/${n}`);
    }
  });

  for (const s of all) {
    test(`${s.label}: parsed and re-encoded byte for byte; RAM rebuilt as the capture check did`, () => {
      const main = s.main();
      const evs = events(main);
      const got = Buffer.concat(evs.flatMap((ev) => encodeMainEvent(ev)));
      assert.equal(got.length, main.length);
      assert.ok(got.equals(main), 'identical bytes');
      const counts = s.check.main.ram_record_counts as Record<string, number>;
      assert.equal(evs.filter((e) => e.type === 'ram-page').length, counts.PAGE);
      assert.equal(evs.filter((e) => e.type === 'ram-zero').length, counts.ZERO);
      assert.equal(evs.filter((e) => e.type === 'ram-xbzrle').length, counts.XBZRLE ?? 0);
      const mem = rebuildMemory(evs);
      for (const [name, b] of Object.entries(s.check.memory!.blocks)) {
        assert.equal(sha256(mem.get(name)!), b.sha256, `block ${name} as QEMU sent it`);
      }
    });
  }
});

describe('extended captures: what each stream holds', () => {
  for (const s of all.filter((x) => x.entry.scenario === 'background-snapshot')) {
    test(`${s.label}: no SWITCHOVER_START and no END: device state right after the last PART`, () => {
      const evs = events(s.main());
      assert.ok(!evs.some((e) => e.type === 'command'), 'no command at all');
      const sections = evs.filter((e) => e.type === 'section');
      assert.equal(sections[0]!.type === 'section' && sections[0]!.kind, 'start');
      assert.ok(sections.slice(1).every((e) => e.type === 'section' && e.kind === 'part'), 'only PARTs after START');
      const dev = evs.findIndex((e) => e.type === 'device-state');
      assert.equal(evs[dev - 1]!.type, 'footer');
      assert.equal(evs[dev - 2]!.type, 'ram-eos');
      // Every page exactly once (write-protected pages go first, none twice).
      const seen = new Set<string>();
      for (const e of evs) {
        if (e.type === 'ram-page' || e.type === 'ram-zero') {
          const k = `${e.block}@${e.offset}`;
          assert.ok(!seen.has(k), `page ${k} sent twice`);
          seen.add(k);
        }
      }
      const total = evs.filter((e) => e.type === 'ram-block').reduce((n, e) => n + (e.type === 'ram-block' ? e.block.usedLength : 0), 0);
      assert.equal(seen.size, total / PAGE, 'every page once');
    });
  }

  for (const s of all.filter((x) => x.entry.scenario === 'xbzrle')) {
    test(`${s.label}: XBZRLE deltas rebuild the guest's invariant`, () => {
      const evs = events(s.main());
      assert.ok(evs.filter((e) => e.type === 'ram-xbzrle').length > 1000, 'several rounds of deltas');
      const ram = rebuildMemory(evs).get('pc.ram')!;
      // The capture guest increments byte 0 of each page of [2 MiB, 12 MiB): v+1 ... v+1, v ... v.
      const firsts: number[] = [];
      for (let a = 0x200000; a < 0xc00000; a += PAGE) firsts.push(ram[a]!);
      const k = firsts.findIndex((v) => v !== firsts[0]);
      assert.ok(firsts[0]! > 0, 'the guest ran');
      if (k >= 0) {
        assert.equal((firsts[k]! + 1) & 0xff, firsts[0]);
        assert.ok(firsts.slice(k).every((v) => v === firsts[k]), 'one boundary');
      }
    });
  }

  for (const s of all.filter((x) => x.entry.scenario === 'postcopy-hugepages')) {
    test(`${s.label}: the block list carries pc.ram's 2 MiB page size, and only that block's`, () => {
      const blocks = events(s.main()).flatMap((e) => (e.type === 'ram-block' ? [e.block] : []));
      assert.equal(blocks[0]!.name, 'pc.ram');
      assert.equal(blocks[0]!.pageSize, 2 * 1024 * 1024);
      assert.ok(blocks.slice(1).every((b) => b.pageSize === undefined));
      assert.deepEqual(blocks.map((b) => ({ name: b.name, used_length: b.usedLength, ...(b.pageSize ? { page_size: b.pageSize } : {}) })), s.check.main.ram_blocks);
    });
  }

  for (const s of all.filter((x) => x.entry.scenario === 'dirty-bitmaps')) {
    test(`${s.label}: dirty-bitmap sections come out as sections and chunks in stream order`, () => {
      const evs = events(s.main());
      const bitmap = evs.filter((e) => e.type === 'section' && e.idstr === 'dirty-bitmap');
      const c = s.check.main as unknown as { other_iterable_sections: { kind: string; body_bytes: number }[]; other_iterable_eos_only_sections: number };
      assert.equal(bitmap.length, c.other_iterable_sections.length + c.other_iterable_eos_only_sections);
      const chunks = evs.filter((e) => e.type === 'iterable-data');
      assert.ok(chunks.every((e) => e.type === 'iterable-data' && e.idstr === 'dirty-bitmap'));
      const bodies = c.other_iterable_sections.reduce((n, x) => n + x.body_bytes, 0) + c.other_iterable_eos_only_sections;
      assert.equal(chunks.reduce((n, e) => n + (e.type === 'iterable-data' ? e.data.length : 0), 0), bodies);
      // The END section holds the bits and is the last one before the devices.
      const lastSection = evs.filter((e) => e.type === 'section').at(-1)!;
      assert.ok(lastSection.type === 'section' && lastSection.idstr === 'dirty-bitmap' && lastSection.kind === 'end');
    });
  }
});

/** Plays a capture's main stream into `receive --channels 0` (replies on the return path ignored). */
async function receiveCapture(s: Scenario): Promise<{ summary: Awaited<ReturnType<typeof receive>['done']>; snap: MappedRamSnapshot; dir: string }> {
  const dir = mkdtempSync('/tmp/multifd-streams-test-');
  const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'vm.mig'), channels: 0, directIo: false });
  const addr = (await h.listening).replace(/^tcp:/, '');
  const [host, port] = [addr.slice(0, addr.lastIndexOf(':')), Number(addr.slice(addr.lastIndexOf(':') + 1))];
  const sock = connect(port, host);
  sock.on('data', () => {});
  sock.on('error', () => {});
  await once(sock, 'connect');
  sock.end(s.main());
  const summary = await h.done;
  sock.destroy();
  return { summary, snap: await MappedRamSnapshot.open(join(dir, 'vm.mig')), dir };
}

describe('extended captures through receive', () => {
  for (const s of all.filter((x) => ['background-snapshot', 'xbzrle', 'dirty-bitmaps', 'postcopy-hugepages'].includes(x.entry.scenario))) {
    test(`${s.label}: receive --channels 0 writes a snapshot holding the RAM QEMU sent`, async () => {
      const { summary, snap, dir } = await receiveCapture(s);
      try {
        for (const [name, b] of Object.entries(s.check.memory!.blocks)) {
          const got = await snap.readPages(name, 0, b.used_length / PAGE);
          assert.equal(sha256(got), b.sha256, `block ${name}`);
        }
        if (s.entry.scenario === 'background-snapshot') assert.equal(summary['background-snapshot'], true);
        else assert.equal(summary['background-snapshot'], undefined);
        if (s.entry.scenario === 'xbzrle') assert.equal(summary['xbzrle-pages'], (s.check.main.ram_record_counts as Record<string, number>).XBZRLE);
        // dirty-bitmap sections: stored byte for byte (header, chunks, footer), read back for send.
        const parts: Buffer[] = [];
        let inBitmap = false;
        for (const ev of events(s.main())) {
          if (ev.type === 'section') inBitmap = ev.idstr === 'dirty-bitmap';
          if (inBitmap && (ev.type === 'section' || ev.type === 'iterable-data' || ev.type === 'footer')) parts.push(...encodeMainEvent(ev));
          if (ev.type === 'footer') inBitmap = false;
        }
        const bitmapBytes = Buffer.concat(parts);
        if (s.entry.scenario === 'dirty-bitmaps') assert.ok(snap.iterableSections?.equals(bitmapBytes), 'dirty-bitmap sections kept as QEMU sent them');
        else assert.equal(snap.iterableSections, undefined);
      } finally {
        await snap.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});

describe('inspect lists dirty-bitmap sections', () => {
  for (const s of all.filter((x) => x.entry.scenario === 'dirty-bitmaps')) {
    test(`${s.label}: a received snapshot's dirty-bitmap sections by name and size`, async () => {
      const { snap, dir } = await receiveCapture(s);
      try {
        const want = snap.iterableSections!;
        const c = s.check.main as unknown as { other_iterable_sections: unknown[]; other_iterable_eos_only_sections: number };
        const r = await inspect(join(dir, 'vm.mig'));
        assert.deepEqual(r['iterable-sections'], [{ name: 'dirty-bitmap', sections: c.other_iterable_sections.length + c.other_iterable_eos_only_sections, size: want.length }]);
        const listed = r.sections.filter((x) => x.idstr === 'dirty-bitmap');
        assert.equal(listed.reduce((n, x) => n + x.size, 0), want.length, 'the listed sections add up to the bytes send replays');
        assert.deepEqual([listed[0]!.type, listed.at(-1)!.type], ['START', 'END']);
        assert.match(inspectText(r), new RegExp(`iterable: +"dirty-bitmap": ${listed.length} sections, ${want.length} bytes`));
      } finally {
        await snap.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  for (const s of all.filter((x) => x.entry.scenario === 'dirty-bitmaps')) {
    test(`${s.label}: convert carries them (mapped-ram -> stream -> mapped-ram), and inspect lists them in the stream file too`, async () => {
      const { snap, dir } = await receiveCapture(s);
      try {
        const want = snap.iterableSections!;
        await convert({ input: join(dir, 'vm.mig'), output: join(dir, 'vm.stream'), to: 'stream' });
        const stream = await openSnapshot(join(dir, 'vm.stream'));
        try {
          assert.equal(stream.format, 'stream');
          assert.ok(stream.iterableSections?.equals(want), 'the stream file holds the sections as received');
        } finally {
          await stream.close();
        }
        const r = await inspect(join(dir, 'vm.stream'));
        assert.deepEqual(r['iterable-sections']?.map((x) => [x.name, x.size]), [['dirty-bitmap', want.length]]);
        await convert({ input: join(dir, 'vm.stream'), output: join(dir, 'back.mig'), to: 'mapped-ram' });
        const back = await MappedRamSnapshot.open(join(dir, 'back.mig'));
        try {
          assert.ok(back.iterableSections?.equals(want), 'and back in mapped-ram');
        } finally {
          await back.close();
        }
      } finally {
        await snap.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  for (const s of all.filter((x) => x.entry.scenario === 'dirty-bitmaps')) {
    test(`${s.label}: a packed object (s3://) of the snapshot keeps them, and RAM's section id`, async () => {
      const { snap, dir } = await receiveCapture(s);
      try {
        const { prefix, layout } = await packedPrefixOf(snap);
        const parts: Buffer[] = [];
        for await (const part of packedParts(snap, prefix, layout, 1024 * 1024)) parts.push(part);
        const object = Buffer.concat(parts);
        const reader = { name: 'mem://vm.mig', size: object.length, read: async (at: number, n: number) => Buffer.from(object.subarray(at, at + n)) };
        const packed = await PackedSnapshot.open(reader);
        try {
          assert.deepEqual(packed.ramSection, snap.ramSection, 'the dirty-bitmap START is not taken for RAM\'s');
          assert.ok(packed.iterableSections?.equals(snap.iterableSections!), 'the sections as the file holds them');
        } finally {
          await packed.close();
        }
      } finally {
        await snap.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  test('a snapshot without them has no iterable-sections', async () => {
    const s = all.find((x) => x.entry.scenario === 'switchover-ack')!;
    const { snap, dir } = await receiveCapture(s);
    try {
      const r = await inspect(join(dir, 'vm.mig'));
      assert.equal(r['iterable-sections'], undefined);
      assert.doesNotMatch(inspectText(r), /iterable:/);
    } finally {
      await snap.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('stream session: the background snapshot order', () => {
  const bg = streamScenarios((e) => e.scenario === 'background-snapshot')[0]!;
  const plain = streamScenarios((e) => e.scenario === 'switchover-ack')[0]!;

  function run(main: Buffer): { background: boolean; error?: ProtocolError } {
    const s = new StreamSession({ kind: 'live' });
    try {
      for (let at = 0; at < main.length; at += 65_521) {
        s.push(main.subarray(at, at + 65_521));
        while (s.next() !== null);
      }
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      return { background: s.background, error: e };
    }
    return { background: s.background };
  }

  test(`${bg.label}: device state after the last PART is a background snapshot`, () => {
    const r = run(bg.main());
    assert.equal(r.error, undefined);
    assert.equal(r.background, true);
  });

  test('a migration with END is not taken for one', () => {
    assert.deepEqual(run(plain.main()), { background: false });
  });

  /** The bg capture with `insert` after the configuration record. */
  function withCommand(insert: Buffer): Buffer {
    const main = bg.main();
    const at = bg.check.main.config_end;
    return Buffer.concat([main.subarray(0, at), insert, main.subarray(at)]);
  }

  test('device state after a PART with a return path, SWITCHOVER_START or postcopy advised is refused', () => {
    for (const [cmd, what] of [
      [encodeCommand(Command.OPEN_RETURN_PATH), /with a return path/],
      [encodeCommand(Command.SWITCHOVER_START), /after SWITCHOVER_START/],
      [encodeCommand(Command.POSTCOPY_ADVISE), /with postcopy advised/],
    ] as const) {
      const advise = cmd[2] === Command.POSTCOPY_ADVISE;
      const r = run(withCommand(cmd));
      assert.ok(r.error, `refused (${what})`);
      assert.equal(r.error.code, 'BAD_RECORD');
      assert.match(r.error.message, advise ? /with postcopy advised/ : what);
      assert.equal(r.background, false);
    }
  });
});
