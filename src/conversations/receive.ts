// receive: accept a live migration from an unmodified QEMU (main channel + N multifd channels)
// and write it as a mapped-ram snapshot that QEMU restores (docs/protocol.md §7a, §7d).
//
// A composition: the inbound side (inbound-side.ts) listens, sorts connections, runs the multifd
// receiver and the preempt channel and reads the main channel through the stream session; this
// file is its sink. The file's head is written once the block list is known, pages go to it as
// they come, and the device state is kept byte for byte until a VMDESCRIPTION proves it complete
// and the stream stayed quiet; then the snapshot is committed and the source gets SHUT(0).

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { InvalidOptionError, ProtocolError } from '../codec/errors.js';
import { encodePong, encodeShut, encodeSwitchoverAck } from '../codec/return-path.js';
import { sendsSwitchoverAck } from '../codec/machine-type.js';
import type { SessionEvent } from '../codec/stream-session.js';
import { publish } from '../engine/diagnostics.js';
import type { MappedRamWriter } from '../engine/mapped-ram-writer.js';
import type { MultifdReceiver } from '../engine/multifd-receiver.js';
import { InboundSide, type InboundSink } from './inbound-side.js';
import type { StrayConnectionError } from './incoming.js';
import { ListeningHandle } from './handle.js';
import { settleable } from './listening-handle.js';
import type { ReceiveOptions, ReceiveProgress, ReceiveSummary } from './receive-types.js';
import { notesOf, SnapshotOutput } from './snapshot-output.js';

export type { ReceiveOptions, ReceiveProgress, ReceiveSummary } from './receive-types.js';

export interface ReceiveEvents {
  progress: [ReceiveProgress];
  /** A connection that is not a migration channel was closed; the migration goes on. */
  stray: [StrayConnectionError];
}

export class ReceiveHandle extends ListeningHandle<ReceiveSummary, ReceiveEvents> {}

/** Starts receiving; the handle reports progress and resolves `done` with a summary. */
export function receive(opts: ReceiveOptions): ReceiveHandle {
  return new ReceiveHandle((h, signal) => {
    const r = new Receiver(opts, h, signal);
    return { listening: r.listening, done: r.result.promise, abort: (e) => r.interrupt(e) };
  }, opts.signal);
}

class Receiver implements InboundSink {
  readonly listening: Promise<string>;
  readonly result = settleable<ReceiveSummary>();
  private readonly channels: number;
  private readonly startedAt = Date.now();
  private readonly inbound: InboundSide;
  private output: SnapshotOutput | undefined;

  constructor(private readonly opts: ReceiveOptions, private readonly handle: ListeningHandle<ReceiveSummary, ReceiveEvents>, signal: AbortSignal) {
    this.channels = opts.channels ?? 2;
    if (!Number.isInteger(this.channels) || this.channels < 0 || this.channels > 255) {
      throw new InvalidOptionError(`channels must be 0..255 (got ${opts.channels})`);
    }
    this.inbound = new InboundSide({
      ...opts,
      signal,
      channels: this.channels,
      compression: opts.compression ?? 'auto',
      completionQuietMs: opts.completionQuietMs ?? 20,
      idlePhases: ['setup', 'ram', 'device-state', 'postcopy'],
      conversation: 'receive',
    });
    this.listening = this.start();
  }

  private async start(): Promise<string> {
    try {
      this.output = await SnapshotOutput.create(this.opts.out, { channels: this.channels, ...(this.opts.directIo === undefined ? {} : { directIo: this.opts.directIo }), ...(this.opts.libvirtPrologue ? { libvirtPrologue: this.opts.libvirtPrologue } : {}) });
      const addr = await this.inbound.open(this);
      publish('receive', 'listening', { address: addr });
      return addr;
    } catch (e) {
      this.fail(e as Error);
      throw e;
    }
  }

  // ---- the sink: a snapshot ----------------------------------------------------------------

  get store(): MappedRamWriter {
    return this.output!.store;
  }

  get snapshot(): SnapshotOutput | undefined {
    return this.output;
  }

  progress(): ReceiveProgress {
    const a = this.inbound;
    const t = a.multifdTotals();
    return {
      phase: a.phase as ReceiveProgress['phase'],
      elapsedMs: Date.now() - this.startedAt,
      transferred: a.bytesIn(),
      normal: t.normal + a.mainPages,
      duplicate: t.zero + a.mainZero,
      rounds: a.rounds,
      channelsConnected: a.receiver?.channelStats().length ?? 0,
      channels: this.channels,
      mainBytes: a.mainBytes + a.preemptBytes,
      ramTotal: a.session.ramTotal,
      ...(this.output?.uploadProgress ? { upload: this.output.uploadProgress } : {}),
    };
  }

  tick(): void {
    this.handle.emit('progress', this.progress());
  }

  stray(e: StrayConnectionError): void {
    this.handle.emit('stray', e);
  }

  connected(kind: 'main' | 'preempt', peer: string): void {
    if (kind === 'main') publish('receive', 'main-channel', {});
    else publish('receive', 'preempt-channel', { peer });
  }

  async sync(receiver: MultifdReceiver): Promise<void> {
    this.inbound.phase = 'ram';
    await receiver.sync();
  }

  /** A file is the destination: it answers the source's PINGs (the package's too) at once. */
  event(ev: SessionEvent): Promise<void> | undefined {
    if (ev.type === 'ping') this.inbound.main!.write(encodePong(ev.value));
    if (ev.type === 'return-path' && this.opts.switchoverAck && sendsSwitchoverAck(this.inbound.session.configuration?.machine ?? '')) {
      this.inbound.main!.write(encodeSwitchoverAck());
    }
    if (ev.type === 'postcopy-switch') {
      publish('receive', 'postcopy', { sections: ev.sections.length, deviceBytes: ev.devices.length });
      for (const v of ev.pings) this.inbound.main!.write(encodePong(v));
    }
    // A precopy stream is committed once it stays quiet (InboundSide.runMain); a postcopy one ends here.
    if (ev.type === 'complete' && this.inbound.session.postcopy) return this.complete();
    return undefined;
  }

  async mainEnded(): Promise<void> {
    const session = this.inbound.session;
    if (session.complete) return this.complete();
    const why = session.rejection ? `: ${session.rejection.message}` : '; is the machine\'s suppress-vmdesc on?';
    const where = session.postcopy
      ? `in postcopy (RAM ${session.ramEnded ? 'complete, EOF missing' : 'pages still to come'}), at stream offset ${session.offset}`
      : session.deviceStateBytes > 0
      ? `in the device state (${session.deviceStateBytes} bytes received, no complete VMDESCRIPTION${why})`
      : `at stream offset ${session.offset}`;
    throw new ProtocolError('TRUNCATED', `closed before the migration completed, ${where} (source gone?)`);
  }

  // ---- the end -------------------------------------------------------------------------------

  private async complete(): Promise<void> {
    const a = this.inbound;
    const session = a.session;
    a.phase = 'committing';
    a.finished = true;
    if (a.receiver) await a.receiver.finish();
    const commitStart = Date.now();
    await this.output!.commit();
    const commitTime = Date.now() - commitStart;
    const main = a.main;
    if (session.returnPath && main && !main.destroyed) {
      await new Promise<void>((resolve) => main.write(encodeShut(0), () => resolve()));
    }
    a.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: ReceiveSummary = {
      status: 'completed',
      file: this.opts.out,
      machine: session.configuration?.machine ?? '',
      'total-time': elapsed,
      'commit-time': commitTime,
      'direct-io': this.output!.store.directIo,
      transferred: p.transferred,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round((p.transferred * 8) / (elapsed * 1000) * 100) / 100 : 0,
      'dirty-sync-count': a.rounds,
      'multifd-syncs': a.rounds,
      'sync-mode': a.receiver ? (session.syncMode ?? 'round') : 'none',
      compression: a.receiver?.compression ?? (this.opts.compression && this.opts.compression !== 'auto' ? this.opts.compression : 'none'),
      'return-path': session.returnPath,
      ...(session.background ? { 'background-snapshot': true } : {}),
      ...(a.xbzrlePages > 0 ? { 'xbzrle-pages': a.xbzrlePages } : {}),
      'main-bytes': p.mainBytes,
      'device-state-bytes': session.deviceStateBytes,
      ...(session.postcopy ? {
        postcopy: {
          'switched-at-ms': (a.switchedAt ?? this.startedAt) - this.startedAt,
          'main-pages': a.postcopyMainPages,
          'preempt-pages': a.preemptPages,
          'discard-ranges': a.discardRanges,
          'preempt-channel': a.preemptChannel !== undefined,
        },
      } : {}),
      'file-size': this.output!.store.streamEnd,
      blocks: session.blocks.map((b) => ({ name: b.name, 'used-length': b.usedLength, 'pages-present': this.output!.store.bitmap(b.name)?.count() ?? 0 })),
      channels: a.receiver?.channelStats() ?? [],
      ...(this.output!.uploadReport ? { store: this.output!.uploadReport } : {}),
      ...notesOf(this.output!),
    };
    await a.close();
    this.handle.emit('progress', this.progress());
    publish('receive', 'completed', { summary });
    this.result.resolve(summary);
  }

  /** The handle's abort: a failure, unless the snapshot is past its point of no return (see SnapshotOutput.interrupt). */
  interrupt(e: Error): void {
    if (this.output?.interrupt(e)) return;
    this.fail(e);
  }

  fail(e: Error): void {
    const a = this.inbound;
    if (a.failure || a.phase === 'completed') return;
    const err = a.failed(e);
    publish('receive', 'failed', { error: err });
    if (a.session.returnPath && a.main && !a.main.destroyed) a.main.write(encodeShut(1));
    void (async () => {
      await a.close();
      await a.discard();
      this.result.reject(err);
    })();
  }
}
