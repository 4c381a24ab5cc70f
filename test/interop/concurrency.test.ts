/**
 * One process, eight migrations at once: eight paused QEMU 10 guests, each holding its own random
 * blob, migrate at the same moment into eight receive() conversations of this process on their own
 * ports (four of them with TLS, two with zstd). Each snapshot must hold exactly its own VM's blob —
 * no cross-talk between conversations, channels or compression streams.
 * Every path QEMU sees is under /tmp.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { haveQemu, startQemu, waitMigration, type QemuInstance } from '../helpers/qemu.js';
import { makeTlsCreds } from '../helpers/tls.js';
import { snapshotRam } from '../helpers/compression.js';
import { receive, type ReceiveSummary } from '../../src/conversations/receive.js';

const VMS = 8;
const MEM_MIB = 64;
const BLOB_ADDR = 0x1000000;
const BLOB_SIZE = 8 * 1024 * 1024;

let work = '';
before(() => {
  work = mkdtempSync('/tmp/multifd-concurrency-test-');
});
after(() => rmSync(work, { recursive: true, force: true }));

test(`${VMS} QEMU 10 guests saved at once by one process, some over TLS, some with zstd: each snapshot holds its own VM`, { skip: haveQemu('10') ? false : 'QEMU 10 not available', timeout: 240_000 }, async (t) => {
  const creds = makeTlsCreds(join(work, 'creds'));
  const qs: QemuInstance[] = [];
  try {
    const vms = Array.from({ length: VMS }, (_, i) => {
      const blob = randomBytes(BLOB_SIZE);
      const file = join(work, `blob-${i}.bin`);
      writeFileSync(file, blob);
      return { i, blob, file, tls: i % 2 === 1, compression: i % 4 === 2 ? 'zstd' : 'none', channels: 1 + (i % 3) };
    });
    qs.push(...(await Promise.all(vms.map((v) => startQemu({
      version: '10',
      memMiB: MEM_MIB,
      paused: true,
      extraArgs: [
        '-device', `loader,file=${v.file},addr=0x${BLOB_ADDR.toString(16)},force-raw=on`,
        ...(v.tls ? ['-object', `tls-creds-x509,id=tls0,dir=${creds},endpoint=client`] : []),
      ],
    })))));
    const handles = vms.map((v) => receive({ listen: 'tcp:127.0.0.1:0', out: join(work, `vm-${v.i}.mig`), channels: v.channels, ...(v.tls ? { tls: { dir: creds } } : {}) }));
    const addrs = await Promise.all(handles.map((h) => h.listening));
    await Promise.all(vms.map(async (v, i) => {
      const q = qs[i]!;
      await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }, { capability: 'return-path', state: true }] });
      await q.qmp.execute('migrate-set-parameters', {
        'max-bandwidth': 107374182400,
        'multifd-channels': v.channels,
        'multifd-compression': v.compression,
        ...(v.tls ? { 'tls-creds': 'tls0' } : {}),
      });
    }));
    const t0 = Date.now();
    await Promise.all(vms.map((_, i) => qs[i]!.qmp.execute('migrate', { uri: addrs[i]! })));
    const summaries: ReceiveSummary[] = await Promise.all(handles.map((h) => h.done));
    t.diagnostic(`${VMS} migrations in ${Date.now() - t0} ms: ${summaries.map((s, i) => `vm${i} ${s.transferred} bytes ${s.compression} ${s.channels.length} ch`).join(', ')}`);
    for (const [i, q] of qs.entries()) assert.equal((await waitMigration(q.qmp, { timeoutMs: 30_000 })).status, 'completed', `VM ${i} completed`);
    for (const v of vms) {
      const s = summaries[v.i]!;
      assert.equal(s.compression, v.compression, `vm${v.i}: compression`);
      assert.equal(s.channels.length, v.channels, `vm${v.i}: channels`);
      const got = await snapshotRam(join(work, `vm-${v.i}.mig`), BLOB_ADDR, BLOB_SIZE);
      assert.ok(got.equals(v.blob), `vm${v.i}: the snapshot holds its own VM's blob`);
    }
    assert.deepEqual(readdirSync(work).filter((f) => f.includes('partial')), [], 'no temporary files');
  } finally {
    await Promise.all(qs.map((q) => q.kill()));
  }
});
