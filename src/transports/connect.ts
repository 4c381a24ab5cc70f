// Outgoing migration connections (tcp or unix) and gather writes onto them.

import { connect as netConnect, type Socket } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { parseAddress } from './address.js';
import { clientTlsOptions, type TlsCreds } from './tls.js';

import { ConnectError } from '../codec/errors.js';
export { ConnectError } from '../codec/errors.js';

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
export function connectTo(address: string, timeoutMs = 10000, tlsCreds?: TlsCreds): Promise<Socket> {
  const a = parseAddress(address);
  // With TLS, the handshake is part of connecting: the socket is handed over once it is secure.
  const tlsOpts = tlsCreds ? clientTlsOptions(tlsCreds, a.kind === 'tcp' ? a.host : undefined) : undefined;
  return new Promise((resolve, reject) => {
    let s: Socket;
    if (tlsOpts) s = a.kind === 'unix' ? tlsConnect({ ...tlsOpts, path: a.path }) : tlsConnect({ ...tlsOpts, host: a.host, port: a.port });
    else s = a.kind === 'unix' ? netConnect(a.path) : netConnect(a.port, a.host);
    s.setNoDelay(true);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new ConnectError(address, 'ETIMEDOUT', explain(address, Object.assign(new Error('timeout'), { code: 'ETIMEDOUT' }))));
    }, timeoutMs);
    s.once(tlsOpts ? 'secureConnect' : 'connect', () => {
      clearTimeout(timer);
      s.off('error', onError);
      resolve(s);
    });
    const onError = (e: NodeJS.ErrnoException): void => {
      clearTimeout(timer);
      s.destroy();
      reject(new ConnectError(address, e.code, tlsOpts && !e.syscall ? `TLS handshake with ${address} failed: ${e.message} (do both sides use certificates from the same CA, and does the server's name match?)` : explain(address, e)));
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
