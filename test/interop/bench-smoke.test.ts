// Keeps `npm run bench` working: the quick run must finish and report every job against its QEMU
// counterpart. No timing is asserted (benchmarks are not timed tests).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { haveQemu } from '../helpers/qemu.js';

const RUN = fileURLToPath(new URL('../../bench/run.js', import.meta.url));
const RESULT = fileURLToPath(new URL('../../../bench/results/quick.json', import.meta.url));

test('bench --quick runs every pair against QEMU', { skip: haveQemu('10') ? false : 'QEMU 10 not installed', timeout: 300_000 }, async () => {
  const code = await new Promise<number>((resolve) => {
    execFile(process.execPath, [RUN, '--quick'], { timeout: 280_000 }, (err) => resolve(err ? (typeof err.code === 'number' ? err.code : 1) : 0));
  });
  assert.equal(code, 0, 'bench exits 0');
  const r = JSON.parse(readFileSync(RESULT, 'utf8')) as { rows: { pair: string; impl: string; result: { ms: number; rssMiB?: number } }[] };
  const seen = new Set(r.rows.map((x) => `${x.pair}/${x.impl}`));
  for (const k of ['receive/ours', 'receive/qemu→qemu', 'send/ours', 'save/ours', 'save/qemu file', 'restore/ours', 'restore/qemu file', 'relay/ours', 'relay/qemu→qemu', 'receive/disk', 'save/disk', 'send/disk', 'restore/disk']) assert.ok(seen.has(k), `${k} measured`);
  assert.ok(r.rows.every((x) => x.result.ms > 0));
  assert.ok(r.rows.filter((x) => x.impl === 'ours').every((x) => (x.result.rssMiB ?? 0) > 0), 'peak RSS recorded for our runs');
});
