// relay 0 → N without QEMU: QEMU's XBZRLE captures (main channel only, several rounds of deltas)
// replayed into relay --channels-in 0 --channels-out 2, whose B is our receive with 2 channels.
// B's snapshot (and the tee) must hold the memory the capture's records leave; the deltas are
// decoded from the relay's copies, or with --tee from the tee's pages.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { mainEvents, openFilesUnder, rebuildMemory } from '../helpers/stream-memory.js';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { relay } from '../../src/conversations/relay.js';
import { receive } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { connectTo } from '../../src/transports/connect.js';
import { streamScenarios } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

/** B's RAM as A's records leave it. */
function rebuild(main: Buffer): Map<string, Buffer> {
  return rebuildMemory(mainEvents(main));
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
      const eos = mainEvents(merged).filter((ev) => ev.type === 'ram-eos').length;
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
      const eos = mainEvents(main).filter((ev) => ev.type === 'ram-eos').length;
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

  describe('a memory copy far smaller than what A re-sends: copies spill to a temporary file', () => {

    async function start(dir: string): Promise<{ rx: ReturnType<typeof receive>; r: ReturnType<typeof relay>; tmp: string }> {
      const tmp = join(dir, 'tmp');
      mkdirSync(tmp, { recursive: true });
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 0, channelsOut: 2, xbzrleCacheBytes: 16 * PAGE, tempDir: tmp, progressIntervalMs: 20 });
      await r.listening;
      return { rx, r, tmp };
    }

    test('B holds the stream\'s memory; the spill file was open while relaying and is gone after', async () => {
      const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
      const copies: Array<{ deltas: number; copyBytes: number; spilled: number; spillReads: number; dir: string }> = [];
      const onCopies = (m: unknown): void => { copies.push(m as (typeof copies)[number]); };
      subscribe('multifd:relay:xbzrle-copies', onCopies);
      try {
        const { rx, r, tmp } = await start(dir);
        const open = openFilesUnder(tmp);
        assert.equal(open.length, 1, `spill file open under ${tmp}: ${open.join(', ')}`);
        assert.match(open[0]!, /\/multifd-spill-[^/]+\/pages \(deleted\)$/);
        assert.deepEqual(readdirSync(tmp), [], 'unlinked as soon as it is open');
        const main = s!.main();
        const a = await connectTo(await r.listening);
        a.resume();
        a.end(main);
        const [sum] = await Promise.all([r.done, rx.done]);
        assert.equal(sum.status, 'completed');
        await assertHolds(join(dir, 'b.mig'), rebuild(main), 'B');
        assert.deepEqual(openFilesUnder(tmp), [], 'spill file closed');
        assert.deepEqual(readdirSync(tmp), []);
        assert.equal(copies.length, 1);
        const c = copies[0]!;
        assert.equal(c.dir, tmp);
        assert.ok(c.copyBytes <= 256 * PAGE, `memory ${c.copyBytes}`);
        assert.ok(c.spilled > 1000 && c.spillReads > 1000 && c.deltas > 1000, JSON.stringify(c));
      } finally {
        unsubscribe('multifd:relay:xbzrle-copies', onCopies);
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('the spill file is gone after a failure (A closes mid-stream) and after an abort', async () => {
      const dir = mkdtempSync('/tmp/multifd-relay0n-test-');
      try {
        const main = s!.main();
        {
          const { rx, r, tmp } = await start(join(dir, 'fail'));
          assert.equal(openFilesUnder(tmp).length, 1);
          const a = await connectTo(await r.listening);
          a.on('error', () => {});
          a.resume();
          a.end(main.subarray(0, Math.floor(main.length * 0.8)));
          await assert.rejects(r.done, (e: Error & { code?: string }) => e.code === 'TRUNCATED');
          assert.deepEqual(openFilesUnder(tmp), [], 'closed after the failure');
          assert.deepEqual(readdirSync(tmp), []);
          rx.abort(new Error('test over'));
          await rx.done.catch(() => {});
        }
        {
          const { rx, r, tmp } = await start(join(dir, 'abort'));
          const a = await connectTo(await r.listening);
          a.on('error', () => {});
          a.resume();
          a.write(main.subarray(0, Math.floor(main.length * 0.6)));
          // Abort once the relay is into the stream's pages.
          await new Promise<void>((res) => r.on('progress', (p) => { if (p.normal > 1000) res(); }));
          r.abort(new Error('stopped by the test'));
          await assert.rejects(r.done, /stopped by the test/);
          assert.deepEqual(openFilesUnder(tmp), [], 'closed after the abort');
          a.destroy();
          rx.abort(new Error('test over'));
          await rx.done.catch(() => {});
        }
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('an unusable --temp-dir fails before the relay listens, naming it', async () => {
      const missing = '/tmp/multifd-relay0n-no-such-dir/below';
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: 'tcp:127.0.0.1:9', channelsIn: 0, channelsOut: 2, tempDir: missing });
      await assert.rejects(r.listening, (e: Error & { code?: string }) => e.code === 'OUTPUT_FAILED' && e.message.includes(missing));
      await r.done.catch(() => {});
    });
  });
});
