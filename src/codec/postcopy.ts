// Postcopy wire structures (docs/protocol.md §6): POSTCOPY_ADVISE, POSTCOPY_RAM_DISCARD, the PACKAGED
// command and its contents, page requests on the return path, and the bare page records of the
// preempt channel. Pure functions over Buffers.

import { ByteQueue, type Cursor } from './byte-queue.js';
import { Command, RamFlag, ReturnPathMessage, SectionType, TARGET_PAGE_SIZE } from './constants.js';
import { NeedMoreData, ProtocolError } from './errors.js';
import { encodeReturnPathMessage } from './return-path.js';
import { encodeCommand } from './stream-encode.js';

const be32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
};

/** POSTCOPY_ADVISE as QEMU sends it with postcopy-ram: host page size summary, target page size. */
export function encodePostcopyAdvise(pageSizeSummary = TARGET_PAGE_SIZE, targetPageSize = TARGET_PAGE_SIZE): Buffer {
  const p = Buffer.alloc(16);
  p.writeBigUInt64BE(BigInt(pageSizeSummary), 0);
  p.writeBigUInt64BE(BigInt(targetPageSize), 8);
  return encodeCommand(Command.POSTCOPY_ADVISE, p);
}

export const encodePostcopyListen = (): Buffer => encodeCommand(Command.POSTCOPY_LISTEN);
export const encodePostcopyRun = (): Buffer => encodeCommand(Command.POSTCOPY_RUN);

/** The 9 bytes before a package: command PACKAGED with the package's length. */
export const encodePackagedHeader = (length: number): Buffer => encodeCommand(Command.PACKAGED, be32(length));

export interface DiscardRange {
  /** Byte offsets within the block (QEMU converts pages to bytes before sending). */
  start: number;
  length: number;
}

/** Ranges per command: QEMU batches 12; its loader takes any multiple of 16 bytes under the be16 length. */
const DISCARDS_PER_COMMAND = 256;

/** POSTCOPY_RAM_DISCARD commands for `ranges` of `block`: version 0, counted name, NUL, (be64 start, be64 length)×n. */
export function encodeDiscards(block: string, ranges: readonly DiscardRange[]): Buffer[] {
  const name = Buffer.from(block, 'latin1');
  if (name.length === 0 || name.length > 255) throw new RangeError(`RAM block name "${block}" must be 1..255 bytes`);
  const out: Buffer[] = [];
  for (let i = 0; i < ranges.length; i += DISCARDS_PER_COMMAND) {
    const part = ranges.slice(i, i + DISCARDS_PER_COMMAND);
    const p = Buffer.alloc(3 + name.length + 16 * part.length);
    p[0] = 0;
    p[1] = name.length;
    name.copy(p, 2);
    let at = 3 + name.length;
    for (const r of part) {
      p.writeBigUInt64BE(BigInt(r.start), at);
      p.writeBigUInt64BE(BigInt(r.length), at + 8);
      at += 16;
    }
    out.push(encodeCommand(Command.POSTCOPY_RAM_DISCARD, p));
  }
  return out;
}

export function decodeDiscard(payload: Buffer): { block: string; ranges: DiscardRange[] } {
  if (payload.length < 1 + 1 + 1 + 1 + 16) throw new ProtocolError('BAD_RECORD', `POSTCOPY_RAM_DISCARD of ${payload.length} bytes is too short`);
  if (payload[0] !== 0) throw new ProtocolError('BAD_RECORD', `POSTCOPY_RAM_DISCARD version ${payload[0]} (expected 0)`);
  const n = payload[1]!;
  if (payload.length < 3 + n || payload[2 + n] !== 0) throw new ProtocolError('BAD_RECORD', 'POSTCOPY_RAM_DISCARD block name is not NUL-terminated');
  const block = payload.toString('latin1', 2, 2 + n);
  const rest = payload.length - 3 - n;
  if (rest === 0 || rest % 16 !== 0) throw new ProtocolError('BAD_RECORD', `POSTCOPY_RAM_DISCARD for "${block}" has ${rest} bytes of ranges (not a multiple of 16)`);
  const ranges: DiscardRange[] = [];
  for (let at = 3 + n; at < payload.length; at += 16) {
    const start = payload.readBigUInt64BE(at);
    const length = payload.readBigUInt64BE(at + 8);
    if (start > BigInt(Number.MAX_SAFE_INTEGER) || length > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new ProtocolError('BAD_RECORD', `POSTCOPY_RAM_DISCARD range for "${block}" is out of range`);
    }
    ranges.push({ start: Number(start), length: Number(length) });
  }
  return { block, ranges };
}

export interface PackagedCommand {
  cmd: number;
  payload: Buffer;
}

export interface PackageContents {
  /** Commands before the first device section (POSTCOPY_LISTEN). */
  leading: PackagedCommand[];
  /** The device sections, raw (no EOF). */
  devices: Buffer;
  /** Commands after them, in order: PINGs, then POSTCOPY_RUN. */
  trailing: PackagedCommand[];
}

const RUN_BYTES = encodePostcopyRun();

/**
 * Splits a package (§6.2) into its commands and device sections. Device sections carry no length,
 * so the trailing commands are found from the end: POSTCOPY_RUN last, PINGs (9 bytes each) before
 * it. The bytes left must end in a section footer, which neither command can be mistaken for.
 */
export function splitPackage(data: Buffer): PackageContents {
  const leading: PackagedCommand[] = [];
  let pos = 0;
  while (pos < data.length && data[pos] === SectionType.COMMAND) {
    if (pos + 5 > data.length) throw new ProtocolError('BAD_RECORD', 'package ends inside a command header', { offset: pos });
    const cmd = data.readUInt16BE(pos + 1);
    const len = data.readUInt16BE(pos + 3);
    if (pos + 5 + len > data.length) throw new ProtocolError('BAD_RECORD', `package ends inside command ${cmd}`, { offset: pos });
    if (cmd === Command.PACKAGED) throw new ProtocolError('BAD_RECORD', 'PACKAGED command inside a package', { offset: pos });
    leading.push({ cmd, payload: data.subarray(pos + 5, pos + 5 + len) });
    pos += 5 + len;
  }
  let end = data.length;
  const trailing: PackagedCommand[] = [];
  if (end - pos >= 5 && data.subarray(end - 5).equals(RUN_BYTES)) {
    trailing.unshift({ cmd: Command.POSTCOPY_RUN, payload: data.subarray(end, end) });
    end -= 5;
    while (end - pos >= 9 && data[end - 9] === SectionType.COMMAND && data.readUInt16BE(end - 8) === Command.PING && data.readUInt16BE(end - 6) === 4) {
      trailing.unshift({ cmd: Command.PING, payload: data.subarray(end - 4, end) });
      end -= 9;
    }
  }
  if (leading.length === 0 && trailing.length === 0 && pos === end) throw new ProtocolError('BAD_RECORD', 'empty package');
  if (end > pos && (end - pos < 5 || data[end - 5] !== SectionType.FOOTER)) {
    throw new ProtocolError('BAD_RECORD', `package device state (${end - pos} bytes) does not end in a section footer${trailing.length === 0 ? ' (and no POSTCOPY_RUN ends the package)' : ''}`, { offset: end });
  }
  return { leading, devices: data.subarray(pos, end), trailing };
}

export interface FoundSection {
  offset: number;
  length: number;
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  /** Bytes between the section header and its footer. */
  bodyLength: number;
}

/**
 * Where each FULL device section of `devices` ends, found by its footer (0x7e + its id) followed by
 * the next section or the end. Guest bytes can hold a false footer, so the first split that
 * accounts for every byte wins (depth-first, failed positions remembered, work bounded).
 */
export function findDeviceSections(devices: Buffer, maxSteps = 1_000_000): FoundSection[] {
  const failed = new Set<number>();
  let steps = 0;
  const header = (pos: number): Omit<FoundSection, 'length' | 'bodyLength'> & { bodyStart: number } | undefined => {
    if (pos + 1 + 4 + 1 > devices.length || devices[pos] !== SectionType.FULL) return undefined;
    const sectionId = devices.readUInt32BE(pos + 1);
    const n = devices[pos + 5]!;
    const bodyStart = pos + 6 + n + 8;
    if (n === 0 || bodyStart > devices.length) return undefined;
    const idstr = devices.toString('latin1', pos + 6, pos + 6 + n);
    return { offset: pos, sectionId, idstr, instanceId: devices.readUInt32BE(pos + 6 + n), versionId: devices.readUInt32BE(pos + 10 + n), bodyStart };
  };
  const from = (pos: number): FoundSection[] | undefined => {
    if (pos === devices.length) return [];
    if (failed.has(pos)) return undefined;
    const h = header(pos);
    if (h) {
      const footer = Buffer.alloc(5);
      footer[0] = SectionType.FOOTER;
      footer.writeUInt32BE(h.sectionId, 1);
      for (let q = devices.indexOf(footer, h.bodyStart); q >= 0; q = devices.indexOf(footer, q + 1)) {
        if (++steps > maxSteps) throw new ProtocolError('LIMIT_EXCEEDED', `device sections could not be delimited within ${maxSteps} steps`, { offset: pos });
        const next = q + 5;
        if (next !== devices.length && devices[next] !== SectionType.FULL) continue;
        const rest = from(next);
        if (rest) {
          const { bodyStart, ...s } = h;
          return [{ ...s, length: next - pos, bodyLength: q - bodyStart }, ...rest];
        }
      }
    }
    failed.add(pos);
    return undefined;
  };
  const found = from(0);
  if (!found) throw new ProtocolError('BAD_RECORD', 'device sections could not be delimited by their footers', { offset: 0 });
  return found;
}

/**
 * A VMDESCRIPTION for device sections that came without one (a postcopy source sends none): each
 * section described as one opaque buffer, enough for our own tools to walk the state. QEMU does
 * not use the description when loading.
 */
export function synthesizeVmdesc(sections: readonly FoundSection[]): string {
  return JSON.stringify({
    page_size: TARGET_PAGE_SIZE,
    devices: sections.map((s) => ({
      name: s.idstr,
      instance_id: s.instanceId,
      vmsd_name: s.idstr,
      version: s.versionId,
      fields: [{ name: 'data', type: 'buffer', size: s.bodyLength }],
    })),
  });
}

/** EOF, then a VMDESCRIPTION record holding `json`. */
export function encodeEofAndVmdesc(json: string): Buffer[] {
  const body = Buffer.from(json, 'utf8');
  return [Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION]), be32(body.length), body];
}

export interface PageRequest {
  /** Set by REQ_PAGES_ID; REQ_PAGES means "the block of the previous request". */
  block?: string;
  start: number;
  length: number;
}

/** A page request as a destination sends it (REQ_PAGES_ID when `block` is given). */
export function encodePageRequest(r: PageRequest): Buffer {
  const p = Buffer.alloc(12 + (r.block !== undefined ? 1 + Buffer.byteLength(r.block, 'latin1') : 0));
  p.writeBigUInt64BE(BigInt(r.start), 0);
  p.writeUInt32BE(r.length, 8);
  if (r.block === undefined) return encodeReturnPathMessage(ReturnPathMessage.REQ_PAGES, p);
  p[12] = Buffer.byteLength(r.block, 'latin1');
  p.write(r.block, 13, 'latin1');
  return encodeReturnPathMessage(ReturnPathMessage.REQ_PAGES_ID, p);
}

/** Decodes REQ_PAGES / REQ_PAGES_ID payloads (the source checks the name length against the message). */
export function decodePageRequest(type: number, payload: Buffer): PageRequest {
  if (payload.length < 12) throw new ProtocolError('BAD_RECORD', `page request of ${payload.length} bytes`);
  const start = payload.readBigUInt64BE(0);
  if (start > BigInt(Number.MAX_SAFE_INTEGER)) throw new ProtocolError('BAD_RECORD', 'page request start out of range');
  const length = payload.readUInt32BE(8);
  if (type === ReturnPathMessage.REQ_PAGES) {
    if (payload.length !== 12) throw new ProtocolError('BAD_RECORD', `REQ_PAGES of ${payload.length} bytes (expected 12)`);
    return { start: Number(start), length };
  }
  if (type !== ReturnPathMessage.REQ_PAGES_ID) throw new ProtocolError('BAD_RECORD', `return-path message ${type} is not a page request`);
  const n = payload[12];
  if (n === undefined || payload.length !== 13 + n) throw new ProtocolError('BAD_RECORD', `REQ_PAGES_ID name length ${n ?? 'missing'} does not match its ${payload.length}-byte payload`);
  return { block: payload.toString('latin1', 13, 13 + n), start: Number(start), length };
}

export type PageRecordEvent =
  | { type: 'page'; block: string; offset: number; data: Buffer[] }
  | { type: 'zero'; block: string; offset: number }
  | { type: 'eos' };

/**
 * Bare RAM page records (docs/protocol.md §2.3) as the postcopy preempt channel carries them: no
 * sections, their own CONTINUE state. `blocks` gives each known block's used_length.
 */
export class PageRecordParser {
  private readonly q = new ByteQueue();
  private lastBlock: string | undefined;
  private want = 0;

  private readonly usedLength: (block: string) => number | undefined;

  /** `blocks`: each block's used_length, or a lookup (the block list may still be arriving). */
  constructor(blocks: ReadonlyMap<string, number> | ((block: string) => number | undefined), private readonly what = 'preempt channel') {
    this.usedLength = typeof blocks === 'function' ? blocks : (b) => blocks.get(b);
  }

  push(chunk: Buffer): void {
    this.q.push(chunk);
  }

  /** True when no partial record is buffered. */
  get atBoundary(): boolean {
    return this.q.length === 0;
  }

  next(): PageRecordEvent | null {
    if (this.q.length < this.want) return null;
    const c = this.q.cursor();
    try {
      const ev = this.record(c);
      this.want = 0;
      this.q.consume(c.pos);
      return ev;
    } catch (e) {
      if (e instanceof NeedMoreData) {
        this.want = e.need;
        return null;
      }
      throw e;
    }
  }

  private record(c: Cursor): PageRecordEvent {
    const at = c.streamOffset;
    const v = c.u64();
    const mask = BigInt(TARGET_PAGE_SIZE - 1);
    const flags = Number(v & mask);
    const offsetBig = v & ~mask;
    const kind = flags & ~RamFlag.CONTINUE;
    if (kind === RamFlag.EOS && flags === RamFlag.EOS) return { type: 'eos' };
    if (kind !== RamFlag.PAGE && kind !== RamFlag.ZERO) {
      throw new ProtocolError('BAD_FLAGS', `${this.what}: RAM record flags 0x${flags.toString(16)} (only PAGE, ZERO, EOS belong here)`, { offset: at });
    }
    let block: string;
    if (flags & RamFlag.CONTINUE) {
      if (this.lastBlock === undefined) throw new ProtocolError('BAD_RECORD', `${this.what}: CONTINUE page record with no previous block`, { offset: at });
      block = this.lastBlock;
    } else {
      block = c.countedString();
    }
    const used = this.usedLength(block);
    if (used === undefined) throw new ProtocolError('UNKNOWN_BLOCK', `${this.what}: page record names unknown RAM block "${block}"`, { offset: at });
    if (offsetBig > BigInt(used - TARGET_PAGE_SIZE)) {
      throw new ProtocolError('OFFSET_OUT_OF_RANGE', `${this.what}: page offset 0x${offsetBig.toString(16)} is outside block "${block}" (used_length 0x${used.toString(16)})`, { offset: at });
    }
    const offset = Number(offsetBig);
    if (kind === RamFlag.ZERO) {
      const fill = c.u8();
      if (fill !== 0) throw new ProtocolError('BAD_RECORD', `${this.what}: zero page record with fill byte 0x${fill.toString(16)}`, { offset: at });
      this.lastBlock = block;
      return { type: 'zero', block, offset };
    }
    const data = c.takeSlices(TARGET_PAGE_SIZE);
    this.lastBlock = block;
    return { type: 'page', block, offset, data };
  }
}

/** The block of the previous page record on a channel: CONTINUE refers to it (docs/protocol.md §2.3). */
export interface PageRecordState {
  lastBlock?: string | undefined;
}

/**
 * PAGE and ZERO records for pages of one block, as I/O vectors: `data[i]` is page i's bytes, or
 * undefined for a zero page (a ZERO record, fill byte 0). The first record names the block unless
 * the channel's previous record was of the same block; `state` is updated. One header buffer is
 * allocated for the whole batch.
 */
export function encodePageRecords(state: PageRecordState, block: string, offsets: ArrayLike<number>, data: readonly (Buffer | undefined)[]): Buffer[] {
  const name = Buffer.from(block, 'latin1');
  if (name.length === 0 || name.length > 255) throw new RangeError(`RAM block name "${block}" must be 1..255 bytes`);
  const n = data.length;
  if (n === 0) return [];
  const named = state.lastBlock !== block;
  const headers = Buffer.alloc(n * 9 + (named ? 1 + name.length : 0));
  const out: Buffer[] = [];
  let at = 0;
  // Headers of consecutive ZERO records are adjacent in `headers`: one vector for all of them.
  let pending = 0;
  for (let i = 0; i < n; i++) {
    const page = data[i];
    const flags = (page ? RamFlag.PAGE : RamFlag.ZERO) | (i === 0 && named ? 0 : RamFlag.CONTINUE);
    // be64 offset | flags, as two be32 halves (no BigInt per page); offsets are page aligned.
    const off = offsets[i]!;
    headers.writeUInt32BE(Math.floor(off / 0x100000000), at);
    headers.writeUInt32BE(((off % 0x100000000) | flags) >>> 0, at + 4);
    at += 8;
    if (i === 0 && named) {
      headers[at] = name.length;
      name.copy(headers, at + 1);
      at += 1 + name.length;
    }
    if (page) {
      if (page.length !== TARGET_PAGE_SIZE) throw new RangeError(`page ${i} is ${page.length} bytes`);
      out.push(headers.subarray(pending, at), page);
      pending = at;
    } else {
      headers[at] = 0;
      at += 1;
    }
  }
  if (at > pending) out.push(headers.subarray(pending, at));
  state.lastBlock = block;
  return out;
}
