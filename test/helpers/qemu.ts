// The QEMU launcher is product code (demo uses it); tests import it from here.
export * from '../../src/demo/qemu.js';

import type { QemuInstance } from '../../src/demo/qemu.js';

/**
 * The guest's run state once it is `want`, or whatever it is after timeoutMs. QEMU reports a
 * migration "failed" before its cleanup restarts the guest, so a source that failed in the
 * switchover is still in finish-migrate for a moment after query-migrate said so.
 */
export async function runStateSoon(q: QemuInstance, want: string, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = (await q.qmp.execute('query-status')).status as string;
    if (status === want || Date.now() > deadline) return status;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}
