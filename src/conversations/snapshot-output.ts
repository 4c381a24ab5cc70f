// A mapped-ram snapshot built from a live migration's main stream as it passes (receive writes
// one; relay's --tee too): the head once the block list is known, the setup section's close, and
// from the switchover on the device state byte for byte. Pages go through `store`.

import { Command, SectionType } from '../codec/constants.js';
import { encodeConfiguration, withCapability, type Configuration } from '../codec/configuration.js';
import type { RamBlockInfo } from '../codec/main-stream-parser.js';
import { encodeCommand, encodeEos, encodeFooter, encodeMemSize, encodeSectionFull, encodeSectionShort, encodeStreamHeader } from '../codec/stream-encode.js';
import { AbortedError, InvalidOptionError, ProtocolError } from '../codec/errors.js';
import { finishLibvirtImage } from '../engine/libvirt-image-file.js';
import { packetSlotsFor } from '../engine/aligned-slots.js';
import { publish } from '../engine/diagnostics.js';
import { MappedRamWriter } from '../engine/mapped-ram-writer.js';
import { checkBucket, isObjectUrl, parseObjectUrl, s3Client } from '../transports/s3.js';
import { objectCommittedNote, objectStoreSettings, removeStaging, stagingDirectory, uploadPackedSnapshot, type UploadProgress, type UploadReport } from './object-store.js';

/** An s3:// output: staged as a local mapped-ram file, uploaded packed by commit(). */
interface ObjectTarget {
  url: string;
  dir: string;
}

/** Bytes of non-RAM iterable sections (dirty-bitmap) held until the device state; QEMU sends ~KiBs. */
export const MAX_ITERABLE_BYTES = 64 * 1024 * 1024;

export class SnapshotOutput {
  private headDone = false;
  private preludeDone = false;
  /** Non-RAM iterable sections as they came (header, chunks, footer), written before the devices. */
  private iterableBytes: Buffer[] = [];
  private iterableLength = 0;

  /**
   * Fired by an interrupt or abort(): until the commit's point of no return it keeps the commit
   * from happening (no rename, no CompleteMultipartUpload: nothing complete-looking appears).
   */
  private readonly stop = new AbortController();
  /**
   * The point of no return is passed: the file is being renamed into place, or the object's
   * CompleteMultipartUpload was sent. No abort can undo that; only the commit's own outcome counts.
   */
  private pastNoReturn = false;
  /** An interrupt that came after the point of no return (see interrupt()). */
  private lateInterrupt: Error | undefined;
  /** For an object: how far its upload is, once it started. */
  uploadProgress: UploadProgress | undefined;
  /** For an object: the upload's report, once commit() resolved. */
  uploadReport: UploadReport | undefined;

  private constructor(readonly store: MappedRamWriter, private readonly object?: ObjectTarget, private readonly libvirtImage = false) {}

  /**
   * `channels`: multifd channels that will feed it (sizes the O_DIRECT staging slots). An
   * s3://bucket/key path is staged in a private temp directory and uploaded by commit(); its
   * bucket is checked here, before any migration starts.
   */
  /**
   * `libvirtPrologue`: a libvirt image header and data (encodeLibvirtImage, sparse format, `…Part`
   * magic) written before QEMU's stream, which starts right after it; commit() flips the magic to
   * `…Save` once the file is durable under its name, as `virsh restore` wants it.
   */
  static async create(path: string, opts: { directIo?: boolean; channels?: number; libvirtPrologue?: Buffer } = {}): Promise<SnapshotOutput> {
    let object: ObjectTarget | undefined;
    let file = path;
    const prologue = opts.libvirtPrologue;
    if (isObjectUrl(path)) {
      if (prologue) throw new InvalidOptionError(`a libvirt image is a local file: ${path} cannot be one`);
      await checkBucket(await s3Client(objectStoreSettings()), parseObjectUrl(path));
      object = { url: path, dir: await stagingDirectory() };
      file = `${object.dir}/snapshot.mig`;
    }
    try {
      return new SnapshotOutput(
        await MappedRamWriter.create(file, {
          ...(opts.directIo === undefined ? {} : { directIo: opts.directIo }),
          slots: packetSlotsFor(opts.channels ?? 0),
          ...(prologue ? { baseOffset: prologue.length } : {}),
        }).then(async (w) => {
          if (prologue) await w.writePrologue(prologue).catch(async (e: unknown) => { await w.abort(); throw e; });
          return w;
        }),
        object,
        prologue !== undefined,
      );
    } catch (e) {
      if (object) await removeStaging(object.dir);
      throw e;
    }
  }

  get headWritten(): boolean {
    return this.headDone;
  }

  /** Header, configuration (with mapped-ram on), the RAM setup section and the block regions. */
  async head(config: Configuration, sectionId: number, ramTotal: number, blocks: readonly RamBlockInfo[]): Promise<void> {
    const head = Buffer.concat([
      encodeStreamHeader(),
      encodeConfiguration(withCapability(config, 'mapped-ram', true)),
      encodeSectionFull(SectionType.START, sectionId, 'ram', 0, 4),
      encodeMemSize(ramTotal),
    ]);
    await this.store.writeHead(head, blocks.map((b) => ({ name: b.name, usedLength: b.usedLength, ...(b.mrAddr !== undefined ? { mrAddr: b.mrAddr } : {}) })));
    this.headDone = true;
  }

  /** Closes the setup section (a mapped-ram file has no other RAM records). */
  async setupFooter(sectionId: number): Promise<void> {
    await this.store.appendStream([encodeEos(), encodeFooter(sectionId)]);
  }

  /** Device state bytes; the first call writes the switchover and the final RAM section first. */
  async deviceState(data: readonly Buffer[], sectionId: number, switchoverStart: boolean): Promise<void> {
    if (!this.preludeDone) {
      this.preludeDone = true;
      const prelude: Buffer[] = [];
      if (switchoverStart) prelude.push(encodeCommand(Command.SWITCHOVER_START));
      prelude.push(encodeSectionShort(SectionType.END, sectionId), encodeEos(), encodeFooter(sectionId));
      // After RAM's END, before the first device section: where QEMU's own END sections of other
      // iterable handlers sit (qemu_savevm_state_complete_precopy_iterable), and where readers of
      // the file find them in stream order.
      prelude.push(...this.iterableBytes);
      this.iterableBytes = [];
      await this.store.appendStream(prelude);
    }
    await this.store.appendStream(data as Buffer[]);
  }

  /**
   * Bytes of a non-RAM iterable section (its header, chunks, footer), carried undecoded. Held
   * until the device state so that the file keeps RAM's sections together.
   */
  iterable(bufs: readonly Buffer[]): void {
    if (this.preludeDone) throw new ProtocolError('UNSUPPORTED', 'an iterable section other than RAM after the device state began (postcopy with dirty-bitmaps) cannot be stored in a snapshot');
    for (const b of bufs) {
      this.iterableLength += b.length;
      if (this.iterableLength > MAX_ITERABLE_BYTES) throw new ProtocolError('LIMIT_EXCEEDED', `non-RAM iterable sections larger than ${MAX_ITERABLE_BYTES} bytes`);
      this.iterableBytes.push(Buffer.from(b));
    }
  }

  /**
   * For an object: durable locally first, then uploaded; the object exists only if this resolves.
   * Rejects (with nothing committed) when interrupted or aborted before the point of no return.
   */
  commit(): Promise<void> {
    this.committing = this.object ? this.commitObject(this.object) : this.commitFile();
    return this.committing;
  }

  /** The commit in progress, which abort() waits for (it aborts the multipart upload on its way out). */
  private committing: Promise<void> | undefined;

  private async commitFile(): Promise<void> {
    await this.store.commit(() => this.passPointOfNoReturn(this.store.finalPath));
    // Past the rename: the image's magic is flipped whatever comes now (virsh restore needs it).
    if (this.libvirtImage) await finishLibvirtImage(this.store.finalPath);
  }

  private async commitObject(object: ObjectTarget): Promise<void> {
    try {
      // The staging file is private: its rename is no point of no return, the upload's Complete is.
      await this.store.commit(() => this.throwIfStopped());
      const localAt = new Date().toISOString();
      const report = await uploadPackedSnapshot(this.store.finalPath, object.url, {
        signal: this.stop.signal,
        pointOfNoReturn: () => this.passPointOfNoReturn(object.url),
        onProgress: (p) => { this.uploadProgress = p; },
      });
      this.uploadReport = { ...report, 'local-durable-at': localAt };
    } finally {
      await removeStaging(object.dir);
    }
  }

  private throwIfStopped(): void {
    if (this.stop.signal.aborted) throw new AbortedError(this.stop.signal.reason, `${this.object?.url ?? this.store.finalPath} was not committed: interrupted`);
  }

  /** Runs right before the irreversible step, in the same turn as it (see MappedRamWriter.commit, MultipartUpload.complete). */
  private passPointOfNoReturn(target: string): void {
    this.throwIfStopped();
    this.pastNoReturn = true;
    publish('output', 'commit-point', { target });
  }

  /**
   * An interrupt of the conversation (Ctrl-C, SIGTERM, handle.abort()). Before the commit's point
   * of no return it stops the commit at once (the conversation then fails as interrupted) and
   * returns false. After it, the commit can no longer be undone: it returns true, and the
   * conversation lets the commit finish and reports its outcome, with lateInterruptNote() when
   * it succeeded (docs/s3.md, atomicity).
   */
  interrupt(reason: Error): boolean {
    if (this.pastNoReturn) {
      this.lateInterrupt ??= reason;
      return true;
    }
    this.stop.abort(reason);
    return false;
  }

  /** For the summary's notes, once commit() resolved: an interrupt that came too late to stop it. */
  lateInterruptNote(): string | undefined {
    const why = this.lateInterrupt;
    if (!why) return undefined;
    return this.object
      ? objectCommittedNote(this.object.url, why.message)
      : `${why.message} after the snapshot was committed: ${this.store.finalPath} is in place, complete`;
  }

  async abort(): Promise<void> {
    this.stop.abort();
    // The caller may exit once this resolves: the multipart upload must be aborted by then, and
    // a file being committed renamed into place or not, not left half-way.
    await this.committing?.catch(() => {});
    try {
      await this.store.abort();
    } finally {
      if (this.object) await removeStaging(this.object.dir);
    }
  }
}

/** `{ notes }` for a summary when the output has something to say (a late interrupt), else `{}`. */
export function notesOf(output: SnapshotOutput): { notes?: string[] } {
  const note = output.lateInterruptNote();
  return note ? { notes: [note] } : {};
}
