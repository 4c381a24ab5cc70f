// receive() end to end without QEMU: our synthetic source (QEMU's sequence, several rounds, pages
// rewritten and zeroed between rounds) and hand-made faulty streams over real sockets.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { encodeLibvirtImage } from '../../src/codec/libvirt-image.js';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { receive, type ReceiveOptions } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { dirtySyntheticGuest, makeSyntheticGuest, sendSyntheticMigration, type SyntheticSendOptions } from '../../src/demo/synthetic-source.js';
import { Command, MultifdFlag, RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { encodeMultifdInit } from '../../src/codec/multifd-init.js';
import { encodeMultifdPacketHeader, encodeSyncPacket } from '../../src/codec/multifd-packet.js';
import { encodeBlockEntry, encodeCommand, encodeEos, encodePing, encodeFooter, encodeMemSize, encodeMultifdFlush, encodePageRecordHeader, encodeSectionFull, encodeSectionShort, encodeStreamHeader } from '../../src/codec/stream-encode.js';

function tmp(): string {
  return mkdtempSync('/tmp/multifd-rx-test-');
}

async function roundTrip(send: Omit<SyntheticSendOptions, 'channels'> & { channels: number }, rx: Partial<ReceiveOptions> = {}) {
  const dir = tmp();
  const out = join(dir, 'vm.mig');
  try {
    const guest = makeSyntheticGuest(8);
    const expected = makeSyntheticGuest(8);
    const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: send.channels, ...rx });
    const addr = await h.listening;
    const [summary] = await Promise.all([h.done, sendSyntheticMigration(addr, guest, send)]);
    for (let r = 2; r <= (send.rounds ?? 2); r++) dirtySyntheticGuest(expected, r);
    const snap = await MappedRamSnapshot.open(out);
    try {
      for (const b of expected.blocks) {
        const got = await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE);
        assert.ok(got.equals(b.data), `block ${b.name} differs from the source's final state`);
      }
      assert.equal(snap.deviceState.sections.length, 1);
    } finally {
      await snap.close();
    }
    assert.deepEqual(readdirSync(dir), ['vm.mig'], 'only the snapshot remains');
    return summary;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('receive from the synthetic source', () => {
  for (const channels of [1, 2, 4]) {
    test(`${channels} channel(s), 3 rounds with pages rewritten and zeroed`, async () => {
      const s = await roundTrip({ channels, rounds: 3 });
      assert.equal(s.channels.length, channels);
      assert.equal(s['sync-mode'], 'round');
      assert.equal(s['multifd-syncs'], 4, 'setup sync + one per round');
      for (const c of s.channels) assert.equal(c.syncs, 4);
      assert.ok(s.duplicate > 0, 'zero pages were listed');
    });
  }

  test('with a libvirt prologue: the image is the header, then the snapshot at its end; …Part until complete, …Save after', async () => {
    const dir = tmp();
    const out = join(dir, 'vm.sav');
    try {
      const prologue = encodeLibvirtImage({ domainXml: '<domain type="kvm"><name>t</name></domain>', wasRunning: true, format: 'sparse' });
      const guest = makeSyntheticGuest(8);
      const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2, libvirtPrologue: prologue });
      const addr = await h.listening;
      const [summary] = await Promise.all([h.done, sendSyntheticMigration(addr, guest, { channels: 2, rounds: 1 })]);
      assert.deepEqual(readdirSync(dir), ['vm.sav'], 'only the image remains');
      const file = readFileSync(out);
      assert.equal(file.toString('latin1', 0, 16), 'LibvirtQemudSave');
      assert.ok(file.subarray(16, prologue.length).equals(prologue.subarray(16)), 'header and data as given');
      assert.equal(summary['file-size'], file.length);
      const snap = await openSnapshot(out);
      try {
        assert.equal(snap.libvirt?.format, 'sparse');
        assert.ok(snap instanceof MappedRamSnapshot, 'read in place as a mapped-ram file');
        for (const b of guest.blocks) assert.ok((await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE)).equals(b.data), `block ${b.name}`);
      } finally {
        await snap.close();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a libvirt prologue with an s3:// output is refused up front', async () => {
    const prologue = encodeLibvirtImage({ domainXml: '<domain/>', wasRunning: true, format: 'sparse' });
    const h = receive({ listen: 'tcp:127.0.0.1:0', out: 's3://bucket/vm.sav', channels: 2, libvirtPrologue: prologue });
    await assert.rejects(h.done, { code: 'INVALID_OPTION', message: /a libvirt image is a local file/ });
  });

  test('per-section sync mode is inferred from the START section', async () => {
    const s = await roundTrip({ channels: 2, rounds: 2, syncMode: 'section' });
    assert.equal(s['sync-mode'], 'section');
    assert.equal(s['multifd-syncs'], 3);
  });

  // The guest controls bytes inside device sections (CMOS NVRAM, buffers): here the device's body
  // holds a complete-looking end of stream (footer, EOF, a VMDESCRIPTION that describes the
  // device as shorter) and the source pauses right after it, as a read boundary there would.
  test('guest bytes that look like the end of the stream at a read boundary: no early commit, no failure', async () => {
    const guest = makeSyntheticGuest(8);
    const real = 4096;
    const fakeDesc = Buffer.from(JSON.stringify({
      page_size: TARGET_PAGE_SIZE,
      devices: [{ name: 'demo-device', instance_id: 0, vmsd_name: 'demo-device', version: 1, fields: [{ name: 'state', type: 'buffer', size: 16 }] }],
    }));
    const fakeLen = Buffer.alloc(4);
    fakeLen.writeUInt32BE(fakeDesc.length);
    const fake = Buffer.concat([Buffer.alloc(16, 0x41), encodeFooter(3), Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION]), fakeLen, fakeDesc]);
    const body = Buffer.alloc(real, 0x42);
    fake.copy(body);
    guest.deviceState = body;
    guest.vmdesc = guest.vmdesc.replace(/"size":\d+/, `"size":${real}`);
    for (const [pauseMs, returnPath] of [[60, true], [0, false]] as const) {
      const dir = tmp();
      const out = join(dir, 'vm.mig');
      try {
        const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2, completionQuietMs: 30 });
        const addr = await h.listening;
        const send = sendSyntheticMigration(addr, guest, { channels: 2, returnPath, deviceStatePause: { at: fake.length, ms: pauseMs } });
        const [summary] = await Promise.all([h.done, send]);
        const snap = await MappedRamSnapshot.open(out);
        try {
          const sections = snap.deviceState.sections;
          assert.equal(sections.length, 1);
          // Header (1+4+1+11+4+4) + body + footer (5): the whole real section, not the fake's 16 bytes.
          assert.equal(sections[0]!.length, 25 + real + 5, `pause ${pauseMs} ms: the committed device section is the real one`);
        } finally {
          await snap.close();
        }
        assert.equal(summary['device-state-bytes'] > real, true);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  test('return path: answers PING with PONG and ends with SHUT(0)', async () => {
    let rp = Buffer.alloc(0);
    const s = await roundTrip({
      channels: 2,
      returnPath: true,
      onMain: (sock) => sock.on('data', (d: Buffer) => { rp = Buffer.concat([rp, d]); }),
    });
    assert.equal(s['return-path'], true);
    assert.deepEqual([...rp], [0, 2, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0], 'PONG(1) then SHUT(0)');
  });

  test('without multifd (--channels 0) is refused when channels connect', async () => {
    const dir = tmp();
    try {
      const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'vm.mig'), channels: 0 });
      const addr = await h.listening;
      const sent = sendSyntheticMigration(addr, makeSyntheticGuest(1), { channels: 1 }).catch(() => {});
      await assert.rejects(h.done, /expects none \(--channels 0\)/);
      await sent;
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/** Sends hand-made bytes on a main connection and channel connections, then closes them. */
async function rawMigration(addr: string, main: Buffer[] | undefined, channels: Buffer[][], opts: { keepOpen?: boolean } = {}): Promise<Socket[]> {
  const port = Number(addr.split(':').pop());
  const open = async (bufs: Buffer[]): Promise<Socket> => {
    const s = connect(port, '127.0.0.1');
    s.on('error', () => {});
    await once(s, 'connect');
    for (const b of bufs) s.write(b);
    return s;
  };
  const socks: Socket[] = [];
  if (main) socks.push(await open(main));
  for (const c of channels) socks.push(await open(c));
  if (!opts.keepOpen) for (const s of socks) s.end();
  return socks;
}

const BLOCK = 'ram0';
const BLOCK_LEN = 1024 * 1024;

function mainSetup(): Buffer[] {
  return [
    encodeStreamHeader(),
    encodeConfiguration({ machine: 'pc-test', capabilities: [] }),
    encodeSectionFull(SectionType.START, 1, 'ram', 0, 4),
    encodeMemSize(BLOCK_LEN),
    encodeBlockEntry(BLOCK, BLOCK_LEN),
    encodeMultifdFlush(),
    encodeEos(),
    encodeFooter(1),
  ];
}

function dataPacket(num: bigint, offsets: number[], flags: number = MultifdFlag.NOCOMP, block = BLOCK): Buffer[] {
  const header = encodeMultifdPacketHeader({ flags, normalPages: offsets.length, zeroPages: 0, nextPacketSize: offsets.length * TARGET_PAGE_SIZE, packetNum: num, ramblock: block, offsets });
  return [header, Buffer.alloc(offsets.length * TARGET_PAGE_SIZE, 0x5a)];
}

async function expectFailure(channels: number, run: (addr: string) => Promise<unknown>, pattern: RegExp, extra: Partial<ReceiveOptions> = {}): Promise<Error> {
  const dir = tmp();
  try {
    const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'vm.mig'), channels, ...extra });
    const addr = await h.listening;
    const socks = await run(addr);
    let err: Error | undefined;
    await assert.rejects(h.done, (e: Error) => { err = e; return pattern.test(e.message); });
    if (Array.isArray(socks)) for (const s of socks as Socket[]) s.destroy();
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(readdirSync(dir), [], 'no snapshot and no temporary file remain');
    return err!;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('receive failures', () => {
  test('a compressing source is named', async () => {
    await expectFailure(1, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n), ...dataPacket(1n, [0], MultifdFlag.ZLIB)]], { keepOpen: true }),
      /multifd channel 0: source uses zlib, receiver expects none/, { compression: 'none' });
  });

  test('a channel id beyond the channel count', async () => {
    await expectFailure(2, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0)], [encodeMultifdInit(2)]], { keepOpen: true }),
      /received channel id 2 exceeds channel count 2/);
  });

  test('a duplicate channel id', async () => {
    await expectFailure(2, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(1)], [encodeMultifdInit(1)]], { keepOpen: true }),
      /channel id 1 already set up/);
  });

  test('too few channels: the sync times out with a clear message', async () => {
    await expectFailure(2, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n)]], { keepOpen: true }),
      /only 1 of 2 multifd channels connected/, { channelTimeoutMs: 300 });
  });

  test('a channel closed mid-packet', async () => {
    const [h, p] = dataPacket(1n, [0, 4096]);
    await expectFailure(1, (a) => rawMigration(a, [...mainSetup()], [[encodeMultifdInit(0), encodeSyncPacket(0n), h!, p!.subarray(0, 5000)]], {}),
      /multifd channel 0: closed mid-packet/);
  });

  test('an unknown block in a packet', async () => {
    await expectFailure(1, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n), ...dataPacket(1n, [0], MultifdFlag.NOCOMP, 'nope')]], { keepOpen: true }),
      /multifd channel 0: packet names unknown RAM block "nope"/);
  });

  test('an offset beyond the block', async () => {
    await expectFailure(1, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n), ...dataPacket(1n, [BLOCK_LEN])]], { keepOpen: true }),
      /multifd channel 0: packet offset 0x100000 is outside block "ram0"/);
  });

  test('the main channel closes mid-migration (source gone)', async () => {
    await expectFailure(1, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n)]]),
      /main channel: closed before the migration completed/);
  });

  test('bad stream magic on the main channel', async () => {
    await expectFailure(1, (a) => rawMigration(a, [Buffer.from('QEVM\0\0\0\x02')], [], { keepOpen: true }),
      /main channel: migration stream version 2 is obsolete/);
  });

  test('stray connections (garbage, silent, a flood) are closed and reported; the migration completes', async () => {
    const dir = tmp();
    const open: Socket[] = [];
    const dial = async (addr: string): Promise<Socket> => {
      const [host, port] = addr.replace(/^tcp:/, '').split(/:(?=\d+$)/) as [string, string];
      const s = connect(Number(port), host);
      s.on('error', () => {});
      await once(s, 'connect');
      open.push(s);
      return s;
    };
    try {
      const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'vm.mig'), channels: 2, identifyTimeoutMs: 300, maxPendingConnections: 3 });
      const strays: Error[] = [];
      h.on('stray', (e: Error) => strays.push(e));
      const addr = await h.listening;
      (await dial(addr)).write('GET / HTTP/1.0\r\n\r\n');
      await new Promise((r) => setTimeout(r, 50));
      for (let i = 0; i < 4; i++) await dial(addr);
      await new Promise((r) => setTimeout(r, 500));
      const guest = makeSyntheticGuest(4);
      const expected = makeSyntheticGuest(4);
      dirtySyntheticGuest(expected, 2);
      await sendSyntheticMigration(addr, guest, { channels: 2, rounds: 2 });
      const summary = await h.done;
      assert.equal(summary.status, 'completed');
      const msgs = strays.map((e) => e.message);
      assert.ok(msgs.some((m) => /unknown channel magic 0x47455420/.test(m)), `garbage reported: ${msgs.join(' | ')}`);
      assert.equal(msgs.filter((m) => /already waiting to identify/.test(m)).length, 1, `the 4th silent connection was closed at once: ${msgs.join(' | ')}`);
      assert.equal(msgs.filter((m) => /sent 0 bytes in 0.3s/.test(m)).length, 3, `3 silent connections timed out: ${msgs.join(' | ')}`);
      const snap = await MappedRamSnapshot.open(join(dir, 'vm.mig'));
      try {
        for (const b of expected.blocks) assert.ok((await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE)).equals(b.data), `block ${b.name}`);
      } finally {
        await snap.close();
      }
    } finally {
      for (const s of open) s.destroy();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a second QEVM connection while the main channel is in use is closed as a stray', async () => {
    const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(tmp(), 'vm.mig'), channels: 1 });
    const addr = await h.listening;
    const strays: Error[] = [];
    const stray = new Promise<void>((r) => h.on('stray', (e: Error) => { strays.push(e); r(); }));
    const socks = await rawMigration(addr, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n)]], { keepOpen: true });
    try {
      await new Promise((r) => setTimeout(r, 100));
      const [second] = await rawMigration(addr, [encodeStreamHeader()], [], { keepOpen: true });
      socks.push(second!);
      await stray;
      assert.match(strays[0]!.message, /a second main channel \(QEVM\) while one is in use/);
      const state = await Promise.race([h.done.then(() => 'completed', () => 'failed'), new Promise((r) => setTimeout(() => r('pending'), 200))]);
      assert.equal(state, 'pending', 'the migration goes on');
    } finally {
      h.abort(new Error('test over'));
      await h.done.catch(() => {});
      for (const s of socks) s.destroy();
    }
  });

  test('a source that goes silent mid-migration fails it after idleTimeoutMs', async () => {
    const e = await expectFailure(1, (a) => rawMigration(a, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n)]], { keepOpen: true }),
      /the source sent nothing for \d+ s during (setup|ram) \(a stalled channel, a paused source, or gone\?\)/, { idleTimeoutMs: 400 });
    assert.ok(e);
  });

  test('PING before OPEN_RETURN_PATH', async () => {
    await expectFailure(1, (a) => rawMigration(a, [encodeStreamHeader(), encodeConfiguration({ machine: 'm', capabilities: [] }), encodeCommand(Command.PING, Buffer.from([0, 0, 0, 1]))], [], { keepOpen: true }),
      /main channel: PING before OPEN_RETURN_PATH/);
  });

  test('--uuid with validate-uuid and multifd off: a configuration carrying another uuid is refused (UUID_MISMATCH)', async () => {
    const config = encodeConfiguration({ machine: 'm', capabilities: [], uuid: Buffer.alloc(16, 0x11) });
    const e = await expectFailure(0, (a) => rawMigration(a, [encodeStreamHeader(), config, encodeSectionFull(SectionType.START, 1, 'ram', 0, 4)], [], { keepOpen: true }),
      /configuration \(validate-uuid\) carries uuid 11111111-1111-1111-1111-111111111111, expected 22222222-2222-2222-2222-222222222222/, { uuid: Buffer.alloc(16, 0x22), idleTimeoutMs: 5000 });
    assert.equal((e as Error & { code?: string }).code, 'UUID_MISMATCH');
  });

  test('abort() mid-migration removes the temporary file', async () => {
    const dir = tmp();
    try {
      const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'vm.mig'), channels: 1 });
      const addr = await h.listening;
      const socks = await rawMigration(addr, mainSetup(), [[encodeMultifdInit(0), encodeSyncPacket(0n)]], { keepOpen: true });
      await new Promise((r) => setTimeout(r, 100));
      h.abort(new Error('stopped by the test'));
      await assert.rejects(h.done, /stopped by the test/);
      for (const s of socks) s.destroy();
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// Postcopy (issue #8): precopy pages travel on multifd and are synced by the prepare FLUSH; after
// the package, pages come on main (and preempt). A postcopy page is newer than any precopy copy.
describe('receive: a source that switches to postcopy', () => {
  const pkg = (): Buffer => {
    const dev = Buffer.concat([encodeSectionFull(SectionType.FULL, 2, 'dev', 0, 1), Buffer.alloc(8, 7), encodeFooter(2)]);
    const inner = Buffer.concat([encodeCommand(Command.POSTCOPY_LISTEN), dev, encodePing(3), encodePing(0x42), encodeCommand(Command.POSTCOPY_RUN)]);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(inner.length);
    return Buffer.concat([encodeCommand(Command.PACKAGED, len), inner]);
  };
  const advise = (): Buffer => {
    const p = Buffer.alloc(16);
    p.writeBigUInt64BE(4096n, 0);
    p.writeBigUInt64BE(4096n, 8);
    return encodeCommand(Command.POSTCOPY_ADVISE, p);
  };
  const pageOnMain = (offset: number, fill: number): Buffer[] => [encodePageRecordHeader(RamFlag.PAGE, offset, BLOCK), Buffer.alloc(TARGET_PAGE_SIZE, fill)];
  const start = (): Buffer[] => {
    const s = mainSetup();
    // OPEN_RETURN_PATH, PING(1), ADVISE go before the START section, as QEMU sends them.
    return [s[0]!, s[1]!, encodeCommand(Command.OPEN_RETURN_PATH), encodeCommand(Command.PING, Buffer.from([0, 0, 0, 1])), advise(), ...s.slice(2)];
  };

  test('the postcopy copy of a page wins over its precopy copy; PINGs in the package are answered', async () => {
    const dir = tmp();
    try {
      const out = join(dir, 'pc.mig');
      const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 1 });
      const addr = await h.listening;
      const main = [
        ...start(),
        // Round 1 on multifd (page 0 = 0x5a), then the prepare: FLUSH after one SYNC per channel.
        encodeSectionShort(SectionType.PART, 1), encodeMultifdFlush(), encodeEos(), encodeFooter(1),
        encodeCommand(Command.SWITCHOVER_START), pkg(),
        encodeSectionShort(SectionType.PART, 1), ...pageOnMain(0, 0x77), encodeEos(), encodeFooter(1),
        encodeSectionShort(SectionType.END, 1), encodeEos(), encodeFooter(1), Buffer.from([SectionType.EOF]),
      ];
      const chan = [encodeMultifdInit(0), encodeSyncPacket(0n), ...dataPacket(1n, [0, TARGET_PAGE_SIZE]), encodeSyncPacket(2n)];
      const socks = await rawMigration(addr, main, [chan], { keepOpen: true });
      let rp = Buffer.alloc(0);
      socks[0]!.on('data', (d: Buffer) => { rp = Buffer.concat([rp, d]); });
      const s = await h.done;
      // SHUT(0) was written before done resolved; give it the moment to arrive.
      for (let i = 0; i < 50 && rp.length < 32; i++) await sleep(20);
      for (const x of socks) x.destroy();
      assert.ok(s.postcopy, 'postcopy reported');
      assert.equal(s.postcopy['main-pages'], 1);
      const snap = await MappedRamSnapshot.open(out);
      try {
        assert.ok((await snap.readPages(BLOCK, 0, 1)).equals(Buffer.alloc(TARGET_PAGE_SIZE, 0x77)), 'page 0 holds its postcopy copy');
        assert.ok((await snap.readPages(BLOCK, TARGET_PAGE_SIZE, 1)).equals(Buffer.alloc(TARGET_PAGE_SIZE, 0x5a)), 'page 1 holds its precopy copy');
        assert.equal(snap.deviceState.sections.length, 1, 'the package\'s device section is in the snapshot');
      } finally {
        await snap.close();
      }
      // PONG(1), PONG(3), PONG(0x42), SHUT(0).
      assert.deepEqual([...rp], [0, 2, 0, 4, 0, 0, 0, 1, 0, 2, 0, 4, 0, 0, 0, 3, 0, 2, 0, 4, 0, 0, 0, 0x42, 0, 1, 0, 4, 0, 0, 0, 0]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a multifd packet after the switch is refused (it could overwrite a newer postcopy page)', async () => {
    const dir = tmp();
    try {
      const h = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'pc.mig'), channels: 1 });
      const addr = await h.listening;
      const main = [...start(), encodeSectionShort(SectionType.PART, 1), encodeMultifdFlush(), encodeEos(), encodeFooter(1), pkg()];
      const socks = await rawMigration(addr, main, [[encodeMultifdInit(0), encodeSyncPacket(0n), encodeSyncPacket(1n)]], { keepOpen: true });
      socks[0]!.resume();
      await sleep(200);
      socks[1]!.write(Buffer.concat(dataPacket(2n, [0])));
      await assert.rejects(h.done, /packet after the switch to postcopy/);
      for (const x of socks) x.destroy();
      assert.deepEqual(readdirSync(dir), [], 'no snapshot left');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
