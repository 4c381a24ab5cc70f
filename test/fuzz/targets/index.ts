// Every fuzz target, one per parser (or parser chain), by name.

import type { Target } from '../target.js';
import { multifdChannelTarget, multifdInitTarget, multifdPacketTarget, multifdReceiverTarget, zlibTarget, zstdTarget } from './channel.js';
import { mappedRamFileTarget, mappedRamHeaderTarget, streamFileTarget } from './files.js';
import { qmpTarget, returnPathTarget } from './misc.js';
import { configurationTarget, mainStreamTarget, ramRecordsTarget } from './stream.js';
import { vmdescTarget } from './vmdesc.js';
import { postcopyPackageTarget, preemptTarget } from './postcopy.js';
import { extendedStreamTarget, xbzrleTarget } from './xbzrle.js';

export const TARGETS: readonly Target[] = [
  mainStreamTarget,
  configurationTarget,
  ramRecordsTarget,
  multifdInitTarget,
  multifdPacketTarget,
  multifdChannelTarget,
  multifdReceiverTarget,
  zlibTarget,
  zstdTarget,
  mappedRamHeaderTarget,
  mappedRamFileTarget,
  streamFileTarget,
  vmdescTarget,
  returnPathTarget,
  qmpTarget,
  postcopyPackageTarget,
  preemptTarget,
  xbzrleTarget,
  extendedStreamTarget,
];

export function targetByName(name: string): Target {
  const t = TARGETS.find((x) => x.name === name);
  if (!t) throw new Error(`no fuzz target "${name}" (targets: ${TARGETS.map((x) => x.name).join(', ')})`);
  return t;
}
