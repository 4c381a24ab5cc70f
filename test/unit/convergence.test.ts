// The "not converging" verdict of a live save, from query-migrate samples as QEMU reports them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConvergenceWatch, type MigrateSample } from '../../src/conversations/convergence.js';
import { checkBackgroundOptions } from '../../src/conversations/save.js';
import { notConvergingText } from '../../src/cli/format.js';

const active = (rounds: number, expected: number | undefined, extra: MigrateSample['ram'] = {}): MigrateSample => ({
  status: 'active',
  ...(expected !== undefined ? { 'expected-downtime': expected } : {}),
  ram: { 'dirty-sync-count': rounds, ...extra },
});

test('no verdict before enough rounds and time in active, then one, once', () => {
  const w = new ConvergenceWatch({ downtimeLimitMs: 300, minRounds: 5, minActiveMs: 10_000 });
  assert.equal(w.sample({ status: 'setup' }, 0), undefined);
  assert.equal(w.activeMs(500), 0, 'not active yet');
  assert.equal(w.sample(active(1, 9000), 1000), undefined, 'first round: the whole guest goes out');
  assert.equal(w.sample(active(9, 9000), 10_999), undefined, 'rounds enough, but under 10 s in active');
  assert.equal(w.sample(active(4, 9000), 12_000), undefined, 'time enough, but under 5 rounds');
  const v = w.sample(active(6, 9000, { remaining: 123, 'dirty-pages-rate': 4000, mbps: 800.5 }), 12_000);
  assert.deepEqual(v, { 'active-ms': 11_000, rounds: 6, 'expected-downtime': 9000, 'downtime-limit': 300, 'remaining-bytes': 123, 'dirty-pages-rate': 4000, mbps: 800.5 });
  assert.equal(w.sample(active(7, 9000), 13_000), undefined, 'said once');
  assert.equal(w.activeMs(13_000), 12_000);
});

test('a migration that expects to fit its limit is converging, whatever the rounds', () => {
  const w = new ConvergenceWatch({ downtimeLimitMs: 300 });
  w.sample(active(1, 300), 0);
  assert.equal(w.sample(active(50, 300), 60_000), undefined, 'expected == limit fits');
  assert.equal(w.sample(active(50, undefined), 60_000), undefined, 'no estimate yet: no verdict');
  assert.equal(w.sample({ ...active(50, 5000), status: 'device' }, 61_000), undefined, 'switching over already');
  assert.ok(w.sample(active(51, 301), 62_000), 'one millisecond over the limit is a verdict');
});

test('the warning names the numbers, and the compressed-bandwidth cause when compression is on', () => {
  const n = { 'active-ms': 31_000, rounds: 23, 'expected-downtime': 5200, 'downtime-limit': 300, 'dirty-pages-rate': 51200, mbps: 979.6 };
  assert.equal(notConvergingText(n), 'the source is not converging: after 23 rounds in 31.00 s QEMU still expects 5200 ms of downtime against a limit of 300 ms (the guest dirties 51200 pages/s, the link moves 980 Mbit/s)');
  assert.match(notConvergingText(n, 'zstd'), /with zstd QEMU measures the link in compressed bytes/);
  assert.doesNotMatch(notConvergingText(n, 'none'), /compressed/);
});

test('--background refuses --auto-converge and --switchover-after up front', () => {
  assert.throws(() => checkBackgroundOptions({ background: true, autoConverge: true }), { code: 'INVALID_OPTION', message: /--auto-converge/ });
  assert.throws(() => checkBackgroundOptions({ background: true, switchoverAfterMs: 5000 }), { code: 'INVALID_OPTION', message: /--switchover-after/ });
  assert.doesNotThrow(() => checkBackgroundOptions({ autoConverge: true, switchoverAfterMs: 5000 }));
});
