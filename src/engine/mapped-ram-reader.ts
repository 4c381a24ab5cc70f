// Opens a mapped-ram snapshot: parses the main stream (seeking over page regions), loads each
// block's bitmap, checks the device state against the VMDESCRIPTION, and reads pages with
// positioned reads (absent pages read as zero).

import { open, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import { AlignedSlots, alignedBuffer, DIRECT_ALIGN, PACKET_SLOT_BYTES, PACKET_SLOTS } from './aligned-slots.js';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import type { Configuration } from '../codec/configuration.js';
import { ProtocolError } from '../codec/errors.js';
import type { RamBlockInfo } from '../codec/main-stream-parser.js';
import { StreamSession } from '../codec/stream-session.js';
import { PageBitmap, bitmapBytes, type MappedRamHeader } from '../codec/mapped-ram.js';
import type { DeviceStateLayout } from '../codec/vmdesc.js';
import { readAtExactly, readExactly, verifiedDeviceState } from './read-exactly.js';
import type { SnapshotBlockInfo, SnapshotRamSection, SnapshotSource } from './snapshot.js';

export interface SnapshotBlock {
  name: string;
  usedLength: number;
  header: MappedRamHeader;
  bitmap: PageBitmap;
  /** No pages in the file: x-ignore-shared's shared block (SnapshotBlockInfo.shared). */
  shared?: true;
}

const READ_CHUNK = 256 * 1024;
const MAX_DEVICE_STATE = 256 * 1024 * 1024;

interface Prologue {
  ramSection: SnapshotRamSection;
  switchoverStart: boolean;
}

export class MappedRamSnapshot implements SnapshotSource {
  readonly format = 'mapped-ram';
  readonly blockList: readonly SnapshotBlockInfo[];
  readonly ramSection: SnapshotRamSection;
  readonly switchoverStart: boolean;
  private direct: FileHandle | undefined;
  private slots: AlignedSlots | undefined;

  /** Non-RAM iterable sections (dirty-bitmap) the file holds, as bytes, for send to replay. */
  iterableSections: Buffer | undefined;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    readonly configuration: Configuration,
    readonly blocks: ReadonlyMap<string, SnapshotBlock>,
    readonly deviceState: DeviceStateLayout & { fileOffset: number },
    readonly fileSize: number,
    prologue: Prologue,
    blockInfo: SnapshotBlockInfo[],
  ) {
    this.ramSection = prologue.ramSection;
    this.switchoverStart = prologue.switchoverStart;
    this.blockList = blockInfo;
  }

  /**
   * directIo (default true): read pages with O_DIRECT where the file system allows it.
   * baseOffset: where QEMU's stream starts (`file:PATH,offset=N`, libvirt images); block headers
   * hold absolute offsets either way.
   */
  static async open(path: string, opts: { directIo?: boolean; baseOffset?: number } = {}): Promise<MappedRamSnapshot> {
    const fh = await open(path, 'r');
    try {
      const size = (await fh.stat()).size;
      // The record order (one RAM section, device state after END, no live-peer commands) is the
      // session's; a mapped-ram file adds that its pages are in the regions, never in records.
      const session = new StreamSession({ kind: 'file', parser: { fileOffset: opts.baseOffset ?? 0 } });
      const blocks = new Map<string, SnapshotBlock>();
      const blockInfo: SnapshotBlockInfo[] = [];
      let ramSection: SnapshotRamSection | undefined;
      let pos = opts.baseOffset ?? 0;
      let device: Buffer[] = [];
      let deviceBytes = 0;
      // Non-RAM iterable sections (dirty-bitmap) as their bytes, replayed by send after RAM's END.
      const iterable: Buffer[] = [];
      let iterableBytes = 0;
      const buf = Buffer.allocUnsafe(READ_CHUNK);
      while (pos < size) {
        const skip = session.pendingSkip;
        if (skip > 0) {
          if (pos + skip > size) throw new ProtocolError('TRUNCATED', `file is truncated: it ends inside a pages region (needs 0x${(pos + skip).toString(16)} bytes, has 0x${size.toString(16)})`, { offset: pos });
          session.skipped(skip);
          pos += skip;
          continue;
        }
        const { bytesRead } = await fh.read(buf, 0, Math.min(READ_CHUNK, size - pos), pos);
        if (bytesRead === 0) break;
        session.push(Buffer.from(buf.subarray(0, bytesRead)));
        pos += bytesRead;
        for (let ev = session.next(); ev !== null; ev = session.next()) {
          if (ev.type === 'ram-block') {
            blocks.set(ev.block.name, await loadBlock(fh, ev.block, size));
            blockInfo.push({ name: ev.block.name, usedLength: ev.block.usedLength, ...(ev.block.mrAddr !== undefined ? { mrAddr: ev.block.mrAddr } : {}), ...(ev.block.shared ? { shared: true as const } : {}) });
          } else if (ev.type === 'section' && ev.kind === 'start') {
            ramSection = { sectionId: ev.sectionId, instanceId: ev.instanceId, versionId: ev.versionId };
          } else if (ev.type === 'page' || ev.type === 'zero' || ev.type === 'xbzrle') {
            throw new ProtocolError('BAD_RECORD', `${ev.type} record in a mapped-ram file`, { offset: ev.at });
          } else if (ev.type === 'iterable') {
            for (const b of ev.bytes) {
              iterableBytes += b.length;
              if (iterableBytes > MAX_DEVICE_STATE) throw new ProtocolError('LIMIT_EXCEEDED', `non-RAM iterable sections larger than ${MAX_DEVICE_STATE} bytes`, { offset: ev.at });
              iterable.push(Buffer.from(b));
            }
          } else if (ev.type === 'device-state') {
            for (const d of ev.data) {
              deviceBytes += d.length;
              if (deviceBytes > MAX_DEVICE_STATE) throw new ProtocolError('LIMIT_EXCEEDED', `device state larger than ${MAX_DEVICE_STATE} bytes`);
              device.push(d);
            }
          }
        }
      }
      const config = session.configuration;
      const deviceStart = session.deviceStateOffset;
      const switchoverStart = session.switchoverStart;
      if (!config) throw new ProtocolError('BAD_RECORD', 'no configuration record');
      if (!config.capabilities.includes('mapped-ram')) throw new ProtocolError('BAD_MAPPED_RAM', 'not a mapped-ram file (the configuration lacks the mapped-ram capability)');
      if (!ramSection) throw new ProtocolError('BAD_RECORD', 'no RAM section in the file');
      if (deviceStart < 0) throw new ProtocolError('TRUNCATED', 'file is truncated: it ends before the device state');
      const tail = Buffer.concat(device);
      device = [];
      const snap = new MappedRamSnapshot(path, fh, config, blocks, verifiedDeviceState(tail, deviceStart, size), size, { ramSection, switchoverStart }, blockInfo);
      if (iterable.length > 0) snap.iterableSections = Buffer.concat(iterable);
      if (opts.directIo ?? true) await snap.enableDirectReads();
      return snap;
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  /** `pages` pages of `block` from byte `offset`; pages whose bit is clear read as zero. */
  async readPages(block: string, offset: number, pages: number, into?: Buffer): Promise<Buffer> {
    const b = this.blocks.get(block);
    if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `no block "${block}" in ${this.path}`);
    const len = pages * TARGET_PAGE_SIZE;
    if (offset % TARGET_PAGE_SIZE !== 0 || offset + len > b.usedLength) throw new RangeError(`pages [0x${offset.toString(16)}, +0x${len.toString(16)}) outside block ${block}`);
    const out = into ?? Buffer.alloc(len);
    let p = 0;
    while (p < pages) {
      const page = offset / TARGET_PAGE_SIZE + p;
      const present = b.bitmap.test(page);
      let n = 1;
      while (p + n < pages && b.bitmap.test(page + n) === present) n++;
      if (present) {
        await this.fh.read(out, p * TARGET_PAGE_SIZE, n * TARGET_PAGE_SIZE, b.header.pagesOffset + page * TARGET_PAGE_SIZE);
      } else {
        out.fill(0, p * TARGET_PAGE_SIZE, (p + n) * TARGET_PAGE_SIZE);
      }
      p += n;
    }
    return out;
  }

  private block(name: string): SnapshotBlock {
    const b = this.blocks.get(name);
    if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `no block "${name}" in ${this.path}`);
    return b;
  }

  presentPages(block: string): number {
    return this.block(block).bitmap.count();
  }

  forEachRun(block: string, visit: (firstPage: number, count: number) => boolean | void, fromPage = 0, maxRun = Infinity): void {
    for (const [first, count] of this.block(block).bitmap.runs(fromPage, maxRun)) if (visit(first, count) === false) return;
  }

  scratchBytes(pages: number): number {
    return pages * TARGET_PAGE_SIZE;
  }

  /** Page-aligned scratch, which loadRuns fills with O_DIRECT reads directly (no staging copy). */
  allocScratch(bytes: number): Buffer {
    if (bytes === 0 || bytes % DIRECT_ALIGN !== 0) return Buffer.allocUnsafe(bytes);
    const b = alignedBuffer(bytes);
    this.alignedScratch.add(b.buffer);
    return b;
  }

  private readonly alignedScratch = new WeakSet<ArrayBufferLike>();

  /**
   * One positioned read per run: the pages region holds page k at pagesOffset + k × pageSize.
   * Where O_DIRECT is on, the runs are read straight into `scratch` when it came from
   * allocScratch (page-aligned), else into an aligned slot and copied to `scratch`: a snapshot
   * is read once, usually long after it was written (ours are written with O_DIRECT, so they are
   * not cached), and going through the page cache would cost a fresh cache page per guest page,
   * which on this kind of VM costs more CPU than the copy.
   */
  async loadRuns(block: string, runs: ArrayLike<number>, runCount: number, scratch: Buffer): Promise<Buffer[]> {
    const b = this.block(block);
    const pages = b.usedLength / TARGET_PAGE_SIZE;
    const spans: { at: number; len: number; pos: number }[] = [];
    let total = 0;
    for (let i = 0; i < runCount; i++) {
      const first = runs[2 * i]!;
      const count = runs[2 * i + 1]!;
      if (first < 0 || count <= 0 || first + count > pages) throw new RangeError(`pages [${first}, +${count}) outside block ${block}`);
      const len = count * TARGET_PAGE_SIZE;
      spans.push({ at: total, len, pos: b.header.pagesOffset + first * TARGET_PAGE_SIZE });
      total += len;
    }
    if (total > scratch.length) throw new RangeError(`scratch of ${scratch.length} bytes is too small for the runs`);
    const views = spans.map((sp) => scratch.subarray(sp.at, sp.at + sp.len));
    const slots = this.slots;
    const aligned = b.header.pagesOffset % DIRECT_ALIGN === 0;
    if (slots && aligned && this.alignedScratch.has(scratch.buffer) && scratch.byteOffset % DIRECT_ALIGN === 0) {
      // Runs are whole pages, so every view of aligned scratch starts aligned too.
      await Promise.all(spans.map((sp, i) => this.readDirect(views[i]!, sp.pos)));
      return views;
    }
    if (!slots || !aligned || total > slots.slotBytes) {
      await Promise.all(spans.map((sp, i) => readExactly(this.fh, views[i]!, sp.pos, this.path)));
      return views;
    }
    const got = slots.acquire();
    const slot = got instanceof Promise ? await got : got;
    try {
      await Promise.all(spans.map((sp) => this.readDirect(slot.subarray(sp.at, sp.at + sp.len), sp.pos)));
      slot.copy(scratch, 0, 0, total);
    } finally {
      slots.release(slot);
    }
    return views;
  }

  private async readDirect(into: Buffer, position: number): Promise<void> {
    const direct = this.direct;
    let done = 0;
    if (direct) {
      try {
        done = (await direct.read(into, 0, into.length, position)).bytesRead;
      } catch (e) {
        // Some file systems accept O_DIRECT at open and refuse it at read: buffered from now on.
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.direct = undefined;
        this.slots = undefined;
        await direct.close().catch(() => {});
      }
    }
    // A short direct read (or none) is finished through the page cache.
    if (done < into.length) await readExactly(this.fh, into.subarray(done), position + done, this.path);
  }

  /** Pages are read with O_DIRECT from now on, where the file system allows it. */
  private async enableDirectReads(): Promise<void> {
    if (fsConstants.O_DIRECT === undefined) return;
    this.direct = await open(this.path, fsConstants.O_RDONLY | fsConstants.O_DIRECT).catch(() => undefined);
    if (this.direct) this.slots = new AlignedSlots(PACKET_SLOT_BYTES, PACKET_SLOTS);
  }

  readAt(position: number, length: number, into?: Buffer): Promise<Buffer> {
    return readAtExactly(this.fh, position, length, this.path, into);
  }

  async close(): Promise<void> {
    await this.fh.close();
    await this.direct?.close().catch(() => {});
    this.direct = undefined;
  }
}

async function loadBlock(fh: FileHandle, info: RamBlockInfo, fileSize: number): Promise<SnapshotBlock> {
  const h = info.mappedRam;
  if (!h) throw new ProtocolError('BAD_MAPPED_RAM', `block "${info.name}" has no mapped-ram header`);
  const size = bitmapBytes(info.usedLength);
  // Its pages are in the shared backing file: none here, every bit clear.
  if (info.shared) return { name: info.name, usedLength: info.usedLength, header: h, bitmap: new PageBitmap(info.usedLength / TARGET_PAGE_SIZE, Buffer.alloc(size)), shared: true };
  if (h.bitmapOffset + size > fileSize) throw new ProtocolError('BAD_MAPPED_RAM', `block "${info.name}" bitmap lies beyond the end of the file`, { offset: h.bitmapOffset });
  if (h.pagesOffset + info.usedLength > fileSize) {
    throw new ProtocolError('TRUNCATED', `file is truncated: block "${info.name}" pages region ends at 0x${(h.pagesOffset + info.usedLength).toString(16)}, the file at 0x${fileSize.toString(16)}`, { offset: h.pagesOffset });
  }
  if (h.bitmapOffset + size > h.pagesOffset) throw new ProtocolError('BAD_MAPPED_RAM', `block "${info.name}" bitmap overlaps its pages region`, { offset: h.bitmapOffset });
  const bm = Buffer.alloc(size);
  await fh.read(bm, 0, size, h.bitmapOffset);
  return { name: info.name, usedLength: info.usedLength, header: h, bitmap: new PageBitmap(info.usedLength / TARGET_PAGE_SIZE, bm) };
}
