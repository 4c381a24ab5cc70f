// One interface per compression method, after QEMU's per-method ops: per-channel state created
// at setup, `recv` turning a packet's payload into page bytes. Send side arrives with `send`.

import type { MultifdPacketHeader } from '../../codec/multifd-packet.js';

export interface RecvMethodChannel {
  /** Page bytes for the packet's normal pages, exactly normalPages × pageSize long (as views). */
  recv(header: MultifdPacketHeader, payload: Buffer[]): Buffer[] | Promise<Buffer[]>;
  cleanup(): void;
}

export interface MultifdMethod {
  readonly name: string;
  /** Compression bits carried in packet flags. */
  readonly flags: number;
  recvSetup(channelId: number, pageSize: number): RecvMethodChannel;
}
