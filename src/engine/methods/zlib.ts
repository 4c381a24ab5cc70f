// zlib (docs/protocol.md §4.2): one deflate stream per channel for the whole migration, with a sync
// flush at the end of every packet, so each payload decodes given the ones before it. node:zlib's
// streams run deflate/inflate in the libuv thread pool, off the main thread; the dictionary state
// carries across packets because the stream objects live as long as the channel.

import zlib from 'node:zlib';
import { MultifdFlag } from '../../codec/constants.js';
import { ProtocolError } from '../../codec/errors.js';
import type { MultifdMethod, RecvMethodChannel, SendMethodChannel, SendPrepared } from './method.js';
import { SerialQueue } from './serial-queue.js';
import { pump } from './stream-pump.js';

const SYNC = zlib.constants.Z_SYNC_FLUSH;

export const DEFAULT_ZLIB_LEVEL = 1;
/** Output buffer per thread-pool round trip: fewer trips per 512 KiB packet than the 16 KiB default. */
const CHUNK = 256 * 1024;

/** Payload pieces shorter than this are gathered before they reach the stream; longer ones go as they are. */
const SMALL_PIECE = 16 * 1024;
/** Size of a buffer of gathered small pieces. */
const GATHER = 64 * 1024;

/**
 * The payload as few stream writes: a received payload is views of socket chunks, and a peer
 * sending tiny segments (or a slow link) makes it thousands of them; each stream.write costs a
 * Transform round and a thread-pool trip of its own. Runs of small pieces are copied into buffers
 * of about GATHER bytes; pieces of SMALL_PIECE bytes or more are passed through without a copy, so
 * at most one GATHER-sized run of small bytes is copied between two big ones.
 */
export function gatherPieces(input: readonly Buffer[]): Buffer[] {
  const out: Buffer[] = [];
  let run: Buffer[] = [];
  let runLen = 0;
  const endRun = (): void => {
    if (run.length === 1) out.push(run[0]!);
    else if (run.length > 1) out.push(Buffer.concat(run, runLen));
    run = [];
    runLen = 0;
  };
  for (const b of input) {
    if (b.length === 0) continue;
    if (b.length >= SMALL_PIECE) {
      endRun();
      out.push(b);
      continue;
    }
    run.push(b);
    runLen += b.length;
    if (runLen >= GATHER) endRun();
  }
  endRun();
  return out;
}

export function zlibMethod(): MultifdMethod {
  return {
    name: 'zlib',
    flags: MultifdFlag.ZLIB,
    // multifd-zlib-level: 0..9 (migration/options.c).
    levels: { min: 0, max: 9, default: DEFAULT_ZLIB_LEVEL },
    sendSetup(_channelId: number, pageSize: number, opts = {}): SendMethodChannel {
      const level = opts.level ?? DEFAULT_ZLIB_LEVEL;
      const def = zlib.createDeflate({ level, chunkSize: CHUNK });
      return {
        async prepare(pages, normalPages): Promise<SendPrepared> {
          // Deflate output of incompressible pages stays a little above the input size.
          const payload = await pump(def, gatherPieces(pages), SYNC, normalPages * pageSize * 2 + 65536, 'zlib');
          return { payload, size: payload.reduce((n, b) => n + b.length, 0) };
        },
        cleanup: () => def.destroy(),
      };
    },
    recvSetup(_channelId: number, pageSize: number): RecvMethodChannel {
      const inf = zlib.createInflate({ chunkSize: CHUNK });
      const queue = new SerialQueue();
      return {
        // Packets of a channel decode strictly in order: the stream's dictionary spans them.
        recv: (header, payload) =>
          queue.run(async () => {
            const expected = header.normalPages * pageSize;
            const pages = await pump(inf, gatherPieces(payload), SYNC, expected, 'zlib');
            const got = pages.reduce((n, b) => n + b.length, 0);
            if (got !== expected) {
              throw new ProtocolError('BAD_RECORD', `zlib payload decodes to ${got} bytes, expected ${header.normalPages} pages (${expected} bytes)`);
            }
            return pages;
          }),
        cleanup: () => inf.destroy(),
      };
    },
  };
}
