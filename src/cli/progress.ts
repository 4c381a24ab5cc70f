// Progress display: a live line on a TTY (cli-progress), nothing otherwise (logs go to --verbose).

import cliProgress from 'cli-progress';
import type { ReceiveProgress } from '../conversations/receive.js';
import type { RelayProgress } from '../conversations/relay.js';
import type { SendProgress } from '../conversations/send.js';
import type { ObjectReadReport, UploadProgress } from '../conversations/object-store.js';
import { bytes, rate } from './format.js';

export interface ProgressSample {
  phase: string;
  elapsedMs: number;
  transferred: number;
  /** Pages handled so far and expected in all (the bar). */
  pages: number;
  totalPages: number;
  /** Command-specific tail, e.g. "round 3 | channels 2/2". */
  detail: string;
  /** The bar counts bytes (an upload), not pages: no pages/s. */
  byBytes?: boolean;
}

export function receiveSample(p: Pick<ReceiveProgress, 'phase' | 'elapsedMs' | 'transferred' | 'normal' | 'duplicate' | 'rounds' | 'channelsConnected' | 'channels' | 'ramTotal' | 'upload'>): ProgressSample {
  if (p.upload) return uploadSample(p.upload);
  return {
    phase: p.phase,
    elapsedMs: p.elapsedMs,
    transferred: p.transferred,
    pages: p.normal + p.duplicate,
    totalPages: Math.ceil(p.ramTotal / 4096),
    detail: `round ${p.rounds} | channels ${p.channelsConnected}/${p.channels}`,
  };
}

/** The upload of a staged snapshot to the store (save/receive --out, relay --tee s3://…): bytes the store accepted. */
export function uploadSample(u: UploadProgress): ProgressSample {
  const unit = 4096;
  return {
    phase: 'uploading',
    elapsedMs: u.elapsedMs,
    transferred: u.stored,
    pages: Math.floor(u.stored / unit),
    totalPages: Math.ceil(u.total / unit),
    detail: `${bytes(u.stored)} of ${bytes(u.total)} in the store | part ${u.parts} begun, ${u.requests} requests, ${u.retries} retries`,
    byBytes: true,
  };
}

/** A progress line's tail for a reader of an s3:// snapshot (convert/extract from s3://…): what it fetched so far. */
export function storeReadDetail(r: Pick<ObjectReadReport, 'bytes-read' | 'object-size' | 'requests' | 'retries'> | undefined): string {
  return r ? ` | ${bytes(r['bytes-read'])} fetched from the store (a ${bytes(r['object-size'])} object), ${r.requests} requests, ${r.retries} retries` : '';
}

export function sendSample(p: SendProgress): ProgressSample {
  return {
    phase: p.phase,
    elapsedMs: p.elapsedMs,
    transferred: p.transferred,
    pages: p.normal + p.duplicate,
    totalPages: p.pagesTotal,
    detail: `${p.channels} channel(s)`,
  };
}

export function relaySample(p: Pick<RelayProgress, 'phase' | 'elapsedMs' | 'bytesIn' | 'bytesOut' | 'normal' | 'duplicate' | 'rounds' | 'channelsIn' | 'channelsOut' | 'ramTotal' | 'upload'>): ProgressSample {
  // --tee s3://…: once B confirmed, what is left is the tee's upload.
  if (p.upload) return uploadSample(p.upload);
  return {
    phase: p.phase,
    elapsedMs: p.elapsedMs,
    transferred: p.bytesIn,
    pages: p.normal + p.duplicate,
    totalPages: Math.ceil(p.ramTotal / 4096),
    detail: `round ${p.rounds} | ${p.channelsIn} → ${p.channelsOut} channels | ${bytes(p.bytesOut)} out`,
  };
}

/**
 * The rate a progress line shows: bytes over the last half second or more, so it follows the
 * transfer; when nothing moved in that window after data flowed (the device state, a final sync)
 * the average so far instead of 0 B/s. A sample whose clock or byte count goes back starts a new
 * transfer (the demo's second phase), which then gets its own rate.
 */
export class RateMeter {
  private last = { t: 0, bytes: 0 };
  private recent = 0;

  sample(elapsedMs: number, transferred: number): number {
    if (elapsedMs < this.last.t || transferred < this.last.bytes) this.reset();
    const dt = elapsedMs - this.last.t;
    if (dt >= 500) {
      this.recent = ((transferred - this.last.bytes) * 1000) / dt;
      this.last = { t: elapsedMs, bytes: transferred };
    }
    if (this.recent > 0) return this.recent;
    return elapsedMs > 0 ? (transferred * 1000) / elapsedMs : 0;
  }

  reset(): void {
    this.last = { t: 0, bytes: 0 };
    this.recent = 0;
  }
}

export class ProgressView {
  private bar: cliProgress.SingleBar | undefined;
  private readonly meter = new RateMeter();

  constructor(private readonly enabled: boolean, private readonly label: string) {}

  update(p: ProgressSample): void {
    if (!this.enabled) return;
    const total = Math.max(1, p.totalPages);
    const speed = this.meter.sample(p.elapsedMs, p.transferred);
    const payload = {
      phase: p.phase.padEnd(12),
      bytes: bytes(p.transferred).padStart(10),
      speed: rate(speed).padStart(12),
      pps: p.byBytes ? '' : `${Math.round((p.pages * 1000) / Math.max(1, p.elapsedMs))} pages/s`,
      detail: p.detail,
    };
    if (!this.bar) {
      this.bar = new cliProgress.SingleBar(
        {
          format: `${this.label} {phase} |{bar}| {bytes} {speed} {pps} | {detail}`,
          barsize: 20,
          hideCursor: true,
          stream: process.stderr,
          clearOnComplete: true,
        },
        cliProgress.Presets.shades_classic,
      );
      this.bar.start(total, 0, payload);
    }
    this.bar.setTotal(total);
    this.bar.update(Math.min(p.pages, total), payload);
  }

  /** A line for the user mid-run (a warning): the bar makes way and the next update draws it again. */
  say(line: string): void {
    this.bar?.stop();
    this.bar = undefined;
    process.stderr.write(line + '\n');
  }

  /** Ends the bar; the next update starts a new one with its own rate. */
  stop(): void {
    this.bar?.stop();
    this.bar = undefined;
    this.meter.reset();
  }
}
