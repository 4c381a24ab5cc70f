// The destination's RAM page sizes for `restore --postcopy` (docs/protocol.md §2.2, §6.2): QEMU's
// destination checks the page-size summary in POSTCOPY_ADVISE and reads a page size in the block
// list for each of its blocks whose pages are not the host's, so a source must know them. QEMU
// reports them in `x-query-ramblock` (HMP `info ramblock`, QEMU 6.2+; no stable QMP command
// carries them: query-memdev and the memory backend's QOM properties do not). What the user gave
// (--page-size) must agree with what the destination reports; it is used alone when nothing can be
// learnt.

import { TARGET_PAGE_SIZE } from '../codec/constants.js';
import { DestinationError } from '../codec/errors.js';
import { parseRamblockText } from '../codec/ram-page-sizes.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import type { QmpClient } from '../transports/qmp-client.js';
import { destinationPageSizes } from './send-postcopy.js';

/** The destination's page size per block as QEMU reports it, or why it could not be learnt. */
export async function queryRamblockPageSizes(qmp: Pick<QmpClient, 'execute'>): Promise<{ sizes: Map<string, number> } | { why: string }> {
  let why: string;
  try {
    const r = await qmp.execute('x-query-ramblock');
    const sizes = parseRamblockText(String(r?.['human-readable-text'] ?? ''));
    if (sizes.size > 0) return { sizes };
    why = 'x-query-ramblock listed no RAM block';
  } catch (e) {
    why = `x-query-ramblock: ${(e as Error).message}`;
  }
  try {
    const sizes = parseRamblockText(String(await qmp.execute('human-monitor-command', { 'command-line': 'info ramblock' })));
    if (sizes.size > 0) return { sizes };
  } catch {
    // The first reason is the one to show.
  }
  return { why };
}

/**
 * The page sizes to announce for the snapshot's blocks (4 KiB ones left out), checked up front:
 * a --page-size that contradicts the destination, or a destination page size the snapshot's block
 * cannot have, is an error before the migration starts. `notes` gets what the user should know.
 */
export async function resolveDestinationPageSizes(qmp: Pick<QmpClient, 'execute'>, src: Pick<SnapshotSource, 'blockList'>, told: Record<string, number> | undefined, notes: string[]): Promise<Record<string, number>> {
  // The user's own sizes first: a block the snapshot lacks or an impossible size is their mistake.
  if (told) destinationPageSizes(src, told);
  const learnt = await queryRamblockPageSizes(qmp);
  const out: Record<string, number> = {};
  if ('sizes' in learnt) {
    // Blocks without a memory backend (ROMs) have the host's pages; QEMU lists a page size in the
    // block list only where it differs from those, which we take to be 4 KiB.
    const host = Math.min(...learnt.sizes.values());
    if (host !== TARGET_PAGE_SIZE) throw new DestinationError(`the destination QEMU's smallest RAM page is ${host} bytes: postcopy into a host whose pages are not 4 KiB is not supported`, undefined);
    for (const [name, size] of Object.entries(told ?? {})) {
      const have = learnt.sizes.get(name);
      if (have !== undefined && have !== size) {
        throw new DestinationError(`--page-size ${name}=${size}, but the destination QEMU reports ${have}-byte pages for RAM block "${name}" (x-query-ramblock)`, undefined);
      }
    }
    for (const b of src.blockList) {
      const size = learnt.sizes.get(b.name) ?? told?.[b.name];
      if (size !== undefined && size !== TARGET_PAGE_SIZE) out[b.name] = size;
    }
  } else {
    Object.assign(out, told);
    const named = Object.keys(out).map((n) => `"${n}"`).join(', ');
    notes.push(`could not learn the destination's RAM page sizes (${learnt.why}): ${named
      ? `used --page-size for ${named}, 4 KiB pages for the other blocks`
      : 'assumed 4 KiB pages for every block (give --page-size BLOCK=SIZE for a hugepage-backed one)'}`);
  }
  try {
    destinationPageSizes(src, out);
  } catch (e) {
    throw new DestinationError(`${(e as Error).message}${'sizes' in learnt ? ' (page sizes as the destination QEMU reports them)' : ''}`, undefined);
  }
  return out;
}
