/**
 * Helpers for the multifd compression interop tests: a guest blob that is half random, half
 * compressible; driving a QEMU source's multifd-compression by hand; reading the blob back out of
 * a mapped-ram snapshot; and a TCP proxy that corrupts one compressed multifd payload in transit.
 *
 * Every path QEMU is given must live under /tmp (QEMU 11 runs in a chroot sharing only /tmp).
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { MULTIFD_INIT_SIZE, MULTIFD_MAGIC, MULTIFD_PACKET_HEADER_SIZE, MultifdFlag, QEVM_MAGIC, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import type { QemuInstance } from './qemu.js';

const PAGE = TARGET_PAGE_SIZE;

const WORDS = (
  'migration multifd channel packet page zero normal sync flush stream deflate inflate zstd zlib ' +
  'guest memory block ramblock offset header payload level window dictionary frame literal match ' +
  'qemu source destination snapshot mapped bitmap device state section footer vmdesc return path'
).split(' ');

export interface MixedBlob {
  blob: Buffer;
  /** Pages of the first half: crypto-random (incompressible). */
  randomPages: number;
  /** Pages of the second half: text from a small dictionary (compresses several-fold). */
  textPages: number;
  /** Pages forced to zero (inside the random half). */
  zeroPages: readonly number[];
  /** Pages with any non-zero byte. */
  nonZeroPages: number;
}

/**
 * Writes a blob whose first half is random and second half is dictionary text (every page
 * different and non-zero, chosen by a seeded PRNG so levels 1 and 9 find different matches).
 */
export function writeMixedBlob(path: string, size: number, zeroPages: readonly number[] = []): MixedBlob {
  if (size % (2 * PAGE) !== 0) throw new RangeError('size must be a multiple of two pages');
  const blob = Buffer.alloc(size);
  const half = size / 2;
  randomFillSync(blob, 0, half);
  let seed = 0x9e3779b9;
  const rnd = (): number => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return seed >>> 0;
  };
  for (let p = half; p < size; p += PAGE) {
    let off = p + blob.write(`[page ${(p - half) / PAGE}] `, p, 'latin1');
    while (off < p + PAGE) {
      const w = WORDS[rnd() % WORDS.length]!;
      off += blob.write(w + ' ', off, Math.min(w.length + 1, p + PAGE - off), 'latin1');
    }
  }
  for (const z of zeroPages) {
    if (z * PAGE >= half) throw new RangeError('zero pages must lie in the random half');
    blob.fill(0, z * PAGE, (z + 1) * PAGE);
  }
  writeFileSync(path, blob);
  return { blob, randomPages: half / PAGE, textPages: half / PAGE, zeroPages, nonZeroPages: size / PAGE - zeroPages.length };
}

/** `size` bytes of pc.ram at `offset` as the snapshot holds them (absent pages read as zero). */
export async function snapshotRam(file: string, offset: number, size: number): Promise<Buffer> {
  const s = await MappedRamSnapshot.open(file);
  try {
    return await s.readPages('pc.ram', offset, size / PAGE);
  } finally {
    await s.close();
  }
}

export interface SourceSettings {
  channels?: number;
  compression: string;
  level?: number;
  /**
   * Turn the return-path capability on (default off). Without it a source completes as soon as it
   * has written everything, whatever the receiver thinks; with it, a receiver's SHUT(1) fails the
   * source's migration and the VM runs on.
   */
  returnPath?: boolean;
  /** Extra migrate-set-parameters. */
  params?: Record<string, unknown>;
}

/**
 * Sets a QEMU source up for a socket migration with multifd compression (mapped-ram off, multifd
 * on, bandwidth unlimited) and starts `migrate` to `uri`.
 */
export async function migrateCompressed(q: QemuInstance, uri: string, o: SourceSettings): Promise<void> {
  const have: { capability: string }[] = await q.qmp.execute('query-migrate-capabilities');
  await q.qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'multifd', state: true },
      { capability: 'return-path', state: o.returnPath ?? false },
      ...(have.some((c) => c.capability === 'mapped-ram') ? [{ capability: 'mapped-ram', state: false }] : []),
    ],
  });
  await q.qmp.execute('migrate-set-parameters', {
    'max-bandwidth': 107374182400,
    'multifd-channels': o.channels ?? 2,
    'multifd-compression': o.compression,
    ...(o.level !== undefined ? { [`multifd-${o.compression}-level`]: o.level } : {}),
    ...o.params,
  });
  await q.qmp.execute('migrate', { uri });
}

export interface Corruption {
  /** Index of the multifd connection (in accept order among multifd connections) that was corrupted. */
  connection: number;
  /** Byte offset of the packet header in that connection's stream. */
  headerOffset: number;
  packetNum: bigint;
  flags: number;
  normalPages: number;
  zeroPages: number;
  payloadSize: number;
  /** Offsets inside the payload that were flipped (XOR 0xff). */
  flipped: number[];
}

export interface ProxyReport {
  connections: number;
  mainConnections: number;
  multifdConnections: number;
  /** Data packets seen on all multifd channels before the corrupted one (SYNC and empty ones included). */
  packetsBefore: number;
  corruption?: Corruption;
}

export interface CorruptingProxy {
  /** tcp:127.0.0.1:PORT for the source's `migrate`. */
  address: string;
  report: ProxyReport;
  close(): Promise<void>;
}

export interface ProxyOptions {
  /** Where to forward, e.g. receive's tcp:127.0.0.1:PORT. */
  target: string;
  /** How many bytes in the middle of the payload to flip. Default 8. */
  flipBytes?: number;
  /**
   * Only a payload at most this fraction of its pages' size is corrupted (default 0.9): the bytes
   * must lie in compressed blocks. Deflate's stored blocks and zstd's raw blocks carry no check, so
   * flipping bytes there corrupts pages undetectably, in QEMU as much as here.
   */
  maxRatio?: number;
  /**
   * Only a packet with at least this many normal pages is corrupted (default 1). A tiny payload
   * (a packet of mostly zero pages) may hold its few bytes as raw literals, where a flip decodes to
   * wrong bytes of the right size: nothing in either format can notice that.
   */
  minNormalPages?: number;
  /** Called once the bytes are flipped (before the receiver sees them). */
  onCorrupt?: (c: Corruption, report: ProxyReport) => void;
}

/**
 * Forwards every connection to `target` byte for byte, except that on a multifd channel
 * (first 4 bytes 0x11223344) it flips a few bytes in the middle of the payload of the first data
 * packet that carries normal pages (at least minNormalPages, compressed: see maxRatio). The stream framing is
 * parsed, not guessed: 64-byte init, then 1344-byte headers each followed by next_packet_size bytes.
 */
export async function startCorruptingProxy(o: ProxyOptions): Promise<CorruptingProxy> {
  const m = /^tcp:(.+):(\d+)$/.exec(o.target);
  if (!m) throw new Error(`proxy target must be tcp:HOST:PORT (got ${o.target})`);
  const [host, port] = [m[1]!, Number(m[2])];
  const flipBytes = o.flipBytes ?? 8;
  const maxRatio = o.maxRatio ?? 0.9;
  const minNormalPages = o.minNormalPages ?? 1;
  const report: ProxyReport = { connections: 0, mainConnections: 0, multifdConnections: 0, packetsBefore: 0 };
  const sockets = new Set<Socket>();

  const server: Server = createServer((down) => {
    report.connections++;
    const up = connect({ host, port });
    for (const s of [down, up]) {
      sockets.add(s);
      s.setNoDelay(true);
      s.on('error', () => {});
      s.on('close', () => sockets.delete(s));
    }
    // Either side closing closes the other: the source must see the receiver's failure.
    down.on('close', () => up.destroy());
    up.on('close', () => down.destroy());
    up.pipe(down);

    let first: Buffer | undefined = Buffer.alloc(0);
    let corrupt: ((chunk: Buffer) => void) | undefined;
    down.on('data', (chunk: Buffer) => {
      if (first !== undefined) {
        first = Buffer.concat([first, chunk]);
        if (first.length < 4) return;
        const magic = first.readUInt32BE(0);
        if (magic === QEVM_MAGIC) report.mainConnections++;
        if (magic === MULTIFD_MAGIC) {
          // Every channel is watched: which channel gets the first packet worth corrupting depends
          // on scheduling (a CI run once saw all of them go to channel 1). The shared report makes
          // sure only one packet is corrupted.
          const index = report.multifdConnections++;
          corrupt = packetCorrupter(index, report, flipBytes, maxRatio, minNormalPages, o.onCorrupt);
        }
        chunk = first;
        first = undefined;
      }
      corrupt?.(chunk);
      if (!up.write(chunk)) {
        down.pause();
        up.once('drain', () => down.resume());
      }
    });
    down.on('end', () => up.end());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const addr = server.address();
  if (!addr || typeof addr !== 'object') throw new Error('proxy did not bind');
  return {
    address: `tcp:127.0.0.1:${addr.port}`,
    report,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

/** A byte-stream walker over one multifd channel that flips payload bytes of one packet in place. */
function packetCorrupter(
  connection: number,
  report: ProxyReport,
  flipBytes: number,
  maxRatio: number,
  minNormalPages: number,
  onCorrupt: ProxyOptions['onCorrupt'],
): (chunk: Buffer) => void {
  let pos = 0; // stream offset of chunk[0]
  let state: 'init' | 'header' | 'payload' = 'init';
  let left = MULTIFD_INIT_SIZE; // bytes left in the current structure
  const header = Buffer.alloc(MULTIFD_PACKET_HEADER_SIZE);
  let headerOffset = 0;
  let target: { from: number; to: number } | undefined; // stream offsets to flip
  let done = false;

  return (chunk: Buffer) => {
    let i = 0;
    while (i < chunk.length) {
      const n = Math.min(left, chunk.length - i);
      if (state === 'header') chunk.copy(header, MULTIFD_PACKET_HEADER_SIZE - left, i, i + n);
      if (state === 'payload' && target) {
        const from = Math.max(target.from, pos + i);
        const to = Math.min(target.to, pos + i + n);
        for (let s = from; s < to; s++) chunk[s - pos] ^= 0xff;
      }
      i += n;
      left -= n;
      if (left > 0) break;
      // One structure complete: move on to the next.
      if (state === 'init' || state === 'payload') {
        if (state === 'payload' && target) {
          target = undefined;
          done = true;
          onCorrupt?.(report.corruption!, report);
        }
        state = 'header';
        headerOffset = pos + i;
        left = MULTIFD_PACKET_HEADER_SIZE;
        continue;
      }
      const flags = header.readUInt32BE(8);
      const normalPages = header.readUInt32BE(16);
      const next = header.readUInt32BE(20);
      const compressed = (flags & MultifdFlag.COMPRESSION_MASK) !== 0;
      const size = compressed ? next : normalPages * PAGE;
      const start = pos + i;
      if (!done && !report.corruption && normalPages > 0) {
        if (compressed && normalPages >= minNormalPages && size >= 4 * flipBytes && size <= maxRatio * normalPages * PAGE) {
          const mid = start + Math.floor(size / 2) - Math.floor(flipBytes / 2);
          target = { from: mid, to: mid + flipBytes };
          report.corruption = {
            connection,
            headerOffset,
            packetNum: header.readBigUInt64BE(24),
            flags,
            normalPages,
            zeroPages: header.readUInt32BE(32),
            payloadSize: size,
            flipped: Array.from({ length: flipBytes }, (_, k) => mid - start + k),
          };
        } else {
          report.packetsBefore++;
        }
      } else if (!done && !report.corruption) {
        report.packetsBefore++;
      }
      if (size > 0) {
        state = 'payload';
        left = size;
      } else {
        if (target) {
          target = undefined;
          done = true;
          onCorrupt?.(report.corruption!, report);
        }
        state = 'header';
        headerOffset = start;
        left = MULTIFD_PACKET_HEADER_SIZE;
      }
    }
    pos += chunk.length;
  };
}

export interface CliReceive {
  /** Where it listens (tcp:127.0.0.1:PORT). */
  address: string;
  /** Resolves when the process exits. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }>;
  kill(): void;
}

/**
 * Runs `multifd receive` as a child process (as a user would) on a free local port and resolves
 * once it listens; extra CLI arguments in `args`.
 */
export async function startCliReceive(bin: string, out: string, args: string[], timeoutMs = 10_000): Promise<CliReceive> {
  const srv = createServer();
  await new Promise<void>((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  const address = `tcp:127.0.0.1:${port}`;
  const t0 = Date.now();
  const proc = spawn(process.execPath, [bin, 'receive', '--listen', address, '--out', out, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout.on('data', (b: Buffer) => { stdout += b.toString(); });
  proc.stderr.on('data', (b: Buffer) => { stderr += b.toString(); });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }>((resolve) => {
    proc.once('exit', (code, signal) => {
      // Let the pipes drain.
      setTimeout(() => resolve({ code, signal, stdout, stderr, ms: Date.now() - t0 }), 50);
    });
  });
  const deadline = Date.now() + timeoutMs;
  while (!/listening on /.test(stderr)) {
    if (proc.exitCode !== null || Date.now() > deadline) {
      proc.kill('SIGKILL');
      const r = await exited;
      throw new Error(`multifd receive did not start listening (exit ${r.code}): ${r.stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { address, exited, kill: () => { if (proc.exitCode === null) proc.kill('SIGKILL'); } };
}
