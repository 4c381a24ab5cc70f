// A source that stops sending mid-migration (paused, hung, its network gone without a reset) must
// not keep a conversation waiting forever: no new bytes for `ms` while active fails it.

export class IdleWatch {
  private last = -1;
  private since = Date.now();
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly ms: number,
    /** A counter that grows while the source sends (bytes received). */
    private readonly sample: () => number,
    /** Whether silence counts now (not while listening for the source, nor while we work). */
    private readonly active: () => boolean,
    private readonly onIdle: (seconds: number) => void,
  ) {}

  start(): void {
    if (this.ms <= 0 || this.timer) return;
    this.timer = setInterval(() => this.check(), Math.min(1000, this.ms));
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private check(): void {
    const now = Date.now();
    const n = this.sample();
    if (n !== this.last || !this.active()) {
      this.last = n;
      this.since = now;
      return;
    }
    if (now - this.since >= this.ms) {
      this.stop();
      this.onIdle(Math.round((now - this.since) / 1000));
    }
  }
}
