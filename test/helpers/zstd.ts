// Whether zstd runs in this process, for tests that need it: node:zlib has it on Node >= 22.15;
// elsewhere (Node 20) only the optional zstd-napi package provides it, and a machine without build
// tools installs without it. Such tests skip then, all with the same reason.

import { zstdUnavailable, type ZstdBackend } from '../../src/engine/methods/zstd.js';

export const ZSTD_SKIP: string | false = zstdUnavailable()
  ? `zstd not available on Node ${process.versions.node} (no zstd in node:zlib, optional zstd-napi not installed): use Node >= 22.15, or npm install zstd-napi`
  : false;

/** The zstd implementations that run here. */
export const ZSTD_BACKENDS: ZstdBackend[] = (['node:zlib', 'zstd-napi'] as const).filter((b) => zstdUnavailable(b) === undefined);
