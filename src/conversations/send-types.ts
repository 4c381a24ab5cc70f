// send's public types: its options, progress, events and summary.

import type { SyncMode } from '../codec/sync-points.js';
import type { SendChannelStats } from '../engine/multifd-sender.js';
import type { TlsCreds } from '../transports/tls.js';
import type { SnapshotSource } from '../engine/snapshot.js';

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
  syncMode?: 'auto' | SyncMode;
  /** Open the return path (default true): the only way to learn without QMP whether loading succeeded. */
  returnPath?: boolean;
  /** TLS on every channel, with client credentials as for QEMU's tls-creds-x509 (the destination's tls-creds). */
  tls?: TlsCreds;
  /** Pages found all-zero are listed, not sent ('multifd', default) or sent as data ('none'). */
  zeroPageDetection?: 'multifd' | 'none';
  /**
   * Postcopy ("instant restore", docs/protocol.md §6.2): the device state goes right after the switch,
   * the destination starts the guest, and the pages follow — the ones its guest touches first, the
   * rest in the background. The destination needs postcopy-ram on (and postcopy-preempt for
   * `preempt`). If the destination dies in postcopy, the guest it was running is lost.
   */
  postcopy?: boolean | PostcopyOptions;
  connectTimeoutMs?: number;
  /** Fails when no byte could be written and no answer came for this long. Default 60 s. */
  stallTimeoutMs?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface PostcopyOptions {
  /** Answer page requests on a second connection (the destination has postcopy-preempt on). */
  preempt?: boolean;
  /** Page bytes to send before the switch (multifd, or main without it). Default 0: switch at once. */
  precopyBytes?: number;
  /** Switch after this long at the latest (ms). Default: no time limit. */
  precopyMs?: number;
  /** Bytes/s for the background pages after the switch (requested pages are never held back). Default: unlimited. */
  bandwidth?: number;
  /** Pages per background batch after the switch. Default 128. */
  batchPages?: number;
  /**
   * The destination's page size (bytes) of each RAM block whose pages are not 4 KiB, e.g.
   * `{ 'pc.ram': 2097152 }` for a hugetlbfs-backed guest. Announced as QEMU's source would (the
   * block list's page size, POSTCOPY_ADVISE's summary: docs/protocol.md §2.2, §6.2), and such a
   * block's pages go as whole host pages after the switch. `restore` learns it over QMP.
   * Default: every block has 4 KiB pages.
   */
  pageSizes?: Record<string, number>;
}

/** What happened in postcopy; times in ms since send started. */
export interface PostcopySummary {
  preempt: boolean;
  /** Pages that went before the switch. */
  'precopy-pages': number;
  /** Pages sent after the switch (every page of the guest not sent before it, absent ones as ZERO records). */
  'postcopy-pages': number;
  'discard-ranges': number;
  /** When the switch began (end of the precopy phase). */
  'switch-time': number;
  /** The package (LISTEN, device state, RUN) was written. */
  'package-time': number;
  /** PONG(3): the destination loaded the device state. */
  'devices-loaded-time'?: number;
  /** PONG(0x42), the last ping before RUN in the package: the guest starts now (unless the destination runs with -S). */
  'run-time'?: number;
  /** Every page written. */
  'pages-time': number;
  /** SHUT(0): the destination has every page and finished. */
  'complete-time': number;
  /** Page requests (REQ_PAGES / REQ_PAGES_ID) from the destination. */
  requests: number;
  /** Pages sent because they were requested, ahead of the background scan. */
  'requested-pages': number;
  /** Requested pages that were already on their way (not sent twice). */
  'requests-already-sent': number;
  'preempt-pages': number;
  'preempt-bytes': number;
  /** The destination's page size of blocks whose pages are not 4 KiB, as announced (absent when none). */
  'page-sizes'?: Record<string, number>;
}

export interface SendProgress {
  phase: 'validating' | 'connecting' | 'ram' | 'device-state' | 'postcopy' | 'waiting' | 'completed' | 'failed';
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
  'sync-mode': SyncMode | 'none';
  compression: string;
  'return-path': boolean;
  /** confirmed: the destination acknowledged the device state and shut down cleanly. */
  destination: 'confirmed' | 'closed';
  'device-state-bytes': number;
  blocks: { name: string; 'used-length': number; 'pages-sent': number }[];
  channels: SendChannelStats[];
  postcopy?: PostcopySummary;
}

/** The events of a send handle. */
export interface SendEvents {
  progress: [SendProgress];
  /** Postcopy: the precopy phase ended, the switch begins. */
  'postcopy-switch': [{ elapsedMs: number; precopyPages: number }];
  /** Postcopy: PONG(0x42), the destination loaded the devices and runs the guest next. */
  'postcopy-running': [{ elapsedMs: number }];
}
