// A small built-in migration source: a synthetic guest (one RAM block plus a ROM-like block and
// one device) sent as QEMU would send it over N multifd channels, with two rounds in which
// pages change and some become zero. `demo` uses it where no QEMU is installed; tests use it to
// exercise `receive` without QEMU.

import { once } from 'node:events';
import { connect, type Socket } from 'node:net';
import { Command, MULTIFD_PAGES_PER_PACKET, MultifdFlag, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeConfiguration } from '../codec/configuration.js';
import { encodeMultifdInit } from '../codec/multifd-init.js';
import { encodeMultifdPacketHeader, encodeSyncPacket } from '../codec/multifd-packet.js';
import {
  encodeBlockEntry,
  encodeCommand,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodeMultifdFlush,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
  encodeSwitchoverStart,
} from '../codec/stream-encode.js';
import { parseAddress } from '../transports/address.js';

export interface SyntheticGuest {
  machine: string;
  blocks: { name: string; data: Buffer }[];
  deviceState: Buffer;
  vmdesc: string;
}

/** A deterministic guest: page k of "ram" holds its index pattern, every 7th page is zero. */
export function makeSyntheticGuest(ramMiB = 64): SyntheticGuest {
  const ram = Buffer.alloc(ramMiB * 1024 * 1024);
  for (let p = 0; p < ram.length / TARGET_PAGE_SIZE; p++) {
    if (p % 7 === 0) continue;
    const page = ram.subarray(p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
    // Distinct per page (index at both ends) yet cheap to build for a large guest.
    page.fill((p * 131) & 0xff || 1);
    page.writeUInt32LE(p, 0);
    page.writeUInt32LE(p ^ 0x5a5a5a5a, TARGET_PAGE_SIZE - 4);
  }
  const rom = Buffer.alloc(64 * 1024, 0xa5);
  const deviceState = Buffer.from('multifd demo device state v1!!!!');
  const vmdesc = JSON.stringify({
    page_size: TARGET_PAGE_SIZE,
    devices: [{ name: 'demo-device', instance_id: 0, vmsd_name: 'demo-device', version: 1, fields: [{ name: 'state', type: 'buffer', size: deviceState.length }] }],
  });
  return { machine: 'multifd-demo', blocks: [{ name: 'demo.ram', data: ram }, { name: 'demo.rom', data: rom }], deviceState, vmdesc };
}

/** Changes the guest between rounds: rewrites some pages and zeroes others (sent as zero entries). */
export function dirtySyntheticGuest(g: SyntheticGuest, round: number): number[] {
  const ram = g.blocks[0]!.data;
  const pages = ram.length / TARGET_PAGE_SIZE;
  const changed: number[] = [];
  for (let p = round; p < pages; p += 97) {
    const page = ram.subarray(p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
    if (p % 3 === 0) page.fill(0);
    else page.fill(round * 16 + (p & 15));
    changed.push(p);
  }
  return changed;
}

function connectTo(addr: string): Promise<Socket> {
  const a = parseAddress(addr);
  return new Promise((resolve, reject) => {
    const s = a.kind === 'unix' ? connect(a.path) : connect(a.port, a.host);
    s.setNoDelay(true);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

async function write(s: Socket, bufs: Buffer[]): Promise<void> {
  s.cork();
  for (const b of bufs) s.write(b);
  s.uncork();
  if (!s.writableNeedDrain) return;
  // A peer that goes away may close the socket without an error; 'drain' would never come.
  await new Promise<void>((resolve, reject) => {
    const done = (err?: Error): void => {
      s.off('drain', onDrain);
      s.off('close', onClose);
      s.off('error', done);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = (): void => done();
    const onClose = (): void => done(new Error('connection closed'));
    s.once('drain', onDrain);
    s.once('close', onClose);
    s.once('error', done);
  });
}

const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);
const isZero = (b: Buffer): boolean => b.equals(ZERO_PAGE);

export interface SyntheticSendOptions {
  channels: number;
  rounds?: number;
  /** 'round': MULTIFD_FLUSH per round (QEMU's default); 'section': every EOS syncs. */
  syncMode?: 'round' | 'section';
  /** Open the return path and PING(1), as a source with the return-path capability does. */
  returnPath?: boolean;
  /** Channel ids to announce (default 0..channels-1). */
  channelIds?: number[];
  uuid?: Buffer;
  /** Called with the main socket once connected (e.g. to read the return path). */
  onMain?: (s: Socket) => void;
  /** Stop for `ms` after `at` bytes of the device section's body (read-boundary tests). */
  deviceStatePause?: { at: number; ms: number };
}

/**
 * Sends the guest to `addr` as a QEMU source with multifd would: round 1 all pages, then
 * `rounds - 1` rounds of changed pages, each closed by one SYNC per channel and a FLUSH.
 */
export async function sendSyntheticMigration(addr: string, g: SyntheticGuest, opts: SyntheticSendOptions): Promise<void> {
  const n = opts.channels;
  const perSection = opts.syncMode === 'section';
  const main = await connectTo(addr);
  opts.onMain?.(main);
  // The return path must be read for its end to be seen.
  if (opts.returnPath && !opts.onMain) main.resume();
  const chans: Socket[] = [];
  for (let i = 0; i < n; i++) chans.push(await connectTo(addr));
  let packetNum = 0n;
  let next = 0;
  try {
    await Promise.all(chans.map((c, i) => write(c, [encodeMultifdInit(opts.channelIds?.[i] ?? i, opts.uuid), encodeSyncPacket(packetNum++)])));
    const sid = 2;
    const total = g.blocks.reduce((t, b) => t + b.data.length, 0);
    const flush = perSection ? [] : [encodeMultifdFlush()];
    await write(main, [
      encodeStreamHeader(),
      encodeConfiguration({ machine: g.machine, capabilities: [] }),
      ...(opts.returnPath ? [encodeCommand(Command.OPEN_RETURN_PATH), encodeCommand(Command.PING, Buffer.from([0, 0, 0, 1]))] : []),
      encodeSectionFull(SectionType.START, sid, 'ram', 0, 4),
      encodeMemSize(total),
      ...g.blocks.map((b) => encodeBlockEntry(b.name, b.data.length)),
      ...flush,
      encodeEos(),
      encodeFooter(sid),
    ]);
    const sendPages = async (block: { name: string; data: Buffer }, pages: number[]): Promise<void> => {
      for (let i = 0; i < pages.length; i += MULTIFD_PAGES_PER_PACKET) {
        const batch = pages.slice(i, i + MULTIFD_PAGES_PER_PACKET);
        const normal: number[] = [];
        const zero: number[] = [];
        const payload: Buffer[] = [];
        for (const p of batch) {
          const page = block.data.subarray(p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
          if (isZero(page)) zero.push(p * TARGET_PAGE_SIZE);
          else {
            normal.push(p * TARGET_PAGE_SIZE);
            payload.push(page);
          }
        }
        const header = encodeMultifdPacketHeader({
          flags: MultifdFlag.NOCOMP,
          normalPages: normal.length,
          zeroPages: zero.length,
          nextPacketSize: normal.length * TARGET_PAGE_SIZE,
          packetNum: packetNum++,
          ramblock: block.name,
          offsets: [...normal, ...zero],
        });
        await write(chans[next]!, [header, ...payload]);
        next = (next + 1) % n;
      }
    };
    const sync = async (): Promise<void> => {
      await Promise.all(chans.map((c) => write(c, [encodeSyncPacket(packetNum++)])));
    };
    const rounds = opts.rounds ?? 2;
    for (let r = 1; r <= rounds; r++) {
      const last = r === rounds;
      if (r === 1) {
        for (const b of g.blocks) await sendPages(b, [...Array(b.data.length / TARGET_PAGE_SIZE).keys()]);
      } else {
        await sendPages(g.blocks[0]!, dirtySyntheticGuest(g, r));
      }
      await sync();
      const body = [...flush, encodeEos(), encodeFooter(sid)];
      if (last) await write(main, [encodeSwitchoverStart(), encodeSectionShort(SectionType.END, sid), ...body]);
      else await write(main, [encodeSectionShort(SectionType.PART, sid), ...body]);
    }
    const vmdesc = Buffer.from(g.vmdesc);
    const len = Buffer.alloc(4);
    len.writeUInt32BE(vmdesc.length);
    let body = g.deviceState;
    if (opts.deviceStatePause) {
      const { at, ms } = opts.deviceStatePause;
      await write(main, [encodeSectionFull(SectionType.FULL, 3, 'demo-device', 0, 1), body.subarray(0, at)]);
      await new Promise((resolve) => setTimeout(resolve, ms));
      body = body.subarray(at);
    }
    await write(main, [
      ...(opts.deviceStatePause ? [] : [encodeSectionFull(SectionType.FULL, 3, 'demo-device', 0, 1)]),
      body,
      encodeFooter(3),
      Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION]),
      len,
      vmdesc,
    ]);
    // With a return path the source waits for SHUT before it closes (as QEMU does).
    if (opts.returnPath) await once(main, 'end');
  } finally {
    for (const s of [main, ...chans]) s.end();
  }
}
