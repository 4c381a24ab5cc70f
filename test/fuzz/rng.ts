// Deterministic PRNG for the fuzzer: a campaign is reproducible from its seed, and a target's own
// randomness (how it chunks its pushes) is derived from the input's hash, so replaying a saved
// input alone reproduces the run.

import { createHash } from 'node:crypto';

export class Rng {
  private a: number;

  constructor(seed: number) {
    this.a = seed >>> 0;
  }

  /** mulberry32 */
  u32(): number {
    this.a = (this.a + 0x6d2b79f5) >>> 0;
    let t = this.a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  float(): number {
    return this.u32() / 4294967296;
  }

  /** Integer in [0, n); 0 when n <= 0. */
  int(n: number): number {
    if (n <= 1) return 0;
    return Math.floor(this.float() * n);
  }

  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  bool(p = 0.5): boolean {
    return this.float() < p;
  }

  pick<T>(arr: readonly T[]): T {
    if (arr.length === 0) throw new RangeError('pick from an empty list');
    return arr[this.int(arr.length)]!;
  }

  /** Picks by weight: entries [item, weight]. */
  weighted<T>(entries: readonly (readonly [T, number])[]): T {
    const total = entries.reduce((n, [, w]) => n + w, 0);
    let r = this.float() * total;
    for (const [item, w] of entries) {
      r -= w;
      if (r < 0) return item;
    }
    return entries[entries.length - 1]![0];
  }

  /** A length biased toward small values: 1..max, geometric-ish. */
  smallLength(max: number): number {
    if (max <= 1) return 1;
    const bits = Math.ceil(Math.log2(max + 1));
    const b = this.range(0, bits);
    return Math.max(1, Math.min(max, this.range(1 << Math.max(0, b - 1), (1 << b) - 1 || 1)));
  }

  fork(): Rng {
    return new Rng(this.u32());
  }
}

export function sha256hex(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** The short name an input is saved under. */
export function inputHash(b: Uint8Array): string {
  return sha256hex(b).slice(0, 16);
}

/** Seed of a target's own randomness for this input (chunk boundaries and the like). */
export function inputSeed(b: Uint8Array): number {
  return parseInt(sha256hex(b).slice(0, 8), 16) >>> 0;
}
