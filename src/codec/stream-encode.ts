// Encoders for the main migration stream's records (docs/protocol.md §1–§2), used by writers of
// files and streams. Each returns a fresh Buffer; none is on a per-page hot path.

import { Command, QEVM_MAGIC, QEVM_VERSION, RamFlag, SectionType, TARGET_PAGE_SIZE } from './constants.js';

/** A u8-counted name (section idstr, block idstr): at most 255 bytes, or the length byte would wrap. */
function countedName(name: string, what: string): Buffer {
  const id = Buffer.from(name, 'latin1');
  if (id.length > 255) throw new RangeError(`${what} "${name.slice(0, 40)}..." is ${id.length} bytes; a counted name has at most 255`);
  return id;
}

export function encodeStreamHeader(): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(QEVM_MAGIC, 0);
  b.writeUInt32BE(QEVM_VERSION, 4);
  return b;
}

export function encodeSectionFull(type: typeof SectionType.START | typeof SectionType.FULL, sectionId: number, idstr: string, instanceId: number, versionId: number): Buffer {
  const id = countedName(idstr, 'section idstr');
  const b = Buffer.alloc(1 + 4 + 1 + id.length + 8);
  b[0] = type;
  b.writeUInt32BE(sectionId, 1);
  b[5] = id.length;
  id.copy(b, 6);
  b.writeUInt32BE(instanceId, 6 + id.length);
  b.writeUInt32BE(versionId, 10 + id.length);
  return b;
}

export function encodeSectionShort(type: typeof SectionType.PART | typeof SectionType.END, sectionId: number): Buffer {
  const b = Buffer.alloc(5);
  b[0] = type;
  b.writeUInt32BE(sectionId, 1);
  return b;
}

export function encodeFooter(sectionId: number): Buffer {
  const b = Buffer.alloc(5);
  b[0] = SectionType.FOOTER;
  b.writeUInt32BE(sectionId, 1);
  return b;
}

export function encodeCommand(cmd: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(5 + payload.length);
  b[0] = SectionType.COMMAND;
  b.writeUInt16BE(cmd, 1);
  b.writeUInt16BE(payload.length, 3);
  payload.copy(b, 5);
  return b;
}

export const encodeSwitchoverStart = (): Buffer => encodeCommand(Command.SWITCHOVER_START);

/** PING with a be32 value: the destination answers PONG(value) on the return path. */
export function encodePing(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return encodeCommand(Command.PING, b);
}

export function encodeRamFlags(flags: number, offset = 0): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(offset) | BigInt(flags));
  return b;
}

export const encodeEos = (): Buffer => encodeRamFlags(RamFlag.EOS);
export const encodeMultifdFlush = (): Buffer => encodeRamFlags(RamFlag.MULTIFD_FLUSH);

export function encodeMemSize(totalBytes: number): Buffer {
  return encodeRamFlags(RamFlag.MEM_SIZE, totalBytes);
}

/**
 * One block entry of the MEM_SIZE list: counted idstr + be64 used_length (+ optional fields, in
 * ram.c ram_save_setup's order: the page size that postcopy-ram adds for a block whose page size
 * differs from the host's, then x-ignore-shared's mr_addr).
 */
export function encodeBlockEntry(name: string, usedLength: number, extra: { mrAddr?: number; pageSize?: number } = {}): Buffer {
  const id = countedName(name, 'block name');
  const b = Buffer.alloc(1 + id.length + 8 + (extra.pageSize !== undefined ? 8 : 0) + (extra.mrAddr !== undefined ? 8 : 0));
  b[0] = id.length;
  id.copy(b, 1);
  let at = 1 + id.length;
  b.writeBigUInt64BE(BigInt(usedLength), at);
  at += 8;
  if (extra.pageSize !== undefined) {
    b.writeBigUInt64BE(BigInt(extra.pageSize), at);
    at += 8;
  }
  if (extra.mrAddr !== undefined) b.writeBigUInt64BE(BigInt(extra.mrAddr), at);
  return b;
}

/** An XBZRLE record: page header (block omitted under CONTINUE), ENCODING_FLAG_XBZRLE, be16 length, delta. */
export function encodeXbzrleRecord(offset: number, block: string | undefined, delta: Buffer): Buffer[] {
  const id = block === undefined ? undefined : countedName(block, 'block name');
  const b = Buffer.alloc(8 + (id ? 1 + id.length : 0) + 3);
  b.writeBigUInt64BE(BigInt(offset) | BigInt(RamFlag.XBZRLE | (id ? 0 : RamFlag.CONTINUE)));
  let at = 8;
  if (id) {
    b[8] = id.length;
    id.copy(b, 9);
    at += 1 + id.length;
  }
  b[at] = 0x01;
  b.writeUInt16BE(delta.length, at + 1);
  return [b, delta];
}

/** Header of a PAGE or ZERO record; `block` is omitted when CONTINUE applies. */
export function encodePageRecordHeader(flag: typeof RamFlag.PAGE | typeof RamFlag.ZERO, offset: number, block: string | undefined): Buffer {
  const id = block === undefined ? undefined : countedName(block, 'block name');
  const b = Buffer.alloc(8 + (id ? 1 + id.length : 0));
  b.writeBigUInt64BE(BigInt(offset) | BigInt(flag | (id ? 0 : RamFlag.CONTINUE)));
  if (id) {
    b[8] = id.length;
    id.copy(b, 9);
  }
  return b;
}

export function encodeZeroRecord(offset: number, block: string | undefined): Buffer {
  return Buffer.concat([encodePageRecordHeader(RamFlag.ZERO, offset, block), Buffer.from([0])]);
}

export { TARGET_PAGE_SIZE };
