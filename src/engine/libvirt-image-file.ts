// Reading libvirt save images (codec/libvirt-image.ts): the header and XML up front, then QEMU's
// stream at 92 + data_len. Raw and sparse images are read in place through the snapshot readers
// with that base offset. A compressed image's stream has no positions to read pages from, so it
// is decompressed once, front to back in constant memory, into an unlinked-on-close temporary
// file (TMPDIR) and read from there: gzip with node:zlib, zstd with zstd-napi (Node 20's zlib
// has no zstd), bzip2, xz and lzop through the system's own tool, as libvirt itself does.

import { spawn } from 'node:child_process';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { access, constants as fsConstants } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { Transform } from 'node:stream';
import { decodeLibvirtData, decodeLibvirtHeader, finishedMagic, LIBVIRT_HEADER_BYTES, LIBVIRT_MAGIC_PREFIX, looksLikeLibvirtImage, type LibvirtFormat, type LibvirtImage } from '../codec/libvirt-image.js';
import { InvalidOptionError, OutputFileError, ProtocolError } from '../codec/errors.js';
import { zstdBackend, zstdUnavailable } from './methods/zstd.js';
import { zstdNapiDecompressStream } from './methods/zstd-napi.js';
import { nodeZstdDecompressStream } from './methods/zstd-stream.js';

/** The libvirt image at `path`, or undefined when the file does not start with a libvirt magic. */
export async function readLibvirtImage(path: string): Promise<LibvirtImage | undefined> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    const head = Buffer.alloc(Math.min(size, LIBVIRT_HEADER_BYTES));
    await fh.read(head, 0, head.length, 0);
    if (!looksLikeLibvirtImage(head)) {
      // A file cut inside the magic itself still names what it was meant to be.
      if (head.length < LIBVIRT_MAGIC_PREFIX.length && head.length >= 4 && LIBVIRT_MAGIC_PREFIX.startsWith(head.toString('latin1'))) {
        decodeLibvirtHeader(head, size);
      }
      return undefined;
    }
    const header = decodeLibvirtHeader(head, size);
    const data = Buffer.alloc(header.dataLen);
    const { bytesRead } = await fh.read(data, 0, data.length, LIBVIRT_HEADER_BYTES);
    return decodeLibvirtData(header, data.subarray(0, bytesRead));
  } finally {
    await fh.close();
  }
}

/** The system tool libvirt uses for a format (libvirt runs `<format> -dc`). */
const TOOLS: Partial<Record<LibvirtFormat, string>> = { bzip2: 'bzip2', xz: 'xz', lzop: 'lzop' };

async function findTool(name: string): Promise<string | undefined> {
  for (const dir of (process.env.PATH ?? '/usr/bin:/bin').split(delimiter)) {
    const p = join(dir, name);
    if (await access(p, fsConstants.X_OK).then(() => true, () => false)) return p;
  }
  return undefined;
}

/** node:zlib's zstd where this Node has it, else the optional zstd-napi; neither: what to install. */
async function zstdDecompressor(): Promise<Transform> {
  const backend = zstdBackend();
  if (backend === undefined) throw zstdUnavailable()!;
  return backend === 'node:zlib' ? nodeZstdDecompressStream() : zstdNapiDecompressStream();
}

/** Runs `tool -dc` with the compressed bytes on stdin and `out` as stdout. */
async function viaTool(format: LibvirtFormat, path: string, from: number, out: string): Promise<void> {
  const name = TOOLS[format]!;
  const bin = await findTool(name);
  if (!bin) {
    throw new ProtocolError('UNSUPPORTED', `${path} is a ${format}-compressed libvirt image and the "${name}" tool is not installed (install it to read this image)`, { offset: 28 });
  }
  const dst = await open(out, 'w');
  try {
    const child = spawn(bin, format === 'lzop' ? ['-dc', '--ignore-warn'] : ['-dc'], { stdio: ['pipe', dst.fd, 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (b: Buffer) => {
      if (stderr.length < 4096) stderr += b.toString('utf8');
    });
    const exited = new Promise<number>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (code) => resolve(code ?? 1));
    });
    await pipeline(createReadStream(path, { start: from }), child.stdin!).catch((e: NodeJS.ErrnoException) => {
      // The tool stopping early (corrupt input) closes its stdin: its exit status says why.
      if (e.code !== 'EPIPE') throw e;
    });
    const code = await exited;
    if (code !== 0) {
      throw new ProtocolError('BAD_RECORD', `${path}: ${name} could not decompress the QEMU stream (exit ${code}): ${stderr.trim() || 'no message'}`, { offset: from });
    }
  } finally {
    await dst.close();
  }
}

/**
 * Decompresses the QEMU stream of a compressed image into a fresh temporary directory and
 * returns the stream file's path and a function that removes it.
 */
export async function decompressLibvirtStream(path: string, image: LibvirtImage): Promise<{ file: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(join(process.env.MULTIFD_TMPDIR || tmpdir(), 'multifd-libvirt-'));
  const remove = (): Promise<void> => rm(dir, { recursive: true, force: true });
  const file = join(dir, 'qemu-stream');
  try {
    if (image.format === 'gzip' || image.format === 'zstd') {
      const inflate = image.format === 'gzip' ? createGunzip() : await zstdDecompressor();
      await pipeline(createReadStream(path, { start: image.qemuOffset }), inflate, createWriteStream(file)).catch((e: Error) => {
        throw new ProtocolError('BAD_RECORD', `${path}: the ${image.format} QEMU stream does not decompress: ${e.message}`, { offset: image.qemuOffset });
      });
    } else if (TOOLS[image.format]) {
      await viaTool(image.format, path, image.qemuOffset, file);
    } else {
      throw new InvalidOptionError(`format ${image.format} is not compressed`);
    }
    return { file, remove };
  } catch (e) {
    await remove();
    throw e;
  }
}

/**
 * Turns a complete, durable `…Part` image into a `…Save` one (libvirt's virQEMUSaveDataFinish):
 * the last step of writing an image, so that an interrupted write never looks restorable.
 */
export async function finishLibvirtImage(path: string): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    const magic = finishedMagic();
    const { bytesWritten } = await fh.write(magic, 0, magic.length, 0);
    if (bytesWritten !== magic.length) throw new OutputFileError('OUTPUT_FAILED', path, `${path}: short write of the libvirt header magic`);
    await fh.sync();
  } finally {
    await fh.close();
  }
}
