// Decodes a device section's fields with its VMDESCRIPTION entry (docs/protocol.md §1.5, §1.7), the
// way scripts/analyze-migration.py does: integers and bools by type, structs recursively, arrays
// element by element, subsections by name; every other type is opaque bytes of the field's size.
// The vmdesc is untrusted input from the file: bad shapes and short data become ProtocolErrors,
// and the number of decoded values is capped so a huge array_len cannot exhaust memory.

import { SectionType } from './constants.js';
import { ProtocolError } from './errors.js';
import type { VmdescField, VmdescStruct } from './vmdesc.js';

export type DecodedValue =
  | { kind: 'int'; type: string; offset: number; size: number; signed: boolean; value: bigint }
  | { kind: 'bool'; type: string; offset: number; size: number; value: boolean }
  | { kind: 'string'; type: string; offset: number; size: number; value: string }
  | { kind: 'null'; type: string; offset: number; size: number }
  | { kind: 'bytes'; type: string; offset: number; size: number; bytes: Buffer }
  | DecodedStruct;

export interface DecodedStruct {
  kind: 'struct';
  type: string;
  vmsdName?: string;
  version?: number;
  offset: number;
  size: number;
  fields: DecodedField[];
  subsections: DecodedSubsection[];
}

export interface DecodedField {
  name: string;
  type: string;
  /** True when the vmdesc gave array_len (even 1): the values are array elements. */
  array: boolean;
  /** 10.0's per-element "index" for struct arrays listed one entry per element. */
  index?: number;
  values: DecodedValue[];
}

export interface DecodedSubsection {
  name: string;
  version: number;
  /** Offset of the 0x05 byte. */
  offset: number;
  state: DecodedStruct;
}

/** Found while decoding but not fatal: the bytes were consumed as the vmdesc said. */
export interface DecodeIssue {
  offset: number;
  message: string;
}

export interface DecodeOptions {
  /** Added to every offset (and to error offsets): the file offset of buf[0]. */
  base?: number;
  /** Cap on decoded values for one call. */
  maxValues?: number;
}

const MAX_DEPTH = 64;
const DEFAULT_MAX_VALUES = 4_000_000;
/**
 * Values that occupy no bytes (zero-size fields, struct elements that read nothing) cost memory
 * but no input: a tiny file could otherwise make one call build DEFAULT_MAX_VALUES of them
 * (hundreds of MB and seconds, fuzz regression vmdesc-*). Every other value consumes a byte at least.
 */
const MAX_EMPTY_VALUES = 65_536;
const NULLPTR_MARKER = 0x30; // '0'

/** vmstate integer types; "int32 le" means "less or equal" (a load-time check), not little-endian. */
const INT_TYPES: Record<string, boolean> = {
  int8: true, int16: true, int32: true, int64: true,
  'int32 equal': true, 'int32 le': true, 'int64 equal': true,
  uint8: false, uint16: false, uint32: false, uint64: false,
  'uint8 equal': false, 'uint16 equal': false, 'uint32 equal': false,
};

class Decoder {
  pos: number;
  values = 0;
  emptyValues = 0;
  readonly issues: DecodeIssue[] = [];
  constructor(readonly buf: Buffer, start: number, readonly base: number, readonly maxValues: number) {
    this.pos = start;
  }

  at(p = this.pos): number {
    return this.base + p;
  }

  fail(msg: string, p = this.pos): never {
    throw new ProtocolError('BAD_VMDESC', msg, { offset: this.at(p) });
  }

  need(n: number, what: string): void {
    if (this.pos + n > this.buf.length) {
      throw new ProtocolError('TRUNCATED', `device state ends inside ${what} (needs ${n} bytes, ${this.buf.length - this.pos} left)`, { offset: this.at() });
    }
  }

  count(): void {
    if (++this.values > this.maxValues) this.fail(`more than ${this.maxValues} decoded values (array_len too large?)`);
  }

  list<T>(v: unknown, what: string): T[] {
    if (v === undefined) return [];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'object' || x === null)) this.fail(`VMDESCRIPTION ${what} is not a list of objects`);
    return v as T[];
  }

  struct(desc: VmdescStruct, type: string, depth: number, path: string): DecodedStruct {
    if (depth > MAX_DEPTH) this.fail('VMDESCRIPTION nests too deeply');
    const start = this.pos;
    const out: DecodedStruct = { kind: 'struct', type, offset: this.at(start), size: 0, fields: [], subsections: [] };
    if (typeof desc.vmsd_name === 'string') out.vmsdName = desc.vmsd_name;
    if (typeof desc.version === 'number') out.version = desc.version;
    for (const f of this.list<VmdescField>(desc.fields, `fields of ${path}`)) out.fields.push(this.field(f, depth, path));
    for (const sub of this.list<VmdescStruct>(desc.subsections, `subsections of ${path}`)) out.subsections.push(this.subsection(sub, depth, path));
    out.size = this.pos - start;
    return out;
  }

  field(f: VmdescField, depth: number, path: string): DecodedField {
    if (typeof f.name !== 'string' || typeof f.type !== 'string') this.fail(`a field of ${path} has no name or type`);
    const count = f.array_len ?? 1;
    if (!Number.isSafeInteger(count) || count < 0) this.fail(`field ${path}.${f.name} has a bad array_len ${String(f.array_len)}`);
    const isStruct = f.type === 'struct' && typeof f.struct === 'object' && f.struct !== null;
    if (!isStruct && (!Number.isSafeInteger(f.size) || f.size < 0)) this.fail(`field ${path}.${f.name} has a bad size ${String(f.size)}`);
    const out: DecodedField = { name: f.name, type: f.type, array: f.array_len !== undefined, values: [] };
    if (typeof f.index === 'number') out.index = f.index;
    for (let i = 0; i < count; i++) {
      this.count();
      const at = this.pos;
      if (isStruct) {
        const s = this.struct(f.struct!, 'struct', depth + 1, `${path}.${f.name}`);
        // QEMU records the bytes one element wrote; a mismatch means the vmdesc does not describe these bytes.
        if (Number.isSafeInteger(f.size) && s.size !== f.size) {
          this.issues.push({ offset: this.at(at), message: `struct field ${path}.${f.name} is ${s.size} bytes in the stream, the VMDESCRIPTION says ${f.size}` });
        }
        out.values.push(s);
      } else {
        out.values.push(this.scalar(f, `${path}.${f.name}`));
      }
      // An element that read nothing is paid for by no input byte: bounded on its own.
      if (this.pos === at && ++this.emptyValues > MAX_EMPTY_VALUES) {
        this.fail(`more than ${MAX_EMPTY_VALUES} values that occupy no bytes (array_len ${count} of ${path}.${f.name} too large?)`, at);
      }
    }
    return out;
  }

  scalar(f: VmdescField, path: string): DecodedValue {
    const size = f.size;
    const offset = this.at();
    const signed = INT_TYPES[f.type];
    if (f.type === 'capability') {
      // QEMU's configuration: a counted string whatever the size says.
      this.need(1, path);
      const n = this.buf[this.pos]!;
      this.need(1 + n, path);
      const value = this.buf.toString('latin1', this.pos + 1, this.pos + 1 + n);
      this.pos += 1 + n;
      return { kind: 'string', type: f.type, offset, size: 1 + n, value };
    }
    this.need(size, path);
    const bytes = this.buf.subarray(this.pos, this.pos + size);
    this.pos += size;
    if (signed !== undefined && (size === 1 || size === 2 || size === 4 || size === 8)) {
      let v = 0n;
      for (const b of bytes) v = (v << 8n) | BigInt(b);
      if (signed) v = BigInt.asIntN(size * 8, v);
      return { kind: 'int', type: f.type, offset, size, signed, value: v };
    }
    if (f.type === 'bool' && size === 1) return { kind: 'bool', type: f.type, offset, size, value: bytes[0] !== 0 };
    if (f.type === 'nullptr') {
      if (size !== 1 || bytes[0] !== NULLPTR_MARKER) this.issues.push({ offset, message: `nullptr field ${path} does not hold the '0' marker` });
      return { kind: 'null', type: f.type, offset, size };
    }
    return { kind: 'bytes', type: f.type, offset, size, bytes };
  }

  subsection(sub: VmdescStruct, depth: number, path: string): DecodedSubsection {
    const at = this.pos;
    const expected = typeof sub.vmsd_name === 'string' ? sub.vmsd_name : '?';
    this.need(1, `subsection ${expected}`);
    if (this.buf[this.pos] !== SectionType.SUBSECTION) this.fail(`subsection "${expected}" of ${path} not found (byte 0x${this.buf[this.pos]!.toString(16)} instead of 0x05)`);
    this.pos++;
    this.need(1, `subsection ${expected}`);
    const n = this.buf[this.pos++]!;
    this.need(n + 4, `subsection ${expected}`);
    const name = this.buf.toString('latin1', this.pos, this.pos + n);
    this.pos += n;
    if (sub.vmsd_name !== undefined && name !== sub.vmsd_name) this.fail(`subsection "${name}" where the VMDESCRIPTION expects "${sub.vmsd_name}"`, at);
    const version = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    if (typeof sub.version === 'number' && sub.version !== version) {
      this.issues.push({ offset: this.at(at), message: `subsection ${name} has version ${version}, the VMDESCRIPTION says ${sub.version}` });
    }
    return { name, version, offset: this.at(at), state: this.struct(sub, 'subsection', depth + 1, name) };
  }
}

export interface DecodedDevice {
  state: DecodedStruct;
  /** Index in buf just past the device's data (where its section footer starts). */
  end: number;
  issues: DecodeIssue[];
}

/** Decodes one device's data (the bytes after its section header) from buf[start]. */
export function decodeDeviceFields(buf: Buffer, desc: VmdescStruct, start: number, opts: DecodeOptions = {}): DecodedDevice {
  const d = new Decoder(buf, start, opts.base ?? 0, opts.maxValues ?? DEFAULT_MAX_VALUES);
  const name = (desc as { name?: unknown }).name;
  const state = d.struct(desc, 'device', 0, typeof name === 'string' ? name : (desc.vmsd_name ?? 'device'));
  return { state, end: d.pos, issues: d.issues };
}

// ---- Rendering ----------------------------------------------------------------------------

export type JsonValue = string | number | boolean | null | JsonValue[] | { [k: string]: JsonValue };

function intJson(v: bigint): number | string {
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString();
}

/** JSON form of one value: integers as numbers (decimal strings beyond 2^53), bytes as hex. */
export function valueToJson(v: DecodedValue): JsonValue {
  switch (v.kind) {
    case 'int': return intJson(v.value);
    case 'bool': return v.value;
    case 'string': return v.value;
    case 'null': return null;
    case 'bytes': return v.bytes.toString('hex');
    case 'struct': return structToJson(v);
  }
}

/**
 * A struct as {field: value}, shaped like analyze-migration.py's state dump: array fields become
 * lists, entries that share a name (split arrays) are merged into one list, subsections appear
 * under their own name after the fields.
 */
export function structToJson(s: DecodedStruct): { [k: string]: JsonValue } {
  const out: { [k: string]: JsonValue } = {};
  const merged = new Set<string>();
  for (const f of s.fields) {
    const vals = f.values.map(valueToJson);
    const prev = out[f.name];
    if (prev === undefined) {
      out[f.name] = f.array ? vals : (vals.length === 1 ? vals[0]! : vals);
      if (f.array) merged.add(f.name);
    } else {
      const list = merged.has(f.name) ? (prev as JsonValue[]) : [prev];
      list.push(...vals);
      out[f.name] = list;
      merged.add(f.name);
    }
  }
  for (const sub of s.subsections) out[sub.name] = structToJson(sub.state);
  return out;
}

function hex(v: bigint, size: number): string {
  const u = v < 0n ? BigInt.asUintN(size * 8, v) : v;
  return `0x${u.toString(16)}`;
}

const MAX_TEXT_BYTES = 32;

export function valueToText(v: DecodedValue): string {
  switch (v.kind) {
    case 'int': return v.signed && v.value < 0n ? `${v.value} (${hex(v.value, v.size)})` : hex(v.value, v.size);
    case 'bool': return String(v.value);
    case 'string': return JSON.stringify(v.value);
    case 'null': return 'nullptr';
    case 'bytes': {
      if (v.size === 0) return '(empty)';
      if (v.bytes.every((b) => b === 0)) return `${v.size} zero bytes`;
      const shown = v.bytes.subarray(0, MAX_TEXT_BYTES).toString('hex').replace(/(..)(?!$)/g, '$1 ');
      return v.size > MAX_TEXT_BYTES ? `${shown} … (${v.size} bytes)` : shown;
    }
    case 'struct': return `{${v.vmsdName ?? ''}}`;
  }
}

/** Scalars of an array on one line, runs of equal values folded as "value ×n". */
function foldScalars(vals: DecodedValue[]): string {
  const parts: string[] = [];
  let i = 0;
  while (i < vals.length) {
    const t = valueToText(vals[i]!);
    let j = i + 1;
    while (j < vals.length && valueToText(vals[j]!) === t) j++;
    parts.push(j - i > 1 ? `${t} ×${j - i}` : t);
    i = j;
  }
  return `[${parts.join(', ')}]`;
}

/** Readable lines, one per scalar field or folded scalar array, nested structs indented. */
export function structToLines(s: DecodedStruct, indent = ''): string[] {
  const lines: string[] = [];
  for (const f of s.fields) {
    const label = f.index !== undefined ? `${f.name}[${f.index}]` : f.name;
    const structs = f.values.every((v) => v.kind === 'struct');
    if (f.values.length === 0) {
      lines.push(`${indent}${label} = []`);
    } else if (!structs) {
      lines.push(`${indent}${label} = ${f.array ? foldScalars(f.values) : valueToText(f.values[0]!)}`);
    } else {
      f.values.forEach((v, i) => {
        lines.push(`${indent}${label}${f.array ? `[${i}]` : ''}: ${(v as DecodedStruct).vmsdName ?? 'struct'}`);
        lines.push(...structToLines(v as DecodedStruct, indent + '  '));
      });
    }
  }
  for (const sub of s.subsections) {
    lines.push(`${indent}subsection ${sub.name} (version ${sub.version}):`);
    lines.push(...structToLines(sub.state, indent + '  '));
  }
  return lines;
}
