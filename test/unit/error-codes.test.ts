// The errors a caller of the file tools, the file writers and save's option checks may branch on:
// each is a class from codec/errors.ts with a stable code, and keeps the message it had as a
// plain Error (the CLI prints the message; cli-errors and file-tools check it on the command line).

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AbortedError, InvalidOptionError, MultifdError, OutputFileError, type MultifdErrorCode } from '../../src/codec/errors.js';
import { encodeLibvirtImage } from '../../src/codec/libvirt-image.js';
import { convert } from '../../src/conversations/convert.js';
import { extract } from '../../src/conversations/extract.js';
import { checkOutputPath, OutputFile } from '../../src/conversations/output-file.js';
import { checkBackgroundOptions } from '../../src/conversations/save.js';
import { MappedRamWriter } from '../../src/engine/mapped-ram-writer.js';
import { findScenario } from '../helpers/fixtures.js';

const dir = mkdtempSync('/tmp/multifd-error-codes-');
after(() => rmSync(dir, { recursive: true, force: true }));

/** A matcher for assert.throws/rejects: this class, this code, this message. */
function typed(cls: abstract new (...a: never[]) => MultifdError, code: MultifdErrorCode, message: RegExp): (e: unknown) => boolean {
  return (e: unknown) => {
    assert.ok(e instanceof cls, `${String(e)} is a ${cls.name}`);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, message);
    return true;
  };
}

const STREAM = join(dir, 'stream.mig');
writeFileSync(STREAM, findScenario('10.0', 'stream-file').main());
const MAPPED = join(dir, 'mapped.mig');
writeFileSync(MAPPED, findScenario('10.0', 'mapped-ram-file').main());

describe('output files', () => {
  test('a directory, an existing file without force, a file that cannot be created', async () => {
    const folder = join(dir, 'folder');
    mkdirSync(folder);
    const taken = join(dir, 'taken.mig');
    writeFileSync(taken, 'keep me');
    await assert.rejects(checkOutputPath(folder, true), typed(OutputFileError, 'OUTPUT_IS_DIRECTORY', /folder is a directory$/));
    await assert.rejects(checkOutputPath(taken, false), typed(OutputFileError, 'OUTPUT_EXISTS', /taken\.mig already exists \(use --force to overwrite it\)/));
    await checkOutputPath(taken, true);
    const nowhere = join(dir, 'no-such-dir', 'out.raw');
    await assert.rejects(OutputFile.create(nowhere), (e: unknown) => {
      typed(OutputFileError, 'OUTPUT_FAILED', /^cannot create .*no-such-dir\/out\.raw: ENOENT/)(e);
      assert.equal((e as OutputFileError).path, nowhere);
      assert.equal((e as OutputFileError).errno, 'ENOENT');
      return true;
    });
    await assert.rejects(MappedRamWriter.create(nowhere), typed(OutputFileError, 'OUTPUT_FAILED', /^cannot create the snapshot in .*no-such-dir: ENOENT/));
  });
});

describe('convert and extract', () => {
  test('the input as output, no domain XML for a libvirt image, a bad one', async () => {
    await assert.rejects(convert({ input: STREAM, output: STREAM, to: 'stream', force: true }), typed(OutputFileError, 'OUTPUT_IS_INPUT', /is the input file$/));
    await assert.rejects(convert({ input: STREAM, output: join(dir, 'x.img'), to: 'libvirt' }), typed(InvalidOptionError, 'INVALID_OPTION', /^a libvirt image needs the domain XML \(--domain-xml FILE/));
    await assert.rejects(convert({ input: STREAM, output: join(dir, 'y.img'), to: 'libvirt', domainXml: '<dom/>' }), typed(InvalidOptionError, 'INVALID_OPTION', /^the domain XML has no <domain> element$/));
    assert.throws(() => encodeLibvirtImage({ domainXml: '<domain>\0</domain>', wasRunning: true, format: 'raw' }), typed(InvalidOptionError, 'INVALID_OPTION', /cannot contain NUL/));
    assert.deepEqual(readdirSync(dir).filter((f) => /^[xy]\.img/.test(f)), [], 'nothing written');
  });

  test('interrupted: an AbortedError that keeps the signal\'s reason and says no output was written', async () => {
    const sub = join(dir, 'interrupted');
    mkdirSync(sub);
    const reason = new Error('stop now');
    const ac = new AbortController();
    const stop = (p: { pagesDone: number }): void => { if (p.pagesDone > 0) ac.abort(reason); };
    const aborted = (what: string) => (e: unknown): boolean => {
      typed(AbortedError, 'ABORTED', new RegExp(`^${what} interrupted; no output written$`))(e);
      assert.equal((e as AbortedError).reason, reason);
      return true;
    };
    await assert.rejects(convert({ input: MAPPED, output: join(sub, 'out.mig'), to: 'stream', batchPages: 4, signal: ac.signal, onProgress: stop }), aborted('convert'));
    const ac2 = new AbortController();
    ac2.abort(reason);
    await assert.rejects(extract({ file: MAPPED, out: join(sub, 'blocks'), signal: ac2.signal }), aborted('extract'));
    assert.deepEqual(readdirSync(join(sub, 'blocks')), [], 'no block image, no temporary file');
    assert.deepEqual(readdirSync(sub).filter((f) => f !== 'blocks'), [], 'no convert output, no temporary file');
  });

  test('extract --out naming a file where the block images\' folder belongs', async () => {
    const file = join(dir, 'a-file');
    writeFileSync(file, 'x');
    await assert.rejects(extract({ file: MAPPED, out: file }), typed(OutputFileError, 'OUTPUT_NOT_DIRECTORY', /a-file is not a directory$/));
  });
});

describe('save', () => {
  test('--background with multifd, compression or a level: InvalidOptionError, before QEMU is touched', () => {
    assert.throws(() => checkBackgroundOptions({ background: true, channels: 2 }), typed(InvalidOptionError, 'INVALID_OPTION', /^--background saves over the main channel alone .*drop --channels 2$/));
    assert.throws(() => checkBackgroundOptions({ background: true, compression: 'zstd' }), typed(InvalidOptionError, 'INVALID_OPTION', /^--background cannot use compression zstd/));
    assert.throws(() => checkBackgroundOptions({ background: true, level: 3 }), typed(InvalidOptionError, 'INVALID_OPTION', /^--background takes no compression level/));
    checkBackgroundOptions({ background: true, channels: 0, compression: 'none' });
    checkBackgroundOptions({ background: false, channels: 4 });
  });
});
