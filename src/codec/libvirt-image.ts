// libvirt's save image (`virsh save`, managedsave, and the parallel "sparse" format of libvirt
// 11.1+): a 92-byte header, the domain XML and the save cookie, then QEMU's own migration stream.
// The layout is libvirt's virQEMUSaveHeader (src/qemu/qemu_saveimage.h), all little-endian:
//
//   0   magic[16]     "LibvirtQemudSave" complete, "LibvirtQemudPart" while being written
//   16  version u32   2 (1: no format field, always raw)
//   20  data_len u32  XML, NUL, cookie XML, NUL, zero padding (libvirt reserves 64 KiB extra)
//   24  was_running   1 when the domain was running at save time (restore resumes it)
//   28  format u32    0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse
//   32  cookieOffset  where the cookie starts, relative to byte 92 (0: no cookie)
//   36  unused[14]
//
// QEMU's stream starts at 92 + data_len. For sparse it is a mapped-ram stream written with
// `file:PATH,offset=N`, so its block headers hold absolute file offsets. libvirt byte-swaps a
// header whose version reads larger than 2 and tries again (images written on the other
// endianness); so do we. Pure: no I/O.

import { InvalidOptionError, ProtocolError } from './errors.js';

export const LIBVIRT_HEADER_BYTES = 92;
export const LIBVIRT_MAGIC_SAVE = 'LibvirtQemudSave';
export const LIBVIRT_MAGIC_PARTIAL = 'LibvirtQemudPart';
/** The common prefix of both magics: enough to tell a libvirt image from anything else. */
export const LIBVIRT_MAGIC_PREFIX = 'LibvirtQemud';
export const LIBVIRT_SAVE_VERSION = 2;
/** The padding libvirt leaves after the XML so that it can be edited in place (virsh save-image-edit). */
export const LIBVIRT_XML_PADDING = 64 * 1024;
/**
 * Largest data_len we read (XML, cookie and padding are held in memory). libvirt has no cap
 * beyond u32; a domain XML is a few KiB plus libvirt's 64 KiB padding.
 */
export const MAX_LIBVIRT_DATA_LEN = 64 * 1024 * 1024;

export const LIBVIRT_FORMATS = ['raw', 'gzip', 'bzip2', 'xz', 'lzop', 'zstd', 'sparse'] as const;
export type LibvirtFormat = (typeof LIBVIRT_FORMATS)[number];

export interface LibvirtHeader {
  version: number;
  dataLen: number;
  wasRunning: boolean;
  format: LibvirtFormat;
  /** Relative to LIBVIRT_HEADER_BYTES; 0 when there is no cookie. */
  cookieOffset: number;
  /** The header was written on a host of the other endianness. */
  byteSwapped: boolean;
  /** File offset where QEMU's stream (or its compressed form) begins: 92 + data_len. */
  qemuOffset: number;
}

export interface LibvirtImage extends LibvirtHeader {
  domainXml: string;
  cookie?: string;
}

/** True when `head` starts like a libvirt save image (either magic). */
export function looksLikeLibvirtImage(head: Buffer): boolean {
  return head.length >= LIBVIRT_MAGIC_PREFIX.length && head.toString('latin1', 0, LIBVIRT_MAGIC_PREFIX.length) === LIBVIRT_MAGIC_PREFIX;
}

/**
 * Decodes the 92-byte header. `fileSize`, when known, lets data_len past the end of the file be
 * refused here. Refuses a `…Part` image: libvirt had not finished writing it.
 */
export function decodeLibvirtHeader(buf: Buffer, fileSize?: number): LibvirtHeader {
  if (buf.length < LIBVIRT_HEADER_BYTES) {
    throw new ProtocolError('TRUNCATED', `libvirt save image header is truncated: ${buf.length} bytes, the header has ${LIBVIRT_HEADER_BYTES}`, { offset: buf.length });
  }
  const magic = buf.toString('latin1', 0, 16);
  if (magic === LIBVIRT_MAGIC_PARTIAL) {
    throw new ProtocolError('INCOMPLETE_IMAGE', `libvirt save image is unfinished (magic "${LIBVIRT_MAGIC_PARTIAL}"): the save did not complete, the file cannot be restored`, { offset: 0 });
  }
  if (magic !== LIBVIRT_MAGIC_SAVE) {
    throw new ProtocolError('BAD_MAGIC', `not a libvirt save image: magic ${JSON.stringify(magic)} (expected "${LIBVIRT_MAGIC_SAVE}")`, { offset: 0 });
  }
  let le = true;
  let version = buf.readUInt32LE(16);
  if (version > LIBVIRT_SAVE_VERSION) {
    le = false;
    version = buf.readUInt32BE(16);
  }
  if (version > LIBVIRT_SAVE_VERSION || version === 0) {
    throw new ProtocolError('BAD_VERSION', `libvirt save image version ${buf.readUInt32LE(16)} is not supported (supported: 1 and ${LIBVIRT_SAVE_VERSION})`, { offset: 16 });
  }
  const u32 = (at: number): number => (le ? buf.readUInt32LE(at) : buf.readUInt32BE(at));
  const dataLen = u32(20);
  const wasRunning = u32(24);
  // Version 1 images predate the format field: their stream is always raw.
  const formatNo = version === 1 ? 0 : u32(28);
  const cookieOffset = u32(32);
  if (dataLen === 0) throw new ProtocolError('BAD_RECORD', 'libvirt save image data_len is 0 (it must hold at least the domain XML)', { offset: 20 });
  if (dataLen > MAX_LIBVIRT_DATA_LEN) {
    throw new ProtocolError('LIMIT_EXCEEDED', `libvirt save image data_len ${dataLen} is larger than the ${MAX_LIBVIRT_DATA_LEN} bytes accepted`, { offset: 20 });
  }
  const qemuOffset = LIBVIRT_HEADER_BYTES + dataLen;
  if (fileSize !== undefined && qemuOffset > fileSize) {
    throw new ProtocolError('TRUNCATED', `libvirt save image data_len ${dataLen} reaches past the end of the file: the QEMU stream would start at ${qemuOffset}, the file has ${fileSize} bytes`, { offset: 20 });
  }
  const format = LIBVIRT_FORMATS[formatNo];
  if (format === undefined) {
    throw new ProtocolError('UNSUPPORTED', `libvirt save image format ${formatNo} is unknown (known: ${LIBVIRT_FORMATS.map((f, i) => `${i} ${f}`).join(', ')})`, { offset: 28 });
  }
  if (wasRunning > 1) throw new ProtocolError('BAD_RECORD', `libvirt save image was_running is ${wasRunning} (0 or 1)`, { offset: 24 });
  if (cookieOffset >= dataLen) {
    throw new ProtocolError('BAD_RECORD', `libvirt save image cookieOffset ${cookieOffset} is not inside data_len ${dataLen}`, { offset: 32 });
  }
  return { version, dataLen, wasRunning: wasRunning === 1, format, cookieOffset, byteSwapped: !le, qemuOffset };
}

/** The NUL-terminated string at `at` (relative to data); the error names its file offset. */
function cString(data: Buffer, at: number, end: number, what: string): string {
  const nul = data.indexOf(0, at);
  if (nul < 0 || nul >= end) {
    throw new ProtocolError('BAD_RECORD', `libvirt save image ${what} is not NUL-terminated within its ${end - at} bytes`, { offset: LIBVIRT_HEADER_BYTES + at });
  }
  return data.toString('utf8', at, nul);
}

/**
 * Decodes the domain XML and cookie from `data`, the data_len bytes after the header. The XML
 * runs to cookieOffset (or data_len), the cookie from there to data_len; each must end in NUL.
 */
export function decodeLibvirtData(header: LibvirtHeader, data: Buffer): LibvirtImage {
  if (data.length < header.dataLen) {
    throw new ProtocolError('TRUNCATED', `libvirt save image data is truncated: ${data.length} of its ${header.dataLen} bytes`, { offset: LIBVIRT_HEADER_BYTES + data.length });
  }
  const xmlEnd = header.cookieOffset || header.dataLen;
  const domainXml = cString(data, 0, xmlEnd, 'domain XML');
  if (domainXml.trim() === '') throw new ProtocolError('BAD_RECORD', 'libvirt save image domain XML is empty', { offset: LIBVIRT_HEADER_BYTES });
  const out: LibvirtImage = { ...header, domainXml };
  if (header.cookieOffset) out.cookie = cString(data, header.cookieOffset, header.dataLen, 'cookie');
  return out;
}

/** Both steps over a buffer that holds the file's first 92 + data_len bytes (or all of it). */
export function decodeLibvirtImage(head: Buffer, fileSize?: number): LibvirtImage {
  const header = decodeLibvirtHeader(head, fileSize);
  return decodeLibvirtData(header, head.subarray(LIBVIRT_HEADER_BYTES, header.qemuOffset));
}

export interface LibvirtImageSpec {
  domainXml: string;
  cookie?: string;
  wasRunning: boolean;
  format: LibvirtFormat;
  /** Bytes of data after the header; default: XML + cookie + LIBVIRT_XML_PADDING, as libvirt. */
  dataLen?: number;
}

/**
 * The header and data for an image, with the `…Part` magic (libvirt's order: the magic becomes
 * `…Save` only once the rest is durable; see LIBVIRT_MAGIC_SAVE and finishedMagic()).
 */
export function encodeLibvirtImage(spec: LibvirtImageSpec): Buffer {
  if (spec.domainXml.includes('\0') || spec.cookie?.includes('\0')) throw new InvalidOptionError('the domain XML and the cookie cannot contain NUL');
  const xml = Buffer.from(spec.domainXml + '\0', 'utf8');
  const cookie = spec.cookie !== undefined ? Buffer.from(spec.cookie + '\0', 'utf8') : undefined;
  const used = xml.length + (cookie?.length ?? 0);
  const dataLen = spec.dataLen ?? used + LIBVIRT_XML_PADDING;
  if (dataLen < used) throw new RangeError(`data_len ${dataLen} cannot hold the XML and cookie (${used} bytes)`);
  const out = Buffer.alloc(LIBVIRT_HEADER_BYTES + dataLen);
  out.write(LIBVIRT_MAGIC_PARTIAL, 0, 'latin1');
  out.writeUInt32LE(LIBVIRT_SAVE_VERSION, 16);
  out.writeUInt32LE(dataLen, 20);
  out.writeUInt32LE(spec.wasRunning ? 1 : 0, 24);
  out.writeUInt32LE(LIBVIRT_FORMATS.indexOf(spec.format), 28);
  out.writeUInt32LE(cookie ? xml.length : 0, 32);
  xml.copy(out, LIBVIRT_HEADER_BYTES);
  cookie?.copy(out, LIBVIRT_HEADER_BYTES + xml.length);
  return out;
}

/** The 16 bytes that turn a `…Part` image into a finished one. */
export function finishedMagic(): Buffer {
  return Buffer.from(LIBVIRT_MAGIC_SAVE, 'latin1');
}
