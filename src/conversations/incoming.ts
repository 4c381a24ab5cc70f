// Telling an incoming migration connection's kind from its first four bytes, as QEMU's
// destination does: "QEVM" opens the main channel, 0x11223344 a multifd channel.
//
// Anything else on the port — a scanner, a health check, a connection that never speaks — is a
// stray: it is closed and reported, and never fails the migration that is (or will be) under
// way. Strays may not pile up either: past a few connections still waiting to identify
// themselves, new ones are closed at once.

import type { Socket } from 'node:net';
import { MULTIFD_MAGIC, QEVM_MAGIC } from '../codec/constants.js';
import { ProtocolError, StrayConnectionError } from '../codec/errors.js';
import { ringSource } from '../transports/ring-reader.js';
import { chunksWithPrefix, describePeer, readAtLeast } from '../transports/socket-io.js';

/**
 * A multifd channel's read ring: the multifd receiver's default window of writes in flight
 * (8 MiB) plus two of the largest packets (1 MiB compressed payload each) and change. A larger
 * window only makes reading pause until writes settle.
 */
const MULTIFD_RING_BYTES = 12 * 1024 * 1024;

export type ConnectionKind = 'main' | 'multifd';

export { StrayConnectionError } from '../codec/errors.js';


/**
 * Waits for the connection's magic and hands its bytes (magic included) to `onKind`. A silent,
 * closed or unknown connection is destroyed and reported to `onStray` with its peer named.
 */
export function classifyConnection(
  sock: Socket,
  timeoutMs: number,
  onKind: (kind: ConnectionKind, source: AsyncIterable<Buffer>, peer: string) => void,
  onStray: (e: StrayConnectionError) => void,
  adoptUnknown?: (source: AsyncIterable<Buffer>, peer: string) => boolean,
  /** Read multifd channels into a reused ring where the socket allows it (default true). */
  readRing = true,
): void {
  sock.setNoDelay(true);
  // Errors surface through the readers; this keeps an ECONNRESET from crashing the process.
  sock.on('error', () => {});
  // Taken now: once the socket is closed or destroyed, remoteAddress is undefined.
  const peer = describePeer(sock);
  readAtLeast(sock, 4, timeoutMs).then(
    (first) => {
      const magic = first.readUInt32BE(0);
      if (magic === QEVM_MAGIC) {
        onKind('main', chunksWithPrefix(first, sock), peer);
        return;
      }
      if (magic === MULTIFD_MAGIC) {
        // The bulk of a migration: read into reused memory where the socket allows it.
        onKind('multifd', (readRing ? ringSource(sock, first, { capacity: MULTIFD_RING_BYTES }) : undefined) ?? chunksWithPrefix(first, sock), peer);
        return;
      }
      if (adoptUnknown?.(chunksWithPrefix(first, sock), peer)) return;
      sock.destroy();
      const bad = new ProtocolError('BAD_MAGIC', `unknown channel magic 0x${magic.toString(16).padStart(8, '0')} (expected QEVM or 0x11223344)`);
      onStray(new StrayConnectionError(peer, bad.message));
    },
    (e: Error) => {
      sock.destroy();
      onStray(new StrayConnectionError(peer, e.message));
    },
  );
}

/** Default cap on connections still waiting to send their magic (receive, relay: maxPendingConnections). */
export const DEFAULT_MAX_PENDING = 16;
/** Default time a new connection has to send its magic (receive, relay: identifyTimeoutMs). */
export const DEFAULT_IDENTIFY_TIMEOUT_MS = 10_000;

export interface IncomingOptions {
  /** How long a new connection may take to send its magic. */
  identifyTimeoutMs: number;
  /** Connections allowed to be waiting for their magic at once; more are closed at once. */
  maxPending: number;
  onKind: (sock: Socket, kind: ConnectionKind, source: AsyncIterable<Buffer>, peer: string) => void;
  onStray: (e: StrayConnectionError) => void;
  /**
   * A postcopy preempt channel has no magic (docs/protocol.md §6.3): offered every new connection
   * before it identifies itself (`byOrder`: QEMU's rule, the one after main and all multifd
   * channels), and one whose first bytes are no known magic before it is closed as a stray (a
   * preempt channel that raced a multifd channel's init). True when taken.
   */
  takePreempt?: (sock: Socket, source: AsyncIterable<Buffer>, byOrder: boolean) => boolean;
  /** Read multifd channels into a reused ring where the socket allows it (default true). */
  readRing?: boolean;
}

/** The listening side's sorter: classifies each connection, with a cap on those still unidentified. */
export class IncomingConnections {
  private pending = 0;

  constructor(private readonly o: IncomingOptions) {}

  accept(sock: Socket): void {
    if (this.o.takePreempt?.(sock, sock as AsyncIterable<Buffer>, true)) return;
    if (this.pending >= this.o.maxPending) {
      const peer = describePeer(sock);
      sock.destroy();
      this.o.onStray(new StrayConnectionError(peer, `closed at once: ${this.pending} connections are already waiting to identify themselves`));
      return;
    }
    this.pending++;
    classifyConnection(
      sock,
      this.o.identifyTimeoutMs,
      (kind, source, peer) => {
        this.pending--;
        this.o.onKind(sock, kind, source, peer);
      },
      (e) => {
        this.pending--;
        this.o.onStray(e);
      },
      this.o.takePreempt
        ? (source) => {
          if (!this.o.takePreempt!(sock, source, false)) return false;
          this.pending--;
          return true;
        }
        : undefined,
      this.o.readRing ?? true,
    );
  }
}
