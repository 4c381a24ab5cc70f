// Runs async jobs one after another in call order. Compression streams carry state from one
// packet to the next, so a channel's packets must be encoded and decoded strictly in order even
// when callers do not wait for one before starting the next. After a failure every later job
// fails with the same error: the stream state is lost.

export class SerialQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private failure: Error | undefined;

  run<T>(job: () => Promise<T>): Promise<T> {
    const result = this.tail.then(() => {
      if (this.failure) throw this.failure;
      return job();
    });
    this.tail = result.catch((e: Error) => {
      this.failure ??= e;
    });
    return result;
  }
}
