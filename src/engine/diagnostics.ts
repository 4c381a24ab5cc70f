// Observability through diagnostics_channel (as undici does): subscribers see engine events
// without the engine knowing about loggers. Channel names: multifd:<event>.

import diagnostics_channel from 'node:diagnostics_channel';

const channels = new Map<string, diagnostics_channel.Channel>();

export function publish(event: string, message: object): void {
  let ch = channels.get(event);
  if (!ch) {
    ch = diagnostics_channel.channel(`multifd:${event}`);
    channels.set(event, ch);
  }
  if (ch.hasSubscribers) ch.publish(message);
}
