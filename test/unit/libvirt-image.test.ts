// libvirt save images without libvirt: the header codec (every refusal with its offset), and the
// file tools on QEMU's own stream and mapped-ram files (the golden fixtures) wrapped the way
// libvirt 11.3 wraps them: raw, gzip, zstd, bzip2/xz through the system tool, sparse with
// absolute offsets; plus a bare QEMU file at `file:PATH,offset=N`. Page images are compared with
// an oracle that replays the bare fixture (test/helpers/file-images.ts).

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { ProtocolError } from '../../src/codec/errors.js';
import {
  decodeLibvirtData,
  decodeLibvirtHeader,
  decodeLibvirtImage,
  encodeLibvirtImage,
  LIBVIRT_HEADER_BYTES,
  LIBVIRT_XML_PADDING,
  type LibvirtFormat,
} from '../../src/codec/libvirt-image.js';
import { MAPPED_RAM_FILE_OFFSET_ALIGNMENT } from '../../src/codec/constants.js';
import { convert } from '../../src/conversations/convert.js';
import { extract } from '../../src/conversations/extract.js';
import { inspect } from '../../src/conversations/inspect.js';
import { verify } from '../../src/conversations/verify.js';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import { imagesOf } from '../helpers/file-images.js';
import { scenarios } from '../helpers/fixtures.js';
import { ZSTD_SKIP } from '../helpers/zstd.js';

const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
const dir = mkdtempSync('/tmp/libvirt-image-test-');
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const tmp = (name: string): string => join(dir, `${n++}-${name}`);
// Where compressed images are decompressed to, so that the test can see them cleaned up.
const DECOMPRESS_DIR = join(dir, 'decompressed');
mkdirSync(DECOMPRESS_DIR);
process.env.MULTIFD_TMPDIR = DECOMPRESS_DIR;

const XML = "<domain type='qemu'>\n  <name>t</name>\n  <uuid>265adad0-707c-470d-83ea-879bde10d5d8</uuid>\n</domain>\n";
const COOKIE = '<cookie>\n  <slirpHelper/>\n</cookie>\n';

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: 60_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

function refused(fn: () => unknown, code: string, offset: number, message: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ProtocolError, String(e));
    assert.equal(e.code, code, e.message);
    assert.equal(e.offset, offset, `${e.message}: offset`);
    assert.match(e.message, message);
    return true;
  });
}

/** A finished image (the `…Save` magic) as libvirt 11.3 writes it. */
function image(opts: { format?: LibvirtFormat; cookie?: boolean; wasRunning?: boolean } = {}): Buffer {
  const b = encodeLibvirtImage({ domainXml: XML, ...(opts.cookie === false ? {} : { cookie: COOKIE }), wasRunning: opts.wasRunning ?? true, format: opts.format ?? 'raw' });
  b.write('LibvirtQemudSave', 0, 'latin1');
  return b;
}

describe('libvirt header codec', () => {
  test('round trip: the layout of qemu_saveimage.h, data_len with libvirt\'s 64 KiB padding', () => {
    const b = image();
    assert.equal(b.length, LIBVIRT_HEADER_BYTES + XML.length + 1 + COOKIE.length + 1 + LIBVIRT_XML_PADDING);
    assert.equal(b.readUInt32LE(16), 2);
    assert.equal(b.readUInt32LE(20), b.length - LIBVIRT_HEADER_BYTES);
    assert.equal(b.readUInt32LE(24), 1);
    assert.equal(b.readUInt32LE(28), 0);
    assert.equal(b.readUInt32LE(32), XML.length + 1, 'cookieOffset relative to byte 92');
    assert.ok(b.subarray(36, 92).every((x) => x === 0), 'unused words are zero');
    const img = decodeLibvirtImage(b, b.length);
    assert.equal(img.domainXml, XML);
    assert.equal(img.cookie, COOKIE);
    assert.equal(img.wasRunning, true);
    assert.equal(img.format, 'raw');
    assert.equal(img.qemuOffset, b.length);
    const noCookie = decodeLibvirtImage(image({ cookie: false, wasRunning: false, format: 'sparse' }));
    assert.equal(noCookie.cookie, undefined);
    assert.equal(noCookie.cookieOffset, 0);
    assert.equal(noCookie.wasRunning, false);
    assert.equal(noCookie.format, 'sparse');
  });

  test('encode writes the unfinished magic; decode refuses it as an unfinished save', () => {
    const b = encodeLibvirtImage({ domainXml: XML, wasRunning: true, format: 'raw' });
    assert.equal(b.toString('latin1', 0, 16), 'LibvirtQemudPart');
    refused(() => decodeLibvirtHeader(b), 'INCOMPLETE_IMAGE', 0, /unfinished.*LibvirtQemudPart/);
  });

  test('a header written on the other endianness is read, as libvirt does', () => {
    const b = image({ format: 'zstd' });
    for (let at = 16; at < 36; at += 4) b.writeUInt32BE(b.readUInt32LE(at), at);
    const h = decodeLibvirtHeader(b, b.length);
    assert.equal(h.byteSwapped, true);
    assert.equal(h.format, 'zstd');
    assert.equal(decodeLibvirtData(h, b.subarray(92)).cookie, COOKIE);
  });

  test('version 1 has no format field: always raw', () => {
    const b = image();
    b.writeUInt32LE(1, 16);
    b.writeUInt32LE(5, 28);
    assert.equal(decodeLibvirtHeader(b).format, 'raw');
  });

  test('every refusal names its offset', () => {
    const good = image();
    const with_ = (at: number, v: number): Buffer => {
      const b = Buffer.from(good);
      b.writeUInt32LE(v, at);
      return b;
    };
    refused(() => decodeLibvirtHeader(good.subarray(0, 50)), 'TRUNCATED', 50, /header is truncated: 50 bytes, the header has 92/);
    refused(() => decodeLibvirtHeader(Buffer.concat([Buffer.from('LibvirtQemudXXXX'), good.subarray(16)])), 'BAD_MAGIC', 0, /not a libvirt save image/);
    refused(() => decodeLibvirtHeader(with_(16, 3)), 'BAD_VERSION', 16, /version 3 is not supported/);
    refused(() => decodeLibvirtHeader(with_(16, 0)), 'BAD_VERSION', 16, /version 0/);
    refused(() => decodeLibvirtHeader(with_(20, 0)), 'BAD_RECORD', 20, /data_len is 0/);
    refused(() => decodeLibvirtHeader(with_(20, 0x7000000)), 'LIMIT_EXCEEDED', 20, /data_len 117440512 is larger/);
    refused(() => decodeLibvirtHeader(good, good.length - 1), 'TRUNCATED', 20, /reaches past the end of the file/);
    refused(() => decodeLibvirtHeader(with_(24, 2)), 'BAD_RECORD', 24, /was_running is 2/);
    refused(() => decodeLibvirtHeader(with_(28, 7)), 'UNSUPPORTED', 28, /format 7 is unknown/);
    refused(() => decodeLibvirtHeader(with_(32, good.length)), 'BAD_RECORD', 32, /cookieOffset .* is not inside data_len/);
    const h = decodeLibvirtHeader(good);
    refused(() => decodeLibvirtData(h, good.subarray(92, 200)), 'TRUNCATED', 200, /data is truncated: 108 of its/);
    // The XML's NUL overwritten: the XML now runs into the cookie's region.
    const noXmlNul = Buffer.from(good);
    noXmlNul[92 + XML.length] = 0x20;
    refused(() => decodeLibvirtImage(noXmlNul), 'BAD_RECORD', 92, /domain XML is not NUL-terminated within its \d+ bytes/);
    const noCookieNul = Buffer.from(good);
    noCookieNul.fill(0x20, 92 + XML.length + 1);
    refused(() => decodeLibvirtImage(noCookieNul), 'BAD_RECORD', 92 + XML.length + 1, /cookie is not NUL-terminated/);
    const empty = Buffer.from(good);
    empty.fill(0, 92, 92 + XML.length);
    refused(() => decodeLibvirtImage(empty), 'BAD_RECORD', 92, /domain XML is empty/);
  });
});

const FILES = scenarios((e) => e.transport === 'file' && e.qemu === '10.0');
const STREAM = FILES.find((s) => s.entry.scenario === 'stream-file')!;
const MAPPED = FILES.find((s) => s.entry.scenario === 'mapped-ram-file')!;

function bare(s: typeof STREAM): string {
  const p = tmp(`${s.entry.scenario}.mig`);
  writeFileSync(p, s.main());
  return p;
}

/** extract's images (our readers, base offset and all) against the oracle's of the bare file. */
async function assertSameImages(file: string, bareFile: string): Promise<void> {
  const want = await imagesOf(bareFile);
  const out = tmp('extract');
  const s = await extract({ file, out });
  assert.equal(s.blocks.length, want.size);
  for (const b of s.blocks) {
    const got = readFileSync(b.output);
    assert.ok(got.equals(want.get(b.name)!), `block ${b.name} differs from the bare file's`);
  }
}

function haveTool(name: string): boolean {
  return spawnSync(name, ['--version'], { stdio: 'ignore' }).status === 0;
}

describe('libvirt images with QEMU\'s own files inside', () => {
  test('raw: inspect (header, XML, cookie, file offsets), verify, extract, convert back to a bare file', async () => {
    const b = bare(STREAM);
    const head = image();
    const f = tmp('raw.sav');
    writeFileSync(f, Buffer.concat([head, readFileSync(b)]));
    const v = await verify(f);
    assert.equal(v.ok, true, JSON.stringify(v.problems));
    assert.equal(v.libvirt?.format, 'raw');
    const r = await inspect(f);
    assert.equal(r.libvirt?.['domain-xml'], XML);
    assert.equal(r.libvirt?.cookie, COOKIE);
    assert.equal(r.libvirt?.['qemu-offset'], head.length);
    assert.equal(r['file-size'], head.length + STREAM.check.main.bytes);
    assert.equal(r.configuration.offset, head.length + 8, 'offsets are file offsets');
    assert.equal(r['device-state'].offset, head.length + STREAM.check.main.offsets.first_device);
    await assertSameImages(f, b);
    const back = tmp('back.mig');
    const c = await convert({ input: f, output: back, to: 'stream' });
    assert.equal(c['from-libvirt'], 'raw');
    assert.equal(readFileSync(back).toString('latin1', 0, 4), 'QEVM', 'a bare QEMU file again');
    await assertSameImages(back, b);
    const j = await cli(['inspect', '--json', f]);
    assert.equal(j.code, 0, j.stderr);
    assert.equal(JSON.parse(j.stdout).libvirt['domain-xml'], XML);
    const t = await cli(['inspect', f]);
    assert.match(t.stdout, /libvirt: +raw save image, version 2, was running; data_len \d+, QEMU stream at 0x[0-9a-f]+, cookie at \+\d+/);
    assert.match(t.stdout, /domain XML:\n  <domain type='qemu'>/);
  });

  const compressed: { format: LibvirtFormat; compress: (b: Buffer) => Buffer | undefined }[] = [
    { format: 'gzip', compress: (b) => gzipSync(b) },
    { format: 'zstd', compress: (b) => spawnSync('zstd', ['-c', '-q'], { input: b, maxBuffer: 1 << 30 }).stdout },
    { format: 'bzip2', compress: (b) => spawnSync('bzip2', ['-c'], { input: b, maxBuffer: 1 << 30 }).stdout },
    { format: 'xz', compress: (b) => spawnSync('xz', ['-c', '-3'], { input: b, maxBuffer: 1 << 30 }).stdout },
  ];
  for (const c of compressed) {
    const tool = c.format === 'gzip' ? undefined : c.format;
    test(`${c.format}: verify, inspect and extract read the decompressed stream`, { skip: tool && !haveTool(tool) ? `no ${tool} tool to make the test image with` : c.format === 'zstd' ? ZSTD_SKIP : false }, async () => {
      const b = bare(STREAM);
      const f = tmp(`${c.format}.sav`);
      writeFileSync(f, Buffer.concat([image({ format: c.format }), c.compress(readFileSync(b))!]));
      const v = await verify(f);
      assert.equal(v.ok, true, JSON.stringify(v.problems));
      assert.equal(v.format, 'stream');
      assert.equal(v.libvirt?.format, c.format);
      const r = await inspect(f);
      assert.equal(r.libvirt?.format, c.format);
      assert.equal(r.machine, STREAM.check.main.machine);
      await assertSameImages(f, b);
      assert.deepEqual(readdirSync(DECOMPRESS_DIR), [], 'the decompressed stream is removed once closed');
    });
  }

  test('a corrupt gzip stream and a missing tool are refused, naming the format', async () => {
    const f = tmp('bad-gzip.sav');
    const head = image({ format: 'gzip' });
    writeFileSync(f, Buffer.concat([head, Buffer.from('this is not gzip')]));
    await assert.rejects(openSnapshot(f), (e: Error) => {
      assert.ok(e instanceof ProtocolError);
      assert.equal(e.offset, head.length);
      assert.match(e.message, /gzip QEMU stream does not decompress/);
      return true;
    });
    const lz = tmp('lzop.sav');
    writeFileSync(lz, Buffer.concat([image({ format: 'lzop' }), Buffer.from('x')]));
    const path = process.env.PATH;
    process.env.PATH = dir; // no lzop here
    try {
      await assert.rejects(openSnapshot(lz), /lzop-compressed libvirt image and the "lzop" tool is not installed/);
    } finally {
      process.env.PATH = path;
    }
  });

  test('sparse: QEMU\'s mapped-ram file rewritten as libvirt-sparse has absolute, 1 MiB-aligned page offsets; back to mapped-ram and raw', async () => {
    const b = bare(MAPPED);
    const f = tmp('sparse.sav');
    const c = await convert({ input: b, output: f, to: 'libvirt-sparse', domainXml: XML });
    assert.equal(c.to, 'libvirt-sparse');
    const bytes = readFileSync(f);
    assert.equal(bytes.toString('latin1', 0, 16), 'LibvirtQemudSave', 'finished magic once complete');
    const img = decodeLibvirtImage(bytes, bytes.length);
    assert.equal(img.format, 'sparse');
    assert.equal(img.wasRunning, true, 'default for a bare input');
    assert.equal(img.cookie, undefined);
    const r = await inspect(f);
    assert.equal(r.format, 'mapped-ram');
    for (const blk of r.blocks) {
      const m = blk['mapped-ram']!;
      assert.ok(m.pagesOffset > img.qemuOffset, 'absolute: past the libvirt header');
      assert.equal(m.pagesOffset % MAPPED_RAM_FILE_OFFSET_ALIGNMENT, 0);
    }
    assert.equal((await verify(f)).ok, true);
    await assertSameImages(f, b);
    // The XML and cookie come from a libvirt input; --paused turns was_running off.
    const raw = tmp('from-sparse.sav');
    await convert({ input: f, output: raw, to: 'libvirt', wasRunning: false });
    const rawImg = decodeLibvirtImage(readFileSync(raw));
    assert.equal(rawImg.format, 'raw');
    assert.equal(rawImg.domainXml, XML);
    assert.equal(rawImg.wasRunning, false);
    await assertSameImages(raw, b);
    const mr = tmp('back.mig');
    await convert({ input: f, output: mr, to: 'mapped-ram' });
    await assertSameImages(mr, b);
  });

  test('convert to libvirt without a domain XML (and a bare input) is refused before writing', async () => {
    const out = tmp('none.sav');
    await assert.rejects(convert({ input: bare(STREAM), output: out, to: 'libvirt' }), /needs the domain XML \(--domain-xml FILE/);
    assert.deepEqual(readdirSync(dir).filter((x) => x.includes('none.sav')), []);
    const r = await cli(['convert', bare(STREAM), out, '--to', 'libvirt']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /needs the domain XML/);
  });

  test('an unfinished (…Part) image and a truncated header are refused by verify, inspect and convert', async () => {
    const part = tmp('part.sav');
    const head = encodeLibvirtImage({ domainXml: XML, wasRunning: true, format: 'raw' });
    writeFileSync(part, Buffer.concat([head, STREAM.main()]));
    const v = await verify(part);
    assert.equal(v.ok, false);
    assert.equal(v.problems[0]!.code, 'INCOMPLETE_IMAGE');
    assert.equal(v.problems[0]!.offset, 0);
    const r = await cli(['inspect', part]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /unfinished \(magic "LibvirtQemudPart"\).*\(at byte 0, 0x0\)/);
    const cut = tmp('cut.sav');
    writeFileSync(cut, image().subarray(0, 60));
    const c = await cli(['verify', cut]);
    assert.equal(c.code, 1);
    assert.match(c.stdout, /header is truncated: 60 bytes, the header has 92.*TRUNCATED/);
    await assert.rejects(convert({ input: cut, output: tmp('x.mig'), to: 'stream' }), /header is truncated/);
    const short = tmp('short.sav');
    writeFileSync(short, image().subarray(0, 1000));
    await assert.rejects(openSnapshot(short), (e: Error) => e instanceof ProtocolError && e.offset === 20 && /reaches past the end of the file/.test(e.message));
  });
});

describe('a bare QEMU file at an offset (file:PATH,offset=N)', () => {
  test('openSnapshot with the offset reads the stream file behind a prefix', async () => {
    const b = bare(STREAM);
    const prefix = Buffer.alloc(12345, 0xab);
    const f = tmp('offset.mig');
    writeFileSync(f, Buffer.concat([prefix, readFileSync(b)]));
    const src = await openSnapshot(f, { offset: prefix.length });
    try {
      assert.equal(src.baseOffset, prefix.length);
      assert.equal(src.deviceState.fileOffset, prefix.length + STREAM.check.main.offsets.first_device);
    } finally {
      await src.close();
    }
    await assert.rejects(openSnapshot(f), /not a QEMU migration file/);
  });
});
