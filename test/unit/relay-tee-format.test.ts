// relay --tee s3://…: the CLI's progress line and text summary carry the tee's upload, as
// save's and receive's do (docs/s3.md); a local tee shows neither.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { relaySample, uploadSample } from '../../src/cli/progress.js';
import { relaySummaryText } from '../../src/cli/format.js';
import type { RelayProgress, RelaySummary } from '../../src/conversations/relay.js';
import type { UploadProgress, UploadReport } from '../../src/conversations/object-store.js';

const MiB = 1024 * 1024;

const progress: RelayProgress = {
  phase: 'ram', elapsedMs: 2000, bytesIn: 64 * MiB, bytesOut: 60 * MiB, normal: 15000, duplicate: 17000, rounds: 3, channelsIn: 2, channelsOut: 4, ramTotal: 128 * MiB,
};
const upload: UploadProgress = { sent: 16 * MiB, total: 40 * MiB, stored: 8 * MiB, requests: 4, retries: 1, parts: 2, elapsedMs: 300 };

const summary: RelaySummary = {
  status: 'completed', from: 'tcp:127.0.0.1:4444', to: 'tcp:127.0.0.1:5555', machine: 'pc-q35-10.0', 'total-time': 3000, 'bytes-in': 70 * MiB, 'bytes-out': 66 * MiB,
  normal: 16000, 'normal-bytes': 16000 * 4096, duplicate: 17000, mbps: 195.7, 'multifd-syncs': 4, 'sync-mode': 'round', 'compression-in': 'none', 'compression-out': 'none',
  'passed-encoded': 0, 'return-path': true, destination: 'confirmed', 'device-state-bytes': 90000,
  tee: { file: 's3://snapshots/vm1.mig', 'file-size': 134 * MiB, 'commit-time': 900, 'direct-io': true },
  'channels-in': [], 'channels-out': [],
};
const report: UploadReport = {
  url: 's3://snapshots/vm1.mig', 'object-size': 40 * MiB, 'file-size': 134 * MiB, 'present-pages': 10240, parts: 3, 'part-size': 16 * MiB, requests: 6, retries: 0,
  'bytes-uploaded': 40 * MiB, 'upload-ms': 700, 'local-durable-at': '2026-12-07T19:10:00.100Z', 'store-durable-at': '2026-12-07T19:10:00.800Z', 'upload-bytes-per-s': 59918940,
};

describe('relay --tee s3://…: progress and summary', () => {
  test('the progress line shows the migration, then the tee\'s upload once there is one', () => {
    const p = relaySample(progress);
    assert.equal(p.phase, 'ram');
    assert.equal(p.transferred, 64 * MiB);
    assert.equal(p.totalPages, 32768);
    assert.match(p.detail, /2 → 4 channels/);
    assert.equal(p.byBytes, undefined);

    const u = relaySample({ ...progress, phase: 'committing', upload });
    assert.deepEqual(u, uploadSample(upload));
    assert.equal(u.phase, 'uploading');
    assert.equal(u.transferred, 8 * MiB, 'bytes the store accepted');
    assert.equal(u.totalPages, 40 * MiB / 4096, 'the bar runs to the object\'s size');
    assert.equal(u.byBytes, true);
    assert.match(u.detail, /8\.0 MiB of 40\.0 MiB in the store \| part 2 begun, 4 requests, 1 retries/);
  });

  test('the text summary names the object and when it was durable locally and in the store', () => {
    const text = relaySummaryText({ ...summary, store: report });
    assert.match(text, /^ {2}tee: s3:\/\/snapshots\/vm1\.mig \(134\.0 MiB apparent size as staged, 900 ms to make it durable and upload it\)$/m);
    assert.match(text, /^ {2}store: s3:\/\/snapshots\/vm1\.mig, a 40\.0 MiB object in 3 parts uploaded in 700 ms \(6 requests, 0 retries\); durable locally at 2026-12-07T19:10:00\.100Z, in the store at 2026-12-07T19:10:00\.800Z$/m);
  });

  test('a local tee: no store line, the tee line as before', () => {
    const text = relaySummaryText({ ...summary, tee: { ...summary.tee!, file: '/var/tmp/tee.mig' } });
    assert.match(text, /^ {2}tee: \/var\/tmp\/tee\.mig \(134\.0 MiB apparent size, 900 ms to make it durable\)$/m);
    assert.doesNotMatch(text, /store:/);
  });
});
