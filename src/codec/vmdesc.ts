// The VMDESCRIPTION JSON and walking device sections with it (docs/protocol.md §1.5, §1.7). Device
// sections carry no length, so the vmdesc is the only way to find where one ends without
// knowing every device; it is also how a receiver proves that the stream ended complete.

import { SectionType } from './constants.js';
import { ProtocolError } from './errors.js';

export interface VmdescField {
  name: string;
  type: string;
  size: number;
  array_len?: number;
  index?: number;
  struct?: VmdescStruct;
}

export interface VmdescStruct {
  vmsd_name?: string;
  version?: number;
  fields?: VmdescField[];
  subsections?: VmdescStruct[];
}

export interface VmdescDevice extends VmdescStruct {
  name: string;
  instance_id: number;
}

export interface Vmdesc {
  page_size?: number;
  configuration?: unknown;
  devices: VmdescDevice[];
}

export interface DeviceSection {
  type: 'full' | 'start' | 'part' | 'end';
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
  /** Offset of the section's first byte within the walked buffer, and its length incl. footer. */
  offset: number;
  length: number;
}

export interface DeviceStateLayout {
  sections: DeviceSection[];
  /** Offset of the EOF byte (0x00). */
  eofOffset: number;
  /** Offset of the VMDESCRIPTION record (0x06), if one follows EOF. */
  vmdescOffset?: number;
  /** Offset just past the last byte that belongs to the stream. */
  end: number;
}

const MAX_DEPTH = 64;
/**
 * Largest VMDESCRIPTION JSON looked at (QEMU writes a be32 length and skips the record on load
 * without a limit; a real one is tens of KB, a few MB with thousands of devices).
 */
export const MAX_VMDESC_BYTES = 64 * 1024 * 1024;

export function parseVmdesc(json: Buffer | string, offset?: number): Vmdesc {
  const at = offset === undefined ? {} : { offset };
  let v: unknown;
  try {
    v = JSON.parse(typeof json === 'string' ? json : json.toString('utf8'));
  } catch (e) {
    throw new ProtocolError('BAD_VMDESC', `VMDESCRIPTION is not valid JSON: ${(e as Error).message}`, at);
  }
  if (typeof v !== 'object' || v === null || !Array.isArray((v as Vmdesc).devices)) {
    throw new ProtocolError('BAD_VMDESC', 'VMDESCRIPTION JSON has no "devices" array', at);
  }
  return v as Vmdesc;
}

class Walker {
  pos: number;
  constructor(readonly buf: Buffer, start: number, readonly base: number) {
    this.pos = start;
  }
  fail(msg: string): never {
    throw new ProtocolError('BAD_VMDESC', msg, { offset: this.base + this.pos });
  }
  need(n: number): void {
    if (this.pos + n > this.buf.length) {
      throw new ProtocolError('TRUNCATED', `device state ends inside a section (needs ${n} more bytes)`, { offset: this.base + this.pos });
    }
  }
  u8(): number {
    this.need(1);
    return this.buf[this.pos++]!;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  str(): string {
    const n = this.u8();
    this.need(n);
    const s = this.buf.toString('latin1', this.pos, this.pos + n);
    this.pos += n;
    return s;
  }
  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }

  /** The vmdesc comes from the stream: a list that is not an array of objects is a bad vmdesc, not a TypeError. */
  list<T>(v: T[] | undefined, what: string): T[] {
    if (v === undefined) return [];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'object' || x === null)) this.fail(`VMDESCRIPTION ${what} is not a list of objects`);
    return v;
  }

  struct(desc: VmdescStruct, depth: number): void {
    if (depth > MAX_DEPTH) this.fail('VMDESCRIPTION nests too deeply');
    for (const f of this.list(desc.fields, 'fields')) {
      // The same rules as decodeDeviceFields (device-fields.ts): verify and inspect decode with
      // it, receive and restore walk with this, and both must agree on where a section ends.
      if (typeof f.name !== 'string' || typeof f.type !== 'string') this.fail('a VMDESCRIPTION field has no name or type');
      const count = f.array_len ?? 1;
      if (!Number.isSafeInteger(count) || count < 0) this.fail(`field ${f.name} has a bad array_len`);
      if (f.type === 'struct' && typeof f.struct === 'object' && f.struct !== null) {
        for (let i = 0; i < count; i++) {
          const at = this.pos;
          this.struct(f.struct, depth + 1);
          // An element that read nothing reads nothing every time: a huge array_len must not spin.
          if (this.pos === at) break;
        }
      } else {
        if (!Number.isSafeInteger(f.size) || f.size < 0) this.fail(`field ${f.name} has a bad size`);
        if (f.type === 'capability') {
          // A counted string whatever the size says (QEMU's configuration entry); each reads a byte at least.
          for (let i = 0; i < count; i++) this.skip(this.u8());
        } else {
          this.skip(f.size * count);
        }
      }
    }
    for (const sub of this.list(desc.subsections, 'subsections')) {
      const at = this.pos;
      if (this.u8() !== SectionType.SUBSECTION) {
        this.pos = at;
        this.fail(`subsection ${sub.vmsd_name ?? '?'} not found`);
      }
      const name = this.str();
      if (sub.vmsd_name !== undefined && name !== sub.vmsd_name) this.fail(`subsection "${name}" where the vmdesc expects "${sub.vmsd_name}"`);
      this.u32();
      this.struct(sub, depth + 1);
    }
  }
}

/**
 * Walks device sections from `start` to the EOF byte using the vmdesc, and checks that a
 * VMDESCRIPTION (if present) follows. `base` is added to offsets in error messages.
 */
export function walkDeviceState(buf: Buffer, vmdesc: Vmdesc, start = 0, base = 0): DeviceStateLayout {
  const byKey = new Map<string, VmdescDevice>();
  const w: Walker = new Walker(buf, start, base);
  for (const d of w.list(vmdesc.devices, 'devices')) byKey.set(`${d.name}\0${d.instance_id}`, d);
  const sections: DeviceSection[] = [];
  const ids = new Map<number, string>();
  for (;;) {
    const offset = w.pos;
    const t = w.u8();
    if (t === SectionType.EOF) break;
    if (t !== SectionType.FULL && t !== SectionType.START) {
      w.pos = offset;
      w.fail(`unexpected record type 0x${t.toString(16)} in device state`);
    }
    const sectionId = w.u32();
    const idstr = w.str();
    const instanceId = w.u32();
    const versionId = w.u32();
    const dev = byKey.get(`${idstr}\0${instanceId}`);
    if (!dev) {
      w.pos = offset;
      w.fail(`device section "${idstr}" instance ${instanceId} is not in the VMDESCRIPTION`);
    }
    ids.set(sectionId, idstr);
    w.struct(dev, 0);
    const fAt = w.pos;
    if (w.u8() !== SectionType.FOOTER || w.u32() !== sectionId) {
      w.pos = fAt;
      w.fail(`footer of device section "${idstr}" (id ${sectionId}) missing`);
    }
    sections.push({ type: t === SectionType.FULL ? 'full' : 'start', sectionId, idstr, instanceId, versionId, offset, length: w.pos - offset });
  }
  const eofOffset = w.pos - 1;
  if (w.pos === buf.length) return { sections, eofOffset, end: w.pos };
  const vmdescOffset = w.pos;
  if (w.u8() !== SectionType.VMDESCRIPTION) {
    w.pos = vmdescOffset;
    w.fail('bytes after EOF are not a VMDESCRIPTION');
  }
  const len = w.u32();
  w.skip(len);
  return { sections, eofOffset, vmdescOffset, end: w.pos };
}

/**
 * Positions p in [from, to) where a VMDESCRIPTION record could start: `00 06 len32 {`. A tail
 * grows chunk by chunk; scanning only the new bytes keeps the work linear.
 */
export function vmdescCandidates(buf: Buffer, from: number, to = buf.length): number[] {
  const out: number[] = [];
  for (let p = buf.indexOf(SectionType.VMDESCRIPTION, Math.max(1, from)); p >= 0 && p < to; p = buf.indexOf(SectionType.VMDESCRIPTION, p + 1)) {
    if (buf[p - 1] === SectionType.EOF && (p + 5 >= buf.length || buf[p + 5] === 0x7b)) out.push(p);
  }
  return out;
}

/** The candidate whose record ends exactly at the end of `buf` and parses, if any. */
export function trailingVmdesc(buf: Buffer, candidates: readonly number[]): { vmdesc: Vmdesc; vmdescOffset: number } | undefined {
  if (buf.length < 7 || buf[buf.length - 1] !== 0x7d /* } */) return undefined;
  // Every candidate has a 0x00 byte before it, and JSON.parse refuses a raw U+0000: a candidate
  // whose JSON would contain the latest candidate's 0x00 cannot parse, so only the latest ones
  // (within its 5-byte header) are tried. Trying them all converted the rest of the buffer to a
  // string per candidate: quadratic, minutes for a file whose device state is full of fake headers.
  let latest = -1;
  for (const p of candidates) if (p > latest) latest = p;
  for (const p of candidates) {
    if (p < latest - 5 || p + 5 > buf.length) continue;
    const len = buf.readUInt32BE(p + 1);
    if (p + 5 + len !== buf.length || len > MAX_VMDESC_BYTES) continue;
    try {
      return { vmdesc: parseVmdesc(buf.subarray(p + 5)), vmdescOffset: p };
    } catch {
      continue;
    }
  }
  return undefined;
}

/** One-shot form for a complete buffer. */
export function findTrailingVmdesc(buf: Buffer): { vmdesc: Vmdesc; vmdescOffset: number } | undefined {
  return trailingVmdesc(buf, vmdescCandidates(buf, 0));
}

/**
 * The length a VMDESCRIPTION header near the end of `buf` claims when that record would end
 * exactly at the end but is larger than MAX_VMDESC_BYTES (trailingVmdesc skips such a candidate):
 * lets a caller that found no description say why. Undefined when there is none.
 */
export function oversizedTrailingVmdesc(buf: Buffer): number | undefined {
  // A record of more than MAX_VMDESC_BYTES starts before the last MAX_VMDESC_BYTES + 5 bytes.
  const to = buf.length - MAX_VMDESC_BYTES - 5;
  if (to < 1 || buf[buf.length - 1] !== 0x7d /* } */) return undefined;
  for (const p of vmdescCandidates(buf, 1, to)) {
    const len = buf.readUInt32BE(p + 1);
    if (len > MAX_VMDESC_BYTES && p + 5 + len === buf.length) return len;
  }
  return undefined;
}
