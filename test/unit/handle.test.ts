// The one handle of every conversation and the errors module: abort keeps the caller's reason (on
// the signal and in the error), a caller's own signal is followed, our typed errors pass through
// an abort unchanged, every exported error class carries a stable code, and the send CLI handles
// Ctrl-C like the others (exit 1 with the reason, connections closed).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as api from '../../src/index.js';
import { AbortedError, DestinationError, MultifdError, StallError } from '../../src/codec/errors.js';
import { receive } from '../../src/conversations/receive.js';
import { send } from '../../src/conversations/send.js';
import { makeSyntheticGuest, sendSyntheticMigration } from '../../src/demo/synthetic-source.js';

let dir = '';
let snapshot = '';

before(async () => {
  dir = mkdtempSync('/tmp/multifd-handle-test-');
  snapshot = join(dir, 'source.mig');
  const rx = receive({ listen: 'tcp:127.0.0.1:0', out: snapshot, channels: 2 });
  await Promise.all([rx.done, sendSyntheticMigration(await rx.listening, makeSyntheticGuest(64), { channels: 2, rounds: 1 })]);
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Accepts connections and never reads: a destination that waits forever. */
async function silentServer(): Promise<{ server: Server; addr: string; sockets: Socket[]; close(): void }> {
  const sockets: Socket[] = [];
  const server = createServer((s) => { sockets.push(s); s.on('error', () => {}); s.pause(); });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return { server, addr: `tcp:127.0.0.1:${port}`, sockets, close: () => { for (const s of sockets) s.destroy(); server.close(); } };
}

describe('conversation handle', () => {
  test('abort(reason): the signal carries the reason, done rejects with an AbortedError keeping it', async () => {
    const s = await silentServer();
    try {
      const reason = { why: 'operator' };
      const tx = send({ file: snapshot, to: s.addr, channels: 2 });
      setTimeout(() => tx.abort(reason), 100);
      await assert.rejects(tx.done, (e: unknown) => e instanceof AbortedError && e.code === 'ABORTED' && e.reason === reason && e.cause === reason);
      assert.equal(tx.signal.aborted, true);
      assert.equal(tx.signal.reason, reason);
    } finally {
      s.close();
    }
  });

  test("the caller's signal aborts a listening conversation with its reason", async () => {
    const ac = new AbortController();
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'never.mig'), channels: 2, signal: ac.signal });
    await rx.listening;
    const reason = new Error('shutting down');
    ac.abort(reason);
    await assert.rejects(rx.done, (e: unknown) => e instanceof AbortedError && e.reason === reason && e.message === 'shutting down');
    assert.equal(rx.signal.reason, reason);
  });

  test('an abort with one of our errors fails the conversation with that error itself', async () => {
    const s = await silentServer();
    try {
      const tx = send({ file: snapshot, to: s.addr, channels: 2 });
      const ours = new DestinationError('the destination QEMU failed', 'boom');
      setTimeout(() => tx.abort(ours), 100);
      await assert.rejects(tx.done, (e: unknown) => e === ours);
    } finally {
      s.close();
    }
  });

  test('progress events are typed and arrive before done', async () => {
    const out = join(dir, 'copy.mig');
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2 });
    const tx = send({ file: snapshot, to: await rx.listening, channels: 2, progressIntervalMs: 5 });
    let last = -1;
    tx.on('progress', (p) => { last = p.pagesTotal; });
    const [, summary] = await Promise.all([rx.done, tx.done]);
    assert.equal(summary.destination, 'confirmed');
    assert.ok(last > 0, 'a final progress event with the page count');
  });
});

describe('errors', () => {
  test('every exported error class is a MultifdError with a stable code', () => {
    const classes = (Object.entries(api) as [string, unknown][]).filter((e): e is [string, { prototype: unknown }] => typeof e[1] === 'function' && e[0].endsWith('Error'));
    assert.ok(classes.length >= 18, `the error classes are exported (${classes.map(([n]) => n).join(', ')})`);
    for (const [name, cls] of classes) assert.ok(cls === MultifdError || cls.prototype instanceof MultifdError, `${name} extends MultifdError`);
    const stall = new StallError('x');
    assert.equal(stall.code, 'STALLED');
    assert.equal(stall.name, 'StallError');
    assert.equal(new api.ChannelError('multifd channel 1', new api.ProtocolError('TRUNCATED', 'cut')).code, 'TRUNCATED', 'a wrapper takes the code of what it wraps');
    assert.equal(new api.ChannelError('multifd channel 1', new Error('EIO')).code, 'CHANNEL_FAILED');
  });
});

describe('send CLI', () => {
  for (const [sig, status] of [['SIGINT', 130], ['SIGTERM', 143]] as const) {
    test(`interrupted (${sig}): exit ${status} (128 + the signal's number) with the reason, its connections closed`, async () => {
      const s = await silentServer();
      try {
        const bin = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
        const p = spawn(process.execPath, [bin, 'send', snapshot, '--to', s.addr, '--channels', '2'], { stdio: ['ignore', 'pipe', 'pipe'] });
        let stderr = '';
        p.stderr.on('data', (c: Buffer) => { stderr += c.toString(); });
        const exited = new Promise<number | null>((res) => p.on('exit', (code) => res(code)));
        // Interrupted once all three connections are open (main and two channels).
        for (let i = 0; i < 200 && s.sockets.length < 3; i++) await new Promise((r) => setTimeout(r, 25));
        assert.equal(s.sockets.length, 3);
        // Read (and drop) from now on, so the end of each connection is seen.
        for (const c of s.sockets) c.resume();
        const closed = Promise.all(s.sockets.map((c) => new Promise<void>((r) => { if (c.destroyed) r(); else c.once('close', () => r()); })));
        p.kill(sig);
        assert.equal(await exited, status, stderr);
        assert.ok(stderr.includes(`multifd: error: interrupted (${sig})`), stderr);
        await closed;
      } finally {
        s.close();
      }
    });
  }
});
