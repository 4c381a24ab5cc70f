// Which main-channel records are multifd sync points (docs/protocol.md §2.6): every MULTIFD_FLUSH in
// per-round mode; every RAM EOS in per-section mode. The mode is the source's machine property,
// not in the stream, but the setup section gives it away: per-round mode always puts a FLUSH
// before the START section's EOS, per-section mode never writes a FLUSH.

export type SyncMode = 'round' | 'section';

export class SyncPoints {
  private sawSetupFlush = false;

  /** `mode` undefined infers it from the setup section. */
  constructor(private current: SyncMode | undefined = undefined) {}

  get mode(): SyncMode | undefined {
    return this.current;
  }

  /** A MULTIFD_FLUSH: a sync point in either mode (per-section sources never send one). */
  flush(inSetupSection: boolean): true {
    if (inSetupSection) this.sawSetupFlush = true;
    return true;
  }

  /**
   * A RAM EOS: returns whether it is a sync point. The setup section's EOS decides an inferred
   * mode; `decided` is set when this call decided it.
   */
  eos(inSetupSection: boolean): { sync: boolean; decided?: SyncMode } {
    let decided: SyncMode | undefined;
    if (inSetupSection && this.current === undefined) {
      this.current = decided = this.sawSetupFlush ? 'round' : 'section';
    }
    return { sync: this.current === 'section', ...(decided ? { decided } : {}) };
  }
}
