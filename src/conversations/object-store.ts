// Snapshots in object storage (docs/s3.md): s3:// URLs open as packed snapshots wherever a
// snapshot is read (restore, send, inspect, verify, extract, convert), and a local mapped-ram
// snapshot goes up packed in one multipart upload that completes only at the very end.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AbortedError } from '../codec/errors.js';
import { MappedRamSnapshot } from '../engine/mapped-ram-reader.js';
import { registerSnapshotScheme } from '../engine/open-snapshot.js';
import { PACKED_FIRST_READ, PackedSnapshot, type PackedReadOptions } from '../engine/packed-snapshot-source.js';
import { packedParts, packedPrefixOf } from '../engine/packed-snapshot-writer.js';
import {
  checkBucket, formatObjectUrl, MultipartUpload, ObjectStoreError, objectSize, parseObjectUrl, partSizeFor, RangedObject, s3Client, StoreAccess, type S3Settings,
} from '../transports/s3.js';

export { isObjectUrl, ObjectStoreError } from '../transports/s3.js';

export interface ObjectStoreSettings extends S3Settings, PackedReadOptions {
  /** Where snapshots are staged before their upload (default: the OS temp dir). */
  stagingDir?: string;
}

let settings: ObjectStoreSettings = {};

/** Settings for every s3:// URL from now on (the CLI's --s3-* flags). */
export function configureObjectStore(s: ObjectStoreSettings): void {
  settings = { ...s };
}

export function objectStoreSettings(): ObjectStoreSettings {
  return settings;
}

/** Opens s3://bucket/key as a SnapshotSource; errors name what is wrong before anything else happens. */
export async function openObjectSnapshot(url: string, s: ObjectStoreSettings = settings): Promise<PackedSnapshot & { object: RangedObject; openMs: number }> {
  const t0 = Date.now();
  const obj = await RangedObject.open(StoreAccess.for(s), parseObjectUrl(url), { firstBytes: PACKED_FIRST_READ });
  const snap = await PackedSnapshot.open(obj, {
    ...(s.chunkBytes !== undefined ? { chunkBytes: s.chunkBytes } : {}),
    ...(s.readAhead !== undefined ? { readAhead: s.readAhead } : {}),
    ...(s.readAround !== undefined ? { readAround: s.readAround } : {}),
  });
  return Object.assign(snap, { object: obj, openMs: Date.now() - t0 });
}

export interface ObjectReadReport {
  url: string;
  'object-size': number;
  /** ms to open and check the object (its first GET, the rest of the prefix if any; before QEMU is touched). */
  'open-ms': number;
  requests: number;
  retries: number;
  'bytes-read': number;
  'chunk-gets': number;
  'read-around-gets': number;
  'read-around-hits': number;
}

/** `{ store: … }` for a summary when `src` was read from an object store, else `{}`. */
export function objectReadReport(src: unknown): { store?: ObjectReadReport } {
  if (!(src instanceof PackedSnapshot) || !('object' in src)) return {};
  const o = (src as PackedSnapshot & { object: RangedObject; openMs: number });
  return {
    store: {
      url: o.object.name,
      'object-size': o.object.size,
      'open-ms': o.openMs,
      requests: o.object.stats.requests,
      retries: o.object.stats.retries,
      'bytes-read': o.object.stats.bytes,
      'chunk-gets': o.stats.chunkGets,
      'read-around-gets': o.stats.randomGets,
      'read-around-hits': o.stats.aroundHits,
    },
  };
}

registerSnapshotScheme('s3', (url) => openObjectSnapshot(url));

export interface UploadReport {
  url: string;
  /** Bytes of the object (what the store keeps) and of the mapped-ram file it expands to. */
  'object-size': number;
  'file-size': number;
  'present-pages': number;
  parts: number;
  'part-size': number;
  /** Requests to the store (HEAD bucket, create, parts, complete; a HEAD when the Complete's answer was lost) and requests sent again after a failure (parts, the Complete). */
  requests: number;
  retries: number;
  /** Bytes the store accepted in parts (the object's size; a part sent twice counts once). */
  'bytes-uploaded': number;
  'upload-ms': number;
  /** When the staged snapshot was complete and synced on local disk, and when the object was complete in the store. */
  'local-durable-at'?: string;
  'store-durable-at': string;
  'upload-bytes-per-s': number;
}

export interface UploadProgress {
  /** Object bytes handed to the upload so far, and in all. */
  sent: number;
  total: number;
  /** Bytes the store has accepted (parts in), and its requests and retries so far. */
  stored: number;
  requests: number;
  retries: number;
  parts: number;
  /** ms since the upload started. */
  elapsedMs: number;
}

/**
 * Uploads the mapped-ram file at `local` as a packed object at `url`. The object appears only
 * when every part is in (CompleteMultipartUpload); on any failure the upload is aborted, so
 * neither an object nor an orphaned multipart upload remains, and the error is thrown. `signal`
 * stops it until CompleteMultipartUpload is sent; after that only the store's answer decides.
 */
export async function uploadPackedSnapshot(local: string, url: string, opts: {
  settings?: ObjectStoreSettings; onProgress?: (p: UploadProgress) => void; signal?: AbortSignal;
  /** Called right before CompleteMultipartUpload is sent, unless `signal` was aborted by then (see MultipartUpload.complete). */
  pointOfNoReturn?: () => void;
} = {}): Promise<UploadReport> {
  const s = opts.settings ?? settings;
  const started = Date.now();
  const where = parseObjectUrl(url);
  const client = await s3Client(s);
  await checkBucket(client, where);
  const src = await MappedRamSnapshot.open(local);
  try {
    const { prefix, layout } = await packedPrefixOf(src);
    const total = layout.objectSize;
    const partSize = partSizeFor(total, s.partSize);
    const up = await MultipartUpload.create(client, where, { concurrency: s.uploadConcurrency ?? 4 });
    let sent = 0;
    // +2: HEAD bucket and CreateMultipartUpload, which the upload's own counters do not see.
    const report = (): void => opts.onProgress?.({
      sent, total, stored: up.stats.bytes, requests: up.stats.requests + 2, retries: up.stats.retries, parts: up.partCount, elapsedMs: Date.now() - started,
    });
    try {
      // Part buffers are recycled once uploaded: memory is (parts in flight + 1) × part size.
      const pool: Buffer[] = [];
      const alloc = (n: number): Buffer => (n === partSize ? pool.pop() : undefined) ?? Buffer.allocUnsafe(n);
      for await (const part of packedParts(src, prefix, layout, partSize, alloc)) {
        if (opts.signal?.aborted) throw new AbortedError(opts.signal.reason, `upload of ${url} interrupted`);
        await up.add(part, () => {
          if (part.length === partSize) pool.push(part);
          report();
        });
        sent += part.length;
        report();
      }
      await up.complete(() => {
        // The last moment an interrupt can keep the object from appearing; after this one it cannot.
        if (opts.signal?.aborted) throw new AbortedError(opts.signal.reason, `upload of ${url} interrupted`);
        opts.pointOfNoReturn?.();
      });
      report();
    } catch (e) {
      // The abort's own failure (store unreachable past its deadline) names the upload id.
      await up.abort().catch((abortErr: Error) => {
        (e as Error).message += `; ${abortErr.message}`;
      });
      throw e;
    }
    const ms = Date.now() - started;
    return {
      url: formatObjectUrl(where),
      'object-size': total,
      'file-size': src.fileSize,
      'present-pages': layout.presentPages,
      parts: up.partCount,
      'part-size': partSize,
      requests: up.stats.requests + 2,
      retries: up.stats.retries,
      'bytes-uploaded': up.stats.bytes,
      'upload-ms': ms,
      'store-durable-at': new Date().toISOString(),
      'upload-bytes-per-s': Math.round(total / Math.max(ms, 1) * 1000),
    };
  } finally {
    await src.close();
  }
}

/** A summary's note for an interrupt that came after the object's CompleteMultipartUpload went out (docs/s3.md, atomicity). */
export function objectCommittedNote(url: string, reason = 'interrupted'): string {
  return `${reason} after the object was committed: ${url} is stored complete`;
}

/** A private directory for staging one snapshot; removed by the caller. */
export async function stagingDirectory(s: ObjectStoreSettings = settings): Promise<string> {
  return mkdtemp(join(s.stagingDir ?? tmpdir(), 'multifd-s3-'));
}

export async function removeStaging(dir: string): Promise<void> {
  await rm(dir, { recursive: true, force: true });
}

/**
 * A snapshot file (or object) as a packed object at `url`: a local mapped-ram file goes up as it
 * is; anything else is converted to mapped-ram in the staging directory first (`toMappedRam`).
 * An existing object is replaced only with `force`.
 */
export async function storeAsObject(input: string, url: string, opts: {
  force?: boolean; toMappedRam: (output: string) => Promise<unknown>; isLocalMappedRam: boolean; onProgress?: (p: UploadProgress) => void; signal?: AbortSignal;
  /** As uploadPackedSnapshot's: called right before CompleteMultipartUpload is sent. */
  pointOfNoReturn?: () => void;
}): Promise<UploadReport> {
  const where = parseObjectUrl(url);
  const client = await s3Client(settings);
  await checkBucket(client, where);
  if (!opts.force && (await objectSize(client, where)) !== undefined) {
    throw new ObjectStoreError('S3_EXISTS', `${url} already exists (use --force to replace it)`);
  }
  const upload = {
    ...(opts.onProgress ? { onProgress: opts.onProgress } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
    ...(opts.pointOfNoReturn ? { pointOfNoReturn: opts.pointOfNoReturn } : {}),
  };
  if (opts.isLocalMappedRam) return uploadPackedSnapshot(input, url, upload);
  const dir = await stagingDirectory();
  try {
    const staged = join(dir, 'snapshot.mig');
    await opts.toMappedRam(staged);
    return await uploadPackedSnapshot(staged, url, upload);
  } finally {
    await removeStaging(dir);
  }
}
