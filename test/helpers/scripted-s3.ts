// A scripted S3 store on loopback for unit tests that go through the real S3 client: just enough
// of the API for a multipart upload and ranged reads, with answers it can hold, refuse or lose.

import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';

export type Op = 'head-bucket' | 'head-object' | 'get' | 'create' | 'part' | 'complete' | 'abort-upload' | 'other';

interface Held { op: Op; release: () => void }

/**
 * A single-bucket S3 store that speaks just enough for a multipart upload and ranged reads. `hold`
 * keeps the answers to one kind of request until the test releases them; `completeFails` makes
 * CompleteMultipartUpload answer 400 InvalidPart (not retried by the SDK); `loseCompleteAnswers`
 * makes the next N CompleteMultipartUploads lose their answer (the connection is dropped), after
 * committing the object when `commitBeforeLosing` (then `afterCommit` runs, as another writer
 * could). Objects keep the user metadata (x-amz-meta-*) given at CreateMultipartUpload in `meta`;
 * HEAD returns it.
 */
export async function scriptedStore(bucket: string) {
  const objects = new Map<string, Buffer>();
  const meta = new Map<string, Record<string, string>>();
  const uploads = new Map<string, { key: string; parts: Map<number, Buffer>; meta: Record<string, string> }>();
  const ops: Op[] = [];
  const state = {
    hold: undefined as Op | undefined,
    completeFails: false,
    loseCompleteAnswers: 0,
    commitBeforeLosing: true,
    afterCommit: undefined as ((key: string) => void) | undefined,
    /** GETs presigned (X-Amz-Signature in the query) are answered 403 SignatureDoesNotMatch. */
    refusePresigned: false,
    /** GETs are answered 200 with the whole object, Range or not (as some stores and proxies do). */
    ignoreRange: false,
  };
  /** Every request's method, target and headers, in order. */
  const requests: { method: string; url: string; headers: IncomingMessage['headers'] }[] = [];
  const held: Held[] = [];
  let heldWaiter: (() => void) | undefined;
  let nextUpload = 1;

  const xml = (res: ServerResponse, status: number, body: string): void => {
    res.writeHead(status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  };
  const error = (res: ServerResponse, status: number, code: string): void => xml(res, status, `<?xml version="1.0"?><Error><Code>${code}</Code><Message>${code}</Message></Error>`);

  const handle = (req: IncomingMessage, res: ServerResponse, body: Buffer, op: Op, key: string, q: URLSearchParams): void => {
    const obj = objects.get(key);
    switch (op) {
      case 'head-bucket':
        res.writeHead(200).end();
        return;
      case 'head-object':
        if (!obj) { res.writeHead(404).end(); return; }
        res.writeHead(200, { 'content-length': obj.length, etag: '"o1"', ...Object.fromEntries(Object.entries(meta.get(key) ?? {}).map(([k, v]) => [`x-amz-meta-${k}`, v])) }).end();
        return;
      case 'get': {
        if (state.refusePresigned && q.has('X-Amz-Signature')) { error(res, 403, 'SignatureDoesNotMatch'); return; }
        if (!obj) { error(res, 404, 'NoSuchKey'); return; }
        const m = state.ignoreRange ? null : /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
        const a = m ? Number(m[1]) : 0;
        const b = m ? Math.min(Number(m[2]) + 1, obj.length) : obj.length;
        res.writeHead(m ? 206 : 200, { 'content-length': b - a, etag: '"o1"', ...(m ? { 'content-range': `bytes ${a}-${b - 1}/${obj.length}` } : {}) });
        res.end(obj.subarray(a, b));
        return;
      }
      case 'create': {
        const id = `up${nextUpload++}`;
        const given = Object.entries(req.headers).filter(([h]) => h.startsWith('x-amz-meta-')).map(([h, v]) => [h.slice('x-amz-meta-'.length), String(v)]);
        uploads.set(id, { key, parts: new Map(), meta: Object.fromEntries(given) });
        xml(res, 200, `<?xml version="1.0"?><InitiateMultipartUploadResult><Bucket>${bucket}</Bucket><Key>${key}</Key><UploadId>${id}</UploadId></InitiateMultipartUploadResult>`);
        return;
      }
      case 'part': {
        const up = uploads.get(q.get('uploadId')!);
        if (!up) { error(res, 404, 'NoSuchUpload'); return; }
        up.parts.set(Number(q.get('partNumber')), body);
        res.writeHead(200, { etag: `"p${q.get('partNumber')}"` }).end();
        return;
      }
      case 'complete': {
        const id = q.get('uploadId')!;
        const up = uploads.get(id);
        if (!up) { error(res, 404, 'NoSuchUpload'); return; }
        if (state.completeFails) { error(res, 400, 'InvalidPart'); return; }
        const lose = state.loseCompleteAnswers > 0;
        if (lose) state.loseCompleteAnswers--;
        if (!lose || state.commitBeforeLosing) {
          objects.set(up.key, Buffer.concat([...up.parts.entries()].sort((x, y) => x[0] - y[0]).map(([, p]) => p)));
          meta.set(up.key, up.meta);
          uploads.delete(id);
          state.afterCommit?.(up.key);
        }
        if (lose) { req.socket.destroy(); return; }
        xml(res, 200, `<?xml version="1.0"?><CompleteMultipartUploadResult><Bucket>${bucket}</Bucket><Key>${key}</Key><ETag>"o1"</ETag></CompleteMultipartUploadResult>`);
        return;
      }
      case 'abort-upload':
        uploads.delete(q.get('uploadId')!);
        res.writeHead(204).end();
        return;
      default:
        error(res, 400, 'NotImplemented');
    }
  };

  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const url = new URL(req.url!, 'http://store');
      const path = decodeURIComponent(url.pathname).replace(/^\//, '').replace(/\/$/, '');
      const key = path.startsWith(`${bucket}/`) ? path.slice(bucket.length + 1) : '';
      const q = url.searchParams;
      const op: Op = path === bucket && req.method === 'HEAD' ? 'head-bucket'
        : req.method === 'HEAD' ? 'head-object'
        : req.method === 'GET' ? 'get'
        : req.method === 'POST' && q.has('uploads') ? 'create'
        : req.method === 'PUT' && q.has('partNumber') ? 'part'
        : req.method === 'POST' && q.has('uploadId') ? 'complete'
        : req.method === 'DELETE' && q.has('uploadId') ? 'abort-upload'
        : 'other';
      ops.push(op);
      requests.push({ method: req.method!, url: req.url!, headers: req.headers });
      const answer = (): void => handle(req, res, Buffer.concat(chunks), op, key, q);
      if (state.hold === op) {
        held.push({ op, release: answer });
        heldWaiter?.();
      } else answer();
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    server,
    endpoint: `http://127.0.0.1:${port}`,
    objects,
    meta,
    uploads,
    ops,
    requests,
    state,
    /** Resolves once a held request arrived. */
    async heldRequest(): Promise<void> {
      while (held.length === 0) await new Promise<void>((r) => { heldWaiter = r; });
      heldWaiter = undefined;
    },
    /** Answers every held request, and holds nothing more. */
    release(): void {
      state.hold = undefined;
      for (const h of held.splice(0)) h.release();
    },
  };
}

export type ScriptedStore = Awaited<ReturnType<typeof scriptedStore>>;
