// Ranged GET bodies read straight into the caller's buffer (transports/direct-get.ts), against a
// scripted HTTP server on loopback: exact bytes, keep-alive reuse, a store that closed an idle
// connection, the connection limit, bodies cut short or longer than announced, and error answers
// handed to the SDK's handler. The last tests go through the real S3 client and RangedObject.

import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer } from 'node:tls';
import { join } from 'node:path';
import { makeTlsCreds } from '../helpers/tls.js';
import { DirectGetHandler, isDirectBody, parseHead, queryString, requestText, type SdkHttpHandler, type SdkHttpRequest } from '../../src/transports/direct-get.js';
import { closeS3Clients, ObjectStoreError, RangedObject, s3Client } from '../../src/transports/s3.js';

interface Req { method: string; target: string; headers: Record<string, string>; conn: number }
type Responder = (req: Req, sock: Socket) => void;

/** A loopback server that hands each request head to `respond` (which writes the answer). */
async function scripted(respond: Responder, tls?: { key: Buffer; cert: Buffer }): Promise<{ server: Server; port: number; connections: () => number; requests: Req[] }> {
  let conns = 0;
  const requests: Req[] = [];
  const serve = (sock: Socket): void => {
    const id = ++conns;
    let buf = Buffer.alloc(0);
    sock.on('error', () => {});
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      for (let end = buf.indexOf('\r\n\r\n'); end >= 0; end = buf.indexOf('\r\n\r\n')) {
        const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
        buf = buf.subarray(end + 4);
        const [method, target] = lines[0]!.split(' ');
        const headers: Record<string, string> = {};
        for (const l of lines.slice(1)) headers[l.slice(0, l.indexOf(':')).toLowerCase()] = l.slice(l.indexOf(':') + 1).trim();
        const req = { method: method!, target: target!, headers, conn: id };
        requests.push(req);
        respond(req, sock);
      }
    });
  };
  const server: Server = tls ? createTlsServer(tls, serve) : createServer(serve);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as { port: number }).port, connections: () => conns, requests };
}

const OBJECT = Buffer.from(Array.from({ length: 300_000 }, (_, i) => (i * 7 + (i >> 8)) & 0xff));

function range(req: Req): [number, number] {
  const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
  return [Number(m[1]), Number(m[2]) + 1];
}

/** A correct ranged answer, head and body in separate writes (so the body is read on its own). */
function answer(req: Req, sock: Socket, opts: { extra?: Buffer; close?: boolean } = {}): void {
  const [a, b] = range(req);
  sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a}\r\nETag: "e1"\r\nContent-Range: bytes ${a}-${b - 1}/${OBJECT.length}\r\n${opts.close ? 'Connection: close\r\n' : ''}\r\n`);
  setImmediate(() => sock.write(opts.extra ? Buffer.concat([OBJECT.subarray(a, b), opts.extra]) : OBJECT.subarray(a, b)));
}

function get(port: number, from: number, to: number): SdkHttpRequest {
  return { method: 'GET', protocol: 'http:', hostname: '127.0.0.1', port, path: '/bucket/key', query: { 'x-id': 'GetObject' }, headers: { range: `bytes=${from}-${to - 1}`, host: `127.0.0.1:${port}` } };
}

/** The SDK's handler stand-in: records what it was handed. */
function innerStub(): SdkHttpHandler & { seen: SdkHttpRequest[] } {
  const seen: SdkHttpRequest[] = [];
  return {
    seen,
    async handle(req) {
      seen.push(req);
      return { response: { statusCode: 599, headers: {}, body: 'inner' } };
    },
  };
}

/** `bucket/key` opened through the real S3 client against the scripted server `s` (test credentials). */
async function openThrough(s: { port: number }, bucket: string, key: string): Promise<RangedObject> {
  process.env.AWS_ACCESS_KEY_ID ??= 'test-key';
  process.env.AWS_SECRET_ACCESS_KEY ??= 'test-secret';
  const client = await s3Client({ endpoint: `http://127.0.0.1:${s.port}`, region: 'us-east-1' });
  return RangedObject.open(client, { bucket, key }, { attempts: 2 });
}

async function readAll(h: DirectGetHandler, port: number, from: number, to: number): Promise<Buffer> {
  const { response } = await h.handle(get(port, from, to));
  assert.ok(isDirectBody(response.body), 'a 206 with a length is read directly');
  const out = Buffer.alloc(to - from);
  await response.body.readInto(out);
  return out;
}

describe('S3 direct GET bodies', () => {
  const servers: Server[] = [];
  after(() => {
    for (const s of servers) s.close();
    closeS3Clients();
  });

  test('request text and head parsing', () => {
    assert.equal(queryString({ 'x-id': 'GetObject', b: ['1 2', null], a: null, c: '' }), 'a&b=1%202&b=&c=&x-id=GetObject');
    const t = requestText(get(80, 0, 10));
    assert.equal(t, 'GET /bucket/key?x-id=GetObject HTTP/1.1\r\nrange: bytes=0-9\r\nhost: 127.0.0.1:80\r\n\r\n');
    assert.throws(() => requestText({ ...get(80, 0, 10), headers: { range: 'bytes=0-9\r\nx-evil: 1' } }), /CR or LF/);
    assert.deepEqual(parseHead('HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nX-A: 1\r\nx-a: 2'), { status: 206, reason: 'Partial Content', headers: { 'content-length': '5', 'x-a': '1, 2' } });
    assert.equal(parseHead('SSH-2.0-OpenSSH'), undefined);
  });

  test('bodies land in the buffer exactly; one kept-alive connection serves request after request', async () => {
    const s = await scripted((req, sock) => answer(req, sock));
    servers.push(s.server);
    const inner = innerStub();
    const h = new DirectGetHandler(inner);
    for (const [a, b] of [[0, 1], [1, 70_000], [70_000, 300_000], [123, 4219]] as const) {
      assert.ok((await readAll(h, s.port, a, b)).equals(OBJECT.subarray(a, b)), `bytes ${a}..${b}`);
    }
    assert.equal(s.connections(), 1);
    assert.equal(inner.seen.length, 0);
    // Not ranged GETs: the SDK's handler.
    await h.handle({ ...get(s.port, 0, 1), method: 'HEAD' });
    await h.handle({ ...get(s.port, 0, 1), headers: {} });
    assert.equal(inner.seen.length, 2);
    h.destroy();
  });

  test('an IPv6 endpoint (hostname in brackets) connects', async (t) => {
    const s = await scripted((req, sock) => answer(req, sock)).catch(() => undefined);
    const v6 = createServer((sock) => s?.server.emit('connection', sock));
    const ok = await new Promise<boolean>((r) => { v6.once('error', () => r(false)); v6.listen(0, '::1', () => r(true)); });
    if (!s || !ok) {
      t.skip('no IPv6 loopback here');
      v6.close();
      return;
    }
    servers.push(s.server, v6);
    const port = (v6.address() as { port: number }).port;
    const h = new DirectGetHandler(innerStub());
    const { response } = await h.handle({ ...get(port, 0, 100), hostname: '[::1]' });
    assert.ok(isDirectBody(response.body));
    const out = Buffer.alloc(100);
    await response.body.readInto(out);
    assert.ok(out.equals(OBJECT.subarray(0, 100)));
    h.destroy();
  });

  test('https: bodies decrypted straight into the buffer, kept alive; a body cut short fails; an unknown CA is refused', async (t) => {
    const dir = `/tmp/multifd-direct-get-tls-${process.pid}`;
    try {
      makeTlsCreds(dir);
    } catch (e) {
      rmSync(dir, { recursive: true, force: true });
      t.skip(`no test certificates (openssl): ${(e as Error).message}`);
      return;
    }
    try {
      const creds = { key: readFileSync(join(dir, 'server-key.pem')), cert: readFileSync(join(dir, 'server-cert.pem')) };
      let cut = false;
      const s = await scripted((req, sock) => {
        if (!cut) return answer(req, sock);
        const [a, b] = range(req);
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a}\r\n\r\n`);
        setImmediate(() => sock.end(OBJECT.subarray(a, a + 777)));
      }, creds);
      servers.push(s.server);
      const h = new DirectGetHandler(innerStub(), { tls: { ca: readFileSync(join(dir, 'ca-cert.pem')) } });
      // The certificate names IP:127.0.0.1 too; a fresh root (the fresh-machine test) may not resolve localhost.
      const tlsGet = (a: number, b: number): SdkHttpRequest => ({ ...get(s.port, a, b), protocol: 'https:', hostname: '127.0.0.1' });
      for (const [a, b] of [[0, 300_000], [5, 6], [1000, 71_000]] as const) {
        const { response } = await h.handle(tlsGet(a, b));
        assert.ok(isDirectBody(response.body));
        const out = Buffer.alloc(b - a);
        await response.body.readInto(out);
        assert.ok(out.equals(OBJECT.subarray(a, b)), `bytes ${a}..${b} over TLS`);
      }
      assert.equal(s.connections(), 1);
      cut = true;
      const { response } = await h.handle(tlsGet(0, 5000));
      await assert.rejects((response.body as { readInto(b: Buffer): Promise<void> }).readInto(Buffer.alloc(5000)), (e: Error & { received?: number }) => e.received === 777);
      h.destroy();
      const stranger = new DirectGetHandler(innerStub());
      await assert.rejects(stranger.handle(tlsGet(0, 10)), (e: Error & { code?: string }) => /certificate|self.signed|issuer/i.test(`${e.code} ${e.message}`));
      stranger.destroy();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  test('body and head in one write, and bodies read as a stream', async () => {
    const s = await scripted((req, sock) => {
      const [a, b] = range(req);
      sock.write(Buffer.concat([Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${b - a}\r\n\r\n`), OBJECT.subarray(a, b)]));
    });
    servers.push(s.server);
    const h = new DirectGetHandler(innerStub());
    for (let i = 0; i < 3; i++) assert.ok((await readAll(h, s.port, 10 * i, 10 * i + 4096)).equals(OBJECT.subarray(10 * i, 10 * i + 4096)));
    const { response } = await h.handle(get(s.port, 5, 50_005));
    const parts: Buffer[] = [];
    for await (const c of response.body as AsyncIterable<Buffer>) parts.push(c);
    assert.ok(Buffer.concat(parts).equals(OBJECT.subarray(5, 50_005)));
    assert.equal(s.connections(), 1);
    h.destroy();
  });

  test('a kept-alive connection the store closed is replaced without an error; at most maxSockets connections', async () => {
    const s = await scripted((req, sock) => {
      answer(req, sock);
      // The store drops the connection once it is idle (keep-alive timeout).
      if (req.conn === 1) setTimeout(() => sock.destroy(), 30);
    });
    servers.push(s.server);
    const h = new DirectGetHandler(innerStub(), { maxSockets: 2 });
    await readAll(h, s.port, 0, 100);
    await new Promise((r) => setTimeout(r, 80));
    assert.ok((await readAll(h, s.port, 100, 200)).equals(OBJECT.subarray(100, 200)));
    assert.equal(s.connections(), 2);
    const before = s.connections();
    const all = await Promise.all(Array.from({ length: 6 }, (_, i) => readAll(h, s.port, i * 1000, i * 1000 + 50_000)));
    all.forEach((b, i) => assert.ok(b.equals(OBJECT.subarray(i * 1000, i * 1000 + 50_000))));
    assert.ok(s.connections() - before <= 2, `${s.connections() - before} new connections for 6 requests, maxSockets 2`);
    h.destroy();
  });

  test('a body cut short fails with the bytes received, never a short buffer', async () => {
    const s = await scripted((req, sock) => {
      const [a, b] = range(req);
      sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a}\r\n\r\n`);
      setImmediate(() => sock.end(OBJECT.subarray(a, a + 1000)));
    });
    servers.push(s.server);
    const h = new DirectGetHandler(innerStub());
    await assert.rejects(readAll(h, s.port, 0, 5000), (e: Error & { received?: number; code?: string }) => {
      assert.equal(e.received, 1000);
      assert.match(e.message, /1000 of 5000 body bytes/);
      return true;
    });
    h.destroy();
  });

  test('bytes beyond the announced body end the connection; the body itself stays exact', async () => {
    const s = await scripted((req, sock) => answer(req, sock, req.conn === 1 ? { extra: Buffer.from('garbage') } : {}));
    servers.push(s.server);
    const h = new DirectGetHandler(innerStub());
    // Body and garbage may come in one read: then the read fails (the store is not speaking HTTP).
    const out = await readAll(h, s.port, 0, 10_000).catch((e: Error) => e);
    if (out instanceof Error) assert.match(out.message, /beyond the announced body/);
    else assert.ok(out.equals(OBJECT.subarray(0, 10_000)));
    await new Promise((r) => setTimeout(r, 20));
    assert.ok((await readAll(h, s.port, 0, 10)).equals(OBJECT.subarray(0, 10)));
    assert.ok(s.connections() >= 2, 'the connection that carried the garbage was not reused');
    h.destroy();
  });

  test('an error status goes to the SDK handler (the same signed request); the direct answer is dropped', async () => {
    const s = await scripted((_req, sock) => sock.write('HTTP/1.1 412 Precondition Failed\r\nContent-Length: 5\r\n\r\nnope!'));
    servers.push(s.server);
    const inner = innerStub();
    const h = new DirectGetHandler(inner);
    const r = await h.handle(get(s.port, 0, 10));
    assert.equal(r.response.statusCode, 599);
    assert.equal(inner.seen.length, 1);
    assert.equal(inner.seen[0]!.headers.range, 'bytes=0-9');
    h.destroy();
  });

  test('through the S3 client: a body cut off mid-way is retried, then S3_SHORT_READ; too long is refused; 404 named', async () => {
    let mode: 'cut-once' | 'cut-always' | 'long' | 'missing' = 'cut-once';
    let gets = 0;
    const s = await scripted((req, sock) => {
      if (req.method === 'HEAD') {
        sock.write(`HTTP/1.1 200 OK\r\nContent-Length: ${OBJECT.length}\r\nETag: "e1"\r\n\r\n`);
        return;
      }
      gets++;
      const [a, b] = range(req);
      if (mode === 'missing') {
        const xml = '<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>';
        sock.write(`HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: ${xml.length}\r\n\r\n${xml}`);
      } else if (mode === 'long') {
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a + 1}\r\n\r\n`);
        sock.write(OBJECT.subarray(a, b + 1));
      } else if (mode === 'cut-always' || gets === 1) {
        sock.write(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${b - a}\r\n\r\n`);
        setImmediate(() => sock.destroy());
      } else answer(req, sock);
    });
    servers.push(s.server);
    const obj = await openThrough(s, 'bkt', 'k');
    const got = await obj.read(1000, 20_000);
    assert.ok(got.equals(OBJECT.subarray(1000, 21_000)));
    assert.equal(obj.stats.retries, 1);
    mode = 'cut-always';
    await assert.rejects(obj.read(0, 5000), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_SHORT_READ' && /0 of 5000 bytes at 0 arrived/.test(e.message));
    mode = 'long';
    await assert.rejects(obj.read(0, 5000), (e: unknown) => e instanceof ObjectStoreError && /answered 5001 bytes for the 5000 asked for/.test(e.message));
    mode = 'missing';
    gets = 0;
    await assert.rejects(obj.read(0, 5000), (e: unknown) => e instanceof ObjectStoreError && e.code === 'S3_NO_KEY');
    assert.ok(gets >= 2, 'the error answer was fetched again by the SDK handler');
  });

  test('through the S3 client: reads use one presigned GET with Range and If-Match unsigned; a refused one is done by the SDK\'s signed GET', async () => {
    let deny = false;
    const s = await scripted((req, sock) => {
      const presigned = req.target.includes('X-Amz-Signature=');
      if (deny && presigned) {
        const xml = '<?xml version="1.0"?><Error><Code>AccessDenied</Code><Message>expired</Message></Error>';
        sock.write(`HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: ${xml.length}\r\n\r\n${xml}`);
      } else answer(req, sock);
    });
    servers.push(s.server);
    const obj = await openThrough(s, 'bkt2', 'k2');
    const opened = s.requests.length;
    for (const [a, b] of [[0, 4096], [100_000, 180_000], [299_000, 300_000]] as const) assert.ok((await obj.read(a, b - a)).equals(OBJECT.subarray(a, b)));
    const reads = s.requests.slice(opened);
    assert.equal(reads.length, 3);
    for (const r of reads) {
      assert.match(r.target, /^\/bkt2\/k2\?.*X-Amz-Signature=/, 'a presigned GET of the object');
      assert.equal(r.headers.authorization, undefined);
      assert.equal(r.headers['if-match'], '"e1"');
    }
    assert.deepEqual(reads.map((r) => r.headers.range), ['bytes=0-4095', 'bytes=100000-179999', 'bytes=299000-299999']);
    assert.equal(new Set(reads.map((r) => r.target)).size, 1, 'signed once, reused');
    // Refused (an expired URL): the SDK signs that read itself, and it succeeds.
    deny = true;
    assert.ok((await obj.read(5000, 100)).equals(OBJECT.subarray(5000, 5100)));
    const [refused, signed] = s.requests.slice(opened + 3);
    assert.match(refused!.target, /X-Amz-Signature=/);
    assert.ok(signed!.headers.authorization?.startsWith('AWS4-HMAC-SHA256'), 'then a GET signed by the SDK');
    assert.equal(signed!.headers.range, 'bytes=5000-5099');
    assert.equal(obj.stats.requests, 1 + 3 + 2);
  });
});
