// Positioned reads that either fill the whole view or fail: a short read means the file changed
// or was truncated under us, which must never turn into garbage pages on the wire.

import type { FileHandle } from 'node:fs/promises';
import { ProtocolError } from '../codec/errors.js';

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
