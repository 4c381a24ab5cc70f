// The public options, progress and summary of receive (receive.ts); the summary is the JSON the
// CLI prints, so its fields are a stable interface.

import type { SyncMode } from '../codec/sync-points.js';
import type { ChannelStats } from '../engine/multifd-receiver.js';
import type { TlsCreds } from '../transports/tls.js';
import type { UploadProgress, UploadReport } from './object-store.js';


export interface ReceiveOptions {
  /** tcp:HOST:PORT or unix:PATH; port 0 picks a free port (see handle.listening). */
  listen: string;
  /** Snapshot path; written as a temporary file and renamed when complete. */
  out: string;
  /** multifd channels the source uses; 0 = the source has multifd off. Default 2 (QEMU's). */
  channels?: number;
  /** The source's multifd-compression (none, zlib, zstd); 'auto' (default) detects it from the first data packet. */
  compression?: string;
  /** How MULTIFD_FLUSH/EOS map to syncs; 'auto' infers it from the START section. */
  syncMode?: 'auto' | SyncMode;
  /** Required uuid in multifd init messages (the source's -uuid); default: accept any. */
  uuid?: Buffer;
  /** How long a new connection may take to send its first 4 bytes (default 10 s); a silent one is closed as a stray. */
  identifyTimeoutMs?: number;
  /** Connections allowed to wait for identification at once (default 16); more are closed at once. */
  maxPendingConnections?: number;
  /** Accept TLS connections only, with server credentials as for QEMU's tls-creds-x509 (the source's tls-creds). */
  tls?: TlsCreds;
  /**
   * Read multifd channels into one reused ring each (default true): less CPU per GiB; false reads
   * them as plain streams (see src/transports/ring-reader.ts).
   */
  readRing?: boolean;
  /** How long a sync waits for channels that never connected. */
  channelTimeoutMs?: number;
  /** Fails when the source sends nothing for this long mid-migration (default 300 s; 0: never). */
  idleTimeoutMs?: number;
  /** Largest device state (everything after RAM) kept for verification. */
  maxDeviceStateBytes?: number;
  /**
   * How long the main channel must stay quiet after a complete-looking VMDESCRIPTION before the
   * snapshot is committed (default 20 ms); end of stream commits at once.
   */
  completionQuietMs?: number;
  /**
   * Write pages with O_DIRECT where the file system supports it (default true): cheaper than the
   * page cache for a whole guest, but the file is not cached for an immediate restore.
   */
  directIo?: boolean;
  /**
   * Write a libvirt save image instead of a bare QEMU file: these bytes (a sparse-format header and
   * data with the `…Part` magic, codec/libvirt-image.ts) first, QEMU's mapped-ram stream after them,
   * the magic flipped to `…Save` once the file is complete (save --domain-xml).
   */
  libvirtPrologue?: Buffer;
  /** How often 'progress' is emitted. */
  progressIntervalMs?: number;
  signal?: AbortSignal;
  /**
   * The source has switchover-ack on (the stream does not say so; a QEMU destination knows it from
   * its own capability): answer as a destination with no device that holds the switchover back.
   */
  switchoverAck?: boolean;
}

export interface ReceiveProgress {
  phase: 'listening' | 'setup' | 'ram' | 'device-state' | 'postcopy' | 'committing' | 'completed' | 'failed';
  elapsedMs: number;
  transferred: number;
  normal: number;
  duplicate: number;
  rounds: number;
  channelsConnected: number;
  channels: number;
  mainBytes: number;
  ramTotal: number;
  /** --out s3://…, while committing: the upload of the staged snapshot (docs/s3.md). */
  upload?: UploadProgress;
}

export interface ReceiveSummary {
  status: 'completed';
  file: string;
  machine: string;
  'total-time': number;
  /** Of total-time: making the snapshot durable (fsync, bitmaps, rename) after the last byte. */
  'commit-time': number;
  /** Pages went to the file with O_DIRECT (see ReceiveOptions.directIo). */
  'direct-io': boolean;
  transferred: number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  mbps: number;
  /**
   * Receive alone cannot see QEMU's dirty-bitmap syncs; it reports the multifd sync barriers it
   * passed (one per scan wrap plus setup, or one per section). `save` replaces it with QEMU's count.
   */
  'dirty-sync-count': number;
  /** Multifd sync barriers passed (setup sync included). */
  'multifd-syncs': number;
  'sync-mode': 'round' | 'section' | 'none';
  /** multifd-compression of the source's packets (detected or as given); the snapshot holds plain pages. */
  compression: string;
  'return-path': boolean;
  /** The source saved a background snapshot (no END section; the state of when the save started). */
  'background-snapshot'?: boolean;
  /** XBZRLE deltas applied onto the pages held (present when the source had xbzrle on). */
  'xbzrle-pages'?: number;
  'main-bytes': number;
  'device-state-bytes': number;
  'file-size': number;
  blocks: { name: string; 'used-length': number; 'pages-present': number }[];
  channels: ChannelStats[];
  /** Present when the source switched to postcopy (device state came in its PACKAGED command). */
  postcopy?: {
    /** Since the start of the migration. */
    'switched-at-ms': number;
    /** Page records on the main channel after the switch. */
    'main-pages': number;
    /** Page records on the preempt channel. */
    'preempt-pages': number;
    'discard-ranges': number;
    'preempt-channel': boolean;
  };
  /** --out s3://…: the upload, with when the snapshot was durable locally and in the store (docs/s3.md). */
  store?: UploadReport;
  /**
   * What the user should know besides: an interrupt that came after the snapshot's point of no
   * return (its rename or CompleteMultipartUpload), which it no longer stopped (docs/s3.md).
   */
  notes?: string[];
}
