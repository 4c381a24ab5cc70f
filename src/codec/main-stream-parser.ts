// Incremental parser of the main migration channel (docs/protocol.md §1, §2). An explicit state
// machine: push bytes, pull events; a structure split across chunks is retried whole. Device
// state after RAM has no length prefix, so from the first non-RAM section (or EOF) on the rest of
// the stream is handed out raw as 'device-state' bytes; vmdesc.ts knows how to walk it.
//
// It frames records and checks each on its own; the order of records (one START, MEM_SIZE only
// in it, device state after END, sync points, postcopy) is StreamSession's (stream-session.ts).
// Read a migration through the session, not through this parser alone.

import { ByteQueue, type Cursor } from './byte-queue.js';
import {
  COMMAND_MAX,
  Command,
  MAPPED_RAM_HEADER_SIZE,
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_SECTION_NAME,
  RAM_SECTION_VERSION,
  RamFlag,
  SectionType,
  TARGET_PAGE_SIZE,
} from './constants.js';
import { readConfiguration, type Configuration } from './configuration.js';
import { NeedMoreData, ProtocolError } from './errors.js';
import { decodeMappedRamHeader, type MappedRamHeader } from './mapped-ram.js';

export interface RamBlockInfo {
  name: string;
  usedLength: number;
  mrAddr?: number;
  mappedRam?: MappedRamHeader;
}

export type SectionKind = 'start' | 'part' | 'end' | 'full';

export type MainEvent =
  | { type: 'header'; version: number }
  | { type: 'configuration'; config: Configuration }
  | { type: 'command'; cmd: number; payload: Buffer }
  /** A PACKAGED command with its package (postcopy: LISTEN, device sections, PINGs, RUN; §6.2). */
  | { type: 'package'; data: Buffer }
  | { type: 'section'; kind: SectionKind; sectionId: number; idstr: string; instanceId: number; versionId: number }
  | { type: 'ram-mem-size'; totalBytes: number }
  | { type: 'ram-block'; block: RamBlockInfo }
  /** `continued`: the record had RAM_SAVE_FLAG_CONTINUE (its block is the previous record's). */
  | { type: 'ram-page'; block: string; offset: number; data: Buffer[]; continued: boolean }
  | { type: 'ram-zero'; block: string; offset: number; continued: boolean }
  | { type: 'ram-flush' }
  | { type: 'ram-eos' }
  | { type: 'footer'; sectionId: number }
  | { type: 'device-state'; data: Buffer[] };

export interface MainStreamParserOptions {
  pageSize?: number;
  /**
   * File offset of stream byte 0, for files written at `file:PATH,offset=N` (libvirt images):
   * every offset the parser reports (offset, errors) is then a file offset, as are mapped-ram
   * block headers' own offsets.
   */
  fileOffset?: number;
  /** Largest number of RAM blocks accepted in a MEM_SIZE list. */
  maxBlocks?: number;
  /** Largest PACKAGED command accepted (QEMU allows 4 GiB; the package is buffered whole). */
  maxPackageBytes?: number;
}

type State =
  | 'header'
  | 'configuration'
  | 'top'
  | 'ram-mem-size-blocks'
  | 'ram-records'
  | 'ram-footer'
  | 'skip'
  | 'device-state';

const FIXED_COMMAND_LEN: Record<number, number> = {
  [Command.OPEN_RETURN_PATH]: 0,
  [Command.PING]: 4,
  [Command.POSTCOPY_LISTEN]: 0,
  [Command.POSTCOPY_RUN]: 0,
  [Command.PACKAGED]: 4,
  [Command.ENABLE_COLO]: 0,
  [Command.POSTCOPY_RESUME]: 0,
  [Command.SWITCHOVER_START]: 0,
};

/** RAM blocks accepted in one MEM_SIZE list (QEMU has no cap; a pc has a handful). */
export const MAX_RAM_BLOCKS = 4096;
/** Largest PACKAGED command (QEMU allows 4 GiB; it holds the device state, buffered whole). */
export const MAX_PACKAGE_BYTES = 64 * 1024 * 1024;

export class MainStreamParser {
  private readonly q = new ByteQueue();
  private state: State = 'header';
  private readonly pageSize: number;
  private readonly fileOffset: number;
  private readonly maxBlocks: number;
  private readonly maxPackageBytes: number;

  private ramSectionId: number | undefined;
  private currentSectionId = 0;
  private config: Configuration | undefined;
  /** Last block named by a page record: CONTINUE refers to it across sections (§2.1). */
  private lastBlock: string | undefined;
  private memSizeRemaining = 0;
  private blockCount = 0;
  private skipRemaining = 0;
  private readonly blocks = new Map<string, RamBlockInfo>();

  constructor(opts: MainStreamParserOptions = {}) {
    this.pageSize = opts.pageSize ?? TARGET_PAGE_SIZE;
    this.fileOffset = opts.fileOffset ?? 0;
    this.externalSkip = this.fileOffset;
    this.maxBlocks = opts.maxBlocks ?? MAX_RAM_BLOCKS;
    this.maxPackageBytes = opts.maxPackageBytes ?? MAX_PACKAGE_BYTES;
  }

  push(chunk: Buffer): void {
    this.q.push(chunk);
  }

  get configuration(): Configuration | undefined {
    return this.config;
  }

  get ramBlocks(): ReadonlyMap<string, RamBlockInfo> {
    return this.blocks;
  }

  get inDeviceState(): boolean {
    return this.state === 'device-state';
  }

  /** Stream offset of the next unread byte. */
  get offset(): number {
    return this.q.streamOffset + this.externalSkip;
  }

  /** True when no partial structure is buffered. */
  get atBoundary(): boolean {
    return this.q.length === 0 && this.state !== 'ram-footer' && this.state !== 'skip';
  }

  /**
   * Bytes the parser wants skipped (the pages region of a mapped-ram block). A file reader may
   * seek past them and call skipped(); a stream reader can just keep pushing them.
   */
  get pendingSkip(): number {
    return this.state === 'skip' ? this.skipRemaining - this.q.length : 0;
  }

  skipped(n: number): void {
    if (this.state !== 'skip' || n > this.skipRemaining - this.q.length) throw new RangeError('skipped() beyond the pending skip');
    // Only valid when nothing of the skipped range is buffered: the reader seeks instead of pushing.
    if (this.q.length !== 0) throw new RangeError('skipped() with bytes of the range already pushed');
    this.skipRemaining -= n;
    this.externalSkip += n;
    if (this.skipRemaining === 0) this.afterBlock();
  }

  private externalSkip = 0;

  /** Buffered bytes the structure at the head needs before another attempt can succeed. */
  private wantLength = 0;

  next(): MainEvent | null {
    // A record that arrives in many small pieces is parsed once it is whole, not once per piece.
    if (this.q.length < this.wantLength) return null;
    for (;;) {
      const c = this.q.cursor();
      let ev: MainEvent | null | undefined;
      try {
        ev = this.step(c);
      } catch (e) {
        if (e instanceof NeedMoreData) {
          this.wantLength = e.need;
          return null;
        }
        if (e instanceof ProtocolError && e.offset === undefined) e.offset = this.q.streamOffset + this.externalSkip;
        throw e;
      }
      this.wantLength = 0;
      this.q.consume(c.pos);
      if (ev === null) return null;
      if (ev !== undefined) return ev;
    }
  }

  private streamPos(c: Cursor): number {
    return c.streamOffset + this.externalSkip;
  }

  /** One step: an event, undefined for "consumed something silently, go on", or null to wait. */
  private step(c: Cursor): MainEvent | null | undefined {
    switch (this.state) {
      case 'header': {
        const magic = c.u32();
        if (magic !== QEVM_MAGIC) {
          throw new ProtocolError('BAD_MAGIC', `main channel has bad magic 0x${magic.toString(16).padStart(8, '0')} (expected 0x5145564d "QEVM")`, { offset: this.fileOffset });
        }
        const version = c.u32();
        if (version !== QEVM_VERSION) {
          const why = version === 2 ? 'version 2 is obsolete' : `unsupported version ${version}`;
          throw new ProtocolError('BAD_VERSION', `migration stream ${why} (supported: ${QEVM_VERSION})`, { offset: this.fileOffset + 4 });
        }
        this.state = 'configuration';
        return { type: 'header', version };
      }
      case 'configuration': {
        // Only modern machine types write it, but every QEMU ≥ 2.x machine we support does.
        if (c.peekU8() !== SectionType.CONFIGURATION) {
          this.state = 'top';
          return undefined;
        }
        this.config = readConfiguration(c);
        this.state = 'top';
        return { type: 'configuration', config: this.config };
      }
      case 'top':
        return this.topLevel(c);
      case 'ram-mem-size-blocks':
        return this.memSizeBlock(c);
      case 'ram-records':
        return this.ramRecord(c);
      case 'ram-footer': {
        const at = this.streamPos(c);
        const t = c.u8();
        const id = c.u32();
        if (t !== SectionType.FOOTER || id !== this.currentSectionId) {
          throw new ProtocolError('BAD_FOOTER', `section ${this.currentSectionId} footer missing or wrong (got type 0x${t.toString(16)} id ${id})`, { offset: at });
        }
        this.state = 'top';
        return { type: 'footer', sectionId: id };
      }
      case 'skip': {
        const n = Math.min(this.skipRemaining, this.q.length);
        if (n === 0 && this.skipRemaining > 0) return null;
        c.skip(n);
        this.skipRemaining -= n;
        if (this.skipRemaining === 0) this.afterBlock();
        return undefined;
      }
      case 'device-state': {
        if (this.q.length === 0) return null;
        const data = c.takeSlices(this.q.length);
        return { type: 'device-state', data };
      }
    }
  }

  private topLevel(c: Cursor): MainEvent | undefined {
    const at = this.streamPos(c);
    const t = c.peekU8();
    switch (t) {
      case SectionType.COMMAND: {
        c.u8();
        const cmd = c.u16();
        const len = c.u16();
        if (cmd === 0 || cmd >= COMMAND_MAX) {
          throw new ProtocolError('BAD_RECORD', `unknown command 0x${cmd.toString(16)}`, { offset: at });
        }
        const fixed = FIXED_COMMAND_LEN[cmd];
        if (fixed !== undefined && len !== fixed) {
          throw new ProtocolError('BAD_RECORD', `command ${cmd} has length ${len}, expected ${fixed}`, { offset: at });
        }
        if (cmd === Command.POSTCOPY_ADVISE && len !== 0 && len !== 16) {
          throw new ProtocolError('BAD_RECORD', `POSTCOPY_ADVISE has length ${len}, expected 0 or 16`, { offset: at });
        }
        const payload = Buffer.from(c.take(len));
        if (cmd === Command.PACKAGED) {
          const size = payload.readUInt32BE(0);
          if (size > this.maxPackageBytes) {
            throw new ProtocolError('LIMIT_EXCEEDED', `PACKAGED command of ${size} bytes (limit ${this.maxPackageBytes})`, { offset: at });
          }
          return { type: 'package', data: Buffer.from(c.take(size)) };
        }
        return { type: 'command', cmd, payload };
      }
      case SectionType.START:
      case SectionType.FULL: {
        c.u8();
        const sectionId = c.u32();
        const idstr = c.countedString();
        const instanceId = c.u32();
        const versionId = c.u32();
        const kind: SectionKind = t === SectionType.START ? 'start' : 'full';
        if (idstr === RAM_SECTION_NAME && instanceId === 0) {
          if (versionId !== RAM_SECTION_VERSION) {
            throw new ProtocolError('BAD_VERSION', `ram section version ${versionId} (supported: ${RAM_SECTION_VERSION})`, { offset: at });
          }
          this.ramSectionId = sectionId;
          this.currentSectionId = sectionId;
          this.state = 'ram-records';
          return { type: 'section', kind, sectionId, idstr, instanceId, versionId };
        }
        if (kind === 'start') {
          throw new ProtocolError('UNSUPPORTED', `iterable section "${idstr}" is not supported (only "ram")`, { offset: at });
        }
        // First device section: everything from here on is device state, handed out raw.
        c.pos = 0;
        this.state = 'device-state';
        return undefined;
      }
      case SectionType.PART:
      case SectionType.END: {
        c.u8();
        const sectionId = c.u32();
        if (sectionId !== this.ramSectionId) {
          // Other iterable sections are refused at their START, so this id was never opened: the
          // stream is corrupt, not using a feature we lack (QEMU: "Unknown savevm section").
          throw new ProtocolError('BAD_RECORD', `section ${sectionId} was never started (ram section: ${this.ramSectionId ?? 'none yet'})`, { offset: at });
        }
        this.currentSectionId = sectionId;
        this.state = 'ram-records';
        return { type: 'section', kind: t === SectionType.PART ? 'part' : 'end', sectionId, idstr: RAM_SECTION_NAME, instanceId: 0, versionId: RAM_SECTION_VERSION };
      }
      case SectionType.EOF:
        // Kept as the first device-state byte (as a first device section is): consumers that
        // store or forward the device state must not lose it, and a postcopy stream ends here.
        c.pos = 0;
        this.state = 'device-state';
        return undefined;
      default:
        throw new ProtocolError('BAD_RECORD', `unknown top-level record type 0x${t.toString(16)}`, { offset: at });
    }
  }

  private ramRecord(c: Cursor): MainEvent | undefined {
    const at = this.streamPos(c);
    const v = c.u64();
    const mask = BigInt(this.pageSize - 1);
    const flags = Number(v & mask);
    const offsetBig = v & ~mask;
    switch (flags & ~RamFlag.CONTINUE) {
      case RamFlag.MEM_SIZE: {
        if (offsetBig > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('LIMIT_EXCEEDED', 'MEM_SIZE total too large', { offset: at });
        this.memSizeRemaining = Number(offsetBig);
        this.blockCount = 0;
        this.state = 'ram-mem-size-blocks';
        if (this.memSizeRemaining === 0) this.state = 'ram-records';
        return { type: 'ram-mem-size', totalBytes: Number(offsetBig) };
      }
      case RamFlag.ZERO:
      case RamFlag.PAGE: {
        if (this.config?.capabilities.includes('mapped-ram')) {
          throw new ProtocolError('BAD_RECORD', `page record in a mapped-ram stream (flags 0x${flags.toString(16)})`, { offset: at });
        }
        let block: string;
        if (flags & RamFlag.CONTINUE) {
          if (this.lastBlock === undefined) throw new ProtocolError('BAD_RECORD', 'CONTINUE page record with no previous block', { offset: at });
          block = this.lastBlock;
        } else {
          block = c.countedString();
        }
        const info = this.blocks.get(block);
        if (!info) throw new ProtocolError('UNKNOWN_BLOCK', `page record names unknown RAM block "${block}"`, { offset: at });
        const offset = Number(offsetBig);
        if (offsetBig > BigInt(info.usedLength - this.pageSize)) {
          throw new ProtocolError('OFFSET_OUT_OF_RANGE', `page offset 0x${offsetBig.toString(16)} is outside block "${block}" (used_length 0x${info.usedLength.toString(16)})`, { offset: at });
        }
        if ((flags & ~RamFlag.CONTINUE) === RamFlag.ZERO) {
          const fill = c.u8();
          if (fill !== 0) throw new ProtocolError('BAD_RECORD', `zero page record with fill byte 0x${fill.toString(16)}`, { offset: at });
          this.lastBlock = block;
          return { type: 'ram-zero', block, offset, continued: (flags & RamFlag.CONTINUE) !== 0 };
        }
        const data = c.takeSlices(this.pageSize);
        this.lastBlock = block;
        return { type: 'ram-page', block, offset, data, continued: (flags & RamFlag.CONTINUE) !== 0 };
      }
      case RamFlag.EOS:
        if (flags & RamFlag.CONTINUE) break;
        this.state = 'ram-footer';
        return { type: 'ram-eos' };
      case RamFlag.MULTIFD_FLUSH:
        if (flags & RamFlag.CONTINUE) break;
        if (this.config?.capabilities.includes('mapped-ram')) {
          throw new ProtocolError('BAD_RECORD', 'MULTIFD_FLUSH in a mapped-ram stream', { offset: at });
        }
        return { type: 'ram-flush' };
      case RamFlag.XBZRLE:
        throw new ProtocolError('UNSUPPORTED', 'XBZRLE page records are not supported (disable the xbzrle capability)', { offset: at });
      case RamFlag.HOOK:
        throw new ProtocolError('UNSUPPORTED', 'RDMA hook records are not supported', { offset: at });
    }
    throw new ProtocolError('BAD_FLAGS', `unknown RAM record flags 0x${flags.toString(16)}`, { offset: at });
  }

  private memSizeBlock(c: Cursor): MainEvent | undefined {
    const at = this.streamPos(c);
    const name = c.countedString();
    const usedLength = c.u64n('block used_length');
    const block: RamBlockInfo = { name, usedLength };
    const caps = this.config?.capabilities ?? [];
    if (caps.includes('x-ignore-shared')) block.mrAddr = c.u64n('block mr_addr');
    if (caps.includes('mapped-ram')) {
      const headerAt = this.streamPos(c);
      block.mappedRam = decodeMappedRamHeader(c.take(MAPPED_RAM_HEADER_SIZE), headerAt);
    }
    if (usedLength % this.pageSize !== 0) {
      throw new ProtocolError('BAD_RECORD', `block "${name}" used_length 0x${usedLength.toString(16)} is not page aligned`, { offset: at });
    }
    if (usedLength > this.memSizeRemaining) {
      throw new ProtocolError('BAD_RECORD', `block "${name}" used_length exceeds the MEM_SIZE total`, { offset: at });
    }
    if (this.blocks.has(name)) throw new ProtocolError('BAD_RECORD', `RAM block "${name}" listed twice`, { offset: at });
    if (++this.blockCount > this.maxBlocks) throw new ProtocolError('LIMIT_EXCEEDED', `more than ${this.maxBlocks} RAM blocks`, { offset: at });
    this.blocks.set(name, block);
    this.memSizeRemaining -= usedLength;
    if (block.mappedRam) {
      // The stream resumes after the block's pages region (§5.2).
      const here = this.streamPos(c);
      const resume = block.mappedRam.pagesOffset + usedLength;
      if (resume < here) {
        throw new ProtocolError('BAD_MAPPED_RAM', `block "${name}" pages region ends at 0x${resume.toString(16)}, before its header`, { offset: at });
      }
      this.skipRemaining = resume - here;
      this.state = 'skip';
      if (this.skipRemaining === 0) this.afterBlock();
    } else {
      this.afterBlock();
    }
    return { type: 'ram-block', block };
  }

  private afterBlock(): void {
    this.state = this.memSizeRemaining === 0 ? 'ram-records' : 'ram-mem-size-blocks';
  }
}
