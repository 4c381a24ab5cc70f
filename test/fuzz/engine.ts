// The fuzz engine: runs one input through a target and classifies the outcome, shrinks failing
// inputs, and runs a campaign (seeds first, then stacked mutations of the corpus, keeping inputs
// that show a behaviour not seen before). Everything is deterministic given the campaign seed.

import { performance } from 'node:perf_hooks';
import { startAllocGuard, stopAllocGuard } from './alloc-guard.js';
import { MUTATORS, havoc, type MutationContext, type Range } from './mutators.js';
import { Rng, inputSeed } from './rng.js';
import { Violation, messageTemplate, normaliseMessage, type Seed, type Target } from './target.js';

export type Kind = 'ok' | 'typed' | 'crash' | 'hang' | 'alloc' | 'violation';
export const FAILURE_KINDS: readonly Kind[] = ['crash', 'hang', 'alloc', 'violation'];

export interface Outcome {
  kind: Kind;
  /** Behaviour signature (ok/typed) or failure signature (the rest). */
  signature: string;
  detail: string;
  stack?: string;
  ms: number;
  largestAlloc: number;
  largestAllocWhat: string;
}

export interface Limits {
  /** Time per input above which it is a hang. */
  budgetMs: number;
  /** Largest single allocation allowed: fixed part plus a multiple of the input length. */
  allocFixed: number;
  allocPerInputByte: number;
  /** Heap + ArrayBuffer growth over one input allowed (fixed part + per input byte). */
  memFixed: number;
  memPerInputByte: number;
}

export const DEFAULT_LIMITS: Limits = {
  budgetMs: 2000,
  allocFixed: 16 * 1024 * 1024,
  allocPerInputByte: 4,
  memFixed: 384 * 1024 * 1024,
  memPerInputByte: 32,
};

/** Function and file of the first stack frame in our code (no line: a stack overflow moves it). */
function srcFrame(stack: string | undefined): string {
  if (!stack) return '';
  for (const line of stack.split('\n').slice(1)) {
    const m = /at (?:(\S+) )?\(?(?:file:\/\/)?(.*?(?:\/src\/|\/test\/fuzz\/)[^:)]*)/.exec(line);
    if (m) return `${m[1] ?? ''}@${m[2]!.replace(/^.*?\/(dist\/)?(src|test)\//, '$2/')}`;
  }
  return '';
}

const errorText = (e: unknown): string => (e instanceof Error ? `${e.name}: ${e.message}` : `thrown ${typeof e}: ${String(e)}`);

/** Set by the worker: called with every input before it runs (the watchdog's view of progress). */
export const hooks: { beforeExecute?: (input: Buffer) => void } = {};

export async function execute(target: Target, input: Buffer, limits: Limits = DEFAULT_LIMITS): Promise<Outcome> {
  hooks.beforeExecute?.(input);
  const rng = new Rng(inputSeed(input));
  const budget = target.budgetMs ?? limits.budgetMs;
  const mem0 = process.memoryUsage();
  startAllocGuard();
  const t0 = performance.now();
  let kind: Kind;
  let signature: string;
  let detail = '';
  let stack: string | undefined;
  let timer: NodeJS.Timeout | undefined;
  try {
    const r = target.run(input, rng);
    if (typeof r === 'string') {
      signature = r;
    } else {
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new HangSignal(budget * 5)), budget * 5);
      });
      signature = await Promise.race([r, timeout]);
    }
    kind = 'ok';
  } catch (e) {
    if (e instanceof HangSignal) {
      kind = 'hang';
      detail = `did not finish within ${e.ms} ms (async)`;
      signature = 'hang:async';
    } else if (e instanceof Violation) {
      kind = 'violation';
      detail = e.message;
      stack = e.stack;
      signature = `violation:${messageTemplate(e.message)}`;
    } else if (target.typed(e)) {
      kind = 'typed';
      signature = `E:${target.errorSignature ? target.errorSignature(e) : normaliseMessage(errorText(e))}`;
      detail = errorText(e);
    } else {
      kind = 'crash';
      detail = errorText(e);
      stack = e instanceof Error ? e.stack : undefined;
      signature = `crash:${e instanceof Error ? e.name : typeof e}:${normaliseMessage(e instanceof Error ? e.message : String(e))}@${srcFrame(stack)}`;
    }
  } finally {
    if (timer) clearTimeout(timer);
  }
  const ms = performance.now() - t0;
  const alloc = stopAllocGuard();
  const mem1 = process.memoryUsage();
  const growth = mem1.heapUsed - mem0.heapUsed + (mem1.arrayBuffers - mem0.arrayBuffers);
  const out: Outcome = { kind, signature, detail, ms, largestAlloc: alloc.largest, largestAllocWhat: alloc.what };
  if (stack !== undefined) out.stack = stack;
  if (kind === 'ok' || kind === 'typed') {
    const cap = limits.allocFixed + limits.allocPerInputByte * input.length;
    const memCap = limits.memFixed + limits.memPerInputByte * input.length;
    if (alloc.largest > cap) {
      out.kind = 'alloc';
      out.detail = `allocation of ${alloc.largest} bytes (${alloc.what}) for a ${input.length}-byte input (cap ${cap}); outcome was ${kind}: ${detail || signature}`;
      out.signature = `alloc:${normaliseMessage(alloc.what)}`;
    } else if (growth > memCap) {
      out.kind = 'alloc';
      out.detail = `heap + ArrayBuffers grew by ${Math.round(growth / 1048576)} MiB for a ${input.length}-byte input (cap ${Math.round(memCap / 1048576)} MiB); outcome was ${kind}: ${detail || signature}`;
      out.signature = 'alloc:memory-growth';
    } else if (ms > budget) {
      out.kind = 'hang';
      out.detail = `took ${Math.round(ms)} ms (budget ${budget} ms); outcome was ${kind}: ${detail || signature}`;
      out.signature = 'hang:slow';
    }
  }
  return out;
}

class HangSignal extends Error {
  constructor(readonly ms: number) {
    super('hang');
  }
}

export const isFailure = (k: Kind): boolean => FAILURE_KINDS.includes(k);

/**
 * Shrinks `input` while the failure keeps its signature: prefix cuts, then chunk removal with
 * halving chunk sizes, within `timeMs`.
 */
export async function minimise(target: Target, input: Buffer, signature: string, timeMs: number, limits: Limits = DEFAULT_LIMITS): Promise<Buffer> {
  const deadline = performance.now() + timeMs;
  const same = async (b: Buffer): Promise<boolean> => (await execute(target, b, limits)).signature === signature;
  let cur = input;
  if (target.shrink) cur = await target.shrink(cur, same, deadline);
  // Prefixes: halve the distance to the shortest prefix known to fail.
  let lo = 0;
  let hi = cur.length;
  while (hi - lo > 1 && performance.now() < deadline) {
    const mid = Math.floor((lo + hi) / 2);
    if (await same(cur.subarray(0, mid))) hi = mid;
    else lo = mid;
  }
  if (hi < cur.length && (await same(cur.subarray(0, hi)))) cur = Buffer.from(cur.subarray(0, hi));
  for (let size = 1 << Math.floor(Math.log2(Math.max(1, cur.length / 2))); size >= 1; size >>= 1) {
    let i = 0;
    while (i < cur.length && performance.now() < deadline) {
      const cand = Buffer.concat([cur.subarray(0, i), cur.subarray(i + size)]);
      if (await same(cand)) cur = cand;
      else i += size;
    }
    if (performance.now() >= deadline) break;
  }
  return cur;
}

export interface Failure {
  target: string;
  kind: Kind;
  signature: string;
  detail: string;
  stack?: string;
  input: Buffer;
  minimised: Buffer;
  /** Mutations that produced the input, and from which corpus entry. */
  ops: string[];
  parent: string;
  /** How many inputs hit the same signature. */
  hits: number;
}

export interface CampaignStats {
  target: string;
  execs: number;
  ms: number;
  kinds: Record<Kind, number>;
  corpus: number;
  behaviours: number;
  failures: number;
  slowestMs: number;
  largestAlloc: number;
  ops: Record<string, number>;
}

export interface CampaignOptions {
  seed: number;
  iterations?: number;
  durationMs?: number;
  limits?: Limits;
  /** Inputs run (unmutated) before the seeds, e.g. the saved regressions of this target. */
  extraInputs?: { name: string; data: Buffer }[];
  corpusLimit?: number;
  minimiseMs?: number;
  /** Failure signatures of known open bugs: reported like the rest, but not minimised. */
  knownSignatures?: string[];
  progressMs?: number;
  onProgress?(s: CampaignStats): void;
  onFailure?(f: Failure): void | Promise<void>;
}

interface Entry extends Seed {
  /** Inputs derived from it that showed new behaviour: good parents get picked more. */
  score: number;
}

export async function campaign(target: Target, opts: CampaignOptions): Promise<{ stats: CampaignStats; failures: Failure[] }> {
  const limits = opts.limits ?? DEFAULT_LIMITS;
  const rng = new Rng(opts.seed);
  const seeds = target.seeds();
  const dictionary = target.dictionary?.() ?? [];
  const mutators = [...MUTATORS, ...(target.mutators ?? [])];
  const corpus: Entry[] = seeds.map((s) => ({ ...s, score: 1 }));
  const derived: Entry[] = [];
  const behaviours = new Set<string>();
  const familyCounts = new Map<string, number>();
  const failures = new Map<string, Failure>();
  const stats: CampaignStats = {
    target: target.name,
    execs: 0,
    ms: 0,
    kinds: { ok: 0, typed: 0, crash: 0, hang: 0, alloc: 0, violation: 0 },
    corpus: corpus.length,
    behaviours: 0,
    failures: 0,
    slowestMs: 0,
    largestAlloc: 0,
    ops: {},
  };
  const t0 = performance.now();
  let lastProgress = t0;
  const corpusLimit = opts.corpusLimit ?? 300;

  const runOne = async (data: Buffer, ops: string[], parent: string, focus?: Range[]): Promise<void> => {
    let o = await execute(target, data, limits);
    // A slow input is timed again before it counts as a hang: a busy machine (the other fuzz
    // job, a GC) can push a legitimate input over its budget once.
    if (o.signature === 'hang:slow') {
      const again = await execute(target, data, limits);
      if (again.kind !== 'hang') o = again;
    }
    stats.execs++;
    stats.kinds[o.kind]++;
    stats.slowestMs = Math.max(stats.slowestMs, o.ms);
    stats.largestAlloc = Math.max(stats.largestAlloc, o.largestAlloc);
    if (isFailure(o.kind)) {
      const prev = failures.get(o.signature);
      if (prev) {
        prev.hits++;
        return;
      }
      // A known open bug is not worth shrinking again.
      const known = opts.knownSignatures?.includes(o.signature) ?? false;
      const minimised = opts.minimiseMs === 0 || known ? data : await minimise(target, data, o.signature, opts.minimiseMs ?? 20000, limits);
      const f: Failure = { target: target.name, kind: o.kind, signature: o.signature, detail: o.detail, input: data, minimised, ops, parent, hits: 1 };
      if (o.stack !== undefined) f.stack = o.stack;
      failures.set(o.signature, f);
      stats.failures = failures.size;
      await opts.onFailure?.(f);
      return;
    }
    // Error messages carry input-dependent words now and then: a family (one error code) adds at
    // most 32 behaviours, so mutated names do not flood the corpus.
    const family = o.signature.startsWith('E:') ? o.signature.split(':', 2).join(':') : '';
    const familyFull = family !== '' && (familyCounts.get(family) ?? 0) >= 32;
    if (!behaviours.has(o.signature) && !familyFull) {
      behaviours.add(o.signature);
      if (family) familyCounts.set(family, (familyCounts.get(family) ?? 0) + 1);
      stats.behaviours = behaviours.size;
      if (ops.length > 0 && data.length > 0) {
        const e: Entry = { name: `${parent}+${ops.join(',')}`, data, score: 1 };
        if (focus) e.focus = focus;
        if (derived.length >= corpusLimit) derived.splice(rng.int(derived.length), 1);
        derived.push(e);
        const p = corpus.find((c) => c.name === parent) ?? derived.find((c) => c.name === parent);
        if (p) p.score++;
        stats.corpus = corpus.length + derived.length;
      }
    }
  };

  const done = (): boolean =>
    (opts.iterations !== undefined && stats.execs >= opts.iterations) ||
    (opts.durationMs !== undefined && performance.now() - t0 >= opts.durationMs);

  for (const x of opts.extraInputs ?? []) await runOne(x.data, [], x.name);
  for (const s of corpus) {
    await runOne(s.data, [], s.name, s.focus);
  }
  while (!done()) {
    const pool = derived.length > 0 && rng.bool(0.4) ? derived : corpus;
    const parent = pool === corpus ? rng.weighted(corpus.map((c) => [c, c.score] as const)) : rng.pick(derived);
    const others = rng.bool(0.7) ? corpus : derived.length > 0 ? derived : corpus;
    const ctx: MutationContext = { rng, corpus: others.map((c) => c.data), dictionary, maxLength: target.maxInput };
    if (parent.focus) ctx.focus = parent.focus;
    const { data, ops } = havoc(parent.data, ctx, mutators);
    for (const op of ops) stats.ops[op] = (stats.ops[op] ?? 0) + 1;
    await runOne(data, ops, parent.name, parent.focus);
    const now = performance.now();
    if (opts.onProgress && now - lastProgress >= (opts.progressMs ?? 5000)) {
      lastProgress = now;
      stats.ms = now - t0;
      opts.onProgress({ ...stats });
    }
  }
  stats.ms = performance.now() - t0;
  return { stats, failures: [...failures.values()] };
}

