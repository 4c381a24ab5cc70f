// The store's own throughput for a snapshot's bytes, measured as the disk floor is: the same
// client and settings our save and restore use (bench/disk-floor.ts is the disk's version).
// PUT: a multipart upload of `bytes` with the same part size and parts in flight; GET: the
// object read back with 8 MiB ranged GETs into reused buffers, the same number in flight as our
// restore's read-ahead.

import { randomFillSync } from 'node:crypto';
import { DeleteObjectCommand } from '@aws-sdk/client-s3';
import { hostCpuSince, sampleHostCpu, type HostCpu } from './host-cpu.js';
import { DEFAULT_PART_SIZE, MultipartUpload, partSizeFor, RangedObject, s3Client, type S3Settings } from '../src/transports/s3.js';

export interface StoreFloor {
  putMs: number;
  getMs: number;
  /** The host's CPU over the GET. */
  getHost?: HostCpu;
}

const CHUNK = 8 * 1024 * 1024;

export async function storeFloor(bucket: string, bytes: number, settings: S3Settings & { readAhead?: number } = {}): Promise<StoreFloor> {
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
    const cpu1 = sampleHostCpu();
    const t1 = performance.now();
    const obj = await RangedObject.open(client, url);
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
    const getMs = performance.now() - t1;
    const getHost = hostCpuSince(cpu1);
    return { putMs, getMs, ...(getHost ? { getHost } : {}) };
  } finally {
    await client.send(new DeleteObjectCommand({ Bucket: url.bucket, Key: url.key })).catch(() => {});
  }
}
