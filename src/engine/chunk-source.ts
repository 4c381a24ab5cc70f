// What a channel reads its bytes from. A plain source hands over chunks the receiver may keep;
// a releasing one reuses its memory (transports' socket ring) and must be told which of its
// bytes are no longer referenced.

export interface ReleasingSource extends AsyncIterable<Buffer> {
  /** Stream bytes before `offset` (from the channel's first byte) are no longer referenced. */
  release(offset: number): void;
}

export function isReleasingSource(s: AsyncIterable<Buffer>): s is ReleasingSource {
  return typeof (s as Partial<ReleasingSource>).release === 'function';
}
