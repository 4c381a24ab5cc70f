// Ctrl-C and SIGTERM for every command: the job is stopped through its own abort path (so it
// cleans up) rather than the process being killed, and the exit status then says which signal it
// was, as a shell reports a process the signal ended: 128 + its number (130 for Ctrl-C, 143 for
// SIGTERM), so scripts tell an interrupted job from a failed one (1).

import { constants } from 'node:os';

let received: NodeJS.Signals | undefined;

/** Calls `stop` on the first SIGINT or SIGTERM; the returned function stops listening. */
export function onInterrupt(stop: (signal: NodeJS.Signals) => void): () => void {
  const on = (sig: NodeJS.Signals): void => {
    received ??= sig;
    stop(sig);
  };
  process.once('SIGINT', on);
  process.once('SIGTERM', on);
  return () => {
    process.off('SIGINT', on);
    process.off('SIGTERM', on);
  };
}

/** The exit status of a command that failed: 128 + the signal's number once one arrived, else 1. */
export function failureStatus(): number {
  return received ? 128 + constants.signals[received] : 1;
}
