// The one handle every conversation (receive, relay, send, save, restore) returns: typed events,
// `done`, `listening` where the conversation listens, `abort(reason)` and the AbortSignal that
// abort (or the caller's own `signal` option) fires, with its reason kept.

import { EventEmitter } from 'node:events';
import { AbortedError, abortError } from '../codec/errors.js';

/** Event name → listener arguments, as @types/node's EventEmitter<T> takes them. */
export type EventMap<T> = { [K in keyof T]: any[] };

/** What a conversation's start function hands back to its handle. */
export interface ConversationRun<S> {
  done: Promise<S>;
  listening?: Promise<string>;
  /** Called once when the handle is aborted, with the error the conversation should fail with. */
  abort?: (e: Error) => void;
}

export class ConversationHandle<S, E extends EventMap<E> = Record<string, any[]>> extends EventEmitter<E> {
  /** Resolves with the summary when the conversation completed; rejects with a typed error. */
  readonly done: Promise<S>;
  /**
   * Fires when the conversation is aborted, by abort() or by the caller's signal; `signal.reason` is
   * the reason exactly as given. An aborted conversation's `done` rejects with that reason when it
   * is one of this library's errors, else with an AbortedError (code ABORTED) keeping it; except
   * an abort that came after the conversation's snapshot passed its point of no return (renamed
   * into place, CompleteMultipartUpload sent): then `done` tells the commit's outcome, and a
   * summary's `notes` say that the interrupt came too late.
   */
  readonly signal: AbortSignal;
  protected readonly run: ConversationRun<S>;
  private readonly controller = new AbortController();

  constructor(start: (h: ConversationHandle<S, E>, signal: AbortSignal) => ConversationRun<S>, external?: AbortSignal) {
    super();
    this.signal = this.controller.signal;
    this.run = start(this, this.signal);
    this.done = this.run.done;
    // Callers that only await `listening` must not see an unhandled rejection from `done`, nor the reverse.
    this.done.catch(() => {});
    this.run.listening?.catch(() => {});
    this.signal.addEventListener('abort', () => this.run.abort?.(abortError(this.signal.reason)), { once: true });
    if (external) {
      if (external.aborted) this.abort(external.reason);
      else {
        const follow = (): void => this.abort(external.reason);
        external.addEventListener('abort', follow, { once: true });
        void this.done.then(() => external.removeEventListener('abort', follow), () => external.removeEventListener('abort', follow));
      }
    }
  }

  /** Stops the conversation: connections closed, nothing complete-looking left behind. */
  abort(reason: unknown = new AbortedError(undefined)): void {
    if (!this.signal.aborted) this.controller.abort(reason);
  }
}

/** A conversation that listens for its peer (receive, relay, save). */
export class ListeningHandle<S, E extends EventMap<E> = Record<string, any[]>> extends ConversationHandle<S, E> {
  /** Resolves with the bound address (e.g. tcp:127.0.0.1:39123) once listening. */
  readonly listening: Promise<string>;

  constructor(start: (h: ListeningHandle<S, E>, signal: AbortSignal) => ConversationRun<S> & { listening: Promise<string> }, external?: AbortSignal) {
    super((h, signal) => start(h as ListeningHandle<S, E>, signal), external);
    this.listening = this.run.listening!;
  }
}
