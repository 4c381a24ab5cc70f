// inspect: what a migration file holds and where. The snapshot reader validates the file and
// knows each page's final state; the layout scan adds file offsets, every top-level record and,
// on request, every device's fields decoded through the VMDESCRIPTION.

import { structToJson, type DecodedStruct, type JsonValue } from '../codec/device-fields.js';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { stat } from 'node:fs/promises';
import { openSnapshot } from '../engine/open-snapshot.js';
import { libvirtSummary, type LibvirtSummary } from './libvirt-summary.js';
import { describePacked, PackedSnapshot, type PackedDescription } from '../engine/packed-snapshot-source.js';
import { scanFile, sortProblems, type MappedRamRegions, type Problem } from './file-layout.js';

export interface InspectOptions {
  /** Decode every device's fields. */
  devices?: boolean;
}

export interface InspectSection {
  offset: number;
  /** START, PART, END, FULL, COMMAND, EOF, VMDESCRIPTION. */
  type: string;
  size: number;
  sectionId?: number;
  idstr?: string;
  instanceId?: number;
  versionId?: number;
  /** RAM sections of a stream file: page and zero records. */
  pageRecords?: number;
  zeroRecords?: number;
  /** Present when the section holds XBZRLE records (page deltas, applied by the reader). */
  xbzrleRecords?: number;
}

/** A non-RAM iterable handler's sections (dirty-bitmap), carried as bytes. */
export interface InspectIterable {
  name: string;
  /** START, PART and END sections of the handler (EOS-only PARTs included). */
  sections: number;
  /** Bytes of those sections, headers and footers included: what send replays. */
  size: number;
}

export interface InspectBlock {
  name: string;
  'used-length': number;
  pages: number;
  /** Pages whose final content is not zero (stored in the file). */
  present: number;
  /** Pages that end up zero (never sent, sent as zero, or clear in the bitmap). */
  zero: number;
  /** Bytes of page data the file holds for the block's final state. */
  bytes: number;
  'mr-addr'?: number;
  /** x-ignore-shared's shared block (QEMU 11 mapped-ram files): its pages are in the backing file, none here, none zero. */
  shared?: true;
  'entry-offset': number;
  'mapped-ram'?: MappedRamRegions;
  /** Stream files: records naming the block (a page sent in several rounds counts each time). */
  'page-records'?: number;
  'zero-records'?: number;
  /** Present when the file holds XBZRLE records for the block (page deltas, applied by the reader). */
  'xbzrle-records'?: number;
}

export interface InspectDevice {
  idstr: string;
  'instance-id': number;
  'section-id': number;
  version: number;
  'vmsd-name'?: string;
  offset: number;
  size: number;
  fields?: { [k: string]: JsonValue };
  /** The decoded tree (for text rendering); left out of JSON output. */
  state?: DecodedStruct;
}

export interface InspectResult {
  file: string;
  'file-size': number;
  format: 'mapped-ram' | 'stream';
  machine: string;
  capabilities: string[];
  uuid?: string;
  'target-page-bits'?: number;
  configuration: { offset: number; size: number };
  'ram-section': { 'section-id': number; 'instance-id': number; version: number };
  'switchover-start': boolean;
  'mem-size': number;
  'device-state': { offset: number; size: number; 'eof-offset'?: number; 'vmdesc-offset'?: number; 'vmdesc-length'?: number };
  sections: InspectSection[];
  /** Sections of iterable handlers other than RAM (dirty-bitmap), per handler; absent when none. */
  'iterable-sections'?: InspectIterable[];
  blocks: InspectBlock[];
  devices?: InspectDevice[];
  /** Anything the structural check found (inspect shows a loadable file even with warnings). */
  problems: Problem[];
  /** A libvirt save image: header fields, domain XML and cookie (offsets above are file offsets, or within the decompressed stream for a compressed image). */
  libvirt?: LibvirtSummary;
  /** An s3:// object: how it is stored (docs/s3-layout.md); offsets above are in the file it expands to. */
  object?: PackedDescription;
}

function uuidText(u: Buffer): string {
  const h = u.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export async function inspect(path: string, opts: InspectOptions = {}): Promise<InspectResult> {
  // The reader refuses anything it could not send, with a typed error naming the offset.
  const src = await openSnapshot(path);
  try {
    // A libvirt image's stream starts after its header; a compressed one was decompressed to src.path.
    const layout = await scanFile(src.path, { keepDeviceState: opts.devices === true, baseOffset: src.baseOffset ?? 0 });
    const config = src.configuration;
    const sections: InspectSection[] = [];
    for (const s of layout.ramSections) {
      const sec: InspectSection = { offset: s.offset, type: s.kind.toUpperCase(), size: s.size, sectionId: s.sectionId, idstr: 'ram' };
      if (s.kind === 'start' || s.kind === 'full') Object.assign(sec, { instanceId: src.ramSection.instanceId, versionId: src.ramSection.versionId });
      if (src.format === 'stream') Object.assign(sec, { pageRecords: s.pageRecords, zeroRecords: s.zeroRecords }, s.xbzrleRecords > 0 ? { xbzrleRecords: s.xbzrleRecords } : {});
      sections.push(sec);
    }
    const iterables = new Map<string, InspectIterable>();
    for (const it of layout.iterableSections ?? []) {
      sections.push({ offset: it.offset, type: it.kind.toUpperCase(), size: it.size, sectionId: it.sectionId, idstr: it.idstr });
      const sum = iterables.get(it.idstr) ?? { name: it.idstr, sections: 0, size: 0 };
      sum.sections++;
      sum.size += it.size;
      iterables.set(it.idstr, sum);
    }
    for (const c of layout.commands) sections.push({ offset: c.offset, type: 'COMMAND', size: c.size, idstr: c.name });
    for (const d of layout.devices) {
      sections.push({ offset: d.offset, type: d.type.toUpperCase(), size: d.size, sectionId: d.sectionId, idstr: d.idstr, instanceId: d.instanceId, versionId: d.versionId });
    }
    if (layout.eofOffset !== undefined) sections.push({ offset: layout.eofOffset, type: 'EOF', size: 1 });
    if (layout.vmdescOffset !== undefined) sections.push({ offset: layout.vmdescOffset, type: 'VMDESCRIPTION', size: 5 + (layout.vmdescLength ?? 0) });
    sections.sort((a, b) => a.offset - b.offset);

    const scanned = new Map(layout.blocks.map((b) => [b.name, b]));
    const blocks: InspectBlock[] = src.blockList.map((b) => {
      const pages = b.usedLength / TARGET_PAGE_SIZE;
      const present = src.presentPages(b.name);
      const s = scanned.get(b.name);
      const out: InspectBlock = { name: b.name, 'used-length': b.usedLength, pages, present, zero: b.shared ? 0 : pages - present, bytes: present * TARGET_PAGE_SIZE, 'entry-offset': s?.entryOffset ?? -1 };
      if (b.mrAddr !== undefined) out['mr-addr'] = b.mrAddr;
      if (b.shared) out.shared = true;
      if (s?.mappedRam) out['mapped-ram'] = s.mappedRam;
      if (src.format === 'stream' && s) {
        out['page-records'] = s.pageRecords;
        out['zero-records'] = s.zeroRecords;
        if (s.xbzrleRecords > 0) out['xbzrle-records'] = s.xbzrleRecords;
      }
      return out;
    });

    const ds = src.deviceState;
    const result: InspectResult = {
      file: path,
      'file-size': src.fileSize,
      format: src.format,
      machine: config.machine,
      capabilities: config.capabilities,
      configuration: { offset: layout.configurationOffset ?? 8, size: layout.configurationSize ?? 0 },
      'ram-section': { 'section-id': src.ramSection.sectionId, 'instance-id': src.ramSection.instanceId, version: src.ramSection.versionId },
      'switchover-start': src.switchoverStart,
      'mem-size': layout.memSizeTotal ?? src.blockList.reduce((n, b) => n + b.usedLength, 0),
      'device-state': {
        offset: ds.fileOffset,
        size: src.fileSize - ds.fileOffset,
        'eof-offset': ds.fileOffset + ds.eofOffset,
        ...(ds.vmdescOffset !== undefined ? { 'vmdesc-offset': ds.fileOffset + ds.vmdescOffset, 'vmdesc-length': layout.vmdescLength ?? 0 } : {}),
      },
      sections,
      ...(iterables.size > 0 ? { 'iterable-sections': [...iterables.values()] } : {}),
      blocks,
      problems: sortProblems(layout.problems),
    };
    if (src.libvirt) {
      result.libvirt = libvirtSummary(src.libvirt, true);
      result['file-size'] = (await stat(path)).size;
    }
    if (src instanceof PackedSnapshot) result.object = describePacked(src);
    if (config.uuid) result.uuid = uuidText(config.uuid);
    if (config.targetPageBits !== undefined) result['target-page-bits'] = config.targetPageBits;
    if (opts.devices) {
      result.devices = layout.devices.map((d) => {
        const dev: InspectDevice = { idstr: d.idstr, 'instance-id': d.instanceId, 'section-id': d.sectionId, version: d.versionId, offset: d.offset, size: d.size };
        if (d.state) {
          if (d.state.vmsdName !== undefined) dev['vmsd-name'] = d.state.vmsdName;
          dev.fields = structToJson(d.state);
          Object.defineProperty(dev, 'state', { value: d.state, enumerable: false });
        }
        return dev;
      });
    }
    return result;
  } finally {
    await src.close();
  }
}
