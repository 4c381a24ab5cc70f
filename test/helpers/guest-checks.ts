// The checks every interop test makes on the dirtying test guest after a restore: its memory
// invariant holds, and it runs on from there (more passes, the invariant still holding).

import assert from 'node:assert/strict';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant } from '../guest/bootsector.js';
import { countPasses, dumpGuestMemory, waitGuestPasses, type QemuInstance } from './qemu.js';

/** The dirtied range of `q`'s memory, checked against the guest's invariant. */
export async function checkInvariant(q: QemuInstance, what: string): Promise<Buffer> {
  const mem = await dumpGuestMemory(q, GUEST_DIRTY_START, GUEST_DIRTY_END - GUEST_DIRTY_START);
  const inv = checkDirtyInvariant(mem);
  assert.ok(inv.ok, `${what}: ${inv.reason}`);
  return mem;
}

/** The guest goes on running from what was restored: more passes, invariant still holds. */
export async function runsOn(q: QemuInstance, restored: Buffer): Promise<void> {
  const passes = countPasses(q.serialLog());
  const st = await q.qmp.execute('query-status');
  if (st.status !== 'running') await q.qmp.execute('cont');
  await waitGuestPasses(q, passes + 2);
  await q.qmp.execute('stop');
  const later = await checkInvariant(q, 'after running on');
  assert.ok(!later.equals(restored), 'the guest ran on after the restore');
}
