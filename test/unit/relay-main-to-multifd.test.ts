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
});
