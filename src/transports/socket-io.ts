// Small socket helpers shared by conversations.

import type { Socket } from 'node:net';

/** Reads until at least `n` bytes arrived; returns them all (the caller re-feeds them). */
export function readAtLeast(sock: Socket, n: number, timeoutMs: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let got = 0;
    const cleanup = (): void => {
      clearTimeout(timer);
      sock.off('data', onData);
      sock.off('end', onEnd);
      sock.off('error', onError);
      sock.off('close', onEnd);
    };
    const onData = (c: Buffer): void => {
      chunks.push(c);
      got += c.length;
      if (got >= n) {
        sock.pause();
        cleanup();
        resolve(Buffer.concat(chunks, got));
      }
    };
    const onEnd = (): void => {
      cleanup();
      reject(new Error(`connection closed after ${got} bytes, before its first ${n} bytes`));
    };
    const onError = (e: Error): void => {
      cleanup();
      reject(e);
    };
    const timer = setTimeout(() => {
      cleanup();
      sock.pause();
      reject(new Error(`connection sent ${got} bytes in ${timeoutMs / 1000}s, expected at least ${n}`));
    }, timeoutMs);
    sock.on('data', onData);
    sock.once('end', onEnd);
    sock.once('close', onEnd);
    sock.once('error', onError);
  });
}

/** The socket's bytes as an async iterable, starting with bytes already read from it. */
export async function* chunksWithPrefix(prefix: Buffer, sock: Socket): AsyncGenerator<Buffer> {
  if (prefix.length > 0) yield prefix;
  for await (const c of sock) yield c as Buffer;
}

export function describePeer(sock: Socket): string {
  return sock.remoteAddress ? `${sock.remoteAddress}:${sock.remotePort}` : 'unix socket peer';
}
