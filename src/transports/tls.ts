// TLS for migration channels, with credentials laid out as QEMU's tls-creds-x509 object reads
// them from its `dir`: ca-cert.pem, and server-cert.pem + server-key.pem (listening side) or
// client-cert.pem + client-key.pem (connecting side). The same folder can serve both QEMU and us.
// A folder with keys.psk instead (QEMU's tls-creds-psk) means pre-shared keys.
//
// As in QEMU, every channel (main and each multifd channel) is its own TLS session, the peer's
// certificate is checked against the CA (verify-peer, on by default: a listening side asks for a
// client certificate), and a connecting side checks the server's name: the host of the address,
// or `hostname` (QEMU's tls-hostname).

import { InvalidOptionError } from '../codec/errors.js';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { DEFAULT_CIPHERS, checkServerIdentity, type ConnectionOptions, type PeerCertificate, type TlsOptions } from 'node:tls';

export interface TlsCreds {
  /**
   * Folder with the PEM files, named as for QEMU's tls-creds-x509; or, for pre-shared keys
   * (QEMU's tls-creds-psk), a keys.psk file of `username:hexkey` lines.
   */
  dir: string;
  /** With keys.psk: the identity a connecting side presents (default "qemu", as QEMU's). */
  pskUsername?: string;
  /** Check the peer's certificate (default true); off, a listening side asks for none. */
  verifyPeer?: boolean;
  /** The name the server's certificate must carry (default: the host we connect to). */
  hostname?: string;
}

function readPem(dir: string, name: string, required: boolean): Buffer | undefined {
  const path = join(dir, name);
  if (!existsSync(path)) {
    if (required) throw new InvalidOptionError(`TLS credentials: ${path} is missing (the folder needs ca-cert.pem and the ${name.split('-')[0]} certificate and key, as for QEMU's tls-creds-x509)`);
    return undefined;
  }
  try {
    return readFileSync(path);
  } catch (e) {
    throw new InvalidOptionError(`TLS credentials: cannot read ${path}: ${(e as Error).message}`);
  }
}

/** x509 unless the folder holds keys.psk and no ca-cert.pem (QEMU's tls-creds-psk layout). */
export function tlsKind(c: TlsCreds): 'x509' | 'psk' {
  return existsSync(join(c.dir, 'keys.psk')) && !existsSync(join(c.dir, 'ca-cert.pem')) ? 'psk' : 'x509';
}

function readPskKeys(dir: string): Map<string, Buffer> {
  const path = join(dir, 'keys.psk');
  const keys = new Map<string, Buffer>();
  for (const [n, line] of readPem(dir, 'keys.psk', true)!.toString('utf8').split('\n').entries()) {
    const t = line.trim();
    if (t === '') continue;
    const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(t);
    if (!m || m[2]!.length % 2 !== 0) throw new InvalidOptionError(`TLS credentials: ${path} line ${n + 1} is not username:hexkey`);
    keys.set(m[1]!, Buffer.from(m[2]!, 'hex'));
  }
  if (keys.size === 0) throw new InvalidOptionError(`TLS credentials: ${path} holds no key`);
  return keys;
}

/** TLS 1.2 peers need PSK cipher suites named; TLS 1.3 uses its usual ones with a PSK. */
const PSK_CIPHERS = `PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305:${DEFAULT_CIPHERS}`;

/** Options for a listening side (tls.createServer). */
export function serverTlsOptions(c: TlsCreds): TlsOptions {
  if (tlsKind(c) === 'psk') {
    const keys = readPskKeys(c.dir);
    return { ciphers: PSK_CIPHERS, pskCallback: (_sock, identity) => keys.get(identity) ?? null };
  }
  const verify = c.verifyPeer ?? true;
  const key = readPem(c.dir, 'server-key.pem', true)!;
  const cert = readPem(c.dir, 'server-cert.pem', true)!;
  const ca = readPem(c.dir, 'ca-cert.pem', true)!;
  return { key, cert, ca, requestCert: verify, rejectUnauthorized: verify };
}

/** Options for a connecting side (tls.connect); `host` is the address's host (for the name check). */
export function clientTlsOptions(c: TlsCreds, host: string | undefined): ConnectionOptions {
  if (tlsKind(c) === 'psk') {
    const user = c.pskUsername ?? 'qemu';
    const psk = readPskKeys(c.dir).get(user);
    if (!psk) throw new InvalidOptionError(`TLS credentials: ${join(c.dir, 'keys.psk')} has no key for "${user}"`);
    // No certificate to check: the shared key is the authentication.
    return { ciphers: PSK_CIPHERS, pskCallback: () => ({ identity: user, psk }), checkServerIdentity: () => undefined };
  }
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
