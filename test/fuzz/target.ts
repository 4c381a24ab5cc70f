// What a fuzz target is: a parser (or a chain of them) run to completion on one input. The run
// either returns (success: the input was accepted, or it ended in the middle of a structure and
// the parser is waiting for more), or throws. A typed error is one of the format's documented
// errors (ProtocolError, QmpProtocolError, ...); a Violation is a property the target checks that
// did not hold (a page written outside its block, a different result for a different chunking);
// anything else is a crash.

import type { Range, Mutator } from './mutators.js';
import type { Rng } from './rng.js';

export interface Seed {
  name: string;
  data: Buffer;
  /** Byte ranges where the structure is (headers, lengths, record flags): mutations aim there. */
  focus?: Range[];
}

export class Violation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Violation';
  }
}

export function check(cond: unknown, message: string | (() => string)): asserts cond {
  if (!cond) throw new Violation(typeof message === 'string' ? message : message());
}

export interface Target {
  name: string;
  /** One line: what the target runs and what it checks. */
  what: string;
  seeds(): Seed[];
  dictionary?(): Buffer[];
  /** Extra mutators (e.g. the JSON one) on top of the byte-level ones. */
  mutators?: readonly Mutator[];
  /**
   * Runs the parser on `input`. Returns a short behaviour signature (which events, which state it
   * ended in) that the engine uses to keep inputs that do something new. `rng` is seeded from the
   * input, for chunking decisions.
   */
  run(input: Buffer, rng: Rng): string | Promise<string>;
  /** Whether an exception is one of the documented error types of this parser. */
  typed(e: unknown): boolean;
  /** Normalised description of a typed error, for behaviour signatures. */
  errorSignature?(e: unknown): string;
  /** Longest input the mutators may produce. */
  maxInput: number;
  /** Time per input above which it counts as a hang. */
  budgetMs?: number;
  /**
   * Format-aware shrinking, tried before the generic byte-level passes (which cannot shrink what
   * is framed by a length at the end, like the VMDESCRIPTION). `fails` tells whether a candidate
   * still shows the same failure.
   */
  shrink?(input: Buffer, fails: (b: Buffer) => Promise<boolean>, deadline: number): Promise<Buffer>;
  /** Called once before the first run in a process (temp dirs, worker pools). */
  setup?(): Promise<void> | void;
  teardown?(): Promise<void> | void;
}

/** Digits and hex runs replaced, so messages that differ only in values compare equal. */
export function normaliseMessage(m: string): string {
  return m.replace(/0x[0-9a-f]+/gi, '#').replace(/\d+/g, '#').replace(/"[^"]*"/g, '"…"').slice(0, 160);
}

/** The words of a message that come from its template (lower-case words), not from the input. */
export function messageTemplate(m: string): string {
  return m
    .replace(/"[^"]*"/g, ' ')
    .split(/[\s(),:;]+/)
    .filter((w) => /^[a-z][a-z_-]*$/.test(w))
    .slice(0, 12)
    .join(' ');
}
