// save: one command that saves a running VM to a mapped-ram snapshot. It drives the source over
// QMP (capabilities, parameters, migrate), runs `receive` on a free local port, follows both
// sides, and restores the source's migration settings afterwards. Whatever fails, the source
// VM is left running (a failed migration does not stop it; we cancel ours on our errors).

import { tlsKind, type TlsCreds } from '../transports/tls.js';
import { abortError, InvalidOptionError, SourceError } from '../codec/errors.js';
import type { SyncMode } from '../codec/sync-points.js';
import { checkLevel, getMethod } from '../engine/methods/registry.js';
import { ConvergenceWatch, MAX_DOWNTIME_LIMIT_MS, type NotConverging } from './convergence.js';
import { QmpClient } from '../transports/qmp-client.js';
import { ListeningHandle } from './handle.js';
import { receive, type ReceiveHandle, type ReceiveProgress, type ReceiveSummary } from './receive.js';

export interface SaveOptions {
  /** The source VM's QMP socket: unix:PATH or tcp:HOST:PORT. */
  qmp: string;
  out: string;
  /** multifd channels; 0 migrates without multifd. Default 2. */
  channels?: number;
  /** Where receive listens; default tcp:127.0.0.1:0 (a free local port). */
  listen?: string;
  /** Bytes/s; QEMU's default of 128 MiB/s is raised to this. Default 100 GiB/s. */
  maxBandwidth?: number;
  /** Milliseconds of downtime QEMU may plan for at switchover; unchanged when undefined. */
  downtimeLimitMs?: number;
  /** Run `cont` on the source after saving (QEMU leaves it paused in postmigrate). */
  resume?: boolean;
  syncMode?: 'auto' | SyncMode;
  /** multifd-compression for the source (none, zlib, zstd); the snapshot holds plain pages either way. */
  compression?: string;
  /** multifd-zlib-level / multifd-zstd-level for the source. */
  level?: number;
  /** See ReceiveOptions.directIo. */
  directIo?: boolean;
  /** See ReceiveOptions.readRing. */
  readRing?: boolean;
  /**
   * TLS: the folder must hold ca-cert.pem, server-cert.pem/-key.pem (ours) and client-cert.pem/
   * -key.pem (QEMU's). We add a tls-creds-x509 object to the VM pointing at it (so QEMU must be able
   * to read the folder) and remove it afterwards.
   */
  tls?: TlsCreds;
  /** Fails when the source sends nothing for this long mid-migration (default 300 s; 0: never). */
  idleTimeoutMs?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
  /**
   * QEMU's background-snapshot: the snapshot is of the moment the save starts, the guest runs on
   * throughout and afterwards. Main channel only (QEMU refuses multifd, return-path, xbzrle and
   * more with it: those are turned off for the save and put back after it).
   */
  background?: boolean;
  /** Turn on QEMU's auto-converge for the save (it throttles the vCPUs while the guest outruns the link); put back afterwards. */
  autoConverge?: boolean;
  /**
   * After this long iterating (the source `active`), raise the downtime limit to QEMU's maximum so
   * it stops the guest and switches over at once: a save that ends, with a longer pause, instead of
   * one that iterates for ever. The limit is put back afterwards.
   */
  switchoverAfterMs?: number;
  /** See ReceiveOptions.libvirtPrologue (save-libvirt.ts). */
  libvirtPrologue?: Buffer;
}

/**
 * Capabilities QEMU refuses together with background-snapshot (options.c
 * check_caps_background_snapshot), plus switchover-ack (needs return-path) and postcopy-preempt
 * (needs postcopy-ram), which would fail once those are off.
 */
export const BACKGROUND_INCOMPATIBLE_CAPS = [
  'postcopy-ram', 'dirty-bitmaps', 'postcopy-blocktime', 'late-block-activate', 'return-path', 'multifd',
  'pause-before-switchover', 'auto-converge', 'release-ram', 'rdma-pin-all', 'xbzrle', 'x-colo', 'validate-uuid',
  'zero-copy-send', 'switchover-ack', 'postcopy-preempt', 'mapped-ram',
];

/** What `--background` cannot be combined with, checked before QEMU is touched. */
export function checkBackgroundOptions(opts: Pick<SaveOptions, 'background' | 'channels' | 'compression' | 'level' | 'autoConverge' | 'switchoverAfterMs'>): void {
  if (!opts.background) return;
  if (opts.autoConverge) throw new InvalidOptionError('--background takes no --auto-converge: a background snapshot does not iterate (QEMU refuses auto-converge with it)');
  if (opts.switchoverAfterMs !== undefined) throw new InvalidOptionError('--background takes no --switchover-after: a background snapshot has no switchover to force (it never iterates)');
  if (opts.channels !== undefined && opts.channels > 0) {
    throw new InvalidOptionError(`--background saves over the main channel alone (QEMU refuses multifd with background-snapshot): drop --channels ${opts.channels}`);
  }
  if (opts.compression !== undefined && opts.compression !== 'none') {
    throw new InvalidOptionError(`--background cannot use compression ${opts.compression}: it needs multifd, which QEMU refuses with background-snapshot`);
  }
  if (opts.level !== undefined) throw new InvalidOptionError('--background takes no compression level (no multifd, no compression)');
}

export interface SaveProgress extends ReceiveProgress {
  sourceStatus: string;
  sourceRemaining?: number;
  sourceDirtyRate?: number;
}

export interface SaveSummary extends ReceiveSummary {
  source: {
    status: string;
    'total-time'?: number;
    downtime?: number;
    'setup-time'?: number;
    ram?: Record<string, unknown>;
    'run-state-after': string;
    /** Reported once when QEMU kept expecting more downtime than its limit (see ConvergenceWatch). */
    'not-converging'?: NotConverging;
    /** With switchoverAfterMs: when (ms after the source became active) the switchover was forced. */
    'switchover-forced-after-ms'?: number;
  };
}

const DEFAULT_BANDWIDTH = 100 * 1024 * 1024 * 1024;
/**
 * query-migrate states in which a migration is under way and capabilities cannot change: QEMU
 * 10.0's migration_is_running(), plus 11.1's postcopy-device and failing (on its way to failed).
 */
const ACTIVE_STATES = new Set([
  'setup', 'active', 'device', 'pre-switchover', 'wait-unplug', 'cancelling', 'colo',
  'postcopy-active', 'postcopy-device', 'postcopy-paused', 'postcopy-recover-setup', 'postcopy-recover',
  'failing',
]);

export interface SaveEvents {
  progress: [SaveProgress];
  /** Where our receive listens (the address the source migrates to); also `handle.listening`. */
  listening: [string];
  /** Once, when the source has iterated for a while and still expects more downtime than its limit. */
  'not-converging': [NotConverging];
  /** switchoverAfterMs passed: the downtime limit was raised so the source switches over now. */
  'switchover-forced': [{ 'after-ms': number }];
}

/** `done` resolves with the summary once the snapshot is complete and the source reports completed. */
export class SaveHandle extends ListeningHandle<SaveSummary, SaveEvents> {}

/** Starts on the next tick (so 'progress' listeners can be attached first). */
export function save(opts: SaveOptions): SaveHandle {
  return new SaveHandle((h, signal) => {
    let listened!: (addr: string) => void;
    let notListening!: (e: Error) => void;
    const listening = new Promise<string>((resolve, reject) => { listened = resolve; notListening = reject; });
    const done = Promise.resolve().then(() => runSave(opts, h, signal, listened));
    done.catch((e: Error) => notListening(e));
    return { done, listening };
  }, opts.signal);
}

interface Snapshot {
  caps: { capability: string; state: boolean }[];
  params: Record<string, unknown>;
  /** We added the TLS credentials object (removed again afterwards). */
  tlsObject?: boolean;
  /** Capabilities we set (put back afterwards, in one call: QEMU checks the set as a whole). */
  touched: string[];
}

/** The id of the tls-creds-x509 object save adds to the VM for the migration. */
const TLS_OBJECT = 'multifd-save-tls';

async function runSave(opts: SaveOptions, handle: ListeningHandle<SaveSummary, SaveEvents>, signal: AbortSignal, listened: (addr: string) => void): Promise<SaveSummary> {
  checkBackgroundOptions(opts);
  const channels = opts.channels ?? (opts.background ? 0 : 2);
  const checkAbort = (): void => {
    if (signal.aborted) throw abortError(signal.reason);
  };
  checkAbort();
  const qmp = await QmpClient.connect(opts.qmp);
  let rx: ReceiveHandle | undefined;
  let saved: Snapshot | undefined;
  let migrating = false;
  let poll: NodeJS.Timeout | undefined;
  try {
    const status = await qmp.execute('query-migrate');
    if (ACTIVE_STATES.has(status.status)) {
      throw new SourceError(`the source already has a migration in state "${status.status}"`);
    }
    const run = await qmp.execute('query-status');
    const caps: { capability: string; state: boolean }[] = await qmp.execute('query-migrate-capabilities');
    // After the switchover an x-colo source waits for a COLO secondary's checkpoint messages with
    // its guest stopped; QEMU 11 says nothing of it in the stream, so refuse before touching it.
    if (caps.some((c) => c.capability === 'x-colo' && c.state)) {
      throw new SourceError('the source has x-colo on (COLO fault tolerance): a snapshot cannot be its COLO secondary; turn x-colo off to save it');
    }
    // With the return path the source completes only after our SHUT(0), i.e. after the snapshot
    // is committed; a failure on our side (SHUT(1)) fails its migration and it keeps running.
    // A background snapshot has no return path: our failure closes the socket, its writes fail.
    const capsWanted: Record<string, boolean> = opts.background
      ? { ...Object.fromEntries(BACKGROUND_INCOMPATIBLE_CAPS.map((c) => [c, false])), 'background-snapshot': true }
      // pause-before-switchover would wait for a migrate-continue nobody sends.
      : { multifd: channels > 0, 'mapped-ram': false, 'return-path': true, 'background-snapshot': false, 'pause-before-switchover': false, ...(opts.autoConverge ? { 'auto-converge': true } : {}) };
    const setCaps = Object.entries(capsWanted).filter(([name]) => caps.some((c) => c.capability === name));
    if (opts.autoConverge && !setCaps.some(([name]) => name === 'auto-converge')) {
      throw new SourceError('this QEMU has no auto-converge capability');
    }
    if (opts.background && !setCaps.some(([name]) => name === 'background-snapshot')) {
      throw new SourceError('this QEMU has no background-snapshot capability');
    }
    saved = { caps, params: await qmp.execute('query-migrate-parameters'), touched: setCaps.map(([name]) => name) };
    await qmp.execute('migrate-set-capabilities', {
      capabilities: setCaps.map(([capability, state]) => ({ capability, state })),
    });
    const params: Record<string, unknown> = { 'max-bandwidth': opts.maxBandwidth ?? DEFAULT_BANDWIDTH };
    if (channels > 0) {
      params['multifd-channels'] = channels;
      params['multifd-compression'] = opts.compression ?? 'none';
      if (opts.level !== undefined) {
        checkLevel(getMethod(opts.compression ?? 'none'), opts.level);
        params[`multifd-${opts.compression}-level`] = opts.level;
      }
    } else if (opts.compression && opts.compression !== 'none') {
      throw new InvalidOptionError(`compression ${opts.compression} needs multifd channels (--channels ≥ 1)`);
    }
    if (opts.downtimeLimitMs !== undefined) params['downtime-limit'] = opts.downtimeLimitMs;
    if (opts.tls) {
      await qmp.execute('object-add', tlsKind(opts.tls) === 'psk'
        ? { 'qom-type': 'tls-creds-psk', id: TLS_OBJECT, dir: opts.tls.dir, endpoint: 'client', username: opts.tls.pskUsername ?? 'qemu' }
        : { 'qom-type': 'tls-creds-x509', id: TLS_OBJECT, dir: opts.tls.dir, endpoint: 'client', 'verify-peer': opts.tls.verifyPeer ?? true });
      saved.tlsObject = true;
      params['tls-creds'] = TLS_OBJECT;
      if (opts.tls.hostname) params['tls-hostname'] = opts.tls.hostname;
    }
    await qmp.execute('migrate-set-parameters', params);

    // The source waits for our SWITCHOVER_ACK when it has switchover-ack on (return-path stays on).
    const switchoverAck = !opts.background && caps.some((c) => c.capability === 'switchover-ack' && c.state);
    checkAbort();
    rx = receive({
      ...(switchoverAck ? { switchoverAck: true } : {}),
      listen: opts.listen ?? 'tcp:127.0.0.1:0',
      out: opts.out,
      channels,
      compression: opts.compression ?? 'none',
      ...(opts.syncMode ? { syncMode: opts.syncMode } : {}),
      ...(opts.directIo !== undefined ? { directIo: opts.directIo } : {}),
      ...(opts.readRing !== undefined ? { readRing: opts.readRing } : {}),
      ...(opts.libvirtPrologue ? { libvirtPrologue: opts.libvirtPrologue } : {}),
      ...(opts.idleTimeoutMs !== undefined ? { idleTimeoutMs: opts.idleTimeoutMs } : {}),
      ...(opts.progressIntervalMs !== undefined ? { progressIntervalMs: opts.progressIntervalMs } : {}),
      signal,
      ...(opts.tls ? { tls: opts.tls } : {}),
    });
    const addr = await rx.listening;
    listened(addr);
    handle.emit('listening', addr);

    let source: any = { status: 'setup' };
    rx.on('progress', (p: ReceiveProgress) => {
      const sp: SaveProgress = { ...p, sourceStatus: source.status };
      if (source.ram?.remaining !== undefined) sp.sourceRemaining = source.ram.remaining;
      if (source.ram?.['dirty-pages-rate'] !== undefined) sp.sourceDirtyRate = source.ram['dirty-pages-rate'];
      handle.emit('progress', sp);
    });

    const watch = new ConvergenceWatch({ downtimeLimitMs: opts.downtimeLimitMs ?? Number(saved.params['downtime-limit'] ?? 300) });
    let notConverging: NotConverging | undefined;
    let forcedAfterMs: number | undefined;
    // The source's view: if it fails (its own error), stop waiting on our side at once.
    const sourceFailed = new Promise<never>((_, reject) => {
      poll = setInterval(() => {
        qmp.execute('query-migrate').then((s) => {
          source = s;
          const now = Date.now();
          const verdict = watch.sample(s, now);
          if (verdict) {
            notConverging = verdict;
            handle.emit('not-converging', verdict);
          }
          if (opts.switchoverAfterMs !== undefined && forcedAfterMs === undefined && s.status === 'active' && watch.activeMs(now) >= opts.switchoverAfterMs) {
            forcedAfterMs = watch.activeMs(now);
            handle.emit('switchover-forced', { 'after-ms': forcedAfterMs });
            // QEMU recomputes its switchover threshold from the limit at its next bandwidth
            // sample (every 100 ms), and then stops the guest for what is still dirty.
            qmp.execute('migrate-set-parameters', { 'downtime-limit': MAX_DOWNTIME_LIMIT_MS })
              .catch((e: Error) => reject(new SourceError(`could not raise the downtime limit to force the switchover: ${e.message}`)));
          }
          if (s.status === 'failed' || s.status === 'cancelled') {
            reject(new SourceError(`the source's migration ${s.status}${s['error-desc'] ? `: ${s['error-desc']}` : ''}`, s['error-desc']));
          }
        }, (e: Error) => reject(new SourceError(`lost the source's QMP connection: ${e.message}`)));
      }, 200);
    });
    sourceFailed.catch(() => {});

    checkAbort();
    await startMigration(qmp, addr);
    migrating = true;
    const summary = await Promise.race([rx.done, sourceFailed]).catch(async (e: Error) => {
      // Our own failure makes the source fail too (SHUT 1); when both show, ours says why
      // ("ENOSPC ...", not the source's "Sibling indicated error 1").
      const ours = await Promise.race([rx!.done.then(() => undefined, (x: Error) => x), new Promise<undefined>((r) => setTimeout(r, 1000))]);
      throw ours ?? e;
    });
    // Our file is complete; QEMU reports completed once it has handed everything over.
    for (let i = 0; i < 100 && source.status !== 'completed'; i++) {
      source = await qmp.execute('query-migrate');
      if (source.status === 'failed') throw new SourceError(`the source reports failure after our snapshot completed: ${source['error-desc'] ?? ''}`, source['error-desc']);
      if (source.status !== 'completed') await new Promise((r) => setTimeout(r, 50));
    }
    migrating = false;
    // A background snapshot never leaves the guest stopped (QEMU restarts it right after the
    // device state is taken); only a migration's postmigrate needs `cont`.
    if (opts.resume && run.running && !opts.background) await qmp.execute('cont');
    const after = await qmp.execute('query-status');
    const qemuSyncs = source.ram?.['dirty-sync-count'];
    // --out s3://…: receive's summary carries the upload (`store`: when the snapshot was durable
    // locally and when in the store, docs/s3.md).
    return {
      ...summary,
      ...(typeof qemuSyncs === 'number' ? { 'dirty-sync-count': qemuSyncs } : {}),
      source: {
        status: source.status,
        'total-time': source['total-time'],
        downtime: source.downtime,
        'setup-time': source['setup-time'],
        ram: source.ram,
        'run-state-after': after.status,
        ...(notConverging ? { 'not-converging': notConverging } : {}),
        ...(forcedAfterMs !== undefined ? { 'switchover-forced-after-ms': forcedAfterMs } : {}),
      },
    };
  } catch (e) {
    rx?.abort(e as Error);
    if (migrating) await qmp.execute('migrate_cancel').catch(() => {});
    if (rx) await rx.done.catch(() => {});
    // Interrupted by the caller: that is why, whatever the source reported meanwhile (with an
    // s3:// output our side ends only after aborting the upload, so the source's error comes first).
    if (opts.signal?.aborted && opts.signal.reason instanceof Error) throw opts.signal.reason;
    throw e;
  } finally {
    if (poll) clearInterval(poll);
    if (saved) await restoreSettings(qmp, saved).catch(() => {});
    qmp.close();
  }
}

/**
 * `migrate`, retried for a few seconds on "duplicate yank instance": right after a failed
 * migration QEMU reports `failed` before it has unregistered that migration's yank instance, and
 * a new `migrate` in that window is refused (seen with QEMU 10.0).
 */
export async function startMigration(qmp: QmpClient, uri: string): Promise<void> {
  for (let waited = 0; ; waited += 100) {
    try {
      await qmp.execute('migrate', { uri });
      return;
    } catch (e) {
      if (!/duplicate yank instance/i.test((e as Error).message) || waited >= 5000) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

/** Puts back the capabilities and parameters we changed, so the VM is as the user left it. */
async function restoreSettings(qmp: QmpClient, s: Snapshot): Promise<void> {
  // Capabilities can only change while no migration is active.
  for (let i = 0; i < 50; i++) {
    const st = await qmp.execute('query-migrate');
    if (!ACTIVE_STATES.has(st.status)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  await qmp.execute('migrate-set-capabilities', {
    capabilities: s.caps.filter((c) => s.touched.includes(c.capability)).map((c) => ({ capability: c.capability, state: c.state })),
  });
  const params: Record<string, unknown> = {};
  for (const k of ['max-bandwidth', 'multifd-channels', 'multifd-compression', 'multifd-zlib-level', 'multifd-zstd-level', 'downtime-limit', 'tls-creds', 'tls-hostname']) {
    if (s.params[k] !== undefined) params[k] = s.params[k];
  }
  await qmp.execute('migrate-set-parameters', params);
  if (s.tlsObject) await qmp.execute('object-del', { id: TLS_OBJECT });
}
