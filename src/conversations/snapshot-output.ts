// A mapped-ram snapshot built from a live migration's main stream as it passes (receive writes
// one; relay's --tee too): the head once the block list is known, the setup section's close, and
// from the switchover on the device state byte for byte. Pages go through `store`.

import { Command, SectionType } from '../codec/constants.js';
import { encodeConfiguration, withCapability, type Configuration } from '../codec/configuration.js';
import type { RamBlockInfo } from '../codec/main-stream-parser.js';
import { encodeCommand, encodeEos, encodeFooter, encodeMemSize, encodeSectionFull, encodeSectionShort, encodeStreamHeader } from '../codec/stream-encode.js';
import { packetSlotsFor } from '../engine/aligned-slots.js';
import { MappedRamWriter } from '../engine/mapped-ram-writer.js';

export class SnapshotOutput {
  private headDone = false;
  private preludeDone = false;

  private constructor(readonly store: MappedRamWriter) {}

  /** `channels`: multifd channels that will feed it (sizes the O_DIRECT staging slots). */
  static async create(path: string, opts: { directIo?: boolean; channels?: number } = {}): Promise<SnapshotOutput> {
    return new SnapshotOutput(
      await MappedRamWriter.create(path, {
        ...(opts.directIo === undefined ? {} : { directIo: opts.directIo }),
        slots: packetSlotsFor(opts.channels ?? 0),
      }),
    );
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
      await this.store.appendStream(prelude);
    }
    await this.store.appendStream(data as Buffer[]);
  }

  commit(): Promise<void> {
    return this.store.commit();
  }

  abort(): Promise<void> {
    return this.store.abort();
  }
}
