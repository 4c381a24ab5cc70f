// convert: rewrites a migration file as mapped-ram or as a plain stream, keeping every page's
// final content and the device state byte for byte. The input is read through the snapshot
// readers (which validate it completely first); pages travel in bounded batches, so files larger
// than memory convert in constant memory. The output appears under its name only when complete.
// Device sections are copied byte for byte; only the VMDESCRIPTION's "configuration" entry is
// rewritten, to describe the configuration record's new capability list.
//
// Stream output: header, configuration, START ram (block list) EOS, one PART with a PAGE record
// per present page (CONTINUE within a block) EOS, [SWITCHOVER_START], END EOS, device state.
// Absent pages get no record, exactly as a mapped-ram load leaves clear-bit pages untouched.

import { realpath, stat } from 'node:fs/promises';
import { AbortedError, InvalidOptionError, OutputFileError } from '../codec/errors.js';
import { encodeLibvirtImage } from '../codec/libvirt-image.js';
import { finishLibvirtImage } from '../engine/libvirt-image-file.js';
import { resolve } from 'node:path';
import { RamFlag, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeConfiguration, withCapability, type Configuration } from '../codec/configuration.js';
import { parseVmdesc } from '../codec/vmdesc.js';
import { encodeQemuJson, vmdescForConfiguration } from '../codec/vmdesc-config.js';
import {
  encodeBlockEntry,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
  encodeSwitchoverStart,
} from '../codec/stream-encode.js';
import { sliceViews } from '../engine/coalesce.js';
import { MappedRamWriter } from '../engine/mapped-ram-writer.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import { checkOutputPath, OutputFile } from './output-file.js';
import { convertToObject, isObjectUrl } from './object-convert.js';
import { objectReadReport, type ObjectReadReport, type UploadProgress, type UploadReport } from './object-store.js';
import { batchOffsets, countPresent, DEFAULT_BATCH_PAGES, presentPageBatches } from './page-batches.js';

export type FileFormat = 'mapped-ram' | 'stream';
/** What convert writes: a bare QEMU file, or one inside a libvirt save image (raw or sparse). */
export type ConvertTarget = FileFormat | 'libvirt' | 'libvirt-sparse';

export interface ConvertOptions {
  input: string;
  output: string;
  to: ConvertTarget;
  /** libvirt output: the domain XML (`virsh dumpxml --migratable`); default: a libvirt input's. */
  domainXml?: string;
  /** libvirt output: whether `virsh restore` resumes the guest; default: a libvirt input's, else true. */
  wasRunning?: boolean;
  /** Replace an existing output file. */
  force?: boolean;
  /** Pages per read batch (two batches are in memory at a time). */
  batchPages?: number;
  onProgress?: (p: ConvertProgress) => void;
  signal?: AbortSignal;
}

export interface ConvertProgress {
  phase: 'pages' | 'device-state' | 'committing' | 'done' | 'uploading';
  elapsedMs: number;
  pagesDone: number;
  pagesTotal: number;
  /** Bytes written to the output so far. */
  written: number;
  /** An s3:// input: what was read from the store so far. */
  store?: ObjectReadReport;
  /** An s3:// output: the upload, once the object's bytes go up (phase `uploading`). */
  upload?: UploadProgress;
}

export interface ConvertSummary {
  input: string;
  output: string;
  from: FileFormat;
  to: ConvertTarget;
  /** The input was a libvirt save image of this format. */
  'from-libvirt'?: string;
  machine: string;
  pages: number;
  'device-state-bytes': number;
  'input-size': number;
  'output-size': number;
  'elapsed-ms': number;
  blocks: { name: string; 'used-length': number; pages: number }[];
  /**
   * The store: for an s3:// output the upload (as save reports it), else for an s3:// input what
   * was read (as restore reports it).
   */
  store?: ObjectReadReport | UploadReport;
  /** What the user should know besides: an interrupt that came after an s3:// output's CompleteMultipartUpload went out, which it no longer stopped. */
  notes?: string[];
}

const DEVICE_CHUNK = 1024 * 1024;

interface Sink {
  writeBatch(block: string, offsets: Float64Array, pages: number, views: Buffer[]): Promise<number>;
  appendStream(bufs: Buffer[]): Promise<void>;
  commit(): Promise<number>;
  abort(): Promise<void>;
}

const outputConfig = (src: SnapshotSource, to: FileFormat): Configuration => withCapability(src.configuration, 'mapped-ram', to === 'mapped-ram');

function ramPrologue(src: SnapshotSource, to: FileFormat): Buffer {
  const config = outputConfig(src, to);
  const total = src.blockList.reduce((n, b) => n + b.usedLength, 0);
  const { sectionId, instanceId, versionId } = src.ramSection;
  return Buffer.concat([encodeStreamHeader(), encodeConfiguration(config), encodeSectionFull(SectionType.START, sectionId, 'ram', instanceId, versionId), encodeMemSize(total)]);
}

/** RAM's END, then the other iterable sections (dirty-bitmap) as the snapshot holds them, where send replays them. */
function ramEpilogue(src: SnapshotSource): Buffer[] {
  const id = src.ramSection.sectionId;
  return [...(src.switchoverStart ? [encodeSwitchoverStart()] : []), encodeSectionShort(SectionType.END, id), encodeEos(), encodeFooter(id), ...(src.iterableSections ? [src.iterableSections] : [])];
}

async function mappedRamSink(src: SnapshotSource, output: string, prologue?: Buffer): Promise<Sink> {
  const w = await MappedRamWriter.create(output, prologue ? { baseOffset: prologue.length } : {});
  try {
    if (prologue) await w.writePrologue(prologue);
    await w.writeHead(ramPrologue(src, 'mapped-ram'), src.blockList.map((b) => ({ name: b.name, usedLength: b.usedLength, ...(b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {}) })));
    await w.appendStream([encodeEos(), encodeFooter(src.ramSection.sectionId)]);
  } catch (e) {
    await w.abort();
    throw e;
  }
  return {
    async writeBatch(block, offsets, pages, views) {
      await w.writePages(block, offsets, pages, views);
      return pages * TARGET_PAGE_SIZE;
    },
    appendStream: (bufs) => w.appendStream(bufs),
    async commit() {
      await w.commit();
      return w.streamEnd;
    },
    abort: () => w.abort(),
  };
}

async function streamSink(src: SnapshotSource, output: string, force: boolean, prologue?: Buffer): Promise<Sink> {
  const out = await OutputFile.create(output, { force });
  const id = src.ramSection.sectionId;
  const ignoreShared = src.configuration.capabilities.includes('x-ignore-shared');
  try {
    await out.append([
      ...(prologue ? [prologue] : []),
      ramPrologue(src, 'stream'),
      ...src.blockList.map((b) => encodeBlockEntry(b.name, b.usedLength, ignoreShared && b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {})),
      encodeEos(),
      encodeFooter(id),
      encodeSectionShort(SectionType.PART, id),
    ]);
  } catch (e) {
    await out.abort();
    throw e;
  }
  let lastBlock: string | undefined;
  return {
    async writeBatch(block, offsets, pages, views) {
      // The first record of a block names it; the rest CONTINUE (docs/protocol.md §2.1).
      const name = block !== lastBlock ? Buffer.from(block, 'latin1') : undefined;
      const headers = Buffer.alloc(pages * 8 + (name ? 1 + name.length : 0));
      const iov: Buffer[] = [];
      let h = 0;
      for (let i = 0; i < pages; i++) {
        const start = h;
        const flags = RamFlag.PAGE | (i === 0 && name ? 0 : RamFlag.CONTINUE);
        headers.writeBigUInt64BE(BigInt(offsets[i]!) | BigInt(flags), h);
        h += 8;
        if (i === 0 && name) {
          headers[h++] = name.length;
          name.copy(headers, h);
          h += name.length;
        }
        iov.push(headers.subarray(start, h), ...sliceViews(views, i * TARGET_PAGE_SIZE, (i + 1) * TARGET_PAGE_SIZE));
      }
      lastBlock = block;
      await out.append(iov);
      return headers.length + pages * TARGET_PAGE_SIZE;
    },
    appendStream: (bufs) => out.append(bufs),
    async commit() {
      await out.commit();
      return out.size;
    },
    abort: () => out.abort(),
  };
}

/**
 * The device sections and EOF byte for byte, then the VMDESCRIPTION with its configuration entry
 * following the capability change (unchanged bytes when nothing changed).
 */
async function deviceStateOut(src: SnapshotSource, to: FileFormat): Promise<Buffer[]> {
  const ds = src.deviceState;
  const vmdescAt = ds.vmdescOffset !== undefined ? ds.fileOffset + ds.vmdescOffset : src.fileSize;
  const out: Buffer[] = [];
  for (let at = ds.fileOffset; at < vmdescAt; at += DEVICE_CHUNK) out.push(await src.readAt(at, Math.min(DEVICE_CHUNK, vmdescAt - at)));
  if (vmdescAt < src.fileSize) {
    const record = await src.readAt(vmdescAt, src.fileSize - vmdescAt);
    const next = vmdescForConfiguration(parseVmdesc(record.subarray(5), vmdescAt + 5), outputConfig(src, to));
    if (!next) {
      out.push(record);
    } else {
      const json = Buffer.from(encodeQemuJson(next), 'utf8');
      const head = Buffer.alloc(5);
      head[0] = SectionType.VMDESCRIPTION;
      head.writeUInt32BE(json.length, 1);
      out.push(head, json);
    }
  }
  return out;
}

async function samePath(a: string, b: string): Promise<boolean> {
  const real = async (p: string): Promise<string> => realpath(p).catch(() => resolve(p));
  return (await real(a)) === (await real(b));
}

/**
 * The libvirt header and data for the output, with the `…Part` magic until finishLibvirtImage.
 * A libvirt input gives its XML, cookie and was_running unless the options say otherwise; the
 * cookie (libvirt's CPU check data) is kept only with the input's own XML.
 */
function libvirtPrologue(src: SnapshotSource, opts: ConvertOptions): Buffer {
  const domainXml = opts.domainXml ?? src.libvirt?.domainXml;
  if (domainXml === undefined) throw new InvalidOptionError('a libvirt image needs the domain XML (--domain-xml FILE, from `virsh dumpxml --migratable DOMAIN`) unless the input is a libvirt image');
  if (!/<domain[\s>]/.test(domainXml)) throw new InvalidOptionError('the domain XML has no <domain> element');
  const cookie = opts.domainXml === undefined ? src.libvirt?.cookie : undefined;
  return encodeLibvirtImage({
    domainXml,
    ...(cookie !== undefined ? { cookie } : {}),
    wasRunning: opts.wasRunning ?? src.libvirt?.wasRunning ?? true,
    format: opts.to === 'libvirt-sparse' ? 'sparse' : 'raw',
  });
}

/** Converts `input` to `to` at `output`; the output is complete when the promise resolves. */
export async function convert(opts: ConvertOptions): Promise<ConvertSummary> {
  const started = Date.now();
  if (isObjectUrl(opts.output)) return convertToObject(opts, convert);
  if (await samePath(opts.input, opts.output)) throw new OutputFileError('OUTPUT_IS_INPUT', opts.output, `the output ${opts.output} is the input file`);
  await checkOutputPath(opts.output, opts.force ?? false);
  const src = await openSnapshot(opts.input);
  let sink: Sink | undefined;
  try {
    const to: FileFormat = opts.to === 'libvirt' ? 'stream' : opts.to === 'libvirt-sparse' ? 'mapped-ram' : opts.to;
    const prologue = opts.to === 'libvirt' || opts.to === 'libvirt-sparse' ? libvirtPrologue(src, opts) : undefined;
    const blocks = src.blockList.map((b) => b.name);
    const total = countPresent(src, blocks);
    let done = 0;
    let written = 0;
    const progress = (phase: ConvertProgress['phase']): void => opts.onProgress?.({ phase, elapsedMs: Date.now() - started, pagesDone: done, pagesTotal: total, written, ...objectReadReport(src) });
    const aborted = (): void => {
      if (opts.signal?.aborted) throw new AbortedError(opts.signal.reason, 'convert interrupted; no output written');
    };
    aborted();
    sink = to === 'mapped-ram' ? await mappedRamSink(src, opts.output, prologue) : await streamSink(src, opts.output, opts.force ?? false, prologue);
    progress('pages');
    for await (const b of presentPageBatches(src, blocks, opts.batchPages ?? DEFAULT_BATCH_PAGES)) {
      aborted();
      written += await sink.writeBatch(b.block, batchOffsets(b), b.pages, b.views);
      done += b.pages;
      progress('pages');
    }
    if (to === 'stream') await sink.appendStream([encodeEos(), encodeFooter(src.ramSection.sectionId)]);
    await sink.appendStream(ramEpilogue(src));
    progress('device-state');
    const ds = src.deviceState.fileOffset;
    for (const chunk of await deviceStateOut(src, to)) {
      aborted();
      await sink.appendStream([chunk]);
      written += chunk.length;
    }
    progress('committing');
    aborted();
    const size = await sink.commit();
    sink = undefined;
    // Complete and durable under its name: only now does the image become restorable.
    if (prologue) await finishLibvirtImage(opts.output);
    progress('done');
    return {
      input: opts.input,
      output: opts.output,
      from: src.format,
      to: opts.to,
      ...(src.libvirt ? { 'from-libvirt': src.libvirt.format } : {}),
      machine: src.configuration.machine,
      pages: total,
      'device-state-bytes': src.fileSize - ds,
      'input-size': src.libvirt ? (await stat(opts.input)).size : src.fileSize,
      'output-size': size,
      'elapsed-ms': Date.now() - started,
      blocks: src.blockList.map((b) => ({ name: b.name, 'used-length': b.usedLength, pages: src.presentPages(b.name) })),
      ...objectReadReport(src),
    };
  } finally {
    await sink?.abort();
    await src.close();
  }
}
