// Worker thread that runs a campaign (or replays saved inputs) for one target. Before each input
// runs, it is copied into shared memory and a counter is bumped, so the parent's watchdog can
// tell a stuck worker from a busy one and still recover the input that hung it.

import { parentPort, workerData } from 'node:worker_threads';
import { campaign, execute, hooks } from './engine.js';
import { listRegressions } from './regressions.js';
import { targetByName } from './targets/index.js';
import { SHARED_HEADER, type WorkerJob, type WorkerMessage } from './protocol.js';

const job = workerData as WorkerJob;
const post = (m: WorkerMessage): void => parentPort!.postMessage(m);

async function main(): Promise<void> {
  const ctl = new Int32Array(job.shared, 0, 4);
  const bytes = new Uint8Array(job.shared, SHARED_HEADER);
  hooks.beforeExecute = (input) => {
    const n = Math.min(input.length, bytes.length);
    bytes.set(input.subarray(0, n));
    Atomics.store(ctl, 1, n);
    Atomics.add(ctl, 0, 1);
  };
  const target = targetByName(job.target);
  await target.setup?.();
  // 'done' is posted after teardown: the parent ends the worker as soon as it reads it.
  let done: WorkerMessage = { type: 'done' };
  try {
    if (job.mode === 'replay') {
      for (const x of job.inputs ?? []) {
        const o = await execute(target, Buffer.from(x.data));
        post({ type: 'replayed', name: x.name, kind: o.kind, detail: o.detail + (o.stack ? `\n${o.stack}` : ''), signature: o.signature, ms: o.ms });
      }
    } else {
      const extra = job.withRegressions ? listRegressions(target.name).map((r) => ({ name: r.file, data: r.data })) : [];
      const opts: Parameters<typeof campaign>[1] = {
        seed: job.seed,
        extraInputs: extra,
        minimiseMs: job.minimiseMs ?? 20000,
        progressMs: job.progressMs ?? 5000,
        onProgress: (stats) => post({ type: 'progress', stats }),
        onFailure: (f) => post({ type: 'failure', failure: { ...f, input: new Uint8Array(f.input), minimised: new Uint8Array(f.minimised) } }),
      };
      if (job.knownSignatures) opts.knownSignatures = job.knownSignatures;
      if (job.iterations !== undefined) opts.iterations = job.iterations;
      if (job.durationMs !== undefined) opts.durationMs = job.durationMs;
      const { stats } = await campaign(target, opts);
      done = { type: 'done', stats };
    }
  } finally {
    await target.teardown?.();
  }
  post(done);
}

main().catch((e: unknown) => post({ type: 'fatal', message: e instanceof Error ? (e.stack ?? e.message) : String(e) }));
