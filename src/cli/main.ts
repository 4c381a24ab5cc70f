// The multifd command line: argument parsing, progress and output. Protocol work lives below.

import { Command, InvalidArgumentError, Option } from 'commander';
import { readFileSync } from 'node:fs';
import { receive, type ReceiveProgress } from '../conversations/receive.js';
import { relay, type RelayProgress } from '../conversations/relay.js';
import { restore } from '../conversations/restore.js';
import { checkBackgroundOptions, save } from '../conversations/save.js';
import { saveLibvirtImage, type SaveLibvirtSummary } from '../conversations/save-libvirt.js';
import { send, type PostcopyOptions, type SendProgress } from '../conversations/send.js';
import { parseUuid } from '../codec/multifd-init.js';
import { InvalidOptionError } from '../codec/errors.js';
import type { TlsCreds } from '../transports/tls.js';
import { runDemo } from '../demo/run-demo.js';
import { notConvergingText, relaySummaryText, sendSummaryText, summaryText } from './format.js';
import { ProgressView, receiveSample, relaySample, sendSample } from './progress.js';
import { enableVerboseLog, noteStalePartials } from './log.js';
import { registerFileCommands } from './file-commands.js';
import { getMethod } from '../engine/methods/registry.js';
import { checkInputFile, checkOutputFile } from './paths.js';
import { addObjectStoreOptions, resolve } from './object-store-options.js';
import { failureStatus, onInterrupt } from './interrupt.js';

const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };

function intArg(min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new InvalidArgumentError(`expected an integer from ${min} to ${max}`);
    return n;
  };
}

/** A byte count: 123, 64K, 512M, 2G (binary units). */
function sizeArg(v: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?$/i.exec(v.trim());
  if (!m) throw new InvalidArgumentError('expected a size like 512M or 2G');
  const mult = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Math.round(Number(m[1]) * mult);
}

/** --postcopy-after: bytes (512M) or a time (2s, 500ms). */
function budgetArg(v: string): { precopyBytes?: number; precopyMs?: number } {
  const t = /^(\d+(?:\.\d+)?)(ms|s)$/i.exec(v.trim());
  if (t) return { precopyMs: Math.round(Number(t[1]) * (t[2]!.toLowerCase() === 's' ? 1000 : 1)) };
  return { precopyBytes: sizeArg(v) };
}

/** --page-size BLOCK=SIZE, repeatable: the destination's page size of a hugepage-backed block. */
function pageSizeArg(v: string, prev: Record<string, number> | undefined): Record<string, number> {
  const eq = v.lastIndexOf('=');
  if (eq <= 0) throw new InvalidArgumentError('expected BLOCK=SIZE, e.g. pc.ram=2M');
  return { ...prev, [v.slice(0, eq)]: sizeArg(v.slice(eq + 1)) };
}

interface PostcopyArgs {
  pageSize?: Record<string, number>;
  postcopy?: boolean;
  postcopyPreempt?: boolean;
  postcopyAfter?: { precopyBytes?: number; precopyMs?: number };
  postcopyBandwidth?: number;
}

/** The library's postcopy option from the CLI flags (--postcopy-preempt and friends imply --postcopy). */
function postcopyOption(o: PostcopyArgs): PostcopyOptions | undefined {
  if (!o.postcopy && !o.postcopyPreempt && !o.postcopyAfter && o.postcopyBandwidth === undefined) {
    if (o.pageSize) throw new InvalidOptionError('--page-size is for postcopy: give --postcopy too');
    return undefined;
  }
  return {
    ...(o.pageSize ? { pageSizes: o.pageSize } : {}),
    ...(o.postcopyPreempt ? { preempt: true } : {}),
    ...(o.postcopyAfter ?? {}),
    ...(o.postcopyBandwidth !== undefined ? { bandwidth: o.postcopyBandwidth } : {}),
  };
}

function addPostcopyOptions(c: Command): Command {
  return c
    .option('--postcopy', 'instant restore: the guest starts right after the device state, its pages follow on demand (the destination needs postcopy-ram; if it dies in postcopy, the guest it was running is lost)')
    .option('--postcopy-preempt', 'with --postcopy: answer page requests on a second connection (postcopy-preempt)')
    .option('--postcopy-after <amount>', 'with --postcopy: send this much (512M, 2G) or for this long (2s, 500ms) before the switch (default: switch at once)', budgetArg)
    .option('--postcopy-bandwidth <bytes>', 'with --postcopy: bytes/s for the pages pushed in the background after the switch (512M); requested pages are never held back', sizeArg)
    .option('--page-size <block=size>', "with --postcopy: the destination's page size of a RAM block whose pages are not 4K (pc.ram=2M for hugetlbfs-backed memory; repeatable). restore learns it over QMP and checks this against it", pageSizeArg);
}

function uuidArg(v: string): Buffer {
  try {
    return parseUuid(v);
  } catch {
    throw new InvalidArgumentError('expected a uuid like 11111111-2222-3333-4444-555555555555');
  }
}

/** Shows progress while `done` runs, then prints the summary (text or JSON); exits 1 on error. */
async function report<S>(label: string, json: boolean | undefined, start: (view: ProgressView) => Promise<S>, text: (s: S) => string): Promise<void> {
  const view = new ProgressView(process.stderr.isTTY === true, label);
  try {
    const s = await start(view);
    view.stop();
    process.stdout.write(json ? JSON.stringify(s, null, 2) + '\n' : text(s) + '\n');
  } catch (e) {
    view.stop();
    fail(e);
  }
}

/**
 * Every command's Ctrl-C or SIGTERM: the conversation is aborted instead of the process killed, so
 * it cleans up — its connections closed, a temporary snapshot removed, a source told (SHUT 1), a
 * migration it drives over QMP cancelled (save), the settings it changed put back. If it then
 * fails, the exit status is 130 or 143 (cli/interrupt.ts); a job that was past its point of no
 * return and completed exits 0, with a note.
 */
function abortOnSignal(h: { abort(reason: unknown): void }): void {
  onInterrupt((sig) => h.abort(new Error(`interrupted (${sig})`)));
}

/**
 * MULTIFD_READ_RING=0 reads multifd sockets as plain streams (the library's readRing option):
 * for comparing against the ring reader, or a Node where it misbehaves.
 */
function readRingOption(): { readRing?: boolean } {
  return process.env.MULTIFD_READ_RING === '0' ? { readRing: false } : {};
}

/** A stray connection (not a migration channel) was closed; the migration goes on. */
function warnStrays(h: { on(ev: 'stray', fn: (e: Error) => void): unknown }): void {
  h.on('stray', (e: Error) => process.stderr.write(`multifd: warning: ignored ${e.message}\n`));
}

interface TlsArgs {
  tlsCreds?: string;
  tlsHostname?: string;
  tlsVerifyPeer: boolean;
}

/** --tls-creds DIR [--tls-hostname NAME] [--no-tls-verify-peer] as the library's TlsCreds. */
function tlsCreds(o: TlsArgs, hostname = o.tlsHostname): TlsCreds | undefined {
  if (!o.tlsCreds) return undefined;
  return { dir: resolve(o.tlsCreds), verifyPeer: o.tlsVerifyPeer, ...(hostname ? { hostname } : {}) };
}

const TLS_HELP = `
TLS (--tls-creds DIR): the folder holds PEM files named as for QEMU's tls-creds-x509 object:
  ca-cert.pem, server-cert.pem + server-key.pem (listening side), client-cert.pem +
  client-key.pem (connecting side). On QEMU: -object tls-creds-x509,id=tls0,dir=DIR,endpoint=...
  and migrate-set-parameters tls-creds=tls0. Plain connections are refused while TLS is on.`;

/**
 * With --json a summary's notes would sit only in stdout's JSON: they go to stderr too, as lines
 * a user reading the terminal sees (the text summary prints them itself).
 */
function notesOnStderr<S extends { notes?: readonly string[] }>(json: boolean | undefined, view: ProgressView, done: Promise<S>): Promise<S> {
  if (!json) return done;
  return done.then((s) => {
    if (s.notes?.length) {
      view.stop();
      for (const n of s.notes) process.stderr.write(`multifd: note: ${n}\n`);
    }
    return s;
  });
}

function fail(e: unknown): never {
  const err = e as Error & { code?: string; offset?: number };
  const where = err.offset !== undefined ? ` (at byte ${err.offset})` : '';
  process.stderr.write(`multifd: error: ${err.message}${where}\n`);
  process.exit(failureStatus());
}

const program = new Command();
program
  .name('multifd')
  .description('QEMU multifd live migration in TypeScript: save a running VM to a mapped-ram snapshot, restore snapshots into QEMU, with zlib/zstd.')
  .version(pkg.version)
  .option('-v, --verbose', 'log protocol events to stderr')
  .hook('preAction', (cmd, action) => {
    if (cmd.opts().verbose) enableVerboseLog();
    noteStalePartials();
    // zstd may have no implementation on this Node (20 without zstd-napi): say so before anything starts.
    const o = action.opts();
    if ([o.compression, o.compressionIn, o.compressionOut].includes('zstd')) {
      try {
        getMethod('zstd');
      } catch (e) {
        fail(e);
      }
    }
  });
addObjectStoreOptions(program);

program
  .command('receive')
  .description('accept a live migration from QEMU (main + N multifd channels) and write a mapped-ram snapshot')
  .requiredOption('--listen <addr>', 'where to listen: tcp:HOST:PORT or unix:PATH')
  .requiredOption('--out <file>', 'snapshot file (written as a temporary file, renamed when complete)')
  .addOption(new Option('--channels <n>', "the source's multifd-channels; 0 if the source has multifd off").default(2).argParser(intArg(0, 255)))
  .addOption(new Option('--sync-mode <mode>', 'how MULTIFD_FLUSH/EOS map to syncs (auto infers it from the stream)').choices(['auto', 'round', 'section']).default('auto'))
  .option('--uuid <uuid>', "require this uuid in the multifd channels and, with validate-uuid, the configuration (the source's -uuid)", uuidArg)
  .addOption(new Option('--compression <method>', "the source's multifd-compression (auto: detect it from the first data packet)").choices(['auto', 'none', 'zlib', 'zstd']).default('auto'))
  .option('--no-direct-io', 'write pages through the page cache (default: O_DIRECT where the file system allows it)')
  .addOption(new Option('--idle-timeout <s>', 'fail when the source sends nothing for this long mid-migration (0: never)').default(300).argParser(intArg(0, 86400)))
  .option('--tls-creds <dir>', 'accept TLS only, with server-cert.pem, server-key.pem and ca-cert.pem from DIR')
  .option('--no-tls-verify-peer', "with TLS: do not ask for the source's client certificate")
  .option('--switchover-ack', 'the source has switchover-ack on: answer it as a QEMU destination with no device that holds the switchover back')
  .option('--json', 'print the final summary as JSON on stdout')
  .addHelpText('after', `
On the QEMU side:
  migrate-set-capabilities multifd=on return-path=on; migrate-set-parameters multifd-channels=N
  (and raise max-bandwidth, 128 MiB/s by default); migrate uri=tcp:HOST:PORT
The snapshot loads with: migrate-set-capabilities mapped-ram=on [multifd=on];
  migrate-incoming uri=file:FILE`)
  .addHelpText('after', TLS_HELP)
  .action(async (o: { listen: string; out: string; channels: number; syncMode: 'auto' | 'round' | 'section'; uuid?: Buffer; compression: string; directIo: boolean; idleTimeout: number; json?: boolean; switchoverAck?: boolean } & TlsArgs) => {
    await report('receive', o.json, async (view) => {
      checkOutputFile(resolve(o.out), '--out');
      const tls = tlsCreds(o);
      const h = receive({ ...readRingOption(), listen: o.listen, out: resolve(o.out), channels: o.channels, syncMode: o.syncMode, compression: o.compression, directIo: o.directIo, idleTimeoutMs: o.idleTimeout * 1000, ...(o.uuid ? { uuid: o.uuid } : {}), ...(tls ? { tls } : {}), ...(o.switchoverAck ? { switchoverAck: true } : {}) });
      h.on('progress', (p: ReceiveProgress) => view.update(receiveSample(p)));
      abortOnSignal(h);
      warnStrays(h);
      const addr = await h.listening;
      // Always (stderr, also with --json): scripts wait for this line before starting the source.
      process.stderr.write(`listening on ${addr} for ${o.channels} multifd channel(s)${o.tlsCreds ? ' (TLS)' : ''}\n`);
      return notesOnStderr(o.json, view, h.done);
    }, summaryText);
  });

program
  .command('save')
  .description("save a running VM: drive its QMP socket to migrate into a mapped-ram snapshot")
  .requiredOption('--qmp <addr>', "the VM's QMP socket: unix:PATH or tcp:HOST:PORT")
  .requiredOption('--out <file>', 'snapshot file')
  .addOption(new Option('--channels <n>', 'multifd channels (0: no multifd)').default(2).argParser(intArg(0, 255)))
  .option('--listen <addr>', 'where to receive (default tcp:127.0.0.1:0, a free port)')
  .addOption(new Option('--max-bandwidth <bytes/s>', "source bandwidth limit (QEMU's default is 128 MiB/s)").default(100 * 1024 ** 3).argParser(intArg(1, Number.MAX_SAFE_INTEGER)))
  .option('--downtime-limit <ms>', 'downtime QEMU may plan for at switchover', intArg(1, 2_000_000))
  .option('--resume', 'let the VM run on after saving (QEMU pauses it when migration completes)')
  .option('--domain-xml <file>', 'write a libvirt save image for `virsh restore`, with this domain XML (virsh dumpxml --migratable DOMAIN)')
  .addOption(new Option('--to <format>', 'with --domain-xml: libvirt (classic) or libvirt-sparse (parallel, the default)').choices(['libvirt', 'libvirt-sparse']))
  .option('--force', 'replace the snapshot file if it exists (default: refuse, before the VM is touched)')
  .addOption(new Option('--compression <method>', 'multifd-compression on the wire (the snapshot holds plain pages)').choices(['none', 'zlib', 'zstd']).default('none'))
  .option('--level <n>', 'compression level (multifd-zlib-level 0-9, multifd-zstd-level 0-20)', intArg(0, 20))
  .option('--no-direct-io', 'write pages through the page cache (default: O_DIRECT where the file system allows it)')
  .option('--tls-creds <dir>', "TLS: DIR holds ca-cert.pem, server-cert/-key.pem (ours) and client-cert/-key.pem (the VM's); added to the VM as a tls-creds-x509 object for the migration")
  .option('--tls-hostname <name>', 'the name QEMU checks our certificate against (default: the listening host)')
  .option('--no-tls-verify-peer', 'with TLS: neither side checks the other\'s certificate')
  .addOption(new Option('--idle-timeout <s>', 'fail when the source sends nothing for this long mid-migration (0: never); the source is told and runs on').default(300).argParser(intArg(0, 86400)))
  .option('--background', "QEMU's background-snapshot: the snapshot of the moment the save starts, the guest running throughout and after it (main channel only)")
  .option('--auto-converge', "turn on QEMU's auto-converge for the save: it slows the guest's vCPUs while they dirty memory faster than the link carries it")
  .option('--switchover-after <s>', 'after this many seconds of iterating, make the source switch over now (its downtime limit raised to the maximum for the rest of the save): a save that ends, with a longer pause', intArg(1, 86400))
  .option('--json', 'print the final summary as JSON on stdout')
  .addHelpText('after', `
A save that does not converge (the guest dirties memory faster than the link carries it, or a
compressed migration, whose bandwidth QEMU counts in compressed bytes) iterates until stopped.
save warns once when QEMU still expects more downtime than its limit after a few rounds; then
raise --downtime-limit, add --auto-converge, or bound it with --switchover-after.`)
  .action(async (o: { qmp: string; out: string; channels: number; listen?: string; maxBandwidth: number; downtimeLimit?: number; resume?: boolean; domainXml?: string; to?: 'libvirt' | 'libvirt-sparse'; force?: boolean; compression: string; level?: number; directIo: boolean; idleTimeout: number; json?: boolean; background?: boolean; autoConverge?: boolean; switchoverAfter?: number } & TlsArgs, cmd: Command) => {
    if (o.to && o.domainXml === undefined) program.error('error: --to needs --domain-xml (the domain XML goes into the libvirt image)');
    await report('save', o.json, (view) => {
      checkOutputFile(resolve(o.out), '--out', { refuseExisting: !o.force });
      const domainXml = o.domainXml !== undefined ? (checkInputFile(resolve(o.domainXml)), readFileSync(resolve(o.domainXml), 'utf8')) : undefined;
      const tls = tlsCreds(o);
      // --background: --channels defaults to 0; given explicitly (or compression) it is an error.
      const explicit = (name: string) => cmd.getOptionValueSource(name) === 'cli';
      const converge = { ...(o.autoConverge ? { autoConverge: true } : {}), ...(o.switchoverAfter !== undefined ? { switchoverAfterMs: o.switchoverAfter * 1000 } : {}) };
      if (o.background) checkBackgroundOptions({ background: true, ...(explicit('channels') ? { channels: o.channels } : {}), compression: o.compression, ...(o.level !== undefined ? { level: o.level } : {}), ...converge });
      const saveOpts = {
        ...readRingOption(),
        ...(tls ? { tls } : {}),
        qmp: o.qmp,
        out: resolve(o.out),
        channels: o.background ? 0 : o.channels,
        ...(o.background ? { background: true } : {}),
        maxBandwidth: o.maxBandwidth,
        ...(o.listen ? { listen: o.listen } : {}),
        ...(o.downtimeLimit !== undefined ? { downtimeLimitMs: o.downtimeLimit } : {}),
        ...(o.resume ? { resume: true } : {}),
        compression: o.compression,
        directIo: o.directIo,
        idleTimeoutMs: o.idleTimeout * 1000,
        ...(o.level !== undefined ? { level: o.level } : {}),
        ...converge,
      };
      const h = domainXml !== undefined ? saveLibvirtImage({ ...saveOpts, domainXml, ...(o.to ? { to: o.to } : {}) }) : save(saveOpts);
      h.on('progress', (p: ReceiveProgress) => view.update(receiveSample(p)));
      h.on('not-converging', (n) => view.say(`multifd: warning: ${notConvergingText(n, o.compression)}${o.switchoverAfter !== undefined ? `; the switchover is forced after ${o.switchoverAfter} s` : '; raise --downtime-limit, add --auto-converge, or bound the save with --switchover-after SECONDS'}`));
      h.on('switchover-forced', (f) => view.say(`multifd: note: forcing the switchover after ${(f['after-ms'] / 1000).toFixed(1)} s of iterating (--switchover-after): the guest pauses for what is still dirty`));
      abortOnSignal(h);
      return notesOnStderr(o.json, view, h.done);
    }, (s) => {
      const l = (s as Partial<SaveLibvirtSummary>).libvirt;
      return summaryText(s) + (l ? `\n  libvirt ${l.format} image (${l['was-running'] ? 'restores running' : 'restores paused'}), ${l['convert-ms'] !== undefined ? `rewritten from the snapshot in ${l['convert-ms']} ms` : 'written in place'}` : '');
    });
  });

addPostcopyOptions(
program
  .command('send')
  .description('stream a snapshot (mapped-ram or QEMU stream file) into a QEMU waiting with -incoming')
  .argument('<file>', 'snapshot file')
  .requiredOption('--to <addr>', "the destination's migrate-incoming address: tcp:HOST:PORT or unix:PATH")
  .addOption(new Option('--channels <n>', "the destination's multifd-channels; 0 if it has multifd off").default(2).argParser(intArg(0, 255)))
  .addOption(new Option('--sync-mode <mode>', "the destination's multifd sync mode (auto: from the machine type; section for machine types up to 8.0)").choices(['auto', 'round', 'section']).default('auto'))
  .addOption(new Option('--zero-page-detection <mode>', 'multifd: list all-zero pages instead of sending them; none: send them as data').choices(['multifd', 'none']).default('multifd'))
  .option('--uuid <uuid>', "the destination's -uuid (multifd channels must carry it)", uuidArg)
  .option('--no-return-path', 'do not open the return path (then success cannot be confirmed without QMP)')
  .addOption(new Option('--compression <method>', "multifd-compression (must equal the destination's)").choices(['none', 'zlib', 'zstd']).default('none'))
  .option('--level <n>', 'compression level (zlib 0-9, zstd 0-20; default 1, as QEMU)', intArg(0, 20))
  .option('--tls-creds <dir>', 'TLS on every channel, with ca-cert.pem (and client-cert.pem, client-key.pem) from DIR')
  .option('--tls-hostname <name>', "the name the destination's certificate must carry (default: the host of --to)")
  .option('--no-tls-verify-peer', "with TLS: do not check the destination's certificate")
  .option('--json', 'print the final summary as JSON on stdout')
  .addHelpText('after', TLS_HELP)
  .addHelpText('after', `
On the QEMU side (before running send):
  qemu-system-x86_64 ... -incoming defer
  migrate-set-capabilities multifd=on return-path=on; migrate-set-parameters multifd-channels=N
  migrate-incoming uri=tcp:HOST:PORT
Or let restore do all of it over QMP.`)
  )
  .action(async (file: string, o: { to: string; channels: number; syncMode: 'auto' | 'round' | 'section'; zeroPageDetection: 'multifd' | 'none'; uuid?: Buffer; returnPath: boolean; compression: string; level?: number; json?: boolean } & TlsArgs & PostcopyArgs) => {
    await report('send', o.json, (view) => {
      checkInputFile(resolve(file));
      const tls = tlsCreds(o);
      const postcopy = postcopyOption(o);
      const h = send({
        ...(postcopy ? { postcopy } : {}),
        ...(tls ? { tls } : {}),
        file: resolve(file),
        to: o.to,
        channels: o.channels,
        syncMode: o.syncMode,
        zeroPageDetection: o.zeroPageDetection,
        returnPath: o.returnPath,
        compression: o.compression,
        ...(o.level !== undefined ? { level: o.level } : {}),
        ...(o.uuid ? { uuid: o.uuid } : {}),
      });
      h.on('progress', (p: SendProgress) => view.update(sendSample(p)));
      abortOnSignal(h);
      return h.done;
    }, sendSummaryText);
  });

addPostcopyOptions(
program
  .command('restore')
  .description('load a snapshot into a QEMU started with -incoming defer: set it up over QMP, send, wait for completed')
  .argument('<file>', 'snapshot file (mapped-ram or QEMU stream file)')
  .requiredOption('--qmp <addr>', "the destination's QMP socket: unix:PATH or tcp:HOST:PORT")
  .addOption(new Option('--channels <n>', 'multifd channels (0: no multifd)').default(2).argParser(intArg(0, 255)))
  .option('--incoming <addr>', 'where the destination listens (default: a unix socket in the temp dir; tcp:127.0.0.1:0 with a tcp QMP)')
  .option('--resume', 'run the guest once loaded (QEMU keeps it paused if it was paused when saved, or with -S; a libvirt image resumes if it was running)')
  .option('--no-resume', 'leave the guest paused, even from a libvirt image saved running')
  .option('--uuid <uuid>', "the destination's -uuid", uuidArg)
  .addOption(new Option('--sync-mode <mode>', "the destination's multifd sync mode").choices(['auto', 'round', 'section']).default('auto'))
  .addOption(new Option('--compression <method>', 'multifd-compression on the wire (set on the destination too)').choices(['none', 'zlib', 'zstd']).default('none'))
  .option('--level <n>', 'compression level (zlib 0-9, zstd 0-20; default 1, as QEMU)', intArg(0, 20))
  .option('--tls-creds <dir>', "TLS: DIR holds ca-cert.pem, server-cert/-key.pem (the destination's) and client-cert/-key.pem (ours); added to the destination as a tls-creds-x509 object")
  .option('--tls-hostname <name>', "the name the destination's certificate must carry (default: the host of --incoming)")
  .option('--no-tls-verify-peer', 'with TLS: neither side checks the other\'s certificate')
  .option('--json', 'print the final summary as JSON on stdout')
  )
  .action(async (file: string, o: { qmp: string; channels: number; incoming?: string; resume?: boolean; uuid?: Buffer; syncMode: 'auto' | 'round' | 'section'; compression: string; level?: number; json?: boolean } & TlsArgs & PostcopyArgs) => {
    await report('restore', o.json, (view) => {
      checkInputFile(resolve(file));
      const tls = tlsCreds(o);
      const postcopy = postcopyOption(o);
      const h = restore({
        ...(postcopy ? { postcopy } : {}),
        ...(tls ? { tls } : {}),
        file: resolve(file),
        qmp: o.qmp,
        channels: o.channels,
        syncMode: o.syncMode,
        compression: o.compression,
        ...(o.level !== undefined ? { level: o.level } : {}),
        ...(o.incoming ? { incoming: o.incoming } : {}),
        ...(o.resume !== undefined ? { resume: o.resume } : {}),
        ...(o.uuid ? { uuid: o.uuid } : {}),
      });
      h.on('progress', (p: SendProgress) => view.update(sendSample(p)));
      abortOnSignal(h);
      // Its notes: e.g. multifd turned off for postcopy.
      return notesOnStderr(o.json, view, h.done);
    }, sendSummaryText);
  });

program
  .command('relay')
  .description('relay a live migration from QEMU A to QEMU B: multifd decoded on the way in and re-encoded on the way out, each side with its own channels and compression (compressed packets pass as they are when both sides match)')
  .requiredOption('--listen <addr>', 'where A migrates to: tcp:HOST:PORT or unix:PATH')
  .requiredOption('--to <addr>', "B's migrate-incoming address: tcp:HOST:PORT or unix:PATH")
  .addOption(new Option('--channels-in <n>', "A's multifd-channels; 0 if A has multifd off (B may have multifd: A's pages then go to B as packets)").default(2).argParser(intArg(0, 255)))
  .addOption(new Option('--channels-out <n>', "B's multifd-channels (default: --channels-in)").argParser(intArg(0, 255)))
  .addOption(new Option('--compression-in <method>', "A's multifd-compression (auto: detect it from the first data packet)").choices(['auto', 'none', 'zlib', 'zstd']).default('auto'))
  .addOption(new Option('--compression-out <method>', "B's multifd-compression").choices(['none', 'zlib', 'zstd']).default('none'))
  .option('--level-out <n>', 'compression level towards B (zlib 0-9, zstd 0-20; default 1, as QEMU); re-encodes every packet', intArg(0, 20))
  .option('--recompress', 'decode and re-encode compressed packets even when A and B use the same method and channel count (default: passed on as they came)')
  .addOption(new Option('--sync-mode <mode>', "how A's MULTIFD_FLUSH/EOS map to syncs (auto infers it from A's stream); B must use the same").choices(['auto', 'round', 'section']).default('auto'))
  .option('--uuid <uuid>', "A's -uuid: A's channels must carry it (B's carry it too); default: whatever A sends", uuidArg)
  .option('--tee <file>', 'also keep a mapped-ram snapshot of the migrated state (finalised only once B confirmed the load); s3://BUCKET/KEY: staged locally, uploaded once B confirmed')
  .addOption(new Option('--xbzrle-cache <MiB>', "--channels-in 0 with B on multifd, no --tee: memory for copies of re-sent pages, to decode A's XBZRLE deltas; older copies go to a temporary file (--temp-dir); 0: none, A has xbzrle off").default(256).argParser(intArg(0, 1048576)))
  .option('--temp-dir <dir>', 'where --xbzrle-cache spills page copies (a file unlinked at once, up to guest RAM; default: MULTIFD_TMPDIR, TMPDIR, /tmp)')
  .option('--no-direct-io', 'write the tee through the page cache (default: O_DIRECT where the file system allows it)')
  .addOption(new Option('--idle-timeout <s>', 'fail when A sends nothing for this long mid-migration (0: never)').default(300).argParser(intArg(0, 86400)))
  .option('--tls-creds-in <dir>', "TLS from A: server-cert.pem, server-key.pem, ca-cert.pem from DIR (A's tls-creds endpoint=client)")
  .option('--tls-creds-out <dir>', "TLS to B: ca-cert.pem, client-cert.pem, client-key.pem from DIR (B's tls-creds endpoint=server)")
  .option('--tls-hostname-out <name>', "the name B's certificate must carry (default: the host of --to)")
  .option('--no-tls-verify-peer', 'with TLS: do not check the peers\' certificates')
  .option('--json', 'print the final summary as JSON on stdout')
  .addHelpText('after', `
Start B first (qemu ... -incoming defer; multifd=on, multifd-channels=OUT,
  multifd-compression=METHOD; migrate-incoming uri=tcp:B:PORT), then the relay, then on A:
  migrate-set-capabilities multifd=on [return-path=on]; multifd-channels=IN;
  migrate uri=tcp:RELAY:PORT
With return-path on A, A completes only once B loaded the state; a failure on B's side fails
A's migration and A keeps running.`)
  .action(async (o: { listen: string; to: string; channelsIn: number; channelsOut?: number; compressionIn: string; compressionOut: string; levelOut?: number; recompress?: boolean; syncMode: 'auto' | 'round' | 'section'; uuid?: Buffer; tee?: string; xbzrleCache: number; tempDir?: string; directIo: boolean; json?: boolean; tlsCredsIn?: string; tlsCredsOut?: string; tlsHostnameOut?: string; tlsVerifyPeer: boolean; idleTimeout: number }) => {
    await report('relay', o.json, async (view) => {
      if (o.tee) checkOutputFile(resolve(o.tee), '--tee');
      const tlsIn = tlsCreds({ tlsCreds: o.tlsCredsIn, tlsVerifyPeer: o.tlsVerifyPeer });
      const tlsOut = tlsCreds({ tlsCreds: o.tlsCredsOut, tlsVerifyPeer: o.tlsVerifyPeer }, o.tlsHostnameOut);
      const h = relay({
        ...readRingOption(),
        idleTimeoutMs: o.idleTimeout * 1000,
        ...(tlsIn ? { tlsIn } : {}),
        ...(tlsOut ? { tlsOut } : {}),
        listen: o.listen,
        to: o.to,
        channelsIn: o.channelsIn,
        ...(o.channelsOut !== undefined ? { channelsOut: o.channelsOut } : {}),
        compressionIn: o.compressionIn,
        compressionOut: o.compressionOut,
        ...(o.levelOut !== undefined ? { levelOut: o.levelOut } : {}),
        ...(o.recompress ? { recompress: true } : {}),
        syncMode: o.syncMode,
        ...(o.uuid ? { uuid: o.uuid } : {}),
        ...(o.tee ? { tee: resolve(o.tee), teeDirectIo: o.directIo } : {}),
        xbzrleCacheBytes: o.xbzrleCache * 1024 * 1024,
        ...(o.tempDir ? { tempDir: resolve(o.tempDir) } : {}),
      });
      h.on('progress', (p: RelayProgress) => view.update(relaySample(p)));
      abortOnSignal(h);
      warnStrays(h);
      const addr = await h.listening;
      // Always (stderr, also with --json): scripts wait for this line before starting A's migrate.
      process.stderr.write(`listening on ${addr} for ${o.channelsIn} multifd channel(s), relaying to ${o.to}\n`);
      return notesOnStderr(o.json, view, h.done);
    }, relaySummaryText);
  });

program
  .command('demo')
  .description('save a running guest of our own with receive, restore it into QEMU with our sender and verify it (synthetic source and a second receiver without QEMU)')
  .option('--qemu <path>', 'QEMU binary (default qemu-system-x86_64, and the synthetic demo when that is not installed; a binary named here must run)')
  .addOption(new Option('--channels <n>', 'multifd channels').default(2).argParser(intArg(1, 255)))
  .option('--keep', 'keep the snapshot and work directory under /tmp')
  .option('--json', 'print the result as JSON on stdout')
  .action(async (o: { qemu?: string; channels: number; keep?: boolean; json?: boolean }) => {
    const view = new ProgressView(process.stderr.isTTY === true, 'demo');
    try {
      const r = await runDemo({
        ...(o.qemu !== undefined ? { qemu: o.qemu } : {}),
        channels: o.channels,
        ...(o.keep ? { keep: true } : {}),
        log: (l) => { view.stop(); process.stderr.write(l + '\n'); },
        onProgress: (p) => view.update('pagesTotal' in p ? sendSample(p) : receiveSample(p)),
      });
      view.stop();
      if (o.json) process.stdout.write(JSON.stringify(r, null, 2) + '\n');
      else {
        for (const c of r.checks) process.stdout.write(`${c.ok ? 'ok  ' : 'FAIL'} ${c.name} (${c.detail})\n`);
        process.stdout.write(r.ok ? `demo passed (${r.mode})${o.keep ? `; snapshot kept at ${r.snapshot}` : ''}\n` : 'demo FAILED\n');
      }
      process.exit(r.ok ? 0 : 1);
    } catch (e) {
      view.stop();
      fail(e);
    }
  });

registerFileCommands(program);

program.showHelpAfterError();
await program.parseAsync(process.argv);
