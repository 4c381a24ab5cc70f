// Opens any snapshot file we can send: mapped-ram (QEMU's or ours) or QEMU's plain stream format.
// The format is told by the configuration record's mapped-ram capability; either reader validates
// the whole file before it returns, so a corrupt file fails here, before anything is sent.

import { open } from 'node:fs/promises';
import { ProtocolError } from '../codec/errors.js';
import { MainStreamParser } from '../codec/main-stream-parser.js';
import { MappedRamSnapshot } from './mapped-ram-reader.js';
import type { SnapshotSource } from './snapshot.js';
import { StreamSnapshot } from './stream-snapshot.js';

const PROBE_BYTES = 64 * 1024;

export async function snapshotFormat(path: string): Promise<'mapped-ram' | 'stream'> {
  // Objects are packed mapped-ram snapshots (docs/s3-layout.md).
  if (snapshotOpenerFor(path)) return 'mapped-ram';
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(PROBE_BYTES);
    const { bytesRead } = await fh.read(buf, 0, PROBE_BYTES, 0);
    if (bytesRead === 0) throw new ProtocolError('TRUNCATED', `${path} is empty`);
    const parser = new MainStreamParser();
    parser.push(buf.subarray(0, bytesRead));
    try {
      for (let ev = parser.next(); ev !== null; ev = parser.next()) {
        if (ev.type === 'configuration') return ev.config.capabilities.includes('mapped-ram') ? 'mapped-ram' : 'stream';
        if (ev.type !== 'header') break;
      }
    } catch (e) {
      if (e instanceof ProtocolError && (e.code === 'BAD_MAGIC' || e.code === 'BAD_VERSION')) {
        throw new ProtocolError(e.code, `${path} is not a QEMU migration file we can read: ${e.message}`, { offset: e.offset ?? 0 });
      }
      throw e;
    }
    throw new ProtocolError('BAD_RECORD', `${path} has no configuration record after its header (not a QEMU migration file, or from a machine type too old to write one)`);
  } finally {
    await fh.close();
  }
}

export async function openSnapshot(path: string): Promise<SnapshotSource> {
  const byUrl = snapshotOpenerFor(path);
  if (byUrl) return byUrl(path);
  const format = await snapshotFormat(path);
  return format === 'mapped-ram' ? MappedRamSnapshot.open(path) : StreamSnapshot.open(path);
}

/** Opens snapshots named by URL (s3://…): registered by the layer that owns the client. */
export type SnapshotOpener = (url: string) => Promise<SnapshotSource>;
const openers = new Map<string, SnapshotOpener>();

export function registerSnapshotScheme(scheme: string, open: SnapshotOpener): void {
  openers.set(scheme.toLowerCase(), open);
}

/** The opener for `path` when it is a URL of a registered scheme. */
export function snapshotOpenerFor(path: string): SnapshotOpener | undefined {
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(path)?.[1];
  return scheme === undefined ? undefined : openers.get(scheme.toLowerCase());
}
