// MultiFDPacket_t, the fixed 1344-byte header of every multifd RAM packet (docs/protocol.md §3.3–§3.5).

import {
  MULTIFD_MAGIC,
  MULTIFD_MAX_COMPRESSED_PAYLOAD,
  MULTIFD_PACKET_HEADER_SIZE,
  MULTIFD_PAGES_PER_PACKET,
  MULTIFD_VERSION,
  MultifdFlag,
  TARGET_PAGE_SIZE,
  compressionFromFlags,
} from './constants.js';
import { ProtocolError } from './errors.js';

export interface MultifdPacketHeader {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  nextPacketSize: number;
  packetNum: bigint;
  zeroPages: number;
  /** Block idstr; empty in SYNC packets. */
  ramblock: string;
  /** Byte offsets within the block: normalPages data pages (payload order) then zeroPages zero pages. */
  offsets: Float64Array;
}

const RAMBLOCK_FIELD = 256;

export function isSync(h: MultifdPacketHeader): boolean {
  return (h.flags & MultifdFlag.SYNC) !== 0;
}

/**
 * Decodes a header and applies the checks that depend on nothing but the header itself.
 * Block existence and offset ranges are checked by validatePacketPages with the block table.
 */
/** `expectedCompressionFlags` undefined accepts any method (a receiver that detects it). */
export function decodeMultifdPacketHeader(b: Buffer, expectedCompressionFlags: number | undefined): MultifdPacketHeader {
  if (b.length < MULTIFD_PACKET_HEADER_SIZE) {
    throw new ProtocolError('TRUNCATED', `packet header is ${b.length} bytes, expected ${MULTIFD_PACKET_HEADER_SIZE}`);
  }
  const magic = b.readUInt32BE(0);
  if (magic !== MULTIFD_MAGIC) {
    throw new ProtocolError('BAD_MAGIC', `packet has bad magic 0x${magic.toString(16).padStart(8, '0')} (expected 0x11223344)`);
  }
  const version = b.readUInt32BE(4);
  if (version !== MULTIFD_VERSION) {
    throw new ProtocolError('BAD_VERSION', `packet has version ${version} (supported: ${MULTIFD_VERSION})`);
  }
  const flags = b.readUInt32BE(8);
  if (flags & MultifdFlag.DEVICE_STATE) {
    throw new ProtocolError('UNSUPPORTED', 'device-state packet (VFIO multifd device state) is not supported');
  }
  if (flags & ~(MultifdFlag.SYNC | MultifdFlag.COMPRESSION_MASK)) {
    throw new ProtocolError('BAD_FLAGS', `packet has unknown flags 0x${flags.toString(16)}`);
  }
  const pagesAlloc = b.readUInt32BE(12);
  const normalPages = b.readUInt32BE(16);
  const nextPacketSize = b.readUInt32BE(20);
  const packetNum = b.readBigUInt64BE(24);
  const zeroPages = b.readUInt32BE(32);

  // QEMU checks the compression bits only on packets that carry pages: SYNC packets go out as 0x01.
  const comp = flags & MultifdFlag.COMPRESSION_MASK;
  if (normalPages + zeroPages > 0 && expectedCompressionFlags !== undefined && comp !== expectedCompressionFlags) {
    const got = compressionFromFlags(comp) ?? `flags 0x${comp.toString(16)}`;
    const want = compressionFromFlags(expectedCompressionFlags) ?? `0x${expectedCompressionFlags.toString(16)}`;
    throw new ProtocolError('FLAG_MISMATCH', `source uses ${got}, receiver expects ${want} (packet flags 0x${flags.toString(16)})`);
  }
  if (pagesAlloc > MULTIFD_PAGES_PER_PACKET) {
    throw new ProtocolError('COUNT_TOO_LARGE', `packet pages_alloc ${pagesAlloc} exceeds ${MULTIFD_PAGES_PER_PACKET}`);
  }
  if (normalPages > pagesAlloc) {
    throw new ProtocolError('COUNT_TOO_LARGE', `packet normal_pages ${normalPages} exceeds pages_alloc ${pagesAlloc}`);
  }
  if (zeroPages > pagesAlloc - normalPages) {
    throw new ProtocolError('COUNT_TOO_LARGE', `packet zero_pages ${zeroPages} exceeds pages_alloc ${pagesAlloc} - normal_pages ${normalPages}`);
  }
  if (comp !== MultifdFlag.NOCOMP) {
    if (normalPages === 0 && nextPacketSize !== 0) {
      throw new ProtocolError('BAD_RECORD', `packet has no normal pages but next_packet_size ${nextPacketSize} (expected empty packet)`);
    }
    if (nextPacketSize > MULTIFD_MAX_COMPRESSED_PAYLOAD) {
      throw new ProtocolError('LIMIT_EXCEEDED', `next_packet_size ${nextPacketSize} exceeds allocated ${MULTIFD_MAX_COMPRESSED_PAYLOAD}`);
    }
  }

  // QEMU terminates the field itself (ramblock[255] = 0): a name has at most 255 bytes, as a
  // block idstr does, and a 256th byte is ignored rather than making a name no block can have.
  const nameField = b.subarray(64, 64 + RAMBLOCK_FIELD - 1);
  const nul = nameField.indexOf(0);
  const ramblock = nameField.subarray(0, nul < 0 ? nameField.length : nul).toString('latin1');

  const count = normalPages + zeroPages;
  const offsets = new Float64Array(count);
  for (let i = 0; i < count; i++) {
    // Two 32-bit halves, not a BigInt per offset (up to 128 per packet, on every packet).
    const hi = b.readUInt32BE(320 + 8 * i);
    const lo = b.readUInt32BE(324 + 8 * i);
    // Anything from 2^53 on (hi ≥ 2^21) is out of range for every block; keep it visible to the
    // range check.
    offsets[i] = hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 + lo;
  }
  return { flags, pagesAlloc, normalPages, nextPacketSize, packetNum, zeroPages, ramblock, offsets };
}

/** Bytes of payload that follow the header, as QEMU's receiver computes them (§3.4). */
export function payloadSize(h: MultifdPacketHeader, pageSize = TARGET_PAGE_SIZE): number {
  if ((h.flags & MultifdFlag.COMPRESSION_MASK) === MultifdFlag.NOCOMP) return h.normalPages * pageSize;
  return h.nextPacketSize;
}

/** Checks that every listed page lies inside its block; `usedLength` undefined = unknown block. */
export function validatePacketPages(h: MultifdPacketHeader, usedLength: number | undefined, pageSize = TARGET_PAGE_SIZE): void {
  const count = h.normalPages + h.zeroPages;
  if (count === 0) return;
  if (usedLength === undefined) {
    throw new ProtocolError('UNKNOWN_BLOCK', `packet names unknown RAM block "${h.ramblock}"`);
  }
  for (let i = 0; i < count; i++) {
    const off = h.offsets[i]!;
    if (off % pageSize !== 0 || off > usedLength - pageSize) {
      throw new ProtocolError('OFFSET_OUT_OF_RANGE', `packet offset 0x${off.toString(16)} is outside block "${h.ramblock}" (used_length 0x${usedLength.toString(16)})`);
    }
  }
}

export interface EncodePacketOptions {
  flags: number;
  pagesAlloc?: number;
  normalPages: number;
  zeroPages: number;
  nextPacketSize: number;
  packetNum: bigint;
  ramblock: string;
  /** normal offsets first, then zero offsets. */
  offsets: ArrayLike<number>;
}

/** Writes a header into `into` (reused by senders) or a fresh buffer. */
export function encodeMultifdPacketHeader(o: EncodePacketOptions, into?: Buffer): Buffer {
  const b = into ?? Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE);
  if (into) b.fill(0, 0, MULTIFD_PACKET_HEADER_SIZE);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  b.writeUInt32BE(o.flags, 8);
  b.writeUInt32BE(o.pagesAlloc ?? (o.flags & MultifdFlag.SYNC ? 0 : MULTIFD_PAGES_PER_PACKET), 12);
  b.writeUInt32BE(o.normalPages, 16);
  b.writeUInt32BE(o.nextPacketSize, 20);
  b.writeBigUInt64BE(o.packetNum, 24);
  b.writeUInt32BE(o.zeroPages, 32);
  if (Buffer.byteLength(o.ramblock, 'latin1') >= RAMBLOCK_FIELD) throw new RangeError('ramblock name too long');
  b.write(o.ramblock, 64, 'latin1');
  const count = o.normalPages + o.zeroPages;
  // Two u32 halves: a BigInt per page would allocate on the send hot path.
  for (let i = 0; i < count; i++) {
    const off = o.offsets[i]!;
    b.writeUInt32BE(Math.floor(off / 0x100000000), 320 + 8 * i);
    b.writeUInt32BE(off >>> 0, 324 + 8 * i);
  }
  return b;
}

export function encodeSyncPacket(packetNum: bigint, into?: Buffer): Buffer {
  return encodeMultifdPacketHeader(
    { flags: MultifdFlag.SYNC, pagesAlloc: 0, normalPages: 0, zeroPages: 0, nextPacketSize: 0, packetNum, ramblock: '', offsets: [] },
    into,
  );
}
