// Incremental parser of the main migration channel (docs/protocol.md §1, §2). An explicit state
// machine: push bytes, pull events; a structure split across chunks is retried whole. Device
// state after RAM has no length prefix, so from the first non-RAM section (or EOF) on the rest of
// the stream is handed out raw as 'device-state' bytes; vmdesc.ts knows how to walk it.
//
// It frames records and checks each on its own; the order of records (one START, MEM_SIZE only
// in it, device state after END, sync points, postcopy) is StreamSession's (stream-session.ts).
// Read a migration through the session, not through this parser alone. The one order rule it
// keeps itself is that the ram section opens once: past a second START its block list and
// section id would no longer describe one stream, so a direct user is stopped there too.

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
import { XBZRLE_ENCODING_FLAG, XBZRLE_MAX_DELTA } from './xbzrle.js';
import { DIRTY_BITMAP_SECTION, readDirtyBitmapChunk } from './dirty-bitmap-section.js';

export interface RamBlockInfo {
  name: string;
  usedLength: number;
  mrAddr?: number;
  mappedRam?: MappedRamHeader;
  /** The block's page size where postcopy-ram put it in the list (it differs from the host's). */
  pageSize?: number;
  /**
   * A mapped-ram file's block that x-ignore-shared left out: QEMU 11 writes its header with
   * bitmap_offset and pages_offset 0 and no bitmap or pages (the memory is in the shared backing
   * file, not here); the next block entry follows the header. Offset 0 (the stream header) can
   * be nothing else.
   */
  shared?: true;
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
  /** An XBZRLE delta for the page (xbzrle.ts applies it onto the copy already held). */
  | { type: 'ram-xbzrle'; block: string; offset: number; delta: Buffer; continued: boolean }
  | { type: 'ram-flush' }
  | { type: 'ram-eos' }
  /**
   * One record of a non-RAM iterable section, carried as its bytes (dirty-bitmap: one chunk of
   * block-dirty-bitmap.c's framing; `last`: it has the EOS flag, the section's footer follows).
   */
  | { type: 'iterable-data'; sectionId: number; idstr: string; data: Buffer; last: boolean }
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
  /**
   * Set by StreamSession only, which owns the record order: a second START (or FULL) of the ram
   * section is handed on as a section event, for the session to refuse (strict) or record and
   * walk past (lenient). Without it the parser refuses it itself, so a direct user cannot be
   * led into reading two block lists as one.
   */
  orderCheckedByCaller?: boolean;
}

/** The one text for a second opening of the ram section, whichever of parser and session finds it. */
export function secondRamSectionMessage(kind: 'start' | 'full', sectionId: number): string {
  return `second RAM section ${kind.toUpperCase()} (id ${sectionId}); a stream holds exactly one RAM section`;
}

type State =
  | 'header'
  | 'configuration'
  | 'top'
  | 'ram-mem-size-blocks'
  | 'ram-records'
  | 'ram-footer'
  | 'iterable-records'
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
/** Non-RAM iterable sections in one stream (QEMU registers one dirty-bitmap handler). */
export const MAX_ITERABLE_SECTIONS = 16;
/** Largest PACKAGED command (QEMU allows 4 GiB; it holds the device state, buffered whole). */
export const MAX_PACKAGE_BYTES = 64 * 1024 * 1024;

export class MainStreamParser {
  private readonly q = new ByteQueue();
  private state: State = 'header';
  private readonly pageSize: number;
  private readonly fileOffset: number;
  private readonly maxBlocks: number;
  private readonly maxPackageBytes: number;
  private readonly orderCheckedByCaller: boolean;

  private ramSectionId: number | undefined;
  private currentSectionId = 0;
  private config: Configuration | undefined;
  /** Last block named by a page record: CONTINUE refers to it across sections (§2.1). */
  private lastBlock: string | undefined;
  private memSizeRemaining = 0;
  private blockCount = 0;
  private skipRemaining = 0;
  private readonly blocks = new Map<string, RamBlockInfo>();
  /** Non-RAM iterable sections opened by START: section id → idstr. */
  private readonly iterables = new Map<number, { idstr: string; instanceId: number; versionId: number }>();
  /** POSTCOPY_ADVISE's page-size summary (OR of every block's page size), when postcopy-ram is on. */
  private advisedPageSizes: bigint | undefined;

  constructor(opts: MainStreamParserOptions = {}) {
    this.pageSize = opts.pageSize ?? TARGET_PAGE_SIZE;
    this.fileOffset = opts.fileOffset ?? 0;
    this.externalSkip = this.fileOffset;
    this.maxBlocks = opts.maxBlocks ?? MAX_RAM_BLOCKS;
    this.maxPackageBytes = opts.maxPackageBytes ?? MAX_PACKAGE_BYTES;
    this.orderCheckedByCaller = opts.orderCheckedByCaller ?? false;
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
      case 'iterable-records': {
        const at = this.streamPos(c);
        const start = c.pos;
        const { last } = readDirtyBitmapChunk(c, at);
        const len = c.pos - start;
        c.pos = start;
        const data = Buffer.from(c.take(len));
        if (last) this.state = 'ram-footer';
        return { type: 'iterable-data', sectionId: this.currentSectionId, idstr: this.iterables.get(this.currentSectionId)!.idstr, data, last };
      }
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
        if (cmd === Command.POSTCOPY_ADVISE && len === 16) this.advisedPageSizes = payload.readBigUInt64BE(0);
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
          if (this.ramSectionId !== undefined && !this.orderCheckedByCaller) {
            throw new ProtocolError('BAD_RECORD', secondRamSectionMessage(kind, sectionId), { offset: at });
          }
          this.ramSectionId = sectionId;
          this.currentSectionId = sectionId;
          this.state = 'ram-records';
          return { type: 'section', kind, sectionId, idstr, instanceId, versionId };
        }
        if (kind === 'start') {
          // Carried as bytes where the framing is known without decoding the content.
          if (idstr !== DIRTY_BITMAP_SECTION) {
            throw new ProtocolError('UNSUPPORTED', `iterable section "${idstr}" is not supported (only "ram" and "${DIRTY_BITMAP_SECTION}")`, { offset: at });
          }
          if (this.iterables.has(sectionId) || sectionId === this.ramSectionId) throw new ProtocolError('BAD_RECORD', `section id ${sectionId} started twice`, { offset: at });
          if (this.iterables.size >= MAX_ITERABLE_SECTIONS) throw new ProtocolError('LIMIT_EXCEEDED', `more than ${MAX_ITERABLE_SECTIONS} iterable sections`, { offset: at });
          this.iterables.set(sectionId, { idstr, instanceId, versionId });
          this.currentSectionId = sectionId;
          this.state = 'iterable-records';
          return { type: 'section', kind, sectionId, idstr, instanceId, versionId };
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
        const iterable = this.iterables.get(sectionId);
        if (iterable !== undefined) {
          this.currentSectionId = sectionId;
          this.state = 'iterable-records';
          return { type: 'section', kind: t === SectionType.PART ? 'part' : 'end', sectionId, ...iterable };
        }
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
      case RamFlag.XBZRLE: {
        // ram.c load_xbzrle: u8 ENCODING_FLAG_XBZRLE, be16 length (≤ TARGET_PAGE_SIZE), delta.
        let block: string;
        if (flags & RamFlag.CONTINUE) {
          if (this.lastBlock === undefined) throw new ProtocolError('BAD_RECORD', 'CONTINUE XBZRLE record with no previous block', { offset: at });
          block = this.lastBlock;
        } else {
          block = c.countedString();
        }
        const info = this.blocks.get(block);
        if (!info) throw new ProtocolError('UNKNOWN_BLOCK', `XBZRLE record names unknown RAM block "${block}"`, { offset: at });
        if (offsetBig > BigInt(info.usedLength - this.pageSize)) {
          throw new ProtocolError('OFFSET_OUT_OF_RANGE', `XBZRLE page offset 0x${offsetBig.toString(16)} is outside block "${block}" (used_length 0x${info.usedLength.toString(16)})`, { offset: at });
        }
        const encoding = c.u8();
        const len = c.u16();
        if (encoding !== XBZRLE_ENCODING_FLAG) throw new ProtocolError('BAD_RECORD', `XBZRLE record with encoding 0x${encoding.toString(16)} (expected 0x01)`, { offset: at });
        if (len > XBZRLE_MAX_DELTA) throw new ProtocolError('LIMIT_EXCEEDED', `XBZRLE delta of ${len} bytes (at most ${XBZRLE_MAX_DELTA})`, { offset: at });
        const delta = Buffer.from(c.take(len));
        this.lastBlock = block;
        return { type: 'ram-xbzrle', block, offset: Number(offsetBig), delta, continued: (flags & RamFlag.CONTINUE) !== 0 };
      }
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
    const pageSize = this.peekBlockPageSize(c);
    if (pageSize !== undefined) block.pageSize = pageSize;
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
    if (block.mappedRam && block.mappedRam.bitmapOffset === 0 && block.mappedRam.pagesOffset === 0) {
      if (!caps.includes('x-ignore-shared')) {
        throw new ProtocolError('BAD_MAPPED_RAM', `block "${name}" has no bitmap and no pages region (offsets 0), which only a shared block of an x-ignore-shared file has, and this file does not have x-ignore-shared`, { offset: at });
      }
      block.shared = true;
      this.afterBlock();
    } else if (block.mappedRam) {
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

  /**
   * With postcopy-ram the source writes a block's page size after its used_length when it differs
   * from the source's host page size (ram.c ram_save_setup); the destination knows which of its
   * blocks that is, a reader of the stream alone does not. POSTCOPY_ADVISE's summary (the OR of
   * every block's page size) does say which sizes exist: 8 bytes that are a power of two above
   * the target page size and in the summary are that field. Nothing else fits: a next block
   * entry starts with its name's length (1..255, never 0), a RAM record has flag bits in its
   * low 12 bits, and x-ignore-shared's mr_addr (which follows it) is read after this.
   */
  private peekBlockPageSize(c: Cursor): number | undefined {
    if (this.advisedPageSizes === undefined) return undefined;
    const save = c.pos;
    const v = c.u64();
    if (v > BigInt(this.pageSize) && (v & (v - 1n)) === 0n && (v & this.advisedPageSizes) !== 0n && v <= 1n << 40n) return Number(v);
    c.pos = save;
    return undefined;
  }

  private afterBlock(): void {
    this.state = this.memSizeRemaining === 0 ? 'ram-records' : 'ram-mem-size-blocks';
  }
}
