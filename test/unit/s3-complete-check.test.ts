// A CompleteMultipartUpload whose answer is lost (docs/s3.md, atomicity): the store may have
// committed the object all the same, and the SDK's retry of the Complete is then answered
// NoSuchUpload. MultipartUpload.complete() asks the store what is under the key: the object this
// upload made (its token in the user metadata, its size) → success; anything else → the failure,
// saying what was found. A Complete refused outright fails as before, without a HEAD. Against a
// scripted S3 server on loopback, through the real S3 client.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { S3Client } from '@aws-sdk/client-s3';
import { closeS3Clients, MultipartUpload, ObjectStoreError, s3Client, UPLOAD_TOKEN_META } from '../../src/transports/s3.js';
import { configureObjectStore } from '../../src/conversations/object-store.js';
import { receive } from '../../src/conversations/receive.js';
import { makeSyntheticGuest, sendSyntheticMigration } from '../../src/demo/synthetic-source.js';
import { scriptedStore, type ScriptedStore } from '../helpers/scripted-s3.js';

const BUCKET = 'snapshots';

/** Three small parts (the scripted store has no minimum part size), each a different byte. */
function parts(): Buffer[] {
  return [Buffer.alloc(3000, 1), Buffer.alloc(3000, 2), Buffer.alloc(1234, 3)];
}

const count = (store: ScriptedStore, op: string): number => store.ops.filter((o) => o === op).length;

describe('a CompleteMultipartUpload whose answer is lost', () => {
  let store: ScriptedStore;
  let client: S3Client;
  process.env.AWS_ACCESS_KEY_ID ??= 'test-key';
  process.env.AWS_SECRET_ACCESS_KEY ??= 'test-secret';

  before(async () => {
    store = await scriptedStore(BUCKET);
    client = await s3Client({ endpoint: store.endpoint, region: 'us-east-1' });
  });
  after(() => {
    store.server.close();
    closeS3Clients();
    configureObjectStore({});
  });

  /** A fresh script, and an upload of parts() to `key` with every part in. */
  async function upload(key: string): Promise<MultipartUpload> {
    store.ops.length = 0;
    Object.assign(store.state, { completeFails: false, loseCompleteAnswers: 0, commitBeforeLosing: true, afterCommit: undefined });
    const up = await MultipartUpload.create(client, { bucket: BUCKET, key }, { concurrency: 2 });
    for (const p of parts()) await up.add(p);
    return up;
  }

  test('committed, the answer lost, the retry answered NoSuchUpload → complete() resolves; the object under the key is this upload\'s', async () => {
    const up = await upload('lost.mig');
    store.state.loseCompleteAnswers = 1;
    await up.complete();
    assert.ok(store.objects.get('lost.mig')?.equals(Buffer.concat(parts())), 'the uploaded bytes are under the key');
    assert.equal(store.meta.get('lost.mig')?.[UPLOAD_TOKEN_META], up.token, 'carrying this upload\'s token');
    assert.equal(count(store, 'complete'), 2, `the SDK sent the Complete again (requests: ${store.ops.join(', ')})`);
    assert.equal(count(store, 'head-object'), 1, 'one HEAD decided');
    // Three parts, two attempts at the Complete, the HEAD; the Complete's second attempt a retry.
    assert.equal(up.stats.requests, 3 + 2 + 1);
    assert.equal(up.stats.retries, 1);
    await up.abort();
    assert.equal(count(store, 'abort-upload'), 0, 'a completed upload is not aborted');
  });

  test('committed, the answer lost, and another writer\'s object of the same size under the key by the retry → complete() rejects, naming it', async () => {
    const up = await upload('raced.mig');
    store.state.loseCompleteAnswers = 1;
    // Another writer's object replaces ours before the retry: same bytes, same size, its own token.
    store.state.afterCommit = (key) => store.meta.set(key, { [UPLOAD_TOKEN_META]: 'f'.repeat(32) });
    await assert.rejects(up.complete(), (e: unknown) => {
      assert.ok(e instanceof ObjectStoreError);
      assert.equal(e.code, 'S3_ERROR');
      assert.match(e.message, /^completing the upload of s3:\/\/snapshots\/raced\.mig: NoSuchUpload: the store no longer has multipart upload up\d+ \(HTTP 404\)/);
      assert.match(e.message, /the store may have committed an earlier attempt whose answer was lost, but the object under s3:\/\/snapshots\/raced\.mig is not this upload's \(another upload's token: another writer's\)$/);
      return true;
    });
    assert.equal(count(store, 'head-object'), 1);
    await up.abort(); // as uploadPackedSnapshot does on a failure: the store no longer has the upload
  });

  test('an object without any token under the key (a plain PUT) is not this upload\'s either', async () => {
    const up = await upload('plain.mig');
    store.state.loseCompleteAnswers = 1;
    store.state.afterCommit = (key) => store.meta.set(key, {});
    await assert.rejects(up.complete(), /is not this upload's \(it carries no upload token: another writer's\)$/);
  });

  test('every attempt\'s answer lost and nothing committed → complete() rejects as unreachable, saying no object is under the key', async () => {
    const up = await upload('never.mig');
    store.state.loseCompleteAnswers = 3; // the client's maxAttempts
    store.state.commitBeforeLosing = false;
    await assert.rejects(up.complete(), (e: unknown) => {
      assert.ok(e instanceof ObjectStoreError);
      assert.equal(e.code, 'S3_UNREACHABLE');
      assert.match(e.message, /^completing the upload of s3:\/\/snapshots\/never\.mig: the S3 endpoint is unreachable/);
      assert.match(e.message, /but no object is under s3:\/\/snapshots\/never\.mig$/);
      return true;
    });
    assert.equal(count(store, 'complete'), 3);
    assert.equal(count(store, 'head-object'), 1);
    assert.equal(store.objects.has('never.mig'), false);
    await up.abort();
    assert.equal(count(store, 'abort-upload'), 1, 'the upload is aborted as before');
    assert.equal(store.uploads.has(up.uploadId), false, 'the multipart upload is not left behind');
  });

  test('the Complete refused (400 InvalidPart) → rejects as before, with no HEAD', async () => {
    const up = await upload('refused.mig');
    store.state.completeFails = true;
    await assert.rejects(up.complete(), (e: unknown) => {
      assert.ok(e instanceof ObjectStoreError);
      assert.equal(e.code, 'S3_ERROR');
      assert.equal(e.message, 'completing the upload of s3://snapshots/refused.mig: InvalidPart: InvalidPart (HTTP 400)');
      return true;
    });
    assert.equal(count(store, 'complete'), 1, 'not retried');
    assert.equal(count(store, 'head-object'), 0, 'a refusal needs no check');
    await up.abort();
    assert.equal(store.uploads.has(up.uploadId), false);
  });

  test('receive --out s3: the Complete\'s answer lost after the commit → completed, the object stored, not aborted; the report counts the retry', async () => {
    store.ops.length = 0;
    Object.assign(store.state, { completeFails: false, loseCompleteAnswers: 1, commitBeforeLosing: true, afterCommit: undefined });
    configureObjectStore({ endpoint: store.endpoint, region: 'us-east-1' });
    const h = receive({ listen: 'tcp:127.0.0.1:0', out: `s3://${BUCKET}/receive.mig`, channels: 2 });
    const sent = sendSyntheticMigration(await h.listening, makeSyntheticGuest(8), { channels: 2, rounds: 1, returnPath: true }).catch((e: Error) => e);
    const s = await h.done;
    assert.equal(s.status, 'completed');
    assert.equal(await sent, undefined, 'the source got SHUT(0) and completed');
    assert.equal(s.store?.['object-size'], store.objects.get('receive.mig')?.length);
    assert.ok((s.store?.retries ?? 0) >= 1, `the Complete's retry is counted (report: ${JSON.stringify(s.store)})`);
    assert.equal(count(store, 'complete'), 2);
    assert.equal(count(store, 'abort-upload'), 0);
    assert.ok(![...store.uploads.values()].some((u) => u.key === 'receive.mig'), 'no multipart upload left');
  });
});
