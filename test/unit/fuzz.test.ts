// The CI fuzz budget (issue #7): a fixed-seed campaign over every parser target, a few thousand
// inputs in all, two targets at a time in worker threads under a watchdog; then every saved
// regression in test/fixtures/fuzz-regressions is replayed. `npm run fuzz` runs the same targets
// for longer (test/fuzz/run.ts). A failure here writes the minimised input to a temp dir and names
// it; `npm run fuzz -- --target NAME --seed 1` reproduces the campaign.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { listRegressions, saveRegression } from '../fuzz/regressions.js';
import { knownOpenSignatures, runJob } from '../fuzz/runner.js';
import { TARGETS } from '../fuzz/targets/index.js';
import { ZSTD_SKIP } from '../helpers/zstd.js';

/** Inputs per target, sized so that the whole budget stays around 15 s on two cores. */
const BUDGET: Record<string, number> = {
  'main-stream': 700,
  configuration: 1500,
  'ram-records': 300,
  'multifd-init': 1000,
  'multifd-packet': 1500,
  'multifd-channel': 500,
  'multifd-receiver': 150,
  zlib: 120,
  zstd: 250,
  'mapped-ram-header': 1500,
  'mapped-ram-file': 150,
  'stream-file': 100,
  vmdesc: 150,
  'return-path': 1500,
  qmp: 1500,
  'postcopy-package': 300,
  'postcopy-records': 1500,
};
/** MULTIFD_FUZZ_SCALE=10 runs ten times the inputs (as for properties.test.ts). */
const SCALE = Math.max(0.01, Number(process.env.MULTIFD_FUZZ_SCALE ?? 1) || 1);
const SEED = Number(process.env.MULTIFD_FUZZ_SEED ?? 1);
const FAILURES_DIR = join(tmpdir(), 'multifd-fuzz-failures');

describe('fuzz: fixed-seed budget per target (success or typed error; no crash, hang, unbounded allocation or page write outside its block)', { concurrency: 2 }, () => {
  const started = performance.now();
  for (const t of TARGETS) {
    // Without zstd here every zstd input would fail alike ("not available"): nothing to learn.
    test(t.name, { timeout: 300_000, skip: t.name === 'zstd' ? ZSTD_SKIP : false }, async () => {
      const iterations = Math.max(20, Math.round((BUDGET[t.name] ?? 300) * SCALE));
      // Known open bugs (status "open" in the regression index) are reported, not failed on.
      const known = await knownOpenSignatures(t.name, listRegressions(t.name));
      const r = await runJob({ mode: 'campaign', target: t.name, seed: SEED, iterations, minimiseMs: 5000, progressMs: 60_000, knownSignatures: [...known.keys()] }, 20_000);
      for (const f of r.failures.filter((x) => known.has(x.signature))) console.log(`# fuzz ${t.name}: known open bug hit again (${known.get(f.signature)}): ${f.detail.slice(0, 200)}`);
      r.failures = r.failures.filter((x) => !known.has(x.signature));
      const s = r.stats;
      if (s) {
        const rate = s.ms > 0 ? Math.round((s.execs / s.ms) * 1000) : 0;
        console.log(`# fuzz ${t.name}: ${s.execs} inputs in ${(s.ms / 1000).toFixed(1)} s (${rate}/s), ok ${s.kinds.ok}, typed ${s.kinds.typed}, behaviours ${s.behaviours} (${((performance.now() - started) / 1000).toFixed(1)} s since start)`);
      }
      const lines = r.failures.map((f) => {
        const saved = saveRegression(f, `unit test seed ${SEED}`, FAILURES_DIR).file;
        return `${f.kind}: ${f.detail}\n  minimised input: ${join(FAILURES_DIR, saved)} (${f.minimised.length} bytes)${f.stack ? `\n  ${f.stack.split('\n').slice(1, 4).join('\n  ')}` : ''}`;
      });
      assert.deepEqual(lines, [], `${t.name}: ${lines.length} failure(s)`);
      assert.ok(s && s.execs >= iterations, 'campaign ran its inputs');
    });
  }
});

describe('fuzz regressions: every input that ever broke a parser', () => {
  const regs = listRegressions();
  test('the regression folder is listed', () => {
    for (const r of regs) assert.ok(TARGETS.some((t) => t.name === r.target), `${r.file}: no target "${r.target}"`);
  });
  const byTarget = new Map<string, typeof regs>();
  for (const r of regs) byTarget.set(r.target, [...(byTarget.get(r.target) ?? []), r]);
  for (const [target, list] of byTarget) {
    describe(target, { skip: target === 'zstd' ? ZSTD_SKIP : false }, () => {
      let replay: ReturnType<typeof runJob> | undefined;
      const results = (): ReturnType<typeof runJob> => (replay ??= runJob({ mode: 'replay', target, seed: 0, inputs: list.map((r) => ({ name: r.file, data: r.data })) }, 20_000));
      for (const r of list) {
        const open = r.status.startsWith('open');
        test(`${r.file} (${r.kind}, ${r.status})`, open ? { todo: `open bug: ${r.note}` } : {}, async () => {
          const res = await results();
          const hung = res.failures.find(() => true);
          assert.equal(hung, undefined, hung ? `${hung.kind}: ${hung.detail}` : '');
          const x = res.replayed.find((y) => y.name === r.file);
          assert.ok(x, 'replayed');
          assert.ok(x.kind === 'ok' || x.kind === 'typed', `${x.kind}: ${x.detail}`);
        });
      }
    });
  }
});
