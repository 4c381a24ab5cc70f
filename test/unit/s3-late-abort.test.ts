// An interrupt against the commit's point of no return (docs/s3.md, atomicity): before
// CompleteMultipartUpload is sent it stops the upload (no object, no upload left, "interrupted");
// once it is sent, the store's answer is the truth: the object stored → the conversation succeeds
// with a note; the Complete refused → the usual failure, the upload aborted. Against a scripted
// S3 server on loopback that can hold its answers, through the real S3 client: receive (library
// and CLI), save (against a fake QMP source) and relay --tee, which share the mechanism
// (SnapshotOutput). A local file's rename is the same point for a file.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { receive } from '../../src/conversations/receive.js';
import { relay } from '../../src/conversations/relay.js';
import { save } from '../../src/conversations/save.js';
import { SnapshotOutput } from '../../src/conversations/snapshot-output.js';
import { createServer as createNetServer, type Socket } from 'node:net';
import { configureObjectStore } from '../../src/conversations/object-store.js';
import { convert } from '../../src/conversations/convert.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { makeSyntheticGuest, sendSyntheticMigration, type SyntheticGuest } from '../../src/demo/synthetic-source.js';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { closeS3Clients } from '../../src/transports/s3.js';
import { relaySummaryText, summaryText } from '../../src/cli/format.js';
import { convertText } from '../../src/cli/file-format.js';
import { scriptedStore, type ScriptedStore } from '../helpers/scripted-s3.js';
import { spawnCli } from '../helpers/faults.js';

type Store = ScriptedStore;

const BUCKET = 'snapshots';

async function assertGuestIn(file: string, guest: SyntheticGuest, what: string): Promise<void> {
  const snap = await MappedRamSnapshot.open(file);
  try {
    for (const b of guest.blocks) {
      const got = await snap.readPages(b.name, 0, b.data.length / TARGET_PAGE_SIZE);
      assert.ok(got.equals(b.data), `${what}: block ${b.name} differs from the source's`);
    }
  } finally {
    await snap.close();
  }
}

/**
 * A QEMU source as save sees it over QMP, just enough of it: `migrate` starts the synthetic
 * source towards the given URI (with a return path, so it completes only after our SHUT 0).
 */
async function fakeSourceQmp(dir: string, guest: SyntheticGuest): Promise<{ address: string; close: () => void; sent: () => Promise<unknown> }> {
  let status = 'none';
  let sending: Promise<unknown> = Promise.resolve();
  const sockets = new Set<Socket>();
  const caps = ['multifd', 'return-path', 'mapped-ram', 'background-snapshot', 'pause-before-switchover'].map((capability) => ({ capability, state: false }));
  const answers: Record<string, (args: { uri?: string }) => unknown> = {
    'query-migrate': () => ({ status }),
    'query-status': () => ({ status: 'running', running: true }),
    'query-migrate-capabilities': () => caps,
    'query-migrate-parameters': () => ({ 'downtime-limit': 300, 'max-bandwidth': 134217728, 'multifd-channels': 2, 'multifd-compression': 'none' }),
    'migrate-set-capabilities': () => ({}),
    'migrate-set-parameters': () => ({}),
    migrate: (args) => {
      status = 'active';
      sending = sendSyntheticMigration(args.uri!, guest, { channels: 2, rounds: 1, returnPath: true }).then(() => { status = 'completed'; }, (e: Error) => { status = 'failed'; return e; });
      return {};
    },
  };
  const server = createNetServer((sock) => {
    sockets.add(sock);
    sock.on('error', () => {});
    sock.write('{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}\n');
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString();
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const cmd = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: { uri?: string }; id?: unknown };
        buf = buf.slice(nl + 1);
        const answer = cmd.execute === 'qmp_capabilities' ? {} : answers[cmd.execute]?.(cmd.arguments ?? {});
        sock.write(JSON.stringify(answer === undefined ? { error: { class: 'CommandNotFound', desc: cmd.execute }, id: cmd.id } : { return: answer, id: cmd.id }) + '\n');
      }
    });
  });
  const path = join(dir, 'qmp.sock');
  await new Promise<void>((r) => server.listen(path, r));
  return { address: `unix:${path}`, close: () => { for (const s of sockets) s.destroy(); server.close(); }, sent: () => sending };
}

/** The object, read back through the real client (convert to a local mapped-ram file), holds the guest. */
async function assertObjectHolds(url: string, guest: SyntheticGuest): Promise<void> {
  const dir = mkdtempSync('/tmp/multifd-late-abort-read-');
  try {
    await convert({ input: url, output: join(dir, 'back.mig'), to: 'mapped-ram' });
    await assertGuestIn(join(dir, 'back.mig'), guest, url);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

describe('an interrupt and the commit\'s point of no return', () => {
  const stores: Store[] = [];
  const dirs: string[] = [];
  process.env.AWS_ACCESS_KEY_ID ??= 'test-key';
  process.env.AWS_SECRET_ACCESS_KEY ??= 'test-secret';
  after(() => {
    for (const s of stores) s.server.close();
    for (const d of dirs) rmSync(d, { recursive: true, force: true });
    closeS3Clients();
    configureObjectStore({});
  });

  /** A store, and the object store configured for it with a staging directory of this test's own. */
  async function setup(): Promise<{ store: Store; staging: string; dir: string }> {
    const store = await scriptedStore(BUCKET);
    stores.push(store);
    const dir = mkdtempSync('/tmp/multifd-late-abort-');
    dirs.push(dir);
    const staging = join(dir, 'staging');
    mkdirSync(staging);
    configureObjectStore({ endpoint: store.endpoint, region: 'us-east-1', stagingDir: staging });
    return { store, staging, dir };
  }

  /** receive --out s3://…, the synthetic source sending to it with a return path. */
  async function receiveToStore(key: string): Promise<{ h: ReturnType<typeof receive>; sent: Promise<unknown>; guest: SyntheticGuest }> {
    const guest = makeSyntheticGuest(8);
    const h = receive({ listen: 'tcp:127.0.0.1:0', out: `s3://${BUCKET}/${key}`, channels: 2 });
    const addr = await h.listening;
    const sent = sendSyntheticMigration(addr, guest, { channels: 2, rounds: 1, returnPath: true }).catch((e: Error) => e);
    return { h, sent, guest };
  }

  test('receive --out s3: interrupted while CompleteMultipartUpload is in flight and it succeeds → completed, with a note; the object is stored whole', async () => {
    const { store, staging } = await setup();
    store.state.hold = 'complete';
    const { h, sent, guest } = await receiveToStore('late.mig');
    await store.heldRequest();
    h.abort(new Error('interrupted (SIGINT)'));
    // Time for a wrongly taken interrupt to fail the conversation before the store answers.
    await sleep(150);
    store.release();
    const s = await h.done;
    assert.equal(s.status, 'completed');
    assert.deepEqual(s.notes, [`interrupted (SIGINT) after the object was committed: s3://${BUCKET}/late.mig is stored complete`]);
    assert.ok(s.store, 'the upload is reported');
    assert.equal(s.store['object-size'], store.objects.get('late.mig')?.length);
    assert.ok(!store.ops.includes('abort-upload'), 'no AbortMultipartUpload');
    assert.equal(store.uploads.size, 0, 'no multipart upload left');
    assert.equal(await sent, undefined, 'the source got SHUT(0) and completed');
    await assertObjectHolds(`s3://${BUCKET}/late.mig`, guest);
    assert.deepEqual(readdirSync(staging), [], 'the staging directory is removed');
  });

  test('the CLI\'s text summaries print the note', async () => {
    const { store } = await setup();
    store.state.hold = 'complete';
    const { h, sent } = await receiveToStore('text.mig');
    await store.heldRequest();
    h.abort(new Error('interrupted (SIGINT)'));
    store.release();
    const s = await h.done;
    await sent;
    assert.match(summaryText(s), /^ {2}note: interrupted \(SIGINT\) after the object was committed: s3:\/\/snapshots\/text\.mig is stored complete$/m);
    const relayed = { from: 'a', to: 'b', machine: 'm', 'total-time': 1, 'bytes-in': 1, 'bytes-out': 1, normal: 1, duplicate: 0, mbps: 1, 'multifd-syncs': 1, 'sync-mode': 'round', 'compression-in': 'none', 'compression-out': 'none', 'return-path': true, 'channels-in': [], 'channels-out': [] };
    assert.match(relaySummaryText({ ...relayed, notes: ['late'] }), /^ {2}note: late$/m);
    assert.doesNotMatch(relaySummaryText(relayed), /note:/);
  });

  test('convert FILE s3://…: interrupted while CompleteMultipartUpload is in flight and it succeeds → the summary says so; without an interrupt, no note', async () => {
    const { store, dir } = await setup();
    const guest = makeSyntheticGuest(8);
    const local = join(dir, 'local.mig');
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: local, channels: 2 });
    await sendSyntheticMigration(await rx.listening, guest, { channels: 2, rounds: 1, returnPath: true });
    await rx.done;
    store.state.hold = 'complete';
    const ac = new AbortController();
    const converting = convert({ input: local, output: `s3://${BUCKET}/conv.mig`, to: 'mapped-ram', signal: ac.signal });
    await store.heldRequest();
    ac.abort();
    await sleep(100);
    store.release();
    const s = await converting;
    assert.deepEqual(s.notes, [`interrupted after the object was committed: s3://${BUCKET}/conv.mig is stored complete`]);
    assert.match(convertText(s), /^note: interrupted after the object was committed: s3:\/\/snapshots\/conv\.mig is stored complete$/m);
    await assertObjectHolds(`s3://${BUCKET}/conv.mig`, guest);
    store.state.hold = undefined;
    const plain = await convert({ input: local, output: `s3://${BUCKET}/conv2.mig`, to: 'mapped-ram', signal: new AbortController().signal });
    assert.equal(plain.notes, undefined);
    assert.doesNotMatch(convertText(plain), /note:/);
  });

  test('receive --out s3: interrupted while CompleteMultipartUpload is in flight and the store refuses it → the Complete\'s failure, the upload aborted', async () => {
    const { store, staging } = await setup();
    store.state.hold = 'complete';
    store.state.completeFails = true;
    const { h, sent } = await receiveToStore('refused.mig');
    await store.heldRequest();
    h.abort(new Error('interrupted (SIGINT)'));
    await sleep(150);
    store.release();
    await assert.rejects(h.done, (e: Error) => {
      assert.match(e.message, /completing the upload of s3:\/\/snapshots\/refused\.mig: InvalidPart/);
      assert.doesNotMatch(e.message, /interrupted/);
      return true;
    });
    assert.ok(store.ops.includes('abort-upload'), 'AbortMultipartUpload was sent');
    assert.equal(store.uploads.size, 0, 'no multipart upload left');
    assert.equal(store.objects.size, 0, 'no object');
    await sent;
    assert.deepEqual(readdirSync(staging), []);
  });

  test('receive --out s3: interrupted while the last part is in flight, just before the Complete → interrupted, no Complete sent, the upload aborted', async () => {
    const { store, staging } = await setup();
    store.state.hold = 'part';
    const { h, sent } = await receiveToStore('early.mig');
    await store.heldRequest();
    await sleep(20);
    h.abort(new Error('interrupted (SIGINT)'));
    await sleep(150);
    store.release();
    await assert.rejects(h.done, /interrupted \(SIGINT\)/);
    assert.ok(!store.ops.includes('complete'), `no CompleteMultipartUpload (requests: ${store.ops.join(', ')})`);
    assert.ok(store.ops.includes('abort-upload'), 'AbortMultipartUpload was sent');
    assert.equal(store.uploads.size, 0, 'no multipart upload left');
    assert.equal(store.objects.size, 0, 'no object');
    await sent;
    assert.deepEqual(readdirSync(staging), []);
  });

  test('receive CLI --out s3 --json: SIGINT while CompleteMultipartUpload is in flight and it succeeds → exit 0, the note in the JSON and on stderr', async () => {
    const { store, staging } = await setup();
    store.state.hold = 'complete';
    const p = spawnCli(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', `s3://${BUCKET}/cli.mig`, '--s3-endpoint', store.endpoint, '--s3-region', 'us-east-1', '--s3-staging-dir', staging, '--json']);
    const addr = (await p.waitStderr(/^listening on (\S+)/m))[1]!;
    const sent = sendSyntheticMigration(addr, makeSyntheticGuest(8), { channels: 2, rounds: 1, returnPath: true }).catch((e: Error) => e);
    await store.heldRequest();
    p.kill('SIGINT');
    await sleep(300);
    store.release();
    const { code, stdout, stderr } = await p.exited;
    assert.equal(code, 0, `exit status 0 (stderr: ${stderr})`);
    const note = `interrupted (SIGINT) after the object was committed: s3://${BUCKET}/cli.mig is stored complete`;
    const s = JSON.parse(stdout) as { status: string; notes?: string[]; store?: { url: string } };
    assert.equal(s.status, 'completed');
    assert.deepEqual(s.notes, [note]);
    assert.equal(s.store?.url, `s3://${BUCKET}/cli.mig`);
    assert.ok(stderr.includes(`multifd: note: ${note}\n`), stderr);
    assert.ok(store.objects.has('cli.mig'));
    assert.ok(!store.ops.includes('abort-upload'));
    assert.equal(await sent, undefined);
  });

  test('save --out s3: interrupted while CompleteMultipartUpload is in flight and it succeeds → completed, with the note; the source completed', async () => {
    const { store, dir } = await setup();
    store.state.hold = 'complete';
    const guest = makeSyntheticGuest(8);
    const qmp = await fakeSourceQmp(dir, guest);
    try {
      const h = save({ qmp: qmp.address, out: `s3://${BUCKET}/save.mig` });
      await store.heldRequest();
      h.abort(new Error('interrupted (SIGINT)'));
      await sleep(150);
      store.release();
      const s = await h.done;
      assert.deepEqual(s.notes, [`interrupted (SIGINT) after the object was committed: s3://${BUCKET}/save.mig is stored complete`]);
      assert.equal(s.source.status, 'completed');
      assert.ok(!store.ops.includes('abort-upload'));
      assert.equal(await qmp.sent(), undefined, 'the source got SHUT(0)');
      await assertObjectHolds(`s3://${BUCKET}/save.mig`, guest);
    } finally {
      qmp.close();
    }
  });

  test('relay --tee s3: interrupted while the tee\'s CompleteMultipartUpload is in flight and it succeeds → completed, with the note', async () => {
    const { store, dir } = await setup();
    store.state.hold = 'complete';
    const guest = makeSyntheticGuest(8);
    const rx = receive({ listen: 'tcp:127.0.0.1:0', out: join(dir, 'b.mig'), channels: 2 });
    const r = relay({ listen: 'tcp:127.0.0.1:0', to: await rx.listening, channelsIn: 2, tee: `s3://${BUCKET}/tee.mig` });
    const sent = sendSyntheticMigration(await r.listening, guest, { channels: 2, rounds: 1, returnPath: true }).catch((e: Error) => e);
    await store.heldRequest();
    r.abort(new Error('interrupted (SIGTERM)'));
    await sleep(150);
    store.release();
    const s = await r.done;
    assert.equal(s.status, 'completed');
    assert.deepEqual(s.notes, [`interrupted (SIGTERM) after the object was committed: s3://${BUCKET}/tee.mig is stored complete`]);
    assert.ok(!store.ops.includes('abort-upload'));
    assert.equal(await sent, undefined);
    await rx.done;
    await assertObjectHolds(`s3://${BUCKET}/tee.mig`, guest);
  });

  test('receive to a local file: an interrupt once the rename is under way → completed, with a note; the file is in place', async () => {
    const dir = mkdtempSync('/tmp/multifd-late-abort-');
    dirs.push(dir);
    const out = join(dir, 'vm.mig');
    const guest = makeSyntheticGuest(8);
    const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2 });
    // The interrupt arrives in the very turn the point of no return is passed (as a signal could).
    const onPoint = (msg: unknown): void => {
      if ((msg as { target?: string }).target === out) h.abort(new Error('interrupted (SIGINT)'));
    };
    subscribe('multifd:output:commit-point', onPoint);
    try {
      const sent = sendSyntheticMigration(await h.listening, guest, { channels: 2, rounds: 1, returnPath: true }).catch((e: Error) => e);
      const s = await h.done;
      assert.ok(h.signal.aborted, 'the interrupt did come');
      assert.deepEqual(s.notes, [`interrupted (SIGINT) after the snapshot was committed: ${out} is in place, complete`]);
      assert.equal(await sent, undefined);
      assert.deepEqual(readdirSync(dir), ['vm.mig']);
      await assertGuestIn(out, guest, 'the file');
    } finally {
      unsubscribe('multifd:output:commit-point', onPoint);
    }
  });

  test('a local file: an interrupt while the commit runs, before the rename → the commit refused, no file left', async () => {
    const dir = mkdtempSync('/tmp/multifd-late-abort-');
    dirs.push(dir);
    const out = join(dir, 'vm.mig');
    const o = await SnapshotOutput.create(out, { directIo: false });
    await o.head({ machine: 'pc-q35-10.0', capabilities: [] }, 2, 1 << 20, [{ name: 'pc.ram', usedLength: 1 << 20 }]);
    const committing = o.commit();
    // The commit is under way (flushing, syncing): the rename has not begun.
    assert.equal(o.interrupt(new Error('interrupted (SIGINT)')), false, 'the interrupt came in time');
    await assert.rejects(committing, (e: Error & { code?: string }) => e.code === 'ABORTED' && /was not committed: interrupted/.test(e.message));
    await o.abort();
    assert.deepEqual(readdirSync(dir), [], 'neither the file nor its temporary');
    assert.equal(o.lateInterruptNote(), undefined);
  });
});
