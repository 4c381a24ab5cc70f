// The configuration record (type 0x07) that follows the stream header (docs/protocol.md §1.4).

import { SectionType, VALIDATED_CAPABILITIES } from './constants.js';
import type { Cursor } from './byte-queue.js';
import { ProtocolError } from './errors.js';

export interface Configuration {
  /** Resolved machine type name, e.g. "pc-i440fx-10.0". */
  machine: string;
  /** Only present when the source's target page bits exceed the minimum (never on x86). */
  targetPageBits?: number;
  /** Validated capabilities that are on, in wire order. */
  capabilities: string[];
  /** Source -uuid, present only with validate-uuid on. */
  uuid?: Buffer;
}

/** Our cap (QEMU reads any u32 length): machine type names are ~20 bytes ("pc-q35-10.0"). */
export const MAX_MACHINE_NAME = 256;
/** Our cap (QEMU has about 20 migration capabilities, a handful of them validated). */
export const MAX_CAPABILITIES = 64;
const SUB_PAGE_BITS = 'configuration/target-page-bits';
const SUB_CAPS = 'configuration/capabilities';
const SUB_UUID = 'configuration/uuid';

/** Parses from the 0x07 byte on. */
export function readConfiguration(c: Cursor): Configuration {
  const start = c.streamOffset;
  if (c.u8() !== SectionType.CONFIGURATION) {
    throw new ProtocolError('BAD_RECORD', 'expected the configuration record (0x07) after the stream header', { offset: start });
  }
  const len = c.u32();
  if (len > MAX_MACHINE_NAME) {
    throw new ProtocolError('LIMIT_EXCEEDED', `machine name length ${len} exceeds ${MAX_MACHINE_NAME}`, { offset: start + 1 });
  }
  const machine = c.take(len).toString('latin1');
  const config: Configuration = { machine, capabilities: [] };
  // Subsections are recognised by peeking: 0x05 followed by a name that starts with "configuration".
  for (;;) {
    if (c.peekU8() !== SectionType.SUBSECTION) break;
    const nameLen = c.peekU8(1);
    const prefix = 'configuration';
    if (nameLen < prefix.length) break;
    let matches = true;
    for (let i = 0; i < prefix.length; i++) {
      if (c.peekU8(2 + i) !== prefix.charCodeAt(i)) { matches = false; break; }
    }
    if (!matches) break;
    const subOffset = c.streamOffset;
    c.u8();
    const name = c.countedString();
    const version = c.u32();
    if (version !== 1) {
      throw new ProtocolError('BAD_VERSION', `configuration subsection ${name} has version ${version} (supported: 1)`, { offset: subOffset });
    }
    if (name === SUB_PAGE_BITS) {
      config.targetPageBits = c.u32();
    } else if (name === SUB_CAPS) {
      const count = c.u32();
      if (count > MAX_CAPABILITIES) {
        throw new ProtocolError('LIMIT_EXCEEDED', `configuration lists ${count} capabilities (max ${MAX_CAPABILITIES})`, { offset: subOffset });
      }
      for (let i = 0; i < count; i++) config.capabilities.push(c.countedString());
    } else if (name === SUB_UUID) {
      config.uuid = Buffer.from(c.take(16));
    } else {
      throw new ProtocolError('UNSUPPORTED', `unknown configuration subsection "${name}"`, { offset: subOffset });
    }
  }
  return config;
}

function subsectionHeader(name: string): Buffer {
  const n = Buffer.from(name, 'latin1');
  const b = Buffer.alloc(2 + n.length + 4);
  b[0] = SectionType.SUBSECTION;
  b[1] = n.length;
  n.copy(b, 2);
  b.writeUInt32BE(1, 2 + n.length);
  return b;
}

export function encodeConfiguration(config: Configuration): Buffer {
  const parts: Buffer[] = [];
  const name = Buffer.from(config.machine, 'latin1');
  if (name.length > MAX_MACHINE_NAME) throw new RangeError(`machine name is ${name.length} bytes (at most ${MAX_MACHINE_NAME})`);
  const head = Buffer.alloc(5);
  head[0] = SectionType.CONFIGURATION;
  head.writeUInt32BE(name.length, 1);
  parts.push(head, name);
  if (config.targetPageBits !== undefined) {
    const v = Buffer.alloc(4);
    v.writeUInt32BE(config.targetPageBits);
    parts.push(subsectionHeader(SUB_PAGE_BITS), v);
  }
  if (config.capabilities.length > 0) {
    const count = Buffer.alloc(4);
    count.writeUInt32BE(config.capabilities.length);
    parts.push(subsectionHeader(SUB_CAPS), count);
    for (const cap of config.capabilities) {
      const s = Buffer.from(cap, 'latin1');
      if (s.length > 255) throw new RangeError(`capability name is ${s.length} bytes (at most 255)`);
      parts.push(Buffer.from([s.length]), s);
    }
  }
  if (config.uuid !== undefined) parts.push(subsectionHeader(SUB_UUID), config.uuid);
  return Buffer.concat(parts);
}

/** Adds or removes a validated capability, keeping QAPI order (the order QEMU writes them in). */
export function withCapability(config: Configuration, cap: (typeof VALIDATED_CAPABILITIES)[number], on: boolean): Configuration {
  const set = new Set(config.capabilities);
  if (on) set.add(cap);
  else set.delete(cap);
  const known = VALIDATED_CAPABILITIES.filter((c) => set.has(c));
  const unknown = [...set].filter((c) => !(VALIDATED_CAPABILITIES as readonly string[]).includes(c));
  return { ...config, capabilities: [...known, ...unknown] };
}
