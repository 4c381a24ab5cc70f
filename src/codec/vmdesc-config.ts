// The VMDESCRIPTION's "configuration" entry describes the configuration record's bytes (machine
// name, capability list). A file converted between mapped-ram and stream gains or loses the
// mapped-ram capability, so the entry must follow, or tools that parse the record with it
// (analyze-migration.py) misread the file. QEMU writes the JSON with ", " and ": " separators;
// re-encoding an unchanged description reproduces QEMU's bytes exactly.

import type { Configuration } from './configuration.js';
import type { Vmdesc, VmdescField, VmdescStruct } from './vmdesc.js';

const SUB_PAGE_BITS = 'configuration/target-page-bits';
const SUB_CAPS = 'configuration/capabilities';
const SUB_UUID = 'configuration/uuid';

/**
 * JSON in QEMU's json-writer layout. Iterative: the VMDESCRIPTION comes from the file, and
 * JSON.parse accepts nesting far deeper than a recursive encoder's stack (a few thousand levels
 * made convert die with a RangeError).
 */
export function encodeQemuJson(v: unknown): string {
  const out: string[] = [];
  const stack: { items: (readonly [string | undefined, unknown])[]; i: number; close: string }[] = [];
  const open = (x: unknown): void => {
    if (Array.isArray(x)) {
      out.push('[');
      stack.push({ items: x.map((e) => [undefined, e] as const), i: 0, close: ']' });
    } else if (x !== null && typeof x === 'object') {
      out.push('{');
      stack.push({ items: Object.entries(x).filter(([, e]) => e !== undefined), i: 0, close: '}' });
    } else {
      out.push(JSON.stringify(x) ?? 'null');
    }
  };
  open(v);
  while (stack.length > 0) {
    const f = stack[stack.length - 1]!;
    if (f.i === f.items.length) {
      out.push(f.close);
      stack.pop();
      continue;
    }
    if (f.i > 0) out.push(', ');
    const [k, x] = f.items[f.i++]!;
    if (k !== undefined) out.push(`${JSON.stringify(k)}: `);
    open(x);
  }
  return out.join('');
}

function capabilitiesEntry(caps: readonly string[]): VmdescStruct {
  // QEMU folds the array into one entry sized by its first element (vmsd_desc_field_start).
  const list: VmdescField = { name: 'capabilities', ...(caps.length > 1 ? { array_len: caps.length } : {}), type: 'capability', size: 1 + Buffer.byteLength(caps[0]!, 'latin1') };
  return { vmsd_name: SUB_CAPS, version: 1, fields: [{ name: 'caps_count', type: 'uint32', size: 4 }, list] };
}

/**
 * The vmdesc with its configuration entry describing `config`'s capability list, or undefined
 * when it already does (or has no configuration entry to keep in step).
 */
export function vmdescForConfiguration(vmdesc: Vmdesc, config: Configuration): Vmdesc | undefined {
  const entry = vmdesc.configuration as VmdescStruct | undefined;
  if (!entry || typeof entry !== 'object' || Array.isArray(entry)) return undefined;
  const subs = Array.isArray(entry.subsections) ? entry.subsections : [];
  const current = subs.find((s) => s?.vmsd_name === SUB_CAPS);
  const want = config.capabilities.length > 0 ? capabilitiesEntry(config.capabilities) : undefined;
  if (encodeQemuJson(current) === encodeQemuJson(want)) return undefined;
  // Entries come from the file: one that is not an object (null, a number) must not crash the sort.
  const rank = (s: unknown): number => [SUB_PAGE_BITS, SUB_CAPS, SUB_UUID].indexOf(typeof s === 'object' && s !== null ? ((s as VmdescStruct).vmsd_name ?? '') : '');
  const next = subs.filter((s) => s?.vmsd_name !== SUB_CAPS);
  if (want) next.push(want);
  next.sort((a, b) => rank(a) - rank(b));
  const { subsections: _drop, ...rest } = entry;
  const configuration: VmdescStruct = next.length > 0 ? { ...rest, subsections: next } : rest;
  return { ...vmdesc, configuration };
}
