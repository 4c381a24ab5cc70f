// Every error a caller may branch on, in one place and at the bottom of the layer stack so any
// layer can throw them (this module holds classes and text only: no I/O). Each carries a stable
// `code`; callers react to the code (or the class), never to the message text.

import type { PageRequest } from './postcopy.js';
import type { QmpMessage } from './qmp.js';

export type ProtocolErrorCode =
  | 'BAD_MAGIC'
  | 'BAD_VERSION'
  | 'BAD_RECORD'
  | 'BAD_FLAGS'
  | 'FLAG_MISMATCH'
  | 'UNKNOWN_BLOCK'
  | 'OFFSET_OUT_OF_RANGE'
  | 'COUNT_TOO_LARGE'
  | 'LIMIT_EXCEEDED'
  | 'UNSUPPORTED'
  | 'BAD_CHANNEL_ID'
  | 'DUPLICATE_CHANNEL'
  | 'UUID_MISMATCH'
  | 'TRUNCATED'
  | 'BAD_FOOTER'
  | 'BAD_VMDESC'
  | 'BAD_MAPPED_RAM'
  /** A libvirt save image whose save never finished (magic LibvirtQemudPart). */
  | 'INCOMPLETE_IMAGE'
  | 'BAD_PACKED';

export type QmpProtocolErrorCode = 'LINE_TOO_LONG' | 'INVALID_JSON' | 'UNKNOWN_MESSAGE';

/** What went wrong with an s3:// snapshot's store (docs/s3.md). */
export type ObjectStoreErrorCode =
  | 'S3_BAD_URL'
  | 'S3_NO_CREDENTIALS'
  | 'S3_NO_REGION'
  | 'S3_ACCESS_DENIED'
  | 'S3_NO_BUCKET'
  | 'S3_NO_KEY'
  | 'S3_UNREACHABLE'
  | 'S3_EXISTS'
  | 'S3_SHORT_READ'
  | 'S3_ABORT_FAILED'
  | 'S3_ERROR';

/** What is wrong with a file we were asked to write (convert, extract, receive, save). */
export type OutputFileErrorCode =
  /** Something is there already and --force was not given. */
  | 'OUTPUT_EXISTS'
  /** A directory where a file is to be written. */
  | 'OUTPUT_IS_DIRECTORY'
  /** A file where a directory of outputs is to be made. */
  | 'OUTPUT_NOT_DIRECTORY'
  /** The output names the input itself. */
  | 'OUTPUT_IS_INPUT'
  /** Creating or writing it failed (`errno` says how when the system said). */
  | 'OUTPUT_FAILED';

/** Every `code` an error of this library can carry. */
export type MultifdErrorCode =
  | ProtocolErrorCode
  | QmpProtocolErrorCode
  | ObjectStoreErrorCode
  | OutputFileErrorCode
  | 'ABORTED'
  | 'INVALID_OPTION'
  | 'CONNECT_FAILED'
  | 'LISTEN_FAILED'
  | 'STRAY_CONNECTION'
  | 'CHANNEL_FAILED'
  | 'BAD_PAGE_REQUEST'
  | 'IDLE_TIMEOUT'
  | 'STALLED'
  | 'DESTINATION_CLOSED'
  | 'DESTINATION_REFUSED'
  | 'POSTCOPY_DESTINATION_LOST'
  | 'POSTCOPY_FAILED'
  | 'DESTINATION_FAILED'
  | 'SOURCE_FAILED'
  | 'QMP_COMMAND_FAILED'
  | 'QMP_CONNECTION';

/** What every error class below has in common; `instanceof MultifdError` tells ours from others. */
export class MultifdError extends Error {
  readonly code: MultifdErrorCode;
  constructor(code: MultifdErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
  }
}

/** The code of a wrapped error when it has one of ours, else `fallback`. */
function codeOf(cause: unknown, fallback: MultifdErrorCode): MultifdErrorCode {
  const c = (cause as { code?: unknown } | undefined)?.code;
  return typeof c === 'string' && cause instanceof MultifdError ? (c as MultifdErrorCode) : fallback;
}

/** The bytes broke the protocol (parsers and the engine); `where` and `offset` say where. */
export class ProtocolError extends MultifdError {
  declare readonly code: ProtocolErrorCode;
  /** Where the problem was found, e.g. "multifd channel 1" or "main channel"; set by the engine. */
  where?: string;
  /** Byte offset in the stream or file, when known. */
  offset?: number;

  constructor(code: ProtocolErrorCode, message: string, opts: { where?: string; offset?: number } = {}) {
    super(code, message);
    if (opts.where !== undefined) this.where = opts.where;
    if (opts.offset !== undefined) this.offset = opts.offset;
  }
}

/**
 * Thrown by cursors when the buffered bytes end inside a structure; parsers roll back and wait.
 * `need` is how many buffered bytes (from the queue head) the read that failed wanted: a retry
 * with fewer fails the same way, so a parser can wait for that many instead of re-parsing the
 * structure on every push (which made a record that arrives in n pieces cost O(n²)). 0: unknown.
 * Internal control flow, never seen by callers.
 */
export class NeedMoreData extends Error {
  constructor(readonly need = 0) {
    // No stack trace: one is thrown at nearly every read boundary, and capturing the stack was
    // 2-3% of a background save's main thread (profile of save --background, 256 MiB guest).
    const limit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    super('need more data');
    Error.stackTraceLimit = limit;
    this.name = 'NeedMoreData';
  }
}

/** A QMP line that is not a QMP message. */
export class QmpProtocolError extends MultifdError {
  declare readonly code: QmpProtocolErrorCode;
  /**
   * Set by QmpLineSplitter.push: the complete messages of the same push that came before the bad
   * line, in order. They are good messages (a reply, an event); deliver them before handling the
   * error.
   */
  messages: QmpMessage[] = [];
  constructor(code: QmpProtocolErrorCode, message: string) {
    super(code, message);
  }
}

/** QEMU answered a QMP command with an error. */
export class QmpCommandError extends MultifdError {
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super('QMP_COMMAND_FAILED', `QMP ${command} failed: ${desc}`);
  }
}

/** QMP transport failure: connect error, timeout, closed socket, garbage on the wire. */
export class QmpConnectionError extends MultifdError {
  constructor(readonly address: string, message: string, options?: { cause?: unknown }) {
    super('QMP_CONNECTION', message, options);
  }
}

/**
 * The conversation was aborted (`handle.abort(reason)`, the caller's AbortSignal, Ctrl-C in the
 * CLI). `reason` is the abort reason exactly as given; the message is its message unless the
 * thrower says what the abort left behind (the file tools: "no output written").
 */
export class AbortedError extends MultifdError {
  constructor(readonly reason: unknown, message?: string) {
    super('ABORTED', message ?? (reason instanceof Error ? reason.message : reason === undefined ? 'aborted' : String(reason)), { cause: reason });
  }
}

/**
 * The error an abort with `reason` fails a conversation with: the reason itself when it is one of
 * ours (a conversation that aborts another passes its own typed error on), else an AbortedError
 * keeping it.
 */
export function abortError(reason: unknown): Error {
  return reason instanceof MultifdError ? reason : new AbortedError(reason);
}

/** An option the caller gave is out of range or contradicts another; nothing was started. */
export class InvalidOptionError extends MultifdError {
  constructor(message: string) {
    super('INVALID_OPTION', message);
  }
}

/** An outgoing connection could not be made; `errno` is the socket's code (ECONNREFUSED, ...). */
export class ConnectError extends MultifdError {
  constructor(readonly address: string, readonly errno: string | undefined, message: string) {
    super('CONNECT_FAILED', message);
  }
}

/** The listening address could not be bound; `errno` is the socket's code (EADDRINUSE, EACCES, ...). */
export class ListenError extends MultifdError {
  constructor(readonly address: string, readonly errno: string | undefined, message: string) {
    super('LISTEN_FAILED', message);
  }
}

/** A connection that was closed without being taken as a migration channel. */
export class StrayConnectionError extends MultifdError {
  constructor(readonly peer: string, reason: string) {
    super('STRAY_CONNECTION', `connection from ${peer}: ${reason}`);
  }
}

/** A migration channel failed; `where` names it, `cause` says why (its code is taken over). */
export class ChannelError extends MultifdError {
  constructor(readonly where: string, override readonly cause: Error) {
    super(codeOf(cause, 'CHANNEL_FAILED'), `${where}: ${cause.message}`, { cause });
  }
}

export type PageRequestProblem = 'unknown-block' | 'out-of-range' | 'no-previous-block' | 'unaligned' | 'empty';

/** A page request the destination should never send: names a block we do not have, or pages outside it. */
export class PageRequestError extends MultifdError {
  constructor(readonly problem: PageRequestProblem, readonly request: PageRequest, message: string) {
    super('BAD_PAGE_REQUEST', message);
  }
}

/** The source sent nothing for the idle timeout mid-migration (receive, relay, save). */
export class IdleTimeoutError extends MultifdError {
  constructor(readonly seconds: number, message: string) {
    super('IDLE_TIMEOUT', message);
  }
}

/** Nothing moved towards the destination for the stall timeout: it waits for something we do not send. */
export class StallError extends MultifdError {
  constructor(message: string) {
    super('STALLED', message);
  }
}

/** The destination closed a connection we were writing to; `where` names it, `detail` the socket error. */
export class DestinationClosedError extends MultifdError {
  constructor(readonly where: string, readonly detail: string, message: string, code: MultifdErrorCode = 'DESTINATION_CLOSED') {
    super(code, message);
  }
}

export const POSTCOPY_LOSS_TEXT = 'in postcopy, after the guest had started there: that guest ran on memory the destination had only partly received, so it is lost (the snapshot file is intact; restore it again into a fresh QEMU)';

/**
 * The destination went away (or failed) in postcopy, after its guest had started: that guest ran on
 * memory that was only partly there, so it is lost (QEMU's own postcopy has the same risk). The
 * snapshot is untouched and can be restored again.
 */
export class PostcopyDestinationLostError extends DestinationClosedError {
  constructor(where: string, detail: string, message: string) {
    super(where, detail, message, 'POSTCOPY_DESTINATION_LOST');
  }
}

/** The destination's return path said loading failed (SHUT with a non-zero value). */
export class DestinationRefusedError extends MultifdError {
  constructor(readonly shut: number, message: string) {
    super('DESTINATION_REFUSED', message);
  }
}

/** Error from the destination QEMU (restore), with its error-desc when it gave one. */
export class DestinationError extends MultifdError {
  constructor(message: string, readonly qemuError: string | undefined) {
    super('DESTINATION_FAILED', message);
  }
}

/** The source QEMU (save) failed, cancelled, is busy or cannot be reached over QMP. */
export class SourceError extends MultifdError {
  constructor(message: string, readonly qemuError?: string) {
    super('SOURCE_FAILED', message);
  }
}

// What a failure after the switch to postcopy means, said where it happens. Before the switch the
// source still holds the whole guest and runs on; after it, the guest's state is split: the
// destination ran (or would run) the vCPUs with some pages, the source holds the rest. As with
// QEMU → QEMU postcopy, losing either side loses the guest (QEMU's postcopy recovery can only
// resume into a QEMU destination).
const POSTCOPY_CONSEQUENCE = {
  receive: 'the snapshot was not written; the source QEMU, if alive, stays paused (postcopy-paused) and cannot resume its guest by itself — only QEMU\'s postcopy recovery (migrate-recover on a new QEMU destination, migrate resume=true) can bring it back',
  relay: 'the guest is lost: its vCPUs ran on the destination from the switch on while pages were still on the source; the source QEMU, if alive, stays paused (postcopy-paused) — QEMU\'s postcopy recovery straight to a new QEMU destination is the only way back',
} as const;

/** An incoming conversation failed after the source switched to postcopy; `cause` says why (its code is taken over). */
export class PostcopyFailedError extends MultifdError {
  constructor(override readonly cause: Error, readonly where: keyof typeof POSTCOPY_CONSEQUENCE) {
    super(codeOf(cause, 'POSTCOPY_FAILED'), `${cause.message} — after the switch to postcopy: ${POSTCOPY_CONSEQUENCE[where]}`, { cause });
  }
}

/** A file to write is in the way, missing its directory, or could not be written; `path` names it. */
export class OutputFileError extends MultifdError {
  declare readonly code: OutputFileErrorCode;
  /** The system's code (ENOSPC, EACCES, ...) when the system refused. */
  readonly errno: string | undefined;
  constructor(code: OutputFileErrorCode, readonly path: string, message: string, opts: { cause?: unknown } = {}) {
    super(code, message, opts.cause === undefined ? undefined : { cause: opts.cause });
    const errno = (opts.cause as { code?: unknown } | undefined)?.code;
    this.errno = typeof errno === 'string' && !(opts.cause instanceof MultifdError) ? errno : undefined;
  }
}

/** The object store refused or failed a request for an s3:// snapshot; `code` names which. */
export class ObjectStoreError extends MultifdError {
  declare readonly code: ObjectStoreErrorCode;
  constructor(code: ObjectStoreErrorCode, message: string, opts: { cause?: unknown } = {}) {
    super(code, message, opts.cause === undefined ? undefined : { cause: opts.cause });
  }
}
