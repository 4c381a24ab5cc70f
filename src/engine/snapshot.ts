// What a sender needs from a saved migration, whatever its file format: the stream's prologue
// (configuration, RAM section and block list), the pages that must travel, and the device state
// to forward byte for byte. mapped-ram files and QEMU's plain stream files both provide it.

import type { Configuration } from '../codec/configuration.js';
import type { LibvirtImage } from '../codec/libvirt-image.js';
import type { DeviceStateLayout } from '../codec/vmdesc.js';

export interface SnapshotBlockInfo {
  name: string;
  usedLength: number;
  /** Present only with x-ignore-shared (written back into the block list). */
  mrAddr?: number;
  /** x-ignore-shared left it out of a QEMU 11 mapped-ram file: its memory is in the shared backing file (RamBlockInfo.shared). */
  shared?: true;
}

export interface SnapshotRamSection {
  sectionId: number;
  instanceId: number;
  versionId: number;
}

export interface SnapshotSource {
  readonly path: string;
  readonly format: 'mapped-ram' | 'stream';
  readonly configuration: Configuration;
  readonly ramSection: SnapshotRamSection;
  /** Blocks in the source's list order (the order the destination expects them in MEM_SIZE). */
  readonly blockList: readonly SnapshotBlockInfo[];
  /** The source sent SWITCHOVER_START before its final RAM section. */
  readonly switchoverStart: boolean;
  /**
   * Sections of other iterable handlers (dirty-bitmap: START/PART/END with their chunks and
   * footers) as stored, replayed after RAM's END; undefined when there are none.
   */
  readonly iterableSections?: Buffer | undefined;
  /** Device sections, EOF and VMDESCRIPTION; offsets in the layout are relative to fileOffset. */
  readonly deviceState: DeviceStateLayout & { fileOffset: number };
  readonly fileSize: number;
  /** Where QEMU's stream starts in `path`: 92 + data_len for libvirt images, N for `file:PATH,offset=N`. */
  readonly baseOffset?: number;
  /**
   * Set when the input is a libvirt save image. For a compressed one `path` is the decompressed
   * stream (a temporary file, removed by close()) and offsets are within it.
   */
  readonly libvirt?: LibvirtImage & { imagePath: string };
  /** Pages whose final content is not known to be zero, in pages. */
  presentPages(block: string): number;
  /**
   * Calls `visit(firstPage, count)` for each run of consecutive present pages of `block` that
   * starts at or after `fromPage` (a run containing fromPage is clipped to start there), in
   * ascending order, until `visit` returns false. Pages never visited are zero in the final state.
   * A run longer than `maxRun` may come as adjacent pieces of at most `maxRun` pages: a caller that
   * takes only that many pages per call passes it, so each call costs what it takes, not the rest
   * of the run.
   */
  forEachRun(block: string, visit: (firstPage: number, count: number) => boolean | void, fromPage?: number, maxRun?: number): void;
  /**
   * Scratch bytes loadRuns needs for `pages` pages (more than pages × pageSize when the file
   * interleaves record headers with page data).
   */
  scratchBytes(pages: number): number;
  /**
   * Reads pages of `block` given as flat (firstPage, count) pairs into `scratch` with positioned
   * reads, and returns views of the page bytes in order, one per run. A view may instead point
   * into the source's own read buffers (an object store's chunks), which are never written again:
   * callers use the views, not `scratch`. Concurrent calls with distinct scratch buffers are allowed.
   * `urgent`: pages a guest waits for (postcopy's requests); a source with large sequential reads
   * in flight serves them on their own instead of behind those.
   */
  loadRuns(block: string, runs: ArrayLike<number>, runCount: number, scratch: Buffer, opts?: { urgent?: boolean }): Promise<Buffer[]>;
  /** Reads `length` bytes of the file at `position` (for forwarding the device state). */
  readAt(position: number, length: number, into?: Buffer): Promise<Buffer>;
  /**
   * A source with slow first reads (an object store) starts fetching what a reader going through
   * the pages in order asks for first, so that it arrives while the destination is set up.
   */
  prefetch?(): void;
  close(): Promise<void>;
}
