// Snapshots in object storage against a real S3 store (Ceph RGW from ../shared/ceph/start-rgw.sh,
// its env file sourced: S3_ENDPOINT or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY):
// save of the running test guest to S3 → restore from S3 → the guest runs on with its invariant,
// instant restore (postcopy) from S3, the file tools on objects, and faults: radosgw stopped
// mid-upload and mid-restore, bad and missing credentials, missing bucket and key, an unreachable
// endpoint, truncated and corrupted objects, the answer to CompleteMultipartUpload lost after the
// store committed; relay --tee s3://… between two QEMUs (the object once
// B confirmed, upload progress, a failed upload that leaves A and B alone). Every test uses its
// own bucket.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { createServer as createHttpServer, request as httpRequest } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CreateBucketCommand, DeleteBucketCommand, DeleteObjectsCommand, GetObjectCommand, HeadObjectCommand, ListMultipartUploadsCommand,
  ListObjectsV2Command, ListPartsCommand, PutObjectCommand, S3Client,
} from '@aws-sdk/client-s3';
import { countPasses, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { BIN, freePort, settle, startListeningCli } from '../helpers/send.js';
import { migrateCompressed } from '../helpers/compression.js';
import { configureObjectStore, openObjectSnapshot, type UploadProgress } from '../../src/conversations/object-store.js';
import { relay, type RelayProgress } from '../../src/conversations/relay.js';
import { closeS3Clients } from '../../src/transports/s3.js';
import { GUEST_DIRTY_END, GUEST_DIRTY_START } from '../guest/bootsector.js';
import { dumpGuestMemory } from '../helpers/qemu.js';
import { convert, type ConvertProgress } from '../../src/conversations/convert.js';
import { PACKED_PREAMBLE_SIZE } from '../../src/codec/packed-snapshot.js';
import { checkInvariant, runsOn } from '../helpers/guest-checks.js';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';
const ENDPOINT = process.env.S3_ENDPOINT ?? process.env.AWS_ENDPOINT_URL;
const HAVE_KEYS = !!process.env.AWS_ACCESS_KEY_ID && !!process.env.AWS_SECRET_ACCESS_KEY;
const NO_STORE = !ENDPOINT || !HAVE_KEYS
  ? 'no S3 endpoint configured (run ../shared/ceph/start-rgw.sh and source /tmp/rgw-root.env: S3_ENDPOINT or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)'
  : false;
const CEPH = fileURLToPath(new URL('../../../../shared/ceph/', import.meta.url));
const RGW_ROOT = process.env.RGW_ROOT ?? '/tmp/rgw-root';
const RGW_PIDFILE = join(RGW_ROOT, 'srv/ceph/run/rgw.a.hostpid');
const NO_RESTART = NO_STORE || (!existsSync(join(CEPH, 'start-rgw.sh')) ? `no ${CEPH}start-rgw.sh to restart radosgw with` : !existsSync(RGW_PIDFILE) ? `radosgw was not started by start-rgw.sh (no ${RGW_PIDFILE})` : false);
const MiB = 1024 * 1024;

const s3 = ENDPOINT ? new S3Client({ endpoint: ENDPOINT, region: process.env.S3_REGION ?? 'us-east-1', forcePathStyle: true }) : undefined;
const buckets: string[] = [];

async function newBucket(tag: string): Promise<string> {
  const name = `multifd-${tag}-${process.pid}-${Date.now().toString(36)}`.toLowerCase().slice(0, 63);
  await s3!.send(new CreateBucketCommand({ Bucket: name }));
  buckets.push(name);
  return name;
}

async function emptyAndDelete(bucket: string): Promise<void> {
  const list = await s3!.send(new ListObjectsV2Command({ Bucket: bucket }));
  const keys = (list.Contents ?? []).map((o) => ({ Key: o.Key! }));
  if (keys.length) await s3!.send(new DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: keys } }));
  await s3!.send(new DeleteBucketCommand({ Bucket: bucket }));
}

after(async () => {
  if (!s3) return;
  await rgwUp().catch(() => {});
  for (const b of buckets) await emptyAndDelete(b).catch(() => {});
  s3.destroy();
});

async function headSize(bucket: string, key: string): Promise<number | undefined> {
  try {
    return (await s3!.send(new HeadObjectCommand({ Bucket: bucket, Key: key }))).ContentLength;
  } catch (e) {
    if ((e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode === 404) return undefined;
    throw e;
  }
}

async function multipartUploads(bucket: string): Promise<number> {
  const r = await s3!.send(new ListMultipartUploadsCommand({ Bucket: bucket }));
  return r.Uploads?.length ?? 0;
}

interface Run { code: number; stdout: string; stderr: string; ms: number }

/** The CLI with the store's endpoint; `env` replaces variables (undefined removes one). */
function mfd(args: string[], o: { env?: Record<string, string | undefined>; timeoutMs?: number } = {}): { done: Promise<Run>; pid: number | undefined } {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const [k, v] of Object.entries(o.env ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  const t0 = Date.now();
  let pid: number | undefined;
  const done = new Promise<Run>((resolve) => {
    const child = execFile(process.execPath, [BIN, '--s3-endpoint', ENDPOINT!, ...args], { env, timeout: o.timeoutMs ?? 180_000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr, ms: Date.now() - t0 });
    });
    pid = child.pid;
  });
  return { done, pid };
}

async function cli(args: string[], o: { env?: Record<string, string | undefined>; timeoutMs?: number } = {}): Promise<Run> {
  return mfd(args, o).done;
}

function rgwPid(): number | undefined {
  try {
    const pid = Number(readFileSync(RGW_PIDFILE, 'utf8').trim());
    process.kill(pid, 0);
    return pid;
  } catch {
    return undefined;
  }
}

/** Stops radosgw only (the monitor and OSD run on). */
function stopRgw(): void {
  const pid = rgwPid();
  if (pid) process.kill(pid, 'SIGKILL');
}

/** start-rgw.sh is idempotent: it brings back whatever is not running. */
async function rgwUp(): Promise<void> {
  if (rgwPid() !== undefined) {
    try {
      await s3!.send(new ListObjectsV2Command({ Bucket: buckets[0] ?? 'multifd-probe', MaxKeys: 1 }));
      return;
    } catch (e) {
      if ((e as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode) return; // answering
    }
  }
  await new Promise<void>((resolve, reject) => {
    execFile('bash', [join(CEPH, 'start-rgw.sh')], { timeout: 300_000 }, (err, _o, stderr) => (err ? reject(new Error(`start-rgw.sh: ${stderr}`)) : resolve()));
  });
}

/** Saves a fresh running guest to s3://bucket/key; returns the save summary (source killed after). */
async function saveGuest(version: QemuVersion, dir: string, url: string, extra: string[] = []): Promise<any> {
  const sock = join(dir, `save-${Date.now()}.sock`);
  const src = await startQemu({ version, memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
  try {
    await waitGuestPasses(src, 3);
    const r = await cli(['save', '--qmp', `unix:${sock}`, '--out', url, '--channels', '2', '--downtime-limit', '20000', '--json', ...extra]);
    assert.equal(r.code, 0, `save failed: ${r.stderr}`);
    return JSON.parse(r.stdout);
  } finally {
    await src.kill();
  }
}

async function destination(version: QemuVersion, dir: string): Promise<{ q: QemuInstance; sock: string }> {
  const sock = join(dir, `dst-${Date.now()}.sock`);
  const q = await startQemu({ version, memMiB: 128, bootSector: true, incoming: 'defer', paused: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
  return { q, sock };
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = NO_STORE || (haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`);
  describe(`S3 snapshots with QEMU ${version}`, { skip, timeout: 600_000 }, () => {
    test('save of the running guest to S3, restore from S3: the guest runs on with its invariant', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-s3-test-');
      const staging = join(dir, 'staging');
      mkdirSync(staging);
      const bucket = await newBucket(`save${version}`);
      const url = `s3://${bucket}/vm1.mig`;
      let dst;
      try {
        const s = await saveGuest(version, dir, url, ['--s3-staging-dir', staging, '--s3-part-size', '8']);
        assert.equal(s.status, 'completed');
        assert.equal(s.source.status, 'completed');
        const st = s.store;
        t.diagnostic(`QEMU ${version}: object ${st['object-size']} bytes for a ${st['file-size']}-byte mapped-ram file, ${st.parts} parts in ${st['upload-ms']} ms; durable locally ${st['local-durable-at']}, in the store ${st['store-durable-at']}`);
        assert.equal(await headSize(bucket, 'vm1.mig'), st['object-size'], 'the object is there, its size as reported');
        assert.ok(st['object-size'] < st['file-size'], 'the object holds the pages present, not the RAM size');
        assert.ok(st.parts >= 2, 'a multipart upload of several parts');
        assert.equal(st['bytes-uploaded'], st['object-size'], 'bytes to the store: the object, once');
        assert.ok(st.requests >= st.parts + 3, `requests (${st.requests}) count HEAD bucket, create, every part and complete`);
        assert.equal(st.retries, 0);
        assert.ok(Date.parse(st['local-durable-at']) <= Date.parse(st['store-durable-at']));
        assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
        assert.deepEqual(readdirSync(staging), [], 'the staging directory was removed');

        dst = await destination(version, dir);
        const r = await cli(['restore', url, '--qmp', `unix:${dst.sock}`, '--channels', '2', '--json']);
        assert.equal(r.code, 0, `restore failed: ${r.stderr}`);
        const rs = JSON.parse(r.stdout);
        assert.equal(rs.status, 'completed');
        assert.equal(rs.normal, st['present-pages'], 'every present page was sent once');
        const restored = await checkInvariant(dst.q, 'restored from S3');
        await runsOn(dst.q, restored);
      } finally {
        await dst?.q.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });

    test('instant restore from S3 (--postcopy): the guest runs before its memory has arrived, every page once', async (t) => {
      const dir = mkdtempSync('/tmp/multifd-s3-test-');
      const bucket = await newBucket(`instant${version}`);
      const url = `s3://${bucket}/vm.mig`;
      let dst;
      try {
        const s = await saveGuest(version, dir, url);
        dst = await destination(version, dir);
        const r = await cli(['restore', url, '--qmp', `unix:${dst.sock}`, '--postcopy', '--resume', '--json']);
        assert.equal(r.code, 0, `restore --postcopy failed: ${r.stderr}`);
        const rs = JSON.parse(r.stdout);
        const pc = rs.postcopy;
        t.diagnostic(`QEMU ${version}: running ${pc['run-time']} ms after start (guest running at ${rs['time-to-running']} ms of the restore, object opened in ${rs.store['open-ms']} ms), all pages in at ${pc['complete-time']} ms; ${pc.requests} requests, ${pc['requested-pages']} pages by request`);
        assert.equal(rs.status, 'completed');
        assert.equal(rs.destinationQemu['run-state-after'], 'running');
        // --resume set QEMU's autostart: QEMU ran the guest itself at RUN, before the last page came.
        assert.equal(rs.destinationQemu.resumed, true);
        assert.ok(rs['time-to-running'] < rs['time-to-complete'], `the guest ran (${rs['time-to-running']} ms) before the restore completed (${rs['time-to-complete']} ms)`);
        assert.ok(pc['run-time'] < pc['complete-time'], 'the guest ran before the last page arrived');
        assert.equal(pc['precopy-pages'] + pc['postcopy-pages'], rs.blocks.reduce((n: number, b: { 'used-length': number }) => n + b['used-length'] / 4096, 0), 'each page exactly once');
        assert.equal(rs.normal, s.store['present-pages']);
        await dst.q.qmp.execute('stop');
        const restored = await checkInvariant(dst.q, 'instant restore from S3');
        await runsOn(dst.q, restored);
      } finally {
        await dst?.q.kill();
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}

describe('file tools on S3 objects', { skip: NO_STORE || (haveQemu('10') ? false : 'QEMU 10 not available'), timeout: 600_000 }, () => {
  test('inspect, verify, extract, convert object → file (QEMU loads it) and file → object', async () => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('tools');
    const url = `s3://${bucket}/vm.mig`;
    let dst;
    try {
      const s = await saveGuest('10', dir, url);
      const ins = await cli(['inspect', url, '--json']);
      assert.equal(ins.code, 0, ins.stderr);
      const info = JSON.parse(ins.stdout);
      assert.equal(info.format, 'mapped-ram');
      assert.equal(info['file-size'], s.store['file-size']);
      assert.equal(info.object.layout, 'packed');
      assert.equal(info.object['object-size'], s.store['object-size']);
      assert.equal(info.object['present-pages'], s.store['present-pages']);
      const text = await cli(['inspect', url]);
      assert.match(text.stdout, /packed/);
      const v = await cli(['verify', url]);
      assert.equal(v.code, 0, v.stderr + v.stdout);

      // object → file: a mapped-ram file QEMU loads by itself; the summary says what was read.
      const file = join(dir, 'back.mig');
      const c = await cli(['convert', url, file, '--to', 'mapped-ram', '--json']);
      assert.equal(c.code, 0, c.stderr);
      const read = JSON.parse(c.stdout).store;
      assert.equal(read.url, url);
      assert.equal(read['object-size'], s.store['object-size']);
      assert.ok(read['bytes-read'] >= s.store['object-size'] && read.requests >= 1 && read['chunk-gets'] >= 1, `every byte of the object was read: ${JSON.stringify(read)}`);
      dst = await destination('10', dir);
      await dst.q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
      await dst.q.qmp.execute('migrate-incoming', { uri: `file:${file}` });
      const m = await waitMigration(dst.q.qmp, { timeoutMs: 60_000 });
      assert.equal(m.status, 'completed', m['error-desc']);
      const restored = await checkInvariant(dst.q, 'QEMU loading the converted file');
      await runsOn(dst.q, restored);

      // file → object, and the images of both objects are the same.
      const url2 = `s3://${bucket}/from-file.mig`;
      const up = await cli(['convert', file, url2, '--to', 'mapped-ram', '--json']);
      assert.equal(up.code, 0, up.stderr);
      assert.equal(JSON.parse(up.stdout).store['present-pages'], s.store['present-pages']);
      const again = await cli(['convert', file, url2, '--to', 'mapped-ram']);
      assert.notEqual(again.code, 0, 'an existing object is not replaced without --force');
      assert.match(again.stderr, /already exists/);
      // The upload's progress, as save reports it: phase uploading, up to every byte in the store.
      configureObjectStore({ endpoint: ENDPOINT!, partSize: 5 * MiB });
      const events: ConvertProgress[] = [];
      const lib = await convert({ input: file, output: `s3://${bucket}/progress.mig`, to: 'mapped-ram', onProgress: (p) => events.push(p) });
      const ups = events.map((e) => e.upload).filter((u): u is UploadProgress => u !== undefined);
      assert.ok(ups.length >= 2 && events.every((e) => (e.upload !== undefined) === (e.phase === 'uploading')), 'upload progress events');
      const last = ups[ups.length - 1]!;
      assert.equal(last.stored, s.store['object-size']);
      assert.equal(last.total, s.store['object-size']);
      assert.ok(ups.every((u, i) => i === 0 || u.stored >= ups[i - 1]!.stored), 'bytes in the store only grow');
      assert.equal((lib.store as { 'bytes-uploaded': number })['bytes-uploaded'], s.store['object-size']);
      // Ctrl-C during convert's upload: the upload is aborted, no object, no multipart upload.
      const slow = mfd(['--s3-part-size', '5', '--s3-upload-concurrency', '1', 'convert', file, `s3://${bucket}/interrupted.mig`, '--to', 'mapped-ram']);
      let parts = 0;
      for (let i = 0; i < 1200 && parts < 2; i++) {
        const up = ((await s3!.send(new ListMultipartUploadsCommand({ Bucket: bucket }))).Uploads ?? []).find((u) => u.Key === 'interrupted.mig');
        if (up) parts = ((await s3!.send(new ListPartsCommand({ Bucket: bucket, Key: up.Key!, UploadId: up.UploadId! }))).Parts ?? []).length;
        if (parts < 2) await new Promise((r) => setTimeout(r, 50));
      }
      assert.ok(parts >= 2, 'the multipart upload had parts in');
      process.kill(slow.pid!, 'SIGINT');
      const stopped = await slow.done;
      assert.equal(stopped.code, 130, stopped.stderr);
      assert.match(stopped.stderr, /interrupted/);
      assert.equal(await headSize(bucket, 'interrupted.mig'), undefined, 'no object');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      const stream = join(dir, 'vm.stream');
      assert.equal((await cli(['convert', url2, stream, '--to', 'stream'])).code, 0);
      const url3 = `s3://${bucket}/from-stream.mig`;
      assert.equal((await cli(['convert', stream, url3, '--to', 'mapped-ram'])).code, 0);
      const images = [];
      for (const u of [url, url3]) {
        const out = join(dir, `img-${images.length}.raw`);
        const x = await cli(['extract', u, '--block', 'pc.ram', '--out', out]);
        assert.equal(x.code, 0, x.stderr);
        images.push(readFileSync(out));
      }
      assert.ok(images[0]!.equals(images[1]!), 'object → stream → object keeps every page');
    } finally {
      await dst?.q.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('S3 faults', { skip: NO_STORE || (haveQemu('10') ? false : 'QEMU 10 not available'), timeout: 900_000 }, () => {
  test('credentials, bucket, key, endpoint: named errors, before QEMU is touched', async () => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('errors');
    await s3!.send(new PutObjectCommand({ Bucket: bucket, Key: 'not-a-snapshot', Body: Buffer.alloc(4096, 0x41) }));
    let dst;
    try {
      dst = await destination('10', dir);
      const restore = (url: string, env?: Record<string, string | undefined>, extra: string[] = []): Promise<Run> => cli([...extra, 'restore', url, '--qmp', `unix:${dst!.sock}`], env ? { env } : {});
      const noCreds = { AWS_ACCESS_KEY_ID: undefined, AWS_SECRET_ACCESS_KEY: undefined, AWS_PROFILE: undefined, AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'), AWS_CONFIG_FILE: join(dir, 'none'), AWS_EC2_METADATA_DISABLED: 'true' };
      const cases: [string, Promise<Run>, RegExp][] = [
        ['bad credentials', restore(`s3://${bucket}/x`, { AWS_SECRET_ACCESS_KEY: 'wrong-secret' }), /access denied/i],
        ['no credentials', restore(`s3://${bucket}/x`, noCreds), /no S3 credentials/],
        ['missing bucket', restore(`s3://multifd-no-such-bucket-${process.pid}/x`), /bucket .* does not exist/],
        ['missing key', restore(`s3://${bucket}/no-such-key`), /no such object/],
        ['unreachable endpoint', restore(`s3://${bucket}/x`, undefined, ['--s3-endpoint', 'http://127.0.0.1:9']), /unreachable/],
        ['not a packed snapshot', restore(`s3://${bucket}/not-a-snapshot`), /not a packed snapshot/],
      ];
      for (const [what, run, want] of cases) {
        const r = await run;
        assert.notEqual(r.code, 0, `${what}: restore should fail`);
        assert.match(r.stderr, want, `${what}: ${r.stderr}`);
      }
      const m = await dst.q.qmp.execute('query-migrate');
      assert.ok(!m.status || m.status === 'none', `the destination was not touched (migration ${m.status})`);
      assert.equal((await dst.q.qmp.execute('query-status')).status, 'inmigrate');
      // The library names them with stable codes.
      await assert.rejects(openObjectSnapshot(`s3://${bucket}/no-such-key`, { endpoint: ENDPOINT! }), { code: 'S3_NO_KEY' });
      await assert.rejects(openObjectSnapshot(`s3://multifd-no-such-bucket-${process.pid}/k`, { endpoint: ENDPOINT! }), { code: 'S3_NO_BUCKET' });
      await assert.rejects(openObjectSnapshot(`s3://${bucket}/x`, { endpoint: 'http://127.0.0.1:9' }), { code: 'S3_UNREACHABLE' });
      // save checks the bucket before the source migrates.
      const sock = join(dir, 'src.sock');
      const src = await startQemu({ version: '10', memMiB: 64, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
      try {
        const r = await cli(['save', '--qmp', `unix:${sock}`, '--out', `s3://multifd-no-such-bucket-${process.pid}/vm.mig`]);
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, /does not exist/);
        assert.equal((await src.qmp.execute('query-status')).status, 'running');
      } finally {
        await src.kill();
      }
    } finally {
      await dst?.q.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('a truncated or corrupted object fails before QEMU is touched, with the offset', async () => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('corrupt');
    let dst;
    try {
      const s = await saveGuest('10', dir, `s3://${bucket}/good.mig`);
      const head = Buffer.from(await (await s3!.send(new GetObjectCommand({ Bucket: bucket, Key: 'good.mig', Range: `bytes=0-${2 * MiB - 1}` }))).Body!.transformToByteArray());
      await s3!.send(new PutObjectCommand({ Bucket: bucket, Key: 'truncated.mig', Body: head }));
      const flipped = Buffer.from(head);
      flipped[PACKED_PREAMBLE_SIZE + 200]! ^= 0x5a;
      // Same size as the original (the rest of the object as zeros): only the checksum can tell.
      const whole = Buffer.concat([flipped, Buffer.alloc(s.store['object-size'] - flipped.length)]);
      await s3!.send(new PutObjectCommand({ Bucket: bucket, Key: 'corrupt.mig', Body: whole }));
      dst = await destination('10', dir);
      for (const [key, want] of [['truncated.mig', /truncated/], ['corrupt.mig', /checksum mismatch/]] as const) {
        const r = await cli(['restore', `s3://${bucket}/${key}`, '--qmp', `unix:${dst.sock}`]);
        assert.notEqual(r.code, 0);
        assert.match(r.stderr, want, r.stderr);
        assert.match(r.stderr, /at byte \d+/, 'the error names an offset');
        const v = await cli(['verify', `s3://${bucket}/${key}`]);
        assert.notEqual(v.code, 0, `verify ${key} should fail`);
      }
      assert.equal((await dst.q.qmp.execute('query-status')).status, 'inmigrate', 'the destination was not touched');
    } finally {
      await dst?.q.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('radosgw stopped mid-upload: save fails, the source runs on, no object and no multipart upload left', { skip: NO_RESTART }, async (t) => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('midupload');
    const sock = join(dir, 'src.sock');
    const src = await startQemu({ version: '10', memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
    try {
      await waitGuestPasses(src, 3);
      // Small parts one at a time: the upload lasts long enough to be caught in the middle.
      const save = mfd(['--s3-part-size', '5', '--s3-upload-concurrency', '1', 'save', '--qmp', `unix:${sock}`, '--out', `s3://${bucket}/vm.mig`, '--downtime-limit', '20000', '--json']);
      // Stopped once some parts are in and more are to come.
      let parts = 0;
      for (let i = 0; i < 1200 && parts < 2; i++) {
        const ups = (await s3!.send(new ListMultipartUploadsCommand({ Bucket: bucket }))).Uploads ?? [];
        if (ups[0]) parts = ((await s3!.send(new ListPartsCommand({ Bucket: bucket, Key: ups[0].Key!, UploadId: ups[0].UploadId! }))).Parts ?? []).length;
        if (parts < 2) await new Promise((r) => setTimeout(r, 50));
      }
      assert.ok(parts >= 2, 'the multipart upload had parts in');
      stopRgw();
      await new Promise((r) => setTimeout(r, 2000));
      const restart = rgwUp();
      const r = await save.done;
      await restart;
      t.diagnostic(`radosgw stopped with ${parts} parts in; save failed after ${r.ms} ms: ${r.stderr.trim().split('\n').pop()}`);
      assert.notEqual(r.code, 0, 'save fails');
      assert.match(r.stderr, /unreachable|upload/i);
      assert.equal(await headSize(bucket, 'vm.mig'), undefined, 'no object');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      let status = '';
      for (let i = 0; i < 100 && status !== 'running'; i++) {
        status = (await src.qmp.execute('query-status')).status;
        if (status !== 'running') await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(status, 'running', 'the source runs on');
      const passes = countPasses(src.serialLog());
      await waitGuestPasses(src, passes + 2);
      await src.qmp.execute('stop');
      await checkInvariant(src, 'the source after the failed save');
    } finally {
      await src.kill();
      await rgwUp();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('save interrupted (SIGINT) mid-upload: no object, no multipart upload, the source runs on', async () => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('interrupt');
    const sock = join(dir, 'src.sock');
    const src = await startQemu({ version: '10', memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
    try {
      await waitGuestPasses(src, 3);
      const save = mfd(['--s3-part-size', '5', '--s3-upload-concurrency', '1', 'save', '--qmp', `unix:${sock}`, '--out', `s3://${bucket}/vm.mig`, '--downtime-limit', '20000']);
      let parts = 0;
      for (let i = 0; i < 1200 && parts < 2; i++) {
        const ups = (await s3!.send(new ListMultipartUploadsCommand({ Bucket: bucket }))).Uploads ?? [];
        if (ups[0]) parts = ((await s3!.send(new ListPartsCommand({ Bucket: bucket, Key: ups[0].Key!, UploadId: ups[0].UploadId! }))).Parts ?? []).length;
        if (parts < 2) await new Promise((r) => setTimeout(r, 50));
      }
      assert.ok(parts >= 2, 'the multipart upload had parts in');
      process.kill(save.pid!, 'SIGINT');
      const r = await save.done;
      assert.equal(r.code, 130, `save fails, interrupted: ${r.stderr}`);
      assert.match(r.stderr, /interrupted/);
      assert.equal(await headSize(bucket, 'vm.mig'), undefined, 'no object');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      let status = '';
      for (let i = 0; i < 100 && status !== 'running'; i++) {
        status = (await src.qmp.execute('query-status')).status;
        if (status !== 'running') await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(status, 'running', 'the source runs on');
    } finally {
      await src.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the answer to CompleteMultipartUpload is lost after the store committed: save succeeds, the object is complete and restores', async (t) => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('lostcomplete');
    const sock = join(dir, 'src.sock');
    // The first CompleteMultipartUpload reaches the store, which commits the object; its answer
    // never comes back (the connection closes), so the SDK sends it again.
    let lost = 0;
    const proxy = await faultyProxy(ENDPOINT!, (method, q) => (method === 'POST' && q.has('uploadId') && lost++ === 0 ? 'lose-answer' : 'pass'));
    const src = await startQemu({ version: '10', memMiB: 128, bootSector: true, extraArgs: ['-qmp', `unix:${sock},server=on,wait=off`] });
    let dst: Awaited<ReturnType<typeof destination>> | undefined;
    try {
      await waitGuestPasses(src, 3);
      const r = await cli(['--s3-endpoint', proxy.url, 'save', '--qmp', `unix:${sock}`, '--out', `s3://${bucket}/vm.mig`, '--downtime-limit', '20000', '--json']);
      const completes = proxy.seen.filter((x) => x.method === 'POST' && x.q.has('uploadId'));
      t.diagnostic(`CompleteMultipartUpload sent ${completes.length} times: ${completes.map((c) => `${c.fault} → HTTP ${c.status ?? '–'}`).join(', ')}; save exit ${r.code}`);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(completes[0]?.fault, 'lose-answer');
      assert.equal(completes[0]?.status, 200, 'the store committed the object under the lost answer');
      const summary = JSON.parse(r.stdout) as { store: { url: string; 'object-size': number } };
      assert.equal(summary.store.url, `s3://${bucket}/vm.mig`);
      assert.equal(await headSize(bucket, 'vm.mig'), summary.store['object-size'], 'the object is there, whole');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      // What the store holds is the snapshot: it restores, and the guest runs on with its invariant.
      dst = await destination('10', dir);
      const back = await cli(['restore', `s3://${bucket}/vm.mig`, '--qmp', `unix:${dst.sock}`, '--channels', '2']);
      assert.equal(back.code, 0, back.stderr);
      await runsOn(dst.q, await checkInvariant(dst.q, 'restored from the object whose Complete answer was lost'));
    } finally {
      await dst?.q.kill();
      await src.kill();
      await proxy.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('radosgw stopped mid-restore: a clear error', { skip: NO_RESTART }, async (t) => {
    const dir = mkdtempSync('/tmp/multifd-s3-test-');
    const bucket = await newBucket('midrestore');
    let dst;
    try {
      await saveGuest('10', dir, `s3://${bucket}/vm.mig`);
      dst = await destination('10', dir);
      const run = mfd(['--s3-read-ahead', '1', 'restore', `s3://${bucket}/vm.mig`, '--qmp', `unix:${dst.sock}`, '--channels', '1']);
      let active = false;
      for (let i = 0; i < 600 && !active; i++) {
        const m = await dst.q.qmp.execute('query-migrate');
        active = m.status === 'active';
        if (!active) await new Promise((r) => setTimeout(r, 20));
      }
      assert.ok(active, 'the restore started');
      stopRgw();
      const r = await run.done;
      t.diagnostic(`restore failed after ${r.ms} ms: ${r.stderr.trim().split('\n').pop()}`);
      assert.notEqual(r.code, 0, 'restore fails');
      assert.match(r.stderr, /S3 endpoint is unreachable/);
    } finally {
      await dst?.q.kill();
      await rgwUp();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// ---------------- relay --tee s3://… (ours: one QEMU version) ----------------

/** QEMU B for the relay: -incoming defer, paused, multifd 2 channels, listening on a fresh port. */
async function relayTarget(dir: string): Promise<{ q: QemuInstance; sock: string; uri: string }> {
  const d = await destination('10', dir);
  await d.q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
  await d.q.qmp.execute('migrate-set-parameters', { 'multifd-channels': 2 });
  const uri = `tcp:127.0.0.1:${await freePort()}`;
  await d.q.qmp.execute('migrate-incoming', { uri, 'exit-on-error': false });
  return { ...d, uri };
}

/** A running guest migrating to `uri` with multifd on 2 channels and the return path. */
function migrateThrough(a: QemuInstance, uri: string): Promise<void> {
  return migrateCompressed(a, uri, { compression: 'none', returnPath: true, params: { 'downtime-limit': 20000 } });
}

type ProxyFault = 'drop' | 'lose-answer' | 'pass';

/**
 * An HTTP proxy in front of the store that lets `decide` fault each request: 'drop' closes its
 * connection before the store sees it (a store gone away), 'lose-answer' sends it on and closes
 * the connection once the store has answered (the store acted, the answer never came back),
 * 'pass' relays it. `seen` lists every request with what happened to it and the store's status.
 */
async function faultyProxy(target: string, decide: (method: string, q: URLSearchParams) => ProxyFault): Promise<{ url: string; seen: { method: string; q: URLSearchParams; fault: ProxyFault; status?: number }[]; close: () => Promise<void> }> {
  const to = new URL(target);
  const seen: { method: string; q: URLSearchParams; fault: ProxyFault; status?: number }[] = [];
  const srv = createHttpServer((req, res) => {
    const q = new URL(req.url ?? '/', 'http://proxy').searchParams;
    const entry: (typeof seen)[number] = { method: req.method ?? '', q, fault: decide(req.method ?? '', q) };
    seen.push(entry);
    if (entry.fault === 'drop') {
      req.socket.destroy();
      return;
    }
    const headers = { ...req.headers };
    delete headers.expect;
    const up = httpRequest({ host: to.hostname, port: to.port, method: req.method, path: req.url, headers }, (r) => {
      entry.status = r.statusCode;
      if (entry.fault === 'lose-answer') {
        r.resume();
        r.on('end', () => req.socket.destroy());
        return;
      }
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(srv.address() as AddressInfo).port}`,
    seen,
    close: () => new Promise<void>((resolve) => { srv.closeAllConnections(); srv.close(() => resolve()); }),
  };
}

/** A store that went away mid-upload: every UploadPart's connection dropped, everything else (the abort included) passed on. */
function partDroppingProxy(target: string): ReturnType<typeof faultyProxy> {
  return faultyProxy(target, (method, q) => (method === 'PUT' && q.has('uploadId') && q.has('partNumber') ? 'drop' : 'pass'));
}

describe('relay --tee to S3 (QEMU 10)', { skip: NO_STORE || (haveQemu('10') ? false : 'QEMU 10 not available'), timeout: 600_000 }, () => {
  test('relay --tee s3://…: a missing bucket is refused before the relay listens', async () => {
    const r = await cli(['relay', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--tee', `s3://multifd-no-such-bucket-${process.pid}/tee.mig`], { timeoutMs: 60_000 });
    assert.equal(r.code, 1, r.stderr);
    assert.doesNotMatch(r.stderr, /listening on/, 'nothing listened');
    assert.match(r.stderr, /^multifd: error: .*the bucket .*does not exist/m);
  });

  test('relay --tee s3://…: B runs with the invariant; the object appears once B confirmed, with upload progress; verify accepts it and it restores B\'s memory', async (t) => {
    const dir = mkdtempSync('/tmp/multifd-s3-relay-');
    const staging = join(dir, 'staging');
    mkdirSync(staging);
    const bucket = await newBucket('relaytee');
    const url = `s3://${bucket}/tee.mig`;
    const a = await startQemu({ version: '10', memMiB: 128, bootSector: true });
    let b: Awaited<ReturnType<typeof relayTarget>> | undefined;
    let c: Awaited<ReturnType<typeof destination>> | undefined;
    let r: ReturnType<typeof relay> | undefined;
    configureObjectStore({ endpoint: ENDPOINT!, pathStyle: true, stagingDir: staging, partSize: 5 * MiB, uploadConcurrency: 2 });
    try {
      await waitGuestPasses(a, 2);
      b = await relayTarget(dir);
      r = relay({ listen: 'tcp:127.0.0.1:0', to: b.uri, channelsIn: 2, tee: url, progressIntervalMs: 20 });
      const events: RelayProgress[] = [];
      r.on('progress', (p) => events.push(p));
      await migrateThrough(a, await r.listening);
      const s = await r.done;
      const ma = await waitMigration(a.qmp, { timeoutMs: 30_000 });
      const mb = await waitMigration(b.q.qmp, { timeoutMs: 30_000 });
      const st = s.store!;
      const uploading = events.filter((p) => p.phase === 'committing' && p.upload);
      t.diagnostic(`relay: ${s['bytes-in']} bytes in, tee committed in ${s.tee?.['commit-time']} ms; object ${st['object-size']} bytes in ${st.parts} parts, uploaded in ${st['upload-ms']} ms; ${uploading.length} progress events during the upload`);
      assert.equal(ma.status, 'completed', 'A completed');
      assert.equal(mb.status, 'completed', mb['error-desc']);
      const memB = await checkInvariant(b.q, 'B after the relay');

      assert.equal(s.tee?.file, url, 'the tee is named by its URL');
      assert.ok(st, 'the summary has the upload (store)');
      assert.equal(st.url, url);
      assert.equal(await headSize(bucket, 'tee.mig'), st['object-size'], 'the object is there, its size as reported');
      assert.ok(st['object-size'] < st['file-size'], 'packed: the object holds the pages present, not the RAM size');
      assert.ok(st.parts >= 2, 'a multipart upload of several parts');
      assert.equal(st['bytes-uploaded'], st['object-size']);
      assert.ok(Date.parse(st['local-durable-at']!) <= Date.parse(st['store-durable-at']), 'durable locally, then in the store');
      assert.ok(s.tee!['commit-time'] >= st['upload-ms'], 'the tee\'s commit time covers the upload');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      assert.deepEqual(readdirSync(staging), [], 'the staging directory was removed');

      // The progress timer runs on while the tee uploads: events carry the upload as it goes.
      assert.ok(uploading.length >= 1, 'progress events while the upload ran');
      const last = events.at(-1)!;
      assert.equal(last.phase, 'completed');
      assert.equal(last.upload?.stored, st['object-size'], 'the last progress event has the whole object stored');
      for (let i = 1; i < uploading.length; i++) assert.ok(uploading[i]!.upload!.stored >= uploading[i - 1]!.upload!.stored, 'stored bytes never go back');

      const v = await cli(['verify', url]);
      assert.equal(v.code, 0, v.stderr + v.stdout);
      const ins = await cli(['inspect', url, '--json']);
      assert.equal(ins.code, 0, ins.stderr);
      const info = JSON.parse(ins.stdout);
      assert.equal(info.object.layout, 'packed');
      assert.equal(info.object['present-pages'], st['present-pages']);

      // The object restored into a fresh QEMU holds exactly the memory B loaded.
      c = await destination('10', dir);
      const rr = await cli(['restore', url, '--qmp', `unix:${c.sock}`, '--channels', '2', '--json']);
      assert.equal(rr.code, 0, `restore of the tee object failed: ${rr.stderr}`);
      const memC = await dumpGuestMemory(c.q, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
      assert.ok(memC.equals(memB), 'the object restores the memory B loaded');
      await runsOn(b.q, memB);
    } finally {
      configureObjectStore({});
      closeS3Clients();
      r?.abort(new Error('test over'));
      await r?.done.catch(() => {});
      await a.kill();
      await b?.q.kill();
      await c?.q.kill();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('relay --tee s3://…: the upload fails after B confirmed: exit 1 naming the tee, no object, no multipart upload, A completed, B runs on', async (t) => {
    const dir = mkdtempSync('/tmp/multifd-s3-relay-');
    const staging = join(dir, 'staging');
    mkdirSync(staging);
    const bucket = await newBucket('relayteefail');
    const url = `s3://${bucket}/tee.mig`;
    const proxy = await partDroppingProxy(ENDPOINT!);
    const a = await startQemu({ version: '10', memMiB: 128, bootSector: true });
    let b: Awaited<ReturnType<typeof relayTarget>> | undefined;
    try {
      await waitGuestPasses(a, 2);
      b = await relayTarget(dir);
      const port = await freePort();
      const run = await startListeningCli(['--s3-endpoint', proxy.url, '--s3-staging-dir', staging, '--s3-part-size', '5', 'relay', '--listen', `tcp:127.0.0.1:${port}`, '--to', b.uri, '--channels-in', '2', '--tee', url, '--json']);
      await migrateThrough(a, `tcp:127.0.0.1:${port}`);
      const res = await settle(run.done, 120_000, 'relay CLI');
      assert.ok(res.ok);
      const out = res.value;
      const dropped = proxy.seen.filter((r) => r.fault === 'drop').length;
      t.diagnostic(`relay: exit ${out.code}, ${dropped} part uploads dropped: ${out.stderr.trim().split('\n').pop()}`);
      assert.equal(out.code, 1, 'the relay fails');
      assert.equal(out.stdout, '', 'no summary');
      assert.match(out.stderr, /^multifd: error: the tee s3:\/\/\S+ \(the destination loaded the migration and runs it; only the tee was not stored\): uploading part \d+ of s3:\/\/\S+: the S3 endpoint is unreachable/m);
      assert.ok(dropped > 0, 'parts were sent and dropped');
      assert.equal(await headSize(bucket, 'tee.mig'), undefined, 'no object');
      assert.equal(await multipartUploads(bucket), 0, 'no multipart upload left');
      assert.deepEqual(readdirSync(staging), [], 'the staging directory was removed');

      assert.equal((await waitMigration(a.qmp, { timeoutMs: 30_000 })).status, 'completed', 'A completed: B had confirmed');
      const mb = await waitMigration(b.q.qmp, { timeoutMs: 30_000 });
      assert.equal(mb.status, 'completed', mb['error-desc']);
      const memB = await checkInvariant(b.q, 'B after the relay whose tee failed');
      await runsOn(b.q, memB);
    } finally {
      await a.kill();
      await b?.q.kill();
      await proxy.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
