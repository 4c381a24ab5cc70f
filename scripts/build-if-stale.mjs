#!/usr/bin/env node
// Compiles the TypeScript (tsc -p tsconfig.json) only when dist/ is not current: `npm run demo`
// and `npm test` call it, and a full compile costs 10-15 s. dist/ is current when the list of
// inputs (every .ts file tsconfig includes, tsconfig.json, package.json, package-lock.json) with
// their sizes and modification times equals the list recorded by the last successful compile.
// Any edit, added, removed or renamed file therefore compiles again.
//
//   node scripts/build-if-stale.mjs            # compile if needed
//   node scripts/build-if-stale.mjs --always   # compile, then record the inputs
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const stampFile = join(root, 'dist', '.build-inputs.json');
const always = process.argv.includes('--always');

/** The folders tsconfig.json includes (its "include" globs are all "<dir>/**\/*.ts"). */
function inputDirs() {
  const tsconfig = JSON.parse(readFileSync(join(root, 'tsconfig.json'), 'utf8'));
  return (tsconfig.include ?? []).map((g) => g.split('/')[0]);
}

function walk(dir, out) {
  let entries;
  try {
    entries = readdirSync(dir, { withFileTypes: true });
  } catch {
    return;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (e.name.endsWith('.ts')) out.push(p);
  }
}

function inputs() {
  const files = [];
  for (const d of inputDirs()) walk(join(root, d), files);
  for (const f of ['tsconfig.json', 'package.json', 'package-lock.json']) if (existsSync(join(root, f))) files.push(join(root, f));
  return files
    .sort()
    .map((f) => {
      const s = statSync(f);
      return `${relative(root, f)} ${s.size} ${s.mtimeMs}`;
    })
    .join('\n');
}

const now = inputs();
let recorded = '';
try {
  recorded = readFileSync(stampFile, 'utf8');
} catch {
  // never compiled
}
if (!always && recorded === now && existsSync(join(root, 'dist', 'src', 'cli', 'main.js'))) process.exit(0);

const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
process.stderr.write('compiling TypeScript (tsc -p tsconfig.json)...\n');
const r = spawnSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json')], { stdio: 'inherit', cwd: root });
if (r.status !== 0) process.exit(r.status ?? 1);
// Inputs as they were when compiling began: a file edited during the compile compiles next time.
writeFileSync(stampFile, now);
