/**
 * Helpers for tests that produce mapped-ram snapshots: random guest blobs, reading a snapshot's
 * RAM through our snapshot reader, comparing the RAM of two snapshots page by page, restoring
 * a snapshot into a fresh QEMU, and migrating a QEMU source into receive().
 *
 * Everything QEMU is given (blobs, snapshot files) must live under /tmp: QEMU 11 runs in a
 * chroot that shares only /tmp with us.
 */
import { randomFillSync } from 'node:crypto';
import { readdirSync, writeFileSync } from 'node:fs';
import { TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { receive, type ReceiveHandle, type ReceiveOptions, type ReceiveSummary } from '../../src/conversations/receive.js';
import { startQemu, waitMigration, type QemuInstance, type QemuVersion } from './qemu.js';

const PAGE = TARGET_PAGE_SIZE;

/**
 * Writes `size` bytes of crypto-random data with the listed pages forced to zero (so zero-page
 * detection has something to find inside the blob) and returns the blob.
 */
export function writeRandomBlob(path: string, size: number, zeroPages: readonly number[] = []): Buffer {
  const blob = Buffer.allocUnsafe(size);
  // randomFillSync refuses more than 2^31-1 bytes per call; fill in slices.
  for (let off = 0; off < size; off += 64 << 20) randomFillSync(blob, off, Math.min(64 << 20, size - off));
  for (const p of zeroPages) blob.fill(0, p * PAGE, (p + 1) * PAGE);
  writeFileSync(path, blob);
  return blob;
}

export interface BlockComparison {
  name: string;
  pages: number;
  presentA: number;
  presentB: number;
  /** Pages whose bitmap bits differ (a zero page may legitimately be present in one file only). */
  bitDifferences: number;
  differingPages: number;
  firstDiffering: number[];
}

/**
 * Compares every page of every RAM block of two mapped-ram files by content (clear bit = zero),
 * through our snapshot reader (which also checks each file's layout and device state).
 * Both files must list the same blocks with the same used_length.
 */
export async function compareMappedRamFiles(pathA: string, pathB: string): Promise<BlockComparison[]> {
  const sa = await MappedRamSnapshot.open(pathA);
  try {
    const sb = await MappedRamSnapshot.open(pathB);
    try {
      const list = (s: MappedRamSnapshot) => [...s.blocks.values()].map((b) => `${b.name}:${b.usedLength}`).sort();
      const [namesA, namesB] = [list(sa), list(sb)];
      if (namesA.join(',') !== namesB.join(',')) {
        throw new Error(`RAM block lists differ:\n  ${pathA}: ${namesA.join(', ')}\n  ${pathB}: ${namesB.join(', ')}`);
      }
      const out: BlockComparison[] = [];
      for (const a of sa.blocks.values()) {
        const b = sb.blocks.get(a.name)!;
        const pages = a.usedLength / PAGE;
        const cmp: BlockComparison = {
          name: a.name, pages, presentA: a.bitmap.count(), presentB: b.bitmap.count(), bitDifferences: 0, differingPages: 0, firstDiffering: [],
        };
        for (let p = 0; p < pages; p++) if (a.bitmap.test(p) !== b.bitmap.test(p)) cmp.bitDifferences++;
        const CHUNK = 4096; // pages: 16 MiB per read
        for (let first = 0; first < pages; first += CHUNK) {
          const n = Math.min(CHUNK, pages - first);
          const [da, db] = await Promise.all([sa.readPages(a.name, first * PAGE, n), sb.readPages(a.name, first * PAGE, n)]);
          if (da.equals(db)) continue;
          for (let i = 0; i < n; i++) {
            if (da.compare(db, i * PAGE, (i + 1) * PAGE, i * PAGE, (i + 1) * PAGE) !== 0) {
              cmp.differingPages++;
              if (cmp.firstDiffering.length < 10) cmp.firstDiffering.push(first + i);
            }
          }
        }
        out.push(cmp);
      }
      return out;
    } finally {
      await sb.close();
    }
  } finally {
    await sa.close();
  }
}

/** "equal", or how many pages differ between two equally long memory dumps and where the first is. */
export function firstDifference(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `lengths differ: ${a.length} vs ${b.length}`;
  let diff = 0;
  let first = -1;
  for (let off = 0; off < a.length; off += PAGE) {
    if (a.compare(b, off, off + PAGE, off, off + PAGE) !== 0) {
      if (first < 0) first = off;
      diff++;
    }
  }
  return diff === 0 ? 'equal' : `${diff} pages differ, first at +0x${first.toString(16)}`;
}

/** Names in `dir` that look like a snapshot or receive's temporary file. */
export function snapshotLeftovers(dir: string): string[] {
  return readdirSync(dir).filter((n) => n.endsWith('.mig') || n.includes('.partial-'));
}

export interface RestoreOptions {
  version: QemuVersion;
  memMiB: number;
  file: string;
  /** multifd channels for loading; 0 or undefined loads without multifd. */
  multifdChannels?: number;
  accel?: string;
  bootSector?: boolean;
  machine?: string;
  /** Default true: the guest stays stopped after loading so its memory can be dumped first. */
  paused?: boolean;
  /** More QEMU arguments (e.g. the memory backend the source had). */
  extraArgs?: string[];
  /** More capabilities turned on for the load (e.g. x-ignore-shared). */
  capabilities?: string[];
}

/**
 * Loads a mapped-ram snapshot into a fresh QEMU (docs/protocol.md §7d) and returns it once the load
 * completed. Throws with QEMU's error-desc and stderr when it does not.
 */
export async function restoreSnapshot(o: RestoreOptions): Promise<QemuInstance> {
  const q = await startQemu({
    version: o.version,
    memMiB: o.memMiB,
    incoming: 'defer',
    paused: o.paused ?? true,
    ...(o.accel ? { accel: o.accel } : {}),
    ...(o.bootSector ? { bootSector: true } : {}),
    ...(o.machine ? { machine: o.machine } : {}),
    ...(o.extraArgs ? { extraArgs: o.extraArgs } : {}),
  });
  try {
    const caps = [{ capability: 'mapped-ram', state: true }, ...(o.capabilities ?? []).map((capability) => ({ capability, state: true }))];
    if (o.multifdChannels) caps.push({ capability: 'multifd', state: true });
    await q.qmp.execute('migrate-set-capabilities', { capabilities: caps });
    if (o.multifdChannels) await q.qmp.execute('migrate-set-parameters', { 'multifd-channels': o.multifdChannels });
    await q.qmp.execute('migrate-incoming', { uri: `file:${o.file}`, 'exit-on-error': false });
    const st = await waitMigration(q.qmp, { timeoutMs: 120_000 });
    if (st.status !== 'completed') {
      throw new Error(`QEMU ${o.version} failed to load ${o.file}: ${st.status} ${st['error-desc'] ?? ''}\nstderr:\n${q.stderr()}`);
    }
    return q;
  } catch (e) {
    await q.kill();
    throw e;
  }
}

export interface SourceMigrationOptions {
  channels: number;
  /** Extra migrate-set-parameters for the source (merged over max-bandwidth 100 GiB/s). */
  params?: Record<string, unknown>;
  /** Extra receive() options. */
  receive?: Partial<ReceiveOptions>;
  out: string;
}

/**
 * Starts receive() on an ephemeral port and points the source's `migrate` at it. Returns the
 * handle at once; callers await handle.done and the source's query-migrate themselves.
 */
export async function migrateToReceive(src: QemuInstance, o: SourceMigrationOptions): Promise<ReceiveHandle> {
  const h = receive({ listen: 'tcp:127.0.0.1:0', out: o.out, channels: o.channels, ...o.receive });
  try {
    const addr = await h.listening;
    await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: o.channels > 0 }] });
    await src.qmp.execute('migrate-set-parameters', {
      'max-bandwidth': 107374182400,
      ...(o.channels > 0 ? { 'multifd-channels': o.channels } : {}),
      ...o.params,
    });
    await src.qmp.execute('migrate', { uri: addr });
    return h;
  } catch (e) {
    h.abort(e as Error);
    throw e;
  }
}

/** The summary numbers worth seeing in the test log. */
export function describeSummary(s: ReceiveSummary): string {
  const ch = s.channels.map((c) => `${c.id}:${c.packets}p/${c.syncs}s`).join(' ');
  return `transferred=${s.transferred} mbps=${s.mbps} total-time=${s['total-time']}ms normal=${s.normal} duplicate=${s.duplicate} ` +
    `dirty-sync-count=${s['dirty-sync-count']} sync-mode=${s['sync-mode']} main-bytes=${s['main-bytes']} ` +
    `device-state-bytes=${s['device-state-bytes']} file-size=${s['file-size']} channels=[${ch}]`;
}
