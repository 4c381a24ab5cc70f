// MultifdSender against in-memory channels: what goes on each wire (init, setup SYNC, packets,
// final SYNC), that every page arrives once with zero pages listed, the next-idle-channel rule,
// per-channel write order under out-of-order reads, and failures.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { MULTIFD_PACKET_HEADER_SIZE, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { isSync } from '../../src/codec/multifd-packet.js';
import { MultifdChannelParser, type ChannelEvent } from '../../src/codec/multifd-channel-parser.js';
import { MemoryPages } from '../../src/engine/memory-pages.js';
import { getMethod } from '../../src/engine/methods/registry.js';
import { MultifdSender, type PageLoader, type SendChannel } from '../../src/engine/multifd-sender.js';

const PAGE = TARGET_PAGE_SIZE;

class CaptureChannel implements SendChannel {
  readonly chunks: Buffer[] = [];
  writes = 0;
  constructor(private readonly delayMs = 0, private readonly failAfter = Infinity) {}
  async write(bufs: readonly Buffer[]): Promise<void> {
    if (this.delayMs) await sleep(this.delayMs);
    if (++this.writes > this.failAfter) throw new Error('peer reset');
    // Copied at write time: the sender reuses its buffers once the write resolved.
    this.chunks.push(Buffer.concat(bufs as Buffer[]));
  }
  events(): ChannelEvent[] {
    const p = new MultifdChannelParser(0);
    p.push(Buffer.concat(this.chunks));
    const out: ChannelEvent[] = [];
    for (let e = p.next(); e !== null; e = p.next()) out.push(e);
    return out;
  }
}

function memory(pages: number, zero: (p: number) => boolean): Buffer {
  const m = Buffer.alloc(pages * PAGE);
  for (let p = 0; p < pages; p++) {
    if (zero(p)) continue;
    m.fill((p % 251) + 1, p * PAGE, (p + 1) * PAGE);
    m.writeUInt32LE(p, p * PAGE);
  }
  return m;
}

/** Rebuilds the block from the captured channels; returns it and per-page arrival counts. */
function rebuild(channels: CaptureChannel[], pages: number): { mem: Buffer; seen: Uint8Array; packetNums: bigint[] } {
  const mem = Buffer.alloc(pages * PAGE, 0xee);
  const seen = new Uint8Array(pages);
  const packetNums: bigint[] = [];
  for (const ch of channels) {
    for (const e of ch.events()) {
      if (e.type !== 'packet') continue;
      packetNums.push(e.header.packetNum);
      const data = Buffer.concat(e.payload);
      for (let i = 0; i < e.header.normalPages + e.header.zeroPages; i++) {
        const off = e.header.offsets[i]!;
        seen[off / PAGE]!++;
        if (i < e.header.normalPages) data.copy(mem, off, i * PAGE, (i + 1) * PAGE);
        else mem.fill(0, off, off + PAGE);
      }
    }
  }
  return { mem, seen, packetNums };
}

async function sendAll(sender: MultifdSender, pages: number, block = 'ram'): Promise<void> {
  for (let first = 0; first < pages; first += 128) {
    await sender.send({ block, runs: [first, Math.min(128, pages - first)], pages: Math.min(128, pages - first) });
  }
}

describe('MultifdSender', () => {
  test('init, setup SYNC, packets and a final SYNC on every channel; every page once; zero pages listed', async () => {
    const pages = 1000;
    const mem = memory(pages, (p) => p % 5 === 0);
    const chans = [new CaptureChannel(), new CaptureChannel(), new CaptureChannel()];
    const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const sender = new MultifdSender({ channels: chans, method: getMethod('none'), loader: new MemoryPages({ ram: mem }), uuid });
    await sender.setup();
    await sendAll(sender, pages);
    await sender.sync();
    chans.forEach((ch, id) => {
      const ev = ch.events();
      assert.equal(ev[0]!.type, 'init');
      assert.equal(ev[0]!.type === 'init' && ev[0].init.id, id);
      assert.ok(ev[0]!.type === 'init' && ev[0].init.uuid.equals(uuid));
      const packets = ev.slice(1).map((e) => (e.type === 'packet' ? e.header : undefined));
      assert.ok(packets[0] && isSync(packets[0]), 'setup SYNC comes right after init');
      assert.ok(packets.at(-1) && isSync(packets.at(-1)!), 'the last packet is the final SYNC');
      assert.equal(packets.filter((h) => h && isSync(h)).length, 2, 'exactly two SYNCs: setup and final');
      assert.ok(packets.length > 2, `channel ${id} carried data packets`);
      for (const h of packets) {
        if (h && isSync(h)) assert.equal(h.flags, 1, 'SYNC packets carry flags 0x01 only');
      }
    });
    const r = rebuild(chans, pages);
    assert.ok(r.mem.equals(mem), 'the block rebuilt from the packets equals the source');
    assert.ok(r.seen.every((n) => n === 1), 'every page travelled exactly once');
    assert.equal(new Set(r.packetNums.map(String)).size, r.packetNums.length, 'packet_num unique across channels');
    const st = sender.stats();
    assert.equal(st.reduce((n, c) => n + c.zeroPages, 0), 200);
    assert.equal(st.reduce((n, c) => n + c.normalPages, 0), 800);
    const wire = chans.reduce((n, c) => n + Buffer.concat(c.chunks).length, 0);
    assert.equal(st.reduce((n, c) => n + c.bytes, 0), wire, 'byte counts match what was written');
    assert.equal(wire, 3 * 64 + 6 * MULTIFD_PACKET_HEADER_SIZE + Math.ceil(pages / 128) * MULTIFD_PACKET_HEADER_SIZE + 800 * PAGE);
  });

  test("zeroPageDetection 'none' sends zero pages as data", async () => {
    const mem = memory(256, (p) => p < 128);
    const ch = new CaptureChannel();
    const sender = new MultifdSender({ channels: [ch], method: getMethod('none'), loader: new MemoryPages({ ram: mem }), zeroPageDetection: 'none' });
    await sender.setup();
    await sendAll(sender, 256);
    await sender.sync();
    const headers = ch.events().flatMap((e) => (e.type === 'packet' && !isSync(e.header) ? [e.header] : []));
    assert.deepEqual(headers.map((h) => [h.normalPages, h.zeroPages]), [[128, 0], [128, 0]]);
  });

  test('a zero-only batch is a header with no payload', async () => {
    const mem = memory(128, () => true);
    const ch = new CaptureChannel();
    const sender = new MultifdSender({ channels: [ch], method: getMethod('none'), loader: new MemoryPages({ ram: mem }) });
    await sender.setup();
    await sendAll(sender, 128);
    await sender.sync();
    const data = ch.events().flatMap((e) => (e.type === 'packet' && !isSync(e.header) ? [e] : []));
    assert.equal(data.length, 1);
    assert.equal(data[0]!.header.normalPages, 0);
    assert.equal(data[0]!.header.zeroPages, 128);
    assert.equal(data[0]!.header.nextPacketSize, 0);
    assert.equal(data[0]!.wireBytes, MULTIFD_PACKET_HEADER_SIZE);
  });

  test('batches go to the next idle channel: a slow channel gets fewer', async () => {
    const pages = 128 * 40;
    const mem = memory(pages, () => false);
    const slow = new CaptureChannel(40);
    const fast = [new CaptureChannel(1), new CaptureChannel(1)];
    const sender = new MultifdSender({ channels: [slow, ...fast], method: getMethod('none'), loader: new MemoryPages({ ram: mem }) });
    await sender.setup();
    await sendAll(sender, pages);
    await sender.sync();
    const st = sender.stats();
    assert.ok(st[0]!.packets < st[1]!.packets && st[0]!.packets < st[2]!.packets, `slow channel got ${st[0]!.packets}, fast ones ${st[1]!.packets}/${st[2]!.packets}`);
    assert.equal(st.reduce((n, c) => n + c.packets, 0), 40);
    assert.ok(rebuild([slow, ...fast], pages).mem.equals(mem));
  });

  test('packets leave each channel in assignment order even when reads finish out of order', async () => {
    const pages = 128 * 30;
    const mem = memory(pages, () => false);
    const inner = new MemoryPages({ ram: mem });
    const jittery: PageLoader = {
      scratchBytes: () => 0,
      loadRuns: async (block, runs, n) => {
        await sleep(Math.floor(Math.random() * 8));
        return inner.loadRuns(block, runs, n);
      },
    };
    const chans = [new CaptureChannel(), new CaptureChannel()];
    const sender = new MultifdSender({ channels: chans, method: getMethod('none'), loader: jittery, depth: 4 });
    await sender.setup();
    await sendAll(sender, pages);
    await sender.sync();
    for (const ch of chans) {
      const firsts = ch.events().flatMap((e) => (e.type === 'packet' && !isSync(e.header) ? [e.header.offsets[0]!] : []));
      assert.deepEqual(firsts, [...firsts].sort((a, b) => a - b), 'batches assigned in ascending order are written in that order');
    }
    assert.ok(rebuild(chans, pages).mem.equals(mem));
  });

  test('a failing channel fails the sender: error event, sync and later sends reject', async () => {
    const mem = memory(128 * 8, () => false);
    const bad = new CaptureChannel(0, 2);
    const sender = new MultifdSender({ channels: [bad, new CaptureChannel()], method: getMethod('none'), loader: new MemoryPages({ ram: mem }) });
    const errors: Error[] = [];
    sender.on('error', (e: Error) => errors.push(e));
    await sender.setup();
    await assert.rejects(async () => {
      await sendAll(sender, 128 * 8);
      await sender.sync();
    }, /peer reset/);
    assert.equal(errors.length, 1);
    await assert.rejects(sender.send({ block: 'ram', runs: [0, 1], pages: 1 }), /peer reset/);
  });

  test('a failing read fails the sender without an unhandled rejection', async () => {
    const failing: PageLoader = { scratchBytes: () => 0, loadRuns: async () => { throw new Error('disk on fire'); } };
    const sender = new MultifdSender({ channels: [new CaptureChannel(20)], method: getMethod('none'), loader: failing });
    sender.on('error', () => {});
    await sender.setup();
    await sender.send({ block: 'ram', runs: [0, 1], pages: 1 });
    await sender.send({ block: 'ram', runs: [1, 1], pages: 1 });
    await assert.rejects(sender.sync(), /disk on fire/);
  });

  test('batches larger than a packet are refused', async () => {
    const sender = new MultifdSender({ channels: [new CaptureChannel()], method: getMethod('none'), loader: new MemoryPages({ ram: Buffer.alloc(PAGE * 256) }) });
    await assert.rejects(sender.send({ block: 'ram', runs: [0, 129], pages: 129 }), RangeError);
  });
});
