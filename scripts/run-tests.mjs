#!/usr/bin/env node
// Runs the compiled tests with node:test and ends with a summary of what ran and what did not:
// a line for the unit tests, a line per QEMU version, a line per skipped group with its reason,
// and the command that installs what is missing.
//
//   node scripts/run-tests.mjs                 # unit tests (two files at a time), then interop tests (one at a time)
//   node scripts/run-tests.mjs unit            # only test/unit
//   node scripts/run-tests.mjs test/unit/compression.test.ts dist/test/interop/save.test.js
//   node scripts/run-tests.mjs --concurrency 4 unit
//   node scripts/run-tests.mjs --test-name-pattern=zstd unit   # --test-* flags go to node
//
// Test files are listed here, one by one, from the sources (test/<group>/*.test.ts), not passed
// as folders: Node 20 expands a folder given to --test, Node 22 and later take it as a module
// path. Listing the sources also keeps a stale compiled test of a removed source from running.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const GROUPS = ['unit', 'interop'];

const args = process.argv.slice(2);
/** Files run at once; by default 2 for unit tests and 1 for interop tests. */
let concurrency;
const wanted = [];
/** node:test flags passed on as they are, e.g. --test-name-pattern=zstd */
const nodeFlags = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--concurrency') concurrency = args[++i];
  else if (args[i].startsWith('--concurrency=')) concurrency = args[i].slice('--concurrency='.length);
  else if (args[i].startsWith('--test-')) nodeFlags.push(args[i]);
  else wanted.push(args[i]);
}

function testSources(group) {
  const out = [];
  const walk = (dir) => {
    for (const e of existsSync(dir) ? readdirSync(dir, { withFileTypes: true }) : []) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.test.ts')) out.push(p);
    }
  };
  walk(join(root, 'test', group));
  return out.sort();
}

/** test/unit/x.test.ts, dist/test/unit/x.test.js or an absolute path -> the compiled file. */
function compiled(p) {
  const rel = relative(root, join(p.startsWith('/') ? '' : process.cwd(), p)).replace(/^dist\//, '');
  return join(root, 'dist', rel.replace(/\.ts$/, '.js'));
}

const files = [];
for (const w of wanted.length ? wanted : GROUPS) {
  if (GROUPS.includes(w)) files.push(...testSources(w).map(compiled));
  else files.push(compiled(w));
}
const missing = files.filter((f) => !existsSync(f));
if (missing.length) {
  process.stderr.write(`not compiled (run: node scripts/build-if-stale.mjs): ${missing.map((f) => relative(root, f)).join(', ')}\n`);
  process.exit(2);
}
if (!files.length) {
  process.stderr.write('no test files found\n');
  process.exit(2);
}

const work = mkdtempSync(join(tmpdir(), 'multifd-test-results-'));
const reporter = join(root, 'scripts', 'test-results-reporter.mjs');
// Unit test files are CPU-bound and independent: two at a time on the two cores they are written
// for. Interop files run one at a time: their guests, timeouts and stall budgets assume the
// machine is theirs. --concurrency N sets both.
const isInterop = (f) => f.includes(`${join('dist', 'test', 'interop')}/`);
const runs = [
  { files: files.filter((f) => !isInterop(f)), concurrency: concurrency ?? '2' },
  { files: files.filter(isInterop), concurrency: concurrency ?? '1' },
].filter((r) => r.files.length);
// ^C reaches the child through the terminal; the summary still follows.
process.on('SIGINT', () => {});
let code = 0;
const resultsFiles = [];
for (const [i, run] of runs.entries()) {
  const resultsFile = join(work, `results-${i}.jsonl`);
  resultsFiles.push(resultsFile);
  const child = spawn(
    process.execPath,
    [
      '--test',
      `--test-concurrency=${run.concurrency}`,
      '--test-reporter=spec',
      '--test-reporter-destination=stdout',
      `--test-reporter=${reporter}`,
      `--test-reporter-destination=${resultsFile}`,
      ...nodeFlags,
      ...run.files,
    ],
    { stdio: 'inherit', cwd: root },
  );
  const c = await new Promise((resolve) => child.on('exit', (c, sig) => resolve(c ?? (sig ? 1 : 0))));
  if (c !== 0 && code === 0) code = c;
}

const results = [];
for (const f of resultsFiles) {
  try {
    results.push(...readFileSync(f, 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l)));
  } catch {
    // no results: node --test failed before running anything; its own output says why
  }
}
rmSync(work, { recursive: true, force: true });
process.stdout.write(summary(results));
process.exit(code);

// ---------------------------------------------------------------------------------------------

function qemuPresent(version, fallback) {
  const bin = process.env[`MULTIFD_QEMU${version}`] || fallback;
  const r = spawnSync(bin, ['--version'], { encoding: 'utf8', timeout: 20_000 });
  const m = /QEMU emulator version (\d+)\.\S*/.exec(r.stdout ?? '');
  return { bin, text: r.status === 0 && m && m[1] === version ? m[0] : undefined };
}

function analyzePresent() {
  let script = process.env.MULTIFD_ANALYZE_MIGRATION;
  if (!script && existsSync('/tmp/qemu-src')) {
    const tree = readdirSync('/tmp/qemu-src').filter((d) => d.startsWith('qemu-') && existsSync(`/tmp/qemu-src/${d}/scripts/analyze-migration.py`)).sort().pop();
    if (tree) script = `/tmp/qemu-src/${tree}/scripts/analyze-migration.py`;
  }
  const python = spawnSync('python3', ['--version']).status === 0;
  return { script: script && existsSync(script) ? script : undefined, python };
}

function asRoot(cmd) {
  const isRoot = process.getuid?.() === 0;
  return isRoot ? `${cmd}   (as a user: sudo ${cmd})` : `sudo ${cmd}   (as root: ${cmd})`;
}

/**
 * One entry per top-level test or suite of a file, with the outcomes of the tests inside it. A
 * reporter sees a suite's children finish before the suite, so each file's results are gathered
 * until its next top-level result arrives.
 */
function topLevel(results) {
  const pending = new Map();
  const tops = [];
  for (const r of results) {
    const inner = pending.get(r.file) ?? [];
    if (r.nesting > 0) {
      inner.push(r);
      pending.set(r.file, inner);
      continue;
    }
    pending.delete(r.file);
    const leaves = r.type === 'suite' ? inner.filter((x) => x.type !== 'suite') : [r];
    tops.push({
      file: r.file,
      group: GROUPS.find((g) => r.file.includes(`/test/${g}/`)) ?? 'other',
      name: r.name,
      skip: r.skip,
      passed: leaves.filter((x) => x.ok && x.skip === undefined && x.todo === undefined).length,
      failed: leaves.filter((x) => !x.ok && x.todo === undefined).length,
      skippedInside: inner.filter((x) => x.skip !== undefined),
      skippedTests: r.type === 'suite' ? leaves.filter((x) => x.skip !== undefined).length : 0,
      ms: r.ms ?? 0,
    });
  }
  return tops;
}

function summary(results) {
  const tops = topLevel(results);
  const lines = ['', '── summary: what ran and what did not ──'];
  const count = (list) => {
    const passed = list.reduce((n, t) => n + t.passed, 0);
    const failed = list.reduce((n, t) => n + t.failed, 0);
    return `${passed} tests passed${failed ? `, ${failed} FAILED` : ''}`;
  };
  const unit = tops.filter((t) => t.group === 'unit');
  const unitFiles = new Set(unit.map((t) => t.file)).size;
  if (unit.length) lines.push(`unit: ${count(unit)} in ${unitFiles} file${unitFiles === 1 ? '' : 's'}`);

  const interop = tops.filter((t) => t.group === 'interop');
  const install = [];
  const qemus = [
    { version: '10', fallback: 'qemu-system-x86_64', script: 'bash scripts/install-qemu.sh' },
    { version: '11', fallback: 'qemu-system-x86_64-latest', script: 'bash scripts/install-qemu-latest.sh' },
  ];
  const mentions = (t, v) => new RegExp(`QEMU ${v}\\b`).test(t.name);
  if (interop.length) {
    for (const q of qemus) {
      const p = qemuPresent(q.version, q.fallback);
      const mine = interop.filter((t) => mentions(t, q.version));
      const ran = mine.filter((t) => t.skip === undefined);
      const skipped = mine.filter((t) => t.skip !== undefined);
      const state = p.text ? `${p.bin}: ${p.text}` : `${p.bin} not installed (or not QEMU ${q.version})`;
      let what = `${ran.length} group${ran.length === 1 ? '' : 's'} ran, ${count(ran)}`;
      if (skipped.length) what += `; ${skipped.length} groups SKIPPED`;
      lines.push(`QEMU ${q.version} (${state}): ${what}`);
      if (!p.text) install.push(asRoot(q.script));
    }
    const other = interop.filter((t) => !qemus.some((q) => mentions(t, q.version)));
    if (other.length) {
      const ran = other.filter((t) => t.skip === undefined);
      lines.push(`interop, other (both or no QEMU versions): ${ran.length} groups ran, ${count(ran)}; ${other.length - ran.length} SKIPPED`);
    }
    const analyze = analyzePresent();
    if (!analyze.script || !analyze.python) {
      lines.push(
        `analyze-migration.py cross-check: not run (${!analyze.script ? "QEMU's scripts/analyze-migration.py not found: set MULTIFD_ANALYZE_MIGRATION or fetch QEMU's source" : 'python3 missing'})`,
      );
      if (!analyze.script) install.push(asRoot('bash scripts/get-qemu-source.sh'));
      if (!analyze.python) install.push(asRoot('apt-get install -y python3'));
    }
  }
  for (const t of tops.filter((x) => x.skip !== undefined)) {
    lines.push(`skipped: ${relative(root, t.file)}: "${t.name}"${t.skip ? `: ${t.skip}` : ''}`);
  }
  // Tests skipped inside groups that ran, one line per reason.
  const inside = new Map();
  for (const t of tops.filter((x) => x.skip === undefined)) {
    for (const s of t.skippedInside) inside.set(s.skip || '(no reason given)', (inside.get(s.skip || '(no reason given)') ?? 0) + 1);
  }
  for (const [reason, n] of inside) lines.push(`skipped: ${n} test${n > 1 ? 's' : ''} inside groups that ran: ${reason}`);
  lines.push(...slowestFiles(tops));
  if (install.length) {
    lines.push('to run what was skipped, install what is missing (Debian 12 or newer), then run npm test again:');
    for (const c of install) lines.push(`  ${c}`);
  }
  return `${lines.join('\n')}\n`;
}

/**
 * Where the time went, file by file (slowest first): a CI log is often seen only from its tail,
 * and the suite must stay far below CI's time bound.
 */
function slowestFiles(tops, shown = 12) {
  const perFile = new Map();
  for (const t of tops) perFile.set(t.file, (perFile.get(t.file) ?? 0) + t.ms);
  const total = [...perFile.values()].reduce((a, b) => a + b, 0);
  const sorted = [...perFile].sort((a, b) => b[1] - a[1]);
  const s = (ms) => `${(ms / 1000).toFixed(1)} s`;
  const out = [`time in tests: ${s(total)} over ${perFile.size} files; slowest:`];
  for (const [file, ms] of sorted.slice(0, shown)) out.push(`  ${s(ms).padStart(8)}  ${relative(root, file)}`);
  return out;
}
