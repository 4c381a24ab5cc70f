// Opens a plain stream snapshot (`migrate file:PATH` without mapped-ram): the whole file is read
// once, front to back, and each page's final state is indexed as the file offset of the data of
// its last PAGE record (0 = zero). Pages are later read with positioned reads from those offsets.
//
// XBZRLE records (a source with xbzrle on; QEMU allows it for file migration) leave a page whose
// final state lies nowhere in the file: each delta is applied onto the page as it stands then (its
// last PAGE record, a page decoded before, or zeros), as a destination applies it onto its RAM,
// and the result is written to a temporary sparse file (page-spill.ts: unlinked at once, at most
// guest-RAM sized, only decoded pages take blocks; MULTIFD_TMPDIR, else TMPDIR). The index then
// holds -(position in that file + 1) for the page. Memory stays the index's.
//
// The index is sparse (PageIndex): a block's used_length is a header claim, and a file can
// legitimately hold far fewer pages than its blocks (x-ignore-shared blocks, virtio-mem and
// free-page-hinted memory are never sent), so the index grows with the data pages the file
// actually holds, never with the claim.

import { isZeroPieces } from './zero-page.js';
import { open, type FileHandle } from 'node:fs/promises';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import type { Configuration } from '../codec/configuration.js';
import { ProtocolError } from '../codec/errors.js';
import { StreamSession } from '../codec/stream-session.js';
import type { DeviceStateLayout } from '../codec/vmdesc.js';
import { applyXbzrle } from '../codec/xbzrle.js';
import { PageSpill, temporaryDirectory } from './page-spill.js';
import { readAtExactly, readExactly, verifiedDeviceState } from './read-exactly.js';
import type { SnapshotBlockInfo, SnapshotRamSection, SnapshotSource } from './snapshot.js';

const READ_CHUNK = 1024 * 1024;
const MAX_DEVICE_STATE = 256 * 1024 * 1024;
/** A CONTINUE PAGE record: be64 (offset | flags) then the page, so such records sit this far apart. */
const CONTINUE_HEADER = 8;
const RECORD_STRIDE = CONTINUE_HEADER + TARGET_PAGE_SIZE;

/** Pages per index chunk: 512 offsets, 4 KiB, allocated when a data page first lands in it. */
const CHUNK_PAGES = 512;

/**
 * Per page of one block: the file offset of the data of its last PAGE record, or 0 when the page
 * ends up zero, or -(position + 1) in the spill file of XBZRLE-decoded pages. Chunks of CHUNK_PAGES offsets are allocated only when a non-zero PAGE record
 * lands in them; a PAGE record takes at least 8 + 4096 file bytes, so the index never holds more
 * than about one byte per file byte, whatever used_length the block claims (a 67-byte file
 * claiming a 16 TiB block costs nothing). A real file's pages are dense, and the chunk map then
 * costs one map lookup per 512 pages.
 */
export class PageIndex {
  private readonly chunks = new Map<number, Float64Array>();
  /** Chunk numbers in ascending order, rebuilt after a change (the index is frozen after open). */
  private sorted: number[] | undefined;
  private lastKey = -1;
  private lastChunk: Float64Array | undefined;
  /** Pages with a non-zero offset. */
  present = 0;

  constructor(readonly pages: number) {}

  /** Chunks allocated so far (each CHUNK_PAGES × 8 bytes). */
  get chunkCount(): number {
    return this.chunks.size;
  }

  private chunk(key: number): Float64Array | undefined {
    if (key === this.lastKey) return this.lastChunk;
    const c = this.chunks.get(key);
    this.lastKey = key;
    this.lastChunk = c;
    return c;
  }

  get(page: number): number {
    const c = this.chunk(Math.floor(page / CHUNK_PAGES));
    return c === undefined ? 0 : c[page % CHUNK_PAGES]!;
  }

  set(page: number, offset: number): void {
    const key = Math.floor(page / CHUNK_PAGES);
    let c = this.chunk(key);
    if (c === undefined) {
      // Zero is what an absent chunk already says.
      if (offset === 0) return;
      c = new Float64Array(CHUNK_PAGES);
      this.chunks.set(key, c);
      this.sorted = undefined;
      this.lastKey = key;
      this.lastChunk = c;
    }
    const i = page % CHUNK_PAGES;
    const was = c[i]!;
    if (was === 0 && offset !== 0) this.present++;
    else if (was !== 0 && offset === 0) this.present--;
    c[i] = offset;
  }

  /** Runs of non-zero pages at or after fromPage, in order, joined across chunk boundaries. */
  forEachRun(visit: (firstPage: number, count: number) => boolean | void, fromPage = 0, maxRun = Infinity): void {
    const keys = (this.sorted ??= [...this.chunks.keys()].sort((a, b) => a - b));
    const start = Math.max(0, Math.ceil(fromPage));
    // First chunk that can hold start: binary search.
    let lo = 0;
    let hi = keys.length;
    const startKey = Math.floor(start / CHUNK_PAGES);
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (keys[mid]! < startKey) lo = mid + 1;
      else hi = mid;
    }
    let runFirst = -1;
    let runEnd = -1;
    for (let k = lo; k < keys.length; k++) {
      const key = keys[k]!;
      const c = this.chunks.get(key)!;
      const base = key * CHUNK_PAGES;
      const n = Math.min(CHUNK_PAGES, this.pages - base);
      let i = Math.max(0, start - base);
      while (i < n) {
        while (i < n && c[i] === 0) i++;
        if (i >= n) break;
        // A run continues across chunks, up to maxRun pages; then the next piece starts here.
        if (runFirst >= 0 && (runEnd !== base + i || runEnd - runFirst >= maxRun)) {
          if (visit(runFirst, runEnd - runFirst) === false) return;
          runFirst = -1;
        }
        if (runFirst < 0) runFirst = runEnd = base + i;
        const stop = Math.min(n, i + Math.max(1, maxRun - (runEnd - runFirst)));
        while (i < stop && c[i] !== 0) i++;
        runEnd = base + i;
      }
    }
    if (runFirst >= 0) visit(runFirst, runEnd - runFirst);
  }
}

interface BlockIndex {
  name: string;
  usedLength: number;
  index: PageIndex;
  /** Where the block's pages start in the spill file. */
  base: number;
}

interface Prologue {
  ramSection: SnapshotRamSection;
  switchoverStart: boolean;
}


export class StreamSnapshot implements SnapshotSource {
  readonly format = 'stream';
  readonly blockList: readonly SnapshotBlockInfo[];
  readonly ramSection: SnapshotRamSection;
  readonly switchoverStart: boolean;
  /** Non-RAM iterable sections (dirty-bitmap) as stored, for send to replay after RAM's END. */
  iterableSections: Buffer | undefined;
  /** XBZRLE records applied while indexing (pages decoded into the spill file). */
  xbzrleRecords = 0;
  private closed = false;
  private spill: PageSpill | undefined;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly configuration: Configuration,
    private readonly blocks: ReadonlyMap<string, BlockIndex>,
    readonly deviceState: DeviceStateLayout & { fileOffset: number },
    readonly fileSize: number,
    prologue: Prologue,
    blockInfo: SnapshotBlockInfo[],
  ) {
    this.ramSection = prologue.ramSection;
    this.switchoverStart = prologue.switchoverStart;
    this.blockList = blockInfo;
  }

  /** baseOffset: where QEMU's stream starts in the file (`file:PATH,offset=N`, libvirt images). */
  static async open(path: string, opts: { baseOffset?: number } = {}): Promise<StreamSnapshot> {
    const fh = await open(path, 'r');
    let spill: PageSpill | undefined;
    try {
      const size = (await fh.stat()).size;
      // The record order (one RAM section, block list in START, device state after END, no
      // live-peer commands) is the session's; this loop indexes pages and keeps the device state.
      const session = new StreamSession({ kind: 'file', parser: { fileOffset: opts.baseOffset ?? 0 } });
      const blocks = new Map<string, BlockIndex>();
      const blockInfo: SnapshotBlockInfo[] = [];
      let sawHeader = false;
      let config: Configuration | undefined;
      let ramSection: SnapshotRamSection | undefined;
      let device: Buffer[] = [];
      let deviceBytes = 0;
      // Non-RAM iterable sections (dirty-bitmap) as their bytes, as mapped-ram-reader keeps them.
      const iterable: Buffer[] = [];
      let iterableBytes = 0;
      let pos = opts.baseOffset ?? 0;
      let nextBase = 0;
      let xbzrle = 0;
      let page: Buffer | undefined;
      while (pos < size) {
        // A fresh buffer per chunk: the parser hands out views into what it was given and keeps
        // a partial record's bytes across pushes.
        const chunk = Buffer.allocUnsafe(Math.min(READ_CHUNK, size - pos));
        const { bytesRead } = await fh.read(chunk, 0, chunk.length, pos);
        if (bytesRead === 0) throw new ProtocolError('TRUNCATED', `file shrank while being read: it ends at 0x${pos.toString(16)}, its size was 0x${size.toString(16)}`, { offset: pos });
        session.push(bytesRead === chunk.length ? chunk : chunk.subarray(0, bytesRead));
        pos += bytesRead;
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          switch (ev.type) {
            case 'header':
              sawHeader = true;
              break;
            case 'configuration':
              // Refused here, not by the parser's first page-record error: the user gets told what the file is.
              if (ev.config.capabilities.includes('mapped-ram')) {
                throw new ProtocolError('BAD_RECORD', 'this is a mapped-ram file (its configuration has the mapped-ram capability), not a plain stream file; open it as mapped-ram', { offset: session.offset });
              }
              config = ev.config;
              break;
            case 'section':
              if (ev.kind === 'start') ramSection = { sectionId: ev.sectionId, instanceId: ev.instanceId, versionId: ev.versionId };
              break;
            case 'ram-block': {
              const { name, usedLength, mrAddr } = ev.block;
              // Nothing is allocated for the claim itself (PageIndex): only pages the file holds cost memory.
              blocks.set(name, { name, usedLength, index: new PageIndex(usedLength / TARGET_PAGE_SIZE), base: nextBase });
              nextBase += usedLength;
              blockInfo.push({ name, usedLength, ...(mrAddr !== undefined ? { mrAddr } : {}) });
              break;
            }
            case 'page': {
              const b = blocks.get(ev.block)!;
              // The parser has consumed the page data when it returns the event.
              b.index.set(ev.offset / TARGET_PAGE_SIZE, isZeroPieces(ev.data) ? 0 : session.offset - TARGET_PAGE_SIZE);
              break;
            }
            case 'zero':
              blocks.get(ev.block)!.index.set(ev.offset / TARGET_PAGE_SIZE, 0);
              break;
            case 'xbzrle': {
              const b = blocks.get(ev.block)!;
              const n = ev.offset / TARGET_PAGE_SIZE;
              const was = b.index.get(n);
              page ??= Buffer.alloc(TARGET_PAGE_SIZE);
              spill ??= await PageSpill.create(temporaryDirectory(), TARGET_PAGE_SIZE);
              if (was > 0) await readExactly(fh, page, was, path);
              else if (was < 0) spill.read(-was - 1, page);
              else page.fill(0);
              // Checked whole before the page changes: a malformed delta fails with its offset (the
              // delta ends its record, which the parser has consumed).
              applyXbzrle(ev.delta, page, session.offset - ev.delta.length);
              if (isZeroPieces([page])) {
                b.index.set(n, 0);
              } else {
                const at = b.base + ev.offset;
                spill.write(at, page);
                b.index.set(n, -(at + 1));
              }
              xbzrle++;
              break;
            }
            case 'iterable':
              for (const b of ev.bytes) {
                iterableBytes += b.length;
                if (iterableBytes > MAX_DEVICE_STATE) throw new ProtocolError('LIMIT_EXCEEDED', `non-RAM iterable sections larger than ${MAX_DEVICE_STATE} bytes`, { offset: ev.at });
                iterable.push(Buffer.from(b));
              }
              break;
            case 'device-state':
              for (const d of ev.data) {
                deviceBytes += d.length;
                if (deviceBytes > MAX_DEVICE_STATE) throw new ProtocolError('LIMIT_EXCEEDED', `device state larger than ${MAX_DEVICE_STATE} bytes`, { offset: session.deviceStateOffset });
                device.push(d);
              }
              break;
            default:
              break;
          }
        }
      }
      if (!sawHeader) throw new ProtocolError('TRUNCATED', `file is truncated: ${size - (opts.baseOffset ?? 0)} bytes, shorter than the 8-byte stream header`, { offset: size });
      if (!config) {
        const where = session.offset < size ? 'inside the configuration record' : 'right after the stream header, before the configuration record';
        throw new ProtocolError('TRUNCATED', `file is truncated: it ends at 0x${size.toString(16)}, ${where}`, { offset: size });
      }
      const deviceStart = session.deviceStateOffset;
      if (deviceStart < 0) {
        const partial = session.offset < size ? `, in the record that starts at 0x${session.offset.toString(16)}` : '';
        throw new ProtocolError('TRUNCATED', `file is truncated: it ends at 0x${size.toString(16)} ${session.stopDescription()}${partial}`, { offset: session.offset });
      }
      const switchoverStart = session.switchoverStart;
      // Unreachable given the device-state checks, but the types (and a future parser) want them.
      if (!ramSection) throw new ProtocolError('BAD_RECORD', 'no RAM section in the file');
      const tail = Buffer.concat(device);
      device = [];
      const snap = new StreamSnapshot(path, fh, config, blocks, verifiedDeviceState(tail, deviceStart, size), size, { ramSection, switchoverStart }, blockInfo);
      if (iterable.length > 0) snap.iterableSections = Buffer.concat(iterable);
      snap.spill = spill;
      snap.xbzrleRecords = xbzrle;
      return snap;
    } catch (e) {
      spill?.close();
      await fh.close();
      throw e;
    }
  }

  private block(name: string): BlockIndex {
    const b = this.blocks.get(name);
    if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `no block "${name}" in ${this.path}`);
    return b;
  }

  presentPages(block: string): number {
    return this.block(block).index.present;
  }

  forEachRun(block: string, visit: (firstPage: number, count: number) => boolean | void, fromPage = 0, maxRun = Infinity): void {
    this.block(block).index.forEachRun(visit, fromPage, maxRun);
  }

  /** Worst case: every page in one CONTINUE chain, read with the record headers in between. */
  scratchBytes(pages: number): number {
    return pages * RECORD_STRIDE;
  }

  /**
   * Pages whose records follow each other as CONTINUE records of consecutive pages (data 4104
   * bytes apart) are read as one span, headers included, and returned as one view per page;
   * other pages are read one by one, packed in scratch so neighbours share a view.
   */
  async loadRuns(block: string, runs: ArrayLike<number>, runCount: number, scratch: Buffer): Promise<Buffer[]> {
    const idx = this.block(block).index;
    const pages = idx.pages;
    let total = 0;
    for (let i = 0; i < runCount; i++) {
      const first = runs[2 * i]!;
      const count = runs[2 * i + 1]!;
      if (!Number.isInteger(first) || !Number.isInteger(count) || first < 0 || count <= 0 || first + count > pages) {
        throw new RangeError(`pages [${first}, +${count}) outside block ${block}`);
      }
      total += count;
    }
    // Planned before any read so that a too-small scratch fails without touching it.
    const reads: { at: number; len: number; pos: number }[] = [];
    const zeros: { at: number; len: number }[] = [];
    const decoded: { at: number; pos: number }[] = [];
    const views: Buffer[] = [];
    // The pending view [vStart, at) grows while pages land back to back in scratch.
    let vStart = 0;
    let at = 0;
    const flush = (): void => {
      if (at > vStart) views.push(scratch.subarray(vStart, at));
      vStart = at;
    };
    const need = (len: number): void => {
      if (at + len > scratch.length) throw new RangeError(`scratch of ${scratch.length} bytes is too small for ${total} pages (needs up to ${this.scratchBytes(total)})`);
    };
    let chainPos = -1;
    let chainAt = 0;
    let chainLen = 0;
    const endChain = (): void => {
      if (chainPos < 0) return;
      reads.push({ at: chainAt, len: chainLen, pos: chainPos });
      chainPos = -1;
    };
    for (let i = 0; i < runCount; i++) {
      const first = runs[2 * i]!;
      const end = first + runs[2 * i + 1]!;
      for (let p = first; p < end; p++) {
        const off = idx.get(p);
        if (off !== 0 && chainPos >= 0 && off === chainPos + chainLen + CONTINUE_HEADER) {
          // Extends the chain: the 8 header bytes are read too but left out of the views.
          need(RECORD_STRIDE);
          flush();
          at += CONTINUE_HEADER;
          vStart = at;
          at += TARGET_PAGE_SIZE;
          chainLen += RECORD_STRIDE;
          continue;
        }
        endChain();
        need(TARGET_PAGE_SIZE);
        if (off < 0) {
          decoded.push({ at, pos: -off - 1 });
        } else if (off === 0) {
          // Callers pass runs from forEachRun; a stray zero page still reads as zero.
          zeros.push({ at, len: TARGET_PAGE_SIZE });
        } else {
          chainPos = off;
          chainAt = at;
          chainLen = TARGET_PAGE_SIZE;
        }
        at += TARGET_PAGE_SIZE;
      }
    }
    endChain();
    flush();
    for (const z of zeros) scratch.fill(0, z.at, z.at + z.len);
    for (const d of decoded) this.spill!.read(d.pos, scratch.subarray(d.at, d.at + TARGET_PAGE_SIZE));
    await Promise.all(reads.map((r) => readExactly(this.fh, scratch.subarray(r.at, r.at + r.len), r.pos, this.path)));
    return views;
  }

  readAt(position: number, length: number, into?: Buffer): Promise<Buffer> {
    return readAtExactly(this.fh, position, length, this.path, into);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.spill?.close();
    await this.fh.close();
  }
}
