// Multifd targets: init messages, packet headers, whole channels through the incremental parser,
// the receiver writing pages into a recording store, and the zlib/zstd payload decoders.

import { MULTIFD_INIT_SIZE, MULTIFD_PACKET_BYTES, MULTIFD_PACKET_HEADER_SIZE, MULTIFD_PAGES_PER_PACKET, MULTIFD_MAX_COMPRESSED_PAYLOAD, MultifdFlag, TARGET_PAGE_SIZE } from '../../../src/codec/constants.js';
import { ProtocolError } from '../../../src/codec/errors.js';
import { MultifdChannelParser, type ChannelEvent } from '../../../src/codec/multifd-channel-parser.js';
import { decodeMultifdInit, encodeMultifdInit } from '../../../src/codec/multifd-init.js';
import { decodeMultifdPacketHeader, encodeMultifdPacketHeader, payloadSize, validatePacketPages, type MultifdPacketHeader } from '../../../src/codec/multifd-packet.js';
import { ChannelError, MAX_MULTIFD_CHANNELS, MultifdReceiver } from '../../../src/engine/multifd-receiver.js';
import type { PageStore } from '../../../src/engine/page-store.js';
import { getMethod } from '../../../src/engine/methods/registry.js';
import { chunkPlan, chunks } from '../mutators.js';
import type { Rng } from '../rng.js';
import { captureBlocks, channelParser, channelSeeds, formatDictionary, unique } from '../seeds.js';
import { Violation, check, messageTemplate, type Target } from '../target.js';
import { compressionOf } from '../../helpers/fixtures.js';
import { isProtocolError, protocolSignature } from './stream.js';

const PAGE = TARGET_PAGE_SIZE;
const BLOCKS = captureBlocks();

// ---- init -----------------------------------------------------------------------------------

export const multifdInitTarget: Target = {
  name: 'multifd-init',
  what: 'decodeMultifdInit and the channel parser on the first bytes of a channel (init message, start of the first packet); the parser\'s init equals the decoder\'s, and decode(encode(init)) == init',
  seeds: () => unique(channelSeeds().map((s) => ({ name: s.name, data: s.data.subarray(0, MULTIFD_INIT_SIZE + 48), focus: [[0, MULTIFD_INIT_SIZE + 48]] }))),
  dictionary: formatDictionary,
  run(input, rng) {
    let direct: ReturnType<typeof decodeMultifdInit> | undefined;
    let directErr: unknown;
    try {
      direct = decodeMultifdInit(input);
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
      directErr = e;
    }
    const p = channelParser(undefined);
    let init: ReturnType<typeof decodeMultifdInit> | undefined;
    try {
      for (const c of chunks(input, chunkPlan(input.length, rng))) {
        p.push(c);
        for (let ev = p.next(); ev !== null; ev = p.next()) if (ev.type === 'init') init = ev.init;
      }
    } catch (e) {
      if (!(e instanceof ProtocolError)) throw e;
    }
    if (direct) {
      check(init !== undefined && init.id === direct.id && init.uuid.equals(direct.uuid), 'the channel parser and decodeMultifdInit disagree on the init message');
      check(direct.uuid.length === 16 && direct.id >= 0 && direct.id <= 255, 'init fields out of range');
      const again = decodeMultifdInit(encodeMultifdInit(direct.id, direct.uuid));
      check(again.id === direct.id && again.uuid.equals(direct.uuid), 'init does not survive encode/decode');
      return `init id=${direct.id > 3 ? 'big' : direct.id}`;
    }
    check(init === undefined, 'the channel parser accepted an init message decodeMultifdInit refuses');
    throw directErr;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 4096,
};

// ---- packet header --------------------------------------------------------------------------

const COMPRESSIONS = [undefined, MultifdFlag.NOCOMP, MultifdFlag.ZLIB, MultifdFlag.ZSTD] as const;

function checkHeader(h: MultifdPacketHeader, expected: number | undefined): string {
  check(h.pagesAlloc <= MULTIFD_PAGES_PER_PACKET && h.normalPages + h.zeroPages <= h.pagesAlloc, `accepted counts pages_alloc ${h.pagesAlloc} normal ${h.normalPages} zero ${h.zeroPages}`);
  check(h.offsets.length === h.normalPages + h.zeroPages, 'offsets list length differs from the page counts');
  const comp = h.flags & MultifdFlag.COMPRESSION_MASK;
  if (expected !== undefined && h.normalPages + h.zeroPages > 0) check(comp === expected, 'accepted a packet of another compression');
  const size = payloadSize(h);
  check(size <= (comp === MultifdFlag.NOCOMP ? MULTIFD_PACKET_BYTES : MULTIFD_MAX_COMPRESSED_PAYLOAD), `payload size ${size} accepted`);
  check(Buffer.byteLength(h.ramblock, 'latin1') <= 256, 'ramblock longer than its field');
  const block = BLOCKS.get(h.ramblock);
  let valid = true;
  try {
    validatePacketPages(h, block?.usedLength);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    valid = false;
  }
  if (valid && h.normalPages + h.zeroPages > 0) {
    for (const off of h.offsets) {
      check(block !== undefined && Number.isSafeInteger(off) && off >= 0 && off % PAGE === 0 && off + PAGE <= block.usedLength,
        `validatePacketPages passed offset ${off} of block "${h.ramblock}" (used_length ${block?.usedLength})`);
    }
  }
  if (Buffer.byteLength(h.ramblock, 'latin1') < 256) {
    const again = decodeMultifdPacketHeader(encodeMultifdPacketHeader({ ...h, offsets: h.offsets }), expected);
    check(JSON.stringify({ ...again, packetNum: String(again.packetNum), offsets: [...again.offsets] }) === JSON.stringify({ ...h, packetNum: String(h.packetNum), offsets: [...h.offsets] }),
      'packet header does not survive encode/decode');
  }
  return `${h.flags & 1 ? 'sync' : 'data'} ${comp} n${Math.min(h.normalPages, 2)} z${Math.min(h.zeroPages, 2)} ${valid ? 'valid' : 'invalid'}`;
}

export const multifdPacketTarget: Target = {
  name: 'multifd-packet',
  what: 'decodeMultifdPacketHeader with each expected compression (auto, none, zlib, zstd) and validatePacketPages against the captures\' block table: counts and sizes bounded, every accepted page offset aligned and inside its block, header survives encode/decode',
  seeds: () => {
    const out = new Map<string, Buffer>();
    for (const s of channelSeeds()) {
      const p = channelParser(undefined);
      p.push(s.data);
      let at = MULTIFD_INIT_SIZE;
      for (let ev: ChannelEvent | null = p.next(); ev !== null; ev = p.next()) {
        if (ev.type !== 'packet') continue;
        const h = s.data.subarray(at, at + MULTIFD_PACKET_HEADER_SIZE);
        const key = `${h.readUInt32BE(8)}/${Math.sign(h.readUInt32BE(16))}/${Math.sign(h.readUInt32BE(32))}/${s.name.split('/')[1]}`;
        if (!out.has(key)) out.set(key, Buffer.from(h));
        at += ev.wireBytes;
      }
    }
    return [...out].map(([k, data]) => ({ name: k, data, focus: [[0, 64 + 16], [320, 320 + 8 * 130]] }));
  },
  dictionary: formatDictionary,
  run(input) {
    const sigs: string[] = [];
    let firstErr: unknown;
    for (const exp of COMPRESSIONS) {
      try {
        sigs.push(checkHeader(decodeMultifdPacketHeader(input, exp), exp));
      } catch (e) {
        if (!(e instanceof ProtocolError)) throw e;
        firstErr ??= e;
        sigs.push(`E:${e.code}`);
      }
    }
    if (sigs.every((s) => s.startsWith('E:'))) throw firstErr;
    return sigs.join('|');
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 4096,
};

// ---- whole channel --------------------------------------------------------------------------

interface ChannelRun {
  events: string[];
  error?: ProtocolError;
  state: string;
}

function runChannelParser(input: Buffer, plan: readonly number[], expected: number | undefined): ChannelRun {
  const p = channelParser(expected);
  const events: string[] = [];
  let bytes = 0;
  let error: ProtocolError | undefined;
  try {
    for (const c of chunks(input, plan)) {
      p.push(c);
      for (let ev = p.next(); ev !== null; ev = p.next()) {
        check(events.length <= input.length, 'more events than input bytes');
        if (ev.type === 'init') {
          check(events.length === 0, 'a second init event');
          bytes += MULTIFD_INIT_SIZE;
          events.push(`init ${ev.init.id} ${ev.init.uuid.toString('hex')}`);
          continue;
        }
        check(events.length > 0, 'packet before init');
        const len = ev.payload.reduce((n, b) => n + b.length, 0);
        check(len === payloadSize(ev.header), `payload of ${len} bytes, header says ${payloadSize(ev.header)}`);
        check(ev.wireBytes === MULTIFD_PACKET_HEADER_SIZE + len, 'wireBytes differs from header + payload');
        bytes += ev.wireBytes;
        const h = ev.header;
        events.push(`packet ${h.flags} ${h.normalPages} ${h.zeroPages} ${h.ramblock} ${h.packetNum} ${len}`);
      }
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    error = e;
  }
  check(bytes <= input.length, `events cover ${bytes} bytes of ${input.length}`);
  const r: ChannelRun = { events, state: error ? `E:${error.code}` : p.atBoundary ? 'boundary' : 'partial' };
  if (error) r.error = error;
  return r;
}

export const multifdChannelTarget: Target = {
  name: 'multifd-channel',
  what: 'MultifdChannelParser over whole captured channels (init, SYNC and data packets, nocomp/zlib/zstd), whole and re-chunked: same events; payload sizes equal what the header announces',
  seeds: () => channelSeeds(),
  dictionary: formatDictionary,
  run(input, rng) {
    // Mostly detecting the method as receive does; sometimes insisting on one.
    const expected = rng.weighted<number | undefined>([[undefined, 6], [MultifdFlag.NOCOMP, 2], [MultifdFlag.ZLIB, 1], [MultifdFlag.ZSTD, 1]]);
    const whole = runChannelParser(input, [input.length], expected);
    const split = runChannelParser(input, chunkPlan(input.length, rng), expected);
    check(split.state === whole.state && split.events.join('\n') === whole.events.join('\n'), `chunking changes the result: ${whole.state} (${whole.events.length} events) vs ${split.state} (${split.events.length} events)`);
    if (whole.error) throw whole.error;
    return `${whole.state} ${Math.min(whole.events.length, 5)}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 2 << 20,
};

// ---- receiver writing pages -----------------------------------------------------------------

/**
 * A PageStore that checks every write instead of keeping the bytes (and logs them when asked). A
 * write outside its block is remembered as a Violation: the receiver wraps whatever the store
 * throws into its own ChannelError, so the target rethrows the Violation itself.
 */
export class RecordingStore implements PageStore {
  normal = 0;
  zero = 0;
  violation: Violation | undefined;
  readonly log: string[] | undefined;
  constructor(private readonly blocks: ReadonlyMap<string, { usedLength: number }>, keepLog = false) {
    if (keepLog) this.log = [];
  }

  private ensure(cond: boolean, msg: () => string): void {
    if (cond) return;
    const v = new Violation(msg());
    this.violation ??= v;
    throw v;
  }

  private inside(block: string, off: number, what: string): void {
    const b = this.blocks.get(block);
    this.ensure(b !== undefined, () => `${what} to block "${block}", which the stream never declared`);
    this.ensure(Number.isSafeInteger(off) && off >= 0 && off % PAGE === 0 && off + PAGE <= b!.usedLength,
      () => `${what} at offset ${off} of block "${block}" (used_length ${b!.usedLength}): outside the block`);
  }

  async writePages(block: string, offsets: ArrayLike<number>, count: number, data: readonly Buffer[]): Promise<void> {
    this.ensure(count > 0 && count <= MULTIFD_PAGES_PER_PACKET && offsets.length >= count, () => `writePages of ${count} pages`);
    for (let i = 0; i < count; i++) this.inside(block, offsets[i]!, 'page write');
    const len = data.reduce((n, d) => n + d.length, 0);
    this.ensure(len === count * PAGE, () => `writePages of ${count} pages with ${len} bytes of data`);
    this.normal += count;
    if (this.log) for (let i = 0; i < count; i++) this.log.push(`page ${block} ${offsets[i]}`);
  }

  zeroPages(block: string, offsets: ArrayLike<number>, start: number, count: number): void {
    this.ensure(start >= 0 && count > 0 && start + count <= offsets.length && count <= MULTIFD_PAGES_PER_PACKET, () => `zeroPages [${start}, +${count}) of ${offsets.length}`);
    for (let i = start; i < start + count; i++) this.inside(block, offsets[i]!, 'zero-page write');
    this.zero += count;
    if (this.log) for (let i = start; i < start + count; i++) this.log.push(`zero ${block} ${offsets[i]}`);
  }
}

async function* feed(input: Buffer, plan: readonly number[]): AsyncGenerator<Buffer> {
  for (const c of chunks(input, plan)) yield c;
}

export interface ReceiverRun {
  store: RecordingStore;
  failure?: Error;
  syncs: number;
  compression?: string;
}

/**
 * Runs one multifd channel's bytes through a MultifdReceiver, playing the main channel (it syncs
 * whenever the channel waits at a SYNC). The channel's own id (init byte 24) sets the channel
 * count, so any capture is "the last channel"; the barrier counts only this one.
 */
export async function driveReceiver(input: Buffer, blocks: ReadonlyMap<string, { name: string; usedLength: number }>, plan: readonly number[], windowBytes: number, keepLog = false): Promise<ReceiverRun> {
  const id = input.length > 24 ? input[24]! : 0;
  const store = new RecordingStore(blocks, keepLog);
  // At most 255 channels (QEMU's multifd-channels): id 255 is then one too many (BAD_CHANNEL_ID).
  const receiver = new MultifdReceiver({ channels: Math.min(id + 1, MAX_MULTIFD_CHANNELS), store, blocks, windowBytes, channelTimeoutMs: 2 ** 31 - 1 });
  receiver.barrier.setParties(1);
  let failure: Error | undefined;
  receiver.on('error', (e: Error) => {
    failure ??= e;
  });
  let channelDone = false;
  const run = receiver.runChannel(feed(input, plan), 'fuzz channel').then(() => {
    channelDone = true;
  });
  let syncs = 0;
  while (!channelDone && failure === undefined) {
    if (receiver.barrier.arrivedCount > 0) {
      await receiver.sync().catch(() => {});
      syncs++;
    } else {
      await new Promise((r) => setImmediate(r));
    }
  }
  await run;
  await receiver.finish().catch(() => {});
  await receiver.quiesce();
  const r: ReceiverRun = { store, syncs };
  if (failure) r.failure = failure;
  if (receiver.compression) r.compression = receiver.compression;
  return r;
}

async function runReceiver(input: Buffer, rng: Rng): Promise<string> {
  const r = await driveReceiver(input, BLOCKS, chunkPlan(input.length, rng, undefined, true), rng.pick([64 * 1024, 1 << 20, 8 << 20]));
  if (r.store.violation) throw r.store.violation;
  if (r.failure) throw r.failure;
  return `ok syncs=${Math.min(r.syncs, 4)} normal=${r.store.normal > 0} zero=${r.store.zero > 0} ${r.compression ?? '-'}`;
}

const typedChannelError = (e: unknown): boolean => (e instanceof ChannelError ? e.cause instanceof ProtocolError : e instanceof ProtocolError);
const channelErrorSignature = (e: unknown): string => {
  const c = e instanceof ChannelError ? e.cause : e;
  return c instanceof ProtocolError ? `${c.code}:${messageTemplate(c.message)}` : 'other';
};

export const multifdReceiverTarget: Target = {
  name: 'multifd-receiver',
  what: 'MultifdReceiver.runChannel over captured channels (compression detected from the first packet: none, zlib, zstd), re-chunked, with an in-memory PageStore: every page and zero-page write inside its block and page aligned, data exactly count × 4 KiB; failures are ChannelErrors wrapping a ProtocolError',
  seeds: () => channelSeeds(),
  dictionary: formatDictionary,
  run: runReceiver,
  typed: typedChannelError,
  errorSignature: channelErrorSignature,
  maxInput: 2 << 20,
  budgetMs: 4000,
};

// ---- compressed payloads --------------------------------------------------------------------

function compressedTarget(method: 'zlib' | 'zstd'): Target {
  const flag = method === 'zlib' ? MultifdFlag.ZLIB : MultifdFlag.ZSTD;
  return {
    name: method,
    what: `${method} recvSetup().recv(header, payload) over every data packet of captured ${method} channels in order (one stream per channel): each decodes to exactly normal_pages × 4 KiB or fails with a ProtocolError`,
    seeds: () => channelSeeds((s) => compressionOf(s) === method),
    dictionary: formatDictionary,
    async run(input, rng) {
      const p = new MultifdChannelParser(flag);
      const ch = getMethod(method).recvSetup(0, PAGE);
      let packets = 0;
      let pages = 0;
      try {
        for (const c of chunks(input, chunkPlan(input.length, rng, undefined, true))) {
          p.push(c);
          for (let ev = p.next(); ev !== null; ev = p.next()) {
            if (ev.type !== 'packet' || ev.header.normalPages === 0) continue;
            const out = await ch.recv(ev.header, ev.payload);
            const len = out.reduce((n, b) => n + b.length, 0);
            check(len === ev.header.normalPages * PAGE, `${method} recv returned ${len} bytes for ${ev.header.normalPages} pages`);
            packets++;
            pages += ev.header.normalPages;
          }
        }
      } finally {
        ch.cleanup();
      }
      return `ok packets=${Math.min(packets, 3)} pages=${pages > 0}`;
    },
    typed: isProtocolError,
    errorSignature: protocolSignature,
    maxInput: 2 << 20,
    budgetMs: 4000,
  };
}

export const zlibTarget = compressedTarget('zlib');
export const zstdTarget = compressedTarget('zstd');
