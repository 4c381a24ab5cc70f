// Telling an incoming migration connection's kind from its first four bytes, as QEMU's
// destination does: "QEVM" opens the main channel, 0x11223344 a multifd channel.

import type { Socket } from 'node:net';
import { MULTIFD_MAGIC, QEVM_MAGIC } from '../codec/constants.js';
import { ProtocolError } from '../codec/errors.js';
import { chunksWithPrefix, describePeer, readAtLeast } from '../transports/socket-io.js';

export type ConnectionKind = 'main' | 'multifd';

/**
 * Waits for the connection's magic and hands its bytes (magic included) to `onKind`. A silent,
 * closed or unknown connection is destroyed and reported to `onError` with its peer named.
 */
export function classifyConnection(
  sock: Socket,
  timeoutMs: number,
  onKind: (kind: ConnectionKind, source: AsyncIterable<Buffer>, peer: string) => void,
  onError: (e: Error) => void,
): void {
  sock.setNoDelay(true);
  // Errors surface through the readers; this keeps an ECONNRESET from crashing the process.
  sock.on('error', () => {});
  // Taken now: once the socket is closed or destroyed, remoteAddress is undefined.
  const peer = describePeer(sock);
  readAtLeast(sock, 4, timeoutMs).then(
    (first) => {
      const magic = first.readUInt32BE(0);
      if (magic === QEVM_MAGIC || magic === MULTIFD_MAGIC) {
        onKind(magic === QEVM_MAGIC ? 'main' : 'multifd', chunksWithPrefix(first, sock), peer);
        return;
      }
      sock.destroy();
      onError(new ProtocolError('BAD_MAGIC', `unknown channel magic 0x${magic.toString(16).padStart(8, '0')} from ${peer} (expected QEVM or 0x11223344)`));
    },
    (e: Error) => {
      sock.destroy();
      onError(new Error(`connection from ${peer}: ${e.message}`));
    },
  );
}
