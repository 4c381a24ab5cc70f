// Relay 0 → N's page conversion (engine/main-pages-to-multifd.ts) over QEMU's main-channel
// captures: the packets, applied in any order between syncs (as B's channels may land them),
// leave the memory the main stream itself leaves; XBZRLE deltas are decoded from the copies kept.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { MainStreamParser, type MainEvent } from '../../src/codec/main-stream-parser.js';
import { MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { MainPagesToMultifd, type PacketSink } from '../../src/engine/main-pages-to-multifd.js';
import { rebuildMemory } from '../helpers/stream-memory.js';
import { streamScenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

function events(main: Buffer): MainEvent[] {
  const p = new MainStreamParser();
  p.push(main);
  const out: MainEvent[] = [];
  for (let ev = p.next(); ev !== null; ev = p.next()) out.push(ev);
  return out;
}

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

async function convert(evs: MainEvent[], cacheBytes?: number): Promise<{ dest: Destination; conv: MainPagesToMultifd }> {
  const dest = new Destination();
  const lengths = new Map<string, number>();
  const conv = new MainPagesToMultifd({ sink: dest, blockLength: (n) => lengths.get(n), ...(cacheBytes === undefined ? {} : { cacheBytes }) });
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
      const evs = events(s.main());
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

    test(`${s.label}: too small a copy fails at the first delta it cannot decode, clearly`, async () => {
      const evs = events(s.main());
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
});
