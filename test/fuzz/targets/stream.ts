// Main-stream targets: the whole stream (MainStreamParser), its RAM records behind a valid header,
// and the configuration record on its own.

import { ByteQueue } from '../../../src/codec/byte-queue.js';
import { encodeConfiguration, readConfiguration, type Configuration } from '../../../src/codec/configuration.js';
import { TARGET_PAGE_SIZE } from '../../../src/codec/constants.js';
import { NeedMoreData, ProtocolError } from '../../../src/codec/errors.js';
import { MainStreamParser, type MainEvent } from '../../../src/codec/main-stream-parser.js';
import { chunkPlan, chunks } from '../mutators.js';
import type { Rng } from '../rng.js';
import { BLOCK_SIZE_MUTATOR, firstDevice, formatDictionary, mainStreams, mainStructure, mergeRanges, unique } from '../seeds.js';
import { Violation, check, messageTemplate, type Seed, type Target } from '../target.js';

const PAGE = TARGET_PAGE_SIZE;

export const isProtocolError = (e: unknown): boolean => e instanceof ProtocolError;
export const protocolSignature = (e: unknown): string => (e instanceof ProtocolError ? `${e.code}:${messageTemplate(e.message)}` : 'other');

interface MainRun {
  /** Event summary, comparable across chunkings. */
  events: string[];
  error?: ProtocolError;
  kinds: string;
  state: string;
}

/** A checksum of page data that does not depend on how it is split into views. */
function byteSum(views: readonly Buffer[]): number {
  let s = 0;
  let pos = 0;
  for (const v of views) {
    for (let i = 0; i < v.length; i++) if ((pos + i) % 61 === 0) s = (s + v[i]! * (pos + i + 1)) >>> 0;
    pos += v.length;
  }
  return s;
}

/**
 * Pushes `input` cut at `plan` and pulls every event, checking what each one claims: pages inside
 * their block, page data exactly one page, no more output than input, no event without progress.
 */
export function runMainParser(input: Buffer, plan: readonly number[]): MainRun {
  const p = new MainStreamParser();
  const events: string[] = [];
  const kinds: string[] = [];
  let deviceBytes = 0;
  let outBytes = 0;
  let n = 0;
  const note = (k: string): void => {
    if (kinds[kinds.length - 1] !== k && kinds.length < 64) kinds.push(k);
  };
  const onEvent = (ev: MainEvent): void => {
    check(++n <= input.length + 16, `the parser returned ${n} events from ${input.length} bytes`);
    note(ev.type);
    switch (ev.type) {
      case 'ram-page':
      case 'ram-zero': {
        const b = p.ramBlocks.get(ev.block);
        check(b !== undefined, `${ev.type} for block "${ev.block}", which the MEM_SIZE list never named`);
        check(Number.isSafeInteger(ev.offset) && ev.offset % PAGE === 0 && ev.offset >= 0 && ev.offset + PAGE <= b.usedLength,
          `${ev.type} at offset ${ev.offset} of block "${ev.block}" (used_length ${b.usedLength}): outside the block`);
        if (ev.type === 'ram-page') {
          const len = ev.data.reduce((s, d) => s + d.length, 0);
          check(len === PAGE, `ram-page carries ${len} bytes`);
          outBytes += len;
          events.push(`page ${ev.block} ${ev.offset} ${ev.continued} ${byteSum(ev.data)}`);
        } else events.push(`zero ${ev.block} ${ev.offset} ${ev.continued}`);
        return;
      }
      case 'ram-block': {
        const b = ev.block;
        check(Number.isSafeInteger(b.usedLength) && b.usedLength % PAGE === 0 && b.name.length <= 255, `ram-block ${JSON.stringify(b)}`);
        if (b.mappedRam) check(b.mappedRam.pagesOffset % PAGE === 0 && b.mappedRam.pageSize === PAGE, 'mapped-ram header accepted with a bad page size or alignment');
        events.push(`block ${b.name} ${b.usedLength} ${b.mrAddr ?? ''} ${JSON.stringify(b.mappedRam ?? null)}`);
        return;
      }
      case 'device-state': {
        const len = ev.data.reduce((s, d) => s + d.length, 0);
        check(len > 0, 'empty device-state event');
        deviceBytes += len;
        outBytes += len;
        return;
      }
      case 'command':
        check(ev.payload.length <= 0xffff, 'command payload longer than its be16 length');
        outBytes += ev.payload.length;
        events.push(`cmd ${ev.cmd} ${ev.payload.toString('hex')}`);
        return;
      case 'configuration':
        events.push(`config ${JSON.stringify({ ...ev.config, uuid: ev.config.uuid?.toString('hex') })}`);
        return;
      default:
        events.push(JSON.stringify(ev));
    }
  };
  let error: ProtocolError | undefined;
  try {
    for (const c of chunks(input, plan)) {
      p.push(c);
      for (let ev = p.next(); ev !== null; ev = p.next()) onEvent(ev);
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    error = e;
  }
  check(outBytes <= input.length, `events carry ${outBytes} bytes from ${input.length} input bytes`);
  if (deviceBytes > 0) events.push(`device ${deviceBytes}`);
  const state = error ? `E:${error.code}` : p.inDeviceState ? 'device-state' : p.atBoundary ? 'boundary' : 'partial';
  const r: MainRun = { events, kinds: kinds.join(','), state };
  if (error) r.error = error;
  return r;
}

/** Whole input, then another chunking: same events, same outcome. */
export function runBoth(input: Buffer, rng: Rng, focus?: Seed['focus']): string {
  const whole = runMainParser(input, [input.length]);
  const plan = chunkPlan(input.length, rng, focus);
  const split = runMainParser(input, plan);
  check(split.state === whole.state && split.events.length === whole.events.length && split.events.every((e, i) => e === whole.events[i]),
    () => `chunking changes the result: whole → ${whole.state} after ${whole.events.length} events, chunked (${plan.length} pieces) → ${split.state} after ${split.events.length} events; first difference: ${JSON.stringify(whole.events.find((e, i) => e !== split.events[i]))} vs ${JSON.stringify(split.events.find((e, i) => e !== whole.events[i]))}`);
  if (whole.error) throw whole.error;
  return `${whole.kinds}|${whole.state}`;
}

export const mainStreamTarget: Target = {
  name: 'main-stream',
  what: 'MainStreamParser over whole main streams (header, configuration, sections, RAM records, commands, footers, mapped-ram block headers, up to the device state), whole and re-chunked: same events, pages inside their blocks',
  seeds: () =>
    unique(mainStreams().map(({ s, data }) => {
      const cut = data.subarray(0, firstDevice(data) + 64);
      return { name: s.label, data: cut, focus: mainStructure(cut) };
    })),
  dictionary: formatDictionary,
  mutators: [BLOCK_SIZE_MUTATOR],
  run: (input, rng) => runBoth(input, rng),
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 1 << 20,
};

// ---- RAM records behind a valid header ------------------------------------------------------

/** Headers + configurations as QEMU writes them; input[0] picks one. */
function prefixes(): Buffer[] {
  const streams = mainStreams();
  const cfg = (name: string, qemu = '10.0'): Buffer => {
    const m = streams.find((x) => x.s.entry.scenario === name && x.s.entry.qemu === qemu)!;
    return m.data.subarray(0, m.s.check.main.offsets.ram_START!);
  };
  const head = cfg('multifd-2ch').subarray(0, 8);
  const ignoreShared: Configuration = { machine: 'pc-i440fx-10.0', capabilities: ['x-ignore-shared'] };
  return [
    cfg('multifd-2ch'),
    cfg('mapped-ram-file'),
    cfg('multifd-2ch-uuid', '11.1'),
    Buffer.concat([head, encodeConfiguration(ignoreShared)]),
  ];
}

let prefixCache: Buffer[] | undefined;

export const ramRecordsTarget: Target = {
  name: 'ram-records',
  what: 'RAM sections (START/PART/END, MEM_SIZE block list, ZERO/PAGE/CONTINUE, FLUSH, EOS, footers, mapped-ram headers) behind a fixed valid header and configuration (input[0] picks plain, mapped-ram, uuid or x-ignore-shared); checks as main-stream',
  seeds: () => {
    const pre = prefixes();
    return unique(mainStreams().map(({ s, data }) => {
      const sel = s.entry.scenario === 'mapped-ram-file' ? 1 : s.entry.scenario === 'multifd-2ch-uuid' && s.entry.qemu === '11.1' ? 2 : 0;
      const start = s.check.main.offsets.ram_START!;
      const body = data.subarray(start, firstDevice(data) + 16);
      const whole = Buffer.concat([pre[sel]!, body]);
      const focus = mainStructure(whole)
        .map(([a, b]) => [a - pre[sel]!.length + 1, b - pre[sel]!.length + 1] as const)
        .filter(([, b]) => b > 1);
      return { name: s.label, data: Buffer.concat([Buffer.from([sel]), body]), focus: mergeRanges([[0, 1], ...focus]) };
    }));
  },
  dictionary: formatDictionary,
  setup() {
    // Built from the captures before the first input runs, not inside it (its allocations would count).
    prefixCache ??= prefixes();
  },
  run(input, rng) {
    prefixCache ??= prefixes();
    if (input.length === 0) return 'empty';
    const pre = prefixCache[input[0]! % prefixCache.length]!;
    return runBoth(Buffer.concat([pre, input.subarray(1)]), rng);
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 1 << 20,
};

// ---- configuration --------------------------------------------------------------------------

function readConfig(input: Buffer, plan: readonly number[]): { config?: Configuration; used: number; need?: true } {
  const q = new ByteQueue();
  for (const c of chunks(input, plan)) q.push(c);
  const cur = q.cursor();
  try {
    const config = readConfiguration(cur);
    return { config, used: cur.pos };
  } catch (e) {
    if (e instanceof NeedMoreData) return { used: cur.pos, need: true };
    throw e;
  }
}

export const configurationTarget: Target = {
  name: 'configuration',
  what: 'readConfiguration (record 0x07, machine name, target-page-bits / capabilities / uuid subsections) from a ByteQueue of re-chunked input; bounds on what it returns, and decode(encode(config)) == config',
  seeds: () =>
    unique(mainStreams().map(({ s, data }) => {
      const end = s.check.main.offsets.ram_START!;
      return { name: s.label, data: data.subarray(8, end + 1), focus: [[0, end + 1 - 8]] };
    })),
  dictionary: formatDictionary,
  run(input, rng) {
    const r = readConfig(input, chunkPlan(input.length, rng));
    if (r.need || !r.config) return 'need-more';
    const c = r.config;
    check(r.used <= input.length, 'read past the input');
    check(Buffer.byteLength(c.machine, 'latin1') <= 256, 'machine name longer than 256');
    check(c.capabilities.length <= 64 * 4, 'too many capabilities');
    check(c.uuid === undefined || c.uuid.length === 16, 'uuid not 16 bytes');
    const enc = encodeConfiguration(c);
    let again: ReturnType<typeof readConfig>;
    try {
      again = readConfig(Buffer.concat([enc, Buffer.from([0x01])]), [enc.length + 1]);
    } catch (e) {
      throw new Violation(`re-encoded configuration does not decode: ${(e as Error).message} (${JSON.stringify(c)})`);
    }
    check(again.config !== undefined && JSON.stringify({ ...again.config, uuid: again.config.uuid?.toString('hex') }) === JSON.stringify({ ...c, uuid: c.uuid?.toString('hex') }),
      () => `re-encoded configuration decodes differently: ${JSON.stringify(c)} → ${JSON.stringify(again.config)}`);
    return `ok caps=${Math.min(c.capabilities.length, 3)} uuid=${c.uuid !== undefined} bits=${c.targetPageBits !== undefined}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 64 * 1024,
};
