// One packet through a node:zlib stream that lives as long as its channel (zlib's deflate and
// zstd both keep one stream per channel across packets, flushed at each packet's end, as QEMU's
// methods do): write the pieces, flush, collect what came out, and never decode without bound.

import type zlib from 'node:zlib';
import { ProtocolError } from '../../codec/errors.js';

/**
 * Writes `pieces` to `stream`, flushes it with `flushKind` (Z_SYNC_FLUSH, ZSTD_e_flush) and
 * resolves with the output, failing once it exceeds `limit` bytes. `name` goes into errors.
 */
export function pump(stream: zlib.Deflate | zlib.Inflate, pieces: readonly Buffer[], flushKind: number, limit: number, name: string): Promise<Buffer[]> {
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
        done(new ProtocolError('LIMIT_EXCEEDED', `${name} payload decodes to more than the ${limit} bytes its header announces`));
        return;
      }
      out.push(c);
    };
    const onError = (e: Error): void => done(new ProtocolError('BAD_RECORD', `${name} stream error: ${e.message}`));
    // A stream destroyed under us (channel cleanup, or an earlier failure) never calls back.
    const onClose = (): void => done(new ProtocolError('BAD_RECORD', `${name} stream closed while a packet was being coded`));
    stream.on('data', onData);
    stream.on('error', onError);
    stream.on('close', onClose);
    if (stream.destroyed) {
      done(new ProtocolError('BAD_RECORD', `${name} stream already closed (an earlier packet failed)`));
      return;
    }
    for (const b of pieces) stream.write(b);
    stream.flush(flushKind, () => {
      if (!stream.destroyed) done();
    });
  });
}
