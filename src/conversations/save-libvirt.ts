// save into a libvirt save image (`save --domain-xml FILE`): the VM is saved as usual into a
// mapped-ram snapshot under a temporary name beside the output, which convert then rewrites as the
// image (raw for `virsh restore`, sparse for `virsh restore --parallel-channels N`), header written
// `…Part` first and `…Save` once durable; the intermediate file is removed either way. receive
// writes only bare QEMU files, so the image costs a second write of the guest's pages.

import { unlink } from 'node:fs/promises';
import { InvalidOptionError } from '../codec/errors.js';
import { QmpClient } from '../transports/qmp-client.js';
import { temporaryName } from '../engine/write-exactly.js';
import { convert, type ConvertSummary } from './convert.js';
import { checkOutputPath } from './output-file.js';
import { save, SaveHandle, type SaveOptions, type SaveProgress, type SaveSummary } from './save.js';

export interface SaveLibvirtOptions extends SaveOptions {
  /** The domain XML (`virsh dumpxml --migratable DOMAIN`) for the image's header. */
  domainXml: string;
  /** Default libvirt-sparse. */
  to?: 'libvirt' | 'libvirt-sparse';
  /** Replace an existing output. */
  force?: boolean;
}

export interface SaveLibvirtSummary extends SaveSummary {
  libvirt: { format: 'raw' | 'sparse'; 'was-running': boolean; 'image-size': number; 'convert-ms': number };
}

export function saveLibvirtImage(opts: SaveLibvirtOptions): SaveHandle {
  return new SaveHandle((h, signal) => {
    let listened!: (addr: string) => void;
    let notListening!: (e: Error) => void;
    const listening = new Promise<string>((resolve, reject) => { listened = resolve; notListening = reject; });
    const done = Promise.resolve().then(() => run(h, signal, listened));
    done.catch((e: Error) => notListening(e));
    return { done, listening };
  }, opts.signal);

  async function run(h: SaveHandle, signal: AbortSignal, listened: (addr: string) => void): Promise<SaveLibvirtSummary> {
    const to = opts.to ?? 'libvirt-sparse';
    if (!/<domain[\s>]/.test(opts.domainXml)) throw new InvalidOptionError('the domain XML has no <domain> element');
    await checkOutputPath(opts.out, opts.force ?? false);
    // virsh restore resumes the guest when it was running at save time; asked before the save,
    // which leaves it paused. The QMP socket takes one client at a time: closed again at once.
    const qmp = await QmpClient.connect(opts.qmp);
    let wasRunning: boolean;
    try {
      wasRunning = (await qmp.execute('query-status')).running === true;
    } finally {
      qmp.close();
    }
    const intermediate = `${temporaryName(opts.out)}.mig`;
    // The inner save follows this handle's signal: abort() and Ctrl-C reach it.
    const inner = save({ ...opts, out: intermediate, signal });
    inner.on('listening', (a: string) => { listened(a); h.emit('listening', a); });
    inner.on('progress', (p: SaveProgress) => h.emit('progress', p));
    inner.on('not-converging', (n) => h.emit('not-converging', n));
    inner.on('switchover-forced', (f) => h.emit('switchover-forced', f));
    try {
      const summary = await inner.done;
      const t0 = Date.now();
      const c: ConvertSummary = await convert({
        input: intermediate,
        output: opts.out,
        to,
        domainXml: opts.domainXml,
        wasRunning,
        force: opts.force ?? false,
        signal,
      });
      return { ...summary, file: opts.out, 'file-size': c['output-size'], libvirt: { format: to === 'libvirt' ? 'raw' : 'sparse', 'was-running': wasRunning, 'image-size': c['output-size'], 'convert-ms': Date.now() - t0 } };
    } finally {
      await unlink(intermediate).catch(() => {});
    }
  }
}
