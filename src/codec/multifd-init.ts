// MultiFDInit_t: the 64 bytes that open every multifd socket channel (docs/protocol.md §3.2).

import { MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MULTIFD_VERSION } from './constants.js';
import { ProtocolError } from './errors.js';

export interface MultifdInit {
  magic: number;
  version: number;
  /** 16 raw bytes; all zero when the source has no -uuid. */
  uuid: Buffer;
  id: number;
}

export const ZERO_UUID = Buffer.alloc(16);

export function encodeMultifdInit(id: number, uuid: Buffer = ZERO_UUID): Buffer {
  if (!Number.isInteger(id) || id < 0 || id > 255) throw new RangeError(`channel id ${id} out of range 0..255`);
  if (uuid.length !== 16) throw new RangeError('uuid must be 16 bytes');
  const b = Buffer.alloc(MULTIFD_INIT_SIZE);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  uuid.copy(b, 8);
  b[24] = id;
  return b;
}

/** Decodes and checks magic and version; id and uuid policy are the receiver's to check. */
export function decodeMultifdInit(b: Buffer): MultifdInit {
  if (b.length < MULTIFD_INIT_SIZE) throw new ProtocolError('TRUNCATED', `multifd init message is ${b.length} bytes, expected ${MULTIFD_INIT_SIZE}`);
  const magic = b.readUInt32BE(0);
  if (magic !== MULTIFD_MAGIC) {
    throw new ProtocolError('BAD_MAGIC', `multifd init has bad magic 0x${magic.toString(16).padStart(8, '0')} (expected 0x11223344)`);
  }
  const version = b.readUInt32BE(4);
  if (version !== MULTIFD_VERSION) {
    throw new ProtocolError('BAD_VERSION', `multifd init has version ${version} (supported: ${MULTIFD_VERSION})`);
  }
  return { magic, version, uuid: Buffer.from(b.subarray(8, 24)), id: b[24]! };
}

/** Formats 16 raw bytes the way QEMU prints a uuid. */
export function formatUuid(u: Buffer): string {
  const h = u.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function parseUuid(s: string): Buffer {
  const hex = s.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new RangeError(`not a uuid: ${s}`);
  return Buffer.from(hex, 'hex');
}
