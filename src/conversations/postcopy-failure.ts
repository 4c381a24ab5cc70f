// What a failure after the switch to postcopy means, said where it happens. Before the switch the
// source still holds the whole guest and runs on; after it, the guest's state is split: the
// destination ran (or would run) the vCPUs with some pages, the source holds the rest. As with
// QEMU → QEMU postcopy, losing either side loses the guest (QEMU's postcopy recovery can only
// resume into a QEMU destination).

const CONSEQUENCE = {
  receive: 'the snapshot was not written; the source QEMU, if alive, stays paused (postcopy-paused) and cannot resume its guest by itself — only QEMU\'s postcopy recovery (migrate-recover on a new QEMU destination, migrate resume=true) can bring it back',
  relay: 'the guest is lost: its vCPUs ran on the destination from the switch on while pages were still on the source; the source QEMU, if alive, stays paused (postcopy-paused) — QEMU\'s postcopy recovery straight to a new QEMU destination is the only way back',
} as const;

export class PostcopyFailedError extends Error {
  override readonly name = 'PostcopyFailedError';
  readonly code: string | undefined;

  constructor(override readonly cause: Error, readonly where: keyof typeof CONSEQUENCE) {
    super(`${cause.message} — after the switch to postcopy: ${CONSEQUENCE[where]}`);
    this.code = (cause as { code?: string }).code;
  }
}
