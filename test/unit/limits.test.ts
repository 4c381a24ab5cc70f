// Resource limits on what a peer or a file may claim (issue #7, docs/limits.md): for each cap, a
// value just over it ends in the typed error and the value at the cap is accepted.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, createServer, type Socket } from 'node:net';
import { once } from 'node:events';
import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
import { MULTIFD_MAX_COMPRESSED_PAYLOAD, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PAGES_PER_PACKET, MultifdFlag, RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { encodeConfiguration, MAX_CAPABILITIES, MAX_MACHINE_NAME } from '../../src/codec/configuration.js';
import { DeviceStateTail } from '../../src/codec/device-state-tail.js';
import { ProtocolError, type ProtocolErrorCode } from '../../src/codec/errors.js';
import { encodeMultifdInit } from '../../src/codec/multifd-init.js';
import { decodeMultifdPacketHeader, encodeMultifdPacketHeader } from '../../src/codec/multifd-packet.js';
import { DEFAULT_QMP_MAX_LINE, QmpLineSplitter, QmpProtocolError } from '../../src/codec/qmp.js';
import { encodeBlockEntry, encodeMemSize, encodePageRecordHeader, encodeSectionFull, encodeStreamHeader } from '../../src/codec/stream-encode.js';
import { MAX_VMDESC_BYTES } from '../../src/codec/vmdesc.js';
import { DEFAULT_MAX_PENDING, IncomingConnections, type StrayConnectionError } from '../../src/conversations/incoming.js';
import { ChannelError, MAX_MULTIFD_CHANNELS, MultifdReceiver } from '../../src/engine/multifd-receiver.js';
import type { PageStore, RamBlock } from '../../src/engine/page-store.js';
import { verifiedDeviceState } from '../../src/engine/read-exactly.js';

const PAGE = TARGET_PAGE_SIZE;

function isCode(code: ProtocolErrorCode, msg?: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `expected a ProtocolError, got ${String(e)}`);
    assert.equal(e.code, code, `code of "${e.message}"`);
    if (msg) assert.match(e.message, msg);
    return true;
  };
}

/** Every event of a main stream; throws what the parser throws. */
function mainEvents(data: Buffer): MainEvent[] {
  const p = new MainStreamParser();
  p.push(data);
  const out: MainEvent[] = [];
  for (let ev = p.next(); ev !== null; ev = p.next()) out.push(ev);
  return out;
}

/** Header and configuration record by hand (encodeConfiguration refuses what is over the caps). */
function configRecord(machineLen: number, caps: number): Buffer {
  const name = Buffer.alloc(machineLen, 0x61);
  const head = Buffer.alloc(5);
  head[0] = SectionType.CONFIGURATION;
  head.writeUInt32BE(machineLen, 1);
  const parts = [encodeStreamHeader(), head, name];
  if (caps > 0) {
    const sub = Buffer.from('configuration/capabilities', 'latin1');
    const subHead = Buffer.concat([Buffer.from([SectionType.SUBSECTION, sub.length]), sub, Buffer.from([0, 0, 0, 1])]);
    const count = Buffer.alloc(4);
    count.writeUInt32BE(caps);
    parts.push(subHead, count);
    for (let i = 0; i < caps; i++) parts.push(Buffer.from([3]), Buffer.from(`c${String(i).padStart(2, '0')}`.slice(0, 3)));
  }
  // One more byte (EOF) so that the parser can tell the record has no further subsection.
  parts.push(Buffer.from([SectionType.EOF]));
  return Buffer.concat(parts);
}

/** A RAM START section with `names` blocks of one page each. */
function ramStart(names: string[]): Buffer {
  return Buffer.concat([
    encodeStreamHeader(),
    encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
    encodeSectionFull(SectionType.START, 1, 'ram', 0, 4),
    encodeMemSize(names.length * PAGE),
    ...names.map((n) => encodeBlockEntry(n, PAGE)),
  ]);
}

describe('name lengths', () => {
  test(`machine type name: ${MAX_MACHINE_NAME} bytes accepted, ${MAX_MACHINE_NAME + 1} refused (LIMIT_EXCEEDED)`, () => {
    const ok = mainEvents(configRecord(MAX_MACHINE_NAME, 0)).find((e) => e.type === 'configuration');
    assert.ok(ok && ok.type === 'configuration' && ok.config.machine.length === MAX_MACHINE_NAME);
    assert.throws(() => mainEvents(configRecord(MAX_MACHINE_NAME + 1, 0)), isCode('LIMIT_EXCEEDED', /machine name length 257 exceeds 256/));
    assert.throws(() => encodeConfiguration({ machine: 'm'.repeat(MAX_MACHINE_NAME + 1), capabilities: [] }), RangeError);
  });

  test(`configuration capabilities: ${MAX_CAPABILITIES} accepted, ${MAX_CAPABILITIES + 1} refused (LIMIT_EXCEEDED)`, () => {
    const ok = mainEvents(configRecord(14, MAX_CAPABILITIES)).find((e) => e.type === 'configuration');
    assert.ok(ok && ok.type === 'configuration' && ok.config.capabilities.length === MAX_CAPABILITIES);
    assert.throws(() => mainEvents(configRecord(14, MAX_CAPABILITIES + 1)), isCode('LIMIT_EXCEEDED', /65 capabilities \(max 64\)/));
  });

  test('counted names (block idstr, section idstr): 255 bytes parse; the encoders refuse 256 instead of wrapping the length byte', () => {
    const long = 'b'.repeat(255);
    const events = mainEvents(Buffer.concat([ramStart([long]), encodePageRecordHeader(RamFlag.ZERO, 0, long), Buffer.from([0])]));
    assert.ok(events.some((e) => e.type === 'ram-block' && e.block.name === long));
    assert.ok(events.some((e) => e.type === 'ram-zero' && e.block === long));
    assert.throws(() => encodeBlockEntry('b'.repeat(256), PAGE), RangeError);
    assert.throws(() => encodeSectionFull(SectionType.START, 1, 's'.repeat(256), 0, 1), RangeError);
    assert.throws(() => encodePageRecordHeader(RamFlag.ZERO, 0, 'b'.repeat(256)), RangeError);
  });

  test('multifd packet ramblock: 255 bytes decode; a 256-byte field without NUL is cut at 255 as QEMU does', () => {
    const name = 'r'.repeat(255);
    const h = encodeMultifdPacketHeader({ flags: 0, normalPages: 0, zeroPages: 1, nextPacketSize: 0, packetNum: 1n, ramblock: name, offsets: [0] });
    assert.equal(decodeMultifdPacketHeader(h, MultifdFlag.NOCOMP).ramblock, name);
    h[64 + 255] = 0x72;
    assert.equal(decodeMultifdPacketHeader(h, MultifdFlag.NOCOMP).ramblock, name, 'the 256th byte is not part of the name');
    assert.throws(() => encodeMultifdPacketHeader({ flags: 0, normalPages: 0, zeroPages: 0, nextPacketSize: 0, packetNum: 1n, ramblock: 'r'.repeat(256), offsets: [] }), RangeError);
  });

  test('RAM blocks in one MEM_SIZE list: 4096 accepted, 4097 refused (LIMIT_EXCEEDED)', () => {
    const names = (n: number): string[] => Array.from({ length: n }, (_, i) => `b${i}`);
    assert.equal(mainEvents(ramStart(names(4096))).filter((e) => e.type === 'ram-block').length, 4096);
    assert.throws(() => mainEvents(ramStart(names(4097))), isCode('LIMIT_EXCEEDED', /more than 4096 RAM blocks/));
  });
});

describe('multifd packet header', () => {
  const header = (o: { pagesAlloc?: number; normal?: number; next?: number; flags?: number }): Buffer => {
    const normal = o.normal ?? 1;
    const b = encodeMultifdPacketHeader({ flags: o.flags ?? MultifdFlag.ZLIB, normalPages: normal, zeroPages: 0, nextPacketSize: o.next ?? 100, packetNum: 1n, ramblock: 'pc.ram', offsets: Array.from({ length: Math.min(normal, 128) }, (_, i) => i * PAGE) });
    if (o.pagesAlloc !== undefined) b.writeUInt32BE(o.pagesAlloc, 12);
    return b;
  };

  test(`pages_alloc: ${MULTIFD_PAGES_PER_PACKET} accepted, ${MULTIFD_PAGES_PER_PACKET + 1} refused (COUNT_TOO_LARGE)`, () => {
    assert.equal(decodeMultifdPacketHeader(header({ pagesAlloc: MULTIFD_PAGES_PER_PACKET, normal: MULTIFD_PAGES_PER_PACKET }), MultifdFlag.ZLIB).normalPages, MULTIFD_PAGES_PER_PACKET);
    assert.throws(() => decodeMultifdPacketHeader(header({ pagesAlloc: MULTIFD_PAGES_PER_PACKET + 1 }), MultifdFlag.ZLIB), isCode('COUNT_TOO_LARGE', /pages_alloc 129 exceeds 128/));
    assert.equal(MULTIFD_PACKET_HEADER_SIZE, 320 + 8 * MULTIFD_PAGES_PER_PACKET, 'the header has room for exactly pages_alloc offsets');
  });

  test(`next_packet_size of a compressed packet: ${MULTIFD_MAX_COMPRESSED_PAYLOAD} accepted, one more refused (LIMIT_EXCEEDED)`, () => {
    for (const flags of [MultifdFlag.ZLIB, MultifdFlag.ZSTD]) {
      assert.equal(decodeMultifdPacketHeader(header({ flags, next: MULTIFD_MAX_COMPRESSED_PAYLOAD }), flags).nextPacketSize, MULTIFD_MAX_COMPRESSED_PAYLOAD);
      assert.throws(() => decodeMultifdPacketHeader(header({ flags, next: MULTIFD_MAX_COMPRESSED_PAYLOAD + 1 }), flags), isCode('LIMIT_EXCEEDED', /next_packet_size 1048577 exceeds allocated 1048576/));
    }
    // Uncompressed packets carry normal_pages × 4 KiB whatever next_packet_size says.
    assert.equal(decodeMultifdPacketHeader(header({ flags: MultifdFlag.NOCOMP, next: 0xffffffff }), MultifdFlag.NOCOMP).normalPages, 1);
  });
});

describe('VMDESCRIPTION and device state size', () => {
  /** An empty device state (EOF) and a VMDESCRIPTION of exactly `len` bytes of JSON. */
  function deviceStateWithVmdesc(len: number): Buffer {
    const b = Buffer.alloc(1 + 1 + 4 + len, 0x20);
    b[0] = SectionType.EOF;
    b[1] = SectionType.VMDESCRIPTION;
    b.writeUInt32BE(len, 2);
    b.write('{"devices": [], "pad": "', 6, 'latin1');
    b.write('"}', b.length - 2, 'latin1');
    return b;
  }

  test(`a file's VMDESCRIPTION: ${MAX_VMDESC_BYTES} bytes accepted, one more refused (LIMIT_EXCEEDED)`, () => {
    const ok = verifiedDeviceState(deviceStateWithVmdesc(MAX_VMDESC_BYTES), 1000, 1000 + 6 + MAX_VMDESC_BYTES);
    assert.equal(ok.vmdescOffset, 1);
    const over = deviceStateWithVmdesc(MAX_VMDESC_BYTES + 1);
    assert.throws(() => verifiedDeviceState(over, 1000, 1000 + over.length), isCode('LIMIT_EXCEEDED', /VMDESCRIPTION at the end of the file is 67108865 bytes, more than the 67108864 accepted/));
  });

  test('device state of a live stream (DeviceStateTail): 64 MiB accepted, one byte more refused (LIMIT_EXCEEDED)', () => {
    const t = new DeviceStateTail();
    t.append([Buffer.alloc(64 * 1024 * 1024 - 1)]);
    t.append([Buffer.alloc(1)]);
    assert.equal(t.length, 64 * 1024 * 1024);
    assert.throws(() => t.append([Buffer.alloc(1)]), isCode('LIMIT_EXCEEDED', /device state exceeds 67108864 bytes/));
  });
});

describe('multifd channels', () => {
  const store: PageStore = { writePages: async () => {}, zeroPages: () => {} } as unknown as PageStore;
  const blocks = new Map<string, RamBlock>([['pc.ram', { name: 'pc.ram', usedLength: 16 * PAGE }]]);

  /** A connection that sends `first` and then stays open until end() is called. */
  function connection(first: Buffer): { source: AsyncIterable<Buffer>; end: () => void; started: () => boolean } {
    let end!: () => void;
    const ended = new Promise<void>((r) => { end = r; });
    let started = false;
    return {
      source: (async function* () {
        started = true;
        yield first;
        await ended;
      })(),
      end,
      started: () => started,
    };
  }

  test(`channel count: 1..${MAX_MULTIFD_CHANNELS} (QEMU's multifd-channels); 0 and ${MAX_MULTIFD_CHANNELS + 1} are refused`, () => {
    assert.equal(new MultifdReceiver({ channels: MAX_MULTIFD_CHANNELS, store, blocks }).connected, 0);
    assert.throws(() => new MultifdReceiver({ channels: MAX_MULTIFD_CHANNELS + 1, store, blocks }), RangeError);
    assert.throws(() => new MultifdReceiver({ channels: 0, store, blocks }), RangeError);
    assert.throws(() => new MultifdReceiver({ channels: 1.5, store, blocks }), RangeError);
  });

  test('channel id: channels - 1 accepted, channels refused (BAD_CHANNEL_ID)', async () => {
    const r = new MultifdReceiver({ channels: 3, store, blocks });
    const errors: Error[] = [];
    r.on('error', (e: Error) => errors.push(e));
    const good = connection(encodeMultifdInit(2));
    const run = r.runChannel(good.source, 'c2');
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(r.connected, 1);
    assert.deepEqual(errors, []);
    good.end();
    await run;
    const r2 = new MultifdReceiver({ channels: 3, store, blocks });
    const errors2: Error[] = [];
    r2.on('error', (e: Error) => errors2.push(e));
    await r2.runChannel(connection(encodeMultifdInit(3)).source, 'c3');
    assert.equal(errors2.length, 1);
    assert.ok(errors2[0] instanceof ChannelError);
    isCode('BAD_CHANNEL_ID', /received channel id 3 exceeds channel count 3/)((errors2[0] as ChannelError).cause);
  });

  test('connections open at once: `channels` accepted even before their init; one more is refused (LIMIT_EXCEEDED) without failing the migration', async () => {
    const r = new MultifdReceiver({ channels: 2, store, blocks });
    const errors: Error[] = [];
    const refused: ChannelError[] = [];
    r.on('error', (e: Error) => errors.push(e));
    r.on('refused', (e: ChannelError) => refused.push(e));
    // One identified channel, and one connection that sent the multifd magic and nothing more.
    const magic = encodeMultifdInit(0).subarray(0, 4);
    const a = connection(encodeMultifdInit(0));
    const b = connection(magic);
    const runs = [r.runChannel(a.source, 'a'), r.runChannel(b.source, 'b')];
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(r.openConnections, 2);
    assert.equal(r.connected, 1, 'b has not identified itself yet');
    const c = connection(magic);
    await r.runChannel(c.source, 'c');
    assert.equal(c.started(), false, 'the third connection was never read');
    assert.equal(refused.length, 1);
    assert.equal(refused[0]!.where, 'c');
    isCode('LIMIT_EXCEEDED', /2 multifd connections are already open for 2 channel\(s\)/)(refused[0]!.cause);
    assert.deepEqual(errors, [], 'the migration did not fail');
    // When one closes (a channel may end between packets), a new one is accepted again.
    a.end();
    await runs[0];
    assert.equal(r.openConnections, 1);
    const d = connection(encodeMultifdInit(1));
    const runD = r.runChannel(d.source, 'd');
    await new Promise((res) => setTimeout(res, 20));
    assert.equal(r.connected, 2, 'd identified itself as channel 1');
    assert.equal(refused.length, 1);
    assert.deepEqual(errors, []);
    b.end();
    d.end();
    await Promise.all([runs[1], runD]);
  });
});

describe('pending connections', () => {
  test(`connections waiting for their magic: ${DEFAULT_MAX_PENDING} (the default) wait, one more is closed at once`, async () => {
    const strays: StrayConnectionError[] = [];
    const kinds: string[] = [];
    const incoming = new IncomingConnections({
      identifyTimeoutMs: 10_000,
      maxPending: DEFAULT_MAX_PENDING,
      onKind: (sock, kind) => {
        kinds.push(kind);
        sock.destroy();
      },
      onStray: (e) => strays.push(e),
    });
    const server = createServer((s) => incoming.accept(s));
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as { port: number }).port;
    const clients: Socket[] = [];
    const dial = async (): Promise<Socket> => {
      const s = connect(port, '127.0.0.1');
      s.on('error', () => {});
      clients.push(s);
      await once(s, 'connect');
      return s;
    };
    try {
      for (let i = 0; i < DEFAULT_MAX_PENDING; i++) await dial();
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(strays.length, 0, `${DEFAULT_MAX_PENDING} silent connections wait`);
      const extra = await dial();
      await once(extra, 'close');
      assert.equal(strays.length, 1);
      assert.match(strays[0]!.message, new RegExp(`closed at once: ${DEFAULT_MAX_PENDING} connections are already waiting to identify themselves`));
      // A waiting connection that identifies itself frees its place.
      clients[0]!.write(encodeMultifdInit(0));
      await once(clients[0]!, 'close');
      assert.deepEqual(kinds, ['multifd']);
      const next = await dial();
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(strays.length, 1, 'a place was free again');
      assert.equal(next.destroyed, false);
    } finally {
      for (const s of clients) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    }
  });
});

describe('QMP', () => {
  test(`a QMP line of ${DEFAULT_QMP_MAX_LINE} bytes (the default) is accepted, one byte more is LINE_TOO_LONG`, () => {
    const line = (n: number): Buffer => {
      const b = Buffer.alloc(n + 1, 0x78);
      b.write('{"return": "', 0, 'latin1');
      b.write('"}\n', n - 2, 'latin1');
      return b;
    };
    const msgs = new QmpLineSplitter().push(line(DEFAULT_QMP_MAX_LINE));
    assert.equal(msgs.length, 1);
    assert.throws(() => new QmpLineSplitter().push(line(DEFAULT_QMP_MAX_LINE + 1)), (e: unknown) => e instanceof QmpProtocolError && e.code === 'LINE_TOO_LONG');
  });
});
