// Opens any snapshot file we can send: mapped-ram (QEMU's or ours) or QEMU's plain stream format,
// bare or inside a libvirt save image (raw, compressed or sparse). The format is told by the
// configuration record's mapped-ram capability; either reader validates the whole file before it
// returns, so a corrupt file fails here, before anything is sent.

import { open } from 'node:fs/promises';
import { ProtocolError } from '../codec/errors.js';
import { MainStreamParser } from '../codec/main-stream-parser.js';
import { decompressLibvirtStream, readLibvirtImage } from './libvirt-image-file.js';
import { MappedRamSnapshot } from './mapped-ram-reader.js';
import type { SnapshotSource } from './snapshot.js';
import { StreamSnapshot } from './stream-snapshot.js';

const PROBE_BYTES = 64 * 1024;

export interface OpenSnapshotOptions {
  /** Where QEMU's stream starts in the file (`file:PATH,offset=N`); libvirt images find theirs. */
  offset?: number;
}

export async function snapshotFormat(path: string, offset = 0): Promise<'mapped-ram' | 'stream'> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(PROBE_BYTES);
    const { bytesRead } = await fh.read(buf, 0, PROBE_BYTES, offset);
    if (bytesRead === 0) throw new ProtocolError('TRUNCATED', offset === 0 ? `${path} is empty` : `${path} ends before its QEMU stream at ${offset}`, { offset });
    const parser = new MainStreamParser({ fileOffset: offset });
    parser.push(buf.subarray(0, bytesRead));
    try {
      for (let ev = parser.next(); ev !== null; ev = parser.next()) {
        if (ev.type === 'configuration') return ev.config.capabilities.includes('mapped-ram') ? 'mapped-ram' : 'stream';
        if (ev.type !== 'header') break;
      }
    } catch (e) {
      if (e instanceof ProtocolError && (e.code === 'BAD_MAGIC' || e.code === 'BAD_VERSION')) {
        throw new ProtocolError(e.code, `${path} is not a QEMU migration file we can read: ${e.message}`, { offset: e.offset ?? offset });
      }
      throw e;
    }
    throw new ProtocolError('BAD_RECORD', `${path} has no configuration record after its header (not a QEMU migration file, or from a machine type too old to write one)`, { offset });
  } finally {
    await fh.close();
  }
}

async function openAt(path: string, offset: number): Promise<SnapshotSource> {
  const format = await snapshotFormat(path, offset);
  const src = format === 'mapped-ram' ? await MappedRamSnapshot.open(path, { baseOffset: offset }) : await StreamSnapshot.open(path, { baseOffset: offset });
  return offset === 0 ? src : Object.assign(src, { baseOffset: offset });
}

export async function openSnapshot(path: string, opts: OpenSnapshotOptions = {}): Promise<SnapshotSource> {
  const image = await readLibvirtImage(path);
  if (!image) return openAt(path, opts.offset ?? 0);
  const libvirt = { ...image, imagePath: path };
  if (image.format === 'raw' || image.format === 'sparse') {
    const src = await openAt(path, image.qemuOffset);
    if ((image.format === 'sparse') !== (src.format === 'mapped-ram')) {
      await src.close();
      throw new ProtocolError('BAD_RECORD', `${path}: the libvirt header says ${image.format}, but its QEMU stream is ${src.format === 'mapped-ram' ? 'mapped-ram' : 'a plain stream'}`, { offset: 28 });
    }
    return Object.assign(src, { libvirt });
  }
  const tmp = await decompressLibvirtStream(path, image);
  let src: SnapshotSource;
  try {
    src = await openAt(tmp.file, 0);
  } catch (e) {
    await tmp.remove();
    if (e instanceof ProtocolError) e.message = `${path} (${image.format}-decompressed QEMU stream): ${e.message}`;
    throw e;
  }
  const close = src.close.bind(src);
  return Object.assign(src, {
    libvirt,
    close: async () => {
      try {
        await close();
      } finally {
        await tmp.remove();
      }
    },
  });
}
