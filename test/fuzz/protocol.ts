// Messages between the fuzz runner (parent) and its worker threads.

import type { CampaignStats, Failure } from './engine.js';

export interface WorkerJob {
  mode: 'campaign' | 'replay';
  target: string;
  seed: number;
  iterations?: number;
  durationMs?: number;
  minimiseMs?: number;
  progressMs?: number;
  /** Campaign: failure signatures of known open bugs (not minimised). */
  knownSignatures?: string[];
  /** Campaign: run the saved regressions of the target first. */
  withRegressions?: boolean;
  /** Replay: these inputs. */
  inputs?: { name: string; data: Uint8Array }[];
  shared: SharedArrayBuffer;
}

export type WorkerMessage =
  | { type: 'progress'; stats: CampaignStats }
  | { type: 'failure'; failure: Omit<Failure, 'input' | 'minimised'> & { input: Uint8Array; minimised: Uint8Array } }
  | { type: 'replayed'; name: string; kind: string; detail: string; signature: string; ms: number }
  | { type: 'done'; stats?: CampaignStats }
  | { type: 'fatal'; message: string };

/** Shared layout: Int32 [0] inputs started, [1] current input length, then the input's bytes. */
export const SHARED_HEADER = 16;

