// The multifd channel parser against every captured multifd socket channel of QEMU 10.0 and 11.1:
// counts from check.json, RAM rebuilt from the packets (plus legacy ZERO records on main), and
// identical events however the bytes are chunked.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { constants as zc, inflateSync } from 'node:zlib';
import { MultifdChannelParser, type ChannelEvent } from '../../src/codec/multifd-channel-parser.js';
import { MainStreamParser, type MainEvent, type RamBlockInfo } from '../../src/codec/main-stream-parser.js';
import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PAGES_PER_PACKET, MultifdFlag, TARGET_PAGE_SIZE, compressionFlag, type CompressionName } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { isSync, validatePacketPages, type MultifdPacketHeader } from '../../src/codec/multifd-packet.js';
import { BLOB_OFFSET, compressionOf, findScenario, guestBlob, prng, scenarios, type Scenario } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

type FlatChannelEvent =
  | { type: 'init'; init: Extract<ChannelEvent, { type: 'init' }>['init'] }
  | { type: 'packet'; header: MultifdPacketHeader; payload: Buffer; wireBytes: number };

interface ChannelParse {
  events: FlatChannelEvent[];
  parser: MultifdChannelParser;
}

function parseChannel(data: Buffer, nextSize: (pos: number) => number, compression: number = MultifdFlag.NOCOMP): ChannelParse {
  const parser = new MultifdChannelParser(compression);
  const events: FlatChannelEvent[] = [];
  let pos = 0;
  while (pos < data.length) {
    const n = Math.max(1, Math.min(nextSize(pos), data.length - pos));
    parser.push(data.subarray(pos, pos + n));
    pos += n;
    for (let guard = 0; ; guard++) {
      assert.ok(guard < 1e5, 'parser keeps returning events without consuming');
      const ev = parser.next();
      if (ev === null) break;
      events.push(ev.type === 'init' ? ev : { type: 'packet', header: ev.header, payload: Buffer.concat(ev.payload), wireBytes: ev.wireBytes });
    }
  }
  return { events, parser };
}

const whole = (): number => Number.MAX_SAFE_INTEGER;

function packets(p: ChannelParse): Extract<FlatChannelEvent, { type: 'packet' }>[] {
  return p.events.flatMap((e) => (e.type === 'packet' ? [e] : []));
}

function parseMain(s: Scenario): { events: MainEvent[]; blocks: Map<string, RamBlockInfo> } {
  const p = new MainStreamParser();
  p.push(s.main());
  const events: MainEvent[] = [];
  for (let ev = p.next(); ev !== null; ev = p.next()) events.push(ev);
  return { events, blocks: new Map(p.ramBlocks) };
}

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

function compFlags(s: Scenario): number {
  return compressionFlag(compressionOf(s) as CompressionName);
}

const withChannels = scenarios((e) => e.files.some((f) => f.includes('multifd')));

describe('multifd channels: every capture', () => {
  for (const s of withChannels) {
    test(`${s.label}: init, packets and SYNCs match check.json`, () => {
      const main = parseMain(s);
      const flushes = main.events.filter((e) => e.type === 'ram-flush').length;
      const eos = main.events.filter((e) => e.type === 'ram-eos').length;
      const perSection = s.entry.scenario.includes('per-section');
      const flags = compFlags(s);
      assert.equal(s.channelFiles.length, s.meta.parameters_effective['multifd-channels']);
      const nums: bigint[] = [];
      const ids = new Set<number>();
      for (const { file, id } of s.channelFiles) {
        const want = s.check.channels![file]!;
        const bytes = s.file(file);
        assert.equal(bytes.length, want.bytes);
        const p = parseChannel(bytes, whole, flags);
        assert.ok(p.parser.atBoundary, 'channel ends between packets');
        assert.equal(p.parser.buffered, 0);
        const init = p.events[0]!;
        assert.equal(init.type, 'init');
        if (init.type !== 'init') return;
        assert.equal(init.init.id, id, 'init id matches the file name');
        assert.equal(init.init.id, want.id);
        assert.equal(init.init.uuid.toString('hex'), want.uuid);
        assert.equal(init.init.uuid.toString('hex'), (s.meta.uuid ?? '00000000-0000-0000-0000-000000000000').replace(/-/g, ''));
        assert.equal(bytes.subarray(25, MULTIFD_INIT_SIZE).every((b) => b === 0), true, 'reserved bytes zero');
        ids.add(id);

        const pk = packets(p);
        assert.equal(p.events.filter((e) => e.type === 'init').length, 1);
        assert.equal(pk.length, want.packets);
        const syncIdx = pk.flatMap((e, i) => (isSync(e.header) ? [i] : []));
        assert.equal(syncIdx.length, want.sync_packets);
        assert.equal(syncIdx.length, perSection ? eos : flushes, 'SYNC per channel == FLUSH (per-round) or EOS (per-section)');
        assert.deepEqual(syncIdx, want.sync_positions);
        assert.ok(isSync(pk[0]!.header) && isSync(pk[pk.length - 1]!.header));
        const data = pk.filter((e) => !isSync(e.header));
        assert.equal(data.length, want.data_packets);
        assert.equal(data.reduce((n, e) => n + e.header.normalPages, 0), want.normal_pages);
        assert.equal(data.reduce((n, e) => n + e.header.zeroPages, 0), want.zero_pages);
        assert.equal(data.filter((e) => e.header.normalPages === 0).length, want.zero_only_packets);
        assert.deepEqual([...new Set(data.map((e) => e.header.ramblock))].sort(), [...want.ramblocks].sort());
        assert.equal(MULTIFD_INIT_SIZE + pk.reduce((n, e) => n + e.wireBytes, 0), bytes.length);
        for (const { header: h, payload, wireBytes } of pk) {
          assert.equal(wireBytes, MULTIFD_PACKET_HEADER_SIZE + payload.length);
          if (isSync(h)) {
            assert.deepEqual([h.flags, h.pagesAlloc, h.normalPages, h.zeroPages, h.nextPacketSize, h.ramblock], [MultifdFlag.SYNC, 0, 0, 0, 0, '']);
          } else {
            assert.equal(h.flags, flags, 'data packets carry exactly the compression bits');
            assert.equal(h.pagesAlloc, MULTIFD_PAGES_PER_PACKET);
            assert.equal(payload.length, h.nextPacketSize);
            if (flags === MultifdFlag.NOCOMP) assert.equal(h.nextPacketSize, h.normalPages * PAGE);
            if (h.normalPages === 0) assert.equal(h.nextPacketSize, 0);
            validatePacketPages(h, main.blocks.get(h.ramblock)?.usedLength);
          }
          nums.push(h.packetNum);
        }
      }
      assert.deepEqual([...ids].sort(), s.channelFiles.map((_, i) => i), 'ids 0..N-1');
      assert.equal(new Set(nums).size, nums.length, 'packet_num distinct across channels');
      const pn = s.check.packet_num!;
      assert.equal(nums.length, pn.count);
      const sorted = [...nums].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      assert.equal(sorted[0], BigInt(pn.min!));
      assert.equal(sorted[sorted.length - 1], BigInt(pn.max!));
      assert.ok(pn.contiguous && sorted.every((n, i) => n === BigInt(i)), 'packet_num contiguous from 0');
    });
  }

  for (const s of withChannels.filter((x) => compressionOf(x) !== 'zstd')) {
    test(`${s.label}: packets (and legacy ZERO records) rebuild RAM: blob at pc.ram+0x100000, zero elsewhere`, () => {
      const main = parseMain(s);
      const mem = new Map<string, Buffer>();
      const sent = new Map<string, Uint8Array>();
      for (const b of main.blocks.values()) {
        mem.set(b.name, Buffer.alloc(b.usedLength, 0xee));
        sent.set(b.name, new Uint8Array(b.usedLength / PAGE));
      }
      const mark = (block: string, off: number): void => {
        sent.get(block)![off / PAGE]!++;
      };
      for (const ev of main.events) {
        if (ev.type === 'ram-zero') { mem.get(ev.block)!.fill(0, ev.offset, ev.offset + PAGE); mark(ev.block, ev.offset); }
        assert.notEqual(ev.type, 'ram-page', 'no page data on the main channel with multifd');
      }
      const all: { h: MultifdPacketHeader; pages: Buffer }[] = [];
      for (const { file } of s.channelFiles) {
        const pk = packets(parseChannel(s.file(file), whole, compFlags(s))).filter((e) => !isSync(e.header));
        if (compressionOf(s) === 'zlib') {
          // One deflate stream per channel: packet i must inflate to exactly its pages, given 0..i-1.
          const want = s.check.channels![file]!;
          assert.equal(pk.find((e) => e.header.normalPages > 0)!.payload.subarray(0, 2).toString('hex'), want.first_payload_starts);
          let prefix: Buffer[] = [];
          let produced = 0;
          for (const e of pk) {
            if (e.header.normalPages === 0) { all.push({ h: e.header, pages: Buffer.alloc(0) }); continue; }
            assert.ok(e.payload.subarray(-4).equals(Buffer.from([0, 0, 0xff, 0xff])), 'payload ends in a sync flush');
            prefix = [...prefix, e.payload];
            const out = inflateSync(Buffer.concat(prefix), { finishFlush: zc.Z_SYNC_FLUSH });
            assert.equal(out.length - produced, e.header.normalPages * PAGE);
            all.push({ h: e.header, pages: out.subarray(produced) });
            produced = out.length;
          }
        } else {
          for (const e of pk) all.push({ h: e.header, pages: e.payload });
        }
      }
      all.sort((a, b) => (a.h.packetNum < b.h.packetNum ? -1 : 1));
      for (const { h, pages } of all) {
        const m = mem.get(h.ramblock)!;
        for (let i = 0; i < h.normalPages; i++) {
          pages.copy(m, h.offsets[i]!, i * PAGE, (i + 1) * PAGE);
          mark(h.ramblock, h.offsets[i]!);
        }
        for (let i = h.normalPages; i < h.normalPages + h.zeroPages; i++) {
          m.fill(0, h.offsets[i]!, h.offsets[i]! + PAGE);
          mark(h.ramblock, h.offsets[i]!);
        }
      }
      for (const [name, counts] of sent) {
        const want = s.check.memory!.blocks[name]!;
        assert.equal(counts.filter((n) => n === 0).length, want.pages_never_sent, `${name}: pages never sent`);
        assert.equal(counts.filter((n) => n > 1).length, want.pages_sent_more_than_once, `${name}: pages sent twice`);
        assert.equal(sha256(mem.get(name)!), want.sha256, `${name}: sha256`);
      }
      const ram = mem.get('pc.ram')!;
      const blob = guestBlob();
      assert.ok(ram.subarray(BLOB_OFFSET, BLOB_OFFSET + blob.length).equals(blob), 'blob at 0x100000');
      assert.ok(ram.subarray(0, BLOB_OFFSET).every((b) => b === 0), 'zero below the blob');
      assert.ok(ram.subarray(BLOB_OFFSET + blob.length).every((b) => b === 0), 'zero above the blob');
    });
  }

  for (const s of withChannels.filter((x) => compressionOf(x) === 'zstd')) {
    test(`${s.label}: zstd payloads open one frame per channel`, () => {
      for (const { file } of s.channelFiles) {
        const pk = packets(parseChannel(s.file(file), whole, MultifdFlag.ZSTD)).filter((e) => e.header.normalPages > 0);
        const magic = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
        assert.ok(pk[0]!.payload.subarray(0, 4).equals(magic), 'first payload starts a zstd frame');
        assert.ok(pk.slice(1).every((e) => !e.payload.subarray(0, 4).equals(magic)), 'later payloads continue it');
        const want = s.check.channels![file]!;
        if (want.first_payload_starts !== undefined) assert.ok(want.first_payload_starts.startsWith(pk[0]!.payload.subarray(0, 2).toString('hex')));
      }
    });
  }
});

describe('multifd channels: chunking and compression mismatch', () => {
  const s = findScenario('10.0', 'multifd-2ch');
  const file = s.channelFiles.find((c) => s.check.channels![c.file]!.normal_pages > 0)!.file;

  test(`${s.label} ${file}: byte by byte gives the same events as one chunk`, () => {
    const bytes = s.file(file);
    const ref = parseChannel(bytes, whole);
    assert.ok(ref.events.length > 3);
    const got = parseChannel(bytes, () => 1);
    assert.deepEqual(got.events, ref.events);
    const r = prng(7);
    assert.deepEqual(parseChannel(bytes, () => 1 + Math.floor(r() * 5000)).events, ref.events);
  });

  test(`${s.label} ${file}: every two-piece split of the first packets`, () => {
    const prefix = s.file(file).subarray(0, MULTIFD_INIT_SIZE + 4 * MULTIFD_PACKET_HEADER_SIZE + 2 * PAGE);
    const ref = parseChannel(prefix, whole);
    for (let k = 1; k < prefix.length; k++) {
      let first = true;
      const got = parseChannel(prefix, () => (first ? ((first = false), k) : Number.MAX_SAFE_INTEGER));
      assert.deepEqual(got.events, ref.events, `split at ${k}`);
    }
  });

  for (const [qemu, name, comp] of [['10.0', 'multifd-2ch-zlib', 'zlib'], ['11.1', 'multifd-2ch-zlib', 'zlib'], ['10.0', 'multifd-2ch-zstd', 'zstd'], ['11.1', 'multifd-2ch-zstd', 'zstd']] as const) {
    test(`${qemu}/${name}: headers carry ${comp}; a receiver expecting none gets FLAG_MISMATCH`, () => {
      const sc = findScenario(qemu, name);
      const flag = compressionFlag(comp);
      for (const { file: f } of sc.channelFiles) {
        const bytes = sc.file(f);
        const data = packets(parseChannel(bytes, whole, flag)).filter((e) => !isSync(e.header));
        assert.ok(data.length > 0 && data.every((e) => e.header.flags === flag));
        const parser = new MultifdChannelParser(MultifdFlag.NOCOMP);
        parser.push(bytes);
        assert.equal(parser.next()?.type, 'init');
        const sync = parser.next();
        assert.ok(sync?.type === 'packet' && isSync(sync.header), 'SYNC packets carry no compression bits and pass');
        assert.throws(() => parser.next(), (e: unknown) => {
          assert.ok(e instanceof ProtocolError);
          assert.equal(e.code, 'FLAG_MISMATCH');
          assert.match(e.message, new RegExp(`source uses ${comp}, receiver expects none`));
          assert.equal(e.offset, MULTIFD_INIT_SIZE + MULTIFD_PACKET_HEADER_SIZE);
          return true;
        });
      }
    });
  }

  test('a receiver expecting zlib rejects a nocomp source', () => {
    const bytes = s.file(file);
    const parser = new MultifdChannelParser(MultifdFlag.ZLIB);
    parser.push(bytes);
    parser.next();
    parser.next();
    assert.throws(() => parser.next(), (e: unknown) => e instanceof ProtocolError && e.code === 'FLAG_MISMATCH' && e.message.includes('source uses none, receiver expects zlib'));
  });
});
