// verify: the full structural check of a migration file. The layout scan collects problems with
// their file offsets (several where the format allows going on); when it finds none, the file is
// also opened with the snapshot reader send/restore use, so "ok" means our own tools accept it.

import { ProtocolError } from '../codec/errors.js';
import { stat } from 'node:fs/promises';
import type { LibvirtImage } from '../codec/libvirt-image.js';
import { decompressLibvirtStream, readLibvirtImage } from '../engine/libvirt-image-file.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import { libvirtSummary, type LibvirtSummary } from './libvirt-summary.js';
import { scanFile, sortProblems, type Problem } from './file-layout.js';
import { snapshotOpenerFor } from '../engine/open-snapshot.js';

export interface VerifyResult {
  file: string;
  'file-size': number;
  format?: 'mapped-ram' | 'stream';
  machine?: string;
  ok: boolean;
  errors: number;
  warnings: number;
  /** Errors first, then warnings, then informational notes (severity info), each group by offset. */
  problems: Problem[];
  checked: { blocks: number; 'ram-sections': number; devices: number; 'pages-present'?: number };
  /** A libvirt save image: its header fields (offsets of problems in a compressed one are within the decompressed stream). */
  libvirt?: LibvirtSummary;
}

export async function verify(path: string): Promise<VerifyResult> {
  // An object (s3://…) is scanned as the file it expands to; it is never a libvirt image.
  if (snapshotOpenerFor(path)) return verifyStream(path, path, undefined);
  let image: LibvirtImage | undefined;
  try {
    image = await readLibvirtImage(path);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    const size = (await stat(path)).size;
    const problems: Problem[] = [{ severity: 'error', code: e.code, offset: e.offset ?? 0, message: e.message }];
    return { file: path, 'file-size': size, ok: false, errors: 1, warnings: 0, problems, checked: { blocks: 0, 'ram-sections': 0, devices: 0 } };
  }
  if (!image || image.format === 'raw' || image.format === 'sparse') return verifyStream(path, path, image);
  // A compressed image: its stream is checked once decompressed (offsets are within that stream).
  let tmp;
  try {
    tmp = await decompressLibvirtStream(path, image);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    const size = (await stat(path)).size;
    const problems: Problem[] = [{ severity: 'error', code: e.code, offset: e.offset ?? 0, message: e.message }];
    return { file: path, 'file-size': size, ok: false, errors: 1, warnings: 0, problems, checked: { blocks: 0, 'ram-sections': 0, devices: 0 }, libvirt: libvirtSummary(image) };
  }
  try {
    const r = await verifyStream(path, tmp.file, image);
    r['file-size'] = (await stat(path)).size;
    return r;
  } finally {
    await tmp.remove();
  }
}

async function verifyStream(path: string, streamPath: string, image: LibvirtImage | undefined): Promise<VerifyResult> {
  const baseOffset = image && streamPath === path ? image.qemuOffset : 0;
  const layout = await scanFile(streamPath, { baseOffset });
  const problems = [...layout.problems];
  let pages: number | undefined;
  if (image && layout.format && (image.format === 'sparse') !== (layout.format === 'mapped-ram')) {
    problems.push({ severity: 'error', code: 'BAD_RECORD', offset: 28, message: `the libvirt header says ${image.format}, but the QEMU stream is ${layout.format}` });
  }
  if (!problems.some((p) => p.severity === 'error')) {
    try {
      const src = await openSnapshot(streamPath, { offset: baseOffset });
      try {
        pages = src.blockList.reduce((n, b) => n + src.presentPages(b.name), 0);
      } finally {
        await src.close();
      }
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      problems.push({ severity: 'error', code: e.code, offset: e.offset ?? 0, message: e.message });
    }
  }
  const sorted = sortProblems(problems);
  const errors = sorted.filter((p) => p.severity === 'error').length;
  const result: VerifyResult = {
    file: path,
    'file-size': layout.fileSize,
    ok: errors === 0,
    errors,
    warnings: sorted.filter((p) => p.severity === 'warning').length,
    problems: sorted,
    checked: { blocks: layout.blocks.length, 'ram-sections': layout.ramSections.length, devices: layout.devices.length },
  };
  if (layout.format) result.format = layout.format;
  if (layout.configuration) result.machine = layout.configuration.machine;
  if (pages !== undefined) result.checked['pages-present'] = pages;
  if (image) result.libvirt = libvirtSummary(image);
  return result;
}
