// Wire constants of QEMU's migration stream (docs/protocol.md §1–§5). Values are fixed by QEMU.

export const QEVM_MAGIC = 0x5145564d;
export const QEVM_VERSION = 3;

export const SectionType = {
  EOF: 0x00,
  START: 0x01,
  PART: 0x02,
  END: 0x03,
  FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  FOOTER: 0x7e,
} as const;

export const Command = {
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
  SWITCHOVER_START: 11,
} as const;
export const COMMAND_MAX = 12;

export const RamFlag = {
  ZERO: 0x002,
  MEM_SIZE: 0x004,
  PAGE: 0x008,
  EOS: 0x010,
  CONTINUE: 0x020,
  XBZRLE: 0x040,
  HOOK: 0x080,
  MULTIFD_FLUSH: 0x200,
} as const;

export const RAM_SECTION_NAME = 'ram';
export const RAM_SECTION_VERSION = 4;

export const TARGET_PAGE_SIZE = 4096;
export const TARGET_PAGE_BITS = 12;

export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_INIT_SIZE = 64;
/** Bytes of payload a RAM packet carries at most (MULTIFD_PACKET_SIZE). */
export const MULTIFD_PACKET_BYTES = 512 * 1024;
export const MULTIFD_PAGES_PER_PACKET = MULTIFD_PACKET_BYTES / TARGET_PAGE_SIZE;
export const MULTIFD_PACKET_HEADER_SIZE = 320 + 8 * MULTIFD_PAGES_PER_PACKET;
export const MULTIFD_DEVICE_STATE_HEADER_SIZE = 276;
/** QEMU 11.1 refuses compressed payloads larger than this; we apply it to every version. */
export const MULTIFD_MAX_COMPRESSED_PAYLOAD = 1024 * 1024;

export const MultifdFlag = {
  SYNC: 0x01,
  COMPRESSION_MASK: 0x3e,
  NOCOMP: 0x00,
  ZLIB: 0x02,
  ZSTD: 0x04,
  QPL: 0x08,
  UADK: 0x10,
  QATZIP: 0x20,
  DEVICE_STATE: 0x40,
} as const;

export type CompressionName = 'none' | 'zlib' | 'zstd' | 'qpl' | 'uadk' | 'qatzip';

export function compressionFromFlags(flags: number): CompressionName | undefined {
  switch (flags & MultifdFlag.COMPRESSION_MASK) {
    case MultifdFlag.NOCOMP: return 'none';
    case MultifdFlag.ZLIB: return 'zlib';
    case MultifdFlag.ZSTD: return 'zstd';
    case MultifdFlag.QPL: return 'qpl';
    case MultifdFlag.UADK: return 'uadk';
    case MultifdFlag.QATZIP: return 'qatzip';
    default: return undefined;
  }
}

export function compressionFlag(name: CompressionName): number {
  switch (name) {
    case 'none': return MultifdFlag.NOCOMP;
    case 'zlib': return MultifdFlag.ZLIB;
    case 'zstd': return MultifdFlag.ZSTD;
    case 'qpl': return MultifdFlag.QPL;
    case 'uadk': return MultifdFlag.UADK;
    case 'qatzip': return MultifdFlag.QATZIP;
  }
}

export const MAPPED_RAM_HEADER_SIZE = 28;
export const MAPPED_RAM_VERSION = 1;
export const MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000;

export const ReturnPathMessage = {
  SHUT: 1,
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  SWITCHOVER_ACK: 7,
} as const;

/** Validated capabilities in QAPI enum order: the order they appear in the configuration record. */
export const VALIDATED_CAPABILITIES = ['x-ignore-shared', 'mapped-ram'] as const;
