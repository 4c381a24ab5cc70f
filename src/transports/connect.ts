// Outgoing migration connections (tcp or unix) and gather writes onto them.

import { connect as netConnect, type Socket } from 'node:net';
import { parseAddress } from './address.js';

export class ConnectError extends Error {
  constructor(readonly address: string, readonly code: string | undefined, message: string) {
    super(message);
    this.name = 'ConnectError';
  }
}

function explain(address: string, e: NodeJS.ErrnoException): string {
  switch (e.code) {
    case 'ECONNREFUSED':
      return `connection to ${address} refused: is the destination listening (migrate-incoming issued)?`;
    case 'ENOENT':
      return `no unix socket at ${address.slice(5)}: is the destination listening (migrate-incoming issued)?`;
    case 'ETIMEDOUT':
      return `connection to ${address} timed out`;
    default:
      return `cannot connect to ${address}: ${e.message}`;
  }
}

/** Connects with TCP_NODELAY; rejects with a ConnectError that says what to check. */
export function connectTo(address: string, timeoutMs = 10000): Promise<Socket> {
  const a = parseAddress(address);
  return new Promise((resolve, reject) => {
    const s = a.kind === 'unix' ? netConnect(a.path) : netConnect(a.port, a.host);
    s.setNoDelay(true);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new ConnectError(address, 'ETIMEDOUT', explain(address, Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' }))));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (e: NodeJS.ErrnoException): void => {
      clearTimeout(timer);
      reject(new ConnectError(address, e.code, explain(address, e)));
    };
    s.once('error', onError);
  });
}

/**
 * Writes the buffers as one gather write (cork → writev) and resolves when the last one has been
 * handed to the kernel, so the caller may reuse them.
 */
export function gatherWrite(sock: Socket, bufs: readonly Buffer[]): Promise<void> {
  return new Promise((resolve, reject) => {
    if (sock.destroyed || !sock.writable) {
      reject(new Error('connection closed'));
      return;
    }
    let last = bufs.length - 1;
    while (last >= 0 && bufs[last]!.length === 0) last--;
    if (last < 0) {
      resolve();
      return;
    }
    sock.cork();
    for (let i = 0; i < last; i++) if (bufs[i]!.length > 0) sock.write(bufs[i]!);
    sock.write(bufs[last]!, (err) => (err ? reject(err) : resolve()));
    sock.uncork();
  });
}
