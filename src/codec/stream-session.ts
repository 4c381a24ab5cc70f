// The one place where the order of main-stream records is decided (docs/protocol.md §1, §2, §6):
// one START of the ram section, MEM_SIZE and the block list only in it, pages only once the
// block list is known, PART/END only between START and END, device state only after END, the
// sync points of both sync modes (§2.6), and postcopy's ADVISE → DISCARD → PACKAGED. It wraps
// MainStreamParser (which knows how records are framed) and hands out typed events; receive,
// relay, the stream-file reader and the file scanner all read a stream through it.
//
// Two kinds of stream: 'live' (a socket: return path, PINGs, multifd flushes, postcopy) and
// 'file' (`migrate file:`: none of those). Strict mode throws a ProtocolError at the record that
// broke a rule; lenient mode (verify, inspect) records a problem with its offset and goes on
// where the stream can still be walked.
//
// Pure: no I/O, no timers. What the return path owes is said by events ('ping', the package's
// pings) and getters; the caller writes the answers.

import { Command, RAM_SECTION_NAME, SectionType, TARGET_PAGE_SIZE } from './constants.js';
import { encodeMainEvent } from './main-event-encode.js';
import type { Configuration } from './configuration.js';
import { DeviceStateTail } from './device-state-tail.js';
import { ProtocolError, type ProtocolErrorCode } from './errors.js';
import { MainStreamParser, secondRamSectionMessage, type MainEvent, type MainStreamParserOptions, type RamBlockInfo } from './main-stream-parser.js';
import { decodeDiscard, encodeEofAndVmdesc, findDeviceSections, splitPackage, synthesizeVmdesc, type FoundSection } from './postcopy.js';
import { SyncPoints, type SyncMode } from './sync-points.js';

export interface StreamProblem {
  code: ProtocolErrorCode;
  /** Stream offset of the record that broke the rule (file offset for files read from 0). */
  offset: number;
  message: string;
  /** The walk could not go on after it. */
  fatal: boolean;
}

export interface StreamSessionOptions {
  /** 'live': a migration over a socket; 'file': the output of `migrate file:`. */
  kind: 'live' | 'file';
  /** 'strict' (default) throws at the first broken rule; 'lenient' records problems. */
  mode?: 'strict' | 'lenient';
  /** Live streams: how FLUSH and EOS map to sync points; undefined infers it from the setup section. */
  syncMode?: SyncMode;
  /** Live streams: largest device state kept to prove the stream complete. */
  maxDeviceStateBytes?: number;
  parser?: MainStreamParserOptions;
  /** Lenient mode: called for every problem as it is found (also kept in `problems`). */
  onProblem?: (p: StreamProblem) => void;
}

interface Base {
  /** Stream offset where the record starts (where the parser resumed for it). */
  at: number;
  /** The record as parsed; absent on events the session adds ('ram-setup', 'complete'). */
  record?: MainEvent;
}

export type SessionEvent = Base & (
  | { type: 'header' }
  | { type: 'configuration'; config: Configuration }
  /** OPEN_RETURN_PATH: from now on PINGs are answered and a SHUT ends the migration. */
  | { type: 'return-path' }
  /** A PING: the return path owes a PONG with this value. */
  | { type: 'ping'; value: number }
  | { type: 'switchover-start' }
  /** POSTCOPY_ADVISE; `postcopy`: it announced postcopy-ram (length 16), so a switch may follow. */
  | { type: 'postcopy-advise'; postcopy: boolean }
  | { type: 'discard'; block: string; ranges: number }
  /** A command the stream may not hold (lenient mode only; strict mode threw). */
  | { type: 'command'; cmd: number }
  | { type: 'section'; kind: 'start' | 'part' | 'end' | 'full'; sectionId: number; instanceId: number; versionId: number }
  | { type: 'mem-size'; totalBytes: number }
  | { type: 'ram-block'; block: RamBlockInfo }
  /** The block list is complete (after its last entry, or after a MEM_SIZE of 0). */
  | { type: 'ram-setup'; sectionId: number; totalBytes: number; blocks: readonly RamBlockInfo[] }
  /** `postcopy`: sent after the switch (a page the destination may already have asked for). */
  | { type: 'page'; block: string; offset: number; data: Buffer[]; postcopy: boolean }
  | { type: 'zero'; block: string; offset: number; postcopy: boolean }
  /** An XBZRLE delta, applied onto the page the destination already holds (xbzrle.ts). */
  | { type: 'xbzrle'; block: string; offset: number; delta: Buffer; postcopy: boolean }
  /**
   * Bytes of a non-RAM iterable section (dirty-bitmap): its header, one chunk, or its footer, as
   * they came; carried, not decoded. QEMU loads them in any order relative to RAM's sections.
   */
  | { type: 'iterable'; idstr: string; sectionId: number; bytes: Buffer[] }
  /** Every multifd channel's pages so far must land before what follows (§2.6). */
  | { type: 'sync-point'; cause: 'flush' | 'eos'; decided?: SyncMode }
  /** A FLUSH or EOS that is no sync point; `decided` when the setup section's EOS inferred the mode. */
  | { type: 'eos'; decided?: SyncMode }
  | { type: 'flush' }
  /** `setup`: the START section's footer (a mapped-ram snapshot closes its setup section here). */
  | { type: 'footer'; sectionId: number; setup: boolean }
  /** The switch to postcopy (§6.2): device state in a package; the destination answers `pings`. */
  | { type: 'postcopy-switch'; devices: Buffer; sections: FoundSection[]; pings: number[] }
  /** Device state bytes. After a postcopy switch, the EOF and a description of the package's sections. */
  | { type: 'device-state'; data: Buffer[] }
  /** Live streams: the device state now ends in a VMDESCRIPTION that walks (or the postcopy EOF came). */
  | { type: 'complete' }
);

export type SessionEventOf<T extends SessionEvent['type']> = Extract<SessionEvent, { type: T }>;

function commandName(cmd: number): string {
  const e = Object.entries(Command).find(([, v]) => v === cmd);
  return e ? `${cmd} (${e[0]})` : String(cmd);
}

export class StreamSession {
  private readonly parser: MainStreamParser;
  private readonly live: boolean;
  private readonly strict: boolean;
  private readonly syncPoints: SyncPoints;
  private readonly tail: DeviceStateTail | undefined;
  private readonly queue: SessionEvent[] = [];
  readonly problems: StreamProblem[] = [];

  private config: Configuration | undefined;
  private sawHeader = false;
  private started = false;
  private ended = false;
  private ramComplete = false;
  private sectionKind: 'start' | 'part' | 'end' | 'full' | undefined;
  private sectionIdValue = 0;
  private memSizeSeen = false;
  private memSizeTotal = 0;
  private memSizeRemaining = 0;
  private blockListDone = false;
  private readonly blockList: RamBlockInfo[] = [];
  private returnPathOpen = false;
  private advised = false;
  private switched = false;
  private postcopyEof = false;
  private packageSections: FoundSection[] = [];
  private switchover = false;
  private deviceStart = -1;
  private stopped = false;
  /** The open non-RAM iterable section (its chunks and footer are carried as bytes). */
  private iterableOpen: { sectionId: number; idstr: string } | undefined;
  private iterableSeen = false;
  private xbzrleSeen = false;
  /** Any POSTCOPY_ADVISE (length 0 comes with dirty-bitmaps alone). */
  private adviseSeen = false;
  private flushSeen = false;
  private backgroundValue = false;

  constructor(private readonly opts: StreamSessionOptions) {
    this.parser = new MainStreamParser({ ...opts.parser, orderCheckedByCaller: true });
    this.live = opts.kind === 'live';
    this.strict = (opts.mode ?? 'strict') === 'strict';
    this.syncPoints = new SyncPoints(opts.syncMode);
    if (this.live) this.tail = new DeviceStateTail(opts.maxDeviceStateBytes);
  }

  push(chunk: Buffer): void {
    this.parser.push(chunk);
  }

  /** Stream offset of the next unread byte (the end of the event just returned). */
  get offset(): number {
    return this.parser.offset;
  }

  /** Mapped-ram files: bytes the reader may seek past (see MainStreamParser.pendingSkip). */
  get pendingSkip(): number {
    return this.parser.pendingSkip;
  }

  skipped(n: number): void {
    this.parser.skipped(n);
  }

  get atBoundary(): boolean {
    return this.parser.atBoundary;
  }

  get configuration(): Configuration | undefined {
    return this.config;
  }

  get blocks(): readonly RamBlockInfo[] {
    return this.blockList;
  }

  get ramTotal(): number {
    return this.memSizeTotal;
  }

  /** Id of the ram section (the latest section header's). */
  get sectionId(): number {
    return this.sectionIdValue;
  }

  get ramStarted(): boolean {
    return this.started;
  }

  /** The END section of RAM came (its records may still be arriving). */
  get ramEnded(): boolean {
    return this.ended;
  }

  get blockListComplete(): boolean {
    return this.blockListDone;
  }

  get returnPath(): boolean {
    return this.returnPathOpen;
  }

  get postcopyAdvised(): boolean {
    return this.advised;
  }

  get postcopy(): boolean {
    return this.switched;
  }

  get switchoverStart(): boolean {
    return this.switchover;
  }

  /**
   * The stream is a background snapshot's (QEMU's background-snapshot capability): its device
   * state followed the last PART of RAM, with no END (see onDeviceState).
   */
  get background(): boolean {
    return this.backgroundValue;
  }

  /** Stream offset where the device state began, or -1. */
  get deviceStateOffset(): number {
    return this.deviceStart;
  }

  get syncMode(): SyncMode | undefined {
    return this.syncPoints.mode;
  }

  /** Live streams: device state kept so far (the package's sections included). */
  get deviceStateBytes(): number {
    return this.tail?.length ?? 0;
  }

  /** Live streams: the stream so far is a whole migration (see DeviceStateTail on why "so far"). */
  get complete(): boolean {
    return this.tail?.isComplete ?? false;
  }

  /** Live streams: why the latest VMDESCRIPTION candidate did not walk, if one did not. */
  get rejection(): Error | undefined {
    return this.tail?.rejection;
  }

  /** Lenient mode: a problem ended the walk. */
  get halted(): boolean {
    return this.stopped;
  }

  /** Where a stream that ends here stopped, for "truncated" messages. */
  stopDescription(): string {
    if (!this.started) return 'before the RAM section';
    if (this.ramComplete) return 'after the RAM section, before the device state';
    return `inside RAM section ${this.sectionIdValue} (${this.ended ? 'in its END part, before the footer' : 'before its END'})`;
  }

  next(): SessionEvent | null {
    const queued = this.queue.shift();
    if (queued) return queued;
    if (this.stopped) return null;
    const at = this.parser.offset;
    let rec: MainEvent | null;
    try {
      rec = this.parser.next();
    } catch (e) {
      if (this.strict || !(e instanceof ProtocolError)) throw e;
      this.problem(e.code, e.offset ?? at, e.message, true);
      return null;
    }
    if (rec === null) return null;
    return this.onRecord(rec, at);
  }

  /** A broken rule: thrown in strict mode; recorded in lenient mode (a fatal one ends the walk). */
  private violation(code: ProtocolErrorCode, at: number, message: string, fatal = false): void {
    if (this.strict) throw new ProtocolError(code, message, { offset: at });
    this.problem(code, at, message, fatal);
  }

  private problem(code: ProtocolErrorCode, offset: number, message: string, fatal: boolean): void {
    const p = { code, offset, message, fatal };
    this.problems.push(p);
    this.opts.onProblem?.(p);
    if (fatal) this.stopped = true;
  }

  private onRecord(rec: MainEvent, at: number): SessionEvent | null {
    if (rec.type === 'header') {
      this.sawHeader = true;
      return { type: 'header', at, record: rec };
    }
    if (rec.type === 'configuration') {
      this.config = rec.config;
      if (this.live && rec.config.capabilities.includes('mapped-ram')) {
        this.violation('UNSUPPORTED', at, 'the source has mapped-ram on; turn it off to migrate over a socket', true);
      }
      return { type: 'configuration', at, record: rec, config: rec.config };
    }
    if (!this.config && this.sawHeader) {
      this.violation('BAD_RECORD', at, 'no configuration record after the stream header (machine type too old, or not a migration file)', true);
      if (this.stopped) return null;
    }
    switch (rec.type) {
      case 'command':
        return this.onCommand(rec, at);
      case 'package':
        return this.onPackage(rec, at);
      case 'section':
        if (rec.idstr !== RAM_SECTION_NAME) {
          // The parser knows the section's framing (dirty-bitmap); RAM's order is not touched.
          this.iterableOpen = { sectionId: rec.sectionId, idstr: rec.idstr };
          this.iterableSeen = true;
          return { type: 'iterable', at, record: rec, idstr: rec.idstr, sectionId: rec.sectionId, bytes: encodeMainEvent(rec) };
        }
        return this.onSection(rec, at);
      case 'iterable-data':
        return { type: 'iterable', at, record: rec, idstr: rec.idstr, sectionId: rec.sectionId, bytes: [rec.data] };
      case 'ram-xbzrle':
        if (!this.blockListDone) this.violation('BAD_RECORD', at, 'XBZRLE record before the block list');
        if (this.switched) this.violation('BAD_RECORD', at, 'XBZRLE record after the switch to postcopy (QEMU sends whole pages then)');
        this.xbzrleSeen = true;
        return { type: 'xbzrle', at, record: rec, block: rec.block, offset: rec.offset, delta: rec.delta, postcopy: this.switched };
      case 'ram-mem-size':
        if (this.sectionKind !== 'start' || this.memSizeSeen) {
          this.violation('BAD_RECORD', at, this.sectionKind === 'start'
            ? 'second MEM_SIZE record; the block list is sent once, in the START section'
            : `MEM_SIZE record in a ${String(this.sectionKind).toUpperCase()} section; the block list is sent once, in the START section`);
        }
        this.memSizeSeen = true;
        this.memSizeTotal = rec.totalBytes;
        this.memSizeRemaining = rec.totalBytes;
        if (rec.totalBytes === 0) this.blockListEnds(at);
        return { type: 'mem-size', at, record: rec, totalBytes: rec.totalBytes };
      case 'ram-block':
        this.blockList.push(rec.block);
        this.memSizeRemaining -= rec.block.usedLength;
        if (this.memSizeRemaining === 0) this.blockListEnds(at);
        return { type: 'ram-block', at, record: rec, block: rec.block };
      case 'ram-page':
      case 'ram-zero':
        // The parser already refuses a block it does not know; this keeps the rule here too.
        if (!this.blockListDone) this.violation('BAD_RECORD', at, `${rec.type === 'ram-page' ? 'page' : 'zero'} record before the block list`);
        return rec.type === 'ram-page'
          ? { type: 'page', at, record: rec, block: rec.block, offset: rec.offset, data: rec.data, postcopy: this.switched }
          : { type: 'zero', at, record: rec, block: rec.block, offset: rec.offset, postcopy: this.switched };
      case 'ram-flush':
        if (!this.live) {
          this.violation('BAD_RECORD', at, 'MULTIFD_FLUSH record in a plain stream file (QEMU writes multifd files only with mapped-ram; the file is corrupt or not what it claims)');
          return { type: 'flush', at, record: rec };
        }
        if (this.switched) this.violation('BAD_RECORD', at, 'MULTIFD_FLUSH after the switch to postcopy (QEMU\'s destination refuses it too)');
        this.flushSeen = true;
        this.syncPoints.flush(this.sectionKind === 'start');
        return { type: 'sync-point', at, record: rec, cause: 'flush' };
      case 'ram-eos': {
        // After the switch an EOS closes a batch of postcopy pages: multifd is over.
        if (!this.live || this.switched) return { type: 'eos', at, record: rec };
        const point = this.syncPoints.eos(this.sectionKind === 'start');
        const decided = point.decided ? { decided: point.decided } : {};
        return point.sync ? { type: 'sync-point', at, record: rec, cause: 'eos', ...decided } : { type: 'eos', at, record: rec, ...decided };
      }
      case 'footer':
        if (this.iterableOpen?.sectionId === rec.sectionId) {
          const open = this.iterableOpen;
          this.iterableOpen = undefined;
          return { type: 'iterable', at, record: rec, idstr: open.idstr, sectionId: open.sectionId, bytes: encodeMainEvent(rec) };
        }
        if (this.ended) this.ramComplete = true;
        return { type: 'footer', at, record: rec, sectionId: rec.sectionId, setup: this.sectionKind === 'start' };
      case 'device-state':
        return this.onDeviceState(rec, at);
    }
  }

  private blockListEnds(at: number): void {
    this.blockListDone = true;
    this.queue.push({ type: 'ram-setup', at, sectionId: this.sectionIdValue, totalBytes: this.memSizeTotal, blocks: this.blockList });
  }

  private onSection(rec: Extract<MainEvent, { type: 'section' }>, at: number): SessionEvent {
    const k = rec.kind.toUpperCase();
    if (rec.kind === 'start' || rec.kind === 'full') {
      if (this.started) this.violation('BAD_RECORD', at, secondRamSectionMessage(rec.kind, rec.sectionId));
      if (rec.kind === 'full') this.violation('BAD_RECORD', at, 'RAM sent as a FULL section; QEMU sends START, PART and END');
      this.started = true;
    } else if (!this.started) {
      this.violation('BAD_RECORD', at, `RAM section ${k} before its START`);
    } else if (this.ended) {
      this.violation('BAD_RECORD', at, `RAM section ${k} after the section's END`);
    }
    if (rec.kind === 'end') this.ended = true;
    this.sectionKind = rec.kind;
    this.sectionIdValue = rec.sectionId;
    return { type: 'section', at, record: rec, kind: rec.kind, sectionId: rec.sectionId, instanceId: rec.instanceId, versionId: rec.versionId };
  }

  private onCommand(rec: Extract<MainEvent, { type: 'command' }>, at: number): SessionEvent {
    const { cmd, payload } = rec;
    if (!this.live) {
      if (cmd === Command.SWITCHOVER_START) {
        this.switchover = true;
        return { type: 'switchover-start', at, record: rec };
      }
      // Written when postcopy-ram is on; inert in a file, which is never loaded in postcopy.
      if (cmd === Command.POSTCOPY_ADVISE) return { type: 'postcopy-advise', at, record: rec, postcopy: false };
      this.violation('UNSUPPORTED', at, `command ${commandName(cmd)} in a migration file: it needs a live peer (only SWITCHOVER_START belongs in a file)`);
      return { type: 'command', at, record: rec, cmd };
    }
    switch (cmd) {
      case Command.OPEN_RETURN_PATH:
        this.returnPathOpen = true;
        return { type: 'return-path', at, record: rec };
      case Command.PING:
        if (!this.returnPathOpen) this.violation('BAD_RECORD', at, 'PING before OPEN_RETURN_PATH');
        return { type: 'ping', at, record: rec, value: payload.readUInt32BE(0) };
      case Command.SWITCHOVER_START:
        this.switchover = true;
        return { type: 'switchover-start', at, record: rec };
      case Command.POSTCOPY_ADVISE:
        // Advice only: a source with postcopy-ram that never switches still migrates as precopy.
        // A destination with another target page size could not place the requested pages.
        if (payload.length === 16 && payload.readBigUInt64BE(8) !== BigInt(TARGET_PAGE_SIZE)) {
          this.violation('UNSUPPORTED', at, `POSTCOPY_ADVISE with target page size ${payload.readBigUInt64BE(8)} (only ${TARGET_PAGE_SIZE} is supported)`);
        }
        this.advised = payload.length === 16;
        this.adviseSeen = true;
        return { type: 'postcopy-advise', at, record: rec, postcopy: this.advised };
      case Command.POSTCOPY_RAM_DISCARD:
        return this.onDiscard(rec, at);
      default:
        this.violation('UNSUPPORTED', at, `command ${commandName(cmd)} is not supported (COLO and postcopy recovery are not; LISTEN and RUN belong in a PACKAGED command)`);
        return { type: 'command', at, record: rec, cmd };
    }
  }

  /**
   * The discarded pages are the ones the source still sends in postcopy: each arrives again. QEMU
   * takes discards only between ADVISE and LISTEN (the package).
   */
  private onDiscard(rec: Extract<MainEvent, { type: 'command' }>, at: number): SessionEvent {
    if (!this.advised) this.violation('BAD_RECORD', at, 'POSTCOPY_RAM_DISCARD without POSTCOPY_ADVISE');
    if (this.switched) this.violation('BAD_RECORD', at, 'POSTCOPY_RAM_DISCARD after the switch to postcopy (QEMU takes them only before LISTEN)');
    const d = decodeDiscard(rec.payload);
    const b = this.blockList.find((x) => x.name === d.block);
    if (!b) {
      this.violation('UNKNOWN_BLOCK', at, `POSTCOPY_RAM_DISCARD names unknown RAM block "${d.block}"`);
    } else {
      for (const r of d.ranges) {
        if (r.start + r.length > b.usedLength) {
          this.violation('OFFSET_OUT_OF_RANGE', at, `POSTCOPY_RAM_DISCARD range 0x${r.start.toString(16)}+0x${r.length.toString(16)} is outside block "${d.block}"`);
          break;
        }
      }
    }
    return { type: 'discard', at, record: rec, block: d.block, ranges: d.ranges.length };
  }

  /** The switch to postcopy (§6.2, §6.4): a package holding LISTEN, device sections, PINGs, RUN. */
  private onPackage(rec: Extract<MainEvent, { type: 'package' }>, at: number): SessionEvent | null {
    if (!this.live) {
      this.violation('UNSUPPORTED', at, `command ${commandName(Command.PACKAGED)} in a migration file: it needs a live peer (postcopy)`);
      return { type: 'command', at, record: rec, cmd: Command.PACKAGED };
    }
    if (!this.advised) {
      // dirty-bitmaps alone advises with no payload (§1.9): its postcopy moves bitmaps, not RAM.
      if (this.adviseSeen) this.violation('UNSUPPORTED', at, 'PACKAGED command after a POSTCOPY_ADVISE without postcopy-ram: postcopy of dirty bitmaps alone (dirty-bitmaps on, postcopy-ram off) is not supported; leave postcopy off or turn postcopy-ram on too');
      else this.violation('BAD_RECORD', at, 'PACKAGED command without POSTCOPY_ADVISE');
    }
    if (!this.returnPathOpen) this.violation('BAD_RECORD', at, 'PACKAGED command without a return path (postcopy needs one)');
    if (this.switched) this.violation('BAD_RECORD', at, 'a second PACKAGED command');
    if (!this.blockListDone || this.ended) this.violation('BAD_RECORD', at, 'PACKAGED command outside the RAM migration (before the block list or after END)');
    const pkg = splitPackage(rec.data);
    if (pkg.leading.length !== 1 || pkg.leading[0]!.cmd !== Command.POSTCOPY_LISTEN) {
      this.violation('BAD_RECORD', at, `package starts with commands ${pkg.leading.map((c) => c.cmd).join(',') || 'none'} (expected POSTCOPY_LISTEN)`);
    }
    if (pkg.trailing.at(-1)?.cmd !== Command.POSTCOPY_RUN) this.violation('BAD_RECORD', at, 'package does not end with POSTCOPY_RUN');
    const sections = findDeviceSections(pkg.devices);
    const pings = pkg.trailing.filter((c) => c.cmd === Command.PING).map((c) => c.payload.readUInt32BE(0));
    this.switched = true;
    this.packageSections = sections;
    this.tail!.append([pkg.devices]);
    return { type: 'postcopy-switch', at, record: rec, devices: pkg.devices, sections, pings };
  }

  private onDeviceState(rec: Extract<MainEvent, { type: 'device-state' }>, at: number): SessionEvent | null {
    if (this.deviceStart < 0) {
      this.deviceStart = this.parser.offset - rec.data.reduce((n, d) => n + d.length, 0);
      at = this.deviceStart;
      if (!this.started) this.violation('BAD_RECORD', at, 'device state begins before any RAM section');
      else if (!this.ramComplete) {
        // A background snapshot (migration.c bg_migration_thread) has no END: the device state it
        // saved when the save started follows the last PART once every page went out once. Only
        // such a source may do that, and it has none of what QEMU refuses with background-snapshot.
        const why = this.sectionKind !== 'part' ? 'outside a RAM section'
          : this.returnPathOpen ? 'with a return path'
          : this.adviseSeen || this.switched ? 'with postcopy advised'
          : this.switchover ? 'after SWITCHOVER_START'
          : this.xbzrleSeen ? 'after XBZRLE records'
          : this.flushSeen ? 'with multifd'
          : this.iterableSeen ? 'with other iterable sections'
          : undefined;
        if (why === undefined) this.backgroundValue = true;
        else this.violation('BAD_RECORD', at, `device state begins before the END of RAM section ${this.sectionIdValue} ${why} (only a background snapshot ends without END, and it has none of that)`);
      }
    }
    if (!this.tail) return { type: 'device-state', at, record: rec, data: rec.data };
    if (this.switched) {
      // A postcopy stream ends with EOF after RAM END: no device sections, no VMDESCRIPTION. A
      // snapshot stores EOF and a description of the package's sections there instead (our
      // tools walk the device state by it; QEMU ignores it when loading).
      const bytes = Buffer.concat(rec.data);
      if (this.postcopyEof || bytes.length !== 1 || bytes[0] !== SectionType.EOF) {
        this.violation('BAD_RECORD', at, `${bytes.length} unexpected bytes after RAM END in a postcopy stream (expected only EOF)`, true);
        return null;
      }
      this.postcopyEof = true;
      const end = encodeEofAndVmdesc(synthesizeVmdesc(this.packageSections));
      if (!this.tail.append(end)) {
        this.violation('BAD_VMDESC', at, 'the device sections of the package do not walk with their synthesized description', true);
        return null;
      }
      this.queue.push({ type: 'complete', at: this.parser.offset });
      return { type: 'device-state', at, record: rec, data: end };
    }
    // The stream is complete when it ends in a VMDESCRIPTION that walks the device sections exactly.
    if (this.tail.append(rec.data)) this.queue.push({ type: 'complete', at: this.parser.offset });
    return { type: 'device-state', at, record: rec, data: rec.data };
  }
}
