// Main-channel events back to bytes: what a relay writes to its destination for each record it
// parsed from its source. Records are re-encoded, not copied, so nothing unparsed slips through;
// a page record keeps the source's CONTINUE flag (the stream comes out byte for byte as it went
// in), which is valid as long as no page record is inserted or dropped between them.

import { RamFlag, SectionType } from './constants.js';
import { encodeConfiguration } from './configuration.js';
import type { MainEvent } from './main-stream-parser.js';
import {
  encodeBlockEntry,
  encodeCommand,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeMultifdFlush,
  encodePageRecordHeader,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
  encodeXbzrleRecord,
  encodeZeroRecord,
} from './stream-encode.js';
import { encodePackagedHeader } from './postcopy.js';

/** The buffers of one event, in order (views of the event's own data where it has any). */
export function encodeMainEvent(ev: MainEvent): Buffer[] {
  switch (ev.type) {
    case 'header':
      return [encodeStreamHeader()];
    case 'configuration':
      return [encodeConfiguration(ev.config)];
    case 'command':
      return [encodeCommand(ev.cmd, ev.payload)];
    case 'package':
      return [encodePackagedHeader(ev.data.length), ev.data];
    case 'section':
      return ev.kind === 'start' || ev.kind === 'full'
        ? [encodeSectionFull(ev.kind === 'start' ? SectionType.START : SectionType.FULL, ev.sectionId, ev.idstr, ev.instanceId, ev.versionId)]
        : [encodeSectionShort(ev.kind === 'part' ? SectionType.PART : SectionType.END, ev.sectionId)];
    case 'ram-mem-size':
      return [encodeMemSize(ev.totalBytes)];
    case 'ram-block':
      if (ev.block.mappedRam) throw new RangeError('a mapped-ram block entry has no stream encoding');
      return [encodeBlockEntry(ev.block.name, ev.block.usedLength, {
        ...(ev.block.mrAddr !== undefined ? { mrAddr: ev.block.mrAddr } : {}),
        ...(ev.block.pageSize !== undefined ? { pageSize: ev.block.pageSize } : {}),
      })];
    case 'ram-page':
      return [encodePageRecordHeader(RamFlag.PAGE, ev.offset, ev.continued ? undefined : ev.block), ...ev.data];
    case 'ram-zero':
      return [encodeZeroRecord(ev.offset, ev.continued ? undefined : ev.block)];
    case 'ram-xbzrle':
      return encodeXbzrleRecord(ev.offset, ev.continued ? undefined : ev.block, ev.delta);
    case 'ram-flush':
      return [encodeMultifdFlush()];
    case 'ram-eos':
      return [encodeEos()];
    case 'iterable-data':
      return [ev.data];
    case 'footer':
      return [encodeFooter(ev.sectionId)];
    case 'device-state':
      return ev.data;
  }
}
