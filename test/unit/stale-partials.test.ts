// Temporary files a killed run left behind (`.NAME.partial-PID-TIME-HOST`) are removed when a new
// run writes the same output, only when their process is gone: a live writer's file, our own, one
// from another host, another output's and one named otherwise stay. End to end: a receive that was
// SIGKILLed leaves its temporary file; the next receive to the same output removes it and says so.

import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { OutputFile } from '../../src/conversations/output-file.js';
import { channelName } from '../../src/engine/diagnostics.js';
import { MappedRamWriter } from '../../src/engine/mapped-ram-writer.js';
import { processGone, removeStalePartials, temporaryName } from '../../src/engine/write-exactly.js';

const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
const dir = mkdtempSync('/tmp/multifd-partials-');
after(() => rmSync(dir, { recursive: true, force: true }));

/** This host as temporaryName() writes it (after `.NAME.partial-PID-TIME-`). */
const HOST = basename(temporaryName('/x/y')).split('-').slice(3).join('-');

/** The PID of a process that has exited (and been reaped). */
async function deadPid(): Promise<number> {
  const c = spawn(process.execPath, ['-e', '']);
  await once(c, 'exit');
  assert.ok(processGone(c.pid!), 'the exited child is gone');
  return c.pid!;
}

function touch(name: string): string {
  writeFileSync(join(dir, name), 'x');
  return name;
}

test('only the temporary files of this output whose process on this host is gone are removed', async () => {
  const dead = await deadPid();
  const live = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)']);
  try {
    const out = join(dir, 'vm.mig');
    const stale = [touch(`.vm.mig.partial-${dead}-1700000000000-${HOST}`), touch(`.vm.mig.partial-${dead}-1700000000001-${HOST}.mig`)];
    const kept = [
      touch(`.vm.mig.partial-${live.pid}-1700000000000-${HOST}`), // a concurrent writer, alive
      touch(`.vm.mig.partial-${process.pid}-1700000000000-${HOST}`), // ours
      touch(`.vm.mig.partial-${dead}-1700000000000-${HOST}x`), // another host
      touch(`.vm.mig.partial-${dead}-1700000000000-other-host`),
      touch(`.vm.mig.partial-${dead}-1700000000000`), // no host in the name: whose PID is unknown
      touch(`.vm.mig.partial-0-1700000000000-${HOST}`), // PID 0 would be our process group
      touch(`.vm2.mig.partial-${dead}-1700000000000-${HOST}`), // another output
      touch(`vm.mig.partial-${dead}-1700000000000-${HOST}`), // not hidden: not our name
    ];
    const events: unknown[] = [];
    const listen = (m: unknown): void => { events.push(m); };
    subscribe(channelName('output', 'stale-partial-removed'), listen);
    try {
      const w = await MappedRamWriter.create(out, { directIo: false });
      await w.abort();
    } finally {
      unsubscribe(channelName('output', 'stale-partial-removed'), listen);
    }
    const left = readdirSync(dir);
    for (const s of stale) assert.ok(!left.includes(s), `${s} removed`);
    for (const k of kept) assert.ok(left.includes(k), `${k} kept`);
    assert.deepEqual(events.map((e) => (e as { path: string }).path).sort(), stale.map((s) => join(dir, s)).sort());
    assert.ok(events.every((e) => (e as { pid: number }).pid === dead));
    for (const k of kept) rmSync(join(dir, k));
  } finally {
    live.kill('SIGKILL');
  }
});

test('convert and extract outputs (OutputFile) sweep the same way', async () => {
  const dead = await deadPid();
  const out = join(dir, 'out.stream');
  const stale = touch(`.out.stream.partial-${dead}-1700000000000-${HOST}`);
  const f = await OutputFile.create(out);
  assert.ok(!existsSync(join(dir, stale)), 'removed');
  await f.abort();
  // Nothing to do: nothing removed, no error for a directory that does not exist.
  assert.deepEqual(await removeStalePartials(out), []);
  assert.deepEqual(await removeStalePartials(join(dir, 'missing', 'x.mig')), []);
  assert.deepEqual(readdirSync(dir), []);
});

/** A CLI receive; resolves once it listens. */
async function receive(out: string): Promise<{ child: ChildProcess; stderr: () => string }> {
  const child = spawn(process.execPath, [BIN, 'receive', '--listen', 'tcp:127.0.0.1:0', '--out', out], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (c: Buffer) => (err += c));
  const deadline = Date.now() + 20_000;
  while (!/listening on/.test(err)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`receive did not listen: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { child, stderr: () => err };
}

test('a receive SIGKILLed before the migration leaves its temporary file; the next receive to the same output removes it and says so', async () => {
  const rx = join(dir, 'rx');
  mkdirSync(rx);
  const out = join(rx, 'vm.mig');
  const first = await receive(out);
  let before: string[];
  try {
    before = readdirSync(rx);
    assert.equal(before.length, 1);
    assert.match(before[0]!, new RegExp(`^\\.vm\\.mig\\.partial-${first.child.pid}-\\d+-`));
  } finally {
    first.child.kill('SIGKILL');
    await once(first.child, 'exit');
  }
  assert.deepEqual(readdirSync(rx), before, 'SIGKILL leaves the temporary file');
  const second = await receive(out);
  try {
    assert.match(second.stderr(), new RegExp(`multifd: note: removed .*${before[0]!.replace(/\./g, '\\.')}, a temporary file left by process ${first.child.pid}`));
    const now = readdirSync(rx);
    assert.equal(now.length, 1);
    assert.match(now[0]!, new RegExp(`^\\.vm\\.mig\\.partial-${second.child.pid}-`), 'only the live receive\'s own file');
  } finally {
    second.child.kill('SIGTERM');
    await once(second.child, 'exit');
  }
  assert.deepEqual(readdirSync(rx), [], 'an interrupted receive removes its own');
});
