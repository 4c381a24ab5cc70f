// Observability through diagnostics_channel, as undici does: subscribers see what the conversations
// and the engine do without either knowing about loggers. Every channel is declared here, once:
// its name is `multifd:<conversation>:<event>`, publishing an undeclared one does not compile, the
// CLI's --verbose subscribes from this table, and docs/diagnostics.md lists the same table (a unit
// test keeps the two equal).

import diagnostics_channel from 'node:diagnostics_channel';

export interface ChannelSpec {
  /** What the message object holds. */
  readonly message: string;
  /** When it is published. */
  readonly when: string;
  /** Left out of --verbose: published per page request or per channel per sync, too many to log. */
  readonly quiet?: boolean;
}

export const DIAGNOSTICS = {
  receiver: {
    channel: { message: '{ channel }', when: 'a multifd channel sent its init and was taken' },
    compression: { message: '{ method }', when: 'the compression method was detected from the first data packet' },
    'sync-arrive': { message: '{ channel, round }', when: 'a multifd channel reached a sync barrier', quiet: true },
    sync: { message: '{ round }', when: 'every channel passed a sync barrier' },
    refused: { message: '{ where, error }', when: 'a multifd connection beyond the channel count was closed' },
    error: { message: '{ error }', when: 'a multifd channel failed' },
  },
  receive: {
    listening: { message: '{ address }', when: 'the listener is bound' },
    'stray-connection': { message: '{ error }', when: 'a connection that is not a migration channel was closed' },
    'main-channel': { message: '{}', when: 'the main channel was identified' },
    'preempt-channel': { message: '{ peer }', when: 'the postcopy preempt channel was identified' },
    configuration: { message: '{ machine }', when: "the source's configuration record was read" },
    'sync-mode': { message: '{ mode }', when: 'the sync mode was decided from the stream' },
    'return-path': { message: '{}', when: 'the source opened the return path' },
    postcopy: { message: '{ sections, deviceBytes }', when: 'the source switched to postcopy (the package was read)' },
    'late-data': { message: '{ bytes, message }', when: 'bytes came on main after the snapshot was committed' },
    completed: { message: '{ summary }', when: 'the snapshot is committed' },
    failed: { message: '{ error }', when: 'the receive failed' },
  },
  relay: {
    listening: { message: '{ address }', when: 'the listener is bound' },
    'stray-connection': { message: '{ error }', when: 'a connection that is not a migration channel was closed' },
    source: { message: '{ peer }', when: "the source's main channel was identified" },
    'preempt-channel': { message: '{}', when: "the source's postcopy preempt channel was identified" },
    configuration: { message: '{ machine }', when: "the source's configuration record was read" },
    'sync-mode': { message: '{ mode }', when: 'the sync mode was decided from the stream' },
    'return-path': { message: '{}', when: 'the source opened the return path' },
    postcopy: { message: '{ sections, deviceBytes }', when: 'the source switched to postcopy (the package was read)' },
    'late-data': { message: '{ bytes, message }', when: 'bytes came on main after the relay ended' },
    destination: { message: '{ to }', when: "the destination's main channel is connected" },
    'destination-channels': { message: '{ channelsOut }', when: "the destination's multifd channels are being opened" },
    'destination-return-path': { message: '{ type }', when: 'a return-path message came from the destination (it is passed on to the source)' },
    completed: { message: '{ summary }', when: 'the destination confirmed the load' },
    failed: { message: '{ error }', when: 'the relay failed' },
    'xbzrle-copies': { message: '{ deltas, copyBytes, spilled, spillReads, dir }', when: 'relay 0 → N ended: XBZRLE deltas decoded, memory of page copies, pages spilled to the temporary file and read back' },
  },
  send: {
    start: { message: '{ file, format, pages, syncMode, postcopy }', when: 'the snapshot is open and checked' },
    channels: { message: '{ channels }', when: 'every multifd channel is connected and set up' },
    pong: { message: '{ value }', when: 'the destination answered a PING (a stage it loaded)' },
    'page-request': { message: '{ block?, start, length }', when: 'the destination asked for pages in postcopy', quiet: true },
    'postcopy-switch': { message: '{ precopyPages }', when: 'the precopy phase ended; the switch begins' },
    'postcopy-package': { message: '{ bytes }', when: 'the package (LISTEN, device state, RUN) was written' },
    'postcopy-pages-done': { message: '{ stats, pages }', when: 'every page was written after the switch' },
    completed: { message: '{ summary }', when: 'the destination confirmed the load (or closed, without a return path)' },
    failed: { message: '{ error }', when: 'the send failed' },
  },
  output: {
    'stale-partial-removed': { message: '{ path, pid }', when: 'a temporary file of the same output, left by a process of this host that is gone, was removed before writing' },
    'commit-point': { message: '{ target }', when: 'a snapshot passed its point of no return: its file is being renamed into place, or its CompleteMultipartUpload sent; an interrupt from now on cannot undo it' },
  },
} as const satisfies Record<string, Record<string, ChannelSpec>>;

export type DiagnosticsGroup = keyof typeof DIAGNOSTICS;
export type DiagnosticsEvent<G extends DiagnosticsGroup> = keyof (typeof DIAGNOSTICS)[G] & string;

export function channelName<G extends DiagnosticsGroup>(group: G, event: DiagnosticsEvent<G>): string {
  return `multifd:${group}:${event}`;
}

/** Every declared channel, in table order. */
export function declaredChannels(): { name: string; group: DiagnosticsGroup; event: string; spec: ChannelSpec }[] {
  return Object.entries(DIAGNOSTICS).flatMap(([group, events]) =>
    Object.entries(events as Record<string, ChannelSpec>).map(([event, spec]) => ({ name: `multifd:${group}:${event}`, group: group as DiagnosticsGroup, event, spec })),
  );
}

const channels = new Map<string, diagnostics_channel.Channel>();

export function publish<G extends DiagnosticsGroup>(group: G, event: DiagnosticsEvent<G>, message: object): void {
  const name = channelName(group, event);
  let ch = channels.get(name);
  if (!ch) {
    ch = diagnostics_channel.channel(name);
    channels.set(name, ch);
  }
  if (ch.hasSubscribers) ch.publish(message);
}
