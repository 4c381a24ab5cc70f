// verify: the full structural check of a migration file. The layout scan collects problems with
// their file offsets (several where the format allows going on); when it finds none, the file is
// also opened with the snapshot reader send/restore use, so "ok" means our own tools accept it.

import { ProtocolError } from '../codec/errors.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import { scanFile, sortProblems, type Problem } from './file-layout.js';

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
}

export async function verify(path: string): Promise<VerifyResult> {
  const layout = await scanFile(path);
  const problems = [...layout.problems];
  let pages: number | undefined;
  if (!problems.some((p) => p.severity === 'error')) {
    try {
      const src = await openSnapshot(path);
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
  return result;
}
