// extract: raw images of RAM blocks. Each image is the block's used_length; present pages are
// written at their offsets (one positioned writev per run), absent pages are left as holes that
// read as zeros, so a mostly-empty 16 GiB block costs almost no disk.

import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { AbortedError, InvalidOptionError, OutputFileError, ProtocolError } from '../codec/errors.js';
import { sliceViews } from '../engine/coalesce.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import { checkOutputPath, OutputFile } from './output-file.js';
import { isObjectUrl, objectReadReport, type ObjectReadReport } from './object-store.js';
import { countPresent, DEFAULT_BATCH_PAGES, presentPageBatches } from './page-batches.js';

export interface ExtractOptions {
  file: string;
  /** A directory (one image per block), or with `block` a file or an existing directory. */
  out: string;
  block?: string;
  force?: boolean;
  batchPages?: number;
  onProgress?: (p: ExtractProgress) => void;
  signal?: AbortSignal;
}

export interface ExtractProgress {
  phase: 'pages' | 'done';
  elapsedMs: number;
  block: string;
  pagesDone: number;
  pagesTotal: number;
  written: number;
  /** An s3:// input: what was read from the store so far. */
  store?: ObjectReadReport;
}

export interface ExtractSummary {
  file: string;
  format: string;
  'elapsed-ms': number;
  blocks: { name: string; output: string; 'used-length': number; pages: number; 'bytes-written': number }[];
  /**
   * Blocks x-ignore-shared left out of the snapshot (QEMU 11 marks them in its mapped-ram files):
   * their memory is in the memory backend's shared file, so no image is written for them.
   */
  skipped?: { name: string; reason: 'shared' }[];
  /** Things the images do not say by themselves (e.g. blocks that may be shared but are not marked). */
  notes?: string[];
  /** An s3:// input: what was read from the store (as restore reports it). */
  store?: ObjectReadReport;
}

/** A file name for a block: RAM block names hold '/' and ':' (e.g. "/rom@etc/acpi/tables"). */
export function blockFileName(name: string): string {
  let s = name.replace(/[^A-Za-z0-9._+-]+/g, '_').replace(/^[_.]+/, '').replace(/_+$/, '');
  if (s === '') s = 'block';
  return `${s}.raw`;
}

/** Names for all blocks, made unique when two sanitise to the same name. */
export function blockFileNames(names: readonly string[]): Map<string, string> {
  const used = new Set<string>();
  const out = new Map<string, string>();
  for (const n of names) {
    const base = blockFileName(n);
    let f = base;
    for (let i = 2; used.has(f); i++) f = base.replace(/\.raw$/, `-${i}.raw`);
    used.add(f);
    out.set(n, f);
  }
  return out;
}

async function isDirectory(p: string): Promise<boolean> {
  return stat(p).then((s) => s.isDirectory(), () => false);
}

export async function extract(opts: ExtractOptions): Promise<ExtractSummary> {
  const started = Date.now();
  if (isObjectUrl(opts.out)) throw new InvalidOptionError(`extract writes raw images to local files, not to ${opts.out} (convert writes snapshots to the store)`);
  const src = await openSnapshot(opts.file);
  const outputs: OutputFile[] = [];
  try {
    const all = src.blockList.map((b) => b.name);
    let targets: { name: string; usedLength: number; path: string }[];
    const sharedNote = (name: string): string => `RAM block "${name}" of ${opts.file} was left out of the snapshot by x-ignore-shared: its memory is in the memory backend's shared file, not in the snapshot`;
    const skipped: { name: string; reason: 'shared' }[] = [];
    if (opts.block !== undefined) {
      const b = src.blockList.find((x) => x.name === opts.block);
      if (!b) throw new ProtocolError('UNKNOWN_BLOCK', `no RAM block "${opts.block}" in ${opts.file} (blocks: ${all.join(', ')})`);
      // An image of zeros would pass for the block's memory.
      if (b.shared) throw new InvalidOptionError(`${sharedNote(b.name)} (no image written; copy it from that file)`);
      const path = (await isDirectory(opts.out)) ? join(opts.out, blockFileName(b.name)) : opts.out;
      targets = [{ name: b.name, usedLength: b.usedLength, path }];
    } else {
      // Checked before mkdir -p, which over a file would only say EEXIST.
      const st = await stat(opts.out).catch(() => undefined);
      if (st && !st.isDirectory()) throw new OutputFileError('OUTPUT_NOT_DIRECTORY', opts.out, `${opts.out} is not a directory`);
      await mkdir(opts.out, { recursive: true });
      const names = blockFileNames(all);
      for (const b of src.blockList) if (b.shared) skipped.push({ name: b.name, reason: 'shared' });
      targets = src.blockList.filter((b) => !b.shared).map((b) => ({ name: b.name, usedLength: b.usedLength, path: join(opts.out, names.get(b.name)!) }));
    }
    for (const t of targets) await checkOutputPath(t.path, opts.force ?? false);
    const summary: ExtractSummary = { file: opts.file, format: src.format, 'elapsed-ms': 0, blocks: [] };
    if (skipped.length > 0) summary.skipped = skipped;
    // Only QEMU 11's own mapped-ram files mark shared blocks; a stream (and so any snapshot we
    // saved from one) does not say which blocks were left out, only that some may have been.
    if (src.configuration.capabilities.includes('x-ignore-shared')) {
      const empty = targets.filter((t) => src.presentPages(t.name) === 0).map((t) => t.name);
      if (empty.length > 0) {
        summary.notes = [`the snapshot was taken with x-ignore-shared and holds no page of ${empty.join(', ')}: a block whose memory was in a shared file (share=on) looks like that, and its image is only zeros`];
      }
    }
    const total = countPresent(src, targets.map((t) => t.name));
    let done = 0;
    let written = 0;
    for (const t of targets) {
      const out = await OutputFile.create(t.path, { force: opts.force ?? false });
      outputs.push(out);
      let bytes = 0;
      for await (const b of presentPageBatches(src, [t.name], opts.batchPages ?? DEFAULT_BATCH_PAGES)) {
        if (opts.signal?.aborted) throw new AbortedError(opts.signal.reason, 'extract interrupted; no output written');
        const writes: Promise<void>[] = [];
        let at = 0;
        for (let i = 0; i < b.runs.length; i += 2) {
          const len = b.runs[i + 1]! * TARGET_PAGE_SIZE;
          writes.push(out.writeAt(sliceViews(b.views, at, at + len), b.runs[i]! * TARGET_PAGE_SIZE));
          at += len;
        }
        await Promise.all(writes);
        bytes += at;
        done += b.pages;
        written += at;
        opts.onProgress?.({ phase: 'pages', elapsedMs: Date.now() - started, block: t.name, pagesDone: done, pagesTotal: total, written, ...objectReadReport(src) });
      }
      summary.blocks.push({ name: t.name, output: t.path, 'used-length': t.usedLength, pages: src.presentPages(t.name), 'bytes-written': bytes });
    }
    // Renamed only once every image is complete: an interrupted extract leaves none behind.
    for (let i = 0; i < outputs.length; i++) await outputs[i]!.commit(targets[i]!.usedLength);
    summary['elapsed-ms'] = Date.now() - started;
    Object.assign(summary, objectReadReport(src));
    opts.onProgress?.({ phase: 'done', elapsedMs: summary['elapsed-ms'], block: '', pagesDone: done, pagesTotal: total, written, ...objectReadReport(src) });
    return summary;
  } finally {
    for (const o of outputs) await o.abort();
    await src.close();
  }
}
