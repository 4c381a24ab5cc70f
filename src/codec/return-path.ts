// Return-path messages (destination → source on the main socket), PROTOCOL.md §6.1.

import { ReturnPathMessage } from './constants.js';

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
