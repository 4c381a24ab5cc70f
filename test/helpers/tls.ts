/**
 * Test certificates made with openssl, laid out as QEMU's tls-creds-x509 reads them (ca-cert.pem,
 * server-cert.pem/server-key.pem, client-cert.pem/client-key.pem), with the extensions GnuTLS
 * insists on (key usage, extended key usage, basic constraints) and the server's names
 * localhost and 127.0.0.1. Keep the folder under /tmp: QEMU 11 runs in a chroot sharing only /tmp.
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const CONFIG = `
[req]
distinguished_name = dn
[dn]
[test_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[test_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[test_client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
`;

/** A CA and a server and a client certificate signed by it, in `dir` (created). */
export function makeTlsCreds(dir: string, caName = 'multifd test CA'): string {
  mkdirSync(dir, { recursive: true });
  const cnf = join(dir, 'openssl.cnf');
  writeFileSync(cnf, CONFIG);
  const ssl = (args: string[]): void => {
    execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  };
  ssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', `/CN=${caName}`, '-extensions', 'test_ca', '-config', cnf]);
  for (const who of ['server', 'client']) {
    ssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${who}-key.pem`, '-out', `${who}.csr`, '-subj', '/CN=localhost', '-config', cnf]);
    ssl(['x509', '-req', '-in', `${who}.csr`, '-CA', 'ca-cert.pem', '-CAkey', 'ca-key.pem', '-CAcreateserial', '-out', `${who}-cert.pem`, '-days', '2', '-extfile', cnf, '-extensions', `test_${who}`]);
    rmSync(join(dir, `${who}.csr`));
  }
  return dir;
}
