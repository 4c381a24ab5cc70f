// S3 client plumbing without a store: URLs, path-style, part sizes, and how SDK errors are named.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { ObjectStoreError, parseObjectUrl, partSizeFor, storeError, wantsPathStyle, MIN_PART_SIZE } from '../../src/transports/s3.js';

describe('S3 plumbing', () => {
  test('s3:// URLs', () => {
    assert.deepEqual(parseObjectUrl('s3://snapshots/vm1.mig'), { bucket: 'snapshots', key: 'vm1.mig' });
    assert.deepEqual(parseObjectUrl('s3://b-1.x/dir/sub/vm.mig'), { bucket: 'b-1.x', key: 'dir/sub/vm.mig' });
    for (const bad of ['s3://bucket', 's3://bucket/', 's3:///key', 'file:///x', 's3://Upper/key', 's3://a/key']) {
      assert.throws(() => parseObjectUrl(bad), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_BAD_URL', bad);
    }
  });

  test('path-style: automatic for IP and localhost endpoints, the flag wins', () => {
    assert.equal(wantsPathStyle('http://127.0.0.1:7480'), true);
    assert.equal(wantsPathStyle('http://[::1]:9000'), true);
    assert.equal(wantsPathStyle('http://localhost:9000'), true);
    assert.equal(wantsPathStyle('https://s3.eu-west-1.amazonaws.com'), false);
    assert.equal(wantsPathStyle(undefined), false);
    assert.equal(wantsPathStyle('https://minio.example', true), true);
    assert.equal(wantsPathStyle('http://127.0.0.1:7480', false), false);
    assert.throws(() => wantsPathStyle('not a url'), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_BAD_URL');
  });

  test('part sizes: at least 5 MiB, whole MiB, at most 10 000 parts', () => {
    assert.equal(partSizeFor(1024), 16 * 1024 * 1024);
    assert.equal(partSizeFor(1024, 1), MIN_PART_SIZE);
    const huge = 5 * 1024 ** 4; // 5 TiB, S3's object limit
    const p = partSizeFor(huge);
    assert.ok(Math.ceil(huge / p) <= 10_000);
    assert.equal(p % (1024 * 1024), 0);
  });

  test('SDK errors get stable codes', () => {
    const e = (name: string, status?: number, extra: object = {}): unknown => Object.assign(new Error(`${name} happened`), { name, ...(status ? { $metadata: { httpStatusCode: status } } : {}), ...extra });
    const code = (x: unknown, missing?: 'key' | 'bucket'): string => storeError(x, 'op', missing).code;
    assert.equal(code(e('CredentialsProviderError')), 'S3_NO_CREDENTIALS');
    assert.equal(code(e('InvalidAccessKeyId', 403)), 'S3_ACCESS_DENIED');
    assert.equal(code(e('SignatureDoesNotMatch', 403)), 'S3_ACCESS_DENIED');
    assert.equal(code(e('Forbidden', 403)), 'S3_ACCESS_DENIED');
    assert.equal(code(e('NoSuchBucket', 404)), 'S3_NO_BUCKET');
    assert.equal(code(e('NotFound', 404), 'bucket'), 'S3_NO_BUCKET');
    assert.equal(code(e('NoSuchKey', 404)), 'S3_NO_KEY');
    assert.equal(code(e('NotFound', 404)), 'S3_NO_KEY');
    assert.equal(code(e('Error', undefined, { code: 'ECONNREFUSED' })), 'S3_UNREACHABLE');
    assert.equal(code(e('TimeoutError')), 'S3_UNREACHABLE');
    assert.equal(code(e('InternalError', 500)), 'S3_ERROR');
    assert.equal(code(new Error('Region is missing')), 'S3_NO_REGION');
    const err = storeError(e('InternalError', 500), 's3://b/k');
    assert.match(err.message, /s3:\/\/b\/k: InternalError.*HTTP 500/);
  });
});
