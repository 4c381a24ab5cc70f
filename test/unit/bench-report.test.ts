// The bench's disk floor and how the report turns it into bounds: synthetic rows with known
// medians, so every number in the disk column can be checked by hand.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { diskFloor } from '../../bench/disk-floor.js';
import { hostCpuSince, sampleHostCpu } from '../../bench/host-cpu.js';
import { writeChart, writeMarkdown, type Row } from '../../bench/report.js';

const row = (pair: Row['pair'], impl: Row['impl'], ms: number, rep: number, extra: Partial<Row['result']> = {}): Row => ({
  version: '10', pair, impl, sizeGiB: 1, channels: 2, method: 'none', guestBytes: 768 * 1024 * 1024, rep,
  result: { ms, wireBytes: 0, ...extra },
});

const lineOf = (md: string, job: string): string => {
  const l = md.split('\n').find((x) => x.startsWith(`| ${job} |`));
  assert.ok(l, `a ${job} row`);
  return l;
};

test('the disk column gives the disk time, the ratio it allows and ours against it', () => {
  const rows = [
    ...[1, 2, 3].map((rep) => row('receive', 'qemu→qemu', 300, rep)),
    ...[[800, 1], [900, 2], [1000, 3]].map(([ms, rep]) => row('receive', 'ours', ms!, rep!)),
    ...[[580, 1], [600, 2], [640, 3]].map(([ms, rep]) => row('receive', 'disk', ms!, rep!, { direct: true })),
    ...[1, 2].map((rep) => row('save', 'qemu file', 500, rep)),
    ...[1, 2].map((rep) => row('save', 'ours', 750, rep)),
    ...[1, 2].map((rep) => row('save', 'disk', 600, rep, { direct: false })),
  ];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  const receive = lineOf(md, 'receive').split(' | ');
  // QEMU 300 ÷ disk 600 = 0.50 at best; ours 900 ÷ disk 600 = 1.50.
  assert.equal(receive.at(-1), '600 (580–640), ratio ≤ 0.50, ours ÷ disk 1.50 |');
  const save = lineOf(md, 'save').split(' | ');
  // save's ratio is ours ÷ QEMU: no durable save can go below disk 600 ÷ QEMU 500.
  assert.equal(save.at(-1), '600 (600–600) [buffered], ratio ≥ 1.20, ours ÷ disk 1.25 |');
  assert.match(writeChart(rows), />disk write 1 GiB</);
});

test('rows without disk measurements keep a dash in the disk column', () => {
  const rows = [row('relay', 'qemu→qemu', 300, 1), row('relay', 'ours', 600, 1)];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  assert.ok(lineOf(md, 'relay').endsWith('| – | – |'));
});

test('diskFloor writes, reads back and removes its scratch file', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'disk-floor-'));
  try {
    // 5 MiB: not a whole number of 2 MiB blocks, and fewer blocks than lanes.
    const d = await diskFloor(dir, 5 * 1024 * 1024);
    assert.ok(d.writeMs > 0 && d.readMs > 0, `times ${d.writeMs}, ${d.readMs}`);
    assert.equal(typeof d.direct, 'boolean');
    assert.deepEqual(readdirSync(dir), [], 'nothing left behind');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('diskFloor fails with the reason when the directory is not there', async () => {
  await assert.rejects(diskFloor('/nonexistent-dir-for-disk-floor', 4096), /ENOENT/);
});

test('the background table gives QEMU total time and downtime of save --background and save, and their ratios', () => {
  const rows = [
    ...[[2000, 600, 1], [2400, 800, 2], [2200, 700, 3]].map(([ms, down, rep]) => row('background', 'save', ms!, rep!, { downtimeMs: down!, wireBytes: 500e6 })),
    ...[[3000, 10, 1], [3600, 20, 2], [3300, 14, 3]].map(([ms, down, rep]) => row('background', 'save --background', ms!, rep!, { downtimeMs: down!, wireBytes: 200e6 })),
  ];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  assert.match(md, /## Background snapshot \(save --background\) against save/);
  const line = (job: string): string[] => {
    const l = md.split('\n').find((x) => x.startsWith('| 1 GiB |') && x.includes(` | ${job} | `));
    assert.ok(l, `a ${job} row`);
    return l.split(' | ');
  };
  assert.deepEqual(line('save').slice(1, 7), ['2', 'save', '2200 (2000–2400)', '700 (600–800)', '–', '–']);
  // 3300 ÷ 2200 = 1.50; downtime 14 ÷ 700 = 0.02; the background save uses no multifd channel.
  assert.deepEqual(line('save --background').slice(1, 8), ['0', 'save --background', '3300 (3000–3600)', '14 (10–20)', '1.50', '0.02', '200']);
  assert.equal(md.split('\n').filter((x) => x.startsWith('| background |')).length, 0, 'no row in the main table');
});

test('the relay-0n row: direct ÷ relay against the relay goal, both downtimes, the relay\'s RSS, no slow-mode mark', () => {
  const rows = [
    ...[[4000, 40, 1], [4400, 60, 2], [4200, 50, 3]].map(([ms, down, rep]) => row('relay-0n', 'qemu→qemu', ms!, rep!, { downtimeMs: down!, wireBytes: 900e6 })),
    ...[[5000, 70, 1], [6000, 90, 2], [5600, 80, 3]].map(([ms, down, rep]) => row('relay-0n', 'ours', ms!, rep!, { downtimeMs: down!, wireBytes: 1000e6, rssMiB: 300 - rep! })),
  ];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  const cols = lineOf(md, 'relay-0n').split(' | ');
  // 4200 ÷ 5600 = 0.75, under the relay's 0.8; the QEMU column carries no [slow k/n] mark.
  assert.deepEqual(cols.slice(4, 8), ['5600 (5000–6000)', '4200 (4000–4400)', '0.75 ✗', '≥ 0.8']);
  assert.equal(cols[10], '1000 MB / 900 MB');
  assert.equal(cols[13], '80 / 50');
  assert.equal(cols[14], '299');
  assert.doesNotMatch(lineOf(md, 'relay-0n'), /\[slow/);
  assert.doesNotMatch(writeChart(rows), /relay-0n/);
});

test('the S3 table gives the host CPU of store get and restore s3, and what the restore used beyond the GET', () => {
  const host = (busyMs: number, stealMs: number, capacityMs: number): Partial<Row['result']> => ({ host: { busyMs, stealMs, capacityMs } });
  const rows = [
    ...[[7000, 1, 12000], [8000, 2, 13000], [9000, 3, 14000]].map(([ms, rep, busy]) => row('s3', 'store get', ms!, rep!, { wireBytes: 3_200_000_000, ...host(busy!, 2000, ms! * 2) })),
    ...[[10000, 1, 16000], [9000, 2, 15000], [11000, 3, 17000]].map(([ms, rep, busy]) => row('s3', 'restore s3', ms!, rep!, { ...host(busy!, 2600, ms! * 2) })),
    // The PUT's own object read back: shown, not the restore's floor.
    ...[1, 2, 3].map((rep) => row('s3', 'store get fresh', 5000, rep, { wireBytes: 3_200_000_000 })),
  ];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  // store get: medians 13 000 busy + 2000 steal of 16 000 → 81% + 13%, 15.0 CPU-s.
  assert.match(lineOf(md, '1 GiB | 2 | store get'), /host busy 81% \+ steal 13% \(15\.0 CPU-s\) \|$/);
  // restore s3: 16 000 + 2600 of 20 000 → 80% + 13%; 18.6 − 15.0 = 3.6 CPU-s more; 8000 ÷ 10 000 = 0.80.
  const restore = lineOf(md, '1 GiB | 2 | restore s3');
  assert.match(restore, /\| 0\.80 ✓ \(goal ≥ 0\.8\) \|/);
  assert.match(restore, /host busy 80% \+ steal 13% \(18\.6 CPU-s\); 3\.6 CPU-s more than store get \|$/);
  assert.match(lineOf(md, '1 GiB | 2 | store get fresh'), /^\| 1 GiB \| 2 \| store get fresh \| 5000 \| 640 \| – \|/);
});

test('the S3 table gives store get beside (the GET next to a file restore), and restore s3 against it too', () => {
  const rows = [
    ...[1, 2, 3].map((rep) => row('s3', 'store get', 2000, rep, { wireBytes: 800_000_000 })),
    ...[[2900, 1], [2800, 2], [3000, 3]].map(([ms, rep]) => row('s3', 'restore s3', ms!, rep!)),
    ...[[2600, 1, 3900], [2500, 2, 4100], [2700, 3, 3800]].map(([ms, rep, besideMs]) => row('s3', 'store get beside', ms!, rep!, { wireBytes: 800_000_000, besideMs })),
  ];
  const md = writeMarkdown({ started: 'now', machine: {}, args: {}, rows });
  // 2000 ÷ 2900 = 0.69 against the GET alone; 2600 ÷ 2900 = 0.90 against the GET beside the file restore.
  assert.match(lineOf(md, '1 GiB | 2 | restore s3'), /\| 0\.69 ✗ \(goal ≥ 0\.8\); 0\.90 of store get beside \|/);
  // 800 MB in 2.6 s = 308 MB/s; the file restore beside it: median 3900 ms.
  assert.match(lineOf(md, '1 GiB | 2 | store get beside'), /^\| 1 GiB \| 2 \| store get beside \| 2600 \| 308 \| – \| – \| the file restore beside it took 3900 ms \|$/);
});

test('hostCpuSince measures this host from /proc/stat: busy time grows while we spin', { skip: process.platform !== 'linux' && 'reads /proc/stat' }, () => {
  const a = sampleHostCpu();
  const until = performance.now() + 120;
  while (performance.now() < until) { /* spin: this process is busy for 120 ms */ }
  const h = hostCpuSince(a)!;
  assert.ok(h.busyMs >= 50, `busy ${h.busyMs} ms while spinning 120 ms`);
  assert.ok(h.busyMs + h.stealMs <= h.capacityMs + 20, `busy ${h.busyMs} + steal ${h.stealMs} within capacity ${h.capacityMs}`);
});
