// zstd through node:zlib (Node >= 22.15 and >= 23.8): the same framing QEMU's zstd method writes
// (docs/protocol.md §4.3): one zstd stream per channel for the whole migration, never ended, with
// ZSTD_e_flush at the end of every packet so each payload decodes given the ones before it.
// node:zlib runs the codec in the libuv thread pool, off the main thread, so no worker or native
// addon is needed. @types/node 20 does not declare the zstd API, hence the local types.

import zlib from 'node:zlib';
import { ProtocolError } from '../../codec/errors.js';
import type { RecvMethodChannel, SendMethodChannel, SendPrepared } from './method.js';
import { SerialQueue } from './serial-queue.js';

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

/** Feeds `input` to the stream, flushes it (ZSTD_e_flush), returns what came out; at most `limit` bytes. */
function pump(stream: zlib.Deflate | zlib.Inflate, input: readonly Buffer[], limit: number): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const out: Buffer[] = [];
    let size = 0;
    let settled = false;
    const done = (e?: Error): void => {
      if (settled) return;
      settled = true;
      stream.off('data', onData);
      stream.off('error', onError);
      stream.off('close', onClose);
      if (e) {
        stream.destroy();
        reject(e);
      } else {
        resolve(out);
      }
    };
    const onData = (c: Buffer): void => {
      size += c.length;
      // A hostile payload must not decode without bound: stop as soon as it overshoots.
      if (size > limit) {
        done(new ProtocolError('LIMIT_EXCEEDED', `zstd payload decodes to more than the ${limit} bytes its header announces`));
        return;
      }
      out.push(c);
    };
    const onError = (e: Error): void => done(new ProtocolError('BAD_RECORD', `zstd stream error: ${e.message}`));
    // A stream destroyed under us (channel cleanup, or an earlier failure) never calls back.
    const onClose = (): void => done(new ProtocolError('BAD_RECORD', 'zstd stream closed while a packet was being coded'));
    stream.on('data', onData);
    stream.on('error', onError);
    stream.on('close', onClose);
    if (stream.destroyed) {
      done(new ProtocolError('BAD_RECORD', 'zstd stream already closed (an earlier packet failed)'));
      return;
    }
    for (const b of input) if (b.length > 0) stream.write(b);
    stream.flush(z.constants!.ZSTD_e_flush, () => {
      if (!stream.destroyed) done();
    });
  });
}

export function nodeZstdSend(pageSize: number, level: number): SendMethodChannel {
  const c = z.createZstdCompress!({ chunkSize: CHUNK, params: { [z.constants!.ZSTD_c_compressionLevel]: level } });
  const queue = new SerialQueue();
  return {
    prepare: (pages, normalPages): Promise<SendPrepared> =>
      queue.run(async () => {
        // zstd's bound for incompressible input is a little above the input size.
        const payload = await pump(c, pages, normalPages * pageSize * 2 + 65536);
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
        const pages = await pump(d, payload, expected);
        const got = pages.reduce((n, b) => n + b.length, 0);
        if (got !== expected) throw new ProtocolError('BAD_RECORD', `zstd payload decodes to ${got} bytes, expected ${expected}`);
        return pages;
      }),
    cleanup: () => d.destroy(),
  };
}
