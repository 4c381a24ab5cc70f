// Loaders for the golden QEMU captures in test/fixtures (see test/fixtures/README.md). Tests run
// from dist/, so paths are resolved from the repository root, never from the compiled file.

import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';

/** dist/test/helpers/fixtures.js → <repo>/test/fixtures/ */
export const FIXTURES_DIR = fileURLToPath(new URL('../../../test/fixtures/', import.meta.url));

export interface CaptureIndexEntry {
  qemu: '10.0' | '11.1';
  scenario: string;
  dir: string;
  machine_type: string;
  transport: 'tcp' | 'file';
  files: string[];
  accept_order: string[];
  /**
   * Captures of streams beyond plain precopy/multifd (background snapshot, xbzrle, dirty-bitmaps,
   * switchover-ack, postcopy-ram on hugepages): scenarios() leaves them out, since the tests over
   * "every capture" describe that plain shape; streamScenarios() lists them.
   */
  extended?: boolean;
}

export interface MappedRamFacts {
  version: number;
  page_size: number;
  bitmap_offset: number;
  pages_offset: number;
  header_offset: number;
  bitmap_bytes: number;
  bits_set: number;
}

export interface CheckMain {
  bytes: number;
  machine: string;
  config_subsections: Record<string, { version: number; caps?: string[]; uuid?: string; bits?: number }>;
  config_end: number;
  vmdesc_offset: number;
  vmdesc_length: number;
  vmdesc_devices: number;
  vmdesc_page_size: number;
  vmdesc_has_index_keys: boolean;
  ram_section_id: number;
  mem_size_total: number;
  top_level: string[];
  ram_sections: string[];
  ram_record_counts: { FLUSH: number; EOS: number; ZERO: number; PAGE: number; CONTINUE: number };
  ram_blocks: { name: string; used_length: number; mapped_ram?: MappedRamFacts }[];
  device_sections: number;
  offsets: Record<string, number>;
  device_order: string[];
  /** [idstr, instance_id, version, section_id, body_bytes] in stream order. */
  devices: [string, number, number, number, number][];
  first_device: string;
  device_subsections: string[];
}

export interface CheckChannel {
  id: number;
  uuid: string;
  bytes: number;
  packets: number;
  sync_packets: number;
  data_packets: number;
  normal_pages: number;
  zero_pages: number;
  zero_only_packets: number;
  first_is_sync: boolean;
  last_is_sync: boolean;
  sync_positions: number[];
  ramblocks: string[];
  first_payload_starts?: string;
}

export interface CheckBlockMemory {
  used_length: number;
  nonzero_pages: number;
  pages_never_sent: number;
  pages_sent_more_than_once: number;
  sha256: string;
}

export interface Check {
  scenario: string;
  main: CheckMain;
  channels?: Record<string, CheckChannel>;
  packet_num?: { count: number; min: number | null; max: number | null; contiguous: boolean };
  sync_rule?: string;
  memory?: { 'pc.ram_blob_ok': boolean; 'pc.ram_other_nonzero_pages': number; blocks: Record<string, CheckBlockMemory> };
  problems: unknown[];
}

export interface Meta {
  scenario: string;
  machine_type: string;
  memory_bytes: number;
  page_size: number;
  blob: { file: string; guest_address: number; ram_block: string; ram_block_offset: number; size: number; sha256: string };
  uuid?: string | null;
  capabilities_enabled: string[];
  parameters_effective: Record<string, unknown>;
  transport: 'tcp' | 'file';
  files: string[];
  connections?: { accept_index: number; file: string; kind: string; channel_id: number | null; bytes: number; sha256: string }[];
  accept_order: string[];
}

export interface Scenario {
  entry: CaptureIndexEntry;
  /** "10.0/multifd-2ch", for test names. */
  label: string;
  meta: Meta;
  check: Check;
  /** Uncompressed bytes of a capture file (cached). */
  file(name: string): Buffer;
  /** The main stream: conn<K>-main.bin for sockets, file.mig for file scenarios. */
  main(): Buffer;
  mainFile: string;
  /** Multifd channel files with the channel id their name carries. */
  channelFiles: { file: string; id: number }[];
}

function readJson<T>(rel: string): T {
  return JSON.parse(readFileSync(FIXTURES_DIR + rel, 'utf8')) as T;
}

let indexCache: CaptureIndexEntry[] | undefined;

export function captureIndex(): CaptureIndexEntry[] {
  indexCache ??= readJson<{ captures: CaptureIndexEntry[] }>('index.json').captures;
  return indexCache;
}

const fileCache = new Map<string, Buffer>();

export function loadGz(rel: string): Buffer {
  let b = fileCache.get(rel);
  if (!b) {
    b = gunzipSync(readFileSync(FIXTURES_DIR + rel));
    fileCache.set(rel, b);
  }
  return b;
}

const CHANNEL_FILE = /^conn\d+-multifd(\d+)\.bin\.gz$/;

export function scenario(entry: CaptureIndexEntry): Scenario {
  const mainFile = entry.files.find((f) => /-main\.bin\.gz$/.test(f)) ?? entry.files.find((f) => f === 'file.mig.gz');
  if (!mainFile) throw new Error(`${entry.dir}: no main stream file`);
  const channelFiles = entry.files.flatMap((f) => {
    const m = CHANNEL_FILE.exec(f);
    return m ? [{ file: f, id: Number(m[1]) }] : [];
  });
  const file = (name: string): Buffer => loadGz(`${entry.dir}/${name}`);
  return {
    entry,
    label: `${entry.qemu}/${entry.scenario}`,
    meta: readJson<Meta>(`${entry.dir}/meta.json`),
    check: readJson<Check>(`${entry.dir}/check.json`),
    file,
    main: () => file(mainFile),
    mainFile,
    channelFiles,
  };
}

/** Every capture folder, optionally filtered. */
export function scenarios(filter: (e: CaptureIndexEntry) => boolean = () => true): Scenario[] {
  return captureIndex().filter((e) => !e.extended && filter(e)).map(scenario);
}

/** The extended captures (see CaptureIndexEntry.extended). */
export function streamScenarios(filter: (e: CaptureIndexEntry) => boolean = () => true): Scenario[] {
  return captureIndex().filter((e) => e.extended === true && filter(e)).map(scenario);
}

export function findScenario(qemu: '10.0' | '11.1', name: string): Scenario {
  const e = captureIndex().find((c) => c.qemu === qemu && c.scenario === name);
  if (!e) throw new Error(`no capture ${qemu}/${name}`);
  return scenario(e);
}

let blobCache: Buffer | undefined;

/** The 20-page guest blob QEMU had at pc.ram + 0x100000. */
export function guestBlob(): Buffer {
  blobCache ??= readFileSync(FIXTURES_DIR + 'guest-blob.bin');
  return blobCache;
}

export const BLOB_OFFSET = 0x100000;

/** Compression the capture used for its multifd channels. */
export function compressionOf(s: Scenario): string {
  return String(s.meta.parameters_effective['multifd-compression'] ?? 'none');
}

/** Deterministic PRNG (mulberry32) so chunkings that fail can be reproduced from the seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
