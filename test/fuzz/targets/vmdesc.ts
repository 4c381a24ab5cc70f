// Device state and its VMDESCRIPTION: finding the trailing vmdesc, walking the device sections with
// it (what receive/restore use to prove a stream complete), decoding every device's fields (what
// inspect --devices and verify use), and DeviceStateTail fed in pieces as a socket delivers them.

import { performance } from 'node:perf_hooks';
import { ProtocolError } from '../../../src/codec/errors.js';
import { DeviceStateTail } from '../../../src/codec/device-state-tail.js';
import { decodeDeviceFields, structToJson, structToLines } from '../../../src/codec/device-fields.js';
import { findTrailingVmdesc, walkDeviceState, type VmdescDevice } from '../../../src/codec/vmdesc.js';
import { encodeQemuJson, vmdescForConfiguration } from '../../../src/codec/vmdesc-config.js';
import { JSON_MUTATOR, chunkPlan, chunks, findVmdescRecord, stringifyDeep } from '../mutators.js';
import { firstDevice, formatDictionary, mainStreams, mergeRanges, unique } from '../seeds.js';
import { Violation, check, type Target } from '../target.js';
import { isProtocolError, protocolSignature } from './stream.js';

type Result = 'complete' | 'incomplete' | `E:${string}`;

function oneShot(input: Buffer): Result {
  const found = findTrailingVmdesc(input);
  if (!found) return 'incomplete';
  try {
    const l = walkDeviceState(input, found.vmdesc, 0);
    return l.vmdescOffset === found.vmdescOffset && l.end === input.length ? 'complete' : 'incomplete';
  } catch (e) {
    if (e instanceof ProtocolError) return `E:${e.code}`;
    throw e;
  }
}

function feedTail(input: Buffer, plan: readonly number[]): { verdict: Result; at: number; firstComplete: number } {
  const tail = new DeviceStateTail();
  let verdict: Result = 'incomplete';
  let firstComplete = -1;
  let at = 0;
  try {
    for (const c of chunks(input, plan)) {
      at += c.length;
      verdict = tail.append([c]) ? 'complete' : 'incomplete';
      if (verdict === 'complete' && firstComplete < 0) firstComplete = at;
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    verdict = `E:${e.code}`;
  }
  return { verdict, at, firstComplete };
}

export const vmdescTarget: Target = {
  name: 'vmdesc',
  what: 'device state + VMDESCRIPTION (byte and JSON-structure mutations): findTrailingVmdesc, walkDeviceState, decodeDeviceFields + rendering of every walked section (must end at the section footer the walk found), vmdescForConfiguration + encodeQemuJson (convert), and DeviceStateTail.append in random pieces and cut after every "}" (complete exactly when the whole buffer is, never before its end)',
  seeds: () =>
    unique(mainStreams().map(({ s, data }) => {
      const dev = data.subarray(firstDevice(data));
      const v = findVmdescRecord(dev) ?? dev.length;
      return { name: s.label, data: dev, focus: mergeRanges([[0, v + 5]]) };
    })),
  dictionary: formatDictionary,
  mutators: [JSON_MUTATOR],
  run(input, rng) {
    const whole = oneShot(input);
    // As receive and relay feed it (views of socket chunks, one append per chunk): in random
    // pieces, and cut right after every "}" (wherever a VMDESCRIPTION could end).
    const braces: number[] = [];
    for (let p = input.indexOf(0x7d); p >= 0; p = input.indexOf(0x7d, p + 1)) braces.push(p + 1);
    for (const [how, plan] of [['in random pieces', chunkPlan(input.length, rng)], ['cut after every "}"', [...braces, input.length]]] as const) {
      const r = feedTail(input, plan);
      // The tail never throws on a description that does not walk (the real one may still come);
      // it is just not complete, which is how a broken stream ends.
      check(r.verdict === whole || (whole.startsWith('E:') && r.verdict === 'incomplete'),
        `DeviceStateTail fed ${how} says ${r.verdict} after ${r.at} of ${input.length} bytes, the whole buffer says ${whole}`);
      // Complete early only where the bytes so far are a complete device state by themselves
      // (receive then waits for the stream to go quiet before it commits).
      check(r.firstComplete < 0 || r.firstComplete === input.length || oneShot(input.subarray(0, r.firstComplete)) === 'complete',
        `DeviceStateTail fed ${how} reported the state complete after ${r.firstComplete} of ${input.length} bytes, where they are not`);
    }

    const found = findTrailingVmdesc(input);
    if (!found) return `no-vmdesc ${whole}`;
    // What convert does with the description: its configuration entry follows a capability change.
    for (const capabilities of [[], ['mapped-ram'], ['x-ignore-shared', 'mapped-ram']]) {
      const next = vmdescForConfiguration(found.vmdesc, { machine: 'pc-i440fx-10.0', capabilities });
      if (next) JSON.parse(encodeQemuJson(next));
    }
    const layout = walkDeviceState(input, found.vmdesc, 0);
    const byKey = new Map<string, VmdescDevice>();
    for (const d of found.vmdesc.devices) byKey.set(`${d.name}\0${d.instance_id}`, d);
    let issues = 0;
    for (const sec of layout.sections) {
      const desc = byKey.get(`${sec.idstr}\0${sec.instanceId}`)!;
      const start = sec.offset + 14 + Buffer.byteLength(sec.idstr, 'latin1');
      const footer = sec.offset + sec.length - 5;
      let d: ReturnType<typeof decodeDeviceFields>;
      try {
        d = decodeDeviceFields(input, desc, start);
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
        // The decoder caps what it builds (decoded values, values that occupy no bytes); the walk
        // builds nothing and has no such cap. Any other refusal is a disagreement.
        if (/^more than \d+ (decoded )?values/.test(e.message)) throw e;
        throw new Violation(`decodeDeviceFields refuses section "${sec.idstr}" that walkDeviceState accepted: ${e.code} ${e.message}`);
      }
      check(d.end === footer, `section "${sec.idstr}": walkDeviceState ends its data at ${footer}, decodeDeviceFields at ${d.end}`);
      issues += d.issues.length;
      JSON.stringify(structToJson(d.state));
      structToLines(d.state);
    }
    return `${whole} sections=${Math.min(layout.sections.length, 3)} vmdesc=${layout.vmdescOffset !== undefined} issues=${issues > 0}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 1 << 20,
  shrink: shrinkDeviceState,
};

/** The device state re-framed: sections, EOF, VMDESCRIPTION of `vmdesc`. */
function reframe(sections: Buffer[], vmdesc: unknown): Buffer {
  const json = Buffer.from(stringifyDeep(vmdesc, true), 'utf8');
  const head = Buffer.alloc(6);
  head[0] = 0x00;
  head[1] = 0x06;
  head.writeUInt32BE(json.length, 2);
  return Buffer.concat([...sections, head, json]);
}

/**
 * Drops device sections together with their VMDESCRIPTION entries, then the entries no section
 * uses and the vmdesc's other keys, while the failure stays: what is left is the one section that
 * shows it and the description of it.
 */
async function shrinkDeviceState(input: Buffer, fails: (b: Buffer) => Promise<boolean>, deadline: number): Promise<Buffer> {
  const found = findTrailingVmdesc(input);
  if (!found) return input;
  let layout;
  try {
    layout = walkDeviceState(input, found.vmdesc, 0);
  } catch {
    return input;
  }
  if (layout.vmdescOffset !== found.vmdescOffset || layout.eofOffset + 1 !== found.vmdescOffset) return input;
  let sections = layout.sections.map((x) => ({ key: `${x.idstr}\0${x.instanceId}`, bytes: input.subarray(x.offset, x.offset + x.length) }));
  let vmdesc = JSON.parse(stringifyDeep(found.vmdesc, false)) as Record<string, unknown> & { devices: VmdescDevice[] };
  const build = (): Buffer => reframe(sections.map((x) => x.bytes), vmdesc);
  let cur = build();
  if (!(await fails(cur))) return input;
  const keyOf = (d: VmdescDevice): string => `${d.name}\0${d.instance_id}`;
  for (let i = sections.length - 1; i >= 0 && performance.now() < deadline; i--) {
    const keep = sections.filter((_, j) => j !== i);
    const used = new Set(keep.map((x) => x.key));
    const next = { ...vmdesc, devices: vmdesc.devices.filter((d) => used.has(keyOf(d)) || !sections.some((x) => x.key === keyOf(d))) };
    const saved = { sections, vmdesc };
    sections = keep;
    vmdesc = next;
    const cand = build();
    if (await fails(cand)) cur = cand;
    else ({ sections, vmdesc } = saved);
  }
  for (const drop of ['unused-devices', 'configuration', 'page_size']) {
    if (performance.now() >= deadline) break;
    const used = new Set(sections.map((x) => x.key));
    const next = drop === 'unused-devices' ? { ...vmdesc, devices: vmdesc.devices.filter((d) => used.has(keyOf(d))) } : Object.fromEntries(Object.entries(vmdesc).filter(([k]) => k !== drop)) as typeof vmdesc;
    const saved = vmdesc;
    vmdesc = next;
    const cand = build();
    if (await fails(cand)) cur = cand;
    else vmdesc = saved;
  }
  return cur;
}
