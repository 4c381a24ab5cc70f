// The store's own throughput for a snapshot's bytes, measured as the disk floor is: the same
// client and settings our save and restore use (bench/disk-floor.ts is the disk's version).
// PUT: a multipart upload of `bytes` with the same part size and parts in flight, then that
// object read back. GET: an object read with 8 MiB ranged GETs into reused buffers, the same
// number in flight as our restore's read-ahead. The restore's floor is the GET of the snapshot
// object itself (getFloor): the same bytes where the store put them; the object the PUT just
// wrote reads back at a speed of its own (freshly written, other placement), kept for comparison.

import { randomFillSync } from 'node:crypto';
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import { hostCpuSince, sampleHostCpu, type HostCpu } from './host-cpu.js';
import { DEFAULT_PART_SIZE, MultipartUpload, partSizeFor, RangedObject, s3Client, type ObjectUrl, type S3Settings } from '../src/transports/s3.js';

export interface StoreFloor {
  putMs: number;
  /** The PUT's own object read back. */
  getMs: number;
  getHost?: HostCpu;
}

export interface GetFloor {
  getMs: number;
  bytes: number;
  /** The host's CPU over the GET. */
  host?: HostCpu;
}

const CHUNK = 8 * 1024 * 1024;

type Settings = S3Settings & { readAhead?: number };

/** PUTs `bytes` of random data as a new object, reads it back (getFloor), removes it. */
export async function storeFloor(bucket: string, bytes: number, settings: Settings = {}): Promise<StoreFloor> {
  const client = await s3Client(settings);
  const url = { bucket, key: `floor-${process.pid}-${Date.now()}` };
  const partSize = partSizeFor(bytes, settings.partSize ?? DEFAULT_PART_SIZE);
  const t0 = performance.now();
  const up = await MultipartUpload.create(client, url, { concurrency: settings.uploadConcurrency ?? 4 });
  try {
    for (let at = 0; at < bytes; at += partSize) {
      // A fresh buffer per part, as our upload has (a part's buffer is the store's until it is in).
      await up.add(randomFillSync(Buffer.allocUnsafe(Math.min(partSize, bytes - at))));
    }
    await up.complete();
  } catch (e) {
    await up.abort().catch(() => {});
    throw e;
  }
  const putMs = performance.now() - t0;
  try {
    const g = await getFloor(url, settings);
    return { putMs, getMs: g.getMs, ...(g.host ? { getHost: g.host } : {}) };
  } finally {
    await client.send(new DeleteObjectCommand({ Bucket: url.bucket, Key: url.key })).catch(() => {});
  }
}

/** Reads the whole object (its open included) as our restore reads its pages: sequential 8 MiB ranges, readAhead in flight. */
export async function getFloor(url: ObjectUrl, settings: Settings = {}): Promise<GetFloor> {
  const client = await s3Client(settings);
  const cpu0 = sampleHostCpu();
  const t0 = performance.now();
  const obj = await RangedObject.open(client, url);
  const bytes = obj.size;
  const inFlight = settings.readAhead ?? 6;
  let next = 0;
  const worker = async (): Promise<void> => {
    // One buffer per worker, reused, as our restore reuses its chunk buffers: a fresh 8 MiB
    // buffer per GET costs page faults and garbage collection that are not the store's.
    const buf = Buffer.allocUnsafeSlow(CHUNK);
    for (;;) {
      const at = next;
      next += CHUNK;
      if (at >= bytes) return;
      const len = Math.min(CHUNK, bytes - at);
      await obj.read(at, len, buf.subarray(0, len));
    }
  };
  await Promise.all(Array.from({ length: inFlight }, worker));
  const getMs = performance.now() - t0;
  const host = hostCpuSince(cpu0);
  return { getMs, bytes, ...(host ? { host } : {}) };
}
