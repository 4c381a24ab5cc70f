// One tolerant pass over a migration file that records where everything is (records, RAM
// sections, blocks and their mapped-ram regions, device sections decoded with the vmdesc) and
// collects problems instead of stopping at the first one where the format allows going on. The
// main stream has no lengths, so a broken record still ends the stream walk; mapped-ram block
// regions and the file's tail are checked independently. inspect and verify are built on it.

import { open, type FileHandle } from 'node:fs/promises';
import { Command, MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HEADER_SIZE, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import type { Configuration } from '../codec/configuration.js';
import { decodeDeviceFields, type DecodedStruct } from '../codec/device-fields.js';
import { ProtocolError } from '../codec/errors.js';
import type { RamBlockInfo } from '../codec/main-stream-parser.js';
import { StreamSession, type SessionEvent } from '../codec/stream-session.js';
import { PageBitmap, bitmapBytes } from '../codec/mapped-ram.js';
import { snapshotOpenerFor } from '../engine/open-snapshot.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import { findTrailingVmdesc, type Vmdesc, type VmdescDevice, type VmdescStruct } from '../codec/vmdesc.js';

const READ_CHUNK = 1024 * 1024;
const MAX_DEVICE_STATE = 256 * 1024 * 1024;
/** How much of the file's end is searched for a VMDESCRIPTION when the stream walk failed. */
const TAIL_PROBE = 16 * 1024 * 1024;

/** info: worth knowing, needs no action (e.g. a quirk of QEMU's own files). */
export type Severity = 'error' | 'warning' | 'info';

export interface Problem {
  severity: Severity;
  /** ProtocolError code, or a short tag for checks of our own. */
  code: string;
  /** Absolute file offset the problem was found at. */
  offset: number;
  message: string;
}

export interface RamSectionRecord {
  kind: 'start' | 'part' | 'end' | 'full';
  sectionId: number;
  offset: number;
  /** Bytes from the section header through its footer, mapped-ram regions included. */
  size: number;
  pageRecords: number;
  zeroRecords: number;
  /** XBZRLE records (page deltas; a source with xbzrle on). */
  xbzrleRecords: number;
  flushes: number;
}

export interface CommandRecord {
  cmd: number;
  name: string;
  offset: number;
  size: number;
}

export interface MappedRamRegions {
  headerOffset: number;
  version: number;
  pageSize: number;
  bitmapOffset: number;
  bitmapBytes: number;
  pagesOffset: number;
  /** Set bits among the block's pages (undefined when the bitmap could not be read). */
  bitsSet?: number;
}

export interface BlockLayout {
  name: string;
  usedLength: number;
  mrAddr?: number;
  /** x-ignore-shared's shared block of a QEMU 11 mapped-ram file: no bitmap, no pages (in the backing file). */
  shared?: true;
  /** Offset of the block's entry (counted name) in the MEM_SIZE list. */
  entryOffset: number;
  mappedRam?: MappedRamRegions;
  /** Stream files: PAGE, ZERO and XBZRLE records naming this block, all sections together. */
  pageRecords: number;
  zeroRecords: number;
  xbzrleRecords: number;
}

export interface DeviceRecord {
  idstr: string;
  instanceId: number;
  versionId: number;
  sectionId: number;
  type: 'full' | 'start';
  offset: number;
  /** Header through footer. */
  size: number;
  /** Offset of the device's first data byte (after the section header). */
  dataOffset: number;
  state?: DecodedStruct;
}

export interface FileLayout {
  path: string;
  fileSize: number;
  format?: 'stream' | 'mapped-ram';
  configuration?: Configuration;
  configurationOffset?: number;
  configurationSize?: number;
  ramSectionName?: { sectionId: number; instanceId: number; versionId: number };
  memSizeTotal?: number;
  ramSections: RamSectionRecord[];
  /** Sections of other iterable handlers (dirty-bitmap), carried as bytes. */
  iterableSections?: { kind: string; sectionId: number; idstr: string; offset: number; size: number }[];
  commands: CommandRecord[];
  blocks: BlockLayout[];
  deviceStart?: number;
  devices: DeviceRecord[];
  eofOffset?: number;
  vmdescOffset?: number;
  vmdescLength?: number;
  vmdesc?: Vmdesc;
  /** The main stream was walked to its end without a fatal problem. */
  streamComplete: boolean;
  problems: Problem[];
}

export interface ScanOptions {
  /** Decode every device's fields (inspect --devices); the walk checks them either way. */
  keepDeviceState?: boolean;
  /** Where QEMU's stream starts in the file (libvirt images, `file:PATH,offset=N`). */
  baseOffset?: number;
}

function commandName(cmd: number): string {
  return Object.entries(Command).find(([, v]) => v === cmd)?.[0] ?? `command ${cmd}`;
}

class Scan {
  readonly layout: FileLayout;
  private current: RamSectionRecord | undefined;
  private readonly blockByName = new Map<string, BlockLayout>();

  constructor(path: string, fileSize: number, private readonly fh: FileHandle, private readonly opts: ScanOptions) {
    this.layout = { path, fileSize, ramSections: [], commands: [], blocks: [], devices: [], streamComplete: false, problems: [] };
  }

  problem(severity: Severity, code: string, offset: number, message: string): void {
    this.layout.problems.push({ severity, code, offset, message });
  }

  private fromError(e: unknown, fallbackOffset: number): void {
    if (e instanceof ProtocolError) this.problem('error', e.code, e.offset ?? fallbackOffset, e.message);
    else throw e;
  }

  async run(): Promise<FileLayout> {
    const size = this.layout.fileSize;
    // Lenient: the session's order rules (one RAM section, device state after END, no live-peer
    // commands, ...) become problems; one that leaves the stream unwalkable ends the walk.
    const base = this.opts.baseOffset ?? 0;
    const session = new StreamSession({ kind: 'file', mode: 'lenient', parser: { fileOffset: base }, onProblem: (p) => this.problem('error', p.code, p.offset, p.message) });
    const device: Buffer[] = [];
    let deviceBytes = 0;
    let pos = base;
    let stopped = false;
    try {
      while (pos < size && !stopped) {
        const skip = session.pendingSkip;
        if (skip > 0) {
          // Bounds were checked at the block's event; a region past EOF stopped the walk there.
          session.skipped(skip);
          pos += skip;
          continue;
        }
        const chunk = Buffer.allocUnsafe(Math.min(READ_CHUNK, size - pos));
        const { bytesRead } = await this.fh.read(chunk, 0, chunk.length, pos);
        if (bytesRead === 0) {
          this.problem('error', 'TRUNCATED', pos, `file shrank while being read (ends at 0x${pos.toString(16)})`);
          stopped = true;
          break;
        }
        session.push(bytesRead === chunk.length ? chunk : chunk.subarray(0, bytesRead));
        pos += bytesRead;
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          if (ev.type === 'device-state') {
            this.layout.deviceStart = session.deviceStateOffset;
            for (const d of ev.data) {
              deviceBytes += d.length;
              if (deviceBytes > MAX_DEVICE_STATE) {
                this.problem('error', 'LIMIT_EXCEEDED', this.layout.deviceStart, `device state larger than ${MAX_DEVICE_STATE} bytes`);
                stopped = true;
                break;
              }
              device.push(d);
            }
            continue;
          }
          if (!(await this.onEvent(ev, session))) {
            stopped = true;
            break;
          }
        }
        if (session.halted) stopped = true;
      }
      if (!stopped) this.finishStream(session, size - base, base);
    } catch (e) {
      this.fromError(e, session.offset);
      stopped = true;
    }
    if (this.layout.deviceStart !== undefined && !stopped) {
      this.walkDevices(Buffer.concat(device), this.layout.deviceStart);
      await this.checkConfigurationEntry();
    } else {
      await this.probeTail();
    }
    return this.layout;
  }

  /** `size`: bytes of QEMU's stream (from `base` to the end of the file). */
  private finishStream(session: StreamSession, size: number, base: number): void {
    const l = this.layout;
    if (!l.configuration) {
      const what = size < 8 ? `${size} bytes, shorter than the 8-byte stream header` : 'no configuration record after the stream header';
      this.problem('error', size < 8 ? 'TRUNCATED' : 'BAD_RECORD', base + Math.min(size, 8), `file is truncated or not a migration file: ${what}`);
      return;
    }
    if (l.deviceStart === undefined) {
      const end = base + size;
      const partial = session.offset < end ? `, in the record that starts at 0x${session.offset.toString(16)}` : '';
      this.problem('error', 'TRUNCATED', session.offset, `file is truncated: it ends at 0x${end.toString(16)} ${session.stopDescription()}${partial}`);
      return;
    }
    l.streamComplete = true;
  }

  /** Handles one event of the main stream; false stops the walk. */
  private async onEvent(ev: Exclude<SessionEvent, { type: 'device-state' }>, session: StreamSession): Promise<boolean> {
    const l = this.layout;
    const at = ev.at;
    const rec = ev.record;
    if (rec?.type === 'command' || rec?.type === 'package') {
      const cmd = rec.type === 'command' ? rec.cmd : Command.PACKAGED;
      l.commands.push({ cmd, name: commandName(cmd), offset: at, size: session.offset - at });
      return true;
    }
    switch (ev.type) {
      case 'configuration':
        l.configuration = ev.config;
        l.configurationOffset = at;
        l.configurationSize = session.offset - at;
        l.format = ev.config.capabilities.includes('mapped-ram') ? 'mapped-ram' : 'stream';
        return true;
      case 'section':
        if (ev.kind === 'start' || ev.kind === 'full') l.ramSectionName = { sectionId: ev.sectionId, instanceId: ev.instanceId, versionId: ev.versionId };
        this.current = { kind: ev.kind, sectionId: ev.sectionId, offset: at, size: 0, pageRecords: 0, zeroRecords: 0, xbzrleRecords: 0, flushes: 0 };
        l.ramSections.push(this.current);
        return true;
      case 'mem-size':
        l.memSizeTotal = ev.totalBytes;
        return true;
      case 'ram-block': {
        // Computed back from the entry's end: the parser may have skipped a previous block's
        // pages region inside the buffered chunk without an event, so `at` can be stale here.
        const b = ev.block;
        const len = 1 + Buffer.byteLength(b.name, 'latin1') + 8 + (b.pageSize !== undefined ? 8 : 0) + (b.mrAddr !== undefined ? 8 : 0) + (b.mappedRam ? MAPPED_RAM_HEADER_SIZE : 0);
        return this.onBlock(b, session.offset - len);
      }
      case 'page':
      case 'zero': {
        const b = this.blockByName.get(ev.block);
        if (b) {
          if (ev.type === 'page') b.pageRecords++;
          else b.zeroRecords++;
        }
        if (this.current) {
          if (ev.type === 'page') this.current.pageRecords++;
          else this.current.zeroRecords++;
        }
        return true;
      }
      case 'flush':
        if (this.current) this.current.flushes++;
        return true;
      case 'xbzrle': {
        // Counted here; the snapshot reader applies them (stream-snapshot.ts).
        const b = this.blockByName.get(ev.block);
        if (b) b.xbzrleRecords++;
        if (this.current) this.current.xbzrleRecords++;
        return true;
      }
      case 'iterable': {
        // A non-RAM iterable section (dirty-bitmap) carried as bytes: listed with its size, not walked.
        const list = (l.iterableSections ??= []);
        const n = ev.bytes.reduce((s, b) => s + b.length, 0);
        if (ev.record?.type === 'section') list.push({ kind: ev.record.kind, sectionId: ev.sectionId, idstr: ev.idstr, offset: at, size: n });
        else if (list.length > 0) list[list.length - 1]!.size += n;
        return true;
      }
      case 'footer':
        if (this.current) this.current.size = session.offset - this.current.offset;
        this.current = undefined;
        return true;
      default:
        return true;
    }
  }

  private async onBlock(info: RamBlockInfo, at: number): Promise<boolean> {
    const b: BlockLayout = { name: info.name, usedLength: info.usedLength, entryOffset: at, pageRecords: 0, zeroRecords: 0, xbzrleRecords: 0 };
    if (info.mrAddr !== undefined) b.mrAddr = info.mrAddr;
    this.layout.blocks.push(b);
    this.blockByName.set(b.name, b);
    const h = info.mappedRam;
    if (!h) return true;
    if (info.shared) {
      // x-ignore-shared's shared block in a QEMU 11 file: a header with offsets 0, nothing else.
      b.shared = true;
      return true;
    }
    const name = Buffer.byteLength(info.name, 'latin1');
    const headerOffset = at + 1 + name + 8 + (info.mrAddr !== undefined ? 8 : 0);
    const bmBytes = bitmapBytes(info.usedLength);
    const regions: MappedRamRegions = { headerOffset, version: h.version, pageSize: h.pageSize, bitmapOffset: h.bitmapOffset, bitmapBytes: bmBytes, pagesOffset: h.pagesOffset };
    b.mappedRam = regions;
    const size = this.layout.fileSize;
    const q = `block "${info.name}"`;
    if (h.pagesOffset % MAPPED_RAM_FILE_OFFSET_ALIGNMENT !== 0) {
      this.problem('warning', 'BAD_MAPPED_RAM', headerOffset, `${q} pages_offset 0x${h.pagesOffset.toString(16)} is page aligned but not on a 1 MiB boundary (QEMU always writes 1 MiB)`);
    }
    if (h.bitmapOffset !== headerOffset + MAPPED_RAM_HEADER_SIZE) {
      this.problem('warning', 'BAD_MAPPED_RAM', headerOffset, `${q} bitmap_offset 0x${h.bitmapOffset.toString(16)} does not follow its header (0x${(headerOffset + MAPPED_RAM_HEADER_SIZE).toString(16)})`);
    }
    let bitmapOk = true;
    if (h.bitmapOffset < headerOffset + MAPPED_RAM_HEADER_SIZE && h.bitmapOffset + bmBytes > headerOffset) {
      this.problem('error', 'BAD_MAPPED_RAM', h.bitmapOffset, `${q} bitmap [0x${h.bitmapOffset.toString(16)}, +0x${bmBytes.toString(16)}) overlaps its own header`);
      bitmapOk = false;
    }
    if (h.bitmapOffset + bmBytes > size) {
      this.problem('error', 'BAD_MAPPED_RAM', h.bitmapOffset, `${q} bitmap [0x${h.bitmapOffset.toString(16)}, +0x${bmBytes.toString(16)}) lies beyond the end of the file (0x${size.toString(16)})`);
      bitmapOk = false;
    } else if (h.bitmapOffset < h.pagesOffset + info.usedLength && h.bitmapOffset + bmBytes > h.pagesOffset) {
      this.problem('error', 'BAD_MAPPED_RAM', h.bitmapOffset, `${q} bitmap [0x${h.bitmapOffset.toString(16)}, +0x${bmBytes.toString(16)}) overlaps its pages region at 0x${h.pagesOffset.toString(16)}`);
    }
    const regionEnd = h.pagesOffset + info.usedLength;
    if (bitmapOk) {
      const bm = Buffer.alloc(bmBytes);
      await this.fh.read(bm, 0, bmBytes, h.bitmapOffset);
      const pages = info.usedLength / TARGET_PAGE_SIZE;
      const bitmap = new PageBitmap(pages, bm);
      regions.bitsSet = bitmap.count();
      let stray = 0;
      for (let p = pages; p < bmBytes * 8; p++) if (bitmap.test(p)) stray++;
      if (stray > 0) this.problem('warning', 'BAD_MAPPED_RAM', h.bitmapOffset, `${q} bitmap has ${stray} bit(s) set past its ${pages} pages (ignored by QEMU)`);
      if (regionEnd > size) {
        // Pages whose bit is set must be in the file; the rest of the region may be a hole cut short.
        let last = -1;
        for (const [first, count] of bitmap.runs()) last = first + count - 1;
        if (last >= 0 && h.pagesOffset + (last + 1) * TARGET_PAGE_SIZE > size) {
          this.problem('error', 'TRUNCATED', Math.max(h.pagesOffset, size), `${q} page ${last} (set in the bitmap) lies at 0x${(h.pagesOffset + last * TARGET_PAGE_SIZE).toString(16)}, beyond the end of the file (0x${size.toString(16)})`);
        }
      }
    }
    if (regionEnd > size) {
      this.problem('error', 'TRUNCATED', size, `file is truncated: ${q} pages region [0x${h.pagesOffset.toString(16)}, 0x${regionEnd.toString(16)}) ends beyond the end of the file (0x${size.toString(16)}), where the stream should resume`);
      return false;
    }
    return true;
  }

  /** Walks device sections with the trailing vmdesc, decoding each device, collecting problems. */
  private walkDevices(tail: Buffer, base: number): void {
    const l = this.layout;
    const found = findTrailingVmdesc(tail);
    if (!found) {
      this.problem('error', 'TRUNCATED', base, `the device state (0x${base.toString(16)} to the end, 0x${l.fileSize.toString(16)}) does not end with a VMDESCRIPTION: file truncated, or saved with suppress-vmdesc`);
      return;
    }
    l.vmdesc = found.vmdesc;
    l.vmdescOffset = base + found.vmdescOffset;
    l.vmdescLength = tail.readUInt32BE(found.vmdescOffset + 1);
    const pageSize = found.vmdesc.page_size;
    if (pageSize !== undefined && pageSize !== TARGET_PAGE_SIZE) this.problem('warning', 'BAD_VMDESC', l.vmdescOffset, `VMDESCRIPTION page_size ${String(pageSize)} (expected ${TARGET_PAGE_SIZE})`);
    const byKey = new Map<string, VmdescDevice>();
    const devices = Array.isArray(found.vmdesc.devices) ? found.vmdesc.devices : [];
    for (const d of devices) {
      if (typeof d !== 'object' || d === null) continue;
      const key = `${d.name}\0${d.instance_id}`;
      if (byKey.has(key)) this.problem('error', 'BAD_VMDESC', l.vmdescOffset, `VMDESCRIPTION lists device "${d.name}" instance ${d.instance_id} twice`);
      byKey.set(key, d);
    }
    const seen = new Set<string>();
    let pos = 0;
    const fail = (code: string, p: number, msg: string): void => this.problem('error', code, base + p, msg);
    for (;;) {
      if (pos >= found.vmdescOffset) {
        fail('BAD_RECORD', pos, 'the device state has no EOF byte before the VMDESCRIPTION');
        return;
      }
      const t = tail[pos]!;
      if (t === SectionType.EOF) break;
      if (t !== SectionType.FULL && t !== SectionType.START) {
        fail('BAD_RECORD', pos, `unexpected record type 0x${t.toString(16)} in the device state (expected a FULL section or EOF)`);
        return;
      }
      const start = pos;
      if (pos + 6 > tail.length || pos + 6 + tail[pos + 5]! + 8 > tail.length) {
        fail('TRUNCATED', pos, 'device state ends inside a section header');
        return;
      }
      const sectionId = tail.readUInt32BE(pos + 1);
      const n = tail[pos + 5]!;
      const idstr = tail.toString('latin1', pos + 6, pos + 6 + n);
      const instanceId = tail.readUInt32BE(pos + 6 + n);
      const versionId = tail.readUInt32BE(pos + 10 + n);
      pos += 14 + n;
      const key = `${idstr}\0${instanceId}`;
      const desc = byKey.get(key);
      if (!desc) {
        fail('BAD_VMDESC', start, `device section "${idstr}" instance ${instanceId} (id ${sectionId}) is not in the VMDESCRIPTION, so its length is unknown`);
        return;
      }
      if (seen.has(key)) fail('BAD_RECORD', start, `device "${idstr}" instance ${instanceId} has a second section`);
      seen.add(key);
      if (typeof desc.version === 'number' && desc.version !== versionId) {
        fail('BAD_VMDESC', start, `device section "${idstr}" has version ${versionId}, its VMDESCRIPTION entry version ${desc.version}`);
      }
      let decoded;
      try {
        decoded = decodeDeviceFields(tail, desc, pos, { base });
      } catch (e) {
        this.fromError(e, base + pos);
        return;
      }
      for (const i of decoded.issues) this.problem('error', 'BAD_VMDESC', i.offset, i.message);
      pos = decoded.end;
      if (pos + 5 > tail.length || tail[pos] !== SectionType.FOOTER || tail.readUInt32BE(pos + 1) !== sectionId) {
        fail('BAD_FOOTER', pos, `footer of device section "${idstr}" (id ${sectionId}) missing or wrong after ${pos - start} bytes: the data does not match its VMDESCRIPTION entry`);
        return;
      }
      pos += 5;
      const rec: DeviceRecord = { idstr, instanceId, versionId, sectionId, type: t === SectionType.FULL ? 'full' : 'start', offset: base + start, size: pos - start, dataOffset: base + start + 14 + n };
      if (this.opts.keepDeviceState) rec.state = decoded.state;
      l.devices.push(rec);
    }
    l.eofOffset = base + pos;
    if (pos + 1 !== found.vmdescOffset) {
      fail('BAD_RECORD', pos + 1, `${found.vmdescOffset - pos - 1} unexpected byte(s) between EOF and the VMDESCRIPTION`);
    }
    for (const [key, d] of byKey) {
      if (!seen.has(key)) this.problem('error', 'BAD_VMDESC', l.vmdescOffset, `VMDESCRIPTION lists device "${d.name}" instance ${d.instance_id}, but the file has no section for it`);
    }
  }

  /**
   * QEMU ignores the vmdesc's description of the configuration record, but analyze-migration.py
   * reads the record with it. A mismatch (e.g. a capability added without updating it) is what
   * QEMU itself writes in some files, and loading never looks at it: an informational line.
   */
  private async checkConfigurationEntry(): Promise<void> {
    const l = this.layout;
    const entry = l.vmdesc?.configuration;
    if (!entry || typeof entry !== 'object' || l.configurationOffset === undefined || l.configurationSize === undefined) return;
    const buf = Buffer.alloc(l.configurationSize);
    await this.fh.read(buf, 0, buf.length, l.configurationOffset);
    let end: number;
    try {
      end = decodeDeviceFields(buf, entry as VmdescStruct, 1, { base: l.configurationOffset }).end;
    } catch {
      end = -1;
    }
    if (end !== buf.length) {
      this.problem('info', 'BAD_VMDESC', l.vmdescOffset ?? l.configurationOffset, "the VMDESCRIPTION's configuration entry does not describe the configuration record: a quirk of QEMU's own files, harmless (QEMU ignores that entry when loading; only analyze-migration.py cannot read the file); no action needed");
    }
  }

  /** After a failed stream walk: is there at least a complete VMDESCRIPTION at the end? */
  private async probeTail(): Promise<void> {
    const size = this.layout.fileSize;
    if (size - (this.opts.baseOffset ?? 0) < 8) return;
    const n = Math.min(size, TAIL_PROBE);
    const buf = Buffer.alloc(n);
    await this.fh.read(buf, 0, n, size - n);
    const found = findTrailingVmdesc(buf);
    if (found) {
      this.layout.vmdescOffset = size - n + found.vmdescOffset;
      this.layout.vmdescLength = buf.readUInt32BE(found.vmdescOffset + 1);
      this.layout.vmdesc = found.vmdesc;
    } else {
      this.problem('error', 'TRUNCATED', size, 'the file does not end with a VMDESCRIPTION (truncated, or not a complete migration file)');
    }
  }
}

/** Scans `path`; never throws for a malformed file (problems are in the result), only for I/O errors. */
export async function scanFile(path: string, opts: ScanOptions = {}): Promise<FileLayout> {
  const byUrl = snapshotOpenerFor(path);
  if (byUrl) {
    // An object (s3://…) is scanned as the file it expands to (docs/s3-layout.md).
    const src = await byUrl(path);
    try {
      return await new Scan(path, src.fileSize, readerHandle(src), opts).run();
    } finally {
      await src.close();
    }
  }
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    return await new Scan(path, size, fh, opts).run();
  } finally {
    await fh.close();
  }
}

/** The positioned reads Scan makes, served by a snapshot source's readAt (short at the end, as a file). */
function readerHandle(src: SnapshotSource): FileHandle {
  const read = async (buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number; buffer: Buffer }> => {
    const n = Math.max(0, Math.min(length, src.fileSize - position));
    if (n > 0) await src.readAt(position, n, buffer.subarray(offset, offset + n));
    return { bytesRead: n, buffer };
  };
  return { read } as unknown as FileHandle;
}

/** Errors first, then by offset. */
export function sortProblems(problems: readonly Problem[]): Problem[] {
  const rank = { error: 0, warning: 1, info: 2 } as const;
  return [...problems].sort((a, b) => rank[a.severity] - rank[b.severity] || a.offset - b.offset);
}
