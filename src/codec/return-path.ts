// Return-path messages (destination → source on the main socket), docs/protocol.md §6.1.

import { ByteQueue } from './byte-queue.js';
import { ReturnPathMessage } from './constants.js';
import { NeedMoreData, ProtocolError } from './errors.js';

export function encodeReturnPathMessage(type: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(4 + payload.length);
  b.writeUInt16BE(type, 0);
  b.writeUInt16BE(payload.length, 2);
  payload.copy(b, 4);
  return b;
}

function be32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

export const encodePong = (value: number): Buffer => encodeReturnPathMessage(ReturnPathMessage.PONG, be32(value));
/** 0 = clean end; non-zero tells the source the destination failed. */
export const encodeShut = (status: number): Buffer => encodeReturnPathMessage(ReturnPathMessage.SHUT, be32(status));
export const encodeSwitchoverAck = (): Buffer => encodeReturnPathMessage(ReturnPathMessage.SWITCHOVER_ACK);

export interface ReturnPathEvent {
  type: number;
  payload: Buffer;
}

/** Fixed payload lengths of the messages whose length QEMU checks; others are bounded by be16. */
const RP_FIXED_LEN: Record<number, number> = {
  [ReturnPathMessage.SHUT]: 4,
  [ReturnPathMessage.PONG]: 4,
  [ReturnPathMessage.REQ_PAGES]: 12,
  [ReturnPathMessage.RESUME_ACK]: 4,
  [ReturnPathMessage.SWITCHOVER_ACK]: 0,
};

/** Splits the destination's return-path bytes into messages (source side). */
export class ReturnPathParser {
  private readonly q = new ByteQueue();

  push(chunk: Buffer): void {
    this.q.push(chunk);
  }

  next(): ReturnPathEvent | null {
    const c = this.q.cursor();
    try {
      const at = c.streamOffset;
      const type = c.u16();
      const len = c.u16();
      if (type === 0 || type > ReturnPathMessage.SWITCHOVER_ACK) {
        throw new ProtocolError('BAD_RECORD', `unknown return-path message type ${type}`, { offset: at });
      }
      const fixed = RP_FIXED_LEN[type];
      if (fixed !== undefined && len !== fixed) {
        throw new ProtocolError('BAD_RECORD', `return-path message ${type} has length ${len}, expected ${fixed}`, { offset: at });
      }
      const payload = Buffer.from(c.take(len));
      this.q.consume(c.pos);
      return { type, payload };
    } catch (e) {
      if (e instanceof NeedMoreData) return null;
      throw e;
    }
  }
}
