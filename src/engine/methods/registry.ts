// The one place that lists methods: adding one is a new file and a line here.

import { InvalidOptionError, ProtocolError } from '../../codec/errors.js';
import type { MultifdMethod } from './method.js';
import { nocomp } from './nocomp.js';
import { zlibMethod } from './zlib.js';
import { zstdMethod, zstdUnavailable } from './zstd.js';

const METHODS: Record<string, MultifdMethod> = {
  none: nocomp,
  zlib: zlibMethod(),
  zstd: zstdMethod(),
};

export function methodNames(): string[] {
  return Object.keys(METHODS);
}

export function getMethod(name: string): MultifdMethod {
  const m = METHODS[name];
  if (!m) throw new ProtocolError('UNSUPPORTED', `multifd compression "${name}" is not supported (available: ${methodNames().join(', ')})`);
  // Up front, before any channel or QEMU is set up: zstd may lack an implementation here.
  if (m === METHODS.zstd) {
    const missing = zstdUnavailable();
    if (missing) throw missing;
  }
  return m;
}

/** The one check of a compression level against the method's range; undefined: the method's default. */
export function checkLevel(method: MultifdMethod, level: number | undefined): void {
  if (level === undefined) return;
  const r = method.levels;
  if (!r) throw new InvalidOptionError('a compression level needs a compression method (zlib or zstd)');
  if (!Number.isInteger(level) || level < r.min || level > r.max) {
    throw new InvalidOptionError(`${method.name} level must be ${r.min}..${r.max}, as QEMU's multifd-${method.name}-level (got ${level})`);
  }
}
