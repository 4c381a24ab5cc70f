/**
 * Helpers for the fault matrix (test/interop/faults.test.ts, docs/faults.md):
 *
 * - GateProxy: a TCP proxy between a migration's sender and receiver that understands enough of
 *   the stream to stop it at a phase. It tells main from multifd connections by their magic,
 *   parses the main channel with our MainStreamParser, and can hold every connection at
 *   "setup" (right after the RAM START section header: the receiver has the header and the
 *   configuration, no block list, no page), "iteration" (after N MULTIFD_FLUSH records and M
 *   bytes of multifd traffic) or "device-state" (at most 512 bytes into the device state, so the
 *   receiver has the final RAM section but neither the whole device state nor QEMU_VM_EOF). While it
 *   holds, nothing more is forwarded in either direction and the sockets are paused, so TCP
 *   back-pressure keeps both ends where they are. The device-state hold stops the main channel
 *   only: the multifd channels deliver what the sender wrote before its device state (as the kernel
 *   would if the sender died then; see quiet()). A hold is final: the test then kills a peer
 *   and/or calls cut(), which destroys every connection on both sides (what either end sees when
 *   the other one dies). stall() stops forwarding one multifd channel while the rest go on.
 * - MigrateRedirect: a QMP proxy for `save`, which hands QEMU the address it listens on itself:
 *   it rewrites the URI of save's `migrate` to a GateProxy in front of that address.
 * - spawnCli: the CLI as a child process with its pid, stderr so far, and a signal to send.
 * - tmpfs mounts (small, or read-only) for disk-full and read-only output folders.
 *
 * Every path QEMU sees must be under /tmp (QEMU 11 runs in a chroot that shares only /tmp).
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { fileURLToPath } from 'node:url';
import { StringDecoder } from 'node:string_decoder';
import { MULTIFD_MAGIC, QEVM_MAGIC } from '../../src/codec/constants.js';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';

export const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));

export type Phase = 'setup' | 'iteration' | 'device-state';

export interface HoldSpec {
  phase: Phase;
  /** iteration: MULTIFD_FLUSH records seen on the main channel first (a QEMU source sends one at setup and one per round). */
  minFlushes?: number;
  /** iteration: bytes forwarded on all multifd channels first. */
  minMultifdBytes?: number;
}

export interface GateStats {
  connections: number;
  mainConnections: number;
  multifdConnections: number;
  /** Bytes forwarded sender → receiver on the main channel(s). */
  mainBytes: number;
  /** Bytes forwarded sender → receiver on all multifd channels. */
  multifdBytes: number;
  /** MULTIFD_FLUSH records forwarded on the main channel. */
  flushes: number;
  /** Device-state bytes forwarded on the main channel. */
  deviceStateBytes: number;
  /** What the main-channel parser last saw. */
  mainPhase: 'none' | 'header' | 'setup' | 'ram' | 'device-state';
  /** Set when our parser could not follow the main stream (the hold then cannot trigger on it). */
  parseError?: string;
}

export interface Held extends GateStats {
  phase: Phase;
  /** Milliseconds since the proxy started. */
  atMs: number;
}

interface Link {
  down: Socket; // from the sender (the one that connects)
  up: Socket; // to the receiver (the target)
  kind: 'unknown' | 'main' | 'multifd';
  multifdIndex: number;
  first: Buffer | undefined;
  parser: MainStreamParser | undefined;
  parsed: number;
  forwarded: number;
  stalled: boolean;
  stallAfter: number | undefined;
}

export class GateProxy {
  readonly stats: GateStats = {
    connections: 0, mainConnections: 0, multifdConnections: 0, mainBytes: 0, multifdBytes: 0, flushes: 0, deviceStateBytes: 0, mainPhase: 'none',
  };
  private readonly links = new Set<Link>();
  private readonly startedAt = Date.now();
  private frozen = false;
  /** Only the main channel is held (device-state hold). */
  private frozenMain = false;
  private isCut = false;
  private hold: { spec: HoldSpec; resolve: (h: Held) => void } | undefined;
  private stallSpec: { channel: number; afterBytes: number; resolve: (s: GateStats) => void } | undefined;

  private constructor(private readonly server: Server, readonly address: string, private readonly target: { host: string; port: number }) {}

  /** Forwards to `target` (tcp:HOST:PORT). */
  static async start(target: string): Promise<GateProxy> {
    const m = /^tcp:(.+):(\d+)$/.exec(target);
    if (!m) throw new Error(`GateProxy target must be tcp:HOST:PORT (got ${target})`);
    let proxy: GateProxy | undefined;
    const server = createServer((s) => proxy?.accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    const port = (server.address() as { port: number }).port;
    proxy = new GateProxy(server, `tcp:127.0.0.1:${port}`, { host: m[1]!, port: Number(m[2]) });
    return proxy;
  }

  /** Arms a hold: resolves once every connection is held at `spec`. */
  holdAt(spec: HoldSpec): Promise<Held> {
    return new Promise((resolve) => { this.hold = { spec, resolve }; });
  }

  /** Multifd connection `channel` (in connect order) stops forwarding after `afterBytes`; resolves when it does. */
  stall(channel: number, afterBytes: number): Promise<GateStats> {
    return new Promise((resolve) => {
      this.stallSpec = { channel, afterBytes, resolve };
      for (const l of this.links) if (l.kind === 'multifd' && l.multifdIndex === channel) l.stallAfter = afterBytes;
    });
  }

  /**
   * Resolves once no multifd byte was forwarded for `ms` (at most `maxMs`): after a device-state
   * hold, the multifd channels have delivered everything their sender wrote.
   */
  async quiet(ms = 300, maxMs = 5000): Promise<GateStats> {
    const deadline = Date.now() + maxMs;
    let last = this.stats.multifdBytes;
    let since = Date.now();
    while (Date.now() - since < ms && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 50));
      if (this.stats.multifdBytes !== last) {
        last = this.stats.multifdBytes;
        since = Date.now();
      }
    }
    return { ...this.stats };
  }

  /** Destroys every connection, both sides; later connections are closed at once. */
  cut(): void {
    this.isCut = true;
    for (const l of this.links) {
      l.down.destroy();
      l.up.destroy();
    }
  }

  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(down: Socket): void {
    if (this.isCut) {
      down.destroy();
      return;
    }
    this.stats.connections++;
    const up = connect(this.target);
    const link: Link = { down, up, kind: 'unknown', multifdIndex: -1, first: Buffer.alloc(0), parser: undefined, parsed: 0, forwarded: 0, stalled: false, stallAfter: undefined };
    this.links.add(link);
    for (const s of [down, up]) {
      s.setNoDelay(true);
      s.on('error', () => {});
    }
    // Either side closing closes the other, as a direct connection would.
    down.on('close', () => up.destroy());
    up.on('close', () => down.destroy());
    down.on('end', () => { if (!this.frozen && !link.stalled && !(this.frozenMain && link.kind === 'main')) up.end(); });
    up.on('end', () => { if (!this.frozen) down.end(); });
    if (this.frozen) {
      down.pause();
      up.pause();
    }
    // Return path (receiver → sender): forwarded unless held.
    up.on('data', (chunk: Buffer) => {
      if (this.frozen || this.isCut || (this.frozenMain && link.kind === 'main')) {
        up.pause();
        return;
      }
      if (!down.write(chunk)) {
        up.pause();
        down.once('drain', () => { if (!this.frozen) up.resume(); });
      }
    });
    down.on('data', (chunk: Buffer) => this.forward(link, chunk));
  }

  private forward(link: Link, chunk: Buffer): void {
    const { down, up } = link;
    if (this.frozen || this.isCut || link.stalled || (this.frozenMain && link.kind === 'main')) {
      // Held for good: what comes now is dropped (the test kills or cuts next).
      down.pause();
      return;
    }
    if (link.first !== undefined) {
      link.first = Buffer.concat([link.first, chunk]);
      if (link.first.length < 4) return;
      chunk = link.first;
      link.first = undefined;
      const magic = chunk.readUInt32BE(0);
      if (magic === QEVM_MAGIC) {
        link.kind = 'main';
        link.parser = new MainStreamParser();
        this.stats.mainConnections++;
        if (this.stats.mainPhase === 'none') this.stats.mainPhase = 'header';
      } else if (magic === MULTIFD_MAGIC) {
        link.kind = 'multifd';
        link.multifdIndex = this.stats.multifdConnections++;
        if (this.stallSpec && this.stallSpec.channel === link.multifdIndex) link.stallAfter = this.stallSpec.afterBytes;
      }
    }
    let send = chunk;
    let holdNow = false;
    if (link.kind === 'main' && link.parser) {
      const cut = this.parseMain(link, chunk);
      if (cut !== undefined) {
        send = chunk.subarray(0, cut);
        holdNow = true;
      }
    } else if (link.kind === 'multifd') {
      if (link.stallAfter !== undefined && link.forwarded + chunk.length >= link.stallAfter) {
        send = chunk.subarray(0, Math.max(0, link.stallAfter - link.forwarded));
        link.stalled = true;
      }
      this.stats.multifdBytes += send.length;
      const h = this.hold?.spec;
      if (h?.phase === 'iteration' && this.stats.flushes >= (h.minFlushes ?? 0) && this.stats.multifdBytes >= (h.minMultifdBytes ?? 0)) holdNow = true;
    }
    if (link.kind === 'main') this.stats.mainBytes += send.length;
    link.forwarded += send.length;
    if (send.length > 0 && !up.write(send)) {
      down.pause();
      up.once('drain', () => { if (!this.frozen && !link.stalled && !this.isCut && !(this.frozenMain && link.kind === 'main')) down.resume(); });
    }
    if (link.stalled) {
      down.pause();
      const s = this.stallSpec;
      this.stallSpec = undefined;
      s?.resolve({ ...this.stats });
    }
    if (holdNow) this.freeze(this.hold?.spec.phase === 'device-state');
  }

  /** Feeds the main channel's bytes to the parser; returns how many bytes of `chunk` to forward when the hold triggers. */
  private parseMain(link: Link, chunk: Buffer): number | undefined {
    const p = link.parser!;
    const base = link.parsed;
    link.parsed += chunk.length;
    p.push(chunk);
    const spec = this.hold?.spec;
    try {
      for (let ev = p.next(); ev !== null; ev = p.next()) {
        switch (ev.type) {
          case 'section':
            if (ev.kind === 'start' && ev.idstr === 'ram') {
              this.stats.mainPhase = 'setup';
              if (spec?.phase === 'setup') return p.offset - base;
            } else if (ev.idstr === 'ram') {
              this.stats.mainPhase = 'ram';
            }
            break;
          case 'ram-flush':
            this.stats.flushes++;
            if (spec?.phase === 'iteration' && this.stats.flushes >= (spec.minFlushes ?? 0) && this.stats.multifdBytes >= (spec.minMultifdBytes ?? 0)) {
              return p.offset - base;
            }
            break;
          case 'device-state': {
            const len = ev.data.reduce((n, b) => n + b.length, 0);
            const start = p.offset - len;
            if (spec?.phase === 'device-state') {
              // A few hundred bytes: inside the first device sections, well before QEMU_VM_EOF (a
              // pc guest's device state is tens of KiB), so the receiver cannot have loaded it all.
              const keep = Math.max(1, Math.min(512, Math.floor(len / 2)));
              this.stats.deviceStateBytes += keep;
              this.stats.mainPhase = 'device-state';
              return start + keep - base;
            }
            this.stats.deviceStateBytes += len;
            this.stats.mainPhase = 'device-state';
            break;
          }
          default:
            break;
        }
      }
    } catch (e) {
      this.stats.parseError = (e as Error).message;
      link.parser = undefined;
    }
    return undefined;
  }

  private freeze(mainOnly: boolean): void {
    if (this.frozen || this.frozenMain) return;
    if (mainOnly) this.frozenMain = true;
    else this.frozen = true;
    for (const l of this.links) {
      if (mainOnly && l.kind !== 'main') continue;
      l.down.pause();
      l.up.pause();
    }
    const h = this.hold;
    this.hold = undefined;
    h?.resolve({ ...this.stats, phase: h.spec.phase, atMs: Date.now() - this.startedAt });
  }
}

/**
 * A QMP proxy between `save` and its VM. save listens on a free port and hands that same address to
 * QEMU in `migrate`, so a GateProxy cannot be put between them on the command line; this proxy
 * forwards a QMP unix socket line by line and rewrites the URI of `migrate` to a GateProxy in front
 * of save's address. `arm` runs on the GateProxy before QEMU sees the command, so a hold armed there
 * sees the stream from its first byte. A retried `migrate` (save retries "duplicate yank instance")
 * goes through the same GateProxy. Closing either side of a QMP connection closes the other.
 */
export class MigrateRedirect {
  /** The GateProxy, once save issued `migrate`. */
  gateProxy: GateProxy | undefined;
  /** Resolves with the GateProxy once save issued `migrate` (its hold already armed). */
  readonly gate: Promise<GateProxy>;
  private gateResolve!: (g: GateProxy) => void;
  private readonly conns = new Set<Socket>();

  private constructor(private readonly server: Server, readonly address: string, private readonly qemuSocket: string, private readonly arm: (gate: GateProxy) => void) {
    this.gate = new Promise((resolve) => { this.gateResolve = resolve; });
  }

  /** Listens on unix:`listenPath` and forwards to QEMU's QMP unix socket `qemuSocket`. */
  static async start(qemuSocket: string, listenPath: string, arm: (gate: GateProxy) => void): Promise<MigrateRedirect> {
    let r: MigrateRedirect | undefined;
    const server = createServer((s) => r?.accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listenPath, () => resolve());
    });
    r = new MigrateRedirect(server, `unix:${listenPath}`, qemuSocket, arm);
    return r;
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await this.gateProxy?.close();
  }

  private accept(client: Socket): void {
    const qemu = connect(this.qemuSocket);
    for (const s of [client, qemu]) {
      this.conns.add(s);
      s.on('error', () => {});
      s.on('close', () => this.conns.delete(s));
    }
    client.on('close', () => qemu.destroy());
    qemu.on('close', () => client.destroy());
    qemu.pipe(client);
    // save → QEMU: one JSON command per line, in order (a rewrite may wait for the GateProxy).
    const text = new StringDecoder('utf8');
    let buf = '';
    let chain = Promise.resolve();
    client.on('data', (chunk: Buffer) => {
      buf += text.write(chunk);
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl + 1);
        buf = buf.slice(nl + 1);
        chain = chain.then(() => this.rewrite(line)).then((out) => { if (!qemu.destroyed) qemu.write(out); }, () => { qemu.destroy(); });
      }
    });
  }

  private async rewrite(line: string): Promise<string> {
    let msg: { execute?: unknown; arguments?: { uri?: unknown } };
    try {
      msg = JSON.parse(line);
    } catch {
      return line;
    }
    if (msg.execute !== 'migrate' || typeof msg.arguments?.uri !== 'string') return line;
    if (!this.gateProxy) {
      this.gateProxy = await GateProxy.start(msg.arguments.uri);
      this.arm(this.gateProxy);
      this.gateResolve(this.gateProxy);
    }
    msg.arguments.uri = this.gateProxy.address;
    return JSON.stringify(msg) + '\n';
  }
}

export interface CliRun {
  pid: number;
  /** stdout / stderr so far. */
  stdout(): string;
  stderr(): string;
  /** Resolves once the process exited (and its pipes drained). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }>;
  /** Resolves with the first match of `re` on stderr; rejects if the process exits first or after `timeoutMs`. */
  waitStderr(re: RegExp, timeoutMs?: number): Promise<RegExpExecArray>;
  kill(signal?: NodeJS.Signals): void;
}

/** `node bin/multifd.js ARGS` as a child process. */
export function spawnCli(args: string[]): CliRun {
  const t0 = Date.now();
  const proc = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout.on('data', (b: Buffer) => { stdout += b.toString(); });
  proc.stderr.on('data', (b: Buffer) => { stderr += b.toString(); });
  let gone = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; ms: number }>((resolve) => {
    proc.once('close', (code, signal) => {
      gone = true;
      resolve({ code, signal, stdout, stderr, ms: Date.now() - t0 });
    });
  });
  return {
    pid: proc.pid!,
    stdout: () => stdout,
    stderr: () => stderr,
    exited,
    async waitStderr(re: RegExp, timeoutMs = 15_000): Promise<RegExpExecArray> {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const m = re.exec(stderr);
        if (m) return m;
        if (gone) throw new Error(`multifd ${args[0]} exited (${proc.exitCode ?? proc.signalCode}) before printing ${re}: ${stderr.trim()}`);
        if (Date.now() > deadline) throw new Error(`multifd ${args[0]} printed no ${re} within ${timeoutMs} ms: ${stderr.trim()}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    },
    kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (!gone) proc.kill(signal);
    },
  };
}

export interface Mount {
  dir: string;
  unmount(): void;
}

/** A fresh tmpfs of `sizeMiB` under /tmp, optionally remounted read-only. Needs root (CAP_SYS_ADMIN). */
export function mountTmpfs(sizeMiB: number, o: { readOnly?: boolean } = {}): Mount {
  const dir = mkdtempSync('/tmp/multifd-fault-mnt-');
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0755`, 'tmpfs', dir], { stdio: 'pipe' });
  } catch (e) {
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
  const unmount = (): void => {
    try {
      execFileSync('umount', [dir], { stdio: 'pipe' });
    } catch {
      try { execFileSync('umount', ['-l', dir], { stdio: 'pipe' }); } catch { /* not mounted */ }
    }
    rmSync(dir, { recursive: true, force: true });
  };
  if (o.readOnly) {
    try {
      execFileSync('mount', ['-o', 'remount,ro', dir], { stdio: 'pipe' });
    } catch (e) {
      unmount();
      throw e;
    }
  }
  return { dir, unmount };
}

let mountable: boolean | undefined;

/** True when this process may mount a tmpfs (root with CAP_SYS_ADMIN); tried once. */
export function canMountTmpfs(): boolean {
  if (mountable === undefined) {
    try {
      mountTmpfs(1, { readOnly: true }).unmount();
      mountable = true;
    } catch {
      mountable = false;
    }
  }
  return mountable;
}
