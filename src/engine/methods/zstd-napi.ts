// The optional native zstd binding (npm package zstd-napi), loaded only when asked for. It is an
// optionalDependency: where it could not be built (no prebuilt binary, no python3/make/g++) npm
// leaves it out and installation still succeeds, so nothing may import it statically, not even
// for types (tsc would fail without it). The few calls the worker makes are typed here.

import { createRequire } from 'node:module';

export const ZSTD_NAPI_PACKAGE = 'zstd-napi';

export interface ZstdNapiBinding {
  CCtx: new () => {
    setParameter(param: number, value: number): void;
    /** [bytes still to flush, bytes written to dst, bytes read from src] */
    compressStream2(dst: Uint8Array, src: Uint8Array, end: number): [number, number, number];
  };
  DCtx: new () => {
    /** [hint, bytes written to dst, bytes read from src] */
    decompressStream(dst: Uint8Array, src: Uint8Array): [number, number, number];
  };
  CParameter: { compressionLevel: number };
  EndDirective: { flush: number };
}

let loaded: { binding?: ZstdNapiBinding; error?: string } | undefined;

/** The binding, or undefined when it is not installed or does not load (see zstdNapiLoadError). */
export function loadZstdNapi(): ZstdNapiBinding | undefined {
  if (!loaded) {
    try {
      loaded = { binding: createRequire(import.meta.url)(`${ZSTD_NAPI_PACKAGE}/binding.js`) as ZstdNapiBinding };
    } catch (e) {
      loaded = { error: (e as Error).message.split('\n')[0] };
    }
  }
  return loaded.binding;
}

/** Why the binding did not load, or undefined when it did. */
export function zstdNapiLoadError(): string | undefined {
  loadZstdNapi();
  return loaded!.error;
}

/** zstd-napi's streaming decompressor (whole files); call only once loadZstdNapi() succeeded. */
export function zstdNapiDecompressStream(): import('node:stream').Transform {
  const { DecompressStream } = createRequire(import.meta.url)(ZSTD_NAPI_PACKAGE) as { DecompressStream: new () => import('node:stream').Transform };
  return new DecompressStream();
}
