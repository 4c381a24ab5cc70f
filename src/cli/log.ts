// --verbose: every channel of the diagnostics table (but the quiet ones), logged as JSON lines by
// pino on stderr. `event` is the channel name without its "multifd:" prefix.

import diagnostics_channel from 'node:diagnostics_channel';
import { pino } from 'pino';
import { channelName, declaredChannels } from '../engine/diagnostics.js';

/** A stale temporary file removed before writing an output (its process was killed): one note on stderr. */
export function noteStalePartials(): void {
  diagnostics_channel.subscribe(channelName('output', 'stale-partial-removed'), (msg) => {
    const m = msg as { path: string; pid: number };
    process.stderr.write(`multifd: note: removed ${m.path}, a temporary file left by process ${m.pid} of this host, which is gone\n`);
  });
}

export function enableVerboseLog(): void {
  const log = pino({ base: null }, pino.destination(2));
  for (const { name, group, event: e, spec } of declaredChannels()) {
    if (spec.quiet) continue;
    const event = `${group}:${e}`;
    diagnostics_channel.subscribe(name, (msg) => {
      const m = msg as Record<string, unknown>;
      if (m.error instanceof Error) log.error({ event, err: (m.error as Error).message });
      // Summaries are printed on stdout at the end (text or --json); the log only marks the moment.
      else if (e === 'completed') log.info({ event });
      else log.info({ event, ...m });
    });
  }
}
