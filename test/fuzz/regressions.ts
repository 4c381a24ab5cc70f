// The regression folder: every input that ever broke a parser, minimised, as
// test/fixtures/fuzz-regressions/<target>-<hash>.bin, with one line per file in index.txt:
//
//   <file> <TAB> <status> <TAB> <kind> <TAB> <what happened, where>
//
// status "fixed": the input must now end in success or a typed error (test/unit/fuzz.test.ts
// replays it). status "open": a bug outside src/codec not fixed yet; replayed as a todo so it is
// visible without failing the suite. New finds are written as "new" until someone looks at them;
// the test treats "new" like "fixed".

import { appendFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FIXTURES_DIR } from '../helpers/fixtures.js';
import type { Failure } from './engine.js';
import { inputHash } from './rng.js';

export const REGRESSIONS_DIR = join(FIXTURES_DIR, 'fuzz-regressions');
const INDEX = join(REGRESSIONS_DIR, 'index.txt');

export interface Regression {
  file: string;
  target: string;
  data: Buffer;
  status: string;
  kind: string;
  note: string;
}

/** Target name of a fixture file name: everything before the last "-<hash>.bin". */
export function targetOfFile(file: string): string {
  return file.replace(/-[0-9a-f]{16}\.bin$/, '');
}

function readIndex(): Map<string, { status: string; kind: string; note: string }> {
  const m = new Map<string, { status: string; kind: string; note: string }>();
  if (!existsSync(INDEX)) return m;
  for (const line of readFileSync(INDEX, 'utf8').split('\n')) {
    if (!line.trim() || line.startsWith('#')) continue;
    const [file, status, kind, ...note] = line.split('\t');
    if (file) m.set(file, { status: status ?? 'new', kind: kind ?? '', note: note.join('\t') });
  }
  return m;
}

export function listRegressions(target?: string): Regression[] {
  if (!existsSync(REGRESSIONS_DIR)) return [];
  const index = readIndex();
  return readdirSync(REGRESSIONS_DIR)
    .filter((f) => f.endsWith('.bin'))
    .sort()
    .map((file) => {
      const i = index.get(file);
      return { file, target: targetOfFile(file), data: readFileSync(join(REGRESSIONS_DIR, file)), status: i?.status ?? 'new', kind: i?.kind ?? '', note: i?.note ?? '' };
    })
    .filter((r) => target === undefined || r.target === target);
}

const oneLine = (s: string): string => s.replace(/\s+/g, ' ').trim().slice(0, 400);

/** Writes a failure's minimised input (once per content) and its index line; returns the file name. */
export function saveRegression(f: Pick<Failure, 'target' | 'kind' | 'detail' | 'minimised' | 'input' | 'ops' | 'stack'>, found: string, dir: string = REGRESSIONS_DIR): { file: string; fresh: boolean } {
  mkdirSync(dir, { recursive: true });
  const file = `${f.target}-${inputHash(f.minimised)}.bin`;
  const path = join(dir, file);
  if (existsSync(path)) return { file, fresh: false };
  writeFileSync(path, f.minimised);
  const frame = f.stack?.split('\n').find((l) => /\/src\//.test(l))?.trim() ?? '';
  const line = [file, 'new', f.kind, oneLine(`${f.detail}${frame ? ` ${frame}` : ''} (${f.minimised.length} bytes, minimised from ${f.input.length}; ${found}; mutations ${f.ops.join(',') || 'none'})`)].join('\t');
  const index = join(dir, 'index.txt');
  if (!existsSync(index)) writeFileSync(index, '# file\tstatus\tkind\twhat happened (see regressions.ts)\n');
  appendFileSync(index, line + '\n');
  return { file, fresh: true };
}
