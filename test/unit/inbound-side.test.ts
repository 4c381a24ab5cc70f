// The inbound side (conversations/inbound-side.ts) on its own, without QEMU: real sockets on
// 127.0.0.1, the QEMU captures in test/fixtures replayed as the source, and a sink that records
// what the side hands it (pages into memory, events, strays, failures). Its listener, the
// sorting of connections by their first bytes (main, multifd, the preempt channel), the idle
// watch, and the connections it refuses: a bad magic, channels beyond the count, one that never
// says what it is, a second main channel, a main channel that breaks the protocol or is reset.

import { afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { AbortedError, ChannelError, IdleTimeoutError, MultifdError, ProtocolError, StrayConnectionError, type MultifdErrorCode } from '../../src/codec/errors.js';
import { StreamSession, type SessionEvent } from '../../src/codec/stream-session.js';
import type { PageStore, RamBlock } from '../../src/engine/page-store.js';
import { InboundSide, type InboundOptions, type InboundSink } from '../../src/conversations/inbound-side.js';
import { BLOB_OFFSET, findScenario, guestBlob } from '../helpers/fixtures.js';

/** Guest RAM in Buffers, one per block as the main channel lists it. */
class MemoryStore implements PageStore {
  readonly ram = new Map<string, Buffer>();
  constructor(private readonly known: ReadonlyMap<string, RamBlock>) {}

  private block(name: string): Buffer {
    let b = this.ram.get(name);
    if (!b) {
      const info = this.known.get(name);
      assert.ok(info, `a page of block "${name}" before the main channel listed it`);
      b = Buffer.alloc(info.usedLength);
      this.ram.set(name, b);
    }
    return b;
  }

  async writePages(block: string, offsets: ArrayLike<number>, count: number, data: readonly Buffer[]): Promise<void> {
    const b = this.block(block);
    const all = Buffer.concat(data);
    for (let i = 0; i < count; i++) all.copy(b, offsets[i]!, i * TARGET_PAGE_SIZE, (i + 1) * TARGET_PAGE_SIZE);
  }

  zeroPages(block: string, offsets: ArrayLike<number>, start: number, count: number): void {
    const b = this.block(block);
    for (let i = start; i < start + count; i++) b.fill(0, offsets[i]!, offsets[i]! + TARGET_PAGE_SIZE);
  }
}

interface Recorded {
  events: SessionEvent['type'][];
  strays: StrayConnectionError[];
  failures: Error[];
  connected: string[];
  channels: number[];
  ended: number;
  syncs: number;
}

interface Harness {
  side: InboundSide;
  store: MemoryStore;
  log: Recorded;
  address: string;
  /** The sink's busy(): while true the source's silence is no idleness. */
  busy: { value: boolean };
}

const open: { side: InboundSide; sockets: Socket[] }[] = [];

afterEach(async () => {
  for (const o of open.splice(0)) {
    for (const s of o.sockets) s.destroy();
    await o.side.close();
  }
});

async function start(opts: Partial<InboundOptions> = {}): Promise<Harness> {
  const side = new InboundSide({
    listen: 'tcp:127.0.0.1:0',
    channels: 2,
    compression: 'none',
    idlePhases: ['setup', 'ram'],
    conversation: 'receive',
    ...opts,
  });
  const store = new MemoryStore(side.blocks);
  const log: Recorded = { events: [], strays: [], failures: [], connected: [], channels: [], ended: 0, syncs: 0 };
  const busy = { value: false };
  const sink: InboundSink = {
    store,
    snapshot: undefined,
    event(ev) { log.events.push(ev.type); },
    async sync(receiver) {
      log.syncs++;
      await receiver.sync();
    },
    async mainEnded() { log.ended++; },
    channel(id) { log.channels.push(id); },
    connected(kind) { log.connected.push(kind); },
    busy: () => busy.value,
    tick() {},
    stray(e) { log.strays.push(e); },
    fail(e) {
      log.failures.push(side.failed(e));
    },
  };
  const entry = { side, sockets: [] as Socket[] };
  open.push(entry);
  const address = await side.open(sink);
  return { side, store, log, address, busy };
}

/** A client connection to the side's address, closed after the test; `gone` settles when it closes. */
async function dial(h: Harness): Promise<Socket & { gone: Promise<unknown> }> {
  const m = /^tcp:(.+):(\d+)$/.exec(h.address);
  assert.ok(m, h.address);
  const s = Object.assign(connect(Number(m[2]), m[1]!), { gone: Promise.resolve() as Promise<unknown> });
  s.gone = once(s, 'close');
  s.on('error', () => {});
  open.find((o) => o.side === h.side)!.sockets.push(s);
  await once(s, 'connect');
  return s;
}

/** Polls until `pred` holds (the side works on socket events); fails after `ms`. */
async function until(what: string, pred: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

function assertError(e: unknown, cls: abstract new (...a: never[]) => MultifdError, code: MultifdErrorCode, message: RegExp): void {
  assert.ok(e instanceof cls, `${String(e)} is a ${cls.name}`);
  assert.equal(e.code, code, e.message);
  assert.match(e.message, message);
}

const MULTIFD = findScenario('10.0', 'multifd-2ch');
const POSTCOPY = findScenario('10.0', 'postcopy-hugepages');

describe('InboundSide: sorting connections', () => {
  test('the multifd channels first, a stranger between them, main last: a whole migration lands in the store', async () => {
    const h = await start();
    // A connection that is no migration channel is closed and reported; the rest goes on.
    const stranger = await dial(h);
    stranger.write('GET / HTTP/1.1\r\n\r\n');
    for (const c of MULTIFD.channelFiles) (await dial(h)).end(MULTIFD.file(c.file));
    await until('both multifd channels', () => h.side.receiver!.connected === 2);
    (await dial(h)).end(MULTIFD.main());
    await until('the main channel\'s end', () => h.log.ended === 1 || h.log.failures.length > 0);
    assert.deepEqual(h.log.failures, []);
    assert.equal(h.log.strays.length, 1);
    assertError(h.log.strays[0], StrayConnectionError, 'STRAY_CONNECTION', /unknown channel magic 0x47455420 \(expected QEVM or 0x11223344\)/);
    assert.deepEqual(h.log.connected, ['main']);
    assert.deepEqual([...h.log.channels].sort(), [0, 1]);
    assert.equal(h.log.syncs, MULTIFD.check.main.ram_record_counts.FLUSH, 'one sink sync per MULTIFD_FLUSH');
    assert.equal(h.side.rounds, h.log.syncs);
    assert.equal(h.side.mainBytes, MULTIFD.main().length);
    const stats = h.side.receiver!.channelStats();
    const expected = Object.values(MULTIFD.check.channels!).sort((a, b) => a.id - b.id);
    assert.deepEqual(stats.map((c) => [c.id, c.normalPages, c.zeroPages]), expected.map((c) => [c.id, c.normal_pages, c.zero_pages]));
    assert.ok(h.log.events.includes('ram-setup') && h.log.events.includes('complete'), h.log.events.join(','));
    const ram = h.store.ram.get('pc.ram');
    assert.ok(ram, 'pc.ram was written');
    assert.ok(ram.subarray(BLOB_OFFSET, BLOB_OFFSET + guestBlob().length).equals(guestBlob()), 'the blob QEMU held, from the multifd channels');
  });

  test('a multifd channel beyond the count, and a second main channel, are closed as strays', async () => {
    const h = await start({ channels: 1 });
    const ch = MULTIFD.file(MULTIFD.channelFiles.find((c) => c.id === 0)!.file);
    (await dial(h)).write(ch.subarray(0, 64));
    await until('the first multifd channel', () => h.side.receiver!.openConnections === 1);
    (await dial(h)).write(ch.subarray(0, 64));
    await until('a stray', () => h.log.strays.length === 1);
    assertError(h.log.strays[0], StrayConnectionError, 'STRAY_CONNECTION', /a multifd connection beyond the 1 channels; closed/);
    const head = MULTIFD.main().subarray(0, 64);
    (await dial(h)).write(head);
    await until('the main channel', () => h.log.connected.length === 1);
    (await dial(h)).write(head);
    await until('a second stray', () => h.log.strays.length === 2);
    assertError(h.log.strays[1], StrayConnectionError, 'STRAY_CONNECTION', /a second main channel \(QEVM\) while one is in use; closed/);
    assert.deepEqual(h.log.failures, [], 'the migration goes on');
  });

  test('a multifd channel where none is expected fails the conversation, naming the flag', async () => {
    for (const conversation of ['receive', 'relay'] as const) {
      const h = await start({ channels: 0, conversation });
      (await dial(h)).write(MULTIFD.file(MULTIFD.channelFiles[0]!.file).subarray(0, 64));
      await until('the failure', () => h.log.failures.length === 1);
      const flag = conversation === 'relay' ? '--channels-in' : '--channels';
      assertError(h.log.failures[0], ProtocolError, 'BAD_CHANNEL_ID', new RegExp(`a multifd channel connected but the ${conversation === 'relay' ? 'relay' : 'receiver'} expects none \\(${flag} 0\\)`));
      assert.equal(h.side.phase, 'failed');
    }
  });

  test('a connection that never says what it is: closed after the identify timeout; past maxPendingConnections at once', async () => {
    const h = await start({ identifyTimeoutMs: 300, maxPendingConnections: 1 });
    const silent = await dial(h);
    const t0 = Date.now();
    await dial(h);
    await until('the stray beyond the cap', () => h.log.strays.length === 1);
    assertError(h.log.strays[0], StrayConnectionError, 'STRAY_CONNECTION', /closed at once: 1 connections are already waiting to identify themselves/);
    await until('the silent one\'s timeout', () => h.log.strays.length === 2);
    assert.ok(Date.now() - t0 >= 250, 'not before its timeout');
    assertError(h.log.strays[1], StrayConnectionError, 'STRAY_CONNECTION', /connection sent 0 bytes in 0.3s, expected at least 4/);
    await silent.gone;
    // A connection closing before its 4 bytes is a stray too.
    const short = await dial(h);
    short.end(Buffer.from([0x51, 0x45]));
    await until('the short one', () => h.log.strays.length === 3);
    assertError(h.log.strays[2], StrayConnectionError, 'STRAY_CONNECTION', /connection closed after 2 bytes, before its first 4 bytes/);
    assert.deepEqual(h.log.failures, []);
  });
});

describe('InboundSide: the postcopy preempt channel', () => {
  // Header, configuration, OPEN_RETURN_PATH, PING and POSTCOPY_ADVISE: a source that advised postcopy.
  const advised = POSTCOPY.main().subarray(0, POSTCOPY.check.main.offsets['ram_START']!);

  test('after main and every multifd channel, a connection with no magic is the preempt channel', async () => {
    const h = await start({ channels: 0 });
    (await dial(h)).write(advised);
    await until('the advise', () => h.log.events.includes('postcopy-advise'));
    const preempt = await dial(h);
    await until('the preempt channel', () => h.log.connected.length === 2);
    assert.deepEqual(h.log.connected, ['main', 'preempt']);
    preempt.write(Buffer.alloc(10));
    await until('its bytes counted', () => h.side.preemptBytes === 10);
    assert.deepEqual(h.log.strays, []);
  });

  test('one that comes before the multifd channels is taken when its first bytes are no magic; without an advise it is a stray', async () => {
    const h = await start({ channels: 1 });
    (await dial(h)).write(advised);
    await until('the advise', () => h.log.events.includes('postcopy-advise'));
    const preempt = await dial(h);
    // Not by order (the multifd channel has not come): it is read first, then taken as no known magic.
    preempt.write(Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]));
    await until('the preempt channel', () => h.log.connected.includes('preempt'));
    assert.equal(h.side.preemptChannel !== undefined, true);
    const h2 = await start({ channels: 1 });
    (await dial(h2)).write(MULTIFD.main().subarray(0, 64));
    await until('the main channel', () => h2.log.connected.length === 1);
    (await dial(h2)).write(Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]));
    await until('a stray', () => h2.log.strays.length === 1);
    assertError(h2.log.strays[0], StrayConnectionError, 'STRAY_CONNECTION', /unknown channel magic 0x00000000/);
    assert.equal(h2.side.preemptChannel, undefined);
  });
});

describe('InboundSide: the idle watch', () => {
  test('silence counts only in the given phases and while the sink is not busy', async () => {
    const h = await start({ idleTimeoutMs: 300, channels: 0 });
    // Listening: no source yet, so no idleness.
    await sleep(700);
    assert.deepEqual(h.log.failures, []);
    (await dial(h)).write(MULTIFD.main().subarray(0, 64));
    await until('setup', () => h.side.phase === 'setup');
    h.busy.value = true;
    await sleep(700);
    assert.deepEqual(h.log.failures, [], 'the sink waits on its own peer');
    h.busy.value = false;
    await until('the idle failure', () => h.log.failures.length === 1, 5000);
    assertError(h.log.failures[0], IdleTimeoutError, 'IDLE_TIMEOUT', /^the source sent nothing for \d+ s during setup/);
  });
});

describe('InboundSide: a main channel that breaks', () => {
  test('a bad stream version fails it as a ChannelError with the parser\'s code; a relay names the source', async () => {
    for (const conversation of ['receive', 'relay'] as const) {
      const h = await start({ channels: 0, conversation });
      const bad = Buffer.from(MULTIFD.main().subarray(0, 64));
      bad.writeUInt32BE(2, 4);
      (await dial(h)).write(bad);
      await until('the failure', () => h.log.failures.length === 1);
      const prefix = conversation === 'relay' ? 'source main channel' : 'main channel';
      assertError(h.log.failures[0], ChannelError, 'BAD_VERSION', new RegExp(`^${prefix}: `));
    }
  });

  test('reset mid-stream: TRUNCATED, with the stream offset', async () => {
    const h = await start({ channels: 0 });
    const s = await dial(h);
    s.write(POSTCOPY.main().subarray(0, 1000));
    await until('the bytes read', () => h.side.mainBytes === 1000);
    s.resetAndDestroy();
    await until('the failure', () => h.log.failures.length === 1);
    // The offset is where the parser stopped: the start of the record the reset cut.
    const s2 = new StreamSession({ kind: 'live' });
    s2.push(POSTCOPY.main().subarray(0, 1000));
    while (s2.next() !== null);
    assert.ok(s2.offset > 900 && s2.offset <= 1000, String(s2.offset));
    assertError(h.log.failures[0], ChannelError, 'TRUNCATED', new RegExp(`^main channel: the connection was reset before the migration completed, at stream offset ${s2.offset} \\(source gone\\?\\)`));
  });

  test('a late connection after a failure is closed without a word; an abort before listening ends open()', async () => {
    const h = await start({ channels: 0 });
    h.log.failures.push(h.side.failed(new Error('gone')));
    const late = await dial(h);
    await late.gone;
    assert.deepEqual(h.log.strays, []);
    const ac = new AbortController();
    const reason = new Error('stop');
    ac.abort(reason);
    // On a unix socket, so that "the listener is closed again" can be seen: its path is gone.
    const sockDir = mkdtempSync(join(tmpdir(), 'multifd-inbound-'));
    const sockPath = join(sockDir, 'in.sock');
    const side = new InboundSide({ listen: `unix:${sockPath}`, channels: 0, compression: 'none', idlePhases: [], conversation: 'receive', signal: ac.signal });
    open.push({ side, sockets: [] });
    const store = new MemoryStore(side.blocks);
    const noop = (): void => {};
    try {
      await assert.rejects(side.open({ store, snapshot: undefined, event: noop, sync: async () => {}, mainEnded: async () => {}, connected: noop, tick: noop, stray: noop, fail: noop }), (e: unknown) => e instanceof AbortedError && e.reason === reason);
      assert.equal(existsSync(sockPath), false, 'open() closed the listener it had opened');
    } finally {
      rmSync(sockDir, { recursive: true, force: true });
    }
  });
});
