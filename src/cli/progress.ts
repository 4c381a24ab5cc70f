// Progress display: a live line on a TTY (cli-progress), nothing otherwise (logs go to --verbose).

import cliProgress from 'cli-progress';
import type { ReceiveProgress } from '../conversations/receive.js';
import { bytes, rate } from './format.js';

export type ProgressSample = Pick<ReceiveProgress, 'phase' | 'elapsedMs' | 'transferred' | 'normal' | 'duplicate' | 'rounds' | 'channelsConnected' | 'channels' | 'ramTotal'>;

export class ProgressView {
  private bar: cliProgress.SingleBar | undefined;
  private last = { t: 0, bytes: 0 };
  private speed = 0;

  constructor(private readonly enabled: boolean, private readonly label: string) {}

  update(p: ProgressSample): void {
    if (!this.enabled) return;
    const pages = p.normal + p.duplicate;
    const totalPages = Math.max(1, Math.ceil(p.ramTotal / 4096));
    const dt = p.elapsedMs - this.last.t;
    if (dt >= 500) {
      this.speed = ((p.transferred - this.last.bytes) * 1000) / dt;
      this.last = { t: p.elapsedMs, bytes: p.transferred };
    }
    const payload = {
      phase: p.phase.padEnd(12),
      bytes: bytes(p.transferred).padStart(10),
      speed: rate(this.speed).padStart(12),
      pps: `${Math.round((pages * 1000) / Math.max(1, p.elapsedMs))} pages/s`,
      rounds: p.rounds,
      ch: `${p.channelsConnected}/${p.channels}`,
    };
    if (!this.bar) {
      this.bar = new cliProgress.SingleBar(
        {
          format: `${this.label} {phase} |{bar}| {bytes} {speed} {pps} | round {rounds} | channels {ch}`,
          barsize: 20,
          hideCursor: true,
          stream: process.stderr,
          clearOnComplete: true,
        },
        cliProgress.Presets.shades_classic,
      );
      this.bar.start(totalPages, 0, payload);
    }
    this.bar.setTotal(totalPages);
    this.bar.update(Math.min(pages, totalPages), payload);
  }

  stop(): void {
    this.bar?.stop();
    this.bar = undefined;
  }
}
