// An output written under a temporary name next to its final path and renamed into place only
// when complete, so an interrupted convert or extract never leaves a file that looks finished.
// Writes are positioned writev calls (contiguous buffers go down in one syscall).

import { open, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { OutputFileError } from '../codec/errors.js';
import { removeStalePartials, syncDirectory, temporaryName, writeExactly } from '../engine/write-exactly.js';

/** Fails unless `path` is free or `force` is set; a directory is never overwritten. */
export async function checkOutputPath(path: string, force: boolean): Promise<void> {
  let st;
  try {
    st = await stat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (st.isDirectory()) throw new OutputFileError('OUTPUT_IS_DIRECTORY', path, `${path} is a directory`);
  if (!force) throw new OutputFileError('OUTPUT_EXISTS', path, `${path} already exists (use --force to overwrite it)`);
}

export class OutputFile {
  private cursor = 0;
  private done = false;

  private constructor(readonly finalPath: string, readonly tempPath: string, private readonly fh: FileHandle) {}

  static async create(finalPath: string, opts: { force?: boolean } = {}): Promise<OutputFile> {
    await checkOutputPath(finalPath, opts.force ?? false);
    await removeStalePartials(finalPath);
    const tempPath = temporaryName(finalPath);
    let fh: FileHandle;
    try {
      fh = await open(tempPath, 'wx', 0o644);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new OutputFileError('OUTPUT_FAILED', finalPath, `cannot create ${finalPath}: ${err.message}`, { cause: err });
    }
    return new OutputFile(finalPath, tempPath, fh);
  }

  /** Bytes appended so far (the sequential cursor). */
  get size(): number {
    return this.cursor;
  }

  append(bufs: readonly Buffer[]): Promise<void> {
    const at = this.cursor;
    this.cursor += bufs.reduce((n, b) => n + b.length, 0);
    return this.writeAt(bufs, at);
  }

  writeAt(bufs: readonly Buffer[], position: number): Promise<void> {
    return writeExactly(this.fh, bufs, position, this.tempPath);
  }

  /** Sets the final length (holes stay holes), makes it durable and renames it into place. */
  async commit(length = this.cursor): Promise<void> {
    await this.fh.truncate(length);
    await this.fh.sync();
    await this.fh.close();
    this.done = true;
    await rename(this.tempPath, this.finalPath);
    syncDirectory(dirname(this.finalPath));
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.fh.close().catch(() => {});
    await unlink(this.tempPath).catch(() => {});
  }
}
