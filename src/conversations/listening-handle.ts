// The handle of a conversation that listens for its source (receive, relay): 'progress' events,
// the bound address once listening, the summary once done, and abort().

import { EventEmitter } from 'node:events';

export interface ListeningRun<S> {
  listening: Promise<string>;
  done: Promise<S>;
  abort: (e: Error) => void;
}

export class ListeningHandle<S> extends EventEmitter {
  /** Resolves with the bound address (e.g. tcp:127.0.0.1:39123) once listening. */
  readonly listening: Promise<string>;
  /** Resolves with the summary when the conversation completed. */
  readonly done: Promise<S>;
  private readonly abortFn: (reason: Error) => void;

  constructor(start: (h: ListeningHandle<S>) => ListeningRun<S>) {
    super();
    const s = start(this);
    this.listening = s.listening;
    this.done = s.done;
    this.abortFn = s.abort;
    // Callers that only await `done` must not see an unhandled rejection from `listening`.
    this.listening.catch(() => {});
  }

  abort(reason = new Error('aborted')): void {
    this.abortFn(reason);
  }
}

/** A promise with its settle functions; unhandled rejections are the awaiting caller's business. */
export function settleable<T>(): { promise: Promise<T>; resolve: (v: T) => void; reject: (e: Error) => void } {
  let resolve!: (v: T) => void;
  let reject!: (e: Error) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}
