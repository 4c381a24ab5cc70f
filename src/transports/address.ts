// Migration URIs as QEMU writes them: tcp:HOST:PORT and unix:PATH.

import { InvalidOptionError } from '../codec/errors.js';

export type Address = { kind: 'tcp'; host: string; port: number } | { kind: 'unix'; path: string };

export function parseAddress(s: string): Address {
  if (s.startsWith('unix:')) {
    const path = s.slice(5);
    if (!path) throw new InvalidOptionError(`bad address "${s}": unix: needs a path`);
    return { kind: 'unix', path };
  }
  if (s.startsWith('tcp:')) {
    const rest = s.slice(4);
    const m = /^\[([^\]]+)\]:(\d+)$/.exec(rest) ?? /^([^:]*):(\d+)$/.exec(rest);
    if (!m) throw new InvalidOptionError(`bad address "${s}": expected tcp:HOST:PORT`);
    const port = Number(m[2]);
    if (port > 65535) throw new InvalidOptionError(`bad address "${s}": port ${port} out of range`);
    return { kind: 'tcp', host: m[1] || '0.0.0.0', port };
  }
  throw new InvalidOptionError(`bad address "${s}": expected tcp:HOST:PORT or unix:PATH`);
}

export function formatAddress(a: Address): string {
  if (a.kind === 'unix') return `unix:${a.path}`;
  return a.host.includes(':') ? `tcp:[${a.host}]:${a.port}` : `tcp:${a.host}:${a.port}`;
}
