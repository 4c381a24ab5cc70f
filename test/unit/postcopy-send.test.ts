// send({ postcopy }) against an in-process fake destination that behaves like QEMU's postcopy
// loader: it answers PINGs, splits the package, asks for pages on the return path once it has
// LISTEN, and records every page it receives on main, multifd and preempt. Checks: requested pages
// arrive ahead of the background scan, every page arrives exactly once after LISTEN (unless it came
// before the switch), the discards cover exactly the pages not sent before the switch, the contents
// equal the snapshot's; bad requests and a destination that dies mid-postcopy are typed errors.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { Command, MULTIFD_MAGIC, QEVM_MAGIC, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { MultifdChannelParser } from '../../src/codec/multifd-channel-parser.js';
import { isSync } from '../../src/codec/multifd-packet.js';
import { PageRecordParser, decodeDiscard, encodePageRequest, splitPackage, type PageRequest } from '../../src/codec/postcopy.js';
import { encodePong, encodeShut } from '../../src/codec/return-path.js';
import { receive } from '../../src/conversations/receive.js';
import { PostcopyDestinationLostError, send, type PostcopyOptions, type SendSummary } from '../../src/conversations/send.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { PageRequestError, PostcopyPages } from '../../src/engine/postcopy-pages.js';
import { InvalidOptionError } from '../../src/codec/errors.js';
import { makeSyntheticGuest, sendSyntheticMigration } from '../../src/demo/synthetic-source.js';

let dir = '';
let snapshot = '';
/** Each block's final pages, as the snapshot holds them (absent pages zero). */
const contents = new Map<string, Buffer>();

before(async () => {
  dir = mkdtempSync('/tmp/multifd-postcopy-test-');
  snapshot = join(dir, 'source.mig');
  const rx = receive({ listen: 'tcp:127.0.0.1:0', out: snapshot, channels: 2 });
  const addr = await rx.listening;
  await Promise.all([rx.done, sendSyntheticMigration(addr, makeSyntheticGuest(16), { channels: 2, rounds: 3 })]);
  const s = await MappedRamSnapshot.open(snapshot);
  try {
    for (const b of s.blocks.values()) contents.set(b.name, await s.readPages(b.name, 0, b.usedLength / TARGET_PAGE_SIZE));
  } finally {
    await s.close();
  }
});

after(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Arrival {
  block: string;
  page: number;
  via: 'main' | 'preempt';
  /** Position among all pages received after LISTEN. */
  seq: number;
  at: number;
}

interface FakeOptions {
  channels: number;
  preempt: boolean;
  /** Requests sent right after the package was taken apart. */
  requests?: PageRequest[];
  /** Instead of a normal end: close everything once this many pages arrived after LISTEN. */
  dieAfterPages?: number;
  /** Answer PING(0x42)? QEMU 11.1 and 10.0 both do. */
  /**
   * Target pages per host page of hugepage-backed blocks: after LISTEN the destination collects a
   * host page's target pages on one channel and places it whole, as QEMU's ram_load_postcopy; its
   * discards must be whole host pages (ram_block_discard_range).
   */
  hostPages?: Map<string, number>;
}

/** A destination that loads a postcopy stream the way QEMU does, as far as the wire is concerned. */
class FakeDestination {
  readonly server: Server;
  readonly sockets: Socket[] = [];
  addr = '';
  /** Pages placed before LISTEN (multifd packets, main PAGE records), per block. */
  readonly precopy = new Map<string, Set<number>>();
  readonly discarded = new Map<string, Set<number>>();
  readonly arrivals: Arrival[] = [];
  readonly errors: string[] = [];
  readonly commands: number[] = [];
  pings: number[] = [];
  listening = false;
  packageSeen = false;
  requestsSentAt = 0;
  preemptSeen = false;
  multifdSyncs = 0;
  /** POSTCOPY_ADVISE's page-size summary, and the page size each block entry carried. */
  advisedSummary: number | undefined;
  readonly blockPageSizes = new Map<string, number | undefined>();
  /** Host pages placed whole after LISTEN, per block. */
  readonly hostPagesPlaced = new Map<string, number>();
  /** The host page being collected on each channel (QEMU's postcopy_tmp_pages). */
  private readonly collecting = new Map<'main' | 'preempt', { block: string; hostPage: number; count: number }>();
  private main: Socket | undefined;
  private multifdSeen = 0;
  /** SYNCs seen per multifd channel: a MULTIFD_FLUSH on main waits for one more on every channel, as in QEMU. */
  private readonly syncs: number[] = [];
  private pumpMain: (() => void) | undefined;
  private closedAll = false;

  constructor(private readonly o: FakeOptions) {
    this.server = createServer((s) => this.accept(s));
  }

  async listen(): Promise<string> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.addr = `tcp:127.0.0.1:${(this.server.address() as { port: number }).port}`;
    return this.addr;
  }

  close(): void {
    this.closedAll = true;
    for (const s of this.sockets) s.destroy();
    this.server.close();
  }

  private accept(s: Socket): void {
    this.sockets.push(s);
    s.on('error', () => {});
    if (this.closedAll) {
      s.destroy();
      return;
    }
    // Like QEMU 11.1, which peeks at each connection in accept order: main and the multifd channels
    // by their magic; the connection after those is preempt (it sends nothing until a request).
    if (this.sockets.length > 1 + this.o.channels) {
      this.preemptSeen = true;
      this.preempt(s);
      return;
    }
    let first = true;
    let handler: ((b: Buffer) => void) | undefined;
    s.on('data', (b: Buffer) => {
      if (first) {
        first = false;
        const magic = b.readUInt32BE(0);
        if (magic === QEVM_MAGIC) handler = this.mainChannel(s);
        else if (magic === MULTIFD_MAGIC) {
          this.multifdSeen++;
          handler = this.multifdChannel();
        } else this.errors.push(`connection with magic 0x${magic.toString(16)}`);
      }
      try {
        handler?.(b);
      } catch (e) {
        this.errors.push(`parse: ${(e as Error).message}`);
        s.destroy();
      }
    });
  }

  private place(block: string, page: number, data: Buffer | undefined, via: 'main' | 'preempt'): void {
    const want = contents.get(block)!.subarray(page * TARGET_PAGE_SIZE, (page + 1) * TARGET_PAGE_SIZE);
    if (data ? !data.equals(want) : !want.equals(Buffer.alloc(TARGET_PAGE_SIZE))) this.errors.push(`${via}: page ${page} of ${block} has the wrong content`);
    if (!this.listening) {
      if (via === 'preempt') this.errors.push(`preempt page ${page} before LISTEN`);
      let set = this.precopy.get(block);
      if (!set) this.precopy.set(block, (set = new Set()));
      if (set.has(page)) this.errors.push(`precopy page ${page} of ${block} twice`);
      set.add(page);
      return;
    }
    if (!this.discarded.get(block)?.has(page)) this.errors.push(`page ${page} of ${block} sent after LISTEN without having been discarded`);
    const unit = this.o.hostPages?.get(block) ?? 1;
    if (unit > 1) {
      const c = this.collecting.get(via);
      const hostPage = Math.floor(page / unit);
      if (!c) {
        this.collecting.set(via, { block, hostPage, count: 1 });
      } else if (c.block !== block || c.hostPage !== hostPage) {
        this.errors.push(`${via}: page ${page} of ${block} cuts into host page ${c.hostPage} of ${c.block} (${c.count} of ${unit} pages there): "Non-same host page detected"`);
      } else if (++c.count === unit) {
        this.collecting.delete(via);
        this.hostPagesPlaced.set(block, (this.hostPagesPlaced.get(block) ?? 0) + 1);
      }
    } else if (this.collecting.has(via)) {
      this.errors.push(`${via}: page ${page} of ${block} cuts into a host page being collected`);
    }
    this.arrivals.push({ block, page, via, seq: this.arrivals.length, at: Date.now() });
    if (this.o.dieAfterPages !== undefined && this.arrivals.length >= this.o.dieAfterPages) this.close();
  }

  private mainChannel(s: Socket): (b: Buffer) => void {
    this.main = s;
    const parser = new MainStreamParser();
    let flushes = 0;
    let blocked = false;
    const synced = (): boolean => this.syncs.length === this.o.channels && this.syncs.every((n) => n >= flushes);
    const pump = (): void => {
      if (blocked && !synced()) return;
      blocked = false;
      for (let ev = parser.next(); ev !== null; ev = parser.next()) {
        if (ev.type === 'ram-flush') {
          if (this.listening) this.errors.push('MULTIFD_FLUSH after LISTEN (QEMU\'s postcopy loader refuses it)');
          flushes++;
          // The barrier: every channel's pages are placed before main goes on.
          if (!synced()) {
            blocked = true;
            return;
          }
        } else if (ev.type === 'command') {
          this.commands.push(ev.cmd);
          if (ev.cmd === Command.PING) this.pong(ev.payload.readUInt32BE(0));
          else if (ev.cmd === Command.POSTCOPY_ADVISE) this.advisedSummary = Number(ev.payload.readBigUInt64BE(0));
          else if (ev.cmd === Command.POSTCOPY_RAM_DISCARD) {
            if (this.listening) this.errors.push('DISCARD after LISTEN');
            const d = decodeDiscard(ev.payload);
            let set = this.discarded.get(d.block);
            if (!set) this.discarded.set(d.block, (set = new Set()));
            const hostBytes = (this.o.hostPages?.get(d.block) ?? 1) * TARGET_PAGE_SIZE;
            for (const r of d.ranges) {
              if (r.start % hostBytes !== 0 || r.length % hostBytes !== 0) this.errors.push(`discard [0x${r.start.toString(16)}, +0x${r.length.toString(16)}) of ${d.block} is not whole ${hostBytes}-byte host pages`);
              for (let p = r.start / TARGET_PAGE_SIZE; p < (r.start + r.length) / TARGET_PAGE_SIZE; p++) set.add(p);
            }
          }
        } else if (ev.type === 'package') {
          this.packageSeen = true;
          const pkg = splitPackage(ev.data);
          assert.deepEqual(pkg.leading.map((c) => c.cmd), [Command.POSTCOPY_LISTEN]);
          this.listening = true;
          // The listen thread runs from here; the devices load meanwhile, then the package's PINGs.
          if (this.o.requests) {
            this.requestsSentAt = this.arrivals.length;
            for (const r of this.o.requests) s.write(encodePageRequest(r));
          }
          assert.equal(pkg.devices[0], SectionType.FULL);
          for (const c of pkg.trailing) if (c.cmd === Command.PING) this.pong(c.payload.readUInt32BE(0));
          assert.equal(pkg.trailing.at(-1)?.cmd, Command.POSTCOPY_RUN);
        } else if (ev.type === 'ram-block') {
          this.blockPageSizes.set(ev.block.name, ev.block.pageSize);
        } else if (ev.type === 'ram-page') {
          this.place(ev.block, ev.offset / TARGET_PAGE_SIZE, Buffer.concat(ev.data), 'main');
        } else if (ev.type === 'ram-zero') {
          this.place(ev.block, ev.offset / TARGET_PAGE_SIZE, undefined, 'main');
        } else if (ev.type === 'device-state') {
          // After END ram only EOF may follow (no VMDESCRIPTION in postcopy).
          const bytes = Buffer.concat(ev.data);
          if (!this.listening) this.errors.push('device state outside the package');
          else if (bytes.length > 0 && !(bytes.length === 1 && bytes[0] === SectionType.EOF)) this.errors.push(`after END: ${bytes.length} bytes (${bytes.subarray(0, 8).toString('hex')})`);
          else if (bytes.length === 1) s.write(encodeShut(0));
        }
      }
    };
    this.pumpMain = pump;
    return (b) => {
      parser.push(b);
      pump();
    };
  }

  private pong(v: number): void {
    this.pings.push(v);
    this.main!.write(encodePong(v));
  }

  private multifdChannel(): (b: Buffer) => void {
    const parser = new MultifdChannelParser();
    let id = -1;
    return (b) => {
      parser.push(b);
      for (let ev = parser.next(); ev !== null; ev = parser.next()) {
        if (ev.type === 'init') {
          id = ev.init.id;
          this.syncs[id] = 0;
          continue;
        }
        const h = ev.header;
        if (isSync(h)) {
          this.multifdSyncs++;
          this.syncs[id]!++;
          this.pumpMain?.();
          continue;
        }
        if (this.listening) this.errors.push('multifd packet after LISTEN');
        const data = Buffer.concat(ev.payload);
        for (let i = 0; i < h.normalPages + h.zeroPages; i++) {
          this.place(h.ramblock, h.offsets[i]! / TARGET_PAGE_SIZE, i < h.normalPages ? data.subarray(i * TARGET_PAGE_SIZE, (i + 1) * TARGET_PAGE_SIZE) : undefined, 'main');
        }
      }
    };
  }

  private preempt(s: Socket): void {
    const blocks = new Map([...contents].map(([k, v]) => [k, v.length]));
    const parser = new PageRecordParser(blocks);
    s.on('data', (b: Buffer) => {
      parser.push(b);
      try {
        for (let ev = parser.next(); ev !== null; ev = parser.next()) {
          if (ev.type === 'eos') this.errors.push('EOS on the preempt channel (QEMU ≥ 8.0 sends no terminator)');
          else this.place(ev.block, ev.offset / TARGET_PAGE_SIZE, ev.type === 'page' ? Buffer.concat(ev.data) : undefined, 'preempt');
        }
      } catch (e) {
        this.errors.push(`preempt: ${(e as Error).message}`);
      }
    });
  }

  /** Every page of every block exactly once: before the switch or after LISTEN. */
  assertComplete(): void {
    assert.deepEqual([...this.collecting.keys()], [], 'no host page left half collected');
    for (const [block, unit] of this.o.hostPages ?? []) {
      const before = this.precopy.get(block) ?? new Set<number>();
      const discarded = this.discarded.get(block) ?? new Set<number>();
      for (let h = 0; h < contents.get(block)!.length / TARGET_PAGE_SIZE; h += unit) {
        let kept = 0;
        for (let p = h; p < h + unit; p++) if (before.has(p) && !discarded.has(p)) kept++;
        assert.ok(kept === 0 || kept === unit, `host page at page ${h} of ${block}: ${kept} of ${unit} pages kept from before the switch`);
      }
    }
    for (const [block, data] of contents) {
      const pages = data.length / TARGET_PAGE_SIZE;
      const after = new Map<number, number>();
      for (const a of this.arrivals) if (a.block === block) after.set(a.page, (after.get(a.page) ?? 0) + 1);
      const before = this.precopy.get(block) ?? new Set<number>();
      const discarded = this.discarded.get(block) ?? new Set<number>();
      const unit = this.o.hostPages?.get(block) ?? 1;
      for (let p = 0; p < pages; p++) {
        // A page sent before the switch and discarded (part of a host page that was not sent whole) comes again.
        const kept = before.has(p) && !discarded.has(p);
        const n = (after.get(p) ?? 0) + (kept ? 1 : 0);
        assert.ok(n <= 1, `page ${p} of ${block} arrived ${n} times`);
        if (n === 0) {
          // A page the snapshot does not hold, never placed: fine only if a fresh destination's RAM
          // needs nothing there — but with postcopy every page must be placed or it faults forever.
          assert.fail(`page ${p} of ${block} never arrived (its guest would wait for it forever)`);
        }
        if (unit === 1) assert.equal(discarded.has(p), !before.has(p), `page ${p} of ${block}: discarded iff not sent before the switch`);
        else if (!before.has(p)) assert.ok(discarded.has(p), `page ${p} of ${block}: not sent before the switch, yet not discarded`);
      }
    }
  }
}

async function run(o: FakeOptions & { postcopy: PostcopyOptions; stallTimeoutMs?: number }): Promise<{ fake: FakeDestination; summary?: SendSummary; error?: Error; running: number | undefined }> {
  const fake = new FakeDestination(o);
  const addr = await fake.listen();
  const h = send({ file: snapshot, to: addr, channels: o.channels, postcopy: { preempt: o.preempt, ...o.postcopy }, ...(o.stallTimeoutMs ? { stallTimeoutMs: o.stallTimeoutMs } : {}) });
  let running: number | undefined;
  h.on('postcopy-running', (e: { elapsedMs: number }) => { running = e.elapsedMs; });
  try {
    const summary = await h.done;
    return { fake, summary, running };
  } catch (e) {
    return { fake, error: e as Error, running };
  } finally {
    fake.close();
  }
}

const RAM = 'demo.ram';
const RAM_PAGES = 16 * 256;

describe('postcopy send into a fake destination', () => {
  for (const [channels, preempt] of [[2, false], [2, true], [0, false], [0, true]] as const) {
    test(`${channels} multifd channel(s), ${preempt ? 'preempt channel' : 'requests on main'}: requested pages first, every page once, discards exact`, async () => {
      // 16 MiB at 8 MiB/s: the background scan needs ~2 s, requests must not wait for it.
      const requests: PageRequest[] = [
        { block: RAM, start: (RAM_PAGES - 1) * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE },
        { start: (RAM_PAGES - 100) * TARGET_PAGE_SIZE, length: 2 * TARGET_PAGE_SIZE },
        { block: 'demo.rom', start: 8 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE },
      ];
      const r = await run({ channels, preempt, requests, postcopy: { precopyBytes: 1024 * 1024, bandwidth: 8 * 1024 * 1024 } });
      const { fake, summary } = r;
      assert.ifError(r.error);
      assert.deepEqual(fake.errors, []);
      assert.ok(summary);
      fake.assertComplete();
      assert.equal(fake.preemptSeen, preempt);
      // The switch in QEMU's order: ADVISE first, discards before the package; PING(0x42) answered.
      assert.equal(fake.commands[0], Command.OPEN_RETURN_PATH);
      assert.ok(fake.commands.includes(Command.POSTCOPY_ADVISE));
      assert.deepEqual(fake.pings.filter((v) => v > 1).sort((a, b) => a - b), [2, 3, 4, 0x42]);
      assert.ok(r.running !== undefined, 'postcopy-running was emitted');
      // 1 MiB before the switch: those pages do not come again.
      const pre = [...fake.precopy.values()].reduce((n, s) => n + s.size, 0);
      assert.ok(pre > 0 && pre <= 256 + 128, `pages before the switch: ${pre}`);
      assert.equal(summary.postcopy!['precopy-pages'] >= pre, true);
      if (channels > 0) assert.equal(fake.multifdSyncs, 2 * channels, 'setup and switch SYNC on every channel');
      // Requested pages arrive ahead of the pages before them in file order.
      const arrival = (block: string, page: number): Arrival => {
        const a = fake.arrivals.find((x) => x.block === block && x.page === page);
        assert.ok(a, `page ${page} of ${block} arrived`);
        return a;
      };
      for (const [block, page, before] of [[RAM, RAM_PAGES - 1, RAM_PAGES - 2], [RAM, RAM_PAGES - 100, RAM_PAGES - 101], [RAM, RAM_PAGES - 99, RAM_PAGES - 101]] as const) {
        const a = arrival(block, page);
        const b = arrival(block, before);
        assert.ok(a.seq < b.seq, `requested page ${page} (#${a.seq}) arrived before page ${before} (#${b.seq})`);
        assert.ok(a.seq < fake.requestsSentAt + 600, `requested page ${page} came soon after the request (#${a.seq}, requests at #${fake.requestsSentAt})`);
        if (preempt) assert.equal(a.via, 'preempt');
      }
      const pc = summary.postcopy!;
      assert.equal(pc.requests, 3);
      assert.equal(pc['requested-pages'], 4);
      assert.equal(pc.preempt, preempt);
      assert.equal(pc['preempt-pages'], preempt ? 4 : 0);
      assert.equal(pc['precopy-pages'] + pc['postcopy-pages'], [...contents.values()].reduce((n, b) => n + b.length / TARGET_PAGE_SIZE, 0));
      assert.ok(pc['run-time'] !== undefined && pc['run-time'] <= pc['complete-time']);
      assert.equal(summary.destination, 'confirmed');
    });
  }

  for (const [channels, preempt] of [[2, true], [0, false]] as const) {
    test(`hugepage-backed destination block, ${channels} channel(s)${preempt ? ' + preempt' : ''}: page size announced, requests and the background scan in whole host pages, the partly sent host page sent again whole`, async () => {
      const HUGE = 2 * 1024 * 1024;
      const unit = HUGE / TARGET_PAGE_SIZE;
      const requests: PageRequest[] = [
        { block: RAM, start: (RAM_PAGES - unit) * TARGET_PAGE_SIZE, length: HUGE },
        { start: 3 * HUGE, length: HUGE },
      ];
      const r = await run({
        channels, preempt, requests, hostPages: new Map([[RAM, unit]]),
        // Precopy ends inside a host page.
        postcopy: { pageSizes: { [RAM]: HUGE }, precopyBytes: 1024 * 1024 + TARGET_PAGE_SIZE, bandwidth: 8 * 1024 * 1024 },
      });
      assert.ifError(r.error);
      const { fake, summary } = r;
      assert.deepEqual(fake.errors, []);
      fake.assertComplete();
      assert.equal(fake.advisedSummary, HUGE | TARGET_PAGE_SIZE, 'ADVISE: the OR of the blocks\' page sizes');
      assert.deepEqual([...fake.blockPageSizes], [[RAM, HUGE], ['demo.rom', undefined]], 'only the hugepage block carries its page size');
      const pc = summary!.postcopy!;
      assert.deepEqual(pc['page-sizes'], { [RAM]: HUGE });
      assert.equal(pc['requested-pages'], 2 * unit, 'each request answered with its whole host page');
      if (preempt) assert.equal(pc['preempt-pages'], 2 * unit);
      const keptRam = [...(fake.precopy.get(RAM) ?? [])].filter((p) => !fake.discarded.get(RAM)?.has(p)).length;
      assert.equal(keptRam % unit, 0);
      assert.equal(fake.hostPagesPlaced.get(RAM), (RAM_PAGES - keptRam) / unit, 'every other host page placed whole after LISTEN');
      assert.ok((fake.precopy.get(RAM)?.size ?? 0) > keptRam, 'the host page cut by the precopy budget went again');
    });
  }

  test('page sizes that cannot be are refused before anything is sent', async () => {
    for (const [pageSizes, text] of [
      [{ 'nope.ram': 2 * 1024 * 1024 }, /"nope\.ram", which the snapshot does not have/],
      [{ [RAM]: 12288 }, /not a power of two/],
      [{ 'demo.rom': 2 * 1024 * 1024 }, /not a whole number of 2097152-byte pages/],
      [{ [RAM]: 1024 * 1024 * 1024 }, /supports them up to/],
    ] as const) {
      const fake = new FakeDestination({ channels: 0, preempt: false });
      const addr = await fake.listen();
      try {
        await assert.rejects(send({ file: snapshot, to: addr, channels: 0, postcopy: { pageSizes } }).done, (e: Error) => e instanceof InvalidOptionError && text.test(e.message));
        assert.equal(fake.sockets.length, 0, 'no connection made');
      } finally {
        fake.close();
      }
    }
  });

  test('a request for a block the snapshot lacks, or beyond used_length, fails with a PageRequestError that says so', async () => {
    for (const [req, problem, text] of [
      [{ block: 'nope.ram', start: 0, length: TARGET_PAGE_SIZE }, 'unknown-block', /"nope\.ram"/],
      [{ block: RAM, start: RAM_PAGES * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }, 'out-of-range', /beyond its used_length/],
      [{ start: 0, length: TARGET_PAGE_SIZE }, 'no-previous-block', /before naming a block/],
    ] as const) {
      const r = await run({ channels: 2, preempt: false, requests: [req], postcopy: { bandwidth: 4 * 1024 * 1024 } });
      assert.ok(r.error instanceof PageRequestError, `typed error for ${problem}: ${r.error}`);
      assert.equal(r.error.problem, problem);
      assert.match(r.error.message, text);
    }
  });

  test('a destination that dies in postcopy: a clear error that the guest is lost, no hang', async () => {
    const t0 = Date.now();
    const r = await run({ channels: 2, preempt: true, dieAfterPages: 200, postcopy: { bandwidth: 4 * 1024 * 1024 }, stallTimeoutMs: 10_000 });
    assert.ok(r.error instanceof PostcopyDestinationLostError, `${r.error}`);
    assert.match(r.error.message, /postcopy/);
    assert.match(r.error.message, /lost/);
    assert.ok(Date.now() - t0 < 8000, 'failed promptly');
  });
});

describe('PostcopyPages', () => {
  const src = {
    blockList: [{ name: 'a', usedLength: 64 * TARGET_PAGE_SIZE }, { name: 'b', usedLength: 8 * TARGET_PAGE_SIZE }],
    // Pages 10..19 and 40..63 of a are present; b has none.
    forEachRun(block: string, visit: (f: number, n: number) => boolean | void, from = 0): void {
      if (block !== 'a') return;
      for (const [f, n] of [[10, 10], [40, 24]] as const) {
        if (f + n <= from) continue;
        const s = Math.max(f, from);
        if (visit(s, f + n - s) === false) return;
      }
    },
  };

  test('background in file order with present/absent spans, requests first, each page once, bounded queue', () => {
    const p = new PostcopyPages(src, { maxQueuedRanges: 2 });
    p.markSent('a', 10, 5);
    assert.deepEqual(p.unsentRanges('a'), [{ start: 0, length: 10 * TARGET_PAGE_SIZE }, { start: 15 * TARGET_PAGE_SIZE, length: 49 * TARGET_PAGE_SIZE }]);
    const handed = new Set<string>(['a:10', 'a:11', 'a:12', 'a:13', 'a:14']);
    const take = (b: { block: string; spans: { first: number; count: number }[] }, why: string): void => {
      for (const s of b.spans) for (let q = s.first; q < s.first + s.count; q++) {
        const k = `${b.block}:${q}`;
        assert.ok(!handed.has(k), `${k} handed out twice (${why})`);
        handed.add(k);
      }
    };
    // A batch is consecutive unsent pages: it ends where the pages sent before the switch begin.
    const first = p.nextBackground(16)!;
    assert.deepEqual(first.spans, [{ first: 0, count: 10, present: false }]);
    take(first, 'background');
    const second = p.nextBackground(8)!;
    assert.deepEqual(second.spans, [{ first: 15, count: 5, present: true }, { first: 20, count: 3, present: false }]);
    take(second, 'background');
    p.request({ block: 'a', start: 50 * TARGET_PAGE_SIZE, length: 3 * TARGET_PAGE_SIZE });
    p.request({ start: 0, length: TARGET_PAGE_SIZE }); // already sent: ignored
    p.request({ start: 60 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE });
    p.request({ start: 61 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }); // queue full: dropped
    assert.equal(p.stats.alreadySent, 1);
    assert.equal(p.stats.dropped, 1);
    const r1 = p.nextRequested(64)!;
    assert.deepEqual(r1.spans, [{ first: 50, count: 3, present: true }]);
    take(r1, 'request');
    const r2 = p.nextRequested(64)!;
    assert.deepEqual(r2.spans, [{ first: 60, count: 1, present: true }]);
    take(r2, 'request');
    assert.equal(p.nextRequested(64), undefined);
    for (let b = p.nextBackground(7); b; b = p.nextBackground(7)) take(b, 'background');
    assert.ok(p.done);
    assert.equal(handed.size, 64 + 8, 'every page of both blocks, once');
  });

  test('host pages of 4 target pages: partly sent ones undone at the switch, requests and background whole', () => {
    const p = new PostcopyPages(src, { pageSizes: new Map([['a', 4 * TARGET_PAGE_SIZE]]) });
    assert.equal(p.hostPagePages('a'), 4);
    assert.equal(p.hostPagePages('b'), 1);
    assert.equal(p.maxHostPagePages, 4);
    p.markSent('a', 0, 4); // whole host page 0
    p.markSent('a', 10, 3); // parts of host pages 2 and 3
    p.markSent('b', 1, 1); // b has 4 KiB pages: stays
    assert.equal(p.alignToHostPages(), 3);
    assert.deepEqual(p.unsentRanges('a'), [{ start: 4 * TARGET_PAGE_SIZE, length: 60 * TARGET_PAGE_SIZE }]);
    assert.ok(p.isSent('b', 1));
    assert.throws(() => p.request({ block: 'a', start: 2 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE }), (e: PageRequestError) => e.problem === 'unaligned' && /16384-byte pages/.test(e.message));
    // A request for one target page's worth gets the whole host page.
    p.request({ block: 'a', start: 8 * TARGET_PAGE_SIZE, length: TARGET_PAGE_SIZE });
    const r = p.nextRequested(1)!;
    assert.deepEqual(r.spans, [{ first: 8, count: 2, present: false }, { first: 10, count: 2, present: true }]);
    assert.equal(r.pages, 4);
    // Background batches are whole host pages even when asked for fewer pages.
    const b1 = p.nextBackground(6)!;
    assert.deepEqual([b1.spans[0]!.first, b1.pages], [4, 4]);
    for (let b = p.nextBackground(7); b; b = p.nextBackground(7)) {
      if (b.block === 'a') {
        assert.equal(b.spans[0]!.first % 4, 0, 'starts on a host page');
        assert.equal(b.pages % 4, 0, 'whole host pages');
      }
    }
    assert.ok(p.done);
  });

  test('requests are checked: block, range, alignment, length', () => {
    const p = new PostcopyPages(src);
    assert.throws(() => p.request({ block: 'c', start: 0, length: 4096 }), (e: PageRequestError) => e.problem === 'unknown-block' && /"c"/.test(e.message));
    assert.throws(() => p.request({ block: 'b', start: 7 * 4096, length: 8192 }), (e: PageRequestError) => e.problem === 'out-of-range');
    assert.throws(() => p.request({ start: 100, length: 4096 }), (e: PageRequestError) => e.problem === 'unaligned');
    assert.throws(() => p.request({ start: 0, length: 0 }), (e: PageRequestError) => e.problem === 'empty');
  });
});
