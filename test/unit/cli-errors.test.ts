// The errors a newcomer meets first (issue 21): a wrong path is named with what is wrong, up front,
// before any QEMU (here: a QMP socket that records whether anyone connected) or socket is touched;
// a snapshot is not replaced without --force; an explicit --qemu must exist; the progress rate.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { once } from 'node:events';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { RateMeter } from '../../src/cli/progress.js';
import { ZSTD_SKIP } from '../helpers/zstd.js';

const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
const dir = mkdtempSync('/tmp/multifd-cli-errors-');
after(() => rmSync(dir, { recursive: true, force: true }));

function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [BIN, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (c: Buffer) => (stdout += c));
    p.stderr.on('data', (c: Buffer) => (stderr += c));
    const timer = setTimeout(() => p.kill('SIGKILL'), 20_000);
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** A unix socket standing in for a VM's QMP: counts connections (a real QMP would greet). */
async function fakeQmp(): Promise<{ address: string; connections: () => number; server: Server }> {
  const path = join(dir, `qmp-${Math.random().toString(16).slice(2)}.sock`);
  let n = 0;
  const server = createServer((s) => {
    n++;
    s.destroy();
  });
  server.listen(path);
  await once(server, 'listening');
  return { address: `unix:${path}`, connections: () => n, server };
}

const missing = join(dir, 'no-such.mig');
const aFile = join(dir, 'existing.mig');
writeFileSync(aFile, 'not a snapshot, but a file that exists');
const aDir = join(dir, 'folder');
mkdirSync(aDir);

describe('input files: a missing file or a directory is named, with the problem', () => {
  for (const cmd of [['inspect'], ['verify'], ['convert', '--to', 'stream'], ['extract', '--out', join(dir, 'x')]] as const) {
    test(`${cmd[0]}: missing file, then a directory`, async () => {
      const withOut = (f: string): string[] => (cmd[0] === 'convert' ? ['convert', f, join(dir, 'conv.mig'), ...cmd.slice(1)] : [cmd[0], f, ...cmd.slice(1)]);
      const r1 = await cli(withOut(missing));
      assert.equal(r1.code, 1);
      assert.equal(r1.stderr, `multifd: error: ${missing}: no such file (ENOENT)\n`);
      const r2 = await cli(withOut(aDir));
      assert.equal(r2.code, 1);
      assert.equal(r2.stderr, `multifd: error: ${aDir} is a directory, not a migration file (EISDIR)\n`);
    });
  }

  test('send and restore: the file is checked before connecting anywhere', async () => {
    const q = await fakeQmp();
    try {
      const r1 = await cli(['restore', missing, '--qmp', q.address]);
      assert.equal(r1.code, 1);
      assert.match(r1.stderr, new RegExp(`${missing}: no such file`));
      const r2 = await cli(['restore', aDir, '--qmp', q.address]);
      assert.match(r2.stderr, new RegExp(`${aDir} is a directory, not a migration file`));
      assert.equal(q.connections(), 0, 'QMP was never contacted');
      const r3 = await cli(['send', aDir, '--to', 'tcp:127.0.0.1:1']);
      assert.equal(r3.code, 1);
      assert.match(r3.stderr, new RegExp(`${aDir} is a directory, not a migration file`));
    } finally {
      q.server.close();
    }
  });
});

test('restore/send --page-size: only with --postcopy, and only as BLOCK=SIZE, refused before QMP or the destination is contacted', async () => {
  const q = await fakeQmp();
  const file = join(dir, 'page-size.mig');
  writeFileSync(file, 'not read: the options are refused first');
  try {
    const r1 = await cli(['restore', file, '--qmp', q.address, '--page-size', 'pc.ram=2M']);
    assert.equal(r1.code, 1);
    assert.match(r1.stderr, /--page-size is for postcopy: give --postcopy too/);
    const r2 = await cli(['send', file, '--to', 'tcp:127.0.0.1:1', '--postcopy', '--page-size', 'pc.ram']);
    assert.notEqual(r2.code, 0);
    assert.match(r2.stderr, /expected BLOCK=SIZE/);
    assert.equal(q.connections(), 0, 'QMP was never contacted');
  } finally {
    q.server.close();
  }
});

describe('output files: refused up front', () => {
  test('save --out DIR: refused before the VM is touched', async () => {
    const q = await fakeQmp();
    try {
      const r = await cli(['save', '--qmp', q.address, '--out', aDir]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `multifd: error: --out ${aDir} is a directory; give the file to write, e.g. --out ${join(aDir, 'vm.mig')}\n`);
      assert.equal(q.connections(), 0, 'QMP was never contacted');
    } finally {
      q.server.close();
    }
  });

  test('save --out EXISTING: refused without --force, before the VM is touched; --force goes on to QMP', async () => {
    const q = await fakeQmp();
    try {
      const r = await cli(['save', '--qmp', q.address, '--out', aFile]);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `multifd: error: --out ${aFile} already exists; pass --force to replace it\n`);
      assert.equal(q.connections(), 0, 'QMP was never contacted');
      const forced = await cli(['save', '--qmp', q.address, '--out', aFile, '--force']);
      assert.equal(forced.code, 1, 'the fake QMP hangs up, so save fails there');
      assert.doesNotMatch(forced.stderr, /already exists/);
      assert.equal(q.connections(), 1, 'with --force, save went on to the VM');
    } finally {
      q.server.close();
    }
  });

  test('receive --out DIR: refused before listening', async () => {
    const r = await cli(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', aDir]);
    assert.equal(r.code, 1);
    assert.doesNotMatch(r.stderr, /listening on/);
    assert.match(r.stderr, new RegExp(`--out ${aDir} is a directory`));
  });

  test('relay --channels-in 2 --channels-out 0 (N -> 0): refused before listening, with the reason', async () => {
    const r = await cli(['relay', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--channels-in', '2', '--channels-out', '0']);
    assert.equal(r.code, 1);
    assert.doesNotMatch(r.stderr, /listening on/);
    assert.equal(r.stderr, "multifd: error: channels-in 2 and channels-out 0: multifd from the source onto the destination's main channel is not supported; the relay needs multifd on both sides or on neither, or only towards the destination (channels-in 0)\n");
  });

  test('relay --tee DIR: refused before listening', async () => {
    const r = await cli(['relay', '--listen', 'tcp:127.0.0.1:0', '--to', 'tcp:127.0.0.1:1', '--tee', aDir]);
    assert.equal(r.code, 1);
    assert.doesNotMatch(r.stderr, /listening on/);
    assert.match(r.stderr, new RegExp(`--tee ${aDir} is a directory`));
  });
});

describe('demo --qemu', () => {
  test('a path that does not exist is an error, not the synthetic run', async () => {
    const r = await cli(['demo', '--qemu', '/nonexistent/qemu-system-x86_64']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr, 'multifd: error: --qemu /nonexistent/qemu-system-x86_64: no such file\n');
    assert.doesNotMatch(r.stdout, /demo passed/);
  });

  test('a binary that is not QEMU is an error', async () => {
    const r = await cli(['demo', '--qemu', process.execPath]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /--qemu .* is not QEMU/);
  });
});

test('zstd where this Node has no implementation: refused up front, saying what to install', { skip: ZSTD_SKIP ? false : 'zstd is available here (node:zlib or zstd-napi); the fresh-machine test checks Node 20 without it' }, async () => {
  const r = await cli(['receive', '--listen', 'tcp:127.0.0.1:0', '--out', join(dir, 'z.mig'), '--compression', 'zstd']);
  assert.equal(r.code, 1);
  assert.doesNotMatch(r.stderr, /listening on/);
  assert.match(r.stderr, /zstd compression is not available on Node .*Node >= 22\.15.*npm install zstd-napi/);
});

describe('progress rate', () => {
  test('follows the last half second; after data flowed, a quiet window shows the average, not 0', () => {
    const m = new RateMeter();
    assert.equal(m.sample(0, 0), 0, 'nothing flowed yet');
    assert.equal(m.sample(250, 1_000_000), 4_000_000, 'before a window: the average so far');
    assert.equal(m.sample(1000, 11_000_000), 11_000_000, '11 MB in the first second');
    assert.equal(m.sample(2000, 12_000_000), 1_000_000, '1 MB in the next second');
    // The device state phase: nothing on the wire for a while.
    assert.equal(m.sample(3000, 12_000_000), 4_000_000, 'quiet window: the average (12 MB over 3 s)');
    assert.notEqual(m.sample(4000, 12_000_000), 0);
  });

  test('a second transfer (its clock starts again) gets its own rate, not the first one\'s', () => {
    const m = new RateMeter();
    m.sample(0, 0);
    m.sample(1000, 100_000_000);
    assert.equal(m.sample(2000, 200_000_000), 100_000_000);
    // The demo's restore phase: elapsed and bytes start from 0 again.
    assert.equal(m.sample(100, 1_000_000), 10_000_000, 'the new transfer\'s own average');
    assert.equal(m.sample(1000, 5_000_000), 5_000_000, 'its own window');
    m.reset();
    assert.equal(m.sample(0, 0), 0);
  });
});
