// send() end to end without QEMU: a snapshot made by receive() from our synthetic source is sent
// back into a second receive(); both snapshots must hold the same pages and device state. Also the
// failure paths a user meets: corrupt or truncated files (nothing connects), a destination that
// goes away, refuses the uuid, refuses the connection, or stops reading.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { receive, type ReceiveOptions, type ReceiveSummary } from '../../src/conversations/receive.js';
import { send, type SendOptions, type SendProgress } from '../../src/conversations/send.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { makeSyntheticGuest, sendSyntheticMigration } from '../../src/demo/synthetic-source.js';

let dir = '';
let snapshot = '';

before(async () => {
  dir = mkdtempSync('/tmp/multifd-send-test-');
  snapshot = join(dir, 'source.mig');
  const rx = receive({ listen: 'tcp:127.0.0.1:0', out: snapshot, channels: 2 });
  const addr = await rx.listening;
  await Promise.all([rx.done, sendSyntheticMigration(addr, makeSyntheticGuest(16), { channels: 2, rounds: 3 })]);
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

async function sendToReceive(name: string, s: Omit<SendOptions, 'to' | 'file'> & { file?: string }, rx: Partial<ReceiveOptions> = {}): Promise<{ out: string; summary: ReceiveSummary; sent: Awaited<ReturnType<typeof send>['done']> }> {
  const out = join(dir, `${name}.mig`);
  const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: s.channels ?? 2, ...rx });
  const addr = await h.listening;
  const tx = send({ file: snapshot, to: addr, ...s });
  const [summary, sent] = await Promise.all([h.done, tx.done]);
  return { out, summary, sent };
}

async function assertSameSnapshot(a: string, b: string): Promise<void> {
  const sa = await MappedRamSnapshot.open(a);
  const sb = await MappedRamSnapshot.open(b);
  try {
    assert.deepEqual([...sb.blocks.keys()], [...sa.blocks.keys()]);
    for (const blk of sa.blocks.values()) {
      const pages = blk.usedLength / TARGET_PAGE_SIZE;
      const [da, db] = await Promise.all([sa.readPages(blk.name, 0, pages), sb.readPages(blk.name, 0, pages)]);
      assert.ok(da.equals(db), `block ${blk.name} differs`);
    }
    const devA = await sa.readAt(sa.deviceState.fileOffset, sa.deviceState.end);
    const devB = await sb.readAt(sb.deviceState.fileOffset, sb.deviceState.end);
    assert.ok(devA.equals(devB), 'device state, EOF and VMDESCRIPTION forwarded byte for byte');
    assert.equal(sb.configuration.machine, sa.configuration.machine);
  } finally {
    await sa.close();
    await sb.close();
  }
}

/** A listener that counts connections and never answers. */
async function silentServer(): Promise<{ server: Server; addr: string; sockets: Socket[] }> {
  const sockets: Socket[] = [];
  const server = createServer((s) => { sockets.push(s); s.pause(); });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return { server, addr: `tcp:127.0.0.1:${port}`, sockets };
}

describe('send into receive', () => {
  for (const channels of [1, 2, 8]) {
    test(`${channels} channel(s): same pages and device state; the receiver confirms`, async () => {
      const progress: SendProgress[] = [];
      const out = join(dir, `ch${channels}.mig`);
      const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels });
      const tx = send({ file: snapshot, to: await h.listening, channels, progressIntervalMs: 5 });
      tx.on('progress', (p: SendProgress) => progress.push(p));
      const [summary, sent] = await Promise.all([h.done, tx.done]);
      await assertSameSnapshot(snapshot, out);
      assert.equal(sent.destination, 'confirmed');
      assert.equal(sent.channels.length, channels);
      assert.ok(sent.channels.every((c) => c.syncs === 2), 'setup and final SYNC on every channel');
      assert.equal(summary['sync-mode'], 'round');
      assert.equal(summary['multifd-syncs'], 2, 'one setup and one final barrier');
      assert.equal(sent.normal, summary.normal, 'pages sent = pages received');
      assert.equal(sent.transferred, summary.transferred, 'bytes sent = bytes received');
      const last = progress.at(-1)!;
      assert.equal(last.normal + last.duplicate, last.pagesTotal, 'progress reaches the total');
    });
  }

  test('without multifd (channels 0): pages as PAGE records on the main channel', async () => {
    const { out, sent, summary } = await sendToReceive('ch0', { channels: 0 }, { channels: 0 });
    await assertSameSnapshot(snapshot, out);
    assert.equal(sent['sync-mode'], 'none');
    assert.equal(summary.channels.length, 0);
    assert.ok(sent.normal > 0);
  });

  test('per-section sync mode is what the receiver detects', async () => {
    const { out, summary, sent } = await sendToReceive('section', { channels: 2, syncMode: 'section' });
    await assertSameSnapshot(snapshot, out);
    assert.equal(sent['sync-mode'], 'section');
    assert.equal(summary['sync-mode'], 'section');
  });

  test('without the return path the result is unconfirmed but complete', async () => {
    const { out, sent, summary } = await sendToReceive('norp', { channels: 2, returnPath: false });
    await assertSameSnapshot(snapshot, out);
    assert.equal(sent.destination, 'closed');
    assert.equal(summary['return-path'], false);
  });

  test('the uuid reaches the destination; a wrong one is refused', async () => {
    const uuid = Buffer.from('11111111222233334444555555555555', 'hex');
    const ok = await sendToReceive('uuid', { channels: 2, uuid }, { uuid });
    await assertSameSnapshot(snapshot, ok.out);
    const out = join(dir, 'uuid-bad.mig');
    const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2, uuid });
    const tx = send({ file: snapshot, to: await h.listening, channels: 2 });
    await assert.rejects(h.done, /uuid/);
    await assert.rejects(tx.done, /destination (closed|reported)[^]*uuid/);
  });

  test('a destination that goes away mid-transfer fails the send with a clear error', async () => {
    const big = join(dir, 'big.mig');
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: big, channels: 2 });
    const addr = await rx.listening;
    await Promise.all([rx.done, sendSyntheticMigration(addr, makeSyntheticGuest(256), { channels: 2, rounds: 1 })]);
    const victim = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'victim.mig'), channels: 2, progressIntervalMs: 5 });
    victim.on('progress', (p) => { if (p.normal > 1000) victim.abort(new Error('destination gone')); });
    const tx = send({ file: big, to: await victim.listening, channels: 2 });
    await assert.rejects(victim.done, /destination gone/);
    await assert.rejects(tx.done, /destination (closed|reported a failure)/);
  });

  test('connection refused names the address', async () => {
    const { server, addr } = await silentServer();
    await new Promise((r) => server.close(r));
    await assert.rejects(send({ file: snapshot, to: addr, channels: 2 }).done, (e: Error) => e.message.includes('refused') && e.message.includes(addr));
  });

  test('a destination that stops reading fails after the stall timeout, not never', async () => {
    const big = join(dir, 'big.mig');
    const { server, addr, sockets } = await silentServer();
    try {
      const started = Date.now();
      await assert.rejects(send({ file: big, to: addr, channels: 2, stallTimeoutMs: 1500 }).done, /no progress for/);
      assert.ok(Date.now() - started < 15000);
      assert.equal(sockets.length, 3, 'main and two multifd connections were opened');
    } finally {
      for (const s of sockets) s.destroy();
      server.close();
    }
  });

  test('an aborted send stops at once', async () => {
    const { server, addr, sockets } = await silentServer();
    try {
      const tx = send({ file: join(dir, 'big.mig'), to: addr, channels: 2 });
      setTimeout(() => tx.abort(new Error('user pressed ctrl-c')), 200);
      await assert.rejects(tx.done, /ctrl-c/);
    } finally {
      for (const s of sockets) s.destroy();
      server.close();
    }
  });
});

describe('send refuses bad snapshots before connecting', () => {
  const cases: [string, (f: string) => void, RegExp][] = [
    ['truncated in the device state', (f) => truncateSync(f, readFileSync(f).length - 200), /VMDESCRIPTION|truncat|ends/i],
    ['truncated inside a pages region', (f) => truncateSync(f, 0x180000), /ends|beyond|truncat/i],
    ['cut to its header', (f) => truncateSync(f, 12), /configuration|ends|truncat/i],
    ['not a migration file', (f) => writeFileSync(f, Buffer.alloc(4096, 0x41)), /not a QEMU migration file/],
    ['empty', (f) => writeFileSync(f, Buffer.alloc(0)), /empty/],
    ['a corrupt bitmap offset', (f) => {
      const b = readFileSync(f);
      const snapIdx = b.indexOf(Buffer.from('demo.ram'));
      // bitmap_offset (be64) sits 4 + 8 bytes into the 28-byte header after name and used_length.
      b.writeBigUInt64BE(0xffffffffffn, snapIdx + 8 + 8 + 12);
      writeFileSync(f, b);
    }, /bitmap/],
  ];
  for (const [name, damage, pattern] of cases) {
    test(name, async () => {
      const f = join(dir, `bad-${name.replace(/\W+/g, '-')}.mig`);
      copyFileSync(snapshot, f);
      damage(f);
      const { server, addr, sockets } = await silentServer();
      try {
        await assert.rejects(send({ file: f, to: addr, channels: 2 }).done, pattern);
        assert.equal(sockets.length, 0, 'nothing connected to the destination');
      } finally {
        server.close();
      }
    });
  }
});
