// Benchmark results as a Markdown table (medians, spread, ratios against QEMU) and an SVG chart of
// throughput against channel count. Pure functions of the rows.

import { describeHostCpu, type HostCpu } from './host-cpu.js';

export interface Row {
  version: string;
  pair: 'receive' | 'send' | 'save' | 'restore' | 'live' | 'relay' | 'postcopy' | 's3' | 'background' | 'relay-0n';
  /** postcopy rows: 'restore' (plain, --resume), 'postcopy', 'postcopy+preempt' (all ours). */
  /**
   * 'disk': the disk alone moving the snapshot's bytes (a durable write under receive/save/live, a
   * read under send/restore; bench/disk-floor.ts).
   */
  impl: 'ours' | 'qemu→qemu' | 'qemu file' | 'socat pipe' | 'disk' | 'restore' | 'postcopy' | 'postcopy+preempt' | 'qemu→qemu postcopy'
    | 'save file' | 'save s3' | 'store put' | 'restore file' | 'restore s3' | 'store get' | 'store get fresh' | 'store get beside' | 'instant file' | 'instant s3'
    | 'save' | 'save --background';
  sizeGiB: number;
  channels: number;
  method: string;
  guestBytes: number;
  rep: number;
  result: {
    ms: number;
    wireBytes: number;
    rssMiB?: number;
    /** CPU of the whole job: our process plus its QEMU peer(s), or both QEMUs. */
    cpuMs?: number;
    /** CPU of our process alone (the bench child). */
    oursCpuMs?: number;
    /** Running-guest runs: the downtime the source reports. */
    downtimeMs?: number;
    /** QEMU file save: ms until its file was durable (its `completed`, then an fsync of the file). */
    durableMs?: number;
    /** postcopy rows: ms until the destination's guest ran (its RESUME event); `ms` is then the time until every page was in place. */
    runningMs?: number;
    /** postcopy rows: page requests the destination sent. */
    requests?: number;
    /** disk rows: whether the disk was measured with O_DIRECT (false: through the page cache). */
    direct?: boolean;
    /** s3 save rows: the upload's part of the save (after the snapshot was durable locally). */
    uploadMs?: number;
    /** instant rows: the sender's own clock (from the start of its QEMU phase): switch, and RUN handed to the guest. */
    sendSwitchMs?: number;
    sendRunMs?: number;
    /** s3 restore rows: ms to open and check the object, before QEMU is touched. */
    openMs?: number;
    /** store get beside: how long the file restore beside the GET took. */
    besideMs?: number;
    /** restore and store get rows: the whole host's CPU over the job (bench/host-cpu.ts). */
    host?: HostCpu;
  };
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

interface Cell {
  median: number;
  min: number;
  max: number;
  n: number;
  wire: number;
  rss: number | undefined;
  cpu: number | undefined;
  ownCpu: number | undefined;
  downtime: number | undefined;
}

function cell(rows: Row[]): Cell | undefined {
  if (rows.length === 0) return undefined;
  const ms = rows.map((r) => r.result.ms);
  const rss = rows.map((r) => r.result.rssMiB).filter((x): x is number => x !== undefined);
  const cpu = rows.map((r) => r.result.cpuMs).filter((x): x is number => x !== undefined && !Number.isNaN(x));
  const ownCpu = rows.map((r) => r.result.oursCpuMs).filter((x): x is number => x !== undefined && !Number.isNaN(x));
  const down = rows.map((r) => r.result.downtimeMs).filter((x): x is number => x !== undefined);
  return {
    median: median(ms),
    min: Math.min(...ms),
    max: Math.max(...ms),
    n: ms.length,
    wire: median(rows.map((r) => r.result.wireBytes)),
    rss: rss.length ? Math.max(...rss) : undefined,
    cpu: cpu.length ? median(cpu) : undefined,
    ownCpu: ownCpu.length ? median(ownCpu) : undefined,
    downtime: down.length ? median(down) : undefined,
  };
}

/** QEMU→QEMU CPU (both sides) per GiB above which a rep counts as the slow mode. */
const SLOW_MODE_CPU_MS_PER_GIB = 1200;

const mbps = (bytes: number, ms: number): number => (bytes * 8) / (ms * 1000);
const fmt = (c: Cell): string => `${c.median.toFixed(0)} (${c.min.toFixed(0)}–${c.max.toFixed(0)})`;

export interface BenchResult {
  started: string;
  machine: object;
  args: object;
  rows: Row[];
}

function groups(rows: Row[]): Map<string, Row[]> {
  const g = new Map<string, Row[]>();
  for (const r of rows) {
    const k = `${r.pair}|${r.sizeGiB}|${r.channels}|${r.method}`;
    g.set(k, [...(g.get(k) ?? []), r]);
  }
  return g;
}

export function writeMarkdown(res: BenchResult): string {
  const lines = [
    `# multifd benchmark (${res.started})`,
    '',
    `Machine: ${JSON.stringify(res.machine)}. Arguments: ${JSON.stringify(res.args)}.`,
    'Guests are paused and hold 75% random data. Times in ms, median (min–max) over the repetitions;',
    'throughput = guest data ÷ time. Ratio: QEMU time ÷ our time for receive/send/restore (≥ 1 means we',
    'are at least as fast as QEMU), our time ÷ QEMU time for save (goal ≤ 1.2). Wire = bytes on the wire.',
    'CPU = CPU time of the whole job (median, s): ours plus the QEMU at the other end, against both QEMUs',
    '(QEMU→QEMU) or QEMU alone (file save). live = a running guest (the dirtying boot sector under TCG)',
    'saved by us vs migrated QEMU→QEMU: total time and downtime as the source reports them. relay = QEMU A',
    '→ our relay → QEMU B (same channels and method on both sides) vs QEMU A → QEMU B, both timed from',
    "A's migrate to B's completed; ratio = relay throughput ÷ direct (goal ≥ 0.8), CPU ours = relay + both",
    'QEMUs, and the relay\'s peak RSS (goal ≤ 256 MiB with a 4 GiB guest). Own CPU = our process alone.',
    'relay-0n = a running guest on A\'s main channel with xbzrle on, A → our relay 0 → N → B (multifd on ch',
    "channels) vs A → B direct (multifd off on both), 4 dirty syncs at a 1 ms downtime limit, then switched",
    "over; timed from A's migrate to B's completed; ratio = direct ÷ relay (goal ≥ 0.8, as relay); downtime",
    "is A's (its final round); wire = what reached B.",
    "Floor: QEMU's own file restore (restore rows); QEMU A → socat → QEMU B, a byte pipe that parses",
    "nothing (relay rows, when socat is installed). Save rows: QEMU's file save until its file is",
    'durable (`completed`, then fsync; QEMU itself does not sync), the point at which our save reports done.',
    '[slow k/n]: QEMU→QEMU reps whose two QEMUs used over 1.2 CPU-s per GiB, the slow of the two modes',
    'of this kind of VM (a destination faulting in memory the host took back); guests of 1 GiB and up.',
    "Where the VM reports free memory to its host (machine.hostMemory), the bench stops that while it",
    'runs and warms memory before each repetition, as on a bare-metal host; a slow rep then means the',
    'memory a QEMU got was cold anyway (reportedMiB says whether anything was reported meanwhile).',
    'disk ms: the disk alone, in the same repetitions, moving the bytes the snapshot holds: written',
    '(O_DIRECT, 2 MiB blocks, 4 in flight, then fdatasync) for receive, save and live, read back for send',
    'and restore. QEMU → QEMU touches no disk, so "ratio ≤" is the best ratio any tool that stores or loads',
    'the snapshot on this disk could reach (QEMU ms ÷ disk ms; for save, the least our time ÷ QEMU\'s',
    'could be), and "ours ÷ disk" how far our job is from the disk itself. [buffered]: the file system',
    'refused O_DIRECT, so the page cache was measured instead.',
    '',
    '| job | size | ch | method | ours ms | QEMU ms | ratio | goal | ours Mbit/s | QEMU Mbit/s | wire ours / QEMU | CPU s ours / QEMU | own CPU s | downtime ms ours / QEMU | peak RSS MiB | floor ms | disk ms |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const [k, rs] of groups(res.rows.filter((r) => r.pair !== 'postcopy'))) {
    const [pair, size, ch, method] = k.split('|') as [Row['pair'], string, string, string];
    const ours = cell(rs.filter((r) => r.impl === 'ours'));
    if (!ours) continue;
    const baseImpl = pair === 'save' ? 'qemu file' : 'qemu→qemu';
    const num = (v: number | undefined, f: (x: number) => string): string => (v === undefined ? '–' : f(v));
    const baseRows = rs.filter((r) => r.impl === baseImpl);
    const base = cell(baseRows);
    // QEMU→QEMU on this kind of VM runs in two modes (see docs/performance.md): a destination
    // that faults in memory the host took back costs ~2 CPU-s per GiB, otherwise ~0.5. Marked
    // per cell, so a median that mixes them can be read as such. Not below 1 GiB, where the
    // QEMUs' fixed CPU (start, setup) alone exceeds the threshold per GiB, and not for compressed
    // migrations, whose (de)compression alone does (zlib: ~16 CPU-s per GiB).
    const marked = baseImpl === 'qemu→qemu' && pair !== 'relay-0n' && baseRows.length > 0 && Number(size) >= 1 && method === 'none';
    const slowReps = marked ? baseRows.filter((r) => (r.result.cpuMs ?? 0) / r.sizeGiB > SLOW_MODE_CPU_MS_PER_GIB).length : 0;
    const mode = marked ? ` [slow ${slowReps}/${baseRows.length}]` : '';
    const floor = pair === 'restore' ? cell(rs.filter((r) => r.impl === 'qemu file')) : pair === 'relay' ? cell(rs.filter((r) => r.impl === 'socat pipe')) : undefined;
    // save: QEMU's time until its file was durable, as ours is when it reports done.
    const durableRows = pair === 'save' ? rs.filter((r) => r.impl === 'qemu file' && r.result.durableMs !== undefined) : [];
    const durable = cell(durableRows.map((r) => ({ ...r, result: { ...r.result, ms: r.result.durableMs! } })));
    const bytes = rs[0]!.guestBytes;
    const ratio = base ? (pair === 'save' ? ours.median / base.median : base.median / ours.median) : undefined;
    const diskRows = rs.filter((r) => r.impl === 'disk');
    const disk = cell(diskRows);
    const diskText = !disk
      ? '–'
      : `${fmt(disk)}${diskRows.some((r) => r.result.direct === false) ? ' [buffered]' : ''}` +
        (base ? `, ratio ${pair === 'save' ? '≥' : '≤'} ${(pair === 'save' ? disk.median / base.median : base.median / disk.median).toFixed(2)}` : '') +
        `, ours ÷ disk ${(ours.median / disk.median).toFixed(2)}`;
    const goal = pair === 'save' ? '≤ 1.2' : pair === 'relay' ? '≥ 0.8, RSS ≤ 256' : pair === 'relay-0n' ? '≥ 0.8' : '≥ 1.0';
    const met = ratio === undefined ? '' : (pair === 'save' ? ratio <= 1.2 : ratio >= (pair === 'relay' || pair === 'relay-0n' ? 0.8 : 1)) ? ' ✓' : ' ✗';
    const rssMet = pair === 'relay' && ours.rss !== undefined ? (ours.rss <= 256 ? ' ✓' : ' ✗') : '';
    lines.push(
      `| ${pair} | ${size} GiB | ${ch} | ${method} | ${fmt(ours)} | ${base ? fmt(base) + mode : '–'} | ${ratio !== undefined ? ratio.toFixed(2) + met : '–'} | ${goal} | ` +
        `${mbps(bytes, ours.median).toFixed(0)} | ${base ? mbps(bytes, base.median).toFixed(0) : '–'} | ` +
        `${ours.wire ? (ours.wire / 1e6).toFixed(0) + ' MB' : '–'} / ${base?.wire ? (base.wire / 1e6).toFixed(0) + ' MB' : '–'} | ` +
        `${num(ours.cpu, (x) => (x / 1000).toFixed(1))} / ${num(base?.cpu, (x) => (x / 1000).toFixed(1))} | ` +
        `${num(ours.ownCpu, (x) => (x / 1000).toFixed(1))} | ` +
        `${num(ours.downtime, (x) => x.toFixed(0))} / ${num(base?.downtime, (x) => x.toFixed(0))} | ` +
        `${ours.rss !== undefined ? ours.rss.toFixed(0) + rssMet : '–'} | ${floor ? fmt(floor) : durable ? `${fmt(durable)}, ours ÷ it ${(ours.median / durable.median).toFixed(2)}` : '–'} | ${diskText} |`,
    );
  }
  lines.push(...postcopyTable(res.rows.filter((r) => r.pair === 'postcopy')));
  lines.push(...s3Table(res.rows.filter((r) => r.pair === 's3')));
  lines.push(...backgroundTable(res.rows.filter((r) => r.pair === 'background')));
  return lines.join('\n') + '\n';
}

/**
 * Instant restore: our snapshot restored into a paused destination with --resume, plainly and with
 * --postcopy (± preempt): time until the guest runs and until every page is in place.
 */
function postcopyTable(rows: Row[]): string[] {
  if (rows.length === 0) return [];
  const lines = [
    '',
    '## Instant restore (restore --postcopy) against plain restore',
    '',
    'Our own snapshot of the paused guest restored by us into a fresh destination started with -S,',
    'with --resume. running = from the start of restore (file validation included) until the',
    "destination's RESUME event: plain restore resumes once everything is loaded, --postcopy as soon as",
    'the device state is (PONG(0x42)). complete = until the destination reported completed (every page',
    'in place). The guest (SeaBIOS finding no boot disk) runs during postcopy and asks for pages.',
    'Reference: QEMU → QEMU postcopy of the same paused guest, switched at once (migrate-start-postcopy',
    "right after migrate): running = until the destination reported postcopy-active (RUN; with -S it",
    'stays paused there), complete = until it reported completed. QEMU 10 has no multifd with postcopy.',
    '',
    '| size | ch | variant | running ms | complete ms | running vs plain | complete vs plain | requests | wire MB | peak RSS MiB | own CPU s |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ];
  const g = new Map<string, Row[]>();
  for (const r of rows) g.set(`${r.sizeGiB}|${r.channels}`, [...(g.get(`${r.sizeGiB}|${r.channels}`) ?? []), r]);
  for (const [k, rs] of g) {
    const [size, ch] = k.split('|');
    const stat = (impl: Row['impl']): { run: number[]; done: Cell } | undefined => {
      const sel = rs.filter((r) => r.impl === impl);
      const done = cell(sel);
      if (!done) return undefined;
      return { run: sel.map((r) => r.result.runningMs).filter((x): x is number => x !== undefined), done };
    };
    const plain = stat('restore');
    for (const impl of ['restore', 'postcopy', 'postcopy+preempt', 'qemu→qemu postcopy'] as const) {
      const s = stat(impl);
      if (!s) continue;
      const sel = rs.filter((r) => r.impl === impl);
      const run = s.run.length ? { median: median(s.run), min: Math.min(...s.run), max: Math.max(...s.run) } : undefined;
      const plainRun = plain && plain.run.length ? median(plain.run) : undefined;
      const req = sel.map((r) => r.result.requests).filter((x): x is number => x !== undefined);
      lines.push(
        `| ${size} GiB | ${ch} | ${({ restore: 'plain restore', postcopy: 'restore --postcopy', 'postcopy+preempt': 'restore --postcopy --postcopy-preempt', 'qemu→qemu postcopy': 'QEMU → QEMU postcopy' } as const)[impl]} | ` +
          `${run ? `${run.median.toFixed(0)} (${run.min.toFixed(0)}–${run.max.toFixed(0)})` : '–'} | ${fmt(s.done)} | ` +
          `${run && plainRun ? (run.median / plainRun).toFixed(3) : '–'} | ${plain ? (s.done.median / plain.done.median).toFixed(2) : '–'} | ` +
          `${req.length ? median(req).toFixed(0) : '–'} | ${(s.done.wire / 1e6).toFixed(0)} | ${s.done.rss !== undefined ? s.done.rss.toFixed(0) : '–'} | ${s.done.ownCpu !== undefined ? (s.done.ownCpu / 1000).toFixed(1) : '–'} |`,
      );
    }
  }
  return lines;
}

/** Snapshots in object storage: our save/restore to/from S3 against a local file and the store itself. */
function s3Table(rows: Row[]): string[] {
  if (rows.length === 0) return [];
  const lines = [
    '',
    '## Snapshots in object storage (S3)',
    '',
    'The same paused guest saved by us to a local file and to s3:// (staged locally, uploaded packed),',
    "restored by us from both, and the store's own throughput for the object's bytes with the same client",
    '(multipart PUT, parts in flight as our upload; ranged 8 MiB GETs, in flight as our read-ahead).',
    'store get reads the snapshot object restore s3 reads, right before it in odd reps and right after',
    'it in even ones; store get fresh reads back the object the PUT had just written (for comparison).',
    'store get beside: the same GET while our restore from the local file delivers the guest into QEMU',
    'beside it (the two halves of a restore from S3, side by side, not coupled; the GET starts with the',
    "restore's child process): with the store on the same machine, what the machine leaves the GET.",
    'Restore goal: ≥ 0.8 of the store get throughput (object bytes ÷ wall time). Instant = restore',
    '--postcopy --resume: running = until the guest ran (RESUME, from the start of restore; for s3 split',
    "into opening the object and the QEMU phase after it); send run = the sender's own clock to RUN.",
    "host: the whole machine's CPU over the job (/proc/stat, every process: the store's too), as a share",
    'of wall time × CPUs; steal is time the hypervisor kept our CPUs from running. Near 100% together,',
    'the job was bound by the machine, not by waiting.',
    '',
    '| size | ch | job | ms | MB/s of the object | vs store | peak RSS MiB | notes |',
    '|---|---|---|---|---|---|---|---|',
  ];
  const g = new Map<string, Row[]>();
  for (const r of rows) g.set(`${r.sizeGiB}|${r.channels}`, [...(g.get(`${r.sizeGiB}|${r.channels}`) ?? []), r]);
  for (const [k, rs] of g) {
    const [size, ch] = k.split('|');
    const objectBytes = rs.find((r) => r.impl === 'store get')?.result.wireBytes ?? 0;
    const med = (impl: Row['impl'], f: (r: Row) => number | undefined = (r) => r.result.ms): number | undefined => {
      const xs = rs.filter((r) => r.impl === impl).map(f).filter((x): x is number => x !== undefined);
      return xs.length ? median(xs) : undefined;
    };
    const put = med('store put');
    const get = med('store get');
    const hostOf = (i: Row['impl']): HostCpu | undefined => {
      const busyMs = med(i, (r) => r.result.host?.busyMs);
      const stealMs = med(i, (r) => r.result.host?.stealMs);
      const capacityMs = med(i, (r) => r.result.host?.capacityMs);
      return busyMs !== undefined && stealMs !== undefined && capacityMs !== undefined ? { busyMs, stealMs, capacityMs } : undefined;
    };
    const getHost = hostOf('store get');
    const beside = med('store get beside');
    for (const impl of ['save file', 'save s3', 'store put', 'store get fresh', 'restore file', 'restore s3', 'store get', 'store get beside', 'instant file', 'instant s3'] as const) {
      const ms = med(impl);
      if (ms === undefined) continue;
      const rate = objectBytes ? `${(objectBytes / 1e6 / (ms / 1000)).toFixed(0)}` : '–';
      const vs = impl === 'restore s3' && get ? `${(get / ms).toFixed(2)} ${get / ms >= 0.8 ? '✓' : '✗'} (goal ≥ 0.8)${beside ? `; ${(beside / ms).toFixed(2)} of store get beside` : ''}` : impl === 'save s3' && put ? `upload ${(med(impl, (r) => r.result.uploadMs) ?? 0).toFixed(0)} ms vs PUT ${put.toFixed(0)} ms` : '–';
      const rss = med(impl, (r) => r.result.rssMiB);
      const open = med(impl, (r) => r.result.openMs);
      const running = med(impl, (r) => r.result.runningMs);
      const host = hostOf(impl);
      const hostNote = host ? `${describeHostCpu(host)}${impl === 'restore s3' && getHost ? `; ${((host.busyMs + host.stealMs - getHost.busyMs - getHost.stealMs) / 1000).toFixed(1)} CPU-s more than store get` : ''}` : '';
      const besideNote = impl === 'store get beside' ? `the file restore beside it took ${med(impl, (r) => r.result.besideMs)?.toFixed(0) ?? '–'} ms` : '';
      const notes = impl.startsWith('instant') ? `running ${running?.toFixed(0) ?? '–'} ms${open !== undefined && running !== undefined ? ` (object opened in ${open.toFixed(0)}, QEMU phase ${(running - open).toFixed(0)})` : ''}; send run ${med(impl, (r) => r.result.sendRunMs)?.toFixed(0) ?? '–'} ms (switch ${med(impl, (r) => r.result.sendSwitchMs)?.toFixed(0) ?? '–'}); ${med(impl, (r) => r.result.requests)?.toFixed(0) ?? '–'} requests` : [besideNote, hostNote].filter(Boolean).join('; ');
      lines.push(`| ${size} GiB | ${ch} | ${impl} | ${ms.toFixed(0)} | ${impl.startsWith('instant') ? '–' : rate} | ${vs} | ${rss !== undefined ? rss.toFixed(0) : '–'} | ${notes} |`);
    }
  }
  return lines;
}

/** save --background against save on the same running guest: QEMU's total time and downtime. */
export function backgroundTable(rows: Row[]): string[] {
  if (rows.length === 0) return [];
  const lines = [
    '',
    '## Background snapshot (save --background) against save, running guest',
    '',
    "One running dirtying guest (the boot sector under TCG, on top of the blobs) saved by our save",
    "--background (QEMU's background-snapshot: the main channel alone, the snapshot of the moment the",
    'save started, the guest never stopped but for the device state) and by our save (multifd on `ch`',
    'channels, the live rows\' downtime limit, --resume), one after the other in each repetition, the',
    "order alternating. total and downtime are QEMU's own figures (query-migrate at completed);",
    'ratios are background ÷ save.',
    '',
    '| size | ch | job | total ms | downtime ms | total ratio | downtime ratio | wire MB | peak RSS MiB | own CPU s |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  const g = new Map<string, Row[]>();
  for (const r of rows) g.set(`${r.sizeGiB}|${r.channels}`, [...(g.get(`${r.sizeGiB}|${r.channels}`) ?? []), r]);
  for (const [k, rs] of g) {
    const [size, ch] = k.split('|');
    const plain = cell(rs.filter((r) => r.impl === 'save'));
    for (const impl of ['save', 'save --background'] as const) {
      const c = cell(rs.filter((r) => r.impl === impl));
      if (!c) continue;
      const downs = rs.filter((r) => r.impl === impl).map((r) => r.result.downtimeMs).filter((x): x is number => x !== undefined);
      const down = downs.length ? `${c.downtime!.toFixed(0)} (${Math.min(...downs).toFixed(0)}–${Math.max(...downs).toFixed(0)})` : '–';
      const ratios = impl === 'save --background' && plain
        ? `${(c.median / plain.median).toFixed(2)} | ${plain.downtime ? (c.downtime! / plain.downtime).toFixed(2) : '–'}`
        : '– | –';
      lines.push(`| ${size} GiB | ${impl === 'save' ? ch : 0} | ${impl} | ${fmt(c)} | ${down} | ${ratios} | ${(c.wire / 1e6).toFixed(0)} | ${c.rss !== undefined ? c.rss.toFixed(0) : '–'} | ${c.ownCpu !== undefined ? (c.ownCpu / 1000).toFixed(1) : '–'} |`);
    }
  }
  return lines;
}

/**
 * Throughput (Mbit/s) against channel count: ours (receive, send, relay), QEMU→QEMU's and the disk's
 * (the write under receive, the read under send), method none.
 */
export function writeChart(rows: Row[]): string {
  const W = 720;
  const H = 420;
  const pad = { l: 70, r: 200, t: 30, b: 50 };
  const series = new Map<string, [number, number][]>();
  const ours = ['receive', 'send', 'relay'];
  for (const [k, rs] of groups(rows.filter((r) => r.method === 'none' && ours.includes(r.pair)))) {
    const [pair, size, ch] = k.split('|');
    for (const impl of ['ours', 'qemu→qemu', 'disk'] as const) {
      const c = cell(rs.filter((r) => r.impl === impl));
      if (!c) continue;
      const name = impl === 'ours' ? `ours ${pair} ${size} GiB` : impl === 'disk' ? `disk ${pair === 'receive' ? 'write' : 'read'} ${size} GiB` : `QEMU→QEMU ${size} GiB`;
      const p = series.get(name) ?? [];
      // QEMU→QEMU is one run recorded under each pair it is the baseline of: plot it once.
      if (impl === 'qemu→qemu' && p.some(([x]) => x === Number(ch))) continue;
      series.set(name, [...p, [Number(ch), mbps(rs[0]!.guestBytes, c.median)]]);
    }
  }
  const pts = [...series.values()].flat();
  const xs = [...new Set(pts.map((p) => p[0]))].sort((a, b) => a - b);
  const ymax = Math.max(1, ...pts.map((p) => p[1])) * 1.1;
  const x = (v: number): number => pad.l + (xs.length <= 1 ? (W - pad.l - pad.r) / 2 : ((xs.indexOf(v)) / (xs.length - 1)) * (W - pad.l - pad.r));
  const y = (v: number): number => H - pad.b - (v / ymax) * (H - pad.t - pad.b);
  const colors = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f', '#393b79', '#ad494a'];
  const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${pad.l}" y="18" font-size="14">Throughput against multifd channels (paused guest, 75% random, no compression)</text>`,
    `<line x1="${pad.l}" y1="${H - pad.b}" x2="${W - pad.r}" y2="${H - pad.b}" stroke="black"/>`,
    `<line x1="${pad.l}" y1="${pad.t}" x2="${pad.l}" y2="${H - pad.b}" stroke="black"/>`,
    `<text x="${(W - pad.r + pad.l) / 2}" y="${H - 12}" text-anchor="middle">channels</text>`,
    `<text x="16" y="${(H - pad.b + pad.t) / 2}" transform="rotate(-90 16 ${(H - pad.b + pad.t) / 2})" text-anchor="middle">Mbit/s</text>`];
  for (const v of xs) out.push(`<text x="${x(v)}" y="${H - pad.b + 16}" text-anchor="middle">${v}</text>`);
  for (let i = 0; i <= 4; i++) {
    const v = (ymax / 4) * i;
    out.push(`<text x="${pad.l - 6}" y="${y(v) + 4}" text-anchor="end">${v.toFixed(0)}</text>`, `<line x1="${pad.l}" y1="${y(v)}" x2="${W - pad.r}" y2="${y(v)}" stroke="#ddd"/>`);
  }
  [...series.entries()].forEach(([name, p], i) => {
    const col = colors[i % colors.length]!;
    const sorted = p.sort((a, b) => a[0] - b[0]);
    const dash = name.startsWith('QEMU') ? ' stroke-dasharray="6 4"' : name.startsWith('disk') ? ' stroke-dasharray="2 3"' : '';
    out.push(`<polyline fill="none" stroke="${col}" stroke-width="2"${dash} points="${sorted.map(([cx, cy]) => `${x(cx)},${y(cy)}`).join(' ')}"/>`);
    for (const [cx, cy] of sorted) out.push(`<circle cx="${x(cx)}" cy="${y(cy)}" r="3" fill="${col}"/>`);
    out.push(`<text x="${W - pad.r + 10}" y="${pad.t + 16 * i + 10}" fill="${col}">${name}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
