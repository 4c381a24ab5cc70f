/**
 * QMP client over a unix or TCP stream socket. Used both by tests and by the CLI
 * to drive a real QEMU through a migration.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import {
  QmpLineSplitter,
  QmpProtocolError,
  encodeQmpCommand,
  type QmpGreeting,
  type QmpMessage,
} from '../codec/qmp.js';

import { InvalidOptionError, QmpCommandError, QmpConnectionError } from '../codec/errors.js';
export { QmpCommandError, QmpConnectionError } from '../codec/errors.js';

export type QmpAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

export function parseQmpAddress(address: string): QmpAddress {
  if (address.startsWith('unix:')) return { kind: 'unix', path: address.slice(5) };
  if (address.startsWith('tcp:')) {
    const rest = address.slice(4);
    const colon = rest.lastIndexOf(':');
    if (colon < 0) throw new InvalidOptionError(`invalid QMP address ${address}: expected tcp:host:port`);
    let host = rest.slice(0, colon);
    // Accept [::1]:4444 style so IPv6 literals are unambiguous.
    if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
    const port = Number(rest.slice(colon + 1));
    if (!Number.isInteger(port) || port <= 0 || port > 65535) {
      throw new InvalidOptionError(`invalid QMP address ${address}: bad port`);
    }
    return { kind: 'tcp', host: host || 'localhost', port };
  }
  if (/^[a-z]+:/i.test(address) && !address.startsWith('/') && !address.startsWith('.')) {
    throw new InvalidOptionError(`invalid QMP address ${address}: expected unix:PATH, tcp:HOST:PORT or a socket path`);
  }
  return { kind: 'unix', path: address };
}

export interface QmpConnectOptions {
  /** Covers connecting, the greeting and qmp_capabilities together. */
  timeoutMs?: number;
}

export interface QmpExecuteOptions {
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

export interface QmpClient {
  on(event: 'event', listener: (name: string, data: Record<string, unknown>, timestamp: { seconds: number; microseconds: number }) => void): this;
  on(event: 'close', listener: (err?: Error) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}

export class QmpClient extends EventEmitter {
  readonly address: string;
  private readonly socket: net.Socket;
  private readonly splitter = new QmpLineSplitter();
  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private closedError: Error | undefined;
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | undefined;
  private _greeting: QmpGreeting | undefined;

  private constructor(address: string, socket: net.Socket) {
    super();
    this.address = address;
    this.socket = socket;
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) => {
      // QEMU resets the socket when it exits (e.g. after quit) with a reply or event still
      // unread; to callers that is simply the connection closing.
      const detail = err.code === 'ECONNRESET' || err.code === 'EPIPE' ? `(${err.code})` : `: ${err.message}`;
      this.shutdown(new QmpConnectionError(address, `QMP connection to ${address} closed ${detail}`, { cause: err }));
    });
    socket.on('close', () => this.shutdown(new QmpConnectionError(address, `QMP connection to ${address} closed`)));
  }

  static async connect(address: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 10_000;
    const addr = parseQmpAddress(address);
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = addr.kind === 'unix'
        ? net.createConnection({ path: addr.path })
        : net.createConnection({ host: addr.host, port: addr.port });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new QmpConnectionError(address, `QMP connect to ${address} timed out after ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        s.destroy();
        const why = err.code === 'ENOENT' ? 'socket does not exist'
          : err.code === 'ECONNREFUSED' ? 'connection refused (is QEMU running with -qmp on this address?)'
          : err.message;
        reject(new QmpConnectionError(address, `cannot connect to QMP at ${address}: ${why}`, { cause: err }));
      });
    });

    const client = new QmpClient(address, socket);
    try {
      await client.handshake(timeoutMs);
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  /** The server greeting, including QEMU's version. */
  get greeting(): QmpGreeting | undefined {
    return this._greeting;
  }

  get closed(): boolean {
    return this.closedError !== undefined;
  }

  private async handshake(timeoutMs: number): Promise<void> {
    const greeting = await new Promise<QmpGreeting>((resolve, reject) => {
      if (this._greeting) return resolve(this._greeting);
      if (this.closedError) return reject(this.closedError);
      const timer = setTimeout(() => {
        this.greetingWaiter = undefined;
        reject(new QmpConnectionError(this.address, `no QMP greeting from ${this.address} within ${timeoutMs} ms (QEMU serves one client per QMP socket: is another client connected? Add a second -qmp socket for multifd)`));
      }, timeoutMs);
      this.greetingWaiter = {
        resolve: (g) => { clearTimeout(timer); resolve(g); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      };
    });
    this._greeting = greeting;
    await this.execute('qmp_capabilities', undefined, { timeoutMs });
  }

  execute<T = any>(command: string, args?: object, opts: QmpExecuteOptions = {}): Promise<T> {
    if (this.closedError) {
      return Promise.reject(new QmpConnectionError(this.address, `${this.closedError.message} (while sending ${command})`));
    }
    const id = `multifd-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = {
        command,
        resolve: resolve as (v: unknown) => void,
        reject,
        timer: undefined,
      };
      if (opts.timeoutMs !== undefined) {
        p.timer = setTimeout(() => {
          this.pending.delete(id);
          reject(new QmpConnectionError(this.address, `QMP ${command} on ${this.address} timed out after ${opts.timeoutMs} ms`));
        }, opts.timeoutMs);
      }
      this.pending.set(id, p);
      this.socket.write(encodeQmpCommand(command, args, id));
    });
  }

  /**
   * Resolves with the data of the next event called `name` (optionally matching a predicate).
   * Register it before triggering the action that produces the event, or the event can be missed.
   */
  waitForEvent(
    name: string,
    timeoutMs = 30_000,
    predicate?: (data: Record<string, unknown>) => boolean,
  ): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      if (this.closedError) return reject(this.closedError);
      const cleanup = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (ev: string, data: Record<string, unknown>) => {
        if (ev !== name || (predicate && !predicate(data))) return;
        cleanup();
        resolve(data);
      };
      const onClose = (err?: Error) => {
        cleanup();
        reject(err ?? new QmpConnectionError(this.address, `QMP connection to ${this.address} closed`));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpConnectionError(this.address, `timed out after ${timeoutMs} ms waiting for QMP event ${name} on ${this.address}`));
      }, timeoutMs);
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  close(): void {
    this.socket.destroy();
    this.shutdown(new QmpConnectionError(this.address, `QMP connection to ${this.address} closed`));
  }

  private onData(chunk: Buffer): void {
    let msgs: QmpMessage[];
    try {
      msgs = this.splitter.push(chunk);
    } catch (err) {
      // The replies and events that came before the bad line are real: a command waiting for
      // one of them gets it instead of the protocol error.
      if (err instanceof QmpProtocolError) for (const m of err.messages) this.dispatch(m);
      this.socket.destroy();
      this.shutdown(new QmpConnectionError(this.address, `QMP protocol error on ${this.address}: ${(err as Error).message}`, { cause: err }));
      return;
    }
    for (const m of msgs) this.dispatch(m);
  }

  private dispatch(m: QmpMessage): void {
    switch (m.kind) {
      case 'greeting': {
        const w = this.greetingWaiter;
        this.greetingWaiter = undefined;
        this._greeting = m;
        w?.resolve(m);
        return;
      }
      case 'event':
        this.emit('event', m.event, m.data, m.timestamp);
        return;
      case 'return':
      case 'error': {
        const id = m.id === undefined ? undefined : String(m.id);
        const p = id === undefined ? undefined : this.pending.get(id);
        if (!p || id === undefined) {
          // Replies without our id come from QEMU failing to parse a command; they cannot be
          // matched, so surface them instead of silently dropping.
          this.emit('unmatched', m);
          return;
        }
        this.pending.delete(id);
        if (p.timer) clearTimeout(p.timer);
        if (m.kind === 'return') p.resolve(m.return);
        else p.reject(new QmpCommandError(p.command, m.error.class, m.error.desc));
        return;
      }
    }
  }

  private shutdown(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    this.greetingWaiter?.reject(err);
    this.greetingWaiter = undefined;
    for (const [, p] of this.pending) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(new QmpConnectionError(this.address, `${err.message} (while waiting for ${p.command})`, { cause: err }));
    }
    this.pending.clear();
    this.emit('close', err);
  }
}
