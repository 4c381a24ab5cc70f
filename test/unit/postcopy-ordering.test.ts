// The postcopy ordering rule (issue #8), as a model test over real sockets: a page sent by
// precopy on a multifd channel must never overwrite a newer copy sent in postcopy.
//
// fast-check draws a migration: 1–3 multifd channels, 1–3 precopy rounds (pages spread over the
// channels, each round closed by one SYNC per channel and a FLUSH on main; the last round is
// QEMU's "prepare" sync), then the switch (SWITCHOVER_START, DISCARDs, PING(2), PACKAGED, PING(4))
// and postcopy pages split between the main channel and the magic-less preempt channel (each page
// at most once after the switch, as QEMU sends them), all written before END and EOF on main. Every socket's bytes go out in random slices
// with random pauses, the sockets concurrently, and the preempt pages race the package. The
// snapshot must hold, for every page, its postcopy copy if it had one, else its last precopy copy.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { once } from 'node:events';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import fc from 'fast-check';
import { Command, MultifdFlag, RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import { encodeMultifdInit } from '../../src/codec/multifd-init.js';
import { encodeMultifdPacketHeader, encodeSyncPacket } from '../../src/codec/multifd-packet.js';
import { encodeDiscards, encodePackagedHeader, encodePostcopyAdvise, encodePostcopyListen, encodePostcopyRun } from '../../src/codec/postcopy.js';
import { encodeBlockEntry, encodeCommand, encodeEos, encodePing, encodeFooter, encodeMemSize, encodeMultifdFlush, encodePageRecordHeader, encodeSectionFull, encodeSectionShort, encodeStreamHeader } from '../../src/codec/stream-encode.js';
import { receive } from '../../src/conversations/receive.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { prng } from '../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;
const PAGES = 48;
const BLOCK = 'ram0';
const POSTCOPY_ROUND = 99;
const SCALE = Math.max(1, Number(process.env.MULTIFD_FUZZ_SCALE ?? 1) || 1);

/** Page p as sent in round r: both in its first bytes, the rest a fill that depends on them. */
function content(p: number, r: number): Buffer {
  const b = Buffer.alloc(PAGE, (p * 7 + r * 31) & 0xff);
  b.writeUInt32LE(p, 0);
  b.writeUInt32LE(r, 4);
  return b;
}


interface Plan {
  channels: number;
  /** rounds[r] = pages sent in precopy round r+1, with the channel for each packet of ≤ 4 pages. */
  rounds: { pages: number[]; channelOf: number[] }[];
  postMain: number[];
  postPreempt: number[];
  /** Open the preempt channel at PONG(1) and send its pages while precopy still runs (a hostile
   * order: QEMU sends them only on request, after the switch); else at PONG(2), as QEMU would. */
  earlyPreempt: boolean;
  seed: number;
}

const planArb: fc.Arbitrary<Plan> = fc
  .record({
    channels: fc.integer({ min: 1, max: 3 }),
    rounds: fc.array(fc.record({ pages: fc.uniqueArray(fc.integer({ min: 0, max: PAGES - 1 }), { minLength: 1, maxLength: PAGES }), channelOf: fc.array(fc.nat(), { minLength: 12, maxLength: 12 }) }), { minLength: 1, maxLength: 3 }),
    post: fc.uniqueArray(fc.integer({ min: 0, max: PAGES - 1 }), { minLength: 1, maxLength: PAGES }),
    split: fc.array(fc.boolean(), { minLength: PAGES, maxLength: PAGES }),
    earlyPreempt: fc.boolean(),
    seed: fc.integer(),
  })
  .map((x) => ({
    channels: x.channels,
    rounds: x.rounds,
    postMain: x.post.filter((_, i) => !x.split[i]),
    postPreempt: x.post.filter((_, i) => x.split[i]),
    earlyPreempt: x.earlyPreempt,
    seed: x.seed,
  }));

/** Writes `bufs` in random slices with random pauses between them. */
async function dribble(s: Socket, bufs: Buffer[], rnd: () => number): Promise<void> {
  const all = Buffer.concat(bufs);
  for (let at = 0; at < all.length;) {
    const n = Math.min(all.length - at, 1 + Math.floor(rnd() * (rnd() < 0.5 ? 64 : 6000)));
    if (!s.write(all.subarray(at, at + n))) await once(s, 'drain');
    at += n;
    const r = rnd();
    if (r < 0.3) await new Promise<void>((resolve) => setImmediate(resolve));
    else if (r < 0.35) await sleep(1);
  }
}

async function open(port: number): Promise<Socket> {
  const s = connect(port, '127.0.0.1');
  s.on('error', () => {});
  await once(s, 'connect');
  return s;
}

/** The source side of one drawn migration; resolves when SHUT(0) came back. */
async function runSource(port: number, plan: Plan): Promise<void> {
  const rnd = prng(plan.seed);
  const main = await open(port);
  let rp = Buffer.alloc(0);
  const pongs = new Map<number, () => void>();
  const wait = (v: number): Promise<void> => new Promise((resolve) => pongs.set(v, resolve));
  const pong1 = wait(1);
  const pong2 = wait(2);
  const shut = new Promise<void>((resolve, reject) => {
    main.on('data', (d: Buffer) => {
      rp = Buffer.concat([rp, d]);
      while (rp.length >= 8) {
        const type = rp.readUInt16BE(0);
        const v = rp.readUInt32BE(4);
        rp = rp.subarray(8);
        if (type === 2) pongs.get(v)?.();
        if (type === 1) return v === 0 ? resolve() : reject(new Error(`SHUT(${v})`));
      }
    });
    main.on('close', () => reject(new Error('main closed before SHUT')));
  });
  shut.catch(() => {});
  const chans: Socket[] = [];
  // QEMU connects main first; the multifd channels follow once main's first bytes are out.
  main.write(Buffer.concat([encodeStreamHeader(), encodeConfiguration({ machine: 'pc-test', capabilities: [] })]));
  for (let i = 0; i < plan.channels; i++) chans.push(await open(port));

  let num = 0n;
  const chanBufs: Buffer[][] = chans.map((_, i) => [encodeMultifdInit(i), encodeSyncPacket(num++)]);
  const mainBufs: Buffer[] = [
    // ADVISE before PING(1) (QEMU sends it after): PONG(1) then means the receiver knows of postcopy.
    encodeCommand(Command.OPEN_RETURN_PATH), encodePostcopyAdvise(), encodePing(1),
    encodeSectionFull(SectionType.START, 1, 'ram', 0, 4), encodeMemSize(PAGES * PAGE), encodeBlockEntry(BLOCK, PAGES * PAGE),
    encodeMultifdFlush(), encodeEos(), encodeFooter(1),
  ];
  plan.rounds.forEach((round, r) => {
    for (let i = 0, k = 0; i < round.pages.length; i += 4, k++) {
      const pages = round.pages.slice(i, i + 4);
      const c = round.channelOf[k % round.channelOf.length]! % plan.channels;
      chanBufs[c]!.push(
        encodeMultifdPacketHeader({ flags: MultifdFlag.NOCOMP, normalPages: pages.length, zeroPages: 0, nextPacketSize: pages.length * PAGE, packetNum: num++, ramblock: BLOCK, offsets: pages.map((p) => p * PAGE) }),
        ...pages.map((p) => content(p, r + 1)),
      );
    }
    for (const b of chanBufs) b.push(encodeSyncPacket(num++));
    mainBufs.push(encodeSectionShort(SectionType.PART, 1), encodeMultifdFlush(), encodeEos(), encodeFooter(1));
  });
  const post = [...plan.postMain, ...plan.postPreempt].sort((a, b) => a - b);
  const ranges = post.map((p) => ({ start: p * PAGE, length: PAGE }));
  mainBufs.push(encodeCommand(Command.SWITCHOVER_START), ...encodeDiscards(BLOCK, ranges), encodePing(2));
  const dev = Buffer.concat([encodeSectionFull(SectionType.FULL, 2, 'dev', 0, 1), Buffer.alloc(16, 3), encodeFooter(2)]);
  const pkg = Buffer.concat([encodePostcopyListen(), dev, encodePing(3), encodePing(0x42), encodePostcopyRun()]);
  const postcopyMain: Buffer[] = [encodePackagedHeader(pkg.length), pkg, encodePing(4)];
  for (let i = 0; i < plan.postMain.length; i += 5) {
    postcopyMain.push(encodeSectionShort(SectionType.PART, 1));
    for (const p of plan.postMain.slice(i, i + 5)) postcopyMain.push(encodePageRecordHeader(RamFlag.PAGE, p * PAGE, BLOCK), content(p, POSTCOPY_ROUND));
    postcopyMain.push(encodeEos(), encodeFooter(1));
  }
  const end = [encodeSectionShort(SectionType.END, 1), encodeEos(), encodeFooter(1), Buffer.from([SectionType.EOF])];

  const preemptBufs: Buffer[] = [];
  plan.postPreempt.forEach((p, i) => preemptBufs.push(encodePageRecordHeader(RamFlag.PAGE, p * PAGE, i === 0 ? BLOCK : undefined), content(p, POSTCOPY_ROUND)));
  const wantPreempt = plan.postPreempt.length > 0 || rnd() < 0.5;
  // The preempt channel is the connection after main and all multifd channels.
  const preemptDone = (async () => {
    if (!wantPreempt) return undefined;
    await (plan.earlyPreempt ? pong1 : pong2);
    const preempt = await open(port);
    await dribble(preempt, preemptBufs, prng(plan.seed + 200));
    return preempt;
  })();
  try {
    await Promise.all([
      ...chans.map((c, i) => dribble(c, chanBufs[i]!, prng(plan.seed + i + 1))),
      (async () => {
        await dribble(main, mainBufs, rnd);
        await dribble(main, postcopyMain, prng(plan.seed + 100));
        const preempt = await preemptDone;
        // As QEMU: every page is written (on either socket) before the END and EOF on main; the
        // preempt bytes can still arrive after them.
        await dribble(main, end, prng(plan.seed + 300));
        await shut;
        preempt?.destroy();
      })(),
    ]);
  } finally {
    for (const s of [main, ...chans]) s.destroy();
  }
}

describe('postcopy ordering (receive, random schedules)', () => {
  test('every page ends with its postcopy copy if it had one, else its last precopy copy', { timeout: 300_000 }, async () => {
    const dir = mkdtempSync('/tmp/multifd-pc-order-');
    let n = 0;
    try {
      await fc.assert(fc.asyncProperty(planArb, async (plan) => {
        const out = join(dir, `s${n++}.mig`);
        const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: plan.channels, identifyTimeoutMs: 2000, directIo: false });
        const addr = await h.listening;
        let last: unknown;
        h.on('progress', (p) => { last = p; });
        // A schedule that stalls is a deadlock, reported with where the receiver stood.
        let timer: NodeJS.Timeout | undefined;
        const stall = new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error(`stalled; receiver at ${JSON.stringify(last)}; plan ${JSON.stringify(plan)}`)), 8000);
        });
        let summary;
        try {
          [summary] = await Promise.race([Promise.all([h.done, runSource(Number(addr.split(':').pop()), plan)]), stall]);
        } catch (e) {
          h.abort(e as Error);
          throw e;
        } finally {
          clearTimeout(timer);
        }
        assert.ok(summary.postcopy);
        assert.equal(summary.postcopy['preempt-pages'], plan.postPreempt.length);
        assert.equal(summary.postcopy['main-pages'], plan.postMain.length);
        const snap = await MappedRamSnapshot.open(out);
        try {
          const got = await snap.readPages(BLOCK, 0, PAGES);
          for (let p = 0; p < PAGES; p++) {
            let want: number | undefined = plan.postMain.includes(p) || plan.postPreempt.includes(p) ? POSTCOPY_ROUND : undefined;
            if (want === undefined) for (let r = plan.rounds.length - 1; r >= 0 && want === undefined; r--) if (plan.rounds[r]!.pages.includes(p)) want = r + 1;
            const page = got.subarray(p * PAGE, (p + 1) * PAGE);
            const expected = want === undefined ? Buffer.alloc(PAGE) : content(p, want);
            assert.ok(page.equals(expected), `page ${p}: holds round ${page.readUInt32LE(4)}, expected ${want ?? 'none (zero)'}`);
          }
        } finally {
          await snap.close();
        }
        rmSync(out, { force: true });
      }), { numRuns: Math.round(25 * SCALE), verbose: 1 });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
