// S3 client plumbing: s3://bucket/key URLs, the client's settings (flags over the standard AWS
// chain), errors named by what went wrong, ranged reads with retries, and a multipart upload that
// either completes or is aborted (docs/s3.md).

import { randomBytes } from 'node:crypto';
import { Agent as HttpAgent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';
import { isIP } from 'node:net';
import type { S3Client, S3ClientConfig } from '@aws-sdk/client-s3';
import { ObjectStoreError, type ObjectStoreErrorCode } from '../codec/errors.js';
import { DirectGetHandler, isDirectBody, type DirectBody, type SdkHttpHandler } from './direct-get.js';
import { GetSigner, signedGetTarget, type ObjectUrl } from './s3-signer.js';

export { ObjectStoreError, type ObjectStoreErrorCode, type ObjectUrl };

export function isObjectUrl(s: string): boolean {
  return /^s3:\/\//i.test(s);
}

export function parseObjectUrl(s: string): ObjectUrl {
  const m = /^s3:\/\/([^/]+)\/(.+)$/i.exec(s);
  if (!m) throw new ObjectStoreError('S3_BAD_URL', `${s} is not an object URL (expected s3://BUCKET/KEY)`);
  const bucket = m[1]!;
  // Bucket names per S3's rules (lower case, digits, dots, hyphens; 3..63); a typo fails here, not as a 403.
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw new ObjectStoreError('S3_BAD_URL', `${s}: "${bucket}" is not a valid bucket name`);
  return { bucket, key: m[2]! };
}

export function formatObjectUrl(u: ObjectUrl): string {
  return `s3://${u.bucket}/${u.key}`;
}

/** What the flags say; anything unset comes from the environment and the AWS config files. */
export interface S3Settings {
  /** --s3-endpoint; else AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL; else AWS's own endpoint. */
  endpoint?: string;
  /** --s3-region; else AWS_REGION, AWS_DEFAULT_REGION, the profile's region; us-east-1 for a custom endpoint. */
  region?: string;
  /** --s3-path-style; automatic when the endpoint's host is an IP address or localhost. */
  pathStyle?: boolean;
  /** Parts of a multipart upload in flight (default 4). */
  uploadConcurrency?: number;
  /** Bytes per part (default 16 MiB; S3's minimum is 5 MiB). */
  partSize?: number;
  /** Ranged GETs in flight per reader (default 8). */
  readConcurrency?: number;
}

export const DEFAULT_PART_SIZE = 16 * 1024 * 1024;
export const MIN_PART_SIZE = 5 * 1024 * 1024;
/** S3 allows at most 10 000 parts; larger objects get larger parts. */
const MAX_PARTS = 10_000;

export function resolvedEndpoint(s: S3Settings, env: NodeJS.ProcessEnv = process.env): string | undefined {
  return s.endpoint ?? env.AWS_ENDPOINT_URL_S3 ?? env.AWS_ENDPOINT_URL ?? undefined;
}

/** Path-style addressing for IP and localhost endpoints (no DNS name per bucket there). */
export function wantsPathStyle(endpoint: string | undefined, flag?: boolean): boolean {
  if (flag !== undefined) return flag;
  if (!endpoint) return false;
  let host: string;
  try {
    host = new URL(endpoint).hostname.replace(/^\[|\]$/g, '');
  } catch {
    throw new ObjectStoreError('S3_BAD_URL', `endpoint ${endpoint} is not a URL (expected http(s)://HOST[:PORT])`);
  }
  return isIP(host) !== 0 || host === 'localhost' || host.endsWith('.localhost');
}

type Sdk = typeof import('@aws-sdk/client-s3');
let sdkLoading: Promise<Sdk> | undefined;
let sdk: Sdk | undefined;

/**
 * The AWS SDK, loaded on first use: importing it costs every process ~0.3 s of CPU and ~20 MiB,
 * which commands that never touch s3:// should not pay. A client exists only after it loaded.
 */
async function loadSdk(): Promise<Sdk> {
  sdkLoading ??= import('@aws-sdk/client-s3').then((m) => (sdk = m));
  return sdkLoading;
}

/** The SDK where a client already exists (so it is loaded). */
function loaded(): Sdk {
  if (!sdk) throw new Error('internal: the AWS SDK is used before any S3 client was made');
  return sdk;
}

/**
 * Reads go to one presigned GET of the object (signed by the SDK's presigner, sent with an unsigned
 * Range and If-Match): the SDK's middleware and signing cost ~2.5 ms of CPU per request, a third
 * of the client's CPU for 8 MiB GETs (docs/performance.md). Made again after PRESIGN_REFRESH_MS,
 * well before it expires; any answer but a success goes to the SDK's own GET, which names errors.
 */
const PRESIGN_EXPIRES_S = 15 * 60;
const PRESIGN_REFRESH_MS = 5 * 60_000;
type Presigner = typeof import('@aws-sdk/s3-request-presigner');
let presignerLoading: Promise<Presigner> | undefined;

const clients = new Map<string, S3Client>();
const accesses = new Map<string, StoreAccess>();

/** Endpoint, region and addressing as the client gets them (flags over the environment), and their key. */
function resolvedSettings(s: S3Settings): { endpoint: string | undefined; region: string | undefined; pathStyle: boolean; id: string } {
  const endpoint = resolvedEndpoint(s);
  const region = s.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? (endpoint ? 'us-east-1' : undefined);
  const pathStyle = wantsPathStyle(endpoint, s.pathStyle);
  return { endpoint, region, pathStyle, id: JSON.stringify([endpoint, region, pathStyle]) };
}

/** One client per settings (it holds the keep-alive connection pool). */
export async function s3Client(s: S3Settings = {}): Promise<S3Client> {
  const { S3Client } = await loadSdk();
  const { endpoint, region, pathStyle, id } = resolvedSettings(s);
  let c = clients.get(id);
  if (c) return c;
  const agentOpts = { keepAlive: true, maxSockets: 64 };
  const cfg: S3ClientConfig = {
    ...(endpoint ? { endpoint } : {}),
    ...(region ? { region } : {}),
    forcePathStyle: pathStyle,
    // Checksums only where S3 requires them: the flexible-checksum defaults of newer SDKs send
    // headers some S3-compatible stores (Ceph before Squid, older MinIO) refuse.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    maxAttempts: 3,
    requestHandler: { connectionTimeout: 5000, requestTimeout: 120_000, throwOnRequestTimeout: true, httpAgent: new HttpAgent(agentOpts), httpsAgent: new HttpsAgent(agentOpts) },
  };
  c = new S3Client(cfg);
  // Ranged GETs' bodies are read into the reader's buffer (transports/direct-get.ts); the SDK's
  // own handler, made from the settings above, does everything else. MULTIFD_S3_DIRECT_GET=0: all
  // through the SDK's handler.
  if (process.env.MULTIFD_S3_DIRECT_GET !== '0') {
    const resolved = c.config as unknown as { requestHandler: SdkHttpHandler };
    resolved.requestHandler = new DirectGetHandler(resolved.requestHandler, { connectionTimeout: 5000, requestTimeout: 120_000 });
  }
  clients.set(id, c);
  return c;
}

/**
 * A store as reads reach it: the SDK's client, made on first need (loading the SDK then), and,
 * where the settings and environment allow (transports/s3-signer.ts), GETs signed and read
 * without it, so that opening and reading an object never loads the SDK unless something fails.
 */
export class StoreAccess {
  private made: Promise<S3Client> | undefined;

  private constructor(private readonly settings: S3Settings, existing: S3Client | undefined, readonly signer: GetSigner | undefined, readonly direct: DirectGetHandler | undefined) {
    if (existing) this.made = Promise.resolve(existing);
  }

  /** Reads through a client that exists already (and its DirectGetHandler, if it has one). */
  static of(client: S3Client): StoreAccess {
    return new StoreAccess({}, client, undefined, directHandler(client));
  }

  /** One per settings, as clients are. MULTIFD_S3_DIRECT_GET=0: everything through the SDK's client. */
  static for(s: S3Settings = {}): StoreAccess {
    const r = resolvedSettings(s);
    let a = accesses.get(r.id);
    if (a) return a;
    const target = process.env.MULTIFD_S3_DIRECT_GET === '0' ? undefined : signedGetTarget(r);
    a = target
      ? new StoreAccess(s, undefined, new GetSigner(target), new DirectGetHandler(undefined, { connectionTimeout: 5000, requestTimeout: 120_000 }))
      : new StoreAccess(s, undefined, undefined, undefined);
    accesses.set(r.id, a);
    return a;
  }

  client(): Promise<S3Client> {
    return (this.made ??= s3Client(this.settings));
  }

  /** The handler presigned GETs go to: our own, else the client's (which exists once client() resolved). */
  async handler(): Promise<DirectGetHandler | undefined> {
    return this.direct ?? directHandler(await this.client());
  }

  destroy(): void {
    this.direct?.destroy();
  }
}

/** Closes the clients' connection pools (so a CLI run can exit at once). */
export function closeS3Clients(): void {
  for (const c of clients.values()) c.destroy();
  clients.clear();
  for (const a of accesses.values()) a.destroy();
  accesses.clear();
}

interface AwsLikeError {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  $fault?: string;
  Code?: string;
}

/** An SDK error as an ObjectStoreError; `missing` says which 404 it is (HEAD errors have no body). */
export function storeError(e: unknown, what: string, missing: 'key' | 'bucket' = 'key'): ObjectStoreError {
  if (e instanceof ObjectStoreError) return e;
  const err = (e ?? {}) as AwsLikeError;
  const name = err.name ?? err.Code ?? '';
  const status = err.$metadata?.httpStatusCode;
  const msg = err.message ?? String(e);
  const code = err.code ?? '';
  if (name === 'CredentialsProviderError' || /Could not load credentials|credential/i.test(name)) {
    return new ObjectStoreError('S3_NO_CREDENTIALS', `${what}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE): ${msg}`, { cause: e });
  }
  if (/Region is missing/i.test(msg)) {
    return new ObjectStoreError('S3_NO_REGION', `${what}: no S3 region (set --s3-region or AWS_REGION, or --s3-endpoint for a store other than AWS)`, { cause: e });
  }
  if (name === 'NoSuchBucket' || (missing === 'bucket' && status === 404)) {
    return new ObjectStoreError('S3_NO_BUCKET', `${what}: the bucket does not exist`, { cause: e });
  }
  if (name === 'NoSuchKey' || name === 'NotFound' || status === 404) {
    return new ObjectStoreError('S3_NO_KEY', `${what}: no such object`, { cause: e });
  }
  if (status === 403 || ['AccessDenied', 'InvalidAccessKeyId', 'SignatureDoesNotMatch', 'Forbidden', 'InvalidToken', 'ExpiredToken'].includes(name)) {
    return new ObjectStoreError('S3_ACCESS_DENIED', `${what}: access denied (${name || status}; check the credentials and the bucket's policy)`, { cause: e });
  }
  if (['ECONNREFUSED', 'ECONNRESET', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'EPIPE', 'EAI_AGAIN'].includes(code) || name === 'TimeoutError' || /ECONNREFUSED|socket hang up|ECONNRESET/.test(msg)) {
    return new ObjectStoreError('S3_UNREACHABLE', `${what}: the S3 endpoint is unreachable (${code || name || msg})`, { cause: e });
  }
  return new ObjectStoreError('S3_ERROR', `${what}: ${name ? `${name}: ` : ''}${msg}${status ? ` (HTTP ${status})` : ''}`, { cause: e });
}

/** A 404 from HEAD object is either case: HEAD bucket tells which. */
async function missingWhat(client: S3Client, bucket: string): Promise<'key' | 'bucket'> {
  try {
    await client.send(new (loaded().HeadBucketCommand)({ Bucket: bucket }));
    return 'key';
  } catch (e) {
    return (e as AwsLikeError).$metadata?.httpStatusCode === 404 ? 'bucket' : 'key';
  }
}

/** Fails with a named error unless the bucket exists and we may use it. */
export async function checkBucket(client: S3Client, url: ObjectUrl): Promise<void> {
  try {
    await client.send(new (loaded().HeadBucketCommand)({ Bucket: url.bucket }));
  } catch (e) {
    throw storeError(e, `bucket ${url.bucket}`, 'bucket');
  }
}

/** Object size, or undefined when there is no object under the key. */
export async function objectSize(client: S3Client, url: ObjectUrl): Promise<number | undefined> {
  try {
    const h = await client.send(new (loaded().HeadObjectCommand)({ Bucket: url.bucket, Key: url.key }));
    return h.ContentLength ?? 0;
  } catch (e) {
    const err = storeError(e, formatObjectUrl(url));
    if (err.code === 'S3_NO_KEY' && (await missingWhat(client, url.bucket)) === 'key') return undefined;
    if (err.code === 'S3_NO_KEY') throw new ObjectStoreError('S3_NO_BUCKET', `${formatObjectUrl(url)}: the bucket ${url.bucket} does not exist`, { cause: e });
    throw err;
  }
}

export interface TransferStats {
  requests: number;
  retries: number;
  bytes: number;
}

/** Failures worth another try: the store is restarting, a connection dropped, a 5xx. */
function retryable(e: ObjectStoreError): boolean {
  if (e.code === 'S3_UNREACHABLE' || e.code === 'S3_SHORT_READ') return true;
  const status = (e.cause as AwsLikeError | undefined)?.$metadata?.httpStatusCode;
  return e.code === 'S3_ERROR' && (status === undefined || status >= 500);
}

/** The smallest first GET of an open. */
const MIN_OPEN_READ = 4096;

/** An error of opening an object, named; a 404 that does not say which is told by HEAD bucket. */
async function openError(client: S3Client, url: ObjectUrl, e: unknown): Promise<ObjectStoreError> {
  const err = storeError(e, formatObjectUrl(url));
  const noBucket = err.code === 'S3_NO_BUCKET' || (err.code === 'S3_NO_KEY' && (e as AwsLikeError).name !== 'NoSuchKey' && (await missingWhat(client, url.bucket)) === 'bucket');
  return noBucket ? new ObjectStoreError('S3_NO_BUCKET', `${formatObjectUrl(url)}: the bucket ${url.bucket} does not exist`, { cause: e }) : err;
}

/** A Content-Range header's `bytes FIRST-LAST/TOTAL` (RFC 9110 §14.4); undefined when it is not one. */
export function parseContentRange(value: string | undefined): { first: number; last: number; total: number | undefined } | undefined {
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/i.exec(value?.trim() ?? '');
  if (!m) return undefined;
  const first = Number(m[1]);
  const last = Number(m[2]);
  const total = m[3] === '*' ? undefined : Number(m[3]);
  if (!Number.isSafeInteger(last) || last < first || (total !== undefined && (!Number.isSafeInteger(total) || last >= total))) return undefined;
  return { first, last, total };
}

interface GetAnswer {
  Body?: unknown;
  ContentRange?: string;
  ContentLength?: number;
  $metadata: { httpStatusCode?: number };
}

/**
 * The object's size and its first bytes from the answer to GET `bytes=0-(want-1)`: 206 with a
 * Content-Range (the whole object when it is smaller), or 200 with the whole object from a store
 * that ignores Range (its first `want` bytes are kept, the rest is not read).
 */
export async function firstBytes(res: GetAnswer, want: number, name: string): Promise<{ size: number; head: Buffer }> {
  const status = res.$metadata.httpStatusCode;
  let size: number;
  let length: number;
  if (status === 200 && res.ContentRange === undefined) {
    if (res.ContentLength === undefined) throw new ObjectStoreError('S3_ERROR', `${name}: the store answered a ranged GET with neither Content-Range nor Content-Length`);
    size = res.ContentLength;
    length = Math.min(size, want);
  } else {
    const r = parseContentRange(res.ContentRange);
    if (!r || r.first !== 0 || r.total === undefined) throw new ObjectStoreError('S3_ERROR', `${name}: the store answered GET bytes=0-${want - 1} with Content-Range "${res.ContentRange ?? ''}" (HTTP ${status})`);
    if (r.last + 1 !== Math.min(r.total, want)) throw new ObjectStoreError('S3_ERROR', `${name}: the store answered GET bytes=0-${want - 1} of a ${r.total}-byte object with bytes 0-${r.last}`);
    size = r.total;
    length = r.last + 1;
  }
  const head = Buffer.allocUnsafe(length);
  let at = 0;
  for await (const chunk of (res.Body ?? []) as AsyncIterable<Buffer>) {
    const n = Math.min(chunk.length, length - at);
    if (n < chunk.length && status !== 200) throw new ObjectStoreError('S3_ERROR', `${name}: the store sent more than the ${length} bytes asked for`);
    chunk.copy(head, at, 0, n);
    at += n;
    if (at === length && status === 200) break; // the rest of a whole object is not wanted
  }
  if (at !== length) throw new ObjectStoreError('S3_SHORT_READ', `${name}: ${at} of ${length} bytes at 0 arrived`);
  return { size, head };
}

/**
 * An object read by range: `read` fills `into` with exactly `length` bytes from `position`, one
 * GET, retried (on a fresh connection) when a connection drops or the store answers 5xx; the SDK's
 * own retries cover the request, ours also the body, which the SDK does not retry.
 */
export class RangedObject {
  readonly stats: TransferStats = { requests: 0, retries: 0, bytes: 0 };
  private head: Buffer | undefined;
  private presigned: { url: URL; at: number } | undefined;
  private presigning: Promise<URL> | undefined;
  /** The presigner failed once (no credentials to sign with?): the SDK's GET from then on. */
  private presignFailed = false;

  private constructor(private readonly access: StoreAccess, readonly url: ObjectUrl, readonly size: number, readonly etag: string | undefined, private readonly attempts: number) {}

  /**
   * Opens the object with one ranged GET of its first `firstBytes` (default 64 KiB): the answer's
   * Content-Range carries the object's size and the ETag comes with it, so no HEAD is needed, and
   * the bytes are kept for takeHead(). A missing key, a missing bucket, 403 and an unreachable
   * endpoint fail here, named. The body is retried like read()'s; the request itself only by the SDK
   * (an unreachable endpoint is named at once, as a HEAD did). Where the store's access signs GETs
   * itself, that GET goes first, without the SDK; anything but a plain success is then asked again
   * through the client, which names it.
   */
  static async open(store: StoreAccess | S3Client, url: ObjectUrl, opts: { attempts?: number; firstBytes?: number } = {}): Promise<RangedObject> {
    const access = store instanceof StoreAccess ? store : StoreAccess.of(store);
    const attempts = opts.attempts ?? 4;
    const want = Math.max(MIN_OPEN_READ, opts.firstBytes ?? 64 * 1024);
    const stats: TransferStats = { requests: 0, retries: 0, bytes: 0 };
    const signed = await RangedObject.openSigned(access, url, want, attempts, stats);
    if (signed) return signed;
    const client = await access.client();
    for (let attempt = 1; ; attempt++) {
      let res;
      try {
        stats.requests++;
        res = await client.send(new (loaded().GetObjectCommand)({ Bucket: url.bucket, Key: url.key, Range: `bytes=0-${want - 1}` }));
      } catch (e) {
        // 416: the object has no byte 0 (it is empty); a HEAD tells its size and ETag.
        if ((e as AwsLikeError).$metadata?.httpStatusCode === 416) return RangedObject.openByHead(access, client, url, attempts, stats);
        throw await openError(client, url, e);
      }
      try {
        const { size, head } = await firstBytes(res, want, formatObjectUrl(url));
        stats.bytes += head.length;
        const obj = new RangedObject(access, url, size, res.ETag, attempts);
        Object.assign(obj.stats, stats);
        obj.head = head;
        return obj;
      } catch (e) {
        const err = storeError(e, `${formatObjectUrl(url)} bytes 0..${want - 1}`);
        if (!retryable(err) || attempt >= attempts) throw err;
        stats.retries++;
        await new Promise((r) => setTimeout(r, 100 * 2 ** attempt));
      }
    }
  }

  /**
   * The first GET presigned here and read without the SDK: the object when the store answered 206
   * with exactly the range asked for, else undefined (an error answer, a failed connection, a
   * store that ignores Range, a body cut short), and the client's open does it again and names it.
   */
  private static async openSigned(access: StoreAccess, url: ObjectUrl, want: number, attempts: number, stats: TransferStats): Promise<RangedObject | undefined> {
    if (!access.signer || !access.direct) return undefined;
    let target: URL | undefined;
    try {
      target = await access.signer.presign(url, PRESIGN_EXPIRES_S);
    } catch {
      return undefined;
    }
    if (!target) return undefined;
    const at = Date.now();
    let r;
    try {
      stats.requests++;
      r = await access.direct.fetch(presignedRequest(target, 0, want));
    } catch {
      return undefined;
    }
    if (!('response' in r)) return undefined;
    const { statusCode, headers, body } = r.response;
    const range = parseContentRange(headers['content-range']);
    if (statusCode !== 206 || !range || range.first !== 0 || range.total === undefined || range.last + 1 !== Math.min(range.total, want) || body.length !== range.last + 1) {
      body.destroy();
      return undefined;
    }
    const head = Buffer.allocUnsafe(body.length);
    try {
      await body.readInto(head);
    } catch {
      return undefined;
    }
    stats.bytes += head.length;
    const obj = new RangedObject(access, url, range.total, headers.etag, attempts);
    Object.assign(obj.stats, stats);
    obj.head = head;
    obj.presigned = { url: target, at };
    return obj;
  }

  private static async openByHead(access: StoreAccess, client: S3Client, url: ObjectUrl, attempts: number, stats: TransferStats): Promise<RangedObject> {
    let head;
    try {
      stats.requests++;
      head = await client.send(new (loaded().HeadObjectCommand)({ Bucket: url.bucket, Key: url.key }));
    } catch (e) {
      throw await openError(client, url, e);
    }
    const obj = new RangedObject(access, url, head.ContentLength ?? 0, head.ETag, attempts);
    Object.assign(obj.stats, stats);
    return obj;
  }

  /** Bytes from 0 that came with open() (at most its `firstBytes`), handed out once. */
  takeHead(): Buffer | undefined {
    const h = this.head;
    this.head = undefined;
    return h;
  }

  get name(): string {
    return formatObjectUrl(this.url);
  }

  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    if (position < 0 || length < 0 || position + length > this.size) {
      throw new ObjectStoreError('S3_SHORT_READ', `${this.name}: range [${position}, +${length}) is beyond the object's ${this.size} bytes`);
    }
    const out = into ?? Buffer.allocUnsafe(length);
    if (length === 0) return out;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.readOnce(position, length, out);
        this.stats.bytes += length;
        return out;
      } catch (e) {
        const err = storeError(e, `${this.name} bytes ${position}..${position + length - 1}`);
        if (!retryable(err) || attempt >= this.attempts) throw err;
        this.stats.retries++;
        await new Promise((r) => setTimeout(r, 100 * 2 ** attempt));
      }
    }
  }

  /** The object's GET, presigned (shared by concurrent reads; made again once PRESIGN_REFRESH_MS old). */
  private presignedGet(): Promise<URL> {
    const p = this.presigned;
    if (p && Date.now() - p.at < PRESIGN_REFRESH_MS) return Promise.resolve(p.url);
    this.presigning ??= (async () => {
      const url = (await this.access.signer?.presign(this.url, PRESIGN_EXPIRES_S)) ?? (await sdkPresignedGet(await this.access.client(), this.url));
      this.presigned = { url, at: Date.now() };
      return url;
    })().finally(() => { this.presigning = undefined; });
    return this.presigning;
  }

  /**
   * readOnce through the presigned GET: true when `out` is filled; false when the SDK's own GET is
   * to do it (an error answer or a failed connection, which the SDK retries and names as always).
   */
  private async readPresigned(handler: DirectGetHandler, position: number, length: number, out: Buffer): Promise<boolean> {
    let url: URL;
    try {
      url = await this.presignedGet();
    } catch {
      this.presignFailed = true;
      return false;
    }
    let r;
    try {
      this.stats.requests++;
      r = await handler.fetch(presignedRequest(url, position, length, this.etag));
    } catch {
      return false;
    }
    if (!('response' in r)) {
      // 403: perhaps expired (a clock step, suspended process); the next read presigns again.
      if (r.status === 403) this.presigned = undefined;
      return false;
    }
    await this.readDirect(r.response.body, position, length, out);
    return true;
  }

  private async readDirect(body: DirectBody, position: number, length: number, out: Buffer): Promise<void> {
    if (body.length !== length) {
      body.destroy();
      throw new ObjectStoreError('S3_ERROR', `${this.name}: the store answered ${body.length} bytes for the ${length} asked for at ${position}`);
    }
    try {
      await body.readInto(out);
    } catch (e) {
      const received = (e as { received?: number }).received;
      if (received === undefined) throw e;
      // Retried like a connection drop; never a page silently short.
      throw new ObjectStoreError('S3_SHORT_READ', `${this.name}: ${received} of ${length} bytes at ${position} arrived (${(e as Error).message})`, { cause: e });
    }
  }

  private async readOnce(position: number, length: number, out: Buffer): Promise<void> {
    const handler = this.presignFailed ? undefined : await this.access.handler();
    if (handler && (await this.readPresigned(handler, position, length, out))) return;
    const client = await this.access.client();
    this.stats.requests++;
    const res = await client.send(new (loaded().GetObjectCommand)({
      Bucket: this.url.bucket,
      Key: this.url.key,
      Range: `bytes=${position}-${position + length - 1}`,
      // The object must not change under us between GETs (an overwrite mid-restore).
      ...(this.etag ? { IfMatch: this.etag } : {}),
    }));
    const body: unknown = res.Body;
    if (isDirectBody(body)) return this.readDirect(body, position, length, out);
    let at = 0;
    for await (const chunk of res.Body as AsyncIterable<Buffer>) {
      if (at + chunk.length > length) throw new ObjectStoreError('S3_ERROR', `${this.name}: the store sent more than the ${length} bytes asked for`);
      chunk.copy(out, at);
      at += chunk.length;
    }
    if (at !== length) throw new ObjectStoreError('S3_SHORT_READ', `${this.name}: ${at} of ${length} bytes at ${position} arrived`);
  }
}

/** A ranged GET of a presigned URL (path and query exactly as signed; Range and If-Match unsigned). */
function presignedRequest(url: URL, position: number, length: number, etag?: string): Parameters<DirectGetHandler['fetch']>[0] {
  return {
    method: 'GET',
    protocol: url.protocol,
    hostname: url.hostname,
    ...(url.port ? { port: Number(url.port) } : {}),
    path: `${url.pathname}${url.search}`,
    headers: { host: url.host, range: `bytes=${position}-${position + length - 1}`, ...(etag ? { 'if-match': etag } : {}) },
  };
}

/** The object's GET presigned by the SDK's presigner (where it is not signed here). */
async function sdkPresignedGet(client: S3Client, url: ObjectUrl): Promise<URL> {
  const { getSignedUrl } = await (presignerLoading ??= import('@aws-sdk/s3-request-presigner'));
  return new URL(await getSignedUrl(client, new (loaded().GetObjectCommand)({ Bucket: url.bucket, Key: url.key }), { expiresIn: PRESIGN_EXPIRES_S }));
}

/** The client's DirectGetHandler, unless MULTIFD_S3_DIRECT_GET=0 left the SDK's handler alone. */
function directHandler(client: S3Client): DirectGetHandler | undefined {
  const h = (client.config as unknown as { requestHandler?: unknown } | undefined)?.requestHandler;
  return h instanceof DirectGetHandler ? h : undefined;
}

/** Part size for an object of about `total` bytes: the wanted size, larger if 10 000 parts would not do. */
export function partSizeFor(total: number, wanted = DEFAULT_PART_SIZE): number {
  const size = Math.max(MIN_PART_SIZE, wanted, Math.ceil(total / MAX_PARTS));
  return Math.ceil(size / (1024 * 1024)) * 1024 * 1024;
}

/**
 * The user metadata (`x-amz-meta-multifd-upload-token`) in which every upload's object carries a
 * random token of its own, set at CreateMultipartUpload: it tells this upload's object from any
 * other under the same key when the answer to CompleteMultipartUpload was lost.
 */
export const UPLOAD_TOKEN_META = 'multifd-upload-token';

/**
 * Whether a CompleteMultipartUpload that failed may have committed the object all the same. An
 * attempt whose answer never came (connection reset, timeout) or that got a 5xx may have been
 * applied, and the SDK then sends it again; a store that already applied it answers the retry
 * NoSuchUpload (the upload is gone because it completed; some stores, current RGW among them,
 * answer 200 instead). A 4xx to the first attempt (InvalidPart, EntityTooSmall, AccessDenied) is
 * a refusal: nothing was committed, and nothing needs checking.
 */
function completeMayHaveCommitted(e: unknown, err: ObjectStoreError): boolean {
  const a = (e ?? {}) as AwsLikeError & { $metadata?: { attempts?: number } };
  if ((a.$metadata?.attempts ?? 1) > 1) return true;
  if (a.name === 'NoSuchUpload' || a.Code === 'NoSuchUpload' || a.$metadata?.httpStatusCode === 404) return true;
  return retryable(err);
}

/**
 * A multipart upload: parts go up in parallel (bounded), the object appears only at complete(),
 * and abort() removes the upload and its parts, retrying while the store is unreachable (a store
 * that is restarting would otherwise keep the parts as an orphaned upload).
 */
export class MultipartUpload {
  readonly stats: TransferStats = { requests: 0, retries: 0, bytes: 0 };
  private readonly parts: { PartNumber: number; ETag: string }[] = [];
  private readonly inFlight = new Set<Promise<void>>();
  private failure: ObjectStoreError | undefined;
  private nextPart = 1;
  private finished = false;

  private constructor(readonly client: S3Client, readonly url: ObjectUrl, readonly uploadId: string, readonly concurrency: number, readonly token: string) {}

  static async create(client: S3Client, url: ObjectUrl, opts: { concurrency?: number } = {}): Promise<MultipartUpload> {
    // 128 random bits: no other upload, ours or anyone's, carries the same token.
    const token = randomBytes(16).toString('hex');
    try {
      const r = await client.send(new (loaded().CreateMultipartUploadCommand)({
        Bucket: url.bucket, Key: url.key, ContentType: 'application/octet-stream', Metadata: { [UPLOAD_TOKEN_META]: token },
      }));
      if (!r.UploadId) throw new ObjectStoreError('S3_ERROR', `${formatObjectUrl(url)}: the store returned no upload id`);
      return new MultipartUpload(client, url, r.UploadId, opts.concurrency ?? 4, token);
    } catch (e) {
      throw storeError(e, `starting the upload of ${formatObjectUrl(url)}`, 'bucket');
    }
  }

  get partCount(): number {
    return this.nextPart - 1;
  }

  /**
   * Queues the next part; waits while `concurrency` parts are in flight. `body` belongs to the
   * upload until `settled` is called (the part is in, or failed for good): then it may be reused.
   */
  async add(body: Buffer, settled?: () => void): Promise<void> {
    if (this.failure) throw this.failure;
    while (this.inFlight.size >= this.concurrency) {
      await Promise.race(this.inFlight);
      if (this.failure) throw this.failure;
    }
    const n = this.nextPart++;
    const p = this.upload(n, body).then(
      () => { this.inFlight.delete(p); settled?.(); },
      (e: unknown) => { this.inFlight.delete(p); this.failure ??= storeError(e, `uploading part ${n} of ${formatObjectUrl(this.url)}`); settled?.(); },
    );
    this.inFlight.add(p);
  }

  private async upload(n: number, body: Buffer): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        this.stats.requests++;
        const r = await this.client.send(new (loaded().UploadPartCommand)({ Bucket: this.url.bucket, Key: this.url.key, UploadId: this.uploadId, PartNumber: n, Body: body, ContentLength: body.length }));
        if (!r.ETag) throw new ObjectStoreError('S3_ERROR', `part ${n}: the store returned no ETag`);
        this.parts.push({ PartNumber: n, ETag: r.ETag });
        this.stats.bytes += body.length;
        return;
      } catch (e) {
        const err = storeError(e, `uploading part ${n} of ${formatObjectUrl(this.url)}`);
        if (!retryable(err) || attempt >= 3 || this.failure) throw err;
        this.stats.retries++;
        await new Promise((r) => setTimeout(r, 200 * 2 ** attempt));
      }
    }
  }

  /**
   * Waits for every part, then completes: the object appears under its key now, whole.
   * `pointOfNoReturn` runs right before CompleteMultipartUpload is sent, in the same turn: if it
   * throws (an interrupt came), nothing is sent and the error is thrown; once it returned, the
   * request goes out and only its answer decides (docs/s3.md, atomicity). When that answer is
   * lost (see completeMayHaveCommitted), the object under the key decides: this upload's → done.
   */
  async complete(pointOfNoReturn?: () => void): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    if (this.failure) throw this.failure;
    pointOfNoReturn?.();
    this.parts.sort((a, b) => a.PartNumber - b.PartNumber);
    const what = `completing the upload of ${formatObjectUrl(this.url)}`;
    try {
      const r = await this.client.send(new (loaded().CompleteMultipartUploadCommand)({ Bucket: this.url.bucket, Key: this.url.key, UploadId: this.uploadId, MultipartUpload: { Parts: this.parts } }));
      this.countAttempts(r.$metadata?.attempts);
      this.finished = true;
    } catch (e) {
      this.countAttempts((e as { $metadata?: { attempts?: number } } | undefined)?.$metadata?.attempts);
      const name = (e as AwsLikeError | undefined)?.name;
      // Not the "no such object" a 404 otherwise is: the upload is what the store no longer has.
      const err = name === 'NoSuchUpload'
        ? new ObjectStoreError('S3_ERROR', `${what}: NoSuchUpload: the store no longer has multipart upload ${this.uploadId} (HTTP 404)`, { cause: e })
        : storeError(e, what);
      if (!completeMayHaveCommitted(e, err)) throw err;
      const notOurs = await this.notOurs();
      if (notOurs === undefined) {
        this.finished = true;
        return;
      }
      err.message += `; the store may have committed an earlier attempt whose answer was lost, but ${notOurs}`;
      throw err;
    }
  }

  /** The SDK's own retries of one request, in the upload's counters. */
  private countAttempts(attempts: number | undefined): void {
    const n = Math.max(1, attempts ?? 1);
    this.stats.requests += n;
    this.stats.retries += n - 1;
  }

  /**
   * Why the object under the key is not the one this upload makes (for the error), or undefined
   * when it is. The token in the object's user metadata decides: the store writes an upload's
   * metadata with its object, in the same commit (S3, RGW, MinIO alike; HEAD returns it), and no
   * other writer's object carries this upload's random token, so a HEAD that shows it and our size
   * sees our object. Comparing the multipart ETag (MD5 of the parts' MD5s, "-N") instead would
   * lean on how the store computes ETags, which S3-compatible stores and S3's own encryption
   * modes do not all do alike; a token needs nothing but the metadata that every store keeps.
   * Another writer's object under the key (even one replacing ours since) is not ours: failure.
   * S3 and RGW read their writes, so once a retry was answered NoSuchUpload the HEAD sees the
   * committed object; only a Complete still being applied after every attempt timed out could be
   * missed, and is then reported as the failure it may yet turn out not to be.
   */
  private async notOurs(): Promise<string | undefined> {
    const name = formatObjectUrl(this.url);
    let head;
    try {
      this.stats.requests++;
      head = await this.client.send(new (loaded().HeadObjectCommand)({ Bucket: this.url.bucket, Key: this.url.key }));
    } catch (e) {
      const err = storeError(e, `HEAD ${name}`);
      return err.code === 'S3_NO_KEY' ? `no object is under ${name}` : `checking for the object failed (${err.message})`;
    }
    const token = head.Metadata?.[UPLOAD_TOKEN_META];
    if (token !== this.token) return `the object under ${name} is not this upload's (${token === undefined ? 'it carries no upload token' : 'another upload\'s token'}: another writer's)`;
    // stats.bytes: the parts that are in, each once: the size of the object complete() makes.
    if (head.ContentLength !== this.stats.bytes) return `the object under ${name} has ${head.ContentLength ?? 'no'} bytes, not the ${this.stats.bytes} uploaded`;
    return undefined;
  }

  /**
   * Aborts the upload (its parts are deleted), retrying for up to `deadlineMs` while the store is
   * unreachable; throws S3_ABORT_FAILED naming the upload id when it could not.
   */
  async abort(deadlineMs = 120_000): Promise<void> {
    if (this.finished) return;
    this.failure ??= new ObjectStoreError('S3_ERROR', 'upload aborted');
    // Parts still in flight would otherwise land after the abort and recreate the upload's parts.
    await Promise.allSettled([...this.inFlight]);
    const until = Date.now() + deadlineMs;
    for (let attempt = 1; ; attempt++) {
      try {
        await this.client.send(new (loaded().AbortMultipartUploadCommand)({ Bucket: this.url.bucket, Key: this.url.key, UploadId: this.uploadId }));
        this.finished = true;
        return;
      } catch (e) {
        const err = storeError(e, `aborting the upload of ${formatObjectUrl(this.url)}`);
        if (err.code === 'S3_NO_KEY') { this.finished = true; return; } // NoSuchUpload: nothing left
        if (!retryable(err) || Date.now() >= until) {
          throw new ObjectStoreError('S3_ABORT_FAILED', `${err.message}; multipart upload ${this.uploadId} of ${formatObjectUrl(this.url)} may be left behind (remove it with AbortMultipartUpload, or let a lifecycle rule expire it)`, { cause: e });
        }
        await new Promise((r) => setTimeout(r, Math.min(2000, 100 * 2 ** attempt)));
      }
    }
  }
}
