// Worker thread for zstd through the optional native package zstd-napi (docs/protocol.md §4.3),
// used where node:zlib has no zstd (Node 20): holds the per-channel streaming contexts and runs
// the (synchronous) libzstd calls, so that compression and decompression stay off the main
// thread. Each channel's context lives in one worker for the whole migration.

import { parentPort } from 'node:worker_threads';
import { loadZstdNapi, type ZstdNapiBinding } from './zstd-napi.js';

// The main thread loaded it before starting this worker (zstdUnavailable()), so this succeeds.
const binding: ZstdNapiBinding = loadZstdNapi()!;

type Request =
  | { id: number; op: 'csetup'; key: string; level: number }
  | { id: number; op: 'dsetup'; key: string }
  | { id: number; op: 'compress'; key: string; data: Uint8Array; out: Uint8Array }
  | { id: number; op: 'decompress'; key: string; data: Uint8Array; out: Uint8Array }
  | { id: number; op: 'free'; key: string };

const cctx = new Map<string, InstanceType<ZstdNapiBinding['CCtx']>>();
const dctx = new Map<string, InstanceType<ZstdNapiBinding['DCtx']>>();
/** Streams that failed: their state is lost, so every later packet fails with the first error. */
const failed = new Map<string, string>();

// Errors thrown here reach the main thread as their text only, and become ProtocolErrors there
// (zstd.ts): plain Errors are enough.
function compress(key: string, src: Uint8Array, out: Uint8Array): Uint8Array {
  const c = cctx.get(key);
  if (!c) throw new Error(`no zstd compression context ${key}`);
  let dst: Uint8Array = out;
  let produced = 0;
  let consumed = 0;
  for (;;) {
    if (produced === dst.length) {
      const bigger = Buffer.allocUnsafeSlow(dst.length * 2);
      bigger.set(dst);
      dst = bigger;
    }
    // flush: the packet's bytes must decode on their own given the earlier ones; the frame
    // is never ended, as in QEMU.
    const [remaining, out, used] = c.compressStream2(dst.subarray(produced), src.subarray(consumed), binding.EndDirective.flush);
    produced += out;
    consumed += used;
    if (remaining === 0 && consumed === src.length) break;
  }
  return dst.subarray(0, produced);
}

/** Decodes into `dst`, whose length is what the packet header announces. */
function decompress(key: string, src: Uint8Array, dst: Uint8Array): Uint8Array {
  const d = dctx.get(key);
  if (!d) throw new Error(`no zstd decompression context ${key}`);
  const expected = dst.length;
  const probe = new Uint8Array(1);
  const tooMuch = (): Error => new Error(`zstd payload decodes to more than the ${expected} bytes its header announces`);
  let produced = 0;
  let consumed = 0;
  while (consumed < src.length) {
    // Once the pages are full, the rest of the input may only hold block trailers: decode into a
    // 1-byte probe, and any output there is more than announced.
    const full = produced === expected;
    const [, out, used] = d.decompressStream(full ? probe : dst.subarray(produced), src.subarray(consumed));
    if (full && out > 0) throw tooMuch();
    produced += out;
    consumed += used;
    if (out === 0 && used === 0) throw new Error('zstd stream makes no progress (corrupt payload?)');
  }
  while (produced < expected) {
    const out = d.decompressStream(dst.subarray(produced), new Uint8Array(0))[1];
    if (out === 0) break;
    produced += out;
  }
  // Output zstd still holds back would also be more than announced.
  if (produced === expected && d.decompressStream(probe, new Uint8Array(0))[1] > 0) throw tooMuch();
  if (produced !== expected) throw new Error(`zstd payload decodes to ${produced} bytes, expected ${expected}`);
  return dst;
}

parentPort!.on('message', (m: Request) => {
  const earlier = failed.get(m.key);
  if (earlier !== undefined && m.op !== 'free') {
    parentPort!.postMessage({ id: m.id, error: earlier });
    return;
  }
  try {
    switch (m.op) {
      case 'csetup': {
        const c = new binding.CCtx();
        c.setParameter(binding.CParameter.compressionLevel, m.level);
        cctx.set(m.key, c);
        parentPort!.postMessage({ id: m.id });
        return;
      }
      case 'dsetup':
        dctx.set(m.key, new binding.DCtx());
        parentPort!.postMessage({ id: m.id });
        return;
      case 'compress':
      case 'decompress': {
        const out = m.op === 'compress' ? compress(m.key, m.data, m.out) : decompress(m.key, m.data, m.out);
        // Both buffers go back: the caller's pools reuse them.
        parentPort!.postMessage({ id: m.id, data: out, input: m.data }, [out.buffer as ArrayBuffer, m.data.buffer as ArrayBuffer]);
        return;
      }
      case 'free':
        cctx.delete(m.key);
        dctx.delete(m.key);
        failed.delete(m.key);
        parentPort!.postMessage({ id: m.id });
        return;
    }
  } catch (e) {
    const msg = (e as Error).message;
    const error = msg.startsWith('zstd') ? msg : `zstd: ${msg}`;
    failed.set(m.key, error);
    parentPort!.postMessage({ id: m.id, error });
  }
});
