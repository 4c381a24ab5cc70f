import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  QmpLineSplitter,
  QmpProtocolError,
  encodeQmpCommand,
  type QmpMessage,
} from '../../src/codec/qmp.js';
import { QmpClient, QmpCommandError, parseQmpAddress } from '../../src/transports/qmp-client.js';

// Captured from QEMU 10.0.2 (greeting, qmp_capabilities, stop, query-status, an error).
const TRANSCRIPT = [
  '{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}',
  '{"return": {}, "id": "multifd-1"}',
  '{"timestamp": {"seconds": 1763779200, "microseconds": 123456}, "event": "STOP"}',
  '{"return": {}, "id": "multifd-2"}',
  '{"return": {"status": "paused", "running": false}, "id": 3}',
  '{"id": "multifd-4", "error": {"class": "GenericError", "desc": "Parameter \'uri\' is missing"}}',
  '{"timestamp": {"seconds": 1763779201, "microseconds": 5}, "event": "MIGRATION", "data": {"status": "setup"}}',
  '{"return": {"name": "caf\u00e9 \u2603"}}',
].join('\r\n') + '\n';

test('whole transcript parses into typed messages', () => {
  const msgs = new QmpLineSplitter().push(Buffer.from(TRANSCRIPT, 'utf8'));
  assert.equal(msgs.length, 8);
  assert.deepEqual(msgs.map((m) => m.kind), ['greeting', 'return', 'event', 'return', 'return', 'error', 'event', 'return']);
  const g = msgs[0]!;
  assert.ok(g.kind === 'greeting');
  assert.equal(g.QMP.version.qemu.major, 10);
  assert.deepEqual(g.QMP.capabilities, ['oob']);
  const stop = msgs[2]!;
  assert.ok(stop.kind === 'event');
  assert.equal(stop.event, 'STOP');
  assert.deepEqual(stop.data, {});
  assert.deepEqual(stop.timestamp, { seconds: 1763779200, microseconds: 123456 });
  const ret = msgs[4]!;
  assert.ok(ret.kind === 'return');
  assert.equal(ret.id, 3);
  assert.deepEqual(ret.return, { status: 'paused', running: false });
  const err = msgs[5]!;
  assert.ok(err.kind === 'error');
  assert.equal(err.id, 'multifd-4');
  assert.deepEqual(err.error, { class: 'GenericError', desc: "Parameter 'uri' is missing" });
  const mig = msgs[6]!;
  assert.ok(mig.kind === 'event');
  assert.deepEqual(mig.data, { status: 'setup' });
  const last = msgs[7]!;
  assert.ok(last.kind === 'return');
  assert.equal(last.id, undefined);
  assert.deepEqual(last.return, { name: 'café ☃' });
});

test('splitting the transcript at every byte boundary yields the same messages', () => {
  const bytes = Buffer.from(TRANSCRIPT, 'utf8');
  const expected = new QmpLineSplitter().push(bytes);
  for (let cut = 0; cut <= bytes.length; cut++) {
    const s = new QmpLineSplitter();
    const got: QmpMessage[] = [...s.push(bytes.subarray(0, cut)), ...s.push(bytes.subarray(cut))];
    assert.deepEqual(got, expected, `split at ${cut}`);
    assert.equal(s.bufferedBytes, 0);
  }
});

test('byte-at-a-time delivery yields the same messages', () => {
  const bytes = Buffer.from(TRANSCRIPT, 'utf8');
  const expected = new QmpLineSplitter().push(bytes);
  const s = new QmpLineSplitter();
  const got: QmpMessage[] = [];
  for (let i = 0; i < bytes.length; i++) got.push(...s.push(bytes.subarray(i, i + 1)));
  assert.deepEqual(got, expected);
});

test('a chunk buffer reused by the caller does not corrupt a partial line', () => {
  const s = new QmpLineSplitter();
  const chunk = Buffer.from('{"return": {"a"');
  assert.deepEqual(s.push(chunk), []);
  chunk.fill(0x20);
  const msgs = s.push(Buffer.from(': 1}}\n'));
  assert.deepEqual(msgs, [{ kind: 'return', return: { a: 1 } }]);
});

test('over-long line throws LINE_TOO_LONG even before the newline arrives', () => {
  const s = new QmpLineSplitter({ maxLineBytes: 64 });
  assert.deepEqual(s.push(Buffer.from('{"return": {}}\n')), [{ kind: 'return', return: {} }]);
  s.push(Buffer.from('{"return": "' + 'x'.repeat(40)));
  assert.throws(
    () => s.push(Buffer.from('y'.repeat(40))),
    (e: unknown) => e instanceof QmpProtocolError && e.code === 'LINE_TOO_LONG',
  );
  const s2 = new QmpLineSplitter({ maxLineBytes: 64 });
  assert.throws(
    () => s2.push(Buffer.from('{"return": "' + 'x'.repeat(100) + '"}\n')),
    (e: unknown) => e instanceof QmpProtocolError && e.code === 'LINE_TOO_LONG' && e instanceof Error,
  );
});

test('a line of exactly the limit is accepted', () => {
  const line = '{"return": "' + 'x'.repeat(50) + '"}';
  const s = new QmpLineSplitter({ maxLineBytes: line.length });
  assert.equal(s.push(Buffer.from(line + '\n')).length, 1);
});

test('invalid JSON throws INVALID_JSON', () => {
  const s = new QmpLineSplitter();
  assert.throws(
    () => s.push(Buffer.from('{"return": {}\n')),
    (e: unknown) => e instanceof QmpProtocolError && e.code === 'INVALID_JSON' && /invalid JSON/.test(e.message),
  );
  assert.throws(
    () => new QmpLineSplitter().push(Buffer.from('[1,2]\n')),
    (e: unknown) => e instanceof QmpProtocolError && e.code === 'UNKNOWN_MESSAGE',
  );
});

test('a bad line after good ones in the same chunk: the good messages come with the error, whatever the chunking', () => {
  const good = ['{"return": {"status": "active"}, "id": "multifd-7"}', '{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}'];
  const expected = new QmpLineSplitter().push(Buffer.from(good.join('\n') + '\n'));
  assert.equal(expected.length, 2);
  const bytes = Buffer.from(good.join('\r\n') + '\n{"return": oops}\n{"return": {}}\n');
  const s = new QmpLineSplitter();
  assert.throws(() => s.push(bytes), (e: unknown) => {
    assert.ok(e instanceof QmpProtocolError && e.code === 'INVALID_JSON');
    assert.deepEqual(e.messages, expected, 'the messages before the bad line are handed over with the error');
    return true;
  });
  // Delivered by the pushes before the error, or with it: every split gives the same two messages.
  for (let cut = 0; cut <= bytes.length; cut++) {
    const sp = new QmpLineSplitter();
    const got: QmpMessage[] = [];
    let err: QmpProtocolError | undefined;
    try {
      for (const part of [bytes.subarray(0, cut), bytes.subarray(cut)]) got.push(...sp.push(part));
    } catch (e) {
      assert.ok(e instanceof QmpProtocolError);
      err = e;
      got.push(...e.messages);
    }
    assert.equal(err?.code, 'INVALID_JSON', `split at ${cut}`);
    assert.deepEqual(got, expected, `split at ${cut}`);
  }
  // The same for a line over the limit and for a line that is JSON but no QMP message.
  const long = new QmpLineSplitter({ maxLineBytes: 80 });
  assert.throws(() => long.push(Buffer.from(`${good[0]}\n{"return": "${'x'.repeat(100)}"}\n`)), (e: unknown) =>
    e instanceof QmpProtocolError && e.code === 'LINE_TOO_LONG' && e.messages.length === 1 && e.messages[0]!.kind === 'return');
  assert.throws(() => new QmpLineSplitter().push(Buffer.from(`${good[1]}\n[1]\n`)), (e: unknown) =>
    e instanceof QmpProtocolError && e.code === 'UNKNOWN_MESSAGE' && e.messages.length === 1 && e.messages[0]!.kind === 'event');
  // An error on the chunk's first line has nothing to hand over.
  assert.throws(() => new QmpLineSplitter().push(Buffer.from('nope\n')), (e: unknown) => e instanceof QmpProtocolError && e.messages.length === 0);
});

test('blank lines are ignored', () => {
  assert.deepEqual(new QmpLineSplitter().push(Buffer.from('\n\r\n  \n')), []);
});

test('encodeQmpCommand produces one JSON line', () => {
  assert.equal(encodeQmpCommand('stop').toString(), '{"execute":"stop"}\n');
  assert.equal(
    encodeQmpCommand('migrate', { uri: 'unix:/tmp/x' }, 7).toString(),
    '{"execute":"migrate","arguments":{"uri":"unix:/tmp/x"},"id":7}\n',
  );
  const enc = encodeQmpCommand('human-monitor-command', { 'command-line': 'info\nstatus' }, 'a');
  assert.equal(enc.indexOf(0x0a), enc.length - 1, 'embedded newlines must be escaped');
  assert.deepEqual(JSON.parse(enc.toString()), {
    execute: 'human-monitor-command', arguments: { 'command-line': 'info\nstatus' }, id: 'a',
  });
});

// The client is tested here against a scripted server because its behaviour on
// reordered replies and abrupt closes is hard to provoke from a real QEMU.
describe('QmpClient against a scripted server', () => {
  const GREETING = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""}, "capabilities": []}}\n';

  async function withServer(
    onCommand: (cmd: { execute: string; arguments?: any; id?: unknown }, sock: net.Socket) => void,
    body: (address: string) => Promise<void>,
  ): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), 'multifd-qmp-'));
    const path = join(dir, 'qmp.sock');
    const sockets = new Set<net.Socket>();
    const server = net.createServer((sock) => {
      sockets.add(sock);
      sock.write(GREETING);
      let buf = '';
      sock.on('data', (d) => {
        // Commands are JSON lines too, but not QMP server messages, so split them by hand.
        buf += d.toString();
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const cmd = JSON.parse(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          if (cmd.execute === 'qmp_capabilities') sock.write(JSON.stringify({ return: {}, id: cmd.id }) + '\n');
          else onCommand(cmd, sock);
        }
      });
      sock.on('error', () => {});
    });
    await new Promise<void>((r) => server.listen(path, r));
    try {
      await body(`unix:${path}`);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
      rmSync(dir, { recursive: true, force: true });
    }
  }

  test('matches out-of-order replies by id and emits events', async () => {
    const held: Array<{ id: unknown; sock: net.Socket }> = [];
    await withServer(
      (cmd, sock) => {
        if (cmd.execute === 'slow') held.push({ id: cmd.id, sock });
        else if (cmd.execute === 'fast') {
          sock.write('{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "active"}}\n');
          sock.write(JSON.stringify({ return: { which: 'fast' }, id: cmd.id }) + '\n');
          for (const h of held) h.sock.write(JSON.stringify({ return: { which: 'slow' }, id: h.id }) + '\n');
        } else {
          sock.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: `The command ${cmd.execute} has not been found` }, id: cmd.id }) + '\n');
        }
      },
      async (address) => {
        const c = await QmpClient.connect(address);
        assert.equal(c.greeting?.QMP.version.qemu.major, 11);
        const events: unknown[] = [];
        c.on('event', (name, data, ts) => events.push([name, data, ts]));
        const ev = c.waitForEvent('MIGRATION', 2_000, (d) => d['status'] === 'active');
        const slow = c.execute('slow');
        const fast = c.execute('fast');
        assert.deepEqual(await fast, { which: 'fast' });
        assert.deepEqual(await slow, { which: 'slow' });
        assert.deepEqual(await ev, { status: 'active' });
        assert.deepEqual(events, [['MIGRATION', { status: 'active' }, { seconds: 1, microseconds: 2 }]]);
        await assert.rejects(c.execute('migrate', { uri: 'x' }), (e: unknown) =>
          e instanceof QmpCommandError && e.errorClass === 'CommandNotFound' && e.command === 'migrate'
          && e.message === 'QMP migrate failed: The command migrate has not been found');
        c.close();
      },
    );
  });

  test('a reply followed by a bad line in the same segment still resolves its command', async () => {
    const events: string[] = [];
    await withServer(
      (cmd, sock) => {
        sock.write(`{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}\n${JSON.stringify({ return: { ok: 1 }, id: cmd.id })}\n{garbage\n`);
      },
      async (address) => {
        const c = await QmpClient.connect(address);
        c.on('event', (name: string) => events.push(name));
        const closed = new Promise<Error | undefined>((r) => c.once('close', r));
        assert.deepEqual(await c.execute('query-something'), { ok: 1 });
        assert.match(String(await closed), /QMP protocol error .*invalid JSON/);
        assert.deepEqual(events, ['RESUME']);
      },
    );
  });

  test('rejects every pending command when the server closes', async () => {
    let n = 0;
    await withServer(
      (_cmd, sock) => { if (++n === 2) sock.destroy(); },
      async (address) => {
        const c = await QmpClient.connect(address);
        const closed = new Promise((r) => c.once('close', r));
        const a = c.execute('hang-1');
        const b = c.execute('hang-2');
        await assert.rejects(a, /QMP connection to unix:.* closed.*hang-1/);
        await assert.rejects(b, /QMP connection to unix:.* closed.*hang-2/);
        await closed;
        await assert.rejects(c.execute('later'), /closed/);
      },
    );
  });

  test('per-command timeout', async () => {
    await withServer(() => {}, async (address) => {
      const c = await QmpClient.connect(`${address.slice(5)}`);
      await assert.rejects(c.execute('hang', undefined, { timeoutMs: 50 }), /QMP hang .* timed out after 50 ms/);
      c.close();
    });
  });

  test('connection refused names the address', async () => {
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const port = (srv.address() as net.AddressInfo).port;
    await new Promise<void>((r) => srv.close(() => r()));
    await assert.rejects(QmpClient.connect(`tcp:127.0.0.1:${port}`), new RegExp(`tcp:127\\.0\\.0\\.1:${port}: connection refused`));
  });

  test('address parsing', () => {
    assert.deepEqual(parseQmpAddress('unix:/tmp/a.sock'), { kind: 'unix', path: '/tmp/a.sock' });
    assert.deepEqual(parseQmpAddress('/tmp/a.sock'), { kind: 'unix', path: '/tmp/a.sock' });
    assert.deepEqual(parseQmpAddress('tcp:localhost:4444'), { kind: 'tcp', host: 'localhost', port: 4444 });
    assert.deepEqual(parseQmpAddress('tcp:[::1]:4444'), { kind: 'tcp', host: '::1', port: 4444 });
    assert.throws(() => parseQmpAddress('tcp:host'), /tcp:host:port/);
    assert.throws(() => parseQmpAddress('vsock:3:4'), /expected unix/);
  });
});
