// TLS for migration channels, with credentials laid out as QEMU's tls-creds-x509 object reads
// them from its `dir`: ca-cert.pem, and server-cert.pem + server-key.pem (listening side) or
// client-cert.pem + client-key.pem (connecting side). The same folder can serve both QEMU and us.
//
// As in QEMU, every channel (main and each multifd channel) is its own TLS session, the peer's
// certificate is checked against the CA (verify-peer, on by default: a listening side asks for a
// client certificate), and a connecting side checks the server's name: the host of the address,
// or `hostname` (QEMU's tls-hostname).

import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { checkServerIdentity, type ConnectionOptions, type PeerCertificate, type TlsOptions } from 'node:tls';

export interface TlsCreds {
  /** Folder with the PEM files, named as for QEMU's tls-creds-x509. */
  dir: string;
  /** Check the peer's certificate (default true); off, a listening side asks for none. */
  verifyPeer?: boolean;
  /** The name the server's certificate must carry (default: the host we connect to). */
  hostname?: string;
}

function readPem(dir: string, name: string, required: boolean): Buffer | undefined {
  const path = join(dir, name);
  if (!existsSync(path)) {
    if (required) throw new Error(`TLS credentials: ${path} is missing (the folder needs ca-cert.pem and the ${name.split('-')[0]} certificate and key, as for QEMU's tls-creds-x509)`);
    return undefined;
  }
  try {
    return readFileSync(path);
  } catch (e) {
    throw new Error(`TLS credentials: cannot read ${path}: ${(e as Error).message}`);
  }
}

/** Options for a listening side (tls.createServer). */
export function serverTlsOptions(c: TlsCreds): TlsOptions {
  const verify = c.verifyPeer ?? true;
  const key = readPem(c.dir, 'server-key.pem', true)!;
  const cert = readPem(c.dir, 'server-cert.pem', true)!;
  const ca = readPem(c.dir, 'ca-cert.pem', true)!;
  return { key, cert, ca, requestCert: verify, rejectUnauthorized: verify };
}

/** Options for a connecting side (tls.connect); `host` is the address's host (for the name check). */
export function clientTlsOptions(c: TlsCreds, host: string | undefined): ConnectionOptions {
  const verify = c.verifyPeer ?? true;
  const ca = readPem(c.dir, 'ca-cert.pem', true)!;
  // A client certificate is optional, as in QEMU: a server with verify-peer off asks for none.
  const cert = readPem(c.dir, 'client-cert.pem', false);
  const key = cert ? readPem(c.dir, 'client-key.pem', true) : undefined;
  const name = c.hostname ?? host;
  const isIp = name !== undefined && /^[\d.]+$|:/.test(name);
  return {
    ca,
    ...(cert && key ? { cert, key } : {}),
    rejectUnauthorized: verify,
    // SNI takes host names only; the identity check below covers IP addresses too.
    ...(name && !isIp ? { servername: name } : {}),
    checkServerIdentity: (_host: string, peer: PeerCertificate) => (name ? checkServerIdentity(name, peer) : undefined),
  };
}
