// The public options, progress and summary of relay (relay.ts); the summary is the JSON the CLI
// prints, so its fields are a stable interface.

import type { SyncMode } from '../codec/sync-points.js';
import type { ChannelStats } from '../engine/multifd-receiver.js';
import type { SendChannelStats } from '../engine/multifd-sender.js';
import type { TlsCreds } from '../transports/tls.js';
import type { UploadProgress, UploadReport } from './object-store.js';

export interface RelayOptions {
  /** Where A connects: tcp:HOST:PORT or unix:PATH (port 0 picks one, see handle.listening). */
  listen: string;
  /** B's migrate-incoming address. */
  to: string;
  /** A's multifd-channels; 0 = A has multifd off. Default 2. */
  channelsIn?: number;
  /** B's multifd-channels; default channelsIn. */
  channelsOut?: number;
  /** A's multifd-compression; 'auto' (default) detects it from the first data packet. */
  compressionIn?: string;
  /** B's multifd-compression: none (default), zlib or zstd. */
  compressionOut?: string;
  /**
   * Compression level towards B (zlib 1–9, zstd 1–20); the method's default when unset. Setting
   * it re-encodes every packet (see recompress).
   */
  levelOut?: number;
  /**
   * Decode and re-encode compressed packets even when A and B use the same method on as many
   * channels. By default such packets go on as they came (each A channel's stream continues on the
   * B channel of the same number), which costs no compression work; with levelOut set they are
   * always re-encoded.
   */
  recompress?: boolean;
  /**
   * Relay 0 → N without a tee: bytes of memory for copies of sent pages, to decode A's XBZRLE
   * deltas (pages sent more than once, the most recently sent kept); copies beyond it go to a
   * temporary file (tempDir), so any size is exact. 0: none (A has xbzrle off). Default 256 MiB.
   */
  xbzrleCacheBytes?: number;
  /** Where that temporary file goes (unlinked at once); default MULTIFD_TMPDIR, else TMPDIR, else /tmp. */
  tempDir?: string;
  /** A's -uuid: A's init messages must carry it and B's carry it too. Default: B's carry A's. */
  uuid?: Buffer;
  /**
   * Also write a mapped-ram snapshot of the migrated state here (committed once B confirmed). An
   * s3://bucket/key is staged as a local file and uploaded packed once B confirmed (docs/s3.md).
   */
  tee?: string;
  /** O_DIRECT page writes for the tee (default true). */
  teeDirectIo?: boolean;
  /** How A's MULTIFD_FLUSH/EOS map to syncs; 'auto' infers it from A's setup section. */
  syncMode?: 'auto' | SyncMode;
  /** How long a new connection may take to send its first 4 bytes (default 10 s); a silent one is closed as a stray. */
  identifyTimeoutMs?: number;
  /** Connections allowed to wait for identification at once (default 16); more are closed at once. */
  maxPendingConnections?: number;
  /** TLS towards A: accept TLS connections only, with server credentials (A's tls-creds is a client). */
  tlsIn?: TlsCreds;
  /** TLS towards B: client credentials (B's tls-creds is a server). */
  tlsOut?: TlsCreds;
  /**
   * Read A's multifd channels into one reused ring each (default true): less CPU per GiB; false reads
   * them as plain streams (see src/transports/ring-reader.ts).
   */
  readRing?: boolean;
  /** How long a sync waits for A channels that never connected. */
  channelTimeoutMs?: number;
  /** Fails when A sends nothing for this long mid-migration (default 300 s; 0: never). */
  idleTimeoutMs?: number;
  connectTimeoutMs?: number;
  /** Fails when B accepted nothing (no byte written, no message) for this long while we wait on it. Default 60 s. */
  stallTimeoutMs?: number;
  maxDeviceStateBytes?: number;
  progressIntervalMs?: number;
  signal?: AbortSignal;
}

export interface RelayProgress {
  phase: 'listening' | 'setup' | 'ram' | 'postcopy' | 'device-state' | 'waiting' | 'committing' | 'completed' | 'failed';
  elapsedMs: number;
  /** Bytes read from A (main and multifd channels). */
  bytesIn: number;
  /** Bytes written to B. */
  bytesOut: number;
  normal: number;
  duplicate: number;
  rounds: number;
  channelsIn: number;
  channelsOut: number;
  ramTotal: number;
  /** --tee s3://…, while committing: the upload of the staged tee (docs/s3.md). */
  upload?: UploadProgress;
}

export interface RelaySummary {
  status: 'completed';
  from: string;
  to: string;
  machine: string;
  'total-time': number;
  'bytes-in': number;
  'bytes-out': number;
  normal: number;
  'normal-bytes': number;
  duplicate: number;
  /** Throughput of what came in from A. */
  mbps: number;
  'multifd-syncs': number;
  'sync-mode': SyncMode | 'none';
  'compression-in': string;
  'compression-out': string;
  /** Compressed packets passed on as they came, without decoding and re-encoding (see recompress). */
  'passed-encoded': number;
  /** A opened the return path (A completed only after B confirmed). */
  'return-path': boolean;
  /** B confirmed the load (SHUT 0 on the return path). */
  destination: 'confirmed';
  'device-state-bytes': number;
  /** Present when A switched to postcopy: B ran from the package on, pages followed on demand. */
  postcopy?: {
    'switched-at-ms': number;
    /** Page records relayed on the main channel after the switch. */
    'main-pages': number;
    /** Bytes relayed on the preempt channel (requested pages, A → B). */
    'preempt-bytes': number;
    'preempt-pages': number;
    'preempt-channel': boolean;
    /** Page requests relayed from B to A. */
    'page-requests': number;
  };
  /** `file` is the --tee as given (an s3:// URL too); `file-size` the mapped-ram file's (for an object: as staged). */
  tee?: { file: string; 'file-size': number; 'commit-time': number; 'direct-io': boolean };
  /** --tee s3://…: the upload, as save's and receive's `store` (docs/s3.md). */
  store?: UploadReport;
  /**
   * What the user should know besides: an interrupt that came after the snapshot's point of no
   * return (its rename or CompleteMultipartUpload), which it no longer stopped (docs/s3.md).
   */
  notes?: string[];
  'channels-in': ChannelStats[];
  'channels-out': SendChannelStats[];
}
