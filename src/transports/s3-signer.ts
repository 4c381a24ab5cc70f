// GETs of an object signed without the AWS SDK's client. Loading the client costs a restore about
// 0.2 s before its first byte and 0.3 s of CPU (docs/performance.md, *Opening without the SDK*);
// reading an object needs only a presigned GET, which the SDK's own signer (@smithy/signature-v4,
// ~40 ms to load) makes from the credentials. That is done here only where the outcome cannot
// differ from the client's: an endpoint given by flag or environment (AWS's own endpoints have
// rules of their own: FIPS, dual-stack, access points) and static credentials in the environment
// with no profile asked for (the SDK's chain takes exactly those first). Anything else, and any
// answer but a success, goes through the client (transports/s3.ts), which names errors.

import { createHash, createHmac, type Hash, type Hmac } from 'node:crypto';
import { isIP } from 'node:net';
import { escapeUri } from './direct-get.js';

/** An object: s3://BUCKET/KEY (transports/s3.ts parses and formats it). */
export interface ObjectUrl {
  bucket: string;
  key: string;
}

export interface EnvCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** Where and as whom GETs are signed here. */
export interface SignedGetTarget {
  endpoint: URL;
  region: string;
  pathStyle: boolean;
  credentials: EnvCredentials;
}

/**
 * The target for GETs signed here, or undefined when the client must sign them: no endpoint of
 * our own or no region, or credentials other than static keys in the environment.
 */
export function signedGetTarget(
  s: { endpoint: string | undefined; region: string | undefined; pathStyle: boolean },
  env: NodeJS.ProcessEnv = process.env,
): SignedGetTarget | undefined {
  if (!s.endpoint || !s.region) return undefined;
  const accessKeyId = env.AWS_ACCESS_KEY_ID;
  const secretAccessKey = env.AWS_SECRET_ACCESS_KEY;
  // With AWS_PROFILE set, the SDK's chain skips the environment's keys for the profile's.
  if (!accessKeyId || !secretAccessKey || env.AWS_PROFILE) return undefined;
  let endpoint: URL;
  try {
    endpoint = new URL(s.endpoint);
  } catch {
    return undefined;
  }
  if ((endpoint.protocol !== 'http:' && endpoint.protocol !== 'https:') || endpoint.username || endpoint.password || endpoint.search) return undefined;
  return { endpoint, region: s.region, pathStyle: s.pathStyle, credentials: { accessKeyId, secretAccessKey, ...(env.AWS_SESSION_TOKEN ? { sessionToken: env.AWS_SESSION_TOKEN } : {}) } };
}

/** An object key's path segments as S3 wants them in a URL: RFC 3986 escapes, '/' kept. */
export function keyPath(key: string): string {
  return key.split('/').map(escapeUri).join('/');
}

/** The object's URL before signing (path-style or virtual-hosted); undefined when the bucket cannot be a host name. */
export function objectLocation(t: SignedGetTarget, url: ObjectUrl): URL | undefined {
  // URLs resolve '.' and '..' segments (escaped or not): such a key would be signed as another one.
  if (url.key.split('/').some((seg) => seg === '.' || seg === '..')) return undefined;
  const base = t.endpoint.pathname.replace(/\/+$/, '');
  const u = new URL(t.endpoint.origin);
  if (t.pathStyle) {
    u.pathname = `${base}/${url.bucket}/${keyPath(url.key)}`;
    return u;
  }
  // A bucket with dots under https would not match the certificate's wildcard; an IP has no subdomains.
  if (url.bucket.includes('.') || isIP(t.endpoint.hostname.replace(/^\[|\]$/g, '')) !== 0) return undefined;
  u.hostname = `${url.bucket}.${t.endpoint.hostname}`;
  u.pathname = `${base}/${keyPath(url.key)}`;
  return u;
}

type SourceData = string | ArrayBuffer | ArrayBufferView;

function bytes(d: SourceData): string | Buffer {
  if (typeof d === 'string') return d;
  return ArrayBuffer.isView(d) ? Buffer.from(d.buffer, d.byteOffset, d.byteLength) : Buffer.from(d);
}

/** node:crypto as the signer's hash constructor (@smithy/types Checksum). */
class Sha256 {
  private readonly h: Hash | Hmac;
  constructor(secret?: SourceData) {
    this.h = secret === undefined ? createHash('sha256') : createHmac('sha256', bytes(secret));
  }
  update(data: SourceData): void {
    this.h.update(bytes(data));
  }
  digest(): Promise<Uint8Array> {
    return Promise.resolve(new Uint8Array(this.h.digest()));
  }
}

type SignerModule = typeof import('@smithy/signature-v4');
let signerLoading: Promise<SignerModule> | undefined;

/** Presigns GETs for one target; the signer is loaded on first use. */
export class GetSigner {
  private signer: InstanceType<SignerModule['SignatureV4']> | undefined;

  constructor(readonly target: SignedGetTarget) {}

  /** A GET of the object valid for `expiresS` seconds; Range and If-Match go with it unsigned. Undefined when it cannot be signed here. */
  async presign(url: ObjectUrl, expiresS: number): Promise<URL | undefined> {
    const at = objectLocation(this.target, url);
    if (!at) return undefined;
    if (!this.signer) {
      const { SignatureV4 } = await (signerLoading ??= import('@smithy/signature-v4'));
      // uriEscapePath false: S3 signs the path as sent (already escaped), not escaped twice.
      this.signer ??= new SignatureV4({ service: 's3', region: this.target.region, credentials: this.target.credentials, sha256: Sha256, uriEscapePath: false, applyChecksum: false });
    }
    const signed = await this.signer.presign({
      method: 'GET',
      protocol: at.protocol,
      hostname: at.hostname,
      ...(at.port ? { port: Number(at.port) } : {}),
      path: at.pathname,
      query: {},
      // A presigned URL's payload is never hashed: S3 expects UNSIGNED-PAYLOAD in the signature.
      headers: { host: at.host, 'x-amz-content-sha256': 'UNSIGNED-PAYLOAD' },
    }, { expiresIn: expiresS });
    const out = new URL(at.href);
    for (const [k, v] of Object.entries(signed.query ?? {})) {
      if (typeof v === 'string') out.searchParams.append(k, v);
    }
    return out;
  }
}
