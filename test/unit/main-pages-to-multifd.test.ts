// Relay 0 → N's page conversion (engine/main-pages-to-multifd.ts) over QEMU's main-channel
// captures: the packets, applied in any order between syncs (as B's channels may land them),
// leave the memory the main stream itself leaves; XBZRLE deltas are decoded from the copies kept.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import type { MainEvent } from '../../src/codec/main-stream-parser.js';
import { MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { encodeXbzrle } from '../../src/codec/xbzrle.js';
import { MainPagesToMultifd, type PacketSink } from '../../src/engine/main-pages-to-multifd.js';
import { PageSpill } from '../../src/engine/page-spill.js';
import { mainEvents, rebuildMemory } from '../helpers/stream-memory.js';
import { streamScenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;


interface Packet { block: string; offsets: number[]; normal: number; data: Buffer }

/** A destination: packets of one round land in reverse order; a sync lands the round. */
class Destination implements PacketSink {
  readonly mem = new Map<string, Buffer>();
  round: Packet[] = [];
  packets = 0;
  syncs = 0;
  maxPages = 0;
  sendPacket(block: string, offsets: ArrayLike<number>, normal: number, zero: number, data: readonly Buffer[]): Promise<void> {
    const o = Array.from({ length: normal + zero }, (_, i) => offsets[i]!);
    this.maxPages = Math.max(this.maxPages, o.length);
    this.round.push({ block, offsets: o, normal, data: Buffer.concat(data.map((d) => Buffer.from(d))) });
    this.packets++;
    return Promise.resolve();
  }
  sync(): Promise<void> {
    this.land();
    this.syncs++;
    return Promise.resolve();
  }
  land(): void {
    const seen = new Set<string>();
    for (const p of this.round.reverse()) {
      for (const [i, off] of p.offsets.entries()) {
        const k = `${p.block}@${off}`;
        assert.ok(!seen.has(k), `page ${k} twice in one round: its copies could land in either order`);
        seen.add(k);
        const m = this.mem.get(p.block)!;
        if (i < p.normal) p.data.copy(m, off, i * PAGE, (i + 1) * PAGE);
        else m.fill(0, off, off + PAGE);
      }
    }
    this.round = [];
  }
}

async function convert(evs: MainEvent[], cacheBytes?: number, spill?: PageSpill): Promise<{ dest: Destination; conv: MainPagesToMultifd }> {
  const dest = new Destination();
  const lengths = new Map<string, number>();
  const conv = new MainPagesToMultifd({ sink: dest, blockLength: (n) => lengths.get(n), ...(cacheBytes === undefined ? {} : { cacheBytes }), ...(spill ? { spill } : {}) });
  for (const ev of evs) {
    if (ev.type === 'ram-block') {
      lengths.set(ev.block.name, ev.block.usedLength);
      dest.mem.set(ev.block.name, Buffer.alloc(ev.block.usedLength));
    }
    if (ev.type !== 'ram-page' && ev.type !== 'ram-zero' && ev.type !== 'ram-xbzrle') continue;
    if (conv.needsSync(ev.block, ev.offset)) await conv.sync();
    if (ev.type === 'ram-page') await conv.page(ev.block, ev.offset, ev.data);
    else if (ev.type === 'ram-zero') await conv.zeroPage(ev.block, ev.offset);
    else await conv.xbzrle(ev.block, ev.offset, ev.delta);
  }
  await conv.sync();
  return { dest, conv };
}

const scenarios = streamScenarios().filter((s) => s.entry.scenario === 'xbzrle');

describe('main-channel pages to multifd packets', () => {
  test('the XBZRLE captures are there (10.0 and 11.1)', () => {
    assert.equal(scenarios.length, 2);
  });
  for (const s of scenarios) {
    test(`${s.label}: packets leave the memory the stream leaves, with a sync before each re-sent page`, async () => {
      const evs = mainEvents(s.main());
      const deltas = evs.filter((e) => e.type === 'ram-xbzrle').length;
      assert.ok(deltas > 1000);
      const { dest, conv } = await convert(evs);
      const want = rebuildMemory(evs);
      assert.equal(dest.mem.size, want.size);
      for (const [name, m] of want) assert.ok(dest.mem.get(name)!.equals(m), `block ${name} differs`);
      assert.equal(conv.xbzrlePages, deltas);
      // Several rounds, so several syncs; packets never hold more than QEMU's page count.
      assert.ok(dest.syncs >= 3, `syncs ${dest.syncs}`);
      assert.equal(dest.syncs, conv.syncs);
      assert.ok(dest.maxPages <= MULTIFD_PAGES_PER_PACKET && dest.maxPages > 1);
      // Only pages sent more than once are copied (in slabs of 256 pages).
      const times = new Map<string, number>();
      for (const e of evs) if (e.type === 'ram-page' || e.type === 'ram-zero' || e.type === 'ram-xbzrle') times.set(`${e.block}@${e.offset}`, (times.get(`${e.block}@${e.offset}`) ?? 0) + 1);
      const repeated = [...times.values()].filter((n) => n > 1).length;
      const ram = [...want.values()].reduce((n, b) => n + b.length, 0);
      assert.ok(repeated * PAGE < ram, 'some pages were sent only once');
      assert.ok(conv.copyBytes <= Math.ceil(repeated / 256) * 256 * PAGE, `copies ${conv.copyBytes} for ${repeated} repeated pages`);
    });

    test(`${s.label}: a 4-page memory copy with a spill file decodes every delta exactly (copies read back from the file)`, async () => {
      const dir = mkdtempSync('/tmp/multifd-spill-test-');
      const spill = await PageSpill.create(dir, PAGE);
      try {
        const evs = mainEvents(s.main());
        const { dest, conv } = await convert(evs, 4 * PAGE, spill);
        const want = rebuildMemory(evs);
        for (const [name, m] of want) assert.ok(dest.mem.get(name)!.equals(m), `block ${name} differs`);
        assert.equal(conv.xbzrlePages, evs.filter((e) => e.type === 'ram-xbzrle').length);
        assert.ok(conv.copyBytes <= 256 * PAGE, `memory ${conv.copyBytes}`);
        assert.ok(conv.evictions > 1000 && spill.writes === conv.evictions, `evictions ${conv.evictions}, spilled ${spill.writes}`);
        // Most deltas found their page in the file, not in memory.
        assert.ok(conv.spillReads > conv.xbzrlePages / 2 && spill.reads > 0, `spill reads ${conv.spillReads} (file ${spill.reads}) of ${conv.xbzrlePages}`);
        // The file was unlinked when it was opened.
        assert.deepEqual(readdirSync(dir), []);
      } finally {
        spill.close();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test(`${s.label}: too small a copy fails at the first delta it cannot decode, clearly`, async () => {
      const evs = mainEvents(s.main());
      await assert.rejects(convert(evs, 4 * PAGE), (e: unknown) => e instanceof ProtocolError && e.code === 'UNSUPPORTED' && /XBZRLE delta for block .* no copy of it is kept/.test(e.message));
      await assert.rejects(convert(evs, 0), (e: unknown) => e instanceof ProtocolError && /keeps no page copies/.test(e.message));
    });
  }

  test('pages of another block or beyond the block are refused; a page twice without a sync is a caller bug', async () => {
    const dest = new Destination();
    dest.mem.set('pc.ram', Buffer.alloc(4 * PAGE));
    const conv = new MainPagesToMultifd({ sink: dest, blockLength: (n) => (n === 'pc.ram' ? 4 * PAGE : undefined) });
    await assert.rejects(conv.page('other', 0, [Buffer.alloc(PAGE)]), (e: unknown) => e instanceof ProtocolError && e.code === 'UNKNOWN_BLOCK');
    await assert.rejects(conv.zeroPage('pc.ram', 4 * PAGE), (e: unknown) => e instanceof ProtocolError && e.code === 'OFFSET_OUT_OF_RANGE');
    await conv.page('pc.ram', PAGE, [Buffer.alloc(PAGE, 1)]);
    assert.equal(conv.needsSync('pc.ram', PAGE), true);
    assert.equal(conv.needsSync('pc.ram', 0), false);
    await assert.rejects(conv.zeroPage('pc.ram', PAGE), /sent twice without a sync/);
    await conv.sync();
    assert.equal(conv.needsSync('pc.ram', PAGE), false);
    assert.equal(dest.packets, 1);
    assert.ok(dest.mem.get('pc.ram')!.subarray(PAGE, 2 * PAGE).equals(Buffer.alloc(PAGE, 1)));
  });

  describe('with a spill file', () => {
    const BLOCK = 'pc.ram';
    const PAGES = 64;
    async function setup(cachePages: number): Promise<{ dest: Destination; conv: MainPagesToMultifd; spill: PageSpill; done: () => void }> {
      const dir = mkdtempSync('/tmp/multifd-spill-test-');
      const spill = await PageSpill.create(dir, PAGE);
      const dest = new Destination();
      dest.mem.set(BLOCK, Buffer.alloc(PAGES * PAGE));
      dest.mem.set('small', Buffer.alloc(2 * PAGE));
      const conv = new MainPagesToMultifd({ sink: dest, blockLength: (n) => (n === BLOCK ? PAGES * PAGE : n === 'small' ? 2 * PAGE : undefined), cacheBytes: cachePages * PAGE, spill });
      return { dest, conv, spill, done: () => { spill.close(); rmSync(dir, { recursive: true, force: true }); } };
    }
    const page = (n: number, v: number): Buffer => {
      const b = Buffer.alloc(PAGE);
      for (let i = 0; i < PAGE; i += 64) b.writeUInt32BE(n * 1000 + v, i);
      return b;
    };
    async function send(conv: MainPagesToMultifd, block: string, n: number, data: Buffer | 'zero'): Promise<void> {
      if (conv.needsSync(block, n * PAGE)) await conv.sync();
      if (data === 'zero') await conv.zeroPage(block, n * PAGE);
      else await conv.page(block, n * PAGE, [data]);
    }

    test('a delta for a page evicted long ago (the memory copy cycled through every other page since) decodes exactly', async () => {
      const { dest, conv, spill, done } = await setup(2);
      try {
        // First pass, then a second sending of every page (copies kept from here on, 2 in memory).
        for (let n = 0; n < PAGES; n++) await send(conv, BLOCK, n, page(n, 0));
        await send(conv, 'small', 0, page(99, 0));
        for (let n = 0; n < PAGES; n++) await send(conv, BLOCK, n, n === 5 ? 'zero' : page(n, 1));
        await send(conv, 'small', 0, page(99, 1));
        // Rounds of deltas over every page but 3 and 5, so those two leave memory early and stay in the file.
        for (let round = 2; round < 5; round++) {
          for (let n = 0; n < PAGES; n++) {
            if (n === 3 || n === 5) continue;
            if (conv.needsSync(BLOCK, n * PAGE)) await conv.sync();
            await conv.xbzrle(BLOCK, n * PAGE, encodeXbzrle(page(n, round - 1), page(n, round))!);
          }
        }
        const evicted = conv.evictions;
        assert.ok(evicted > 3 * PAGES, `evictions ${evicted}`);
        if (conv.needsSync(BLOCK, 3 * PAGE)) await conv.sync();
        await conv.xbzrle(BLOCK, 3 * PAGE, encodeXbzrle(page(3, 1), page(3, 7))!);
        await conv.xbzrle(BLOCK, 5 * PAGE, encodeXbzrle(Buffer.alloc(PAGE), page(5, 7))!);
        await conv.xbzrle('small', 0, encodeXbzrle(page(99, 1), page(99, 7))!);
        await conv.sync();
        const m = dest.mem.get(BLOCK)!;
        assert.ok(m.subarray(3 * PAGE, 4 * PAGE).equals(page(3, 7)), 'page 3 from its copy in the file');
        assert.ok(m.subarray(5 * PAGE, 6 * PAGE).equals(page(5, 7)), 'page 5 (last sent as a zero page) from the file');
        assert.ok(dest.mem.get('small')!.subarray(0, PAGE).equals(page(99, 7)), 'a page of the second block');
        for (let n = 0; n < PAGES; n++) if (n !== 3 && n !== 5) assert.ok(m.subarray(n * PAGE, (n + 1) * PAGE).equals(page(n, 4)), `page ${n}`);
        assert.ok(conv.spillReads >= 3 && spill.reads >= 3, `spill reads ${conv.spillReads}, file reads ${spill.reads}`);
        assert.ok(conv.copyBytes <= 256 * PAGE);
      } finally {
        done();
      }
    });

    test('a hostile delta onto a spilled page fails with its stream offset and leaves the copy intact', async () => {
      const { dest, conv, done } = await setup(1);
      try {
        for (let v = 0; v < 2; v++) for (let n = 0; n < 4; n++) await send(conv, BLOCK, n, page(n, v));
        await conv.sync();
        // Page 0's copy is in the file. A zero run past the page's end:
        const hostile = Buffer.from([0xff, 0x7f, 0x01, 0xaa]);
        await assert.rejects(conv.xbzrle(BLOCK, 0, hostile, 12345), (e: unknown) => e instanceof ProtocolError && e.code === 'BAD_RECORD' && e.offset !== undefined && e.offset >= 12345 && e.offset < 12345 + hostile.length && /XBZRLE delta/.test(e.message));
        await conv.xbzrle(BLOCK, 0, encodeXbzrle(page(0, 1), page(0, 2))!);
        await conv.sync();
        assert.ok(dest.mem.get(BLOCK)!.subarray(0, PAGE).equals(page(0, 2)));
      } finally {
        done();
      }
    });

    test('a delta for a page never sent, or sent once in the first pass, fails clearly', async () => {
      const { conv, done } = await setup(1);
      try {
        await send(conv, BLOCK, 0, page(0, 0));
        await send(conv, BLOCK, 1, page(1, 0));
        await assert.rejects(conv.xbzrle(BLOCK, 2 * PAGE, Buffer.from([0, 1, 7]), 777), (e: unknown) => e instanceof ProtocolError && e.code === 'UNSUPPORTED' && e.offset === 777 && /offset 0x2000: the relay holds no copy of it; the page was not sent before/.test(e.message));
        await send(conv, BLOCK, 0, page(0, 1));
        // Page 1 went out once, before any page was sent twice: QEMU's first pass, which it caches nothing of.
        await assert.rejects(conv.xbzrle(BLOCK, PAGE, Buffer.from([0, 1, 7])), (e: unknown) => e instanceof ProtocolError && e.code === 'UNSUPPORTED' && /sent once only, before the source's first pass was over/.test(e.message));
        // Once some page was sent twice, a page first sent (one a free-page hint let the first pass skip) is kept.
        await send(conv, BLOCK, 9, page(9, 0));
        await send(conv, BLOCK, 10, page(10, 0));
        await conv.sync();
        await conv.xbzrle(BLOCK, 9 * PAGE, encodeXbzrle(page(9, 0), page(9, 1))!);
      } finally {
        done();
      }
    });
  });
});
