// Up-front checks of the paths a command is given, so that a typo or a folder where a file belongs
// is refused with the path named before anything starts (no QEMU touched, no socket opened),
// instead of surfacing later as a bare ENOENT/EISDIR from deep inside a read or a rename.

import { statSync } from 'node:fs';
import { join } from 'node:path';

export class PathError extends Error {
  constructor(
    readonly code: 'ENOENT' | 'EISDIR' | 'EEXIST' | 'EACCES',
    message: string,
  ) {
    super(message);
    this.name = 'PathError';
  }
}

function statOrUndefined(path: string): ReturnType<typeof statSync> | undefined {
  try {
    return statSync(path);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'ENOENT' || err.code === 'ENOTDIR') return undefined;
    if (err.code === 'EACCES') throw new PathError('EACCES', `${path}: permission denied (EACCES)`);
    throw e;
  }
}

/** A file to read: it must exist and not be a directory. */
export function checkInputFile(path: string): void {
  const st = statOrUndefined(path);
  if (!st) throw new PathError('ENOENT', `${path}: no such file (ENOENT)`);
  if (st.isDirectory()) throw new PathError('EISDIR', `${path} is a directory, not a migration file (EISDIR)`);
}

/**
 * A file to write (`flag` names the option, e.g. --out): a directory there is refused, and so is
 * an existing file when `refuseExisting` is set (without --force). A missing parent folder is left
 * to the command, which reports it in its own words.
 */
export function checkOutputFile(path: string, flag: string, opts: { refuseExisting?: boolean } = {}): void {
  const st = statOrUndefined(path);
  if (!st) return;
  if (st.isDirectory()) throw new PathError('EISDIR', `${flag} ${path} is a directory; give the file to write, e.g. ${flag} ${join(path, 'vm.mig')}`);
  if (opts.refuseExisting) throw new PathError('EEXIST', `${flag} ${path} already exists; pass --force to replace it`);
}
