// Typed errors: every parser failure carries a stable code so callers can react without matching text.

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
  | 'INCOMPLETE_IMAGE';

export class ProtocolError extends Error {
  readonly code: ProtocolErrorCode;
  /** Where the problem was found, e.g. "multifd channel 1" or "main channel"; set by the engine. */
  where?: string;
  /** Byte offset in the stream or file, when known. */
  offset?: number;

  constructor(code: ProtocolErrorCode, message: string, opts: { where?: string; offset?: number } = {}) {
    super(message);
    this.name = 'ProtocolError';
    this.code = code;
    if (opts.where !== undefined) this.where = opts.where;
    if (opts.offset !== undefined) this.offset = opts.offset;
  }
}

/**
 * Thrown by cursors when the buffered bytes end inside a structure; parsers roll back and wait.
 * `need` is how many buffered bytes (from the queue head) the read that failed wanted: a retry
 * with fewer fails the same way, so a parser can wait for that many instead of re-parsing the
 * structure on every push (which made a record that arrives in n pieces cost O(n²)). 0: unknown.
 */
export class NeedMoreData extends Error {
  constructor(readonly need = 0) {
    super('need more data');
    this.name = 'NeedMoreData';
  }
}
