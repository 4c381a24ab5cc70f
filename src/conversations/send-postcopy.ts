// send with postcopy (docs/protocol.md §6.2, §6.4): pages before the switch within the budget,
// then the switch in QEMU's order — one SYNC per multifd channel and a RAM PART (FLUSH in round
// mode, EOS), SWITCHOVER_START, discards for every page not sent yet, PING(2), the package
// (LISTEN, device sections, PING(3), PING(0x42), RUN), PING(4) — then every remaining page exactly
// once, requested ones first, and END (EOS, no FLUSH), EOF. No VMDESCRIPTION: QEMU's postcopy
// destination stops reading at EOF (its listen thread ends there), and QEMU's postcopy source
// sends none.

import { InvalidOptionError, ProtocolError } from '../codec/errors.js';
import { isPageSize, MAX_POSTCOPY_HOST_PAGE } from '../codec/ram-page-sizes.js';
import type { Socket } from 'node:net';
import { Command, SectionType, TARGET_PAGE_SIZE } from '../codec/constants.js';
import { encodeDiscards, encodePackagedHeader, encodePostcopyListen, encodePostcopyRun, type PageRecordState } from '../codec/postcopy.js';
import { encodeCommand, encodeEos, encodeFooter, encodeMultifdFlush, encodePing, encodeSectionShort } from '../codec/stream-encode.js';
import { publish } from '../engine/diagnostics.js';
import type { MultifdSender } from '../engine/multifd-sender.js';
import { PostcopyPages } from '../engine/postcopy-pages.js';
import type { SnapshotSource } from '../engine/snapshot.js';
import type { OutboundSide } from './outbound-side.js';
import { PostcopyPhase } from './postcopy-phase.js';
import type { PageSender } from './send-pages.js';
import { PING_CONFIG, PING_DEVICES, PING_DISCARDED, PING_LISTENING, PING_PACKAGE_LOADED } from './send-stages.js';
import type { PostcopyOptions, PostcopySummary, SendProgress } from './send-types.js';


export interface PostcopySendContext {
  source: SnapshotSource;
  out: OutboundSide;
  multifd: MultifdSender | undefined;
  pageSender: PageSender;
  mainRecords: PageRecordState;
  startedAt: number;
  syncMode: 'round' | 'section' | 'none';
  writeMain(bufs: Buffer[]): Promise<void>;
  failed: Promise<never>;
  /** Called as the send goes on: the phase, LISTEN out (page requests legal), RUN out (the guest may run). */
  setPhase(p: SendProgress['phase']): void;
  listenSent(pages: PostcopyPages): void;
  running(): void;
  switched(precopyPages: number, elapsedMs: number): void;
  /** The phase after the switch started (its stats feed progress). */
  phaseStarted(phase: PostcopyPhase): void;
  /** Pages the whole send covers (progress's pagesTotal). */
  pagesTotal: number;
  /** The destination's page size of blocks whose pages are not 4 KiB (destinationPageSizes). */
  pageSizes: ReadonlyMap<string, number>;
}

export interface PostcopySendResult {
  perBlock: Map<string, number>;
  summary: PostcopySummary;
}

/**
 * The destination's page size per block from `pageSizes`, checked against the snapshot before
 * anything is sent: a block the snapshot lacks, a size that is no page size or that does not
 * divide the block (QEMU's hugetlbfs blocks are whole pages) is an InvalidOptionError. Blocks with
 * 4 KiB pages are left out.
 */
export function destinationPageSizes(src: Pick<SnapshotSource, 'blockList'>, pageSizes: Record<string, number> | undefined): Map<string, number> {
  const out = new Map<string, number>();
  for (const [name, size] of Object.entries(pageSizes ?? {})) {
    const b = src.blockList.find((x) => x.name === name);
    if (!b) throw new InvalidOptionError(`page size given for RAM block "${name}", which the snapshot does not have (it has ${src.blockList.map((x) => `"${x.name}"`).join(', ')})`);
    if (!isPageSize(size)) throw new InvalidOptionError(`page size ${size} for RAM block "${name}" is not a power of two of at least ${TARGET_PAGE_SIZE}`);
    if (size > MAX_POSTCOPY_HOST_PAGE) throw new InvalidOptionError(`page size ${size} for RAM block "${name}": postcopy sends whole host pages and supports them up to ${MAX_POSTCOPY_HOST_PAGE} bytes`);
    if (b.usedLength % size !== 0) throw new InvalidOptionError(`RAM block "${name}" (used_length 0x${b.usedLength.toString(16)}) is not a whole number of ${size}-byte pages: the destination cannot have that page size for it`);
    if (size !== TARGET_PAGE_SIZE) out.set(name, size);
  }
  return out;
}

export async function sendPostcopy(c: PostcopySendContext, pc: PostcopyOptions): Promise<PostcopySendResult> {
  const src = c.source;
  if (src.iterableSections) throw new ProtocolError('UNSUPPORTED', 'the snapshot holds dirty-bitmap sections, which send replays only without postcopy');
  const sid = src.ramSection.sectionId;
  const pages = new PostcopyPages(src, { pageSizes: c.pageSizes });
  c.pageSender.pages = pages;

  // Pages before the switch: in file order, within the budget. QEMU places them as in precopy.
  const budgetBytes = pc.precopyBytes ?? 0;
  const deadline = pc.precopyMs !== undefined ? c.startedAt + pc.precopyMs : undefined;
  const perBlock = budgetBytes > 0 || (pc.precopyMs ?? 0) > 0
    ? await c.pageSender.sendAll({ bytes: budgetBytes > 0 ? budgetBytes : Infinity, ...(deadline !== undefined ? { deadline } : {}) })
    : new Map<string, number>();
  // A host page only part of which went before the switch is discarded and sent again whole:
  // the destination discards and places host pages, never parts of one.
  pages.alignToHostPages();
  // Pages the destination has for good (without multifd, all-zero pages are left to postcopy).
  const precopyPages = c.pagesTotal - pages.unsent;
  const switchTime = Date.now() - c.startedAt;
  publish('send', 'postcopy-switch', { precopyPages });
  c.switched(precopyPages, switchTime);

  // The preempt channel connects first (QEMU's source does so before its multifd sync): the
  // destination takes the connection after main and every multifd channel as preempt.
  let preempt: Socket | undefined;
  if (pc.preempt) {
    // Only once the destination answered PING(1), as QEMU's source does: then it has accepted
    // main and every multifd channel, so this connection is the one after them. Earlier, it can
    // find the listen backlog (sized for the multifd channels) full: EAGAIN on a unix socket.
    await c.out.pongArrived(PING_CONFIG);
    preempt = await c.out.connect('preempt channel');
  }

  // Finish multifd: every page before the barrier, which the destination passes before LISTEN
  // (multifd writes pages non-atomically). Afterwards the channels stay open but idle.
  if (c.multifd) await c.multifd.sync();
  const ranges = src.blockList.map((b) => ({ block: b.name, ranges: pages.unsentRanges(b.name) }));
  const ds = src.deviceState;
  const devicesLength = ds.eofOffset;
  const packageLength = 5 + devicesLength + 9 + 9 + 5;
  await c.writeMain([
    encodeSectionShort(SectionType.PART, sid),
    ...(c.syncMode === 'round' ? [encodeMultifdFlush()] : []),
    encodeEos(),
    encodeFooter(sid),
    ...(src.switchoverStart ? [encodeCommand(Command.SWITCHOVER_START)] : []),
    ...ranges.flatMap((r) => encodeDiscards(r.block, r.ranges)),
    encodePing(PING_DISCARDED),
    encodePackagedHeader(packageLength),
    encodePostcopyListen(),
  ]);
  c.listenSent(pages);
  c.setPhase('device-state');
  // The device sections, without EOF and VMDESCRIPTION (the package is a stream without header).
  await c.pageSender.forward(ds.fileOffset, devicesLength);
  await c.writeMain([encodePing(PING_DEVICES), encodePing(PING_PACKAGE_LOADED), encodePostcopyRun(), encodePing(PING_LISTENING)]);
  // From RUN on the destination's guest may run: a failure from here loses it.
  c.running();
  const packageTime = Date.now() - c.startedAt;
  c.setPhase('postcopy');
  publish('send', 'postcopy-package', { bytes: packageLength });

  // Every page not sent yet, exactly once; the main channel's next record names its block.
  c.mainRecords.lastBlock = undefined;
  const out = c.out;
  const phase = new PostcopyPhase({
    source: src,
    pages,
    mainRecords: c.mainRecords,
    writeMain: (bufs) => c.writeMain(bufs),
    ...(preempt ? { writePreempt: (bufs: Buffer[]) => out.write(preempt, bufs) } : {}),
    ...(pc.bandwidth !== undefined ? { bandwidth: pc.bandwidth } : {}),
    ...(pc.batchPages !== undefined ? { batchPages: pc.batchPages } : {}),
    failed: c.failed,
    backgroundAfter: c.out.pongArrived(PING_DEVICES),
  });
  c.phaseStarted(phase);
  await phase.run();
  const pagesTime = Date.now() - c.startedAt;
  await c.writeMain([encodeSectionShort(SectionType.END, sid), encodeEos(), encodeFooter(sid), Buffer.from([SectionType.EOF])]);
  publish('send', 'postcopy-pages-done', { stats: phase.stats, pages: pages.stats });

  for (const b of src.blockList) perBlock.set(b.name, Math.ceil(b.usedLength / TARGET_PAGE_SIZE));
  const summary: PostcopySummary = {
    preempt: preempt !== undefined,
    'precopy-pages': precopyPages,
    'postcopy-pages': phase.stats.normal + phase.stats.zero,
    'discard-ranges': ranges.reduce((n, r) => n + r.ranges.length, 0),
    'switch-time': switchTime,
    'package-time': packageTime,
    'pages-time': pagesTime,
    'complete-time': 0,
    requests: pages.stats.requests,
    'requested-pages': pages.stats.requestedPages,
    'requests-already-sent': pages.stats.alreadySent,
    'preempt-pages': phase.stats.preemptPages,
    'preempt-bytes': phase.stats.preemptBytes,
    ...(c.pageSizes.size > 0 ? { 'page-sizes': Object.fromEntries(c.pageSizes) } : {}),
  };
  return { perBlock, summary };
}
