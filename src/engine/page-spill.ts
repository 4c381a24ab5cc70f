// Pages written to a temporary sparse file and read back: where relay 0 → N keeps the copies of
// sent pages that no longer fit its memory, so an XBZRLE delta for a page sent long ago still finds
// the bytes it applies onto (main-pages-to-multifd.ts). Positions are the caller's (one per guest
// page, so the file is at most guest-RAM sized, and only pages written take disk blocks).
//
// The file is unlinked as soon as it is open: nothing is left behind whatever way the process ends
// (success, failure, abort, a signal), and its blocks are freed when close() closes it.
//
// Synchronous positioned I/O, on purpose. The pages spilled are the ones a source re-sends, which
// lie scattered over guest RAM, so most runs are one page: through libuv's thread pool (FileHandle
// and staged-runs.ts, tried first) each costs a thread hop and a promise. Measured on a loaded
// 2-core machine, converting 196608 page records (256 MiB guest, 98304 deltas, every copy spilled
// and read back): 12-13 s of CPU that way, 1.5-2 s with pread/pwrite here, 0.7-1 s with every copy
// in memory. Pages at consecutive positions are still gathered into one write (a run of up to
// RUN_BYTES), with no per-page allocation; a page in the run not yet written is read from it.

import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { OutputFileError, ProtocolError } from '../codec/errors.js';

/** The longest run gathered before it is written. */
const RUN_BYTES = 1024 * 1024;

/** The directory for temporary files: the one given, else MULTIFD_TMPDIR, else the OS's (TMPDIR, /tmp). */
export function temporaryDirectory(dir?: string): string {
  return dir || process.env.MULTIFD_TMPDIR || tmpdir();
}

export class PageSpill {
  /** Pages handed to write(). */
  writes = 0;
  /** Positioned writes made (runs). */
  runs = 0;
  /** Pages read back from the file (not from the run being gathered). */
  reads = 0;
  /** The run being gathered: its bytes, file position and length. */
  private readonly run: Buffer;
  private runPos = 0;
  private runLen = 0;
  private fd: number | undefined;

  private constructor(fd: number, readonly dir: string, private readonly pageSize: number) {
    this.fd = fd;
    this.run = Buffer.allocUnsafe(Math.max(pageSize, RUN_BYTES - (RUN_BYTES % pageSize)));
  }

  /** A new, already unlinked file in a private directory under `dir` (see temporaryDirectory). */
  static async create(dir: string, pageSize: number): Promise<PageSpill> {
    let tmp: string;
    try {
      tmp = await mkdtemp(join(dir, 'multifd-spill-'));
    } catch (e) {
      throw new OutputFileError('OUTPUT_FAILED', dir, `cannot create a temporary directory in ${dir} for spilled page copies: ${(e as Error).message} (another directory: --temp-dir or MULTIFD_TMPDIR)`, { cause: e });
    }
    try {
      const fd = openSync(join(tmp, 'pages'), 'wx+', 0o600);
      await rm(tmp, { recursive: true, force: true });
      return new PageSpill(fd, dir, pageSize);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw new OutputFileError('OUTPUT_FAILED', dir, `cannot create a temporary file in ${dir} for spilled page copies: ${(e as Error).message} (another directory: --temp-dir or MULTIFD_TMPDIR)`, { cause: e });
    }
  }

  /** Stores one page (pageSize bytes, copied before this returns). */
  write(position: number, page: Buffer): void {
    this.open();
    if (page.length !== this.pageSize) throw new RangeError(`a page of ${page.length} bytes (pages are ${this.pageSize})`);
    if (this.runLen > 0 && (this.runPos + this.runLen !== position || this.runLen === this.run.length)) this.flush();
    if (this.runLen === 0) this.runPos = position;
    page.copy(this.run, this.runLen);
    this.runLen += this.pageSize;
    this.writes++;
  }

  /** The page as last written, into `into` (pageSize bytes). */
  read(position: number, into: Buffer): Buffer {
    const fd = this.open();
    if (position >= this.runPos && position < this.runPos + this.runLen) {
      const at = position - this.runPos;
      this.run.copy(into, 0, at, at + this.pageSize);
      return into;
    }
    this.reads++;
    let done = 0;
    while (done < this.pageSize) {
      let n: number;
      try {
        n = readSync(fd, into, done, this.pageSize - done, position + done);
      } catch (e) {
        throw new OutputFileError('OUTPUT_FAILED', this.dir, `read of a spilled page copy at offset ${position + done} of a temporary file in ${this.dir} failed: ${(e as Error).message}`, { cause: e });
      }
      // Every position read was written: a short file means it was not (a caller bug) or changed under us.
      if (n === 0) throw new ProtocolError('TRUNCATED', `the spill file in ${this.dir} ends at 0x${(position + done).toString(16)}, inside a page written to it`, { offset: position + done });
      done += n;
    }
    return into;
  }

  /** Closes (the file is already unlinked: its blocks are freed). */
  close(): void {
    const fd = this.fd;
    this.fd = undefined;
    this.runLen = 0;
    if (fd !== undefined) closeSync(fd);
  }

  get closed(): boolean {
    return this.fd === undefined;
  }

  private open(): number {
    if (this.fd === undefined) throw new Error('the spill file is closed');
    return this.fd;
  }

  /** The run gathered goes to the file. */
  private flush(): void {
    const fd = this.open();
    let done = 0;
    while (done < this.runLen) {
      let n: number;
      try {
        n = writeSync(fd, this.run, done, this.runLen - done, this.runPos + done);
      } catch (e) {
        throw new OutputFileError('OUTPUT_FAILED', this.dir, `write of spilled page copies at offset ${this.runPos + done} of a temporary file in ${this.dir} failed: ${(e as Error).message}`, { cause: e });
      }
      if (n === 0) throw new OutputFileError('OUTPUT_FAILED', this.dir, `write of spilled page copies at offset ${this.runPos + done} of a temporary file in ${this.dir} made no progress`);
      done += n;
    }
    this.runs++;
    this.runLen = 0;
  }
}
