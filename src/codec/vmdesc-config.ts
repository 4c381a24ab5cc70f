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

/** JSON in QEMU's json-writer layout. */
export function encodeQemuJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(encodeQemuJson).join(', ')}]`;
  if (v !== null && typeof v === 'object') {
    return `{${Object.entries(v).filter(([, x]) => x !== undefined).map(([k, x]) => `${JSON.stringify(k)}: ${encodeQemuJson(x)}`).join(', ')}}`;
  }
  return JSON.stringify(v) ?? 'null';
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
  const rank = (s: VmdescStruct): number => [SUB_PAGE_BITS, SUB_CAPS, SUB_UUID].indexOf(s.vmsd_name ?? '');
  const next = subs.filter((s) => s?.vmsd_name !== SUB_CAPS);
  if (want) next.push(want);
  next.sort((a, b) => rank(a) - rank(b));
  const { subsections: _drop, ...rest } = entry;
  const configuration: VmdescStruct = next.length > 0 ? { ...rest, subsections: next } : rest;
  return { ...vmdesc, configuration };
}
