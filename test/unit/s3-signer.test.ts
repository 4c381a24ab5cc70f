// Reading an object without the AWS SDK's client (transports/s3-signer.ts): when GETs are signed
// here and when they are left to the client, the URL of an object, the signature checked against
// SigV4 computed independently in this file, and opens through a scripted store: presigned first,
// the client's own request after a refusal or an answer that ignores Range, and (in a process of
// its own) a whole open and read that never loads the SDK.

import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { GetSigner, keyPath, objectLocation, signedGetTarget, type SignedGetTarget } from '../../src/transports/s3-signer.js';
import { closeS3Clients, ObjectStoreError, RangedObject, StoreAccess } from '../../src/transports/s3.js';
import { scriptedStore, type ScriptedStore } from '../helpers/scripted-s3.js';

const CREDS = { AWS_ACCESS_KEY_ID: 'AKIDTEST', AWS_SECRET_ACCESS_KEY: 'secret/key+1' };

function target(over: Partial<SignedGetTarget> = {}): SignedGetTarget {
  return { endpoint: new URL('http://127.0.0.1:7480'), region: 'us-east-1', pathStyle: true, credentials: { accessKeyId: 'AKIDTEST', secretAccessKey: 'secret/key+1' }, ...over };
}

const rfc3986 = (s: string): string => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
const hmac = (key: string | Buffer, data: string): Buffer => createHmac('sha256', key).update(data).digest();

/** SigV4 of a presigned GET (AWS's documented algorithm), written out here to check the signer against. */
function expectedSignature(url: URL, secret: string, region: string): string {
  const q = [...url.searchParams].filter(([k]) => k !== 'X-Amz-Signature').map(([k, v]) => `${rfc3986(k)}=${rfc3986(v)}`).sort().join('&');
  const canonical = ['GET', url.pathname, q, `host:${url.host}`, '', 'host', 'UNSIGNED-PAYLOAD'].join('\n');
  const amzDate = url.searchParams.get('X-Amz-Date')!;
  const scope = `${amzDate.slice(0, 8)}/${region}/s3/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, createHash('sha256').update(canonical).digest('hex')].join('\n');
  const key = hmac(hmac(hmac(hmac(`AWS4${secret}`, amzDate.slice(0, 8)), region), 's3'), 'aws4_request');
  return createHmac('sha256', key).update(toSign).digest('hex');
}

describe('S3 GETs signed without the SDK client', () => {
  test('signed here only with an endpoint, a region and static keys in the environment, and no profile', () => {
    const s = { endpoint: 'http://127.0.0.1:7480', region: 'us-east-1', pathStyle: true };
    const t = signedGetTarget(s, CREDS);
    assert.ok(t);
    assert.equal(t.endpoint.host, '127.0.0.1:7480');
    assert.deepEqual(t.credentials, { accessKeyId: 'AKIDTEST', secretAccessKey: 'secret/key+1' });
    assert.equal(signedGetTarget(s, { ...CREDS, AWS_SESSION_TOKEN: 'tok' })?.credentials.sessionToken, 'tok');
    assert.equal(signedGetTarget({ ...s, endpoint: undefined }, CREDS), undefined, "AWS's own endpoints are the client's");
    assert.equal(signedGetTarget({ ...s, region: undefined }, CREDS), undefined);
    assert.equal(signedGetTarget(s, { ...CREDS, AWS_PROFILE: 'other' }), undefined, 'a profile asked for wins over the keys');
    assert.equal(signedGetTarget(s, { AWS_ACCESS_KEY_ID: 'AKIDTEST' }), undefined);
    assert.equal(signedGetTarget(s, {}), undefined);
    assert.equal(signedGetTarget({ ...s, endpoint: 'ftp://host' }, CREDS), undefined);
    assert.equal(signedGetTarget({ ...s, endpoint: 'not a url' }, CREDS), undefined);
  });

  test("an object's URL: path-style, virtual-hosted, escaped keys; none where a URL would change the key", () => {
    assert.equal(keyPath('dir/a b+c*(é)'), 'dir/a%20b%2Bc%2A%28%C3%A9%29');
    assert.equal(objectLocation(target(), { bucket: 'snaps', key: 'vm/1 2.mig' })?.href, 'http://127.0.0.1:7480/snaps/vm/1%202.mig');
    const base = target({ endpoint: new URL('https://store.example.com/s3/'), pathStyle: false });
    assert.equal(objectLocation(base, { bucket: 'snaps', key: 'k' })?.href, 'https://snaps.store.example.com/s3/k');
    assert.equal(objectLocation(base, { bucket: 'my.snaps', key: 'k' }), undefined, 'a dotted bucket is not one certificate name');
    assert.equal(objectLocation(target({ pathStyle: false }), { bucket: 'snaps', key: 'k' }), undefined, 'an IP has no bucket subdomains');
    assert.equal(objectLocation(target(), { bucket: 'snaps', key: 'a/../b' }), undefined);
    assert.equal(objectLocation(target(), { bucket: 'snaps', key: './b' }), undefined);
  });

  test('the presigned URL carries the SigV4 signature of its own path and query', async () => {
    for (const t of [target(), target({ credentials: { accessKeyId: 'AKIDTEST', secretAccessKey: 'secret/key+1', sessionToken: 'FQo+/tok=' }, region: 'eu-west-3' })]) {
      const url = await new GetSigner(t).presign({ bucket: 'snaps', key: 'vm/one two.mig' }, 900);
      assert.ok(url);
      const q = url.searchParams;
      assert.equal(q.get('X-Amz-Algorithm'), 'AWS4-HMAC-SHA256');
      assert.match(q.get('X-Amz-Credential')!, new RegExp(`^AKIDTEST/\\d{8}/${t.region}/s3/aws4_request$`));
      assert.equal(q.get('X-Amz-SignedHeaders'), 'host');
      assert.equal(q.get('X-Amz-Expires'), '900');
      assert.equal(q.get('x-amz-content-sha256') ?? q.get('X-Amz-Content-Sha256'), 'UNSIGNED-PAYLOAD');
      assert.equal(q.get('X-Amz-Security-Token') ?? undefined, t.credentials.sessionToken);
      assert.equal(url.pathname, '/snaps/vm/one%20two.mig');
      assert.equal(q.get('X-Amz-Signature'), expectedSignature(url, t.credentials.secretAccessKey, t.region));
    }
  });
});

describe('opening an object with a GET signed here', () => {
  const stores: ScriptedStore[] = [];
  const saved = { ...process.env };
  after(() => {
    for (const s of stores) s.server.close();
    closeS3Clients();
    for (const k of ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_PROFILE']) {
      if (saved[k] === undefined) delete process.env[k];
      else process.env[k] = saved[k];
    }
  });
  const OBJECT = Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 13 + (i >> 9)) & 0xff));

  async function store(): Promise<ScriptedStore> {
    Object.assign(process.env, CREDS);
    delete process.env.AWS_PROFILE;
    const s = await scriptedStore('snaps');
    s.objects.set('vm/a b.mig', OBJECT);
    stores.push(s);
    return s;
  }

  test('one presigned GET opens the object; reads are presigned too, and the bytes are exact', async () => {
    const s = await store();
    const o = await RangedObject.open(StoreAccess.for({ endpoint: s.endpoint }), { bucket: 'snaps', key: 'vm/a b.mig' }, { firstBytes: 4096 });
    assert.equal(o.size, OBJECT.length);
    assert.equal(o.etag, '"o1"');
    assert.deepEqual(o.takeHead(), OBJECT.subarray(0, 4096));
    assert.deepEqual(await o.read(150_000, 50_000), OBJECT.subarray(150_000));
    assert.equal(s.requests.length, 2);
    for (const r of s.requests) {
      assert.match(r.url, /^\/snaps\/vm\/a%20b\.mig\?.*X-Amz-Signature=[0-9a-f]{64}/);
      assert.equal(r.headers.authorization, undefined, 'not signed by the client');
    }
    assert.equal(s.requests[1]!.headers['if-match'], '"o1"');
    assert.deepEqual(o.stats, { requests: 2, retries: 0, bytes: 4096 + 50_000 });
  });

  test('an error answer to the presigned GET is asked again through the client, which names it', async () => {
    const s = await store();
    await assert.rejects(RangedObject.open(StoreAccess.for({ endpoint: s.endpoint }), { bucket: 'snaps', key: 'missing' }), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_KEY' && /s3:\/\/snaps\/missing: no such object/.test(e.message));
    assert.ok(s.requests[0]!.url.includes('X-Amz-Signature='), 'presigned first');
    assert.ok(s.requests[1]!.headers.authorization, 'then the client');
    // Refused when presigned, served to the client's own request (Authorization header): the object opens.
    s.state.refusePresigned = true;
    const o = await RangedObject.open(StoreAccess.for({ endpoint: s.endpoint }), { bucket: 'snaps', key: 'vm/a b.mig' }, { firstBytes: 4096 });
    assert.equal(o.size, OBJECT.length);
    const mine = s.requests.filter((r) => r.url.includes('a%20b'));
    assert.ok(mine[0]!.url.includes('X-Amz-Signature='), 'presigned first');
    assert.match(String(mine[1]!.headers.authorization), /^AWS4-HMAC-SHA256 Credential=AKIDTEST\//, 'then the client');
  });

  test('a store that ignores Range: the client opens it (the whole object is never read for a head)', async () => {
    const s = await store();
    s.state.ignoreRange = true;
    const o = await RangedObject.open(StoreAccess.for({ endpoint: s.endpoint }), { bucket: 'snaps', key: 'vm/a b.mig' }, { firstBytes: 4096 });
    assert.equal(o.size, OBJECT.length);
    assert.deepEqual(o.takeHead(), OBJECT.subarray(0, 4096));
    assert.ok(s.requests[1]!.headers.authorization, 'the second request is the client\'s');
  });

  test('opening and reading never load the AWS SDK (a process of its own)', async () => {
    const s = await store();
    const script = `
      import { createRequire } from 'node:module';
      const { RangedObject, StoreAccess, closeS3Clients } = await import(${JSON.stringify(new URL('../../src/transports/s3.js', import.meta.url).href)});
      const o = await RangedObject.open(StoreAccess.for({ endpoint: ${JSON.stringify(s.endpoint)} }), { bucket: 'snaps', key: 'vm/a b.mig' });
      const b = await o.read(100_000, 1000);
      const sdk = Object.keys(createRequire(import.meta.url).cache).filter((k) => k.includes('@aws-sdk')).length;
      console.log(JSON.stringify({ sdk, size: o.size, sum: b.reduce((a, x) => a + x, 0) }));
      closeS3Clients();`;
    const run = async (env: NodeJS.ProcessEnv) => JSON.parse((await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, ...CREDS, ...env } })).stdout) as { sdk: number; size: number; sum: number };
    const sum = OBJECT.subarray(100_000, 101_000).reduce((a, x) => a + x, 0);
    assert.deepEqual(await run({}), { sdk: 0, size: OBJECT.length, sum });
    // The check can fail: through the client (MULTIFD_S3_DIRECT_GET=0) the SDK's modules are there.
    const viaClient = await run({ MULTIFD_S3_DIRECT_GET: '0' });
    assert.ok(viaClient.sdk > 0);
    assert.equal(viaClient.sum, sum);
  });
});
