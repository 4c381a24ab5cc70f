// npm run fuzz: longer campaigns than the CI budget, with progress.
//
//   node dist/test/fuzz/run.js [--minutes M] [--target NAME[,NAME...]] [--seed N] [--jobs J]
//                              [--no-save] [--out DIR] [--list] [--replay]
//
// --minutes is the whole run's budget (default 5), split evenly over the chosen targets (default:
// all) and run on --jobs worker threads at once (default: the CPU count). Every distinct failure is
// minimised and written to test/fixtures/fuzz-regressions/<target>-<hash>.bin with a line in its
// index.txt (unless --no-save; --out DIR writes them elsewhere). --replay runs the saved regressions instead and reports each one.

import { availableParallelism } from 'node:os';
import { performance } from 'node:perf_hooks';
import type { CampaignStats } from './engine.js';
import { listRegressions, saveRegression } from './regressions.js';
import { knownOpenSignatures, runJob, type JobFailure } from './runner.js';
import { TARGETS } from './targets/index.js';

interface Args {
  minutes: number;
  targets: string[];
  seed: number;
  jobs: number;
  save: boolean;
  list: boolean;
  replay: boolean;
  out?: string;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { minutes: 5, targets: TARGETS.map((t) => t.name), seed: Math.floor(Math.random() * 2 ** 31), jobs: Math.max(1, availableParallelism()), save: true, list: false, replay: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    const v = (): string => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    };
    if (k === '--minutes') a.minutes = Number(v());
    else if (k === '--seconds') a.minutes = Number(v()) / 60;
    else if (k === '--target' || k === '--targets') a.targets = v().split(',');
    else if (k === '--seed') a.seed = Number(v());
    else if (k === '--jobs') a.jobs = Math.max(1, Number(v()));
    else if (k === '--no-save') a.save = false;
    else if (k === '--list') a.list = true;
    else if (k === '--replay') a.replay = true;
    else if (k === '--out') a.out = v();
    else throw new Error(`unknown argument ${k}`);
  }
  for (const t of a.targets) if (!TARGETS.some((x) => x.name === t)) throw new Error(`no target "${t}" (targets: ${TARGETS.map((x) => x.name).join(', ')})`);
  if (!(a.minutes > 0)) throw new Error('--minutes must be positive');
  return a;
}

const fmt = (s: CampaignStats): string => {
  const rate = s.ms > 0 ? (s.execs / s.ms) * 1000 : 0;
  return `${s.target.padEnd(17)} ${String(s.execs).padStart(8)} inputs ${rate.toFixed(0).padStart(6)}/s  corpus ${String(s.corpus).padStart(4)}  behaviours ${String(s.behaviours).padStart(4)}  ok ${s.kinds.ok} typed ${s.kinds.typed}  failures ${s.failures}  slowest ${s.slowestMs.toFixed(0)} ms  largest alloc ${(s.largestAlloc / 1048576).toFixed(1)} MiB`;
};

async function replay(args: Args): Promise<number> {
  let bad = 0;
  for (const name of args.targets) {
    const regs = listRegressions(name);
    if (regs.length === 0) continue;
    const r = await runJob({ mode: 'replay', target: name, seed: 0, inputs: regs.map((x) => ({ name: x.file, data: x.data })) }, 30000);
    for (const x of r.replayed) {
      const reg = regs.find((g) => g.file === x.name)!;
      const fine = x.kind === 'ok' || x.kind === 'typed';
      if (!fine && reg.status !== 'open') bad++;
      console.log(`${fine ? 'pass' : reg.status === 'open' ? 'OPEN' : 'FAIL'}  ${x.name}  ${x.kind}  ${x.detail.split('\n')[0]}`);
    }
    for (const f of r.failures) {
      bad++;
      console.log(`FAIL  ${name}  ${f.kind}  ${f.detail}`);
    }
  }
  return bad;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  if (args.list) {
    for (const t of TARGETS) console.log(`${t.name.padEnd(18)} ${t.what}`);
    return;
  }
  if (args.replay) {
    process.exitCode = (await replay(args)) > 0 ? 1 : 0;
    return;
  }
  const perTargetMs = (args.minutes * 60000 * args.jobs) / args.targets.length;
  console.log(`fuzz: ${args.targets.length} target(s), ${(perTargetMs / 1000).toFixed(0)} s each, ${args.jobs} job(s), seed ${args.seed}${args.save ? '' : ' (not saving failures)'}`);
  const queue = [...args.targets];
  const summary: CampaignStats[] = [];
  const found: { f: JobFailure; file?: string }[] = [];
  const seen = new Set<string>();
  const t0 = performance.now();

  const known = new Map<string, Map<string, string>>();
  const onFailure = (f: JobFailure, seed: number): void => {
    const key = `${f.target}:${f.signature}`;
    if (seen.has(key)) return;
    seen.add(key);
    const open = known.get(f.target)?.get(f.signature);
    if (open !== undefined) {
      console.log(`\n   ${f.target}: known open bug again (${open}): ${f.detail.slice(0, 200)}\n`);
      return;
    }
    let file: string | undefined;
    if (args.save) file = saveRegression(f, `seed ${seed}`, args.out).file;
    found.push(file === undefined ? { f } : { f, file });
    console.log(`\n!! ${f.target}: ${f.kind}: ${f.detail}\n   ${f.minimised.length} bytes (from ${f.input.length})${file ? ` → ${args.out ?? 'test/fixtures/fuzz-regressions'}/${file}` : ''}${f.stack ? `\n   ${f.stack.split('\n').slice(0, 4).join('\n   ')}` : ''}\n`);
  };

  const worker = async (): Promise<void> => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      known.set(name, await knownOpenSignatures(name, listRegressions(name)));
      const start = performance.now();
      let seed = args.seed;
      const total: CampaignStats[] = [];
      // A hang kills the worker: start again with the next seed for the rest of the time.
      for (let round = 0; performance.now() - start < perTargetMs - 1000; round++) {
        const left = perTargetMs - (performance.now() - start);
        const r = await runJob(
          { mode: 'campaign', target: name, seed: seed + round, durationMs: left, withRegressions: round === 0, minimiseMs: 30000, progressMs: 15000, knownSignatures: [...(known.get(name)?.keys() ?? [])] },
          Math.max(30000, 4 * 4000),
          { onProgress: (s) => console.log(`   ${fmt(s)}`), onFailure: (f) => onFailure(f, seed + round) },
        );
        if (r.stats) total.push(r.stats);
        if (!r.aborted) break;
        seed += 1000;
      }
      const merged = total.reduce<CampaignStats | undefined>((m, s) => {
        if (!m) return { ...s, kinds: { ...s.kinds } };
        m.execs += s.execs;
        m.ms += s.ms;
        for (const k of Object.keys(s.kinds) as (keyof CampaignStats['kinds'])[]) m.kinds[k] += s.kinds[k];
        m.failures += s.failures;
        m.slowestMs = Math.max(m.slowestMs, s.slowestMs);
        m.largestAlloc = Math.max(m.largestAlloc, s.largestAlloc);
        m.corpus = Math.max(m.corpus, s.corpus);
        m.behaviours = Math.max(m.behaviours, s.behaviours);
        return m;
      }, undefined);
      if (merged) {
        summary.push(merged);
        console.log(`done ${fmt(merged)}`);
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(args.jobs, args.targets.length) }, worker));

  console.log(`\nfuzz summary (${((performance.now() - t0) / 1000).toFixed(0)} s, seed ${args.seed}):`);
  for (const s of summary.sort((a, b) => a.target.localeCompare(b.target))) console.log(`  ${fmt(s)}`);
  if (found.length === 0) {
    console.log('no failures');
  } else {
    console.log(`${found.length} distinct failure(s):`);
    for (const { f, file } of found) console.log(`  ${f.target} ${f.kind}: ${f.detail.slice(0, 200)}${file ? `  [${file}]` : ''}`);
    process.exitCode = 1;
  }
}

main().catch((e: unknown) => {
  console.error(e instanceof Error ? e.message : e);
  process.exitCode = 2;
});
