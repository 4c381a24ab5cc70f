// Human-readable numbers and summaries; no protocol logic.

export function bytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function rate(bytesPerSec: number): string {
  return `${bytes(bytesPerSec)}/s`;
}

export function duration(ms: number): string {
  return ms < 1000 ? `${ms} ms` : `${(ms / 1000).toFixed(2)} s`;
}

/** save's "not converging" warning, from QEMU's own numbers (src/conversations/convergence.ts). */
export function notConvergingText(n: { 'active-ms': number; rounds: number; 'expected-downtime': number; 'downtime-limit': number; 'dirty-pages-rate'?: number; mbps?: number }, compression?: string): string {
  const rates = [
    n['dirty-pages-rate'] !== undefined ? `the guest dirties ${n['dirty-pages-rate']} pages/s` : '',
    n.mbps !== undefined ? `the link moves ${Math.round(n.mbps)} Mbit/s` : '',
  ].filter(Boolean).join(', ');
  const why = compression && compression !== 'none' ? `; with ${compression} QEMU measures the link in compressed bytes, so it underestimates it` : '';
  return `the source is not converging: after ${n.rounds} rounds in ${duration(n['active-ms'])} QEMU still expects ${n['expected-downtime']} ms of downtime against a limit of ${n['downtime-limit']} ms${rates ? ` (${rates})` : ''}${why}`;
}

/** An upload's summary entry (save/receive/convert … s3://…, relay --tee s3://…; docs/s3.md). */
interface UploadLike { url: string; 'object-size': number; parts: number; 'upload-ms': number; requests?: number; retries?: number; 'local-durable-at'?: string; 'store-durable-at': string }

export function uploadLine(u: UploadLike): string {
  return `  store: ${u.url}, a ${bytes(u['object-size'])} object in ${u.parts} parts uploaded in ${duration(u['upload-ms'])}${u.requests !== undefined ? ` (${u.requests} requests, ${u.retries ?? 0} retries)` : ''}; ${u['local-durable-at'] ? `durable locally at ${u['local-durable-at']}, ` : ''}in the store at ${u['store-durable-at']}`;
}

/** What a reader of an s3:// snapshot fetched (convert/extract from s3://…). */
export function storeReadLine(r: { url: string; 'object-size': number; 'open-ms': number; requests: number; retries: number; 'bytes-read': number }): string {
  return `  store: ${bytes(r['bytes-read'])} read from ${r.url} (a ${bytes(r['object-size'])} object, opened in ${duration(r['open-ms'])}) in ${r.requests} requests, ${r.retries} retries`;
}

interface SummaryLike {
  /** save/receive --out s3://… (docs/s3.md). */
  store?: UploadLike;
  file: string;
  machine: string;
  'total-time': number;
  'commit-time'?: number;
  transferred: number;
  normal: number;
  duplicate: number;
  mbps: number;
  'dirty-sync-count': number;
  'multifd-syncs': number;
  'sync-mode': string;
  compression?: string;
  'file-size': number;
  channels: { id: number; bytes: number; packets: number; normalPages: number; zeroPages: number }[];
  blocks: { name: string; 'used-length': number; 'pages-present': number }[];
  source?: { status: string; downtime?: number; 'total-time'?: number; 'run-state-after': string; 'switchover-forced-after-ms'?: number };
  'background-snapshot'?: boolean;
  postcopy?: { 'switched-at-ms': number; 'main-pages': number; 'preempt-pages': number; 'discard-ranges': number; 'preempt-channel': boolean };
  notes?: string[];
}

export function summaryText(s: SummaryLike): string {
  const lines = [
    `saved ${s.file} (${s.machine}, ${bytes(s['file-size'])} apparent size)`,
    `  ${bytes(s.transferred)} in ${duration(s['total-time'])}${s['commit-time'] !== undefined ? ` (${duration(s['commit-time'])} of it making the file durable)` : ''} (${s.mbps} Mbit/s), ${s.normal} pages with data, ${s.duplicate} zero, ${s['dirty-sync-count']} dirty syncs, ${s['multifd-syncs']} multifd syncs (${s['sync-mode']} mode${s.compression && s.compression !== 'none' ? `, ${s.compression} on the wire` : ''})`,
  ];
  lines.push(...channelLines(s.channels));
  for (const b of s.blocks) lines.push(`  block ${b.name}: ${bytes(b['used-length'])}, ${b['pages-present']} pages stored`);
  if (s.postcopy) {
    const pc = s.postcopy;
    lines.push(`  postcopy: switched after ${duration(pc['switched-at-ms'])}; device state from the package; ${pc['main-pages']} pages after the switch on main${pc['preempt-channel'] ? `, ${pc['preempt-pages']} on the preempt channel` : ''}; ${pc['discard-ranges']} discard ranges`);
  }
  if (s.source) {
    // A background snapshot's point is the guest's short stop: QEMU's own total time goes with it.
    const bg = s['background-snapshot'] ? `, background snapshot in ${s.source['total-time'] ?? '?'} ms (QEMU's total time)` : '';
    const forced = s.source['switchover-forced-after-ms'] !== undefined ? `, switchover forced after ${duration(s.source['switchover-forced-after-ms'])} of iterating` : '';
    lines.push(`  source: ${s.source.status}${s.source.downtime !== undefined ? `, downtime ${s.source.downtime} ms` : ''}${bg}${forced}, now ${s.source['run-state-after']}`);
  }
  if (s.store) lines.push(uploadLine(s.store));
  for (const n of s.notes ?? []) lines.push(`  note: ${n}`);
  return lines.join('\n');
}

interface SendSummaryLike {
  file: string;
  format: string;
  to: string;
  machine: string;
  'total-time': number;
  transferred: number;
  normal: number;
  duplicate: number;
  mbps: number;
  'sync-mode': string;
  compression?: string;
  destination: string;
  channels: { id: number; bytes: number; packets: number; normalPages: number; zeroPages: number }[];
  blocks: { name: string; 'used-length': number; 'pages-sent': number }[];
  destinationQemu?: { status: string; 'run-state-after': string; resumed: boolean };
  postcopy?: {
    preempt: boolean;
    'precopy-pages': number;
    'postcopy-pages': number;
    'run-time'?: number;
    'complete-time': number;
    requests: number;
    'requested-pages': number;
    'requests-already-sent': number;
    'preempt-pages': number;
    'page-sizes'?: Record<string, number>;
  };
  'time-to-running'?: number;
  'time-to-complete'?: number;
  notes?: string[];
}

export function sendSummaryText(s: SendSummaryLike): string {
  const lines = [
    `sent ${s.file} (${s.format}, ${s.machine}) to ${s.to}`,
    `  ${bytes(s.transferred)} in ${duration(s['total-time'])} (${s.mbps} Mbit/s), ${s.normal} pages with data, ${s.duplicate} zero (${s['sync-mode']} sync mode${s.compression && s.compression !== 'none' ? `, ${s.compression}` : ''})`,
  ];
  lines.push(...channelLines(s.channels));
  for (const b of s.blocks) lines.push(`  block ${b.name}: ${bytes(b['used-length'])}, ${b['pages-sent']} pages sent`);
  const pc = s.postcopy;
  if (pc) {
    lines.push(`  postcopy${pc.preempt ? ' (preempt channel)' : ''}: ${pc['precopy-pages']} pages before the switch, ${pc['postcopy-pages']} after; ` +
      `${pc.requests} page requests, ${pc['requested-pages']} pages sent ahead for them${pc.preempt ? ` (${pc['preempt-pages']} on the preempt channel)` : ''}, ${pc['requests-already-sent']} already on their way`);
    // Hugepage-backed blocks of the destination: announced and sent in whole host pages.
    for (const [name, size] of Object.entries(pc['page-sizes'] ?? {})) lines.push(`  block ${name}: destination pages of ${bytes(size)}, sent whole`);
  }
  if (s['time-to-complete'] !== undefined) {
    const running = s['time-to-running'] !== undefined ? `guest running after ${duration(s['time-to-running'])}` : 'guest paused';
    lines.push(`  ${running}, every page in place after ${duration(s['time-to-complete'])}`);
  } else if (pc) {
    lines.push(`  ${pc['run-time'] !== undefined ? `devices loaded and RUN reached after ${duration(pc['run-time'])}, ` : ''}every page confirmed after ${duration(pc['complete-time'])}`);
  }
  for (const n of s.notes ?? []) lines.push(`  note: ${n}`);
  if (s.destinationQemu) {
    lines.push(`  destination: ${s.destinationQemu.status}, now ${s.destinationQemu['run-state-after']}${s.destinationQemu.resumed ? ' (resumed)' : ''}`);
  } else {
    lines.push(s.destination === 'confirmed' ? '  destination: loaded the device state and shut down cleanly' : '  destination: closed the connection (no return path: success not confirmed)');
  }
  return lines.join('\n');
}

interface RelaySummaryLike {
  from: string;
  to: string;
  machine: string;
  'total-time': number;
  'bytes-in': number;
  'bytes-out': number;
  normal: number;
  duplicate: number;
  mbps: number;
  'multifd-syncs': number;
  'sync-mode': string;
  'compression-in': string;
  'compression-out': string;
  'passed-encoded'?: number;
  'return-path': boolean;
  tee?: { file: string; 'file-size': number; 'commit-time': number };
  /** --tee s3://… (docs/s3.md). */
  store?: UploadLike;
  postcopy?: { 'switched-at-ms': number; 'main-pages': number; 'preempt-bytes': number; 'preempt-pages': number; 'preempt-channel': boolean; 'page-requests': number };
  'channels-in': { id: number; bytes: number; packets: number; normalPages: number; zeroPages: number }[];
  'channels-out': { id: number; bytes: number; packets: number; normalPages: number; zeroPages: number }[];
  notes?: string[];
}

export function relaySummaryText(s: RelaySummaryLike): string {
  const lines = [
    `relayed ${s.machine} from ${s.from} to ${s.to}: the destination loaded it${s['return-path'] ? ' (the source was told)' : ''}`,
    `  ${bytes(s['bytes-in'])} in, ${bytes(s['bytes-out'])} out, in ${duration(s['total-time'])} (${s.mbps} Mbit/s), ${s.normal} pages with data, ${s.duplicate} zero, ${s['multifd-syncs']} multifd syncs (${s['sync-mode']} mode, ${s['compression-in']} in, ${s['compression-out']} out${(s['passed-encoded'] ?? 0) > 0 ? `, ${s['passed-encoded']} packets passed on still compressed` : ''})`,
    '  from the source:',
    ...channelLines(s['channels-in']).map((l) => '  ' + l),
    '  to the destination:',
    ...channelLines(s['channels-out']).map((l) => '  ' + l),
  ];
  if (s.postcopy) {
    const pc = s.postcopy;
    lines.push(`  postcopy: switched after ${duration(pc['switched-at-ms'])}, the guest ran on the destination from then on; ${pc['page-requests']} page requests passed to the source; ${pc['main-pages']} pages on main${pc['preempt-channel'] ? `, ${pc['preempt-pages']} on the preempt channel (${bytes(pc['preempt-bytes'])})` : ''}`);
  }
  if (s.tee) {
    // An object: commit-time covers staging and upload, the store line says when each was durable.
    lines.push(`  tee: ${s.tee.file} (${bytes(s.tee['file-size'])} apparent size${s.store ? ' as staged' : ''}, ${duration(s.tee['commit-time'])} to make it durable${s.store ? ' and upload it' : ''})`);
  }
  if (s.store) lines.push(uploadLine(s.store));
  for (const n of s.notes ?? []) lines.push(`  note: ${n}`);
  return lines.join('\n');
}

function channelLines(channels: { id: number; bytes: number; packets: number; normalPages: number; zeroPages: number }[]): string[] {
  return channels.map((c) => `  channel ${c.id}: ${bytes(c.bytes)}, ${c.packets} packets, ${c.normalPages} pages, ${c.zeroPages} zero`);
}
