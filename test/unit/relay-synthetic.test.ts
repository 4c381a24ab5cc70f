// relay() end to end without QEMU: the synthetic source (QEMU's sequence, pages rewritten and
// zeroed between rounds) → relay → our receive, over real sockets, with different channel counts
// and compression on each side, per-section sync, the return path, --tee, and both ends failing.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { spawn } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { fileURLToPath } from 'node:url';
import { relay, type RelayOptions, type RelaySummary } from '../../src/conversations/relay.js';
import { receive, type ReceiveSummary } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { dirtySyntheticGuest, makeSyntheticGuest, sendSyntheticMigration, type SyntheticGuest, type SyntheticSendOptions } from '../../src/demo/synthetic-source.js';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { InvalidOptionError } from '../../src/codec/errors.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { encodeBlockEntry, encodeMemSize, encodeSectionFull, encodeStreamHeader } from '../../src/codec/stream-encode.js';
import { SectionType } from '../../src/codec/constants.js';
import { connectTo } from '../../src/transports/connect.js';
import { ZSTD_SKIP } from '../helpers/zstd.js';

const tmp = (): string => mkdtempSync('/tmp/multifd-relay-test-');

async function assertSnapshotIs(file: string, expected: SyntheticGuest, what: string): Promise<void> {
  const snap = await MappedRamSnapshot.open(file);
  try {
    for (const b of expected.blocks) {
      const got = await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE);
      assert.ok(got.equals(b.data), `${what}: block ${b.name} differs from the source's final state`);
    }
    assert.equal(snap.deviceState.sections.length, 1, `${what}: one device section`);
  } finally {
    await snap.close();
  }
}

interface Chain {
  relay: RelaySummary;
  received: ReceiveSummary;
}

/** synthetic source → relay → receive; both snapshots (receive's and the tee) must be the source's final state. */
async function chain(src: SyntheticSendOptions & { rounds: number }, rel: Partial<RelayOptions>, rxChannels: number, o: { tee?: boolean; rxCompression?: string } = {}): Promise<Chain> {
  const dir = tmp();
  try {
    const guest = makeSyntheticGuest(8);
    const expected = makeSyntheticGuest(8);
    for (let r = 2; r <= src.rounds; r++) dirtySyntheticGuest(expected, r);
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: rxChannels, ...(o.rxCompression ? { compression: o.rxCompression } : {}) });
    const to = await rx.listening;
    const r = relay({ listen: 'tcp:127.0.0.1:0', to, ...(o.tee ? { tee: join(dir, 'tee.mig') } : {}), ...rel });
    const from = await r.listening;
    const [relayed, received] = await Promise.all([r.done, rx.done, sendSyntheticMigration(from, guest, src)]);
    await assertSnapshotIs(join(dir, 'b.mig'), expected, 'destination snapshot');
    if (o.tee) await assertSnapshotIs(join(dir, 'tee.mig'), expected, 'tee snapshot');
    assert.deepEqual(readdirSync(dir).sort(), o.tee ? ['b.mig', 'tee.mig'] : ['b.mig'], 'no temporary files left');
    return { relay: relayed, received };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('relay between the synthetic source and receive', () => {
  test('2 → 3 channels, none → zstd, 3 rounds: every round synced on every outgoing channel', { skip: ZSTD_SKIP }, async () => {
    const { relay: s, received } = await chain({ channels: 2, rounds: 3 }, { channelsIn: 2, channelsOut: 3, compressionOut: 'zstd' }, 3);
    assert.equal(s.status, 'completed');
    assert.equal(s.destination, 'confirmed');
    assert.equal(s['channels-in'].length, 2);
    assert.equal(s['channels-out'].length, 3);
    assert.equal(s['compression-in'], 'none');
    assert.equal(s['compression-out'], 'zstd');
    assert.equal(received.compression, 'zstd', 'the destination saw zstd packets');
    assert.equal(s['multifd-syncs'], 4, 'setup sync + one per round');
    for (const c of s['channels-out']) assert.equal(c.syncs, 4, `outgoing channel ${c.id} carried one SYNC per sync point`);
    assert.equal(received['multifd-syncs'], 4);
    assert.equal(s['return-path'], false);
    assert.equal(s.normal, received.normal, 'every page that came in went out');
    assert.equal(s.duplicate, received.duplicate);
    assert.ok(s.duplicate > 0, 'zero pages were relayed as zero entries');
  });

  test('4 → 1 channels with --tee: destination and tee both hold the final state', async () => {
    const { relay: s } = await chain({ channels: 4, rounds: 3 }, { channelsIn: 4, channelsOut: 1 }, 1, { tee: true });
    assert.ok(s.tee, 'tee reported');
    assert.ok(s.tee['file-size'] > 8 * 1024 * 1024);
    assert.equal(s['channels-out'].length, 1);
  });

  test('zstd in → zlib out: decoded on one side, re-encoded on the other', { skip: ZSTD_SKIP }, async () => {
    const dir = tmp();
    try {
      // The synthetic source sends plain pages; a first relay makes them zstd for the second.
      const guest = makeSyntheticGuest(8);
      const expected = makeSyntheticGuest(8);
      dirtySyntheticGuest(expected, 2);
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
      const second = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 3, channelsOut: 2, compressionOut: 'zlib' });
      const first = relay({ listen: 'tcp:127.0.0.1:0', to: await second.listening, channelsIn: 2, channelsOut: 3, compressionOut: 'zstd' });
      const [, s2, received] = await Promise.all([first.done, second.done, rx.done, sendSyntheticMigration(await first.listening, guest, { channels: 2, rounds: 2 })]);
      assert.equal(s2['compression-in'], 'zstd');
      assert.equal(s2['compression-out'], 'zlib');
      assert.equal(received.compression, 'zlib');
      await assertSnapshotIs(join(dir, 'b.mig'), expected, 'after two relays');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const method of ['zstd', 'zlib'] as const) {
    for (const mode of ['as they came', 'recompress', 'levelOut'] as const) {
      test(`${method} in and out on 3 channels each, ${mode}: B and the tee hold the source's final state`, { skip: method === 'zstd' ? ZSTD_SKIP : false }, async () => {
        const dir = tmp();
        try {
          const guest = makeSyntheticGuest(8);
          const expected = makeSyntheticGuest(8);
          for (let r = 2; r <= 3; r++) dirtySyntheticGuest(expected, r);
          const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 3, compression: method });
          const second = relay({
            listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 3, channelsOut: 3, compressionOut: method, tee: join(dir, 'tee.mig'),
            ...(mode === 'recompress' ? { recompress: true } : mode === 'levelOut' ? { levelOut: method === 'zstd' ? 5 : 6 } : {}),
          });
          // The synthetic source sends plain pages: a first relay compresses them for the second.
          const first = relay({ listen: 'tcp:127.0.0.1:0', to: await second.listening, channelsIn: 2, channelsOut: 3, compressionOut: method });
          const [s1, s2, received] = await Promise.all([first.done, second.done, rx.done, sendSyntheticMigration(await first.listening, guest, { channels: 2, rounds: 3 })]);
          assert.equal(s1['passed-encoded'], 0, 'none in, compressed out: every packet encoded by the first relay');
          const dataPackets = s2['channels-in'].reduce((n, c) => n + c.packets - c.syncs, 0);
          assert.ok(dataPackets > 10, `packets with pages reached the second relay (${dataPackets})`);
          assert.equal(s2['passed-encoded'], mode === 'as they came' ? dataPackets : 0, 'packets passed on still compressed');
          assert.equal(received.compression, method);
          await assertSnapshotIs(join(dir, 'b.mig'), expected, `destination after ${method} ${mode}`);
          await assertSnapshotIs(join(dir, 'tee.mig'), expected, `tee after ${method} ${mode}`);
        } finally {
          rmSync(dir, { recursive: true, force: true });
        }
      });
    }
  }

  test('per-section sync mode: every RAM EOS is a sync point on both sides', async () => {
    const { relay: s, received } = await chain({ channels: 2, rounds: 2, syncMode: 'section' }, { channelsIn: 2, channelsOut: 2 }, 2);
    assert.equal(s['sync-mode'], 'section');
    assert.equal(received['sync-mode'], 'section');
    assert.equal(s['multifd-syncs'], 3);
    assert.equal(received['multifd-syncs'], 3);
  });

  test('the source\'s return path: PONG and the destination\'s SHUT(0) reach it through the relay', async () => {
    let rp = Buffer.alloc(0);
    const { relay: s } = await chain({ channels: 2, rounds: 2, returnPath: true, onMain: (sock) => sock.on('data', (d: Buffer) => { rp = Buffer.concat([rp, d]); }) }, { channelsIn: 2 }, 2);
    assert.equal(s['return-path'], true);
    assert.deepEqual([...rp], [0, 2, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0], 'PONG(1) then SHUT(0), from the destination');
  });

  test('a stray connection (garbage) is closed and reported; the migration through the relay completes', async () => {
    const dir = tmp();
    try {
      const guest = makeSyntheticGuest(4);
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 2 });
      const strays: Error[] = [];
      r.on('stray', (e: Error) => strays.push(e));
      const from = await r.listening;
      const junk = await connectTo(from);
      junk.on('error', () => {});
      junk.write('SSH-2.0-OpenSSH_9.6\r\n');
      await new Promise((res) => setTimeout(res, 100));
      const [s] = await Promise.all([r.done, rx.done, sendSyntheticMigration(from, guest, { channels: 2, rounds: 2 })]);
      junk.destroy();
      assert.equal(s.status, 'completed');
      assert.equal(strays.length, 1);
      assert.match(strays[0]!.message, /unknown channel magic 0x5353482d/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('multifd on one side only is refused up front', () => {
    assert.throws(() => relay({ listen: 'tcp:127.0.0.1:0', to: 'tcp:127.0.0.1:1', channelsIn: 2, channelsOut: 0 }), /multifd on both sides or on neither/);
    // N -> 0: thrown by relay() itself, so there is no handle and nothing A could ever migrate to.
    assert.throws(() => relay({ listen: 'tcp:127.0.0.1:0', to: 'tcp:127.0.0.1:1', channelsIn: 4, channelsOut: 0 }), (e: Error & { code?: string }) =>
      e instanceof InvalidOptionError && e.code === 'INVALID_OPTION' &&
      /^channels-in 4 and channels-out 0: multifd from the source onto the destination's main channel is not supported/.test(e.message));
  });
});

describe('relay failures', () => {
  test('the destination dies mid-migration: the relay fails, the source\'s connections are cut, no tee file', async () => {
    const dir = tmp();
    const killer = createServer((s: Socket) => {
      let n = 0;
      s.on('data', (d: Buffer) => {
        n += d.length;
        if (n > 256 * 1024) s.destroy();
      });
      s.on('error', () => {});
    });
    await new Promise<void>((r) => killer.listen(0, '127.0.0.1', r));
    const port = (killer.address() as { port: number }).port;
    try {
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: `tcp:127.0.0.1:${port}`, channelsIn: 2, tee: join(dir, 'tee.mig') });
      const from = await r.listening;
      const source = sendSyntheticMigration(from, makeSyntheticGuest(16), { channels: 2, rounds: 3, returnPath: true });
      // The source fails when the relay cuts it off, possibly before r.done settles: handled now.
      source.catch(() => {});
      const err = await r.done.then(() => undefined, (e: Error) => e);
      assert.ok(err, 'the relay failed');
      assert.match(err.message, /destination closed|connection closed|ECONNRESET|EPIPE/i);
      await source.then(() => {}, () => {});
      assert.deepEqual(readdirSync(dir), [], 'the tee file was removed, not finalised');
    } finally {
      killer.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the source dies mid-migration: the destination\'s connections are closed, nothing completes', async () => {
    const dir = tmp();
    try {
      const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 2, tee: join(dir, 'tee.mig') });
      const from = await r.listening;
      // A source that sends its header and configuration, then goes away.
      const main = await connectTo(from);
      main.write(Buffer.concat([encodeStreamHeader(), encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] })]));
      await new Promise((res) => setTimeout(res, 200));
      main.destroy();
      const err = await r.done.then(() => undefined, (e: Error) => e);
      assert.ok(err);
      assert.match(err.message, /source closed its main channel before the migration completed/);
      const rxErr = await rx.done.then(() => undefined, (e: Error) => e);
      assert.ok(rxErr, 'the destination failed too');
      assert.ok(!existsSync(join(dir, 'tee.mig')) && !existsSync(join(dir, 'b.mig')), 'no snapshot looks complete');
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('relay CLI interrupted (SIGINT) mid-migration: exit 130 with the reason, the tee removed, the source cut off', async () => {
    const dir = tmp();
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
    const bSawConfiguration = new Promise<void>((res) => {
      const on = (): void => {
        unsubscribe('multifd:receive:configuration', on);
        res();
      };
      subscribe('multifd:receive:configuration', on);
    });
    try {
      const bin = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
      const p = spawn(process.execPath, [bin, 'relay', '--listen', 'tcp:127.0.0.1:0', '--to', await rx.listening, '--channels-in', '2', '--tee', join(dir, 'tee.mig')], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      const exited = new Promise<number | null>((res) => p.on('exit', (code) => res(code)));
      const addr = await new Promise<string>((res, rej) => {
        p.stderr.on('data', (b: Buffer) => {
          stderr += b.toString();
          const m = /^listening on (\S+)/m.exec(stderr);
          if (m) res(m[1]!);
        });
        void exited.then(() => rej(new Error(`relay CLI exited early: ${stderr}`)));
      });
      // A source that stops inside its RAM setup section (the tee file exists by then).
      const main = await connectTo(addr);
      main.on('error', () => {});
      main.write(Buffer.concat([
        encodeStreamHeader(),
        encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
        encodeSectionFull(SectionType.START, 2, 'ram', 0, 4),
        encodeMemSize(1 << 20),
        encodeBlockEntry('pc.ram', 1 << 20),
      ]));
      const closed = new Promise<void>((res) => main.on('close', () => res()));
      main.resume();
      // The relay has passed A's setup on to B (and created the tee) once B saw the configuration.
      await bSawConfiguration;
      assert.ok(readdirSync(dir).some((f) => f.includes('tee.mig')), `the tee's temporary file was created (${readdirSync(dir).join(', ')})`);
      p.kill('SIGINT');
      assert.equal(await exited, 130, 'exit status 130: interrupted by SIGINT');
      assert.match(stderr, /multifd: error: interrupted \(SIGINT\)/);
      await closed;
      await rx.done.catch(() => {});
      assert.deepEqual(readdirSync(dir), [], 'no tee, no temporary file, no destination snapshot');
    } finally {
      rx.abort();
      await rx.done.catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a source that goes silent mid-migration fails the relay after idleTimeoutMs; the destination is cut off', async () => {
    const dir = tmp();
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
    try {
      const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 2, idleTimeoutMs: 400 });
      const main = await connectTo(await r.listening);
      main.on('error', () => {});
      main.write(Buffer.concat([encodeStreamHeader(), encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] })]));
      const err = await r.done.then(() => undefined, (e: Error) => e);
      main.destroy();
      assert.ok(err);
      assert.match(err.message, /the source sent nothing for \d+ s during setup \(a stalled channel, a paused source, or gone\?\)/);
      assert.ok(await rx.done.then(() => false, () => true), 'the destination failed too');
    } finally {
      rx.abort();
      await rx.done.catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a destination that refuses the connection fails the relay with what to check', async () => {
    const r = relay({ listen: 'tcp:127.0.0.1:0', to: 'tcp:127.0.0.1:1', channelsIn: 2 });
    const from = await r.listening;
    const source = sendSyntheticMigration(from, makeSyntheticGuest(4), { channels: 2, rounds: 1 });
    source.catch(() => {});
    const err = await r.done.then(() => undefined, (e: Error) => e);
    assert.ok(err);
    assert.match(err.message, /refused/);
    await source.then(() => {}, () => {});
  });
});
