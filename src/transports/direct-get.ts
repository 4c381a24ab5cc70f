// The S3 client's request handler for ranged GETs whose body lands straight in the caller's buffer.
// Under Node's http client every body byte is read into a fresh 64 KiB buffer, copied by the HTTP
// parser into another fresh buffer, and copied once more by the reader: restoring from S3 spent
// ~4 CPU-s per GiB on that and on collecting the garbage (docs/performance.md), on a machine where
// the store and QEMU need the same cores. Here the socket reads (net's `onread`) go into the
// destination itself (over https too: the TLS layer decrypts into it). The SDK builds and signs
// every request (as a request through the client, or once as a presigned URL that fetch() is
// handed, transports/s3.ts); only the successful answer to a ranged GET with a Content-Length is
// read here. Everything else (other methods, an error status, a chunked body) goes to the SDK's own
// handler: a ranged GET answered with an error is sent again there as signed (GET is
// idempotent), so the SDK parses the error.

import { connect, isIP, type Socket } from 'node:net';
import { connect as tlsConnect, type ConnectionOptions } from 'node:tls';
import { Readable } from 'node:stream';

/** The SDK's HttpRequest, as much of it as is read here. */
export interface SdkHttpRequest {
  method: string;
  protocol: string;
  hostname: string;
  port?: number;
  path: string;
  query?: Record<string, string | (string | null)[] | null>;
  fragment?: string;
  username?: string;
  password?: string;
  headers: Record<string, string>;
  body?: unknown;
}

export interface SdkHttpResponse {
  statusCode: number;
  reason?: string;
  headers: Record<string, string>;
  body: unknown;
}

export interface SdkHandleOptions {
  abortSignal?: { aborted: boolean; addEventListener?: (t: 'abort', l: () => void, o?: { once?: boolean }) => void; removeEventListener?: (t: 'abort', l: () => void) => void; onabort?: unknown };
  requestTimeout?: number;
}

/** The SDK's HttpHandler interface (@smithy/types), structurally. */
export interface SdkHttpHandler {
  handle(request: SdkHttpRequest, options?: SdkHandleOptions): Promise<{ response: SdkHttpResponse }>;
  destroy?(): void;
  updateHttpClientConfig?(key: never, value: never): void;
  httpHandlerConfigs?(): object;
  metadata?: object;
}

export interface DirectGetOptions {
  /** ms to connect (default 5000). */
  connectionTimeout?: number;
  /** ms without a byte from the store before a request fails (default 120 000; the SDK's per-request value wins). */
  requestTimeout?: number;
  /** Idle keep-alive connections kept per endpoint (default 16). */
  maxIdle?: number;
  /** Connections per endpoint at most, as the SDK's agent (default 64); more requests wait for one. */
  maxSockets?: number;
  /** For https endpoints: tls.connect options (a CA, ...); the server's name is checked as always. */
  tls?: ConnectionOptions;
  /** ms an idle connection is kept (default 4000: below the usual server keep-alive timeouts). */
  idleMs?: number;
}

/** Bytes read per socket read while not reading a body (heads, a body's first bytes). */
const SCRATCH = 64 * 1024;
/** A response head larger than this is refused (S3's are well under 2 KiB). */
const MAX_HEAD = 64 * 1024;
/** At most this many bytes per socket read into a destination. */
const MAX_READ = 4 * 1024 * 1024;

function hexEscape(c: string): string {
  return `%${c.charCodeAt(0).toString(16).toUpperCase()}`;
}

/** RFC 3986 escapes (encodeURIComponent leaves !'()* alone), as S3 wants in a query and a path segment. */
export function escapeUri(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, hexEscape);
}

/** The query as the SDK's own handler writes it (@smithy buildQueryString): keys sorted, RFC 3986 escapes. */
export function queryString(query: SdkHttpRequest['query'] = {}): string {
  const parts: string[] = [];
  for (const k of Object.keys(query).sort()) {
    const v = query[k];
    const key = escapeUri(k);
    if (Array.isArray(v)) for (const x of v) parts.push(`${key}=${escapeUri(x ?? '')}`);
    else parts.push(v || typeof v === 'string' ? `${key}=${escapeUri(v)}` : key);
  }
  return parts.join('&');
}

function connectionError(message: string, code: string, extra: Record<string, unknown> = {}): Error {
  return Object.assign(new Error(message), { code, ...extra });
}

interface Head {
  status: number;
  reason: string;
  headers: Record<string, string>;
}

/** Status line and headers; undefined if they are not HTTP/1.x. Names lower case, repeats joined. */
export function parseHead(text: string): Head | undefined {
  const lines = text.split('\r\n');
  const m = /^HTTP\/1\.[01] (\d{3})(?: (.*))?$/.exec(lines[0]!);
  if (!m) return undefined;
  const headers: Record<string, string> = {};
  for (let i = 1; i < lines.length; i++) {
    const l = lines[i]!;
    const c = l.indexOf(':');
    if (c <= 0) return undefined;
    const name = l.slice(0, c).trim().toLowerCase();
    const value = l.slice(c + 1).trim();
    headers[name] = headers[name] !== undefined ? `${headers[name]}, ${value}` : value;
  }
  return { status: Number(m[1]), reason: m[2] ?? '', headers };
}

type Phase = 'connecting' | 'idle' | 'head' | 'held' | 'body' | 'dead';

/**
 * One keep-alive connection. Reads go to a scratch buffer while a head is read and into the
 * body's destination while a body is; after a head, reading stops until the body is asked for.
 */
class Connection {
  readonly sock: Socket;
  phase: Phase = 'connecting';
  private readonly scratch = Buffer.allocUnsafe(SCRATCH);
  private headParts: Buffer[] = [];
  private headBytes = 0;
  /** Body bytes that came with the head. */
  private early: Buffer = Buffer.alloc(0);
  private dest: Buffer | undefined;
  private at = 0;
  private bodyLength = 0;
  private keepAlive = true;
  private onHead: ((h: Head) => void) | undefined;
  private onBody: (() => void) | undefined;
  private onFail: ((e: Error) => void) | undefined;
  private failure: Error | undefined;
  private readonly secure: boolean;

  constructor(readonly origin: string, host: string, port: number, private readonly release: (c: Connection) => void, tls?: ConnectionOptions) {
    // An IPv6 endpoint's hostname comes in brackets (http://[::1]:7480).
    const bare = host.replace(/^\[(.*)\]$/, '$1');
    const onread = {
      buffer: () => this.nextBuffer(),
      callback: (n: number, buf: Uint8Array) => this.onRead(n, buf),
    };
    this.secure = tls !== undefined;
    this.sock = tls
      ? tlsConnect({ ...tls, host: bare, port, ...(isIP(bare) ? {} : { servername: bare }), onread } as ConnectionOptions)
      : connect({ host: bare, port, noDelay: true, onread });
    this.sock.on('error', (e) => this.fail(e));
    this.sock.on('close', () => this.fail(connectionError(this.closedText(), 'ECONNRESET')));
    this.sock.on('timeout', () => this.sock.destroy(Object.assign(connectionError(`no data from the store for ${this.sock.timeout} ms`, 'ETIMEDOUT'), { name: 'TimeoutError' })));
  }

  /** Body bytes received so far (while held: those that came with the head). */
  private get received(): number {
    return this.phase === 'held' ? this.early.length : this.at;
  }

  private closedText(): string {
    if (this.phase === 'body' || this.phase === 'held') return `the store closed the connection after ${this.received} of ${this.bodyLength} body bytes`;
    return `the store closed the connection before its answer${this.headBytes > 0 ? ' was complete' : ''}`;
  }

  /** Whether any byte of the current answer arrived (a stale keep-alive connection fails before). */
  get answered(): boolean {
    return this.headBytes > 0 || this.phase === 'held' || this.phase === 'body';
  }

  connected(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => this.sock.destroy(connectionError(`could not connect to ${this.origin} within ${timeoutMs} ms`, 'ETIMEDOUT')), timeoutMs);
      this.onFail = (e) => { clearTimeout(t); reject(e); };
      this.sock.once(this.secure ? 'secureConnect' : 'connect', () => {
        if (this.secure) this.sock.setNoDelay(true);
        clearTimeout(t);
        this.onFail = undefined;
        this.phase = 'idle';
        resolve();
      });
    });
  }

  /** Sends a request and waits for its head. */
  request(text: string, timeoutMs: number): Promise<Head> {
    if (this.phase !== 'idle') throw new Error(`internal: request on a connection in phase ${this.phase}`);
    this.phase = 'head';
    this.headParts = [];
    this.headBytes = 0;
    this.sock.ref();
    this.sock.setTimeout(timeoutMs);
    return new Promise<Head>((resolve, reject) => {
      this.onHead = resolve;
      this.onFail = reject;
      this.sock.write(text);
    });
  }

  /** Fills `into` (exactly the body's length) with the body; the connection goes back to the pool after. */
  readBody(into: Buffer): Promise<void> {
    if (this.phase !== 'held') return Promise.reject(this.failure ?? new Error(`internal: body read on a connection in phase ${this.phase}`));
    if (into.length !== this.bodyLength) return Promise.reject(new Error(`internal: a ${into.length}-byte buffer for a ${this.bodyLength}-byte body`));
    this.early.copy(into, 0);
    this.at = this.early.length;
    this.early = Buffer.alloc(0);
    this.dest = into;
    return new Promise<void>((resolve, reject) => {
      if (this.at === this.bodyLength) {
        this.finishBody();
        resolve();
        return;
      }
      this.onBody = resolve;
      this.onFail = reject;
      this.phase = 'body';
      this.sock.resume();
    });
  }

  /** The answer's body: no reading it (the connection cannot be reused). */
  discard(): void {
    if (this.phase !== 'idle' && this.phase !== 'dead') this.sock.destroy();
  }

  private nextBuffer(): Uint8Array {
    if (this.phase === 'body' && this.dest) return this.dest.subarray(this.at, Math.min(this.bodyLength, this.at + MAX_READ));
    return this.scratch;
  }

  /** net's onread callback: false stops reading. */
  private onRead(n: number, buf: Uint8Array): boolean {
    if (this.phase === 'body') return this.bodyBytes(n, buf);
    if (this.phase === 'head') return this.headData(Buffer.from(buf.buffer, buf.byteOffset, n));
    // Bytes while idle or while the body waits for its reader: the store sent more than it announced.
    this.sock.destroy(connectionError(`the store sent ${n} bytes ${this.phase === 'held' ? 'beyond the announced body' : 'without a request'}`, 'S3_PROTOCOL'));
    return false;
  }

  private headData(b: Buffer): boolean {
    this.headParts.push(Buffer.from(b));
    this.headBytes += b.length;
    const all = this.headParts.length === 1 ? this.headParts[0]! : Buffer.concat(this.headParts);
    this.headParts = [all];
    const end = all.indexOf('\r\n\r\n');
    if (end < 0) {
      if (this.headBytes > MAX_HEAD) this.sock.destroy(connectionError(`the store's answer has no end of head within ${MAX_HEAD} bytes`, 'S3_PROTOCOL'));
      return true;
    }
    const head = parseHead(all.subarray(0, end).toString('latin1'));
    if (!head) {
      this.sock.destroy(connectionError(`the store's answer is not HTTP/1.1: ${JSON.stringify(all.subarray(0, Math.min(end, 80)).toString('latin1'))}`, 'S3_PROTOCOL'));
      return false;
    }
    this.headParts = [];
    this.early = Buffer.from(all.subarray(end + 4));
    const cl = head.headers['content-length'];
    this.bodyLength = cl !== undefined && /^\d+$/.test(cl) ? Number(cl) : -1;
    this.keepAlive = !/\bclose\b/i.test(head.headers.connection ?? '');
    if (this.bodyLength >= 0 && this.early.length > this.bodyLength) {
      this.sock.destroy(connectionError(`the store sent ${this.early.length - this.bodyLength} bytes beyond the announced body`, 'S3_PROTOCOL'));
      return false;
    }
    this.phase = 'held';
    this.at = 0;
    const h = this.onHead;
    this.onHead = undefined;
    this.onFail = undefined;
    h?.(head);
    return false;
  }

  private bodyBytes(n: number, buf: Uint8Array): boolean {
    const dest = this.dest!;
    // The first read after the head went to the scratch buffer (it was chosen before the body was asked for).
    if (buf.buffer !== dest.buffer || buf.byteOffset !== dest.byteOffset + this.at) {
      if (n > this.bodyLength - this.at) {
        this.sock.destroy(connectionError(`the store sent ${n - (this.bodyLength - this.at)} bytes beyond the announced body`, 'S3_PROTOCOL'));
        return false;
      }
      dest.set(buf.subarray(0, n), this.at);
    }
    this.at += n;
    if (this.at < this.bodyLength) return true;
    const done = this.onBody;
    this.finishBody();
    done?.();
    return true;
  }

  private finishBody(): void {
    this.dest = undefined;
    this.onBody = undefined;
    this.onFail = undefined;
    if (!this.keepAlive) {
      this.phase = 'dead';
      this.sock.destroy();
      return;
    }
    this.phase = 'idle';
    // Reading stopped after the head; an idle connection reads on, to see the store close it.
    this.sock.resume();
    this.release(this);
  }

  /** Idle in the pool: any byte or a close ends it; it does not keep the process alive. */
  park(idleMs: number): void {
    this.sock.setTimeout(idleMs);
    this.sock.unref();
  }

  private fail(e: Error): void {
    if (this.phase === 'dead') return;
    const wasBody = this.phase === 'body' || this.phase === 'held';
    const err = wasBody && (e as { code?: string }).code === 'ECONNRESET' ? connectionError(this.closedText(), 'ECONNRESET') : e;
    Object.assign(err, { received: this.received });
    this.phase = 'dead';
    this.failure = err;
    if (!this.sock.destroyed) this.sock.destroy();
    const f = this.onFail;
    this.onFail = undefined;
    this.onHead = undefined;
    this.onBody = undefined;
    f?.(err);
  }
}

/**
 * A ranged GET's body read by the handler: `readInto` fills a buffer of exactly the body's length
 * (the Content-Length the SDK reports). Read as a stream instead (a consumer that does not know
 * about it), the whole body arrives as one chunk.
 */
export class DirectBody extends Readable {
  private state: 'new' | 'reading' | 'done' = 'new';

  constructor(private readonly conn: Connection, readonly length: number) {
    super();
  }

  /** Fills `into` with the body; rejects, with `received` bytes on the error, when it ends early. */
  readInto(into: Buffer): Promise<void> {
    if (this.state !== 'new') return Promise.reject(new Error('internal: the body was read already'));
    this.state = 'reading';
    // Once read, the connection may carry another request: this body must not touch it any more.
    return this.conn.readBody(into).finally(() => { this.state = 'done'; });
  }

  override _read(): void {
    if (this.state !== 'new') return;
    const all = Buffer.allocUnsafe(this.length);
    this.readInto(all).then(() => {
      this.push(all);
      this.push(null);
    }, (e: Error) => this.destroy(e));
  }

  override _destroy(err: Error | null, cb: (e: Error | null) => void): void {
    if (this.state !== 'done') this.conn.discard();
    cb(err);
  }
}

export function isDirectBody(b: unknown): b is DirectBody {
  return b instanceof DirectBody;
}

/**
 * Ranged GETs (http:// and https://) read here (DirectBody), all else passed to `inner` (the SDK's
 * NodeHttpHandler). Connections are kept alive per endpoint; https uses the system's CAs (and
 * NODE_EXTRA_CA_CERTS), as the SDK's handler does.
 */
export class DirectGetHandler implements SdkHttpHandler {
  readonly metadata = { handlerProtocol: 'http/1.1' };
  private readonly idle = new Map<string, Connection[]>();
  private readonly live = new Set<Connection>();
  private readonly perOrigin = new Map<string, number>();
  private readonly waiters = new Map<string, (() => void)[]>();
  private readonly maxSockets: number;
  private readonly tls: ConnectionOptions;
  private readonly connectionTimeout: number;
  private readonly requestTimeout: number;
  private readonly maxIdle: number;
  private readonly idleMs: number;
  private destroyed = false;

  /** `inner` undefined: only fetch() is used (GETs presigned without the SDK, transports/s3-signer.ts). */
  constructor(readonly inner: SdkHttpHandler | undefined, opts: DirectGetOptions = {}) {
    this.connectionTimeout = opts.connectionTimeout ?? 5000;
    this.requestTimeout = opts.requestTimeout ?? 120_000;
    this.maxIdle = opts.maxIdle ?? 16;
    this.maxSockets = Math.max(1, opts.maxSockets ?? 64);
    this.tls = opts.tls ?? {};
    this.idleMs = opts.idleMs ?? 4000;
  }

  /** Whether this request is read here. */
  static takes(req: SdkHttpRequest): boolean {
    return req.method === 'GET' && (req.protocol === 'http:' || req.protocol === 'https:') && req.body == null && !req.username && !req.password &&
      Object.keys(req.headers).some((h) => h.toLowerCase() === 'range');
  }

  async handle(req: SdkHttpRequest, opts: SdkHandleOptions = {}): Promise<{ response: SdkHttpResponse }> {
    const inner = this.inner;
    if (!inner) throw new Error('internal: a DirectGetHandler without the SDK\'s handler was given an SDK request');
    if (this.destroyed || !DirectGetHandler.takes(req)) return inner.handle(req, opts);
    const r = await this.fetch(req, opts);
    // Errors (and bodies without a length) are the SDK's to read: the same signed request there.
    return 'response' in r ? r : inner.handle(req, opts);
  }

  /**
   * A ranged GET read here: the answer with a DirectBody when it is a success with a length, else
   * just its status (the body dropped with the connection). For requests signed elsewhere too (a
   * presigned URL, transports/s3.ts).
   */
  async fetch(req: SdkHttpRequest, opts: SdkHandleOptions = {}): Promise<{ response: SdkHttpResponse & { body: DirectBody } } | { status: number }> {
    if (this.destroyed) throw Object.assign(new Error('the S3 client was closed'), { code: 'ECONNRESET' });
    const text = requestText(req);
    const signal = opts.abortSignal;
    if (signal?.aborted) throw Object.assign(new Error('Request aborted'), { name: 'AbortError' });
    const timeout = opts.requestTimeout ?? this.requestTimeout;
    const secure = req.protocol === 'https:';
    const port = req.port ?? (secure ? 443 : 80);
    const origin = `${req.protocol}//${req.hostname}:${port}`;
    for (let fresh = false; ; fresh = true) {
      const { c, reused } = await this.acquire(origin, req.hostname, port, secure, fresh);
      let head: Head;
      const abort = (): void => { c.sock.destroy(Object.assign(new Error('Request aborted'), { name: 'AbortError' })); };
      signal?.addEventListener?.('abort', abort, { once: true });
      try {
        head = await c.request(text, timeout);
      } catch (e) {
        // A kept-alive connection the store closed meanwhile fails before any byte: once more on a new one.
        if (reused && !c.answered && !signal?.aborted) continue;
        throw e;
      } finally {
        signal?.removeEventListener?.('abort', abort);
      }
      const ok = head.status >= 200 && head.status < 300 && head.headers['content-length'] !== undefined && head.headers['transfer-encoding'] === undefined;
      if (!ok) {
        c.discard();
        return { status: head.status };
      }
      const body = new DirectBody(c, Number(head.headers['content-length']));
      return { response: { statusCode: head.status, reason: head.reason, headers: head.headers, body } };
    }
  }

  /** An idle connection (unless `fresh`), else a new one, waiting while maxSockets are open. */
  private async acquire(origin: string, host: string, port: number, secure: boolean, fresh: boolean): Promise<{ c: Connection; reused: boolean }> {
    for (;;) {
      const idle = fresh ? undefined : this.idle.get(origin)?.pop();
      if (idle) return { c: idle, reused: true };
      if ((this.perOrigin.get(origin) ?? 0) < this.maxSockets) return { c: await this.open(origin, host, port, secure), reused: false };
      const list = this.waiters.get(origin) ?? [];
      this.waiters.set(origin, list);
      await new Promise<void>((r) => list.push(r));
      fresh = false;
    }
  }

  private wake(origin: string): void {
    this.waiters.get(origin)?.shift()?.();
  }

  private async open(origin: string, host: string, port: number, secure: boolean): Promise<Connection> {
    const c = new Connection(origin, host, port, (k) => this.park(k), secure ? this.tls : undefined);
    this.live.add(c);
    this.perOrigin.set(origin, (this.perOrigin.get(origin) ?? 0) + 1);
    c.sock.once('close', () => {
      this.live.delete(c);
      this.perOrigin.set(origin, this.perOrigin.get(origin)! - 1);
      const list = this.idle.get(origin);
      const i = list?.indexOf(c) ?? -1;
      if (i >= 0) list!.splice(i, 1);
      this.wake(origin);
    });
    await c.connected(this.connectionTimeout);
    return c;
  }

  private park(c: Connection): void {
    const list = this.idle.get(c.origin) ?? [];
    if (this.destroyed || list.length >= this.maxIdle) {
      c.sock.destroy();
      return;
    }
    c.park(this.idleMs);
    list.push(c);
    this.idle.set(c.origin, list);
    this.wake(c.origin);
  }

  destroy(): void {
    this.destroyed = true;
    for (const c of this.live) c.sock.destroy();
    this.live.clear();
    this.idle.clear();
    this.inner?.destroy?.();
  }

  updateHttpClientConfig(key: never, value: never): void {
    this.inner?.updateHttpClientConfig?.(key, value);
  }

  httpHandlerConfigs(): object {
    return this.inner?.httpHandlerConfigs?.() ?? {};
  }
}

/** The request's head as the SDK built and signed it. */
export function requestText(req: SdkHttpRequest): string {
  const q = queryString(req.query);
  const target = `${req.path}${q ? `?${q}` : ''}${req.fragment ? `#${req.fragment}` : ''}`;
  // A CR or LF would let a header value start another header or request.
  const clean = (s: string): string => {
    if (/[\r\n]/.test(s)) throw new Error(`internal: ${JSON.stringify(s)} in a request line or header holds CR or LF`);
    return s;
  };
  let text = `${clean(req.method)} ${clean(target)} HTTP/1.1\r\n`;
  let host = false;
  for (const [k, v] of Object.entries(req.headers)) {
    if (k.toLowerCase() === 'host') host = true;
    text += `${clean(k)}: ${clean(String(v))}\r\n`;
  }
  if (!host) text += `host: ${clean(req.hostname)}${req.port ? `:${req.port}` : ''}\r\n`;
  return `${text}\r\n`;
}
