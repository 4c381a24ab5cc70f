// zstd (PROTOCOL.md §4.3): one zstd stream per channel, never ended, flushed at the end of every
// packet. libzstd (through zstd-napi) is synchronous, so the contexts live in worker threads: a
// small pool shared by every channel of the process, each channel pinned to one worker so its
// stream state stays in one place. Pages are copied once into a transferable buffer per packet.
// A channel's packets are posted as soon as they come, without waiting for the previous reply:
// a worker handles its messages in order, which is all the stream state needs, and it is never
// left idle for a round trip (the worker fails every later packet of a stream that failed).

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { MultifdFlag } from '../../codec/constants.js';
import { ProtocolError } from '../../codec/errors.js';
import type { MultifdMethod, RecvMethodChannel, SendMethodChannel } from './method.js';

export const DEFAULT_ZSTD_LEVEL = 1;

interface Reply {
  id: number;
  data?: Uint8Array;
  error?: string;
}

class ZstdWorker {
  private readonly worker: Worker;
  private readonly pending = new Map<number, { resolve: (r: Reply) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private dead: Error | undefined;

  constructor() {
    this.worker = new Worker(new URL('./zstd-worker.js', import.meta.url));
    this.worker.on('message', (r: Reply) => {
      const p = this.pending.get(r.id);
      if (!p) return;
      this.pending.delete(r.id);
      if (this.pending.size === 0) this.worker.unref();
      if (r.error !== undefined) p.reject(new ProtocolError('BAD_RECORD', r.error));
      else p.resolve(r);
    });
    this.worker.on('error', (e) => this.die(e));
    this.worker.on('exit', (code) => this.die(new Error(`zstd worker exited with code ${code}`)));
    // Idle workers must not keep the process alive; busy ones must (see call()). After the
    // listeners: attaching a 'message' listener refs the worker's port again.
    this.worker.unref();
  }

  private die(e: Error): void {
    this.dead ??= e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    const i = pool.indexOf(this);
    if (i >= 0) pool.splice(i, 1);
  }

  call(msg: Record<string, unknown>, transfer: ArrayBuffer[] = []): Promise<Reply> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      if (this.pending.size === 0) this.worker.ref();
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...msg, id }, transfer);
    });
  }
}

const pool: ZstdWorker[] = [];
let contexts = 0;

function workerFor(channelId: number): ZstdWorker {
  const size = Math.max(1, Math.min(4, availableParallelism()));
  while (pool.length < size) pool.push(new ZstdWorker());
  return pool[channelId % pool.length]!;
}

/** One transferable copy of the views (a view of a larger buffer would clone all of it). */
function packed(views: readonly Buffer[]): Uint8Array {
  const total = views.reduce((n, b) => n + b.length, 0);
  // Not zero-filled and not from the shared pool: it is overwritten at once and transferred.
  const out = Buffer.allocUnsafeSlow(total);
  let at = 0;
  for (const v of views) {
    out.set(v, at);
    at += v.length;
  }
  return out;
}

export function zstdMethod(): MultifdMethod {
  return {
    name: 'zstd',
    flags: MultifdFlag.ZSTD,
    sendSetup(channelId: number, _pageSize: number, opts = {}): SendMethodChannel {
      const w = workerFor(channelId);
      const key = `c${contexts++}`;
      w.call({ op: 'csetup', key, level: opts.level ?? DEFAULT_ZSTD_LEVEL }).catch(() => {});
      return {
        prepare: async (pages) => {
          const data = packed(pages);
          const r = await w.call({ op: 'compress', key, data }, [data.buffer as ArrayBuffer]);
          const out = Buffer.from(r.data!.buffer, r.data!.byteOffset, r.data!.byteLength);
          return { payload: [out], size: out.length };
        },
        cleanup: () => { w.call({ op: 'free', key }).catch(() => {}); },
      };
    },
    recvSetup(channelId: number, pageSize: number): RecvMethodChannel {
      const w = workerFor(channelId);
      const key = `d${contexts++}`;
      w.call({ op: 'dsetup', key }).catch(() => {});
      return {
        recv: async (header, payload) => {
          const data = packed(payload);
          const r = await w.call({ op: 'decompress', key, data, expected: header.normalPages * pageSize }, [data.buffer as ArrayBuffer]);
          return [Buffer.from(r.data!.buffer, r.data!.byteOffset, r.data!.byteLength)];
        },
        cleanup: () => { w.call({ op: 'free', key }).catch(() => {}); },
      };
    },
  };
}
