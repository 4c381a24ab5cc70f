// Parent side: runs a WorkerJob in a worker thread under a watchdog. A worker that starts no new
// input for `hangMs` is stuck in one (a synchronous loop cannot be interrupted from inside): it is
// terminated and the input it was running, read back from shared memory, is reported as a hang.
// A worker that dies (native crash, out of memory) is reported the same way, as a crash.

import { Worker } from 'node:worker_threads';
import type { CampaignStats, Failure } from './engine.js';
import { SHARED_HEADER, type WorkerJob, type WorkerMessage } from './protocol.js';

export type JobFailure = Failure;

export interface JobResult {
  stats?: CampaignStats;
  failures: JobFailure[];
  replayed: Extract<WorkerMessage, { type: 'replayed' }>[];
  /** Why the worker stopped early, if it did. */
  aborted?: 'hang' | 'died';
}

export interface JobHandlers {
  onProgress?(s: CampaignStats): void;
  onFailure?(f: JobFailure): void;
}

export const SHARED_BYTES = 8 << 20;
/** Old-generation heap of a fuzz worker; every legitimate target stays far below (inputs are Buffers, outside it). */
export const WORKER_HEAP_MB = 256;

export function runJob(job: Omit<WorkerJob, 'shared'>, hangMs: number, handlers: JobHandlers = {}): Promise<JobResult> {
  const shared = new SharedArrayBuffer(SHARED_HEADER + SHARED_BYTES);
  const ctl = new Int32Array(shared, 0, 4);
  // A bounded heap: a parser that builds objects in proportion to a header field (not the input)
  // runs the worker out of memory, which is reported as an unbounded allocation with the input.
  const worker = new Worker(new URL('./worker.js', import.meta.url), { workerData: { ...job, shared }, resourceLimits: { maxOldGenerationSizeMb: WORKER_HEAP_MB } });
  const result: JobResult = { failures: [], replayed: [] };
  const currentInput = (): Buffer => Buffer.from(new Uint8Array(shared, SHARED_HEADER, Atomics.load(ctl, 1)));

  return new Promise((resolve, reject) => {
    let settled = false;
    /** Set when we end the worker ourselves: its exit is expected. */
    let ending = false;
    let last = Atomics.load(ctl, 0);
    let lastChange = Date.now();
    const finish = (): void => {
      if (settled) return;
      settled = true;
      clearInterval(watchdog);
      resolve(result);
    };
    const stuck = (kind: 'hang' | 'crash' | 'alloc', why: string): void => {
      const input = currentInput();
      const f: JobFailure = {
        target: job.target,
        kind,
        signature: `${kind}:${why}`,
        detail: why,
        input,
        minimised: input,
        ops: [],
        parent: '(watchdog)',
        hits: 1,
      };
      result.failures.push(f);
      handlers.onFailure?.(f);
    };
    const watchdog = setInterval(() => {
      const n = Atomics.load(ctl, 0);
      if (n !== last) {
        last = n;
        lastChange = Date.now();
        return;
      }
      if (n > 0 && Date.now() - lastChange > hangMs) {
        stuck('hang', `no progress for ${hangMs} ms on one input (synchronous loop?): worker terminated`);
        result.aborted = 'hang';
        ending = true;
        void worker.terminate().then(finish);
      }
    }, 250);
    worker.on('message', (m: WorkerMessage) => {
      switch (m.type) {
        case 'progress':
          handlers.onProgress?.(m.stats);
          break;
        case 'failure': {
          const f: JobFailure = { ...m.failure, input: Buffer.from(m.failure.input), minimised: Buffer.from(m.failure.minimised) };
          result.failures.push(f);
          handlers.onFailure?.(f);
          break;
        }
        case 'replayed':
          result.replayed.push(m);
          break;
        case 'done':
          if (m.stats) result.stats = m.stats;
          ending = true;
          void worker.terminate().then(finish);
          break;
        case 'fatal':
          if (!settled) {
            settled = true;
            ending = true;
            clearInterval(watchdog);
            void worker.terminate();
            reject(new Error(`fuzz worker for ${job.target} failed: ${m.message}`));
          }
          break;
      }
    });
    worker.on('error', (e: Error & { code?: string }) => {
      if (settled || ending) return;
      if (e.code === 'ERR_WORKER_OUT_OF_MEMORY') stuck('alloc', `the input ran the worker's ${WORKER_HEAP_MB} MB heap out of memory`);
      else stuck('crash', `worker died: ${e.message}`);
      result.aborted = 'died';
      finish();
    });
    worker.on('exit', (code) => {
      if (settled || ending) return;
      stuck('crash', `worker exited with code ${code} while running an input`);
      result.aborted = 'died';
      finish();
    });
  });
}

/**
 * Failure signatures of the target's saved regressions whose status is "open" (known bugs not
 * fixed yet): a campaign that runs into one of them again reports it as known, not as new.
 */
export async function knownOpenSignatures(target: string, regs: { file: string; data: Buffer; status: string }[]): Promise<Map<string, string>> {
  const open = regs.filter((r) => r.status.startsWith('open'));
  const known = new Map<string, string>();
  if (open.length === 0) return known;
  const r = await runJob({ mode: 'replay', target, seed: 0, inputs: open.map((x) => ({ name: x.file, data: x.data })) }, 30_000);
  for (const x of r.replayed) if (x.kind !== 'ok' && x.kind !== 'typed') known.set(x.signature, x.name);
  return known;
}
