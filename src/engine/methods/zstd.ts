// zstd (docs/protocol.md §4.3): one zstd stream per channel, never ended, flushed at the end of
// every packet. Two implementations of the same framing: node:zlib's where this Node has zstd
// (>= 22.15; zstd-stream.ts), else the optional native package zstd-napi (this file). With neither,
// choosing zstd fails up front with a message that says what to install.
//
// zstd-napi's libzstd calls are synchronous, so its contexts live in worker threads: a
// small pool shared by every channel of the process, each channel pinned to one worker so its
// stream state stays in one place. A channel's packets are posted as soon as they come, without
// waiting for the previous reply: a worker handles its messages in order, which is all the stream
// state needs, and it is never left idle for a round trip (the worker fails every later packet of
// a stream that failed).
//
// Memory: every packet's input and output travel to the worker and back as transferred
// ArrayBuffers taken from two pools, and go back to the pools once written (release()). Fresh
// buffers per packet left their garbage to each thread's GC, which V8 collects only after ~64 MiB
// of external memory has piled up per isolate: a 4 GiB zstd receive peaked at 255-285 MiB RSS.

import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { MULTIFD_PACKET_BYTES, MultifdFlag } from '../../codec/constants.js';
import { ProtocolError } from '../../codec/errors.js';
import type { MultifdMethod, RecvMethodChannel, SendMethodChannel } from './method.js';
import { ZSTD_NAPI_PACKAGE, zstdNapiLoadError } from './zstd-napi.js';
import { nodeHasZstd, nodeZstdRecv, nodeZstdSend } from './zstd-stream.js';

export const DEFAULT_ZSTD_LEVEL = 1;

export type ZstdBackend = 'node:zlib' | 'zstd-napi';

/** Why `backend` cannot run in this process, or undefined when it can. */
function backendMissing(backend: ZstdBackend): string | undefined {
  if (backend === 'node:zlib') return nodeHasZstd() ? undefined : `node:zlib of Node ${process.versions.node} has no zstd (Node >= 22.15 has)`;
  const e = zstdNapiLoadError();
  return e === undefined ? undefined : `the optional package ${ZSTD_NAPI_PACKAGE} is not installed or does not load (${e})`;
}

/**
 * The implementation zstd uses here: node:zlib where it has zstd, else zstd-napi; undefined when
 * neither runs. MULTIFD_ZSTD=node:zlib or MULTIFD_ZSTD=zstd-napi asks for one of them.
 */
export function zstdBackend(): ZstdBackend | undefined {
  const asked = process.env.MULTIFD_ZSTD;
  if (asked === 'node:zlib' || asked === 'zstd-napi') return backendMissing(asked) === undefined ? asked : undefined;
  if (backendMissing('node:zlib') === undefined) return 'node:zlib';
  if (backendMissing('zstd-napi') === undefined) return 'zstd-napi';
  return undefined;
}

/** The error for choosing zstd where no implementation runs (what to install), or undefined. */
export function zstdUnavailable(backend?: ZstdBackend): ProtocolError | undefined {
  const asked = backend ?? process.env.MULTIFD_ZSTD;
  if (asked === 'node:zlib' || asked === 'zstd-napi') {
    const why = backendMissing(asked);
    if (why === undefined) return undefined;
    return new ProtocolError('UNSUPPORTED', `zstd through ${asked} is not available: ${why}${backend ? '' : ' (MULTIFD_ZSTD asks for it)'}`);
  }
  if (zstdBackend() !== undefined) return undefined;
  return new ProtocolError(
    'UNSUPPORTED',
    `zstd compression is not available on Node ${process.versions.node}: it needs Node >= 22.15 (zstd is built into node:zlib there) ` +
      `or the optional native package ${ZSTD_NAPI_PACKAGE}, which did not load (${zstdNapiLoadError()}). ` +
      `Use Node 22.15 or newer (24 LTS), or run \`npm install ${ZSTD_NAPI_PACKAGE}\` in this project ` +
      `(where no prebuilt binary can be downloaded it builds from source and needs python3, make and g++).`,
  );
}

function chosen(backend: ZstdBackend | undefined): ZstdBackend {
  const err = zstdUnavailable(backend);
  if (err) throw err;
  return backend ?? zstdBackend()!;
}

interface Reply {
  id: number;
  /** The result: a view of the `out` buffer sent (or of a bigger one the worker had to take). */
  data?: Uint8Array;
  /** The input buffer, given back for reuse. */
  input?: Uint8Array;
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
let openChannels = 0;

function workerFor(channelId: number): ZstdWorker {
  const size = Math.max(1, Math.min(4, availableParallelism()));
  while (pool.length < size) pool.push(new ZstdWorker());
  return pool[channelId % pool.length]!;
}

/**
 * Fixed-size ArrayBuffers for packets, reused. Requests up to the size get a pooled buffer (a view
 * of its first bytes); larger ones (a hostile or unusual packet) get a one-off buffer that is
 * dropped when given back. Bounded: at most `max` buffers wait here.
 */
class BufferPool {
  private readonly free: ArrayBuffer[] = [];
  constructor(
    readonly size: number,
    private readonly max: number,
  ) {}

  take(n: number): Uint8Array {
    // Not zero-filled: it is overwritten at once.
    const ab = n <= this.size ? (this.free.pop() ?? Buffer.allocUnsafeSlow(this.size).buffer) : Buffer.allocUnsafeSlow(n).buffer;
    return new Uint8Array(ab, 0, n);
  }

  give(ab: ArrayBufferLike): void {
    if (ab.byteLength === this.size && this.free.length < this.max) this.free.push(ab as ArrayBuffer);
  }

  clear(): void {
    this.free.length = 0;
  }
}

/** A packet's pages; its compressed form (zstd's bound for incompressible input, with headroom). */
const pagePool = new BufferPool(MULTIFD_PACKET_BYTES, 64);
const payloadPool = new BufferPool(MULTIFD_PACKET_BYTES + (MULTIFD_PACKET_BYTES >> 7) + 65536, 64);

/** The views copied, back to back, into a buffer from `from`. */
function packed(views: readonly Buffer[], from: BufferPool): Uint8Array {
  const out = from.take(views.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const v of views) {
    out.set(v, at);
    at += v.length;
  }
  return out;
}

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

/**
 * A channel's stream context in its worker. `run` sends the views (copied into a buffer from
 * `from`) and an output buffer from `to` for `op`, returns the input buffer to `from` and the
 * result as a view of its output buffer (which goes back to `to` through the method's release()).
 */
function workerChannel(channelId: number, setup: { op: 'csetup'; level: number } | { op: 'dsetup' }) {
  const w = workerFor(channelId);
  const key = `${setup.op === 'csetup' ? 'c' : 'd'}${contexts++}`;
  openChannels++;
  w.call({ ...setup, key }).catch(() => {});
  let cleaned = false;
  return {
    async run(op: 'compress' | 'decompress', views: readonly Buffer[], from: BufferPool, to: BufferPool, outBytes: number): Promise<Buffer> {
      const data = packed(views, from);
      const out = to.take(outBytes);
      const r = await w.call({ op, key, data, out }, [data.buffer as ArrayBuffer, out.buffer as ArrayBuffer]);
      from.give(r.input!.buffer);
      return asBuffer(r.data!);
    },
    /** Once only: a sender may clean a channel up twice (on failure, then on close). */
    cleanup(): void {
      if (cleaned) return;
      cleaned = true;
      w.call({ op: 'free', key }).catch(() => {});
      // With the last channel gone, the pools' memory goes too (a library process lives on).
      if (--openChannels > 0) return;
      pagePool.clear();
      payloadPool.clear();
    },
  };
}

/** zstd; `backend` pins an implementation (tests), else the one zstdBackend() picks. */
export function zstdMethod(backend?: ZstdBackend): MultifdMethod {
  return {
    name: 'zstd',
    flags: MultifdFlag.ZSTD,
    // multifd-zstd-level: 0..20 (migration/options.c).
    levels: { min: 0, max: 20, default: DEFAULT_ZSTD_LEVEL },
    sendSetup(channelId: number, pageSize: number, opts = {}): SendMethodChannel {
      if (chosen(backend) === 'node:zlib') return nodeZstdSend(pageSize, opts.level ?? DEFAULT_ZSTD_LEVEL);
      const ch = workerChannel(channelId, { op: 'csetup', level: opts.level ?? DEFAULT_ZSTD_LEVEL });
      return {
        prepare: async (pages) => {
          const payload = await ch.run('compress', pages, pagePool, payloadPool, payloadPool.size);
          return { payload: [payload], size: payload.length };
        },
        release: (prepared) => {
          for (const b of prepared.payload) payloadPool.give(b.buffer);
        },
        cleanup: () => ch.cleanup(),
      };
    },
    recvSetup(channelId: number, pageSize: number): RecvMethodChannel {
      if (chosen(backend) === 'node:zlib') return nodeZstdRecv(pageSize);
      const ch = workerChannel(channelId, { op: 'dsetup' });
      return {
        recv: async (header, payload) => [await ch.run('decompress', payload, payloadPool, pagePool, header.normalPages * pageSize)],
        release: (pages) => {
          for (const b of pages) pagePool.give(b.buffer);
        },
        cleanup: () => ch.cleanup(),
      };
    },
  };
}
