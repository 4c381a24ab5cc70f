// restore: one command that loads a snapshot into a QEMU started with `-incoming defer`. It
// validates the file, sets the destination up over QMP (capabilities and parameters matching the
// snapshot, migrate-incoming with exit-on-error off so QEMU's own error can be shown), streams
// the snapshot with `send`, waits for QEMU to report completed, and optionally runs `cont`.

import { tlsKind, type TlsCreds } from '../transports/tls.js';
import { AbortedError, abortError, DestinationClosedError, DestinationError, POSTCOPY_LOSS_TEXT, PostcopyDestinationLostError, StallError } from '../codec/errors.js';
import { unlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VALIDATED_CAPABILITIES } from '../codec/constants.js';
import { openSnapshot } from '../engine/open-snapshot.js';
import { objectReadReport, type ObjectReadReport } from './object-store.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import { parseQmpAddress, QmpClient, QmpConnectionError } from '../transports/qmp-client.js';
import { ConversationHandle } from './handle.js';
import { resolveDestinationPageSizes } from './destination-page-sizes.js';
import { send, type PostcopyOptions, type SendOptions, type SendProgress, type SendSummary } from './send.js';

export { DestinationError } from '../codec/errors.js';

export interface RestoreOptions {
  file: string;
  /** The destination's QMP socket: unix:PATH or tcp:HOST:PORT. */
  qmp: string;
  /** multifd channels; 0 restores without multifd. Default 2. */
  channels?: number;
  /** Where the destination listens for us. Default: a unix socket in the temp dir (tcp:127.0.0.1 for a tcp QMP). */
  incoming?: string;
  /**
   * Run `cont` once loaded, even if the snapshot's guest was paused. Unset: a libvirt image's
   * was_running decides (as `virsh restore` does); other files stay as QEMU leaves them.
   */
  resume?: boolean;
  uuid?: Buffer;
  /** multifd-compression to use (set on the destination too): none, zlib or zstd. */
  compression?: string;
  level?: number;
  syncMode?: SendOptions['syncMode'];
  zeroPageDetection?: SendOptions['zeroPageDetection'];
  progressIntervalMs?: number;
  /**
   * TLS: the folder must hold ca-cert.pem, server-cert.pem/-key.pem (QEMU's) and client-cert.pem/
   * -key.pem (ours). We add a tls-creds-x509 object to the destination pointing at it.
   */
  tls?: TlsCreds;
  /**
   * Instant restore: postcopy-ram (and postcopy-preempt with `preempt`) on the destination, the
   * device state right after the switch, so the guest runs almost at once while its pages follow
   * on demand. QEMU 10.0 cannot combine postcopy with multifd: there the pages go over the main
   * channel (channels 0), which the summary notes. If the destination dies in postcopy, the guest
   * it was running is lost (the snapshot is not touched).
   */
  postcopy?: boolean | PostcopyOptions;
  /** How long to wait for QEMU to report completed once everything is sent. Default 60 s. */
  completionTimeoutMs?: number;
  signal?: AbortSignal;
}

export interface RestoreProgress extends SendProgress {
  destinationStatus: string;
}

export interface RestoreSummary extends SendSummary {
  destinationQemu: {
    status: string;
    'run-state-after': string;
    resumed: boolean;
  };
  /**
   * ms from the start of restore until the destination's guest ran (its RESUME event, by the
   * event's timestamp when QMP is a unix socket, else when we received it), if it did.
   */
  'time-to-running'?: number;
  /** Restored from s3://…: what was read from the store. */
  store?: ObjectReadReport;
  /** ms from the start of restore until the destination reported completed (every page in place). */
  'time-to-complete': number;
  /** Adjustments restore made, e.g. multifd left off because the destination cannot combine it with postcopy. */
  notes?: string[];
}

export interface RestoreEvents {
  progress: [RestoreProgress];
  /** Postcopy: the destination loaded the devices and runs the guest next (ms since restore started). */
  'postcopy-running': [{ elapsedMs: number }];
}

export class RestoreHandle extends ConversationHandle<RestoreSummary, RestoreEvents> {}

/** Starts on the next tick (so 'progress' listeners can be attached first). */
export function restore(opts: RestoreOptions): RestoreHandle {
  return new RestoreHandle((h, signal) => ({ done: Promise.resolve().then(() => runRestore(opts, h, signal)) }), opts.signal);
}

async function runRestore(opts: RestoreOptions, handle: ConversationHandle<RestoreSummary, RestoreEvents>, signal: AbortSignal): Promise<RestoreSummary> {
  const t0 = Date.now();
  const checkAbort = (): void => {
    if (signal.aborted) throw abortError(signal.reason);
  };
  checkAbort();
  let channels = opts.channels ?? 2;
  const pc: PostcopyOptions | undefined = opts.postcopy === true ? {} : opts.postcopy ? opts.postcopy : undefined;
  const notes: string[] = [];
  // Validate before touching QEMU: a corrupt file must not leave the destination half set up.
  // Connecting to its QMP changes nothing there, so that goes on meanwhile (an object's open
  // takes a few hundred ms, most of it loading the AWS SDK).
  const connecting = QmpClient.connect(opts.qmp);
  connecting.catch(() => {});
  let source: SnapshotSource;
  try {
    source = await openSnapshot(opts.file);
  } catch (e) {
    void connecting.then((q) => q.close(), () => {});
    throw e;
  }
  const wantResume = opts.resume ?? source.libvirt?.wasRunning ?? false;
  let qmp: QmpClient | undefined;
  let socketPath: string | undefined;
  try {
    qmp = await connecting;
    // The guest starts with QEMU's RESUME event: the moment it runs on the destination. On this
    // host (a unix QMP socket) the event's own timestamp says when, whatever our event loop was
    // busy with when it arrived (under load we saw it 100+ ms late); elsewhere clocks may differ.
    let runningAt: number | undefined;
    const sameHost = parseQmpAddress(opts.qmp).kind === 'unix';
    qmp.on('event', (name, _data, ts) => {
      if (name !== 'RESUME' || runningAt !== undefined) return;
      const seen = Date.now() - t0;
      const stamped = sameHost && ts && ts.seconds > 0 ? ts.seconds * 1000 + ts.microseconds / 1000 - t0 : undefined;
      runningAt = stamped !== undefined && stamped >= 0 && stamped <= seen ? Math.round(stamped) : seen;
    });
    // Three queries in one round trip (QEMU answers them in order).
    const [run, mig, have] = await Promise.all([
      qmp.execute('query-status'),
      qmp.execute('query-migrate'),
      qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities'),
    ]);
    if (run.status !== 'inmigrate') {
      throw new DestinationError(`the destination is not waiting for an incoming migration (its state is "${run.status}"); start it with -incoming defer`, undefined);
    }
    if (mig.status && mig.status !== 'none') {
      throw new DestinationError(`the destination already has an incoming migration in state "${mig.status}" (migrate-incoming was issued before; start a fresh QEMU with -incoming defer)`, undefined);
    }
    // The first pages' reads start now, while QEMU is set up (not for postcopy: there the pages
    // the guest asks for first should not queue behind them).
    if (!pc) source.prefetch?.();
    const wantedCaps = (multifd: boolean): Record<string, boolean> => {
      const wanted: Record<string, boolean> = { multifd, 'mapped-ram': false, 'postcopy-ram': pc !== undefined, 'postcopy-preempt': pc?.preempt === true };
      // Validated capabilities must match the stream's configuration record exactly.
      for (const cap of VALIDATED_CAPABILITIES) if (cap !== 'mapped-ram') wanted[cap] = source.configuration.capabilities.includes(cap);
      return wanted;
    };
    for (const [name, state] of Object.entries(wantedCaps(channels > 0))) {
      if (state && !have.some((c) => c.capability === name)) throw new DestinationError(`the destination QEMU has no "${name}" migration capability`, undefined);
    }
    const setCaps = (wanted: Record<string, boolean>) => qmp!.execute('migrate-set-capabilities', {
      capabilities: Object.entries(wanted)
        .filter(([name, state]) => have.some((c) => c.capability === name && c.state !== state))
        .map(([capability, state]) => ({ capability, state })),
    });
    try {
      await setCaps(wantedCaps(channels > 0));
    } catch (e) {
      // QEMU 10.0: "Postcopy is not yet compatible with multifd". Its postcopy works without
      // multifd, with every page on the main channel.
      if (!pc || channels === 0 || !/multifd/i.test((e as Error).message)) throw e;
      notes.push(`the destination cannot combine postcopy with multifd (${(e as Error).message}): pages went over the main channel (channels 0)`);
      channels = 0;
      await setCaps(wantedCaps(false));
    }
    if (channels > 0) await qmp.execute('migrate-set-parameters', { 'multifd-channels': channels, 'multifd-compression': opts.compression ?? 'none' });
    if (opts.tls) {
      await qmp.execute('object-add', tlsKind(opts.tls) === 'psk'
        ? { 'qom-type': 'tls-creds-psk', id: 'multifd-restore-tls', dir: opts.tls.dir, endpoint: 'server' }
        : { 'qom-type': 'tls-creds-x509', id: 'multifd-restore-tls', dir: opts.tls.dir, endpoint: 'server', 'verify-peer': opts.tls.verifyPeer ?? true });
      await qmp.execute('migrate-set-parameters', { 'tls-creds': 'multifd-restore-tls' });
    }

    // Postcopy announces the destination's page size per block (hugetlbfs-backed RAM: 2 MiB).
    const postcopy: PostcopyOptions | undefined = pc ? { ...pc, pageSizes: await resolveDestinationPageSizes(qmp, source, pc.pageSizes, notes) } : undefined;

    // Instant restore with --resume: `cont` while QEMU is still in "inmigrate" only sets its
    // autostart flag, and QEMU then starts the guest itself when it handles RUN. Waiting for
    // PONG(0x42) to send query-status and `cont` cost two QMP round trips (90–230 ms under load)
    // between the devices being loaded and the guest running. A load that fails never runs it.
    let autostart = false;
    if (pc && wantResume) {
      await qmp.execute('cont');
      autostart = true;
    }

    const incoming = opts.incoming ?? defaultIncoming(opts.qmp);
    if (incoming.startsWith('unix:')) socketPath = incoming.slice(5);
    await qmp.execute('migrate-incoming', { uri: incoming, 'exit-on-error': false });
    const to = incoming.startsWith('tcp:') && incoming.endsWith(':0') ? await boundAddress(qmp, incoming) : incoming;

    let destStatus = 'setup';
    let destError: string | undefined;
    // Compression travels on multifd only: when restore turned multifd off for postcopy, it goes too
    // (noted above); otherwise send refuses a method without channels, as before.
    const fellBack = channels === 0 && (opts.channels ?? 2) > 0;
    if (fellBack && opts.compression && opts.compression !== 'none') notes.push(`multifd-compression ${opts.compression} was not used (it needs multifd)`);
    const compression = fellBack ? undefined : opts.compression;
    const tx = send({
      file: source,
      to,
      channels,
      ...(opts.uuid ? { uuid: opts.uuid } : {}),
      ...(compression ? { compression } : {}),
      ...(opts.tls ? { tls: opts.tls } : {}),
      ...(opts.level !== undefined && !fellBack ? { level: opts.level } : {}),
      ...(opts.syncMode ? { syncMode: opts.syncMode } : {}),
      ...(opts.zeroPageDetection ? { zeroPageDetection: opts.zeroPageDetection } : {}),
      ...(opts.progressIntervalMs !== undefined ? { progressIntervalMs: opts.progressIntervalMs } : {}),
      signal,
      ...(postcopy ? { postcopy } : {}),
    });
    tx.on('progress', (p: SendProgress) => handle.emit('progress', { ...p, destinationStatus: destStatus } satisfies RestoreProgress));
    const client = qmp;
    let resumed = false;
    if (pc) {
      // PONG(0x42): the devices are loaded and RUN is next (QEMU starts the guest itself when
      // autostart is set; otherwise it stays paused for whoever runs `cont`).
      tx.on('postcopy-running', () => handle.emit('postcopy-running', { elapsedMs: Date.now() - t0 }));
    }

    // QEMU's view, polled while we send: a failure there is the better error message.
    const poll = setInterval(() => {
      client.execute('query-migrate').then((s) => {
        destStatus = s.status ?? destStatus;
        if (s.status === 'failed') {
          destError = s['error-desc'];
          tx.abort(new DestinationError(`the destination QEMU failed to load the snapshot${destError ? `: ${destError}` : ''}`, destError));
        } else if (typeof s.status === 'string' && s.status.startsWith('postcopy-') && s.status !== 'postcopy-active' && s.status !== 'postcopy-device') {
          // postcopy-paused: its connection to us broke; it waits for a recovery we do not offer.
          tx.abort(new PostcopyDestinationLostError('main channel', s.status, `the destination QEMU went to "${s.status}" ${POSTCOPY_LOSS_TEXT}`));
        }
      }, () => {});
    }, 200);
    let summary: SendSummary;
    try {
      summary = await tx.done;
    } catch (e) {
      clearInterval(poll);
      throw await explainFailure(client, e as Error);
    }
    clearInterval(poll);

    const deadline = Date.now() + (opts.completionTimeoutMs ?? 60000);
    for (;;) {
      checkAbort();
      const s = await qmp.execute('query-migrate');
      destStatus = s.status;
      if (s.status === 'completed') break;
      if (s.status === 'failed') throw new DestinationError(`the destination QEMU failed to load the snapshot${s['error-desc'] ? `: ${s['error-desc']}` : ''}`, s['error-desc']);
      if (Date.now() > deadline) throw new DestinationError(`everything was sent but the destination still reports "${s.status}" after ${Math.round((opts.completionTimeoutMs ?? 60000) / 1000)} s`, undefined);
      // Polled often: this wait is all latency at the end of every restore.
      await new Promise((r) => setTimeout(r, 10));
    }
    const completeAt = Date.now() - t0;
    let after = await qmp.execute('query-status');
    if (autostart && after.running) resumed = true;
    if (wantResume && !after.running) {
      await qmp.execute('cont');
      resumed = true;
      after = await qmp.execute('query-status');
    }
    if (after.running && runningAt === undefined) {
      // The RESUME event may still be on its way.
      await new Promise((r) => setTimeout(r, 20));
      runningAt ??= Date.now() - t0;
    }
    return {
      ...summary,
      destinationQemu: { status: destStatus, 'run-state-after': after.status, resumed },
      ...(runningAt !== undefined && after.running ? { 'time-to-running': runningAt } : {}),
      'time-to-complete': completeAt,
      ...(notes.length > 0 ? { notes } : {}),
      // s3://…: bytes and requests from the store (docs/s3.md).
      ...objectReadReport(source),
    };
  } finally {
    qmp?.close();
    await source.close().catch(() => {});
    if (socketPath) await unlink(socketPath).catch(() => {});
  }
}

function defaultIncoming(qmpAddress: string): string {
  if (parseQmpAddress(qmpAddress).kind === 'unix') {
    return `unix:${join(tmpdir(), `multifd-restore-${process.pid}-${Date.now().toString(36)}.sock`)}`;
  }
  return 'tcp:127.0.0.1:0';
}

/** The port QEMU bound for tcp:HOST:0, from query-migrate's socket-address list. */
async function boundAddress(qmp: QmpClient, incoming: string): Promise<string> {
  const s = await qmp.execute('query-migrate');
  const addr = (s['socket-address'] as { type: string; host?: string; port?: string }[] | undefined)?.find((a) => a.type === 'inet');
  if (!addr?.port) throw new DestinationError(`the destination did not report the port it bound for ${incoming}; give --incoming tcp:HOST:PORT`, undefined);
  const host = incoming.slice(4, incoming.lastIndexOf(':'));
  return `tcp:${host}:${addr.port}`;
}

/** Prefers QEMU's own error (it knows why it refused) over what our side saw. */
async function explainFailure(qmp: QmpClient, e: Error): Promise<Error> {
  // An abort (Ctrl-C) is what happened, whatever the destination made of it.
  if (e instanceof DestinationError || e instanceof AbortedError) return e;
  for (let i = 0; i < 10; i++) {
    let s: any;
    try {
      s = await qmp.execute('query-migrate', undefined, { timeoutMs: 1000 });
    } catch (qe) {
      if (qe instanceof QmpConnectionError && e instanceof StallError) {
        // Expected: QEMU loads the stream in its main loop, which blocks while it waits on a sync.
        return new StallError(`${e.message} (the destination does not answer QMP either: its main loop is blocked waiting for the stream)`);
      }
      if (qe instanceof QmpConnectionError) {
        const gone = qe.message.includes('timed out') ? 'stopped answering on QMP' : 'went away (its QMP connection closed)';
        // The stage hints of a refusal do not apply to a QEMU that died: say only what we saw.
        const seen = e instanceof DestinationClosedError ? `the ${e.where} closed: ${e.detail}` : e.message;
        if (e instanceof PostcopyDestinationLostError) return new PostcopyDestinationLostError(e.where, e.detail, `the destination QEMU ${gone} ${POSTCOPY_LOSS_TEXT} (${seen})`);
        return new DestinationError(`the destination QEMU ${gone} while we were sending; the guest was not restored (${seen})`, undefined);
      }
      return e;
    }
    if (s?.status === 'failed' && e instanceof PostcopyDestinationLostError) {
      return new PostcopyDestinationLostError(e.where, e.detail, `the destination QEMU failed ${POSTCOPY_LOSS_TEXT}: ${s['error-desc'] ?? 'no error-desc'} (our side: ${e.message})`);
    }
    if (s?.status === 'failed') {
      return new DestinationError(`the destination QEMU failed to load the snapshot: ${s['error-desc'] ?? 'no error-desc'} (our side: ${e.message})`, s['error-desc']);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return e;
}
