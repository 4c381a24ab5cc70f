// The file tools on the command line: inspect, verify, convert, extract. Argument parsing,
// progress and output only; the work is in src/conversations.

import { Option, type Command } from 'commander';
import { resolve } from './object-store-options.js';
import { ProtocolError } from '../codec/errors.js';
import { readFile } from 'node:fs/promises';
import { convert, type ConvertProgress, type ConvertTarget } from '../conversations/convert.js';
import { extract, type ExtractProgress } from '../conversations/extract.js';
import { inspect } from '../conversations/inspect.js';
import { verify } from '../conversations/verify.js';
import { convertText, extractText, hex, inspectText, verifyText } from './file-format.js';
import { ProgressView, storeReadDetail, uploadSample } from './progress.js';
import { checkInputFile } from './paths.js';
import { failureStatus, onInterrupt } from './interrupt.js';

/** One line on stderr naming the file and, when known, the offset; never a stack trace. Exit 1, or 130/143 after an interrupt. */
function fail(e: unknown, file: string): never {
  const err = e as Error & { offset?: number };
  let msg = String(err?.message ?? e).replace(/\s*\n\s*/g, '; ');
  // Problems with the file's content name the file; others (an existing output, a missing
  // directory) already say what they are about.
  if (e instanceof ProtocolError && !msg.includes(file)) msg = `${file}: ${msg}`;
  const where = typeof err?.offset === 'number' ? ` (at byte ${err.offset}, ${hex(err.offset)})` : '';
  process.stderr.write(`multifd: error: ${msg}${where}\n`);
  process.exit(failureStatus());
}

function print(json: boolean | undefined, value: unknown, text: () => string): void {
  process.stdout.write(json ? JSON.stringify(value, null, 2) + '\n' : text() + '\n');
}

/** Ctrl-C stops a long job cleanly: the temporary output is removed before we exit (130; 143 for SIGTERM). */
function interruptible(): { signal: AbortSignal; dispose: () => void } {
  const ac = new AbortController();
  return { signal: ac.signal, dispose: onInterrupt(() => ac.abort()) };
}

export function registerFileCommands(program: Command): void {
  program
    .command('inspect')
    .description('show what a migration file holds: format, machine, capabilities, sections with offsets, RAM blocks, and (--devices) every device field')
    .argument('<file>', 'migration file (mapped-ram or QEMU stream)')
    .option('--devices', "decode every device's fields through the file's VMDESCRIPTION")
    .option('--json', 'print JSON on stdout')
    .action(async (file: string, o: { devices?: boolean; json?: boolean }) => {
      try {
        checkInputFile(resolve(file));
        const r = await inspect(resolve(file), { devices: o.devices === true });
        print(o.json, r, () => inspectText(r));
      } catch (e) {
        fail(e, file);
      }
    });

  program
    .command('verify')
    .description('check a migration file completely (records, footers, offsets, bitmaps, device state against its VMDESCRIPTION); exit 0 only if it is loadable')
    .argument('<file>', 'migration file')
    .option('--json', 'print the result as JSON on stdout')
    .action(async (file: string, o: { json?: boolean }) => {
      try {
        checkInputFile(resolve(file));
        const r = await verify(resolve(file));
        print(o.json, r, () => verifyText(r));
        process.exitCode = r.ok ? 0 : 1;
      } catch (e) {
        fail(e, file);
      }
    });

  program
    .command('convert')
    .description('rewrite a migration file as mapped-ram, as a plain stream or as a libvirt save image, page for page, device state unchanged')
    .argument('<in>', 'input migration file')
    .argument('<out>', 'output file (written under a temporary name, renamed when complete)')
    .addOption(new Option('--to <format>', 'output format').choices(['mapped-ram', 'stream', 'libvirt', 'libvirt-sparse']).makeOptionMandatory())
    .option('--domain-xml <file>', 'libvirt output: the domain XML (virsh dumpxml --migratable); default: a libvirt input\'s own')
    .option('--paused', 'libvirt output: virsh restore leaves the guest paused (default: as the libvirt input says, else resumed)')
    .option('--force', 'overwrite OUT if it exists')
    .option('--json', 'print the summary as JSON on stdout')
    .addHelpText('after', `
Load the result into QEMU with migrate-incoming uri=file:OUT, with capability
mapped-ram on for a mapped-ram file and off for a stream file. A libvirt image
(libvirt: classic, libvirt-sparse: parallel) is restored with virsh restore OUT
(libvirt-sparse also with --parallel-channels N).`)
    .action(async (input: string, output: string, o: { to: ConvertTarget; domainXml?: string; paused?: boolean; force?: boolean; json?: boolean }) => {
      const view = new ProgressView(process.stderr.isTTY === true, 'convert');
      const intr = interruptible();
      try {
        checkInputFile(resolve(input));
        const s = await convert({
          input: resolve(input),
          output: resolve(output),
          to: o.to,
          ...(o.domainXml !== undefined ? { domainXml: await readFile(resolve(o.domainXml), 'utf8') } : {}),
          ...(o.paused ? { wasRunning: false } : {}),
          force: o.force === true,
          signal: intr.signal,
          onProgress: (p: ConvertProgress) => view.update(p.upload ? uploadSample(p.upload) : { phase: p.phase, elapsedMs: p.elapsedMs, transferred: p.written, pages: p.pagesDone, totalPages: p.pagesTotal, detail: `${p.pagesDone}/${p.pagesTotal} pages${storeReadDetail(p.store)}` }),
        });
        view.stop();
        print(o.json, s, () => convertText(s));
      } catch (e) {
        view.stop();
        fail(e, input);
      } finally {
        intr.dispose();
      }
    });

  program
    .command('extract')
    .description('write raw images of RAM blocks (absent pages as zeros, left as holes)')
    .argument('<file>', 'migration file')
    .requiredOption('--out <path>', 'directory for <block>.raw images, or the image file with --block')
    .option('--block <name>', 'only this RAM block (e.g. pc.ram)')
    .option('--force', 'overwrite existing images')
    .option('--json', 'print the summary as JSON on stdout')
    .action(async (file: string, o: { out: string; block?: string; force?: boolean; json?: boolean }) => {
      const view = new ProgressView(process.stderr.isTTY === true, 'extract');
      const intr = interruptible();
      try {
        checkInputFile(resolve(file));
        const s = await extract({
          file: resolve(file),
          out: resolve(o.out),
          ...(o.block !== undefined ? { block: o.block } : {}),
          force: o.force === true,
          signal: intr.signal,
          onProgress: (p: ExtractProgress) => view.update({ phase: p.phase, elapsedMs: p.elapsedMs, transferred: p.written, pages: p.pagesDone, totalPages: p.pagesTotal, detail: `${p.block}${storeReadDetail(p.store)}` }),
        });
        view.stop();
        print(o.json, s, () => extractText(s));
      } catch (e) {
        view.stop();
        fail(e, file);
      } finally {
        intr.dispose();
      }
    });
}
