// The receive-side sync barrier (docs/protocol.md §3.7): each channel, having applied everything up to
// its SYNC packet, arrives and blocks; the main channel, at MULTIFD_FLUSH (or EOS in per-section
// mode), waits for all of them and then releases them together. Pages of round k+1 therefore
// never overtake pages of round k, whichever channel carries them. A relay passes a hook that
// runs while every channel is held: it pushes the round out to the next hop before any channel
// may read pages of the next round.

interface Pending {
  resolve: () => void;
  reject: (e: Error) => void;
}

interface Waiter extends Pending {
  whileHeld?: (() => Promise<void>) | undefined;
}

export class SyncBarrier {
  private readonly arrived = new Map<number, Pending>();
  private waiter: Waiter | undefined;
  private failure: Error | undefined;
  private rounds = 0;

  constructor(private parties: number) {}

  get completedRounds(): number {
    return this.rounds;
  }

  get arrivedCount(): number {
    return this.arrived.size;
  }

  setParties(n: number): void {
    this.parties = n;
    this.check();
  }

  /** A channel reached its SYNC; resolves when the main channel releases the round. */
  arrive(id: number): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    // Plain Errors here and in wait(): misuse by the code driving the barrier, which no stream can
    // cause (a channel awaits its arrival before it reads on; the main channel waits once a round).
    if (this.arrived.has(id)) return Promise.reject(new Error(`channel ${id} arrived twice at one sync`));
    return new Promise((resolve, reject) => {
      this.arrived.set(id, { resolve, reject });
      this.check();
    });
  }

  /**
   * The main channel reached a sync point; resolves once every channel arrived and was released.
   * `whileHeld` runs after the last arrival and before the release; if it rejects, the barrier fails.
   */
  wait(whileHeld?: () => Promise<void>): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('sync barrier already has a waiter'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject, whileHeld };
      this.check();
    });
  }

  get waiting(): boolean {
    return this.waiter !== undefined;
  }

  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.waiter?.reject(err);
    this.waiter = undefined;
    for (const p of this.arrived.values()) p.reject(err);
    this.arrived.clear();
  }

  private check(): void {
    if (!this.waiter || this.arrived.size < this.parties || this.holding) return;
    const w = this.waiter;
    if (!w.whileHeld) {
      this.release(w);
      return;
    }
    this.holding = true;
    w.whileHeld().then(
      () => {
        this.holding = false;
        // A failure while held already rejected everyone.
        if (!this.failure) this.release(w);
      },
      (e: Error) => {
        this.holding = false;
        this.fail(e);
      },
    );
  }

  private holding = false;

  private release(w: Waiter): void {
    const released = [...this.arrived.values()];
    this.arrived.clear();
    this.rounds++;
    this.waiter = undefined;
    for (const p of released) p.resolve();
    w.resolve();
  }
}
