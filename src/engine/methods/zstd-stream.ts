// zstd through node:zlib (Node >= 22.15 and >= 23.8): the same framing QEMU's zstd method writes
// (docs/protocol.md §4.3): one zstd stream per channel for the whole migration, never ended, with
// ZSTD_e_flush at the end of every packet so each payload decodes given the ones before it.
// node:zlib runs the codec in the libuv thread pool, off the main thread, so no worker or native
// addon is needed. @types/node 20 does not declare the zstd API, hence the local types.

import zlib from 'node:zlib';
import { ProtocolError } from '../../codec/errors.js';
import type { RecvMethodChannel, SendMethodChannel, SendPrepared } from './method.js';
import { SerialQueue } from './serial-queue.js';
import { pump } from './stream-pump.js';

interface ZstdZlib {
  createZstdCompress(opts: { chunkSize?: number; params?: Record<number, number> }): zlib.Deflate;
  createZstdDecompress(opts: { chunkSize?: number }): zlib.Inflate;
  constants: { ZSTD_e_flush: number; ZSTD_c_compressionLevel: number };
}

const z = zlib as unknown as Partial<ZstdZlib>;

/** True when this Node's zlib has zstd streams. */
export function nodeHasZstd(): boolean {
  return typeof z.createZstdCompress === 'function' && typeof z.createZstdDecompress === 'function' && z.constants?.ZSTD_e_flush !== undefined;
}

/** Output buffer per thread-pool round trip: a 512 KiB packet in few trips. */
const CHUNK = 256 * 1024;

function nonEmpty(bufs: readonly Buffer[]): Buffer[] {
  return bufs.filter((b) => b.length > 0);
}

/** A plain zstd decompressing stream (whole files, e.g. a zstd libvirt image), not a channel's. */
export function nodeZstdDecompressStream(): zlib.Inflate {
  return z.createZstdDecompress!({ chunkSize: CHUNK });
}

export function nodeZstdSend(pageSize: number, level: number): SendMethodChannel {
  const c = z.createZstdCompress!({ chunkSize: CHUNK, params: { [z.constants!.ZSTD_c_compressionLevel]: level } });
  const queue = new SerialQueue();
  return {
    prepare: (pages, normalPages): Promise<SendPrepared> =>
      queue.run(async () => {
        // zstd's bound for incompressible input is a little above the input size.
        const payload = await pump(c, nonEmpty(pages), z.constants!.ZSTD_e_flush, normalPages * pageSize * 2 + 65536, 'zstd');
        return { payload, size: payload.reduce((n, b) => n + b.length, 0) };
      }),
    cleanup: () => c.destroy(),
  };
}

export function nodeZstdRecv(pageSize: number): RecvMethodChannel {
  const d = z.createZstdDecompress!({ chunkSize: CHUNK });
  const queue = new SerialQueue();
  return {
    // Packets of a channel decode strictly in order: the stream's window spans them.
    recv: (header, payload) =>
      queue.run(async () => {
        const expected = header.normalPages * pageSize;
        const pages = await pump(d, nonEmpty(payload), z.constants!.ZSTD_e_flush, expected, 'zstd');
        const got = pages.reduce((n, b) => n + b.length, 0);
        if (got !== expected) throw new ProtocolError('BAD_RECORD', `zstd payload decodes to ${got} bytes, expected ${expected}`);
        return pages;
      }),
    cleanup: () => d.destroy(),
  };
}
