// --verbose: engine events from diagnostics_channel, logged as JSON lines by pino on stderr.

import diagnostics_channel from 'node:diagnostics_channel';
import { pino } from 'pino';

const EVENTS = ['listening', 'main-channel', 'channel', 'configuration', 'sync-mode', 'sync', 'return-path', 'completed', 'failed', 'error', 'send-start', 'send-channels', 'send-pong', 'send-completed', 'send-failed', 'relay-listening', 'relay-source', 'relay-destination', 'relay-channels', 'relay-return-path', 'relay-completed', 'relay-failed', 'stray-connection', 'late-data', 'postcopy', 'relay-postcopy', 'relay-preempt', 'refused', 'send-postcopy-switch', 'send-postcopy-package', 'send-postcopy-pages-done'];

export function enableVerboseLog(): void {
  const log = pino({ base: null }, pino.destination(2));
  for (const e of EVENTS) {
    diagnostics_channel.subscribe(`multifd:${e}`, (msg) => {
      const m = msg as Record<string, unknown>;
      if (m.error instanceof Error) log.error({ event: e, err: (m.error as Error).message });
      else if (e === 'completed' || e === 'send-completed') log.info({ event: e });
      else log.info({ event: e, ...m });
    });
  }
}
