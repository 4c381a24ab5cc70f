// A listening socket for incoming migration channels (tcp or unix).

import { ListenError } from '../codec/errors.js';
import { createServer, type Server, type Socket } from 'node:net';
import { createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { describePeer } from './socket-io.js';
import { serverTlsOptions, type TlsCreds } from './tls.js';
import { unlink } from 'node:fs/promises';
import { formatAddress, parseAddress, type Address } from './address.js';

export interface Listener {
  /** The bound address, with the real port when 0 was asked for. */
  address: Address;
  server: Server;
  close(): Promise<void>;
}

export interface ListenOptions {
  /** Accept TLS only: every connection is handed over once its handshake succeeded. */
  tls?: TlsCreds;
  /** How long a TLS handshake may take (default 10 s). */
  handshakeTimeoutMs?: number;
  /** A connection whose TLS handshake failed (a plain client, a wrong certificate); it is closed. */
  onTlsError?: (e: Error, peer: string) => void;
}

export async function listen(spec: string, onConnection: (s: Socket) => void, opts: ListenOptions = {}): Promise<Listener> {
  const addr = parseAddress(spec);
  let server: Server;
  if (opts.tls) {
    const tlsServer = createTlsServer({ ...serverTlsOptions(opts.tls), handshakeTimeout: opts.handshakeTimeoutMs ?? 10_000 }, (s) => {
      s.setNoDelay(true);
      onConnection(s);
    });
    tlsServer.on('tlsClientError', (e: Error, s: TLSSocket) => {
      const peer = describePeer(s);
      s.destroy();
      // OpenSSL's message carries its error stack; its reason ("wrong version number") is the news.
      const reason = (e as Error & { reason?: string }).reason ?? e.message;
      opts.onTlsError?.(new Error(`TLS handshake failed: ${reason}${/wrong version|http request|unknown protocol|packet length/i.test(reason) ? ' (a plain, non-TLS client?)' : ''}`), peer);
    });
    server = tlsServer;
  } else {
    server = createServer({ noDelay: true }, onConnection);
  }
  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      reject(new ListenError(spec, e.code, `cannot listen on ${spec}: ${e.code === 'EADDRINUSE' ? 'address already in use' : e.message}`));
    };
    server.once('error', onError);
    const done = (): void => {
      server.off('error', onError);
      resolve();
    };
    if (addr.kind === 'unix') server.listen(addr.path, done);
    else server.listen(addr.port, addr.host, done);
  });
  let bound: Address = addr;
  const info = server.address();
  if (info && typeof info === 'object') bound = { kind: 'tcp', host: addr.kind === 'tcp' ? addr.host : info.address, port: info.port };
  let closed = false;
  return {
    address: bound,
    server,
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (addr.kind === 'unix') await unlink(addr.path).catch(() => {});
    },
  };
}

export { formatAddress };
