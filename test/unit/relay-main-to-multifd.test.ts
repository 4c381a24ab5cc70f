// relay 0 → N without QEMU: QEMU's XBZRLE captures (main channel only, several rounds of deltas)
// replayed into relay --channels-in 0 --channels-out 2, whose B is our receive with 2 channels.
// B's snapshot (and the tee) must hold the memory the capture's records leave; the deltas are
// decoded from the relay's copies, or with --tee from the tee's pages.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { applyXbzrle } from '../../src/codec/xbzrle.js';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { relay } from '../../src/conversations/relay.js';
import { receive } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { connectTo } from '../../src/transports/connect.js';
import { streamScenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

function rebuild(main: Buffer): Map<string, Buffer> {
  const p = new MainStreamParser();
  p.push(main);
  const mem = new Map<string, Buffer>();
  for (let ev = p.next(); ev !== null; ev = p.next()) {
    if (ev.type === 'ram-block') mem.set(ev.block.name, Buffer.alloc(ev.block.usedLength));
    else if (ev.type === 'ram-page') Buffer.concat(ev.data).copy(mem.get(ev.block)!, ev.offset);
    else if (ev.type === 'ram-zero') mem.get(ev.block)!.fill(0, ev.offset, ev.offset + PAGE);
    else if (ev.type === 'ram-xbzrle') applyXbzrle(ev.delta, mem.get(ev.block)!.subarray(ev.offset, ev.offset + PAGE));
  }
  return mem;
}

async function assertHolds(file: string, want: Map<string, Buffer>, what: string): Promise<void> {
  const snap = await MappedRamSnapshot.open(file);
  try {
    for (const [name, m] of want) {
      const got = await snap.readPages(name, 0, m.length / PAGE);
      assert.ok(got.equals(m), `${what}: block ${name} differs from the memory the stream leaves`);
    }
  } finally {
    await snap.close();
  }
}

const s = streamScenarios().find((x) => x.label === '10.0/xbzrle');
const postcopy = streamScenarios().find((x) => x.label === '10.0/postcopy-hugepages');

/** The capture with its RAM PARTs merged into one (EOS, footer, PART header of the same section dropped; START kept apart): rounds re-send pages inside one section. */
function mergedParts(main: Buffer): { merged: Buffer; removed: number } {
  const out: Buffer[] = [];
  let from = 0;
  let removed = 0;
  let first = true;
  const eos = Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x10]);
  for (let at = main.indexOf(eos); at >= 0; at = main.indexOf(eos, at + 1)) {
    const f = at + 8;
    if (main[f] !== 0x7e || main[f + 5] !== 0x02 || main.readUInt32BE(f + 1) !== main.readUInt32BE(f + 6)) continue;
    // The first is START's end (pages never go in START).
    if (first) {
      first = false;
      continue;
    }
    out.push(main.subarray(from, at));
    from = f + 10;
    removed++;
  }
  out.push(main.subarray(from));
  return { merged: Buffer.concat(out), removed };
}

describe('relay 0 → 2 over the QEMU 10.0 XBZRLE capture', { skip: s ? false : 'no 10.0/xbzrle capture' }, () => {
  for (const tee of [false, true]) {
    test(`${tee ? 'with --tee (deltas decoded from the tee)' : 'no tee (deltas decoded from the relay\'s copies)'}: B's snapshot holds the stream's memory`, async () => {
      const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
      try {
        const main = s!.main();
        const want = rebuild(main);
        const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
        const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 0, channelsOut: 2, ...(tee ? { tee: join(dir, 'tee.mig') } : {}) });
        const a = await connectTo(await r.listening);
        a.resume();
        a.end(main);
        const [sum, got] = await Promise.all([r.done, rx.done]);
        assert.equal(sum.status, 'completed');
        assert.equal(sum['sync-mode'], 'round');
        // Setup, one per round of re-sent pages, the end; receive saw as many.
        assert.ok(sum['multifd-syncs'] >= 4, `syncs ${sum['multifd-syncs']}`);
        assert.equal(got['multifd-syncs'], sum['multifd-syncs']);
        assert.equal(sum['channels-out'].length, 2);
        for (const c of sum['channels-out']) assert.ok(c.packets > 0 && c.syncs === sum['multifd-syncs']);
        await assertHolds(join(dir, 'b.mig'), want, 'B');
        if (tee) await assertHolds(join(dir, 'tee.mig'), want, 'tee');
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  }

  test('--sync-mode section with pages re-sent inside one RAM section: the relay splits the section, B pairs every SYNC with an EOS', async () => {
    const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
    try {
      const { merged, removed } = mergedParts(s!.main());
      assert.ok(removed > 3, `PART boundaries merged: ${removed}`);
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2, syncMode: 'section' });
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 0, channelsOut: 2, syncMode: 'section' });
      const a = await connectTo(await r.listening);
      a.resume();
      a.end(merged);
      const [sum, got] = await Promise.all([r.done, rx.done]);
      const p = new MainStreamParser();
      p.push(merged);
      let eos = 0;
      for (let ev = p.next(); ev !== null; ev = p.next()) if (ev.type === 'ram-eos') eos++;
      assert.ok(sum['multifd-syncs'] > eos, `syncs inside sections: ${sum['multifd-syncs']} syncs, ${eos} EOS from A`);
      assert.equal(got['multifd-syncs'], sum['multifd-syncs'], 'every SYNC paired with an EOS on B');
      await assertHolds(join(dir, 'b.mig'), rebuild(merged), 'B');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('--sync-mode section (B with multifd-flush-after-each-section on): a sync before every RAM EOS, no MULTIFD_FLUSH', async () => {
    const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
    try {
      const main = s!.main();
      const p = new MainStreamParser();
      p.push(main);
      let eos = 0;
      for (let ev = p.next(); ev !== null; ev = p.next()) if (ev.type === 'ram-eos') eos++;
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2, syncMode: 'section' });
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 0, channelsOut: 2, syncMode: 'section' });
      const a = await connectTo(await r.listening);
      a.resume();
      a.end(main);
      const [sum, got] = await Promise.all([r.done, rx.done]);
      assert.equal(sum['sync-mode'], 'section');
      assert.equal(got['sync-mode'], 'section');
      // Every EOS, plus one before each re-sent page that came between two of them.
      assert.ok(sum['multifd-syncs'] >= eos, `syncs ${sum['multifd-syncs']}, EOS ${eos}`);
      assert.equal(got['multifd-syncs'], eos, 'B syncs at each EOS only');
      await assertHolds(join(dir, 'b.mig'), rebuild(main), 'B');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a source that advises postcopy-ram is refused with the reason (0 → N carries no postcopy)', { skip: postcopy ? false : 'no 10.0/postcopy-hugepages capture' }, async () => {
    const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
    try {
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 0, channelsOut: 2 });
      const a = await connectTo(await r.listening);
      a.on('error', () => {});
      a.resume();
      a.write(postcopy!.main());
      await assert.rejects(r.done, (e: Error & { code?: string }) => /advised postcopy-ram: relay 0 → N .* does not carry postcopy/.test(e.message));
      a.destroy();
    } finally {
      rx.abort(new Error('test over'));
      await rx.done.catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
