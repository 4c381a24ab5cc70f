// What both snapshot readers need from a file: positioned reads that either fill the whole view
// or fail (a short read means the file changed or was truncated under us, which must never turn
// into garbage pages on the wire), and the device state verified by its VMDESCRIPTION.

import type { FileHandle } from 'node:fs/promises';
import { ProtocolError } from '../codec/errors.js';
import { findTrailingVmdesc, MAX_VMDESC_BYTES, oversizedTrailingVmdesc, walkDeviceState, type DeviceStateLayout } from '../codec/vmdesc.js';

export async function readExactly(fh: FileHandle, into: Buffer, position: number, what: string): Promise<void> {
  let done = 0;
  while (done < into.length) {
    const { bytesRead } = await fh.read(into, done, into.length - done, position + done);
    if (bytesRead === 0) {
      throw new ProtocolError('TRUNCATED', `${what} ends at 0x${(position + done).toString(16)}, inside data that should be there (file truncated or changed while reading?)`, { offset: position + done });
    }
    done += bytesRead;
  }
}

/** `length` bytes at `position`, into `into` when given (which must be large enough). */
export async function readAtExactly(fh: FileHandle, position: number, length: number, what: string, into?: Buffer): Promise<Buffer> {
  if (into && into.length < length) throw new RangeError(`buffer of ${into.length} bytes is too small for ${length}`);
  const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
  await readExactly(fh, out, position, what);
  return out;
}

/**
 * The layout of a file's device state (everything from `deviceStart` to the end), proven complete
 * by the trailing VMDESCRIPTION walking every device section exactly.
 */
export function verifiedDeviceState(tail: Buffer, deviceStart: number, fileSize: number): DeviceStateLayout & { fileOffset: number } {
  const found = findTrailingVmdesc(tail);
  if (!found) {
    const over = oversizedTrailingVmdesc(tail);
    if (over !== undefined) {
      throw new ProtocolError('LIMIT_EXCEEDED', `the VMDESCRIPTION at the end of the file is ${over} bytes, more than the ${MAX_VMDESC_BYTES} accepted`, { offset: deviceStart });
    }
    throw new ProtocolError('TRUNCATED', `file is truncated or incomplete: its device state (from 0x${deviceStart.toString(16)} to the end, 0x${fileSize.toString(16)}) does not end with a VMDESCRIPTION`, { offset: deviceStart });
  }
  const layout = walkDeviceState(tail, found.vmdesc, 0, deviceStart);
  if (layout.end !== tail.length) throw new ProtocolError('BAD_VMDESC', 'device state does not end at the VMDESCRIPTION', { offset: deviceStart + layout.end });
  return { ...layout, fileOffset: deviceStart };
}
