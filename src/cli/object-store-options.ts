// The --s3-* options every command takes (snapshots named s3://bucket/key; docs/s3.md), and path
// resolution that leaves such URLs alone.

import { InvalidArgumentError, Option, type Command } from 'commander';
import { resolve as resolvePath } from 'node:path';
import { configureObjectStore, isObjectUrl } from '../conversations/object-store.js';
import { closeS3Clients } from '../transports/s3.js';

/** A local path made absolute; an s3:// URL as it is. */
export function resolve(p: string): string {
  return isObjectUrl(p) ? p : resolvePath(p);
}

const MiB = 1024 * 1024;

// The SDK warns on Node 20 that releases after January 2027 need Node 22; package.json pins a
// release range that runs on Node 20, so the warning tells a CLI user nothing they can act on.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

function positive(max: number): (v: string) => number {
  return (v) => {
    const n = Number(v);
    // commander's own error: it names the option and exits 1 with one line, not a stack trace.
    if (!Number.isInteger(n) || n < 1 || n > max) throw new InvalidArgumentError(`expected an integer from 1 to ${max}, got "${v}"`);
    return n;
  };
}

export function addObjectStoreOptions(program: Command): void {
  program
    .option('--s3-endpoint <url>', 'S3 endpoint for s3:// snapshots (default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS)')
    .option('--s3-region <region>', 'S3 region (default: AWS_REGION, the profile, us-east-1 with a custom endpoint)')
    .option('--s3-path-style', 'path-style requests (http://host/bucket/key); automatic for IP and localhost endpoints')
    .option('--s3-staging-dir <dir>', 'where save/receive (and relay --tee) stage a snapshot before uploading it (default: the temp dir)')
    .addOption(new Option('--s3-part-size <MiB>', 'multipart upload part size').default(16).argParser(positive(5 * 1024)))
    .addOption(new Option('--s3-upload-concurrency <n>', 'parts uploaded in parallel').default(4).argParser(positive(64)))
    .addOption(new Option('--s3-read-ahead <n>', '8 MiB ranged GETs in flight ahead of a sequential reader').default(6).argParser(positive(64)))
    .addOption(new Option('--s3-read-around <KiB>', 'bytes fetched around a page read out of order (restore --postcopy page requests)').default(256).argParser(positive(64 * 1024)))
    .hook('preAction', (cmd) => {
      const o = cmd.opts() as { s3Endpoint?: string; s3Region?: string; s3PathStyle?: boolean; s3StagingDir?: string; s3PartSize: number; s3UploadConcurrency: number; s3ReadAhead: number; s3ReadAround: number };
      configureObjectStore({
        ...(o.s3Endpoint ? { endpoint: o.s3Endpoint } : {}),
        ...(o.s3Region ? { region: o.s3Region } : {}),
        ...(o.s3PathStyle ? { pathStyle: true } : {}),
        ...(o.s3StagingDir ? { stagingDir: resolvePath(o.s3StagingDir) } : {}),
        partSize: o.s3PartSize * MiB,
        uploadConcurrency: o.s3UploadConcurrency,
        readAhead: o.s3ReadAhead,
        readAround: o.s3ReadAround * 1024,
      });
    })
    .hook('postAction', () => closeS3Clients());
}
