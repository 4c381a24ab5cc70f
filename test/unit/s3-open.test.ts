// Opening an object with one ranged GET instead of HEAD + GET: the answer's Content-Range gives
// the size, the ETag pins later GETs, and the bytes are the packed snapshot's prefix. Against a
// client double that serves an in-memory object the way S3 answers (206 with Content-Range, the
// whole object when it is shorter than the range, 416 for an empty one, errors with S3's names).

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import type { S3Client } from '@aws-sdk/client-s3';
import { ProtocolError } from '../../src/codec/errors.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { PACKED_FIRST_READ, PackedSnapshot } from '../../src/engine/packed-snapshot-source.js';
import { packedParts, packedPrefixOf } from '../../src/engine/packed-snapshot-writer.js';
import { closeS3Clients, ObjectStoreError, parseContentRange, RangedObject, s3Client } from '../../src/transports/s3.js';
import { loadGz } from '../helpers/fixtures.js';

interface Sent { cmd: string; input: Record<string, unknown> }

const awsError = (name: string, status: number): Error => Object.assign(new Error(`${name} (fake)`), { name, $metadata: { httpStatusCode: status } });

/** A store holding `bytes` under key "k" of bucket "b"; `fault` changes one answer. */
class FakeStore {
  sent: Sent[] = [];
  /** The next GetObject: its body stops after this many bytes (a dropped connection). */
  cutNext: number | undefined;
  ignoreRange = false;
  getError: Error | undefined;
  bucketExists = true;
  readonly etag = '"fake-etag-1"';

  constructor(public bytes: Buffer | undefined) {}

  get client(): S3Client {
    return { send: (c: { constructor: { name: string }; input: Record<string, unknown> }) => this.send(c.constructor.name, c.input) } as unknown as S3Client;
  }

  private async send(cmd: string, input: Record<string, unknown>): Promise<unknown> {
    this.sent.push({ cmd, input });
    const meta = (s: number): { $metadata: { httpStatusCode: number } } => ({ $metadata: { httpStatusCode: s } });
    if (cmd === 'HeadBucketCommand') {
      if (!this.bucketExists) throw awsError('NotFound', 404);
      return meta(200);
    }
    if (!this.bucketExists && !this.getError) throw awsError(cmd === 'GetObjectCommand' ? 'NoSuchBucket' : 'NotFound', 404);
    if (this.getError) throw this.getError;
    const bytes = this.bytes;
    if (!bytes) throw awsError(cmd === 'GetObjectCommand' ? 'NoSuchKey' : 'NotFound', 404);
    if (cmd === 'HeadObjectCommand') return { ...meta(200), ContentLength: bytes.length, ETag: this.etag };
    assert.equal(cmd, 'GetObjectCommand');
    if (input.IfMatch !== undefined && input.IfMatch !== this.etag) throw awsError('PreconditionFailed', 412);
    const m = /^bytes=(\d+)-(\d+)$/.exec(String(input.Range));
    assert.ok(m, `a ranged GET (${String(input.Range)})`);
    const first = Number(m[1]);
    if (this.ignoreRange) return { ...meta(200), ContentLength: bytes.length, ETag: this.etag, Body: this.body(bytes) };
    if (first >= bytes.length) throw awsError('InvalidRange', 416);
    const last = Math.min(Number(m[2]), bytes.length - 1);
    return { ...meta(206), ContentRange: `bytes ${first}-${last}/${bytes.length}`, ContentLength: last - first + 1, ETag: this.etag, Body: this.body(bytes.subarray(first, last + 1)) };
  }

  private body(b: Buffer): Readable {
    const cut = this.cutNext;
    this.cutNext = undefined;
    const chunks: Buffer[] = [];
    for (let at = 0; at < (cut ?? b.length); at += 16384) chunks.push(b.subarray(at, Math.min(at + 16384, cut ?? b.length)));
    if (cut === undefined) return Readable.from(chunks);
    // A body cut off: some bytes, then the connection drops.
    return Readable.from((async function* () {
      yield* chunks;
      throw Object.assign(new Error('socket hang up'), { code: 'ECONNRESET' });
    })());
  }

  cmds(): string[] {
    return this.sent.map((s) => s.cmd.replace('Command', ''));
  }
}

const URL = { bucket: 'b', key: 'k' };
let dir: string;
let object: Buffer;
let pagesOffset: number;

before(async () => {
  // RangedObject uses the SDK's command classes: making a client loads it (no request is sent).
  await s3Client({ endpoint: 'http://127.0.0.1:9', region: 'us-east-1' });
  dir = mkdtempSync('/tmp/multifd-s3-open-');
  const path = join(dir, 'file.mig');
  writeFileSync(path, loadGz('qemu-10.0/mapped-ram-file/file.mig.gz'));
  const src = await MappedRamSnapshot.open(path, { directIo: false });
  const { prefix, layout } = await packedPrefixOf(src);
  const parts: Buffer[] = [];
  for await (const p of packedParts(src, prefix, layout, 1024 * 1024)) parts.push(p);
  await src.close();
  object = Buffer.concat(parts);
  pagesOffset = layout.pagesOffset;
});

after(() => {
  closeS3Clients();
  rmSync(dir, { recursive: true, force: true });
});

describe('opening an object with one ranged GET', () => {
  test('Content-Range: parsed, and refused when it is not one', () => {
    assert.deepEqual(parseContentRange('bytes 0-524287/104402944'), { first: 0, last: 524287, total: 104402944 });
    assert.deepEqual(parseContentRange('bytes 0-99/100'), { first: 0, last: 99, total: 100 });
    assert.deepEqual(parseContentRange('bytes 5-9/*'), { first: 5, last: 9, total: undefined });
    assert.deepEqual(parseContentRange(' BYTES 0-0/1 '), { first: 0, last: 0, total: 1 });
    for (const bad of [undefined, '', 'bytes */100', 'bytes 0-100/100', 'bytes 9-5/100', 'bytes=0-9/100', 'items 0-9/100', 'bytes 0-9/abc', 'bytes 0-99999999999999999999/1']) {
      assert.equal(parseContentRange(bad), undefined, String(bad));
    }
  });

  test('a prefix within the first GET: one request in all, no HEAD; later GETs pinned to its ETag', async () => {
    const first = 256 * 1024;
    assert.ok(pagesOffset < first && object.length > first, `the fixture's prefix (${pagesOffset}) fits the first read, the object (${object.length}) is larger`);
    const store = new FakeStore(object);
    const o = await RangedObject.open(store.client, URL, { firstBytes: first });
    assert.equal(o.size, object.length);
    assert.equal(o.etag, store.etag);
    const p = await PackedSnapshot.open(o);
    assert.deepEqual(store.cmds(), ['GetObject']);
    assert.equal(store.sent[0]!.input.Range, `bytes=0-${first - 1}`);
    assert.equal(store.sent[0]!.input.IfMatch, undefined);
    assert.deepEqual(o.stats, { requests: 1, retries: 0, bytes: first });
    assert.equal(o.takeHead(), undefined, 'the head is handed out once');
    // A page: its own GET, with If-Match.
    const pc = p.blockList[0]!.name;
    let page = -1;
    p.forEachRun(pc, (f) => { page = f; return false; });
    const [view] = await p.loadRuns(pc, [page, 1], 1, Buffer.alloc(4096), { urgent: true });
    const at = p.pageObjectOffset(pc, page)!;
    assert.ok(view!.equals(object.subarray(at, at + 4096)));
    assert.equal(store.sent[1]!.input.IfMatch, store.etag);
    // The object replaced under us: the next GET fails instead of mixing two snapshots.
    store.bytes = Buffer.from(object);
    Object.defineProperty(store, 'etag', { value: '"fake-etag-2"' });
    await assert.rejects(o.read(at, 4096), (e: unknown) => e instanceof ObjectStoreError && /PreconditionFailed/.test(e.message));
    await p.close();
  });

  test('reading every page in order: the pages that came with the open are not fetched again', async () => {
    const first = 256 * 1024;
    const store = new FakeStore(object);
    const o = await RangedObject.open(store.client, URL, { firstBytes: first });
    const p = await PackedSnapshot.open(o, { chunkBytes: 64 * 1024 });
    let checked = 0;
    for (const b of p.blockList) {
      const runs: number[] = [];
      p.forEachRun(b.name, (f, n) => { runs.push(f, n); });
      for (let i = 0; i < runs.length; i += 2) {
        const views = await p.loadRuns(b.name, [runs[i]!, runs[i + 1]!], 1, Buffer.alloc(runs[i + 1]! * 4096));
        const at = p.pageObjectOffset(b.name, runs[i]!)!;
        assert.ok(Buffer.concat(views).equals(object.subarray(at, at + runs[i + 1]! * 4096)), `${b.name} pages ${runs[i]}+${runs[i + 1]}`);
        checked++;
      }
    }
    assert.ok(checked > 0);
    // Every byte of the object fetched exactly once: the open's 256 KiB, then the rest in chunks.
    assert.equal(o.stats.bytes, object.length);
    const ranges = store.sent.map((x) => String(x.input.Range));
    assert.equal(ranges[0], `bytes=0-${first - 1}`);
    assert.match(ranges[1]!, new RegExp(`^bytes=${first}-`), 'the first chunk starts where the open ended');
    await p.close();
  });

  test('a prefix larger than the first GET: a second GET for the rest, pinned to the ETag', async () => {
    assert.ok(pagesOffset > 4096, `the fixture's prefix (${pagesOffset}) is larger than 4 KiB`);
    const store = new FakeStore(object);
    const o = await RangedObject.open(store.client, URL, { firstBytes: 4096 });
    const p = await PackedSnapshot.open(o);
    assert.deepEqual(store.cmds(), ['GetObject', 'GetObject']);
    const rest = store.sent[1]!.input;
    assert.equal(rest.IfMatch, store.etag);
    const m = /^bytes=4096-(\d+)$/.exec(String(rest.Range));
    assert.ok(m, `the second GET starts where the first ended (${String(rest.Range)})`);
    assert.ok(Number(m[1]) + 1 >= p.layout.skeletonOffset + p.layout.skeletonLength && Number(m[1]) < pagesOffset, 'and reads up to the prefix end');
    // The same snapshot as read from memory in one piece.
    const whole = await PackedSnapshot.open(await RangedObject.open(new FakeStore(object).client, URL, { firstBytes: PACKED_FIRST_READ }));
    assert.deepEqual(p.blockList, whole.blockList);
    assert.deepEqual(p.deviceState, whole.deviceState);
    assert.deepEqual(p.skeletonSpans(), whole.skeletonSpans());
    await p.close();
    await whole.close();
  });

  test('an object smaller than the first GET: its size from Content-Range, all of it in the head', async () => {
    const store = new FakeStore(object);
    const o = await RangedObject.open(store.client, URL, { firstBytes: object.length + 12345 });
    assert.equal(o.size, object.length);
    assert.deepEqual(store.cmds(), ['GetObject']);
    const head = o.takeHead()!;
    assert.ok(head.equals(object));
    // The fixture's whole object is smaller than the default first read: it opens with one GET.
    assert.ok(object.length < PACKED_FIRST_READ);
    const s2 = new FakeStore(object);
    const p = await PackedSnapshot.open(await RangedObject.open(s2.client, URL, { firstBytes: PACKED_FIRST_READ }));
    assert.equal(p.objectSize, object.length);
    assert.deepEqual(s2.cmds(), ['GetObject']);
    await p.close();
  });

  test('short objects: a truncated snapshot and an empty object fail at open with TRUNCATED', async () => {
    for (const size of [10, 100, pagesOffset - 1, pagesOffset + 4096]) {
      const store = new FakeStore(object.subarray(0, size));
      const o = await RangedObject.open(store.client, URL, { firstBytes: PACKED_FIRST_READ });
      assert.equal(o.size, size);
      await assert.rejects(PackedSnapshot.open(o), (e: unknown) => e instanceof ProtocolError && e.code === 'TRUNCATED' && typeof e.offset === 'number', `size ${size}`);
      assert.deepEqual(store.cmds(), ['GetObject'], `size ${size}: one GET`);
    }
    // Empty: S3 answers a range with 416; a HEAD tells the size.
    const empty = new FakeStore(Buffer.alloc(0));
    const o = await RangedObject.open(empty.client, URL, { firstBytes: PACKED_FIRST_READ });
    assert.equal(o.size, 0);
    assert.deepEqual(empty.cmds(), ['GetObject', 'HeadObject']);
    await assert.rejects(PackedSnapshot.open(o), (e: unknown) => e instanceof ProtocolError && e.code === 'TRUNCATED');
  });

  test('a store that ignores Range (200, whole object): the first bytes are kept, the size is Content-Length', async () => {
    const store = new FakeStore(object);
    store.ignoreRange = true;
    const o = await RangedObject.open(store.client, URL, { firstBytes: 8192 });
    assert.equal(o.size, object.length);
    assert.ok(o.takeHead()!.equals(object.subarray(0, 8192)));
  });

  test('a body cut off in the first GET is retried; a wrong Content-Range is an error', async () => {
    const store = new FakeStore(object);
    store.cutNext = 20000;
    const o = await RangedObject.open(store.client, URL, { firstBytes: PACKED_FIRST_READ });
    assert.deepEqual(store.cmds(), ['GetObject', 'GetObject']);
    assert.equal(o.stats.retries, 1);
    assert.equal(o.stats.requests, 2);
    assert.ok(o.takeHead()!.equals(object.subarray(0, PACKED_FIRST_READ)));
    const odd = { send: async () => ({ $metadata: { httpStatusCode: 206 }, ContentRange: `bytes 0-99/${object.length}`, ETag: '"x"', Body: Readable.from([object.subarray(0, 100)]) }) } as unknown as S3Client;
    await assert.rejects(RangedObject.open(odd, URL, { firstBytes: 4096 }), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_ERROR' && /bytes 0-99/.test(e.message));
  });

  test('missing key, missing bucket, 403: named from the GET itself', async () => {
    const noKey = new FakeStore(undefined);
    await assert.rejects(RangedObject.open(noKey.client, URL), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_KEY' && /s3:\/\/b\/k: no such object/.test(e.message));
    assert.deepEqual(noKey.cmds(), ['GetObject'], 'NoSuchKey says which 404 it is');
    const noBucket = new FakeStore(object);
    noBucket.bucketExists = false;
    await assert.rejects(RangedObject.open(noBucket.client, URL), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_BUCKET' && /the bucket b does not exist/.test(e.message));
    // A bare 404 (no error body): HEAD bucket tells which.
    const bare = new FakeStore(object);
    bare.bucketExists = false;
    bare.getError = awsError('NotFound', 404);
    await assert.rejects(RangedObject.open(bare.client, URL), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_BUCKET');
    assert.deepEqual(bare.cmds(), ['GetObject', 'HeadBucket']);
    const bareKey = new FakeStore(object);
    bareKey.getError = awsError('NotFound', 404);
    await assert.rejects(RangedObject.open(bareKey.client, URL), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_KEY');
    const denied = new FakeStore(object);
    denied.getError = awsError('SignatureDoesNotMatch', 403);
    await assert.rejects(RangedObject.open(denied.client, URL), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_ACCESS_DENIED');
    assert.deepEqual(denied.cmds(), ['GetObject'], 'a 403 is not retried');
  });
});
