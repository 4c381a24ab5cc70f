// How a libvirt save image's header shows in inspect/verify results (JSON keys in the house style).

import type { LibvirtImage } from '../codec/libvirt-image.js';

export interface LibvirtSummary {
  format: string;
  version: number;
  'was-running': boolean;
  'data-len': number;
  /** Where QEMU's stream (or its compressed form) starts: 92 + data-len. */
  'qemu-offset': number;
  'cookie-offset': number;
  'byte-swapped'?: boolean;
  'domain-xml'?: string;
  cookie?: string;
}

export function libvirtSummary(image: LibvirtImage, withXml = false): LibvirtSummary {
  const s: LibvirtSummary = {
    format: image.format,
    version: image.version,
    'was-running': image.wasRunning,
    'data-len': image.dataLen,
    'qemu-offset': image.qemuOffset,
    'cookie-offset': image.cookieOffset,
  };
  if (image.byteSwapped) s['byte-swapped'] = true;
  if (withXml) {
    s['domain-xml'] = image.domainXml;
    if (image.cookie !== undefined) s.cookie = image.cookie;
  }
  return s;
}
