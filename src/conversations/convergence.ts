// Whether a live save is converging, from the source's own query-migrate. QEMU switches over only
// when what is still dirty fits its downtime limit at the bandwidth it measured; a guest that
// dirties memory faster than the link carries it (or a compressed migration, whose bandwidth QEMU
// measures in compressed bytes against the uncompressed bytes it still holds) makes it iterate for
// ever, with no error on either side. The watch notices that and says it once, with QEMU's numbers.

/** QEMU's upper bound for downtime-limit (migration/options.c MAX_MIGRATE_DOWNTIME: 2000 s). */
export const MAX_DOWNTIME_LIMIT_MS = 2_000_000;

/** The part of query-migrate the watch reads. */
export interface MigrateSample {
  status: string;
  'expected-downtime'?: number;
  ram?: { 'dirty-sync-count'?: number; remaining?: number; 'dirty-pages-rate'?: number; mbps?: number };
}

export interface NotConverging {
  /** Milliseconds since the source first reported `active`. */
  'active-ms': number;
  /** QEMU's dirty-sync-count: rounds over guest memory so far. */
  rounds: number;
  /** QEMU's expected-downtime (ms) against the limit it must fit. */
  'expected-downtime': number;
  'downtime-limit': number;
  'remaining-bytes'?: number;
  'dirty-pages-rate'?: number;
  mbps?: number;
}

export interface ConvergenceWatchOptions {
  /** The downtime limit QEMU works with (ms). */
  downtimeLimitMs: number;
  /** Rounds before a verdict: the first rounds send the whole guest and say nothing. Default 5. */
  minRounds?: number;
  /** Time in `active` before a verdict. Default 10 s. */
  minActiveMs?: number;
}

/**
 * Fed every query-migrate sample; returns the report once, the first time the source has been
 * active long enough, for enough rounds, and still expects more downtime than it may take.
 */
export class ConvergenceWatch {
  private activeSince: number | undefined;
  private reported = false;
  private readonly minRounds: number;
  private readonly minActiveMs: number;

  constructor(private readonly opts: ConvergenceWatchOptions) {
    this.minRounds = opts.minRounds ?? 5;
    this.minActiveMs = opts.minActiveMs ?? 10_000;
  }

  /** Milliseconds the source has been in `active` (precopy), 0 before. */
  activeMs(now: number): number {
    return this.activeSince === undefined ? 0 : now - this.activeSince;
  }

  sample(s: MigrateSample, now: number): NotConverging | undefined {
    if (s.status !== 'active') return undefined;
    this.activeSince ??= now;
    if (this.reported) return undefined;
    const rounds = s.ram?.['dirty-sync-count'] ?? 0;
    const expected = s['expected-downtime'];
    const activeMs = now - this.activeSince;
    if (rounds < this.minRounds || activeMs < this.minActiveMs || expected === undefined || expected <= this.opts.downtimeLimitMs) return undefined;
    this.reported = true;
    const r: NotConverging = { 'active-ms': activeMs, rounds, 'expected-downtime': expected, 'downtime-limit': this.opts.downtimeLimitMs };
    if (s.ram?.remaining !== undefined) r['remaining-bytes'] = s.ram.remaining;
    if (s.ram?.['dirty-pages-rate'] !== undefined) r['dirty-pages-rate'] = s.ram['dirty-pages-rate'];
    if (s.ram?.mbps !== undefined) r.mbps = s.ram.mbps;
    return r;
  }
}
