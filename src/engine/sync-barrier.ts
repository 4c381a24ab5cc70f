// The receive-side sync barrier (PROTOCOL.md §3.7): each channel, having applied everything up to
// its SYNC packet, arrives and blocks; the main channel, at MULTIFD_FLUSH (or EOS in per-section
// mode), waits for all of them and then releases them together. Pages of round k+1 therefore
// never overtake pages of round k, whichever channel carries them.

interface Pending {
  resolve: () => void;
  reject: (e: Error) => void;
}

export class SyncBarrier {
  private readonly arrived = new Map<number, Pending>();
  private waiter: Pending | undefined;
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
    if (this.arrived.has(id)) return Promise.reject(new Error(`channel ${id} arrived twice at one sync`));
    return new Promise((resolve, reject) => {
      this.arrived.set(id, { resolve, reject });
      this.check();
    });
  }

  /** The main channel reached a sync point; resolves once every channel arrived (and released them). */
  wait(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.waiter) return Promise.reject(new Error('sync barrier already has a waiter'));
    return new Promise((resolve, reject) => {
      this.waiter = { resolve, reject };
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
    if (!this.waiter || this.arrived.size < this.parties) return;
    const released = [...this.arrived.values()];
    this.arrived.clear();
    this.rounds++;
    const w = this.waiter;
    this.waiter = undefined;
    for (const p of released) p.resolve();
    w.resolve();
  }
}
