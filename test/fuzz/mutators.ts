// Mutators over byte buffers. The formats fuzzed here are big-endian throughout (lengths, counts,
// sizes, offsets, RAM record flags), so besides bit flips and byte sets there are big-endian
// 16/32/64-bit "interesting" integers and small arithmetic on the integer already there, which is
// how a length or an offset turns into one that is just too large. Structure-level mutators cut,
// delete, duplicate and splice chunks (also across captures of the same target), and a JSON
// mutator edits the VMDESCRIPTION as a document and re-frames it with its new length.

import { Rng } from './rng.js';

export type Range = readonly [number, number];

export interface MutationContext {
  rng: Rng;
  /** Other inputs of the same target, for splicing. */
  corpus: readonly Buffer[];
  /** Tokens of the format (names, magics, record headers) to insert or overwrite with. */
  dictionary: readonly Buffer[];
  /** Byte ranges of the parent input where structure lives; mutations aim there most of the time. */
  focus?: readonly Range[];
  maxLength: number;
}

export interface Mutator {
  name: string;
  weight: number;
  apply(b: Buffer, ctx: MutationContext): Buffer;
}

const U8 = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x02, 0x04, 0x05, 0x06, 0x07, 0x08, 0x10, 0x20, 0x40, 0x7e, 0x0f];
const U16 = [0, 1, 0x7f, 0x80, 0xff, 0x100, 0x7fff, 0x8000, 0xffff, 0x1000, 0x0fff, 0x0200, 0x0101, 12, 16];
const U32 = [
  0, 1, 2, 3, 4, 16, 64, 127, 128, 129, 255, 256, 257, 1344, 4095, 4096, 4097, 0x7fff, 0x8000, 0xffff, 0x10000,
  0x80000, 0x80001, 0x100000, 0x100001, 0x1000000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff, 0x11223344,
  0x5145564d,
];
const U64: bigint[] = [
  0n, 1n, 0x1000n, 0xfffn, 0x1001n, 0x100000n, 0x1000000n, 0xffffffn, 0x1000004n, 0x1082000n, 0x7fffffffn,
  0x80000000n, 0xffffffffn, 0x100000000n, 2n ** 40n, 2n ** 52n, 2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n,
  2n ** 53n + 0x1000n, 2n ** 62n, 2n ** 63n - 1n, 2n ** 63n, 2n ** 64n - 1n, 2n ** 64n - 0x1000n,
  0xfffffffffffff000n, 0x7ffffffffffff000n,
];

function clampRanges(focus: readonly Range[] | undefined, len: number, width: number): Range[] {
  if (!focus) return [];
  const out: Range[] = [];
  for (const [a, b] of focus) {
    const lo = Math.max(0, a);
    const hi = Math.min(len - width, b - 1);
    if (hi >= lo) out.push([lo, hi + 1]);
  }
  return out;
}

/** An offset for a `width`-byte write: inside a focus range most of the time, anywhere otherwise. */
export function pickOffset(len: number, width: number, ctx: MutationContext): number {
  if (len < width) return -1;
  const ranges = clampRanges(ctx.focus, len, width);
  if (ranges.length > 0 && ctx.rng.bool(0.8)) {
    const total = ranges.reduce((n, [a, b]) => n + (b - a), 0);
    let r = ctx.rng.int(total);
    for (const [a, b] of ranges) {
      if (r < b - a) return a + r;
      r -= b - a;
    }
  }
  return ctx.rng.int(len - width + 1);
}

const copy = (b: Buffer): Buffer => Buffer.from(b);

function writeBE(b: Buffer, at: number, width: 2 | 4 | 8, v: bigint): void {
  const m = BigInt.asUintN(width * 8, v);
  if (width === 2) b.writeUInt16BE(Number(m), at);
  else if (width === 4) b.writeUInt32BE(Number(m), at);
  else b.writeBigUInt64BE(m, at);
}

function readBE(b: Buffer, at: number, width: 2 | 4 | 8): bigint {
  if (width === 2) return BigInt(b.readUInt16BE(at));
  if (width === 4) return BigInt(b.readUInt32BE(at));
  return b.readBigUInt64BE(at);
}

function interesting(rng: Rng, width: 2 | 4 | 8): bigint {
  if (width === 2) return BigInt(rng.pick(U16));
  if (width === 4) return BigInt(rng.pick(U32));
  const v = rng.pick(U64);
  // Page-flag mixes: RAM records put flags in the low 12 bits of an offset.
  return rng.bool(0.25) ? (v & ~0xfffn) | BigInt(rng.pick([0x002, 0x004, 0x008, 0x010, 0x020, 0x022, 0x028, 0x200, 0x040, 0x080])) : v;
}

export const MUTATORS: readonly Mutator[] = [
  {
    name: 'bitflip',
    weight: 10,
    apply(b, ctx) {
      const out = copy(b);
      const n = ctx.rng.smallLength(4);
      for (let i = 0; i < n; i++) {
        const at = pickOffset(out.length, 1, ctx);
        if (at < 0) break;
        out[at]! ^= 1 << ctx.rng.int(8);
      }
      return out;
    },
  },
  {
    name: 'byte-interesting',
    weight: 10,
    apply(b, ctx) {
      const out = copy(b);
      const at = pickOffset(out.length, 1, ctx);
      if (at >= 0) out[at] = ctx.rng.pick(U8);
      return out;
    },
  },
  {
    name: 'byte-random',
    weight: 6,
    apply(b, ctx) {
      const out = copy(b);
      const at = pickOffset(out.length, 1, ctx);
      if (at >= 0) out[at] = ctx.rng.int(256);
      return out;
    },
  },
  ...([2, 4, 8] as const).map((width): Mutator => ({
    name: `be${width * 8}-interesting`,
    weight: width === 2 ? 6 : 10,
    apply(b, ctx) {
      const out = copy(b);
      const at = pickOffset(out.length, width, ctx);
      if (at >= 0) writeBE(out, at, width, interesting(ctx.rng, width));
      return out;
    },
  })),
  ...([2, 4, 8] as const).map((width): Mutator => ({
    name: `be${width * 8}-arith`,
    weight: 8,
    apply(b, ctx) {
      const out = copy(b);
      const at = pickOffset(out.length, width, ctx);
      if (at < 0) return out;
      const v = readBE(out, at, width);
      const r = ctx.rng;
      const delta = r.weighted<bigint>([
        [BigInt(r.range(1, 35)), 6],
        [-BigInt(r.range(1, 35)), 6],
        [0x1000n, 2],
        [-0x1000n, 2],
        [v, 1], // doubles it
        [BigInt(r.range(1, 8)) << BigInt(8 * r.range(1, width - 1)), 2],
      ]);
      writeBE(out, at, width, v + delta);
      return out;
    },
  })),
  {
    name: 'truncate',
    weight: 4,
    apply(b, ctx) {
      if (b.length <= 1) return copy(b);
      // Often right inside a structure, otherwise anywhere.
      const at = ctx.rng.bool(0.5) ? pickOffset(b.length, 1, ctx) : ctx.rng.int(b.length);
      return copy(b.subarray(0, Math.max(0, at)));
    },
  },
  {
    name: 'delete-chunk',
    weight: 5,
    apply(b, ctx) {
      if (b.length < 2) return copy(b);
      const len = ctx.rng.smallLength(Math.min(b.length - 1, 8192));
      const at = Math.min(pickOffset(b.length, 1, ctx), b.length - len);
      return Buffer.concat([b.subarray(0, at), b.subarray(at + len)]);
    },
  },
  {
    name: 'duplicate-chunk',
    weight: 5,
    apply(b, ctx) {
      if (b.length === 0) return copy(b);
      const len = ctx.rng.smallLength(Math.min(b.length, 8192, Math.max(1, ctx.maxLength - b.length)));
      const from = ctx.rng.int(b.length - len + 1);
      const to = pickOffset(b.length + 1, 1, ctx);
      return Buffer.concat([b.subarray(0, to), b.subarray(from, from + len), b.subarray(to)]);
    },
  },
  {
    name: 'copy-chunk',
    weight: 3,
    apply(b, ctx) {
      const out = copy(b);
      if (b.length < 2) return out;
      const len = ctx.rng.smallLength(Math.min(b.length - 1, 4096));
      const from = ctx.rng.int(b.length - len + 1);
      const to = Math.min(pickOffset(b.length, 1, ctx), b.length - len);
      b.copy(out, to, from, from + len);
      return out;
    },
  },
  {
    name: 'insert-random',
    weight: 3,
    apply(b, ctx) {
      const n = ctx.rng.smallLength(32);
      const ins = Buffer.alloc(n);
      for (let i = 0; i < n; i++) ins[i] = ctx.rng.bool(0.5) ? ctx.rng.pick(U8) : ctx.rng.int(256);
      const at = pickOffset(b.length + 1, 1, ctx);
      return Buffer.concat([b.subarray(0, at), ins, b.subarray(at)]);
    },
  },
  {
    name: 'dictionary',
    weight: 5,
    apply(b, ctx) {
      if (ctx.dictionary.length === 0) return copy(b);
      const tok = ctx.rng.pick(ctx.dictionary);
      const at = pickOffset(b.length + 1, 1, ctx);
      if (ctx.rng.bool(0.5) && at + tok.length <= b.length) {
        const out = copy(b);
        tok.copy(out, at);
        return out;
      }
      return Buffer.concat([b.subarray(0, at), tok, b.subarray(at)]);
    },
  },
  {
    // A token or a short piece of the input repeated up to 64K times: what makes work that is
    // quadratic in some count show up as a hang (AFL's block repeat).
    name: 'repeat',
    weight: 2,
    apply(b, ctx) {
      const r = ctx.rng;
      let unit: Buffer;
      if (ctx.dictionary.length > 0 && r.bool(0.5)) unit = r.pick(ctx.dictionary);
      else {
        if (b.length === 0) return copy(b);
        const len = r.range(1, Math.min(16, b.length));
        const from = pickOffset(b.length, len, ctx);
        unit = b.subarray(from, from + len);
      }
      if (unit.length === 0) return copy(b);
      const room = Math.max(0, ctx.maxLength - b.length);
      const times = Math.min(1 << r.range(1, 16), Math.floor(room / unit.length));
      if (times < 1) return copy(b);
      const at = pickOffset(b.length + 1, 1, ctx);
      return Buffer.concat([b.subarray(0, at), Buffer.concat(Array<Buffer>(times).fill(unit)), b.subarray(at)]);
    },
  },
  {
    name: 'splice',
    weight: 4,
    apply(b, ctx) {
      if (ctx.corpus.length === 0) return copy(b);
      const other = ctx.rng.pick(ctx.corpus);
      const r = ctx.rng;
      if (r.bool(0.5)) {
        // Head of this input, tail of the other.
        const i = pickOffset(b.length + 1, 1, ctx);
        const j = Math.max(0, Math.min(other.length, r.bool(0.5) ? i + r.range(-64, 64) : r.int(other.length + 1)));
        return Buffer.concat([b.subarray(0, i), other.subarray(j)]);
      }
      // A chunk of the other input, inserted or overwriting.
      if (other.length === 0) return copy(b);
      const len = r.smallLength(Math.min(other.length, 16384));
      const from = r.int(other.length - len + 1);
      const at = pickOffset(b.length + 1, 1, ctx);
      if (r.bool(0.5) && at + len <= b.length) {
        const out = copy(b);
        other.copy(out, at, from, from + len);
        return out;
      }
      return Buffer.concat([b.subarray(0, at), other.subarray(from, from + len), b.subarray(at)]);
    },
  },
];

// ---- JSON (VMDESCRIPTION) --------------------------------------------------------------------

/** A value nested `depth` levels deep (parsers iterate, recursive encoders overflow). */
const deep = (depth: number): unknown => JSON.parse('['.repeat(depth) + ']'.repeat(depth));

const JSON_VALUES: unknown[] = [
  0, 1, -1, 2, 4, 8, 255, 256, 4096, 65536, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 53, 2 ** 53 + 2, 1e300, -1e300, 1.5,
  null, true, false, '', 'struct', 'capability', 'uint8', 'int32', 'uint64', 'int64 equal', 'bool', 'nullptr',
  'buffer', 'unused_buffer', 'int32 le', [], {}, [null], [1], { fields: [] }, { fields: 5 }, { subsections: 'x' },
  { name: 'x', type: 'struct', size: 0, struct: {} },
  deep(100), deep(20000),
];
/** A fresh copy of one of JSON_VALUES (edits must not change the shared ones). */
let valueTexts: string[] | undefined;
function pickValue(rng: Rng): unknown {
  valueTexts ??= JSON_VALUES.map((v) => stringifyDeep(v, false));
  return JSON.parse(rng.pick(valueTexts));
}

const JSON_KEYS = ['name', 'type', 'size', 'array_len', 'struct', 'fields', 'subsections', 'vmsd_name', 'version', 'index', 'instance_id', 'devices', 'page_size', 'configuration'];

type Json = unknown;
type PathStep = string | number;

/** Paths of the document's nodes, breadth-first up to `limit` (iterative: documents may nest deep). */
function collectPaths(root: Json, out: PathStep[][], limit: number): void {
  const queue: [Json, PathStep[]][] = [[root, []]];
  for (let i = 0; i < queue.length && out.length < limit; i++) {
    const [v, path] = queue[i]!;
    out.push(path);
    if (path.length > 64) continue;
    if (Array.isArray(v)) v.forEach((x, j) => queue.push([x, [...path, j]]));
    else if (v !== null && typeof v === 'object') for (const [k, x] of Object.entries(v)) queue.push([x, [...path, k]]);
  }
}

/** JSON.stringify without its recursion limit, with QEMU's ", " / ": " separators or compact. */
export function stringifyDeep(v: unknown, qemu: boolean): string {
  const [comma, colon] = qemu ? [', ', ': '] : [',', ':'];
  const out: string[] = [];
  const stack: { items: (readonly [string | undefined, unknown])[]; i: number; close: string }[] = [];
  const open = (x: unknown): void => {
    if (Array.isArray(x)) {
      out.push('[');
      stack.push({ items: x.map((e) => [undefined, e] as const), i: 0, close: ']' });
    } else if (x !== null && typeof x === 'object') {
      out.push('{');
      stack.push({ items: Object.entries(x).filter(([, e]) => e !== undefined), i: 0, close: '}' });
    } else out.push(JSON.stringify(x) ?? 'null');
  };
  open(v);
  while (stack.length > 0) {
    const f = stack[stack.length - 1]!;
    if (f.i === f.items.length) {
      out.push(f.close);
      stack.pop();
      continue;
    }
    if (f.i > 0) out.push(comma);
    const [k, x] = f.items[f.i++]!;
    if (k !== undefined) out.push(JSON.stringify(k) + colon);
    open(x);
  }
  return out.join('');
}

function parentOf(root: Json, path: readonly PathStep[]): Record<PathStep, unknown> | undefined {
  let o: unknown = root;
  for (const k of path.slice(0, -1)) {
    if (o === null || typeof o !== 'object') return undefined;
    o = (o as Record<PathStep, unknown>)[k];
  }
  return o !== null && typeof o === 'object' ? (o as Record<PathStep, unknown>) : undefined;
}

/** One structural edit of a JSON document; undefined when the text is not JSON (or nests too deep to edit). */
export function mutateJsonText(text: string, rng: Rng): string | undefined {
  try {
    return mutateJson(text, rng);
  } catch (e) {
    if (e instanceof RangeError) return undefined;
    throw e;
  }
}

function mutateJson(text: string, rng: Rng): string | undefined {
  let doc: Json;
  try {
    doc = JSON.parse(text);
  } catch {
    return undefined;
  }
  const edits = rng.smallLength(3);
  for (let e = 0; e < edits; e++) {
    const paths: PathStep[][] = [];
    collectPaths(doc, paths, 200000);
    const path = rng.pick(paths);
    if (path.length === 0) continue;
    const parent = parentOf(doc, path);
    if (!parent) continue;
    const key = path[path.length - 1]!;
    const cur = parent[key];
    const op = rng.int(7);
    if (op === 0 || op === 1) {
      parent[key] = pickValue(rng);
    } else if (op === 2 && typeof cur === 'number') {
      parent[key] = rng.pick([cur + 1, cur - 1, cur * 2, cur * 4096, -cur, cur + 2 ** 32, 0]);
    } else if (op === 3) {
      if (Array.isArray(parent)) parent.splice(key as number, 1);
      else delete parent[key];
    } else if (op === 4 && Array.isArray(parent)) {
      parent.splice(key as number, 0, cur);
    } else if (op === 5 && !Array.isArray(parent)) {
      parent[rng.pick(JSON_KEYS)] = rng.bool(0.5) ? cur : pickValue(rng);
    } else if (op === 6 && Array.isArray(parent) && parent.length > 1) {
      const j = rng.int(parent.length);
      const t = parent[j];
      parent[j] = cur;
      parent[key as number] = t;
    } else {
      parent[key] = pickValue(rng);
    }
  }
  // QEMU's separators most of the time, compact sometimes.
  return stringifyDeep(doc, rng.bool(0.7));
}

/**
 * Where a VMDESCRIPTION record ends the buffer: `06 len32 {...}` reaching exactly the end. Returns
 * the offset of the 0x06 byte.
 */
export function findVmdescRecord(b: Buffer): number | undefined {
  for (let p = b.lastIndexOf(0x06); p >= 0; p = p > 0 ? b.lastIndexOf(0x06, p - 1) : -1) {
    if (p + 5 <= b.length && b.readUInt32BE(p + 1) === b.length - p - 5 && b[p + 5] === 0x7b) return p;
    if (b.length - p > 64 * 1024 * 1024) break;
  }
  return undefined;
}

/** Edits the trailing VMDESCRIPTION's JSON and rewrites its length; other inputs are left alone. */
export const JSON_MUTATOR: Mutator = {
  name: 'vmdesc-json',
  weight: 8,
  apply(b, ctx) {
    const p = findVmdescRecord(b);
    if (p === undefined) return copy(b);
    const text = mutateJsonText(b.toString('utf8', p + 5), ctx.rng);
    if (text === undefined) return copy(b);
    const json = Buffer.from(text, 'utf8');
    const head = Buffer.alloc(5);
    head[0] = 0x06;
    head.writeUInt32BE(json.length, 1);
    return Buffer.concat([b.subarray(0, p), head, json]);
  },
};

/** One to several stacked mutations (AFL's havoc stage); returns the result and what was done. */
export function havoc(parent: Buffer, ctx: MutationContext, mutators: readonly Mutator[]): { data: Buffer; ops: string[] } {
  const n = ctx.rng.weighted<number>([[1, 8], [2, 5], [3, 3], [4, 2], [6, 1], [8, 1]]);
  const ops: string[] = [];
  const weights = mutators.map((m) => [m, m.weight] as const);
  let b = parent;
  for (let i = 0; i < n; i++) {
    const m = ctx.rng.weighted(weights);
    b = m.apply(b, ctx);
    ops.push(m.name);
    // Focus ranges describe the parent; after a length change they are only approximately right,
    // which is still better than nothing.
    if (b.length > ctx.maxLength) b = b.subarray(0, ctx.maxLength);
  }
  return { data: b, ops };
}

/** Chunk boundaries for an incremental parser: whole, bytewise, 1..16, 1..700, 1..64K, or around structure. */
export function chunkPlan(len: number, rng: Rng, focus?: readonly Range[], coarse = false): number[] {
  let style = rng.int(6);
  // Targets whose every piece costs a thread-pool round trip (zlib) mostly skip the tiny pieces.
  if (coarse && (style === 1 || style === 2) && rng.bool(0.8)) style = 3;
  const cuts: number[] = [];
  if (style === 0 || len === 0) return [len];
  if (style === 1 && len <= 65536) {
    for (let i = 1; i <= len; i++) cuts.push(i);
    return cuts;
  }
  const maxChunk = style === 2 ? 16 : style === 3 ? 700 : style === 4 ? 65536 : 0;
  if (maxChunk > 0) {
    for (let at = 0; at < len;) {
      at = Math.min(len, at + 1 + rng.int(maxChunk));
      cuts.push(at);
    }
    return cuts;
  }
  // Style 5: a few cuts, aimed at structure boundaries when we know them.
  const n = rng.range(1, 12);
  const points = new Set<number>();
  for (let i = 0; i < n; i++) {
    const r = focus && focus.length > 0 && rng.bool(0.7) ? rng.pick(focus) : undefined;
    points.add(r ? Math.min(len, Math.max(1, r[rng.int(2)] + rng.range(-2, 2))) : 1 + rng.int(len));
  }
  points.add(len);
  return [...points].sort((a, b) => a - b);
}

/** Splits `b` at the plan's cut points (increasing, last = b.length). */
export function* chunks(b: Buffer, plan: readonly number[]): Generator<Buffer> {
  let pos = 0;
  for (const end of plan) {
    if (end <= pos) continue;
    yield b.subarray(pos, end);
    pos = end;
  }
  if (pos < b.length) yield b.subarray(pos);
}
