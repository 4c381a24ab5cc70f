// One interface per compression method, after QEMU's per-method ops: per-channel state created
// at setup, `prepare` turning a packet's pages into the payload to write (send side), `recv`
// turning a payload back into page bytes (receive side).

import type { MultifdPacketHeader } from '../../codec/multifd-packet.js';

export interface RecvMethodChannel {
  /** Page bytes for the packet's normal pages, exactly normalPages × pageSize long (as views). */
  recv(header: MultifdPacketHeader, payload: Buffer[]): Buffer[] | Promise<Buffer[]>;
  /**
   * Optional: the receiver is done with pages that recv returned (stored, or failed), so the
   * method may reuse their memory. Called at most once per recv result.
   */
  release?(pages: readonly Buffer[]): void;
  cleanup(): void;
}

export interface SendPrepared {
  /** Buffers written after the packet header, in order (views; no copy needed for nocomp). */
  payload: Buffer[];
  /** Total payload bytes: the header's next_packet_size. */
  size: number;
}

export interface SendMethodChannel {
  /**
   * Turns the normal pages of one packet (views totalling normalPages × pageSize bytes) into its
   * payload. prepare of the next packet may run while this one is still being written, so output
   * buffers are the method's to reuse only once release() gave them back.
   */
  prepare(pages: readonly Buffer[], normalPages: number): SendPrepared | Promise<SendPrepared>;
  /** Optional: the payload prepare returned was written (or failed); its memory may be reused. */
  release?(prepared: SendPrepared): void;
  cleanup(): void;
}

export interface SendMethodOptions {
  /** Compression level (QEMU's multifd-zlib-level / multifd-zstd-level); the method's default when unset. */
  level?: number;
}

/** The levels a method takes, as QEMU's multifd-<method>-level parameter (qapi/migration.json). */
export interface LevelRange {
  min: number;
  max: number;
  /** Used when no level is given (QEMU's default). */
  default: number;
}

export interface MultifdMethod {
  readonly name: string;
  /** Compression bits carried in packet flags. */
  readonly flags: number;
  /** Absent: the method takes no level. */
  readonly levels?: LevelRange;
  recvSetup(channelId: number, pageSize: number): RecvMethodChannel;
  sendSetup(channelId: number, pageSize: number, opts?: SendMethodOptions): SendMethodChannel;
}
