// File targets: mapped-ram block headers and bitmaps on their own, and whole files (mapped-ram and
// plain stream) opened by the snapshot readers send/restore use, scanned by verify's layout walk
// and inspected (--devices) — written to a RAM-backed temp dir per input.

import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MAPPED_RAM_HEADER_SIZE, TARGET_PAGE_SIZE } from '../../../src/codec/constants.js';
import { PageBitmap, decodeMappedRamHeader } from '../../../src/codec/mapped-ram.js';
import { convert } from '../../../src/conversations/convert.js';
import { scanFile } from '../../../src/conversations/file-layout.js';
import { inspect } from '../../../src/conversations/inspect.js';
import { MappedRamSnapshot } from '../../../src/engine/mapped-ram-reader.js';
import { StreamSnapshot } from '../../../src/engine/stream-snapshot.js';
import type { SnapshotSource } from '../../../src/engine/snapshot.js';
import type { Rng } from '../rng.js';
import { BLOCK_SIZE_MUTATOR, captures, compactMappedRam, compactStream, formatDictionary, mainStructure, mergeRanges, unique } from '../seeds.js';
import { check, type Target } from '../target.js';
import { isProtocolError, protocolSignature } from './stream.js';
import { streamScenarios } from '../../helpers/fixtures.js';

const PAGE = TARGET_PAGE_SIZE;

// ---- header + bitmap ------------------------------------------------------------------------

export const mappedRamHeaderTarget: Target = {
  name: 'mapped-ram-header',
  what: 'decodeMappedRamHeader on a block header, then PageBitmap over the bytes after it for a page count drawn per input: count() and runs() agree with a bit-by-bit reading, runs stay below the page count',
  seeds: () => {
    const out = [];
    for (const s of captures().filter((x) => x.entry.scenario === 'mapped-ram-file')) {
      const f = s.main();
      for (const b of s.check.main.ram_blocks) {
        const m = b.mapped_ram!;
        out.push({ name: `${s.label}/${b.name}`, data: Buffer.from(f.subarray(m.header_offset, m.bitmap_offset + m.bitmap_bytes)), focus: [[0, MAPPED_RAM_HEADER_SIZE + 16]] as [number, number][] });
      }
    }
    return unique(out);
  },
  run(input, rng) {
    const h = decodeMappedRamHeader(input.subarray(0, MAPPED_RAM_HEADER_SIZE));
    check(h.pageSize === PAGE && h.pagesOffset % PAGE === 0 && Number.isSafeInteger(h.bitmapOffset) && Number.isSafeInteger(h.pagesOffset), `accepted header ${JSON.stringify(h)}`);
    const bits = input.subarray(MAPPED_RAM_HEADER_SIZE);
    // Mostly a count the bytes can hold; sometimes more than they hold.
    const pages = rng.int(bits.length * 8 + (rng.bool(0.9) ? 1 : 130));
    const bm = new PageBitmap(pages, bits);
    let naive = 0;
    const set: number[] = [];
    for (let p = 0; p < pages; p++) {
      if ((bits[p >>> 3]! >> (p & 7)) & 1) {
        naive++;
        set.push(p);
      }
    }
    check(bm.count() === naive, `count() ${bm.count()} but ${naive} bits set below ${pages}`);
    const from = rng.int(pages + 2);
    let i = set.findIndex((p) => p >= from);
    if (i < 0) i = set.length;
    let last = -2;
    for (const [first, n] of bm.runs(from)) {
      check(n > 0 && first >= from && first + n <= pages && first > last + 1, `run [${first}, +${n}) from ${from} of ${pages} pages (previous ended ${last})`);
      for (let p = first; p < first + n; p++) check(set[i++] === p, `run [${first}, +${n}) covers page ${p}, whose bit is clear`);
      last = first + n - 1;
    }
    check(i === set.length, `runs() missed set pages from ${from}`);
    return `ok ${naive > 0}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 64 * 1024,
};

// ---- whole files ----------------------------------------------------------------------------

let dir: string | undefined;
let serial = 0;

function tempFile(data: Buffer): string {
  dir ??= mkdtempSync(join(process.platform === 'linux' ? '/dev/shm' : tmpdir(), 'multifd-fuzz-'));
  const path = join(dir, `in-${process.pid}-${serial++ % 4}.mig`);
  writeFileSync(path, data);
  return path;
}

function cleanup(): void {
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
}

/** Reads back every present page through both read paths; checks runs lie inside their blocks. */
async function exercise(src: SnapshotSource, rng: Rng): Promise<number> {
  let present = 0;
  for (const b of src.blockList) {
    const pages = b.usedLength / PAGE;
    check(Number.isInteger(pages), `block ${b.name} used_length ${b.usedLength} not page aligned`);
    const runs: number[] = [];
    let inRuns = 0;
    src.forEachRun(b.name, (first, count) => {
      check(Number.isInteger(first) && count > 0 && first >= 0 && first + count <= pages, `run [${first}, +${count}) outside block ${b.name} (${pages} pages)`);
      if (runs.length < 64) runs.push(first, count);
      inRuns += count;
    });
    check(inRuns === src.presentPages(b.name), `block ${b.name}: runs hold ${inRuns} pages, presentPages says ${src.presentPages(b.name)}`);
    present += inRuns;
    // A bounded sample of runs, read the way send reads them.
    const take = Math.min(runs.length / 2, 8);
    let need = 0;
    for (let i = 0; i < take; i++) need += Math.min(runs[2 * i + 1]!, 32);
    const sample = Array.from({ length: take }, (_, i) => [runs[2 * i]!, Math.min(runs[2 * i + 1]!, 32)]).flat();
    if (take > 0) {
      const views = await src.loadRuns(b.name, sample, take, Buffer.alloc(src.scratchBytes(need)));
      check(views.reduce((n, v) => n + v.length, 0) === need * PAGE, `loadRuns returned the wrong number of bytes for ${need} pages`);
    }
    if (pages > 0) {
      const first = rng.int(pages);
      const n = Math.min(pages - first, 1 + rng.int(16));
      const data = await src.readAt(0, 0);
      check(data.length === 0, 'readAt(0, 0)');
      if ('readPages' in src) {
        const got = await (src as MappedRamSnapshot).readPages(b.name, first * PAGE, n);
        check(got.length === n * PAGE, 'readPages length');
      }
    }
  }
  return present;
}

function fileTarget(kind: 'mapped-ram' | 'stream'): Target {
  return {
    name: kind === 'mapped-ram' ? 'mapped-ram-file' : 'stream-file',
    what:
      kind === 'mapped-ram'
        ? 'MappedRamSnapshot.open (stream parse with seeks over page regions, bitmaps loaded, device state checked by its VMDESCRIPTION) on compacted QEMU mapped-ram files, then runs read back; scanFile (verify), inspect --devices and convert --to stream on the same file. ProtocolError or success; scanFile never throws'
        : 'StreamSnapshot.open (page index of a plain stream file, XBZRLE deltas decoded into a temporary file, device state checked by its VMDESCRIPTION) on QEMU stream files, then runs read back; scanFile (verify), inspect --devices and convert --to mapped-ram. ProtocolError or success; scanFile never throws',
    seeds: () =>
      unique(
        // QEMU's stream file with XBZRLE records exercises the deltas decoded while indexing.
        [...captures(), ...(kind === 'stream' ? streamScenarios((e) => e.scenario === 'stream-file-xbzrle') : [])]
          .filter((s) => (kind === 'mapped-ram' ? s.entry.scenario === 'mapped-ram-file' : s.entry.scenario === 'stream-file' || s.entry.scenario === 'precopy-plain' || s.entry.scenario === 'stream-file-xbzrle'))
          .map((s) => {
            const data = kind === 'mapped-ram' ? compactMappedRam(s) : compactStream(s.main());
            return { name: s.label, data, focus: mergeRanges([...mainStructure(data, 16384), [data.length - 2048, data.length]]) };
          }),
      ),
    dictionary: formatDictionary,
    mutators: [BLOCK_SIZE_MUTATOR],
    async run(input, rng) {
      const path = tempFile(input);
      // verify's walk first: documented never to throw for a malformed file.
      const layout = await scanFile(path, { keepDeviceState: true });
      const scanErrors = layout.problems.filter((p) => p.severity === 'error').length;
      let src: SnapshotSource;
      try {
        src = kind === 'mapped-ram' ? await MappedRamSnapshot.open(path, { directIo: false }) : await StreamSnapshot.open(path);
      } catch (e) {
        // Typed or not, the engine classifies it; the scan already ran without throwing.
        throw e;
      }
      let present: number;
      try {
        const ds = src.deviceState;
        check(ds.fileOffset + ds.end === src.fileSize && ds.eofOffset < ds.end, `device state layout ${JSON.stringify({ ...ds, sections: ds.sections.length })} in a ${src.fileSize}-byte file`);
        const tail = await src.readAt(ds.fileOffset, src.fileSize - ds.fileOffset);
        check(tail.length === src.fileSize - ds.fileOffset, 'device state read short');
        present = await exercise(src, rng);
      } finally {
        await src.close();
      }
      const r = await inspect(path, { devices: true });
      JSON.stringify(r);
      // convert reads the whole file again and rewrites the VMDESCRIPTION's configuration entry.
      const out = `${path}.out`;
      const c = await convert({ input: path, output: out, to: kind === 'mapped-ram' ? 'stream' : 'mapped-ram', force: true });
      check(c !== undefined, 'convert returned nothing');
      rmSync(out, { force: true });
      return `open ok present=${present > 0} scan=${Math.min(scanErrors, 2)} devices=${(r.devices?.length ?? 0) > 0}`;
    },
    typed: isProtocolError,
    errorSignature: protocolSignature,
    maxInput: 2 << 20,
    budgetMs: 4000,
    teardown: cleanup,
  };
}

export const mappedRamFileTarget = fileTarget('mapped-ram');
export const streamFileTarget = fileTarget('stream');
