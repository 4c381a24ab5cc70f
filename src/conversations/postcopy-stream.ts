// Which connection is a source's postcopy preempt channel. The postcopy record rules (ADVISE →
// DISCARD → PACKAGED, the EOF that ends a postcopy stream) are the stream session's
// (codec/stream-session.ts); this is the one postcopy rule about connections.

/**
 * Whether a new connection is the source's preempt channel (it has no magic, docs/protocol.md
 * §6.3): while one is possible (postcopy advised, main channel there, no preempt yet), the
 * connection after all multifd channels identified themselves, as QEMU's destination takes it
 * (`byOrder`), or one whose first bytes are no magic (it raced a multifd channel's init).
 */
export function preemptExpected(possible: boolean, multifdConnected: number, channels: number, byOrder: boolean): boolean {
  return possible && (!byOrder || multifdConnected >= channels);
}
