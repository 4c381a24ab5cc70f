// Kept for imports of the old path: the handle of every conversation lives in handle.ts.
export { ListeningHandle, type ConversationRun as ListeningRun } from './handle.js';

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
