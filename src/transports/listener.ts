// A listening socket for incoming migration channels (tcp or unix).

import { createServer, type Server, type Socket } from 'node:net';
import { unlink } from 'node:fs/promises';
import { formatAddress, parseAddress, type Address } from './address.js';

export interface Listener {
  /** The bound address, with the real port when 0 was asked for. */
  address: Address;
  server: Server;
  close(): Promise<void>;
}

export async function listen(spec: string, onConnection: (s: Socket) => void): Promise<Listener> {
  const addr = parseAddress(spec);
  const server = createServer({ noDelay: true }, onConnection);
  await new Promise<void>((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      reject(new Error(`cannot listen on ${spec}: ${e.code === 'EADDRINUSE' ? 'address already in use' : e.message}`));
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
