// The library API. Conversations (receive, save, send, restore, relay) are the high-level entry points; the codec and
// engine are exported for tools that work with migration streams and files directly.

export { receive, ReceiveHandle } from './conversations/receive.js';
export type { ReceiveOptions, ReceiveProgress, ReceiveSummary } from './conversations/receive.js';
export type { SyncMode } from './codec/sync-points.js';
export { ConversationHandle, ListeningHandle } from './conversations/handle.js';
export { save, SaveHandle } from './conversations/save.js';
export type { SaveOptions, SaveProgress, SaveSummary, SaveEvents } from './conversations/save.js';
export { send, SendHandle } from './conversations/send.js';
export type { SendOptions, SendProgress, SendSummary, SendEvents, PostcopyOptions, PostcopySummary } from './conversations/send.js';
export { PostcopyPages } from './engine/postcopy-pages.js';
export type { PostcopyPageStats } from './engine/postcopy-pages.js';
export { restore, RestoreHandle } from './conversations/restore.js';
export type { RestoreOptions, RestoreProgress, RestoreSummary, RestoreEvents } from './conversations/restore.js';
export { relay, RelayHandle } from './conversations/relay.js';
export type { RelayOptions, RelayProgress, RelaySummary } from './conversations/relay.js';
export { inspect } from './conversations/inspect.js';
export type { InspectOptions, InspectResult, InspectBlock, InspectSection, InspectDevice } from './conversations/inspect.js';
export { verify } from './conversations/verify.js';
export type { VerifyResult } from './conversations/verify.js';
export { convert } from './conversations/convert.js';
export type { ConvertOptions, ConvertProgress, ConvertSummary, FileFormat } from './conversations/convert.js';
export { saveLibvirtImage } from './conversations/save-libvirt.js';
export type { SaveLibvirtOptions, SaveLibvirtSummary } from './conversations/save-libvirt.js';
export type { ConvertTarget } from './conversations/convert.js';
export { decodeLibvirtImage, encodeLibvirtImage, LIBVIRT_FORMATS } from './codec/libvirt-image.js';
export type { LibvirtFormat, LibvirtImage } from './codec/libvirt-image.js';
export { extract, blockFileName } from './conversations/extract.js';
export type { ExtractOptions, ExtractProgress, ExtractSummary } from './conversations/extract.js';
export { scanFile } from './conversations/file-layout.js';
export type { FileLayout, Problem, BlockLayout, DeviceRecord } from './conversations/file-layout.js';

export { MappedRamSnapshot } from './engine/mapped-ram-reader.js';
export { StreamSnapshot } from './engine/stream-snapshot.js';
export { openSnapshot, snapshotFormat } from './engine/open-snapshot.js';
export type { SnapshotSource, SnapshotBlockInfo } from './engine/snapshot.js';
export { MultifdSender } from './engine/multifd-sender.js';
export type { MultifdSenderOptions, PageBatch, PageLoader, SendChannel, SendChannelStats } from './engine/multifd-sender.js';
export { MemoryPages } from './engine/memory-pages.js';
export { MappedRamWriter } from './engine/mapped-ram-writer.js';
export { MultifdReceiver } from './engine/multifd-receiver.js';
export type { PageStore, RamBlock } from './engine/page-store.js';
export { SyncBarrier } from './engine/sync-barrier.js';

// Every error a caller may branch on, each with a stable `code`.
export {
  MultifdError, ProtocolError, QmpProtocolError, QmpCommandError, QmpConnectionError, AbortedError, InvalidOptionError,
  ConnectError, ListenError, StrayConnectionError, ChannelError, PageRequestError, IdleTimeoutError, StallError, DestinationClosedError,
  PostcopyDestinationLostError, DestinationRefusedError, DestinationError, SourceError, PostcopyFailedError, OutputFileError,
} from './codec/errors.js';
export type { MultifdErrorCode, ProtocolErrorCode, QmpProtocolErrorCode, OutputFileErrorCode, PageRequestProblem } from './codec/errors.js';
export { DIAGNOSTICS, channelName, declaredChannels } from './engine/diagnostics.js';
export type { ChannelSpec, DiagnosticsGroup, DiagnosticsEvent } from './engine/diagnostics.js';
export { MainStreamParser } from './codec/main-stream-parser.js';
export type { MainEvent, RamBlockInfo } from './codec/main-stream-parser.js';
export { decodeDeviceFields, structToJson, structToLines } from './codec/device-fields.js';
export type { DecodedValue, DecodedStruct, DecodedField, DecodedSubsection, DecodedDevice } from './codec/device-fields.js';
export { parseVmdesc } from './codec/vmdesc.js';
export type { Vmdesc, VmdescDevice, VmdescField, VmdescStruct } from './codec/vmdesc.js';
export { MultifdChannelParser } from './codec/multifd-channel-parser.js';
export * from './codec/constants.js';
export { QmpClient } from './transports/qmp-client.js';
// Snapshots in object storage (docs/s3.md); importing this registers the s3:// scheme.
export { configureObjectStore, openObjectSnapshot, uploadPackedSnapshot, isObjectUrl, ObjectStoreError } from './conversations/object-store.js';
export type { ObjectStoreSettings, UploadReport } from './conversations/object-store.js';
