// save into a libvirt save image (`save --domain-xml FILE`), header written `…Part` first and
// `…Save` once durable. Sparse (for `virsh restore --parallel-channels N`, the default): receive
// writes the header and then the mapped-ram snapshot in place. Raw (`virsh restore`): the VM is
// saved as usual into a mapped-ram snapshot under a temporary name beside the output, which
// convert rewrites as the image, a second write of the guest's pages; the intermediate file is
// removed either way.

import { unlink } from 'node:fs/promises';
import { InvalidOptionError } from '../codec/errors.js';
import { encodeLibvirtImage } from '../codec/libvirt-image.js';
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
  /** `convert-ms`: a raw image's rewrite from the saved snapshot; a sparse one is written in place. */
  libvirt: { format: 'raw' | 'sparse'; 'was-running': boolean; 'image-size': number; 'convert-ms'?: number };
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
    // A sparse image is QEMU's mapped-ram file after the header: receive writes it in place, each
    // page once. A raw image holds QEMU's stream format, which a live save cannot write in place
    // (pages are re-sent, the stream would keep every version): saved as usual beside it, then
    // rewritten by convert.
    const direct = to === 'libvirt-sparse';
    const intermediate = direct ? opts.out : `${temporaryName(opts.out)}.mig`;
    const prologue = direct ? encodeLibvirtImage({ domainXml: opts.domainXml, wasRunning, format: 'sparse' }) : undefined;
    // The inner save follows this handle's signal: abort() and Ctrl-C reach it.
    const inner = save({ ...opts, out: intermediate, signal, ...(prologue ? { libvirtPrologue: prologue } : {}) });
    inner.on('listening', (a: string) => { listened(a); h.emit('listening', a); });
    inner.on('progress', (p: SaveProgress) => h.emit('progress', p));
    inner.on('not-converging', (n) => h.emit('not-converging', n));
    inner.on('switchover-forced', (f) => h.emit('switchover-forced', f));
    if (direct) {
      const summary = await inner.done;
      return { ...summary, libvirt: { format: 'sparse', 'was-running': wasRunning, 'image-size': summary['file-size'] } };
    }
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
      return { ...summary, file: opts.out, 'file-size': c['output-size'], libvirt: { format: 'raw', 'was-running': wasRunning, 'image-size': c['output-size'], 'convert-ms': Date.now() - t0 } };
    } finally {
      await unlink(intermediate).catch(() => {});
    }
  }
}
