// convert … s3://bucket/key: the output is always a packed mapped-ram object (docs/s3-layout.md).

import { InvalidOptionError } from '../codec/errors.js';
import { openSnapshot, snapshotOpenerFor } from '../engine/open-snapshot.js';
import type { ConvertOptions, ConvertSummary } from './convert.js';
import { isObjectUrl, objectCommittedNote, storeAsObject, type UploadReport } from './object-store.js';

export { isObjectUrl };

export async function convertToObject(opts: ConvertOptions, convert: (o: ConvertOptions) => Promise<ConvertSummary>): Promise<ConvertSummary & { store: UploadReport }> {
  const started = Date.now();
  if (opts.to !== 'mapped-ram') throw new InvalidOptionError(`an object holds a packed mapped-ram snapshot: convert to ${opts.output} needs --to mapped-ram`);
  if (opts.input === opts.output) throw new InvalidOptionError(`the output ${opts.output} is the input`);
  // Validates the input completely before anything is uploaded.
  const src = await openSnapshot(opts.input);
  const info = {
    from: src.format,
    machine: src.configuration.machine,
    'device-state-bytes': src.fileSize - src.deviceState.fileOffset,
    'input-size': src.fileSize,
    blocks: src.blockList.map((b) => ({ name: b.name, 'used-length': b.usedLength, pages: src.presentPages(b.name) })),
  };
  const pages = info.blocks.reduce((n, b) => n + b.pages, 0);
  await src.close();
  let committing = false;
  const report = await storeAsObject(opts.input, opts.output, {
    pointOfNoReturn: () => { committing = true; },
    ...(opts.force !== undefined ? { force: opts.force } : {}),
    ...(opts.signal ? { signal: opts.signal } : {}),
    // The upload's progress, as save/receive report theirs; the pages count is the input's.
    onProgress: (u) => opts.onProgress?.({ phase: 'uploading', elapsedMs: Date.now() - started, pagesDone: pages, pagesTotal: pages, written: u.stored, upload: u }),
    isLocalMappedRam: !snapshotOpenerFor(opts.input) && info.from === 'mapped-ram',
    toMappedRam: (staged) => convert({ ...opts, output: staged, force: true }),
  });
  return {
    input: opts.input,
    output: opts.output,
    ...info,
    to: 'mapped-ram',
    pages: report['present-pages'],
    'output-size': report['object-size'],
    'elapsed-ms': Date.now() - started,
    store: report,
    // An interrupt after CompleteMultipartUpload went out could not stop it (docs/s3.md, atomicity).
    ...(committing && opts.signal?.aborted ? { notes: [objectCommittedNote(opts.output)] } : {}),
  };
}
