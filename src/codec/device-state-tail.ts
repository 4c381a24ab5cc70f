// The device state after the RAM sections, kept until it proves complete: it is complete when it
// ends in a VMDESCRIPTION whose device list walks the sections before it exactly (docs/protocol.md
// §1.7). Appends copy into one doubling buffer (linear, not quadratic) and only new positions
// are scanned for candidates, since a candidate needs just the byte before it.
//
// Completeness is a guess at every read boundary: bytes inside a device section (guest-written
// ones, like CMOS NVRAM) can look like a trailing VMDESCRIPTION when a read happens to end right
// after them. A candidate that does not walk is therefore no error (the real description may
// still come); its failure is kept for the message when the stream ends there. One that does walk
// is only as good as the next read: callers commit after the stream has stayed quiet (receive)
// or after the peer confirmed (relay).

import { ProtocolError } from './errors.js';
import { trailingVmdesc, vmdescCandidates, walkDeviceState } from './vmdesc.js';

export class DeviceStateTail {
  private buf = Buffer.alloc(0);
  private used = 0;
  private readonly candidates: number[] = [];
  private complete = false;
  private lastWalkError: Error | undefined;

  constructor(private readonly maxBytes = 64 * 1024 * 1024) {}

  get length(): number {
    return this.used;
  }

  get isComplete(): boolean {
    return this.complete;
  }

  /** Why the latest VMDESCRIPTION candidate was rejected, if it was. */
  get rejection(): Error | undefined {
    return this.complete ? undefined : this.lastWalkError;
  }

  bytes(): Buffer {
    return this.buf.subarray(0, this.used);
  }

  /** Copies the views in (they may belong to socket chunks); returns whether the state is now complete. */
  append(data: readonly Buffer[]): boolean {
    const before = this.used;
    const add = data.reduce((n, d) => n + d.length, 0);
    if (this.used + add > this.maxBytes) {
      throw new ProtocolError('LIMIT_EXCEEDED', `device state exceeds ${this.maxBytes} bytes`);
    }
    if (this.used + add > this.buf.length) {
      const grown = Buffer.allocUnsafe(Math.max(64 * 1024, 2 * this.buf.length, this.used + add));
      this.buf.copy(grown, 0, 0, this.used);
      this.buf = grown;
    }
    for (const d of data) {
      d.copy(this.buf, this.used);
      this.used += d.length;
    }
    if (add === 0) return this.complete;
    const tail = this.bytes();
    // A loop, not push(...found): one large append can hold more candidates than a call takes arguments.
    for (const p of vmdescCandidates(tail, Math.max(1, before))) this.candidates.push(p);
    // Only the latest candidate (and any inside its 5-byte header) can still turn out to be the
    // trailing VMDESCRIPTION: an earlier one's JSON would contain the latest one's 0x00 byte,
    // which JSON.parse refuses. Keeping them all made every append that ends in "}" cost
    // O(candidates), quadratic over a device state full of fake record headers.
    const last = this.candidates[this.candidates.length - 1];
    if (last !== undefined && this.candidates[0]! < last - 5) {
      this.candidates.splice(0, this.candidates.findIndex((p) => p >= last - 5));
    }
    this.complete = false;
    const found = trailingVmdesc(tail, this.candidates);
    if (!found) return false;
    try {
      const layout = walkDeviceState(tail, found.vmdesc, 0);
      this.complete = layout.vmdescOffset === found.vmdescOffset && layout.end === tail.length;
      if (!this.complete) {
        this.lastWalkError = new ProtocolError('BAD_VMDESC', `the VMDESCRIPTION at device-state offset ${found.vmdescOffset} does not follow the sections it describes`);
      }
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      this.lastWalkError = e;
    }
    return this.complete;
  }
}
