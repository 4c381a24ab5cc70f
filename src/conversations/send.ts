// send: stream a snapshot into a QEMU waiting with -incoming, over a main channel and N multifd
// channels (PROTOCOL.md §7b).
//
// Sequence: validate the whole file first (nothing is sent for a corrupt one) → connect main and
// write its prologue at once (QEMU peeks each connection's first bytes and blocks until they come)
// → connect the channels, init + setup SYNC each → every present page, once, in packets of ≤ 128
// pages of one block → final sync (SYNC per channel, FLUSH on main) → SWITCHOVER_START, END →
// device state forwarded byte for byte → EOF, VMDESCRIPTION.
//
// The destination's answer comes on the return path: we PING at stage boundaries (configuration
// loaded, RAM set up) so a refusal says where it happened, and the final SHUT tells how loading
// ended (QEMU sends SHUT(1) when its stream failed to load). The device state itself is forwarded
// untouched: a PING inside it would end up in a snapshot written by a receiver. A snapshot holds every page once, so a single round suffices: the
// only syncs are the setup one and the final one.

import { EventEmitter } from 'node:events';
import type { Socket } from 'node:net';
import { Command, MULTIFD_PAGES_PER_PACKET, RamFlag, ReturnPathMessage, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeConfiguration, withCapability } from '../codec/configuration.js';
import { ProtocolError } from '../codec/errors.js';
import { defaultSyncMode } from '../codec/machine-type.js';
import { ReturnPathParser } from '../codec/return-path.js';
import {
  encodeBlockEntry,
  encodeCommand,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeMultifdFlush,
  encodePageRecordHeader,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
} from '../codec/stream-encode.js';
import { publish } from '../engine/diagnostics.js';
import { getMethod } from '../engine/methods/registry.js';
import { MultifdSender, type PageBatch, type SendChannelStats } from '../engine/multifd-sender.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import type { TlsCreds } from '../transports/tls.js';
import { connectTo, gatherWrite } from '../transports/connect.js';

export interface SendOptions {
  /** Snapshot path, or an already opened (validated) snapshot. */
  file: string | SnapshotSource;
  /** Destination: tcp:HOST:PORT or unix:PATH (QEMU's migrate-incoming URI). */
  to: string;
  /** multifd channels; must equal the destination's multifd-channels. 0 = destination has multifd off. Default 2. */
  channels?: number;
  /** multifd-compression: none (default), zlib or zstd; must equal the destination's. */
  compression?: string;
  /** Compression level (zlib 1–9, zstd 1–22); the method's default (1, as QEMU's) when unset. */
  level?: number;
  /** The destination's -uuid; multifd init messages must carry it. */
  uuid?: Buffer;
  /** round: MULTIFD_FLUSH per sync; section: sync at every RAM EOS. auto: from the machine type. */
  syncMode?: 'auto' | 'round' | 'section';
  /** Open the return path (default true): the only way to learn without QMP whether loading succeeded. */
  returnPath?: boolean;
  /** TLS on every channel, with client credentials as for QEMU's tls-creds-x509 (the destination's tls-creds). */
  tls?: TlsCreds;
  /** Pages found all-zero are listed, not sent ('multifd', default) or sent as data ('none'). */
  zeroPageDetection?: 'multifd' | 'none';
  connectTimeoutMs?: number;
  /** Fails when no byte could be written and no answer came for this long. Default 60 s. */
  stallTimeoutMs?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface SendProgress {
  phase: 'validating' | 'connecting' | 'ram' | 'device-state' | 'waiting' | 'completed' | 'failed';
  elapsedMs: number;
  transferred: number;
  normal: number;
  duplicate: number;
  /** Pages the snapshot holds (present pages); normal + duplicate reaches it when RAM is done. */
  pagesTotal: number;
  channels: number;
}

export interface SendSummary {
  status: 'completed';
  file: string;
  format: 'mapped-ram' | 'stream';
  to: string;
  machine: string;
  'total-time': number;
  transferred: number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  mbps: number;
  'sync-mode': 'round' | 'section' | 'none';
  compression: string;
  'return-path': boolean;
  /** confirmed: the destination acknowledged the device state and shut down cleanly. */
  destination: 'confirmed' | 'closed';
  'device-state-bytes': number;
  blocks: { name: string; 'used-length': number; 'pages-sent': number }[];
  channels: SendChannelStats[];
}

/** The destination closed a connection we were writing to; `where` names it, `detail` the socket error. */
export class DestinationClosedError extends Error {
  constructor(readonly where: string, readonly detail: string, message: string) {
    super(message);
    this.name = 'DestinationClosedError';
  }
}

/** Nothing moved for stallTimeoutMs: the destination waits for something we do not send. */
export class StallError extends Error {
  override name = 'StallError';
}

export class SendHandle extends EventEmitter {
  readonly done: Promise<SendSummary>;
  private readonly controller = new AbortController();
  constructor(run: (h: SendHandle, signal: AbortSignal) => Promise<SendSummary>) {
    super();
    // Started on the next tick so callers can attach 'progress' listeners first.
    this.done = Promise.resolve().then(() => run(this, this.controller.signal));
    this.done.catch(() => {});
  }

  abort(reason = new Error('aborted')): void {
    this.controller.abort(reason);
  }
}

export function send(opts: SendOptions): SendHandle {
  return new SendHandle((h, signal) => new Sender(opts, h, signal).run());
}

/** PING values: each marks a stage the destination has loaded when it answers. */
const PING_CONFIG = 1;
const PING_RAM_SETUP = 2;
const STAGE_TEXT: Record<number, string> = {
  0: 'before it accepted the configuration record or the multifd channels (machine type, capabilities, channel count, uuid or compression differ?)',
  [PING_CONFIG]: 'after the configuration record, while setting up RAM or the multifd channels (RAM block sizes, channel count or uuid differ? same machine type and -m as the snapshot?)',
  [PING_RAM_SETUP]: 'after RAM setup, while loading pages or the device state (multifd-compression or devices differ? same compression, machine type and devices as the snapshot?)',
};

const DEVICE_CHUNK = 1024 * 1024;

class Sender {
  private readonly startedAt = Date.now();
  private phase: SendProgress['phase'] = 'validating';
  private source!: SnapshotSource;
  private main: Socket | undefined;
  private readonly sockets: Socket[] = [];
  private multifd: MultifdSender | undefined;
  private failure: Error | undefined;
  private readonly failed: Promise<never>;
  private rejectFailed!: (e: Error) => void;
  private mainBytes = 0;
  private mainPages = 0;
  private mainZero = 0;
  private pagesTotal = 0;
  private lastPong = 0;
  private shut: number | undefined;
  private readonly answered: Promise<void>;
  private resolveAnswered!: () => void;
  private lastActivity = Date.now();
  private readonly channels: number;

  constructor(private readonly opts: SendOptions, private readonly handle: SendHandle, private readonly signal: AbortSignal) {
    this.channels = opts.channels ?? 2;
    if (!Number.isInteger(this.channels) || this.channels < 0 || this.channels > 255) {
      throw new RangeError(`channels must be 0..255 (got ${opts.channels})`);
    }
    this.failed = new Promise<never>((_, reject) => { this.rejectFailed = reject; });
    this.failed.catch(() => {});
    this.answered = new Promise<void>((resolve) => { this.resolveAnswered = resolve; });
  }

  progress(): SendProgress {
    const st = this.multifd?.stats() ?? [];
    return {
      phase: this.phase,
      elapsedMs: Date.now() - this.startedAt,
      transferred: this.mainBytes + st.reduce((n, c) => n + c.bytes, 0),
      normal: this.mainPages + st.reduce((n, c) => n + c.normalPages, 0),
      duplicate: this.mainZero + st.reduce((n, c) => n + c.zeroPages, 0),
      pagesTotal: this.pagesTotal,
      channels: this.channels,
    };
  }

  async run(): Promise<SendSummary> {
    const external = this.opts.signal;
    const onAbort = (): void => this.fail(new Error('aborted'));
    const onHandleAbort = (): void => this.fail(this.signal.reason instanceof Error ? this.signal.reason : new Error('aborted'));
    external?.addEventListener('abort', onAbort, { once: true });
    this.signal.addEventListener('abort', onHandleAbort, { once: true });
    const timer = setInterval(() => this.handle.emit('progress', this.progress()), this.opts.progressIntervalMs ?? 250);
    timer.unref();
    const stall = this.opts.stallTimeoutMs ?? 60000;
    const watchdog = setInterval(() => {
      if (Date.now() - this.lastActivity > stall) {
        const pong = this.lastPong;
        this.fail(new StallError(`no progress for ${Math.round(stall / 1000)} s: the destination stopped reading ${STAGE_TEXT[pong] ?? ''}. A destination waiting for more multifd channels than we opened (--channels ${this.channels}), or one whose multifd sync mode differs (multifd-flush-after-each-section; --sync-mode), also stalls like this.`));
      }
    }, Math.min(1000, stall));
    watchdog.unref();
    const ownSource = typeof this.opts.file === 'string';
    try {
      if (external?.aborted) throw new Error('aborted');
      this.source = typeof this.opts.file === 'string' ? await openSnapshot(this.opts.file) : this.opts.file;
      return await Promise.race([this.transfer(), this.failed]);
    } catch (e) {
      this.fail(e as Error);
      throw this.failure ?? e;
    } finally {
      clearInterval(timer);
      clearInterval(watchdog);
      external?.removeEventListener('abort', onAbort);
      this.signal.removeEventListener('abort', onHandleAbort);
      this.multifd?.close();
      for (const s of this.sockets) s.destroy();
      if (ownSource && this.source) await this.source.close().catch(() => {});
      this.handle.emit('progress', this.progress());
    }
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.phase = 'failed';
    publish('send-failed', { error: err });
    this.multifd?.fail(err);
    for (const s of this.sockets) s.destroy();
    this.rejectFailed(err);
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  private async write(bufs: Buffer[]): Promise<void> {
    this.check();
    await gatherWrite(this.main!, bufs).catch(async (e: Error) => { throw await this.connectionLost('main channel', e); });
    this.mainBytes += bufs.reduce((n, b) => n + b.length, 0);
    this.lastActivity = Date.now();
  }

  /**
   * The error for a write that failed because the destination went away. Its PONGs may still sit
   * unread on the main socket, so the stage is judged once that socket ended (or shortly after).
   */
  private async connectionLost(where: string, e: Error): Promise<Error> {
    if (this.failure) return this.failure;
    await Promise.race([this.answered, new Promise((r) => setTimeout(r, 500).unref())]);
    if (this.failure) return this.failure;
    return new DestinationClosedError(where, e.message, `the destination closed the ${where} ${STAGE_TEXT[this.lastPong] ?? ''} (${e.message})`);
  }

  private async transfer(): Promise<SendSummary> {
    const src = this.source;
    const returnPath = this.opts.returnPath ?? true;
    const syncMode = this.channels === 0 ? 'none' : this.opts.syncMode && this.opts.syncMode !== 'auto' ? this.opts.syncMode : defaultSyncMode(src.configuration.machine);
    const method = getMethod(this.opts.compression ?? 'none');
    if (method.name !== 'none' && this.channels === 0) throw new Error(`compression ${method.name} needs multifd channels (--channels ≥ 1)`);
    if (this.opts.level !== undefined) {
      const max = method.name === 'zlib' ? 9 : method.name === 'zstd' ? 20 : 0;
      if (method.name === 'none') throw new Error('a compression level needs a compression method (zlib or zstd)');
      if (!Number.isInteger(this.opts.level) || this.opts.level < 0 || this.opts.level > max) throw new RangeError(`${method.name} level must be 0..${max}, as QEMU's multifd-${method.name}-level (got ${this.opts.level})`);
    }
    for (const b of src.blockList) this.pagesTotal += src.presentPages(b.name);
    publish('send-start', { file: src.path, format: src.format, pages: this.pagesTotal, syncMode });

    this.phase = 'connecting';
    const connectTimeout = this.opts.connectTimeoutMs ?? 10000;
    this.main = await connectTo(this.opts.to, connectTimeout, this.opts.tls);
    this.adopt(this.main);
    if (returnPath) this.listenReturnPath(this.main);
    // The prologue goes out at once: QEMU blocks its main loop peeking at a new connection's
    // first bytes, and it loads nothing before all channels exist.
    const config = withCapability(src.configuration, 'mapped-ram', false);
    const sid = src.ramSection.sectionId;
    await this.write([
      encodeStreamHeader(),
      encodeConfiguration(config),
      ...(returnPath ? [encodeCommand(Command.OPEN_RETURN_PATH), ping(PING_CONFIG)] : []),
      encodeSectionFull(SectionType.START, sid, 'ram', src.ramSection.instanceId, src.ramSection.versionId),
      encodeMemSize(src.blockList.reduce((n, b) => n + b.usedLength, 0)),
      ...src.blockList.map((b) => encodeBlockEntry(b.name, b.usedLength, b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {})),
      ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
      encodeEos(),
      encodeFooter(sid),
      ...(returnPath ? [ping(PING_RAM_SETUP)] : []),
    ]);

    if (this.channels > 0) {
      const socks: Socket[] = [];
      const sender = new MultifdSender({
        channels: Array.from({ length: this.channels }, (_, i) => ({
          write: (bufs: readonly Buffer[]) =>
            gatherWrite(socks[i]!, bufs).then(
              () => { this.lastActivity = Date.now(); },
              async (e: Error) => { throw await this.connectionLost(`multifd channel ${i}`, e); },
            ),
        })),
        method,
        loader: src,
        ...(this.opts.uuid ? { uuid: this.opts.uuid } : {}),
        ...(this.opts.zeroPageDetection ? { zeroPageDetection: this.opts.zeroPageDetection } : {}),
        ...(this.opts.level !== undefined ? { level: this.opts.level } : {}),
      });
      sender.on('error', (e: Error) => this.fail(e));
      this.multifd = sender;
      // Each channel writes its init and setup SYNC as soon as it is connected (see above).
      await Promise.all(
        Array.from({ length: this.channels }, async (_, i) => {
          const s = await connectTo(this.opts.to, connectTimeout, this.opts.tls);
          socks[i] = s;
          this.adopt(s);
          await sender.setupChannel(i);
        }),
      );
      publish('send-channels', { channels: this.channels });
    }

    this.phase = 'ram';
    const perBlock = await this.sendPages();

    // Final sync: every page written before the barrier the destination waits on.
    if (this.multifd) await this.multifd.sync();
    await this.write([
      ...(src.switchoverStart ? [encodeCommand(Command.SWITCHOVER_START)] : []),
      encodeSectionShort(SectionType.END, sid),
      ...(syncMode === 'round' ? [encodeMultifdFlush()] : []),
      encodeEos(),
      encodeFooter(sid),
    ]);

    this.phase = 'device-state';
    const ds = src.deviceState;
    await this.forward(ds.fileOffset, ds.end);

    this.phase = 'waiting';
    let destination: SendSummary['destination'] = 'closed';
    if (returnPath) {
      await this.answered;
      this.check();
      if (this.shut === undefined) {
        throw new Error(`the destination closed the connection without confirming the load ${STAGE_TEXT[this.lastPong]}`);
      }
      if (this.shut !== 0) {
        throw new Error(`the destination reported a failure (SHUT ${this.shut}) ${STAGE_TEXT[this.lastPong]}`);
      }
      destination = 'confirmed';
    }
    for (const s of this.sockets) s.end();
    this.phase = 'completed';
    const p = this.progress();
    const elapsed = Date.now() - this.startedAt;
    const summary: SendSummary = {
      status: 'completed',
      file: src.path,
      format: src.format,
      to: this.opts.to,
      machine: src.configuration.machine,
      'total-time': elapsed,
      transferred: p.transferred,
      normal: p.normal,
      'normal-bytes': p.normal * TARGET_PAGE_SIZE,
      duplicate: p.duplicate,
      mbps: elapsed > 0 ? Math.round(((p.transferred * 8) / (elapsed * 1000)) * 100) / 100 : 0,
      'sync-mode': syncMode,
      compression: this.channels > 0 ? method.name : 'none',
      'return-path': returnPath,
      destination,
      'device-state-bytes': ds.end,
      blocks: src.blockList.map((b) => ({ name: b.name, 'used-length': b.usedLength, 'pages-sent': perBlock.get(b.name) ?? 0 })),
      channels: this.multifd?.stats() ?? [],
    };
    publish('send-completed', { summary });
    return summary;
  }

  private adopt(s: Socket): void {
    this.sockets.push(s);
    // Write errors surface through gatherWrite; this keeps an EPIPE from crashing the process.
    s.on('error', () => {});
    s.on('close', () => {
      if (s === this.main) this.resolveAnswered();
    });
  }

  private listenReturnPath(s: Socket): void {
    const rp = new ReturnPathParser();
    s.on('data', (chunk: Buffer) => {
      this.lastActivity = Date.now();
      try {
        rp.push(chunk);
        for (let m = rp.next(); m !== null; m = rp.next()) {
          if (m.type === ReturnPathMessage.PONG) {
            this.lastPong = Math.max(this.lastPong, m.payload.readUInt32BE(0));
            publish('send-pong', { value: this.lastPong });
          } else if (m.type === ReturnPathMessage.SHUT) {
            this.shut = m.payload.readUInt32BE(0);
            this.resolveAnswered();
          }
          // SWITCHOVER_ACK and others need no answer from a sender that never waits on them.
        }
      } catch (e) {
        this.fail(new ProtocolError('BAD_RECORD', `return path: ${(e as Error).message}`));
      }
    });
    s.on('end', () => this.resolveAnswered());
  }

  /** Every present page once: batches of ≤ 128 pages of one block, in block order. */
  private async sendPages(): Promise<Map<string, number>> {
    const src = this.source;
    const perBlock = new Map<string, number>();
    for (const b of src.blockList) {
      let next = 0;
      let sent = 0;
      for (;;) {
        const runs: number[] = [];
        let pages = 0;
        src.forEachRun(b.name, (first, count) => {
          const take = Math.min(count, MULTIFD_PAGES_PER_PACKET - pages);
          runs.push(first, take);
          pages += take;
          next = first + take;
          return pages < MULTIFD_PAGES_PER_PACKET;
        }, next);
        if (pages === 0) break;
        const batch: PageBatch = { block: b.name, runs, pages };
        if (this.multifd) await this.multifd.send(batch);
        else await this.sendOnMain(batch);
        sent += pages;
        this.check();
      }
      perBlock.set(b.name, sent);
    }
    return perBlock;
  }

  private mainScratch: Buffer | undefined;
  private lastNamedBlock: string | undefined;
  private readonly zeroPage = Buffer.alloc(TARGET_PAGE_SIZE);

  /** Without multifd, pages travel as PAGE records in a PART section of the main channel. */
  private async sendOnMain(batch: PageBatch): Promise<void> {
    const src = this.source;
    this.mainScratch ??= Buffer.allocUnsafe(src.scratchBytes(MULTIFD_PAGES_PER_PACKET));
    const views = await src.loadRuns(batch.block, batch.runs, batch.runs.length / 2, this.mainScratch);
    const out: Buffer[] = [encodeSectionShort(SectionType.PART, src.ramSection.sectionId)];
    // CONTINUE refers to the block of the previous record on the channel, across sections.
    let named = this.lastNamedBlock === batch.block;
    let v = 0;
    let vPos = 0;
    const zeroDetect = (this.opts.zeroPageDetection ?? 'multifd') === 'multifd';
    for (let r = 0; r < batch.runs.length; r += 2) {
      for (let p = batch.runs[r]!; p < batch.runs[r]! + batch.runs[r + 1]!; p++) {
        while (vPos >= views[v]!.length) { v++; vPos = 0; }
        const data = views[v]!.subarray(vPos, vPos + TARGET_PAGE_SIZE);
        vPos += TARGET_PAGE_SIZE;
        // A fresh destination's RAM is zero already: an all-zero page need not travel.
        if (zeroDetect && data.equals(this.zeroPage)) {
          this.mainZero++;
          continue;
        }
        out.push(encodePageRecordHeader(RamFlag.PAGE, p * TARGET_PAGE_SIZE, named ? undefined : batch.block), data);
        named = true;
        this.lastNamedBlock = batch.block;
        this.mainPages++;
      }
    }
    out.push(encodeEos(), encodeFooter(src.ramSection.sectionId));
    await this.write(out);
  }

  /** Copies [position, position + length) of the file to the main channel. */
  private async forward(position: number, length: number): Promise<void> {
    const buf = Buffer.allocUnsafe(Math.min(DEVICE_CHUNK, Math.max(1, length)));
    for (let done = 0; done < length; ) {
      const n = Math.min(buf.length, length - done);
      const chunk = await this.source.readAt(position + done, n, buf);
      await this.write([chunk]);
      done += n;
    }
  }
}

function ping(value: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  return encodeCommand(Command.PING, b);
}
