/**
 * QMP wire format: newline-delimited JSON objects over a byte stream.
 * Pure codec, no I/O, so it can be driven by any transport and fuzzed in isolation.
 */

export const DEFAULT_QMP_MAX_LINE = 16 * 1024 * 1024;

export type QmpId = string | number;

export interface QmpGreeting {
  kind: 'greeting';
  QMP: {
    version: {
      qemu: { major: number; minor: number; micro: number };
      package: string;
    };
    capabilities: string[];
  };
}

export interface QmpReturn {
  kind: 'return';
  return: unknown;
  id?: QmpId;
}

export interface QmpErrorReply {
  kind: 'error';
  error: { class: string; desc: string };
  id?: QmpId;
}

export interface QmpEvent {
  kind: 'event';
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export type QmpMessage = QmpGreeting | QmpReturn | QmpErrorReply | QmpEvent;

import { QmpProtocolError } from './errors.js';
export { QmpProtocolError, type QmpProtocolErrorCode } from './errors.js';

export function encodeQmpCommand(execute: string, args?: object, id?: QmpId): Buffer {
  const msg: Record<string, unknown> = { execute };
  // QEMU rejects an explicit "arguments": null, so omit the key entirely when there are none.
  if (args !== undefined) msg['arguments'] = args;
  if (id !== undefined) msg['id'] = id;
  return Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isId(v: unknown): v is QmpId {
  return typeof v === 'string' || typeof v === 'number';
}

/**
 * A short text of a value for an error message. JSON.stringify recurses: a line that JSON.parse
 * accepted (it nests as deep as it likes) could make it throw a RangeError instead of our error.
 */
function preview(v: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(v) ?? String(v);
  } catch {
    text = Array.isArray(v) ? '[...]' : isObject(v) ? `{${Object.keys(v).slice(0, 8).map((k) => JSON.stringify(k)).join(', ')}: ...}` : String(v);
  }
  return text.length > 200 ? text.slice(0, 200) + '...' : text;
}

/** Classifies one parsed JSON value; throws if it is not any QMP server message. */
export function classifyQmpMessage(v: unknown): QmpMessage {
  if (!isObject(v)) {
    throw new QmpProtocolError('UNKNOWN_MESSAGE', `QMP message is not a JSON object: ${preview(v)}`);
  }
  if ('QMP' in v && isObject(v['QMP'])) {
    return { kind: 'greeting', QMP: v['QMP'] as QmpGreeting['QMP'] };
  }
  if ('return' in v) {
    const m: QmpReturn = { kind: 'return', return: v['return'] };
    if (isId(v['id'])) m.id = v['id'];
    return m;
  }
  if ('error' in v && isObject(v['error'])) {
    const e = v['error'];
    const m: QmpErrorReply = {
      kind: 'error',
      error: { class: String(e['class'] ?? 'GenericError'), desc: String(e['desc'] ?? '') },
    };
    if (isId(v['id'])) m.id = v['id'];
    return m;
  }
  if (typeof v['event'] === 'string') {
    const ts = isObject(v['timestamp']) ? v['timestamp'] : {};
    return {
      kind: 'event',
      event: v['event'],
      data: isObject(v['data']) ? v['data'] : {},
      timestamp: {
        seconds: Number(ts['seconds'] ?? 0),
        microseconds: Number(ts['microseconds'] ?? 0),
      },
    };
  }
  throw new QmpProtocolError('UNKNOWN_MESSAGE', `unrecognised QMP message: ${preview(v)}`);
}

export interface QmpLineSplitterOptions {
  maxLineBytes?: number;
}

/**
 * Reassembles newline-delimited QMP messages from arbitrarily fragmented chunks.
 * Pending bytes are kept as Buffers rather than strings so a chunk boundary that
 * falls inside a multi-byte UTF-8 sequence does not corrupt the text.
 */
export class QmpLineSplitter {
  private readonly maxLineBytes: number;
  private pending: Buffer[] = [];
  private pendingLen = 0;

  constructor(opts: QmpLineSplitterOptions = {}) {
    this.maxLineBytes = opts.maxLineBytes ?? DEFAULT_QMP_MAX_LINE;
  }

  /**
   * The complete messages in `chunk` (with what earlier pushes left). A bad line throws a
   * QmpProtocolError whose `messages` holds the messages this push parsed before it, so that one
   * chunk carrying a reply and then garbage does not lose the reply; the rest of the chunk after
   * the bad line is dropped (the connection is not usable after it).
   */
  push(chunk: Buffer): QmpMessage[] {
    const out: QmpMessage[] = [];
    try {
      this.split(chunk, out);
    } catch (e) {
      if (e instanceof QmpProtocolError) e.messages = out;
      throw e;
    }
    return out;
  }

  private split(chunk: Buffer, out: QmpMessage[]): void {
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      const piece = chunk.subarray(start, nl);
      this.checkLength(this.pendingLen + piece.length);
      const line = this.pendingLen === 0 ? piece : Buffer.concat([...this.pending, piece]);
      this.pending = [];
      this.pendingLen = 0;
      start = nl + 1;
      const msg = this.parseLine(line);
      if (msg) out.push(msg);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this.checkLength(this.pendingLen + rest.length);
      // Copy: the caller may reuse the chunk's memory after push returns.
      this.pending.push(Buffer.from(rest));
      this.pendingLen += rest.length;
    }
  }

  /** Bytes received after the last newline, not yet forming a complete message. */
  get bufferedBytes(): number {
    return this.pendingLen;
  }

  private checkLength(len: number): void {
    if (len > this.maxLineBytes) {
      this.pending = [];
      this.pendingLen = 0;
      throw new QmpProtocolError(
        'LINE_TOO_LONG',
        `QMP line exceeds ${this.maxLineBytes} bytes without a newline`,
      );
    }
  }

  private parseLine(line: Buffer): QmpMessage | undefined {
    const text = line.toString('utf8').trim();
    // QEMU may emit CRLF or blank lines on some chardev backends; neither is a message.
    if (text === '') return undefined;
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch (err) {
      const preview = text.length > 120 ? text.slice(0, 120) + '...' : text;
      throw new QmpProtocolError(
        'INVALID_JSON',
        `invalid JSON on QMP connection (${(err as Error).message}): ${preview}`,
      );
    }
    return classifyQmpMessage(v);
  }
}
