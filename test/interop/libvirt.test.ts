// libvirt save images against a real libvirtd (scripts/libvirt.sh installs and starts it): the
// dirtying test guest runs as a TCG domain with a second QMP socket of ours on its command line
// (libvirt keeps its own monitor). virsh's images go through our inspect/verify/extract and our
// restore; ours go through `virsh restore`, with and without --parallel-channels. The guest's
// memory is checked, not logs: right after a restore it must equal what the image holds, and the
// guest must run on from there with its invariant.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant, writeBootSector } from '../guest/bootsector.js';
import { countPasses, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration } from '../helpers/qemu.js';
import { QmpClient } from '../../src/transports/qmp-client.js';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import type { SnapshotSource } from '../../src/engine/snapshot.js';

const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
const URI = 'qemu:///system';
const MEM_MIB = 128;

function libvirtMissing(): string | false {
  const r = spawnSync('virsh', ['-c', URI, 'version'], { encoding: 'utf8', timeout: 20_000 });
  if (r.error || r.status !== 0) return `libvirtd/virsh not available (${(r.stderr || r.error?.message || '').trim().split('\n')[0]}); run bash scripts/libvirt.sh install && bash scripts/libvirt.sh start`;
  const m = /Running hypervisor: QEMU (\d+)/.exec(r.stdout);
  if (!m) return `libvirtd answers but has no QEMU driver: ${r.stdout.trim()}`;
  const lib = /Using library: libvirt (\d+)\.(\d+)/.exec(r.stdout);
  if (!lib || Number(lib[1]) * 100 + Number(lib[2]) < 1101) return `libvirt older than 11.1 (no sparse save images): ${r.stdout.trim()}`;
  return false;
}

function run(bin: string, args: string[], timeout = 180_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(bin, args, { timeout, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

async function virsh(...args: string[]): Promise<string> {
  const r = await run('virsh', ['-c', URI, ...args]);
  if (r.code !== 0) throw new Error(`virsh ${args.join(' ')} failed: ${r.stderr.trim()}`);
  return r.stdout;
}

const cli = (...args: string[]) => run(process.execPath, [BIN, ...args]);

const skip = libvirtMissing();
let dir = '';
let seq = 0;
const domains = new Set<string>();

interface Domain {
  name: string;
  qmpSock: string;
  serial: string;
  xml: string;
}

/** A TCG domain running the dirtying guest, with our own QMP socket; `incoming` waits for a migration. */
function domainXml(name: string, opts: { incoming?: boolean } = {}): Domain {
  const qmpSock = join(dir, `${name}.qmp`);
  const serial = join(dir, `${name}.serial`);
  const boot = join(dir, 'boot.img');
  if (!existsSync(boot)) writeBootSector(boot);
  const xml = `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${name}</name>
  <memory unit='MiB'>${MEM_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>${process.env.MULTIFD_QEMU10 || '/usr/bin/qemu-system-x86_64'}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='${boot}'/><target dev='hda' bus='ide'/></disk>
    <serial type='file'><source path='${serial}'/><target port='0'/></serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>${opts.incoming ? "<qemu:arg value='-incoming'/><qemu:arg value='defer'/>" : ''}<qemu:arg value='-qmp'/><qemu:arg value='unix:${qmpSock},server=on,wait=off'/></qemu:commandline>
</domain>
`;
  return { name, qmpSock, serial, xml };
}

async function create(d: Domain, paused = false): Promise<void> {
  const f = join(dir, `${d.name}.xml`);
  writeFileSync(f, d.xml);
  domains.add(d.name);
  await virsh('create', f, ...(paused ? ['--paused'] : []));
}

async function destroy(name: string): Promise<void> {
  await run('virsh', ['-c', URI, 'destroy', name]);
}

async function qmpOf(d: Domain): Promise<QmpClient> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      return await QmpClient.connect(`unix:${d.qmpSock}`, { timeoutMs: 5_000 });
    } catch (e) {
      if (Date.now() > deadline) throw e;
      await sleep(100);
    }
  }
}

const passes = (d: Domain): number => {
  try {
    return countPasses(readFileSync(d.serial, 'latin1'));
  } catch {
    return 0;
  }
};

async function waitPasses(d: Domain, n: number, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (passes(d) < n) {
    if (Date.now() > deadline) throw new Error(`${d.name}: only ${passes(d)} of ${n} guest passes in ${timeoutMs} ms`);
    await sleep(100);
  }
}

/** The guest's dirty range, read through QMP pmemsave (the guest should be stopped). */
async function dirtyRange(qmp: QmpClient): Promise<Buffer> {
  const f = join(dir, `pmem-${seq++}.bin`);
  await qmp.execute('pmemsave', { val: GUEST_DIRTY_START, size: GUEST_DIRTY_END - GUEST_DIRTY_START, filename: f }, { timeoutMs: 60_000 });
  try {
    return readFileSync(f);
  } finally {
    rmSync(f, { force: true });
  }
}

/** The dirty range as our extract reads it from `image`. */
async function extractedRange(image: string): Promise<Buffer> {
  const out = join(dir, `extract-${seq++}.raw`);
  const r = await cli('extract', image, '--block', 'pc.ram', '--out', out);
  assert.equal(r.code, 0, `extract ${image}: ${r.stderr}`);
  try {
    return readFileSync(out).subarray(GUEST_DIRTY_START, GUEST_DIRTY_END);
  } finally {
    rmSync(out, { force: true });
  }
}

/** A running guest that has dirtied its range a few times. */
async function runningGuest(): Promise<Domain> {
  const d = domainXml(`multifd-lv-${process.pid}-${seq++}`);
  await create(d);
  await waitPasses(d, 2);
  return d;
}

/**
 * After `virsh restore --paused`: memory equals what the image holds (`expected`), then the guest
 * resumed runs on, and stopped again its invariant holds on changed memory.
 */
async function assertRunsOnFrom(d: Domain, expected: Buffer, label: string): Promise<void> {
  const qmp = await qmpOf(d);
  try {
    const atRestore = await dirtyRange(qmp);
    assert.ok(checkDirtyInvariant(atRestore).ok, `${label}: invariant right after restore`);
    assert.ok(atRestore.equals(expected), `${label}: memory right after restore is the image's`);
    const before = passes(d);
    await virsh('resume', d.name);
    await waitPasses(d, before + 2);
    await qmp.execute('stop');
    const later = await dirtyRange(qmp);
    const inv = checkDirtyInvariant(later);
    assert.ok(inv.ok, `${label}: invariant after running on: ${inv.reason}`);
    assert.ok(!later.equals(atRestore), `${label}: the guest ran on`);
  } finally {
    qmp.close();
  }
}

describe('libvirt save images with a real libvirtd', { skip, timeout: 900_000 }, () => {
  before(() => {
    dir = mkdtempSync('/tmp/multifd-libvirt-test-');
  });
  after(async () => {
    for (const name of domains) await destroy(name);
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const virshFormats: { label: string; args: string[]; format: string; qemu: string; restoreArgs: string[] }[] = [
    { label: 'classic', args: [], format: 'raw', qemu: 'stream', restoreArgs: [] },
    { label: 'gzip', args: ['--image-format', 'gzip'], format: 'gzip', qemu: 'stream', restoreArgs: [] },
    { label: 'sparse', args: ['--image-format', 'sparse'], format: 'sparse', qemu: 'mapped-ram', restoreArgs: [] },
    { label: 'sparse, 4 channels', args: ['--image-format', 'sparse', '--parallel-channels', '4'], format: 'sparse', qemu: 'mapped-ram', restoreArgs: [] },
  ];
  for (const v of virshFormats) {
    test(`virsh save (${v.label}) → our inspect, verify, extract and restore into QEMU`, async (t) => {
      const d = await runningGuest();
      const img = join(dir, `virsh-${seq++}.sav`);
      await virsh('save', d.name, img, ...v.args);
      const ver = await cli('verify', '--json', img);
      assert.equal(ver.code, 0, ver.stdout + ver.stderr);
      const vr = JSON.parse(ver.stdout);
      assert.equal(vr.ok, true);
      assert.equal(vr.format, v.qemu);
      assert.equal(vr.libvirt.format, v.format);
      const ins = await cli('inspect', '--json', img);
      assert.equal(ins.code, 0, ins.stderr);
      const ir = JSON.parse(ins.stdout);
      assert.equal(ir.libvirt.format, v.format);
      assert.equal(ir.libvirt['was-running'], true);
      assert.match(ir.libvirt['domain-xml'], new RegExp(`<name>${d.name}</name>`));
      assert.match(ir.libvirt.cookie, /<cookie>/);
      const saved = await extractedRange(img);
      const inv = checkDirtyInvariant(saved);
      assert.ok(inv.ok, `invariant in the extracted RAM: ${inv.reason}`);

      // Our restore into a QEMU with the same devices (libvirt starts it, waiting with -incoming defer).
      const dst = domainXml(`${d.name}-dst`, { incoming: true });
      await create(dst, true);
      try {
        const uuid = (await virsh('domuuid', dst.name)).trim();
        // gzip: restore's default, which resumes (the image says the guest was running);
        // the others stay paused so that memory can be compared with the image first.
        const resumes = v.label === 'gzip';
        const r = await cli('restore', img, '--qmp', `unix:${dst.qmpSock}`, '--channels', '2', '--uuid', uuid, ...(resumes ? [] : ['--no-resume']), '--json');
        assert.equal(r.code, 0, r.stderr);
        const s = JSON.parse(r.stdout);
        assert.equal(s.destinationQemu.status, 'completed');
        assert.equal(s.destinationQemu.resumed, resumes);
        if (resumes) {
          assert.equal(s.destinationQemu['run-state-after'], 'running');
          await waitPasses(dst, passes(dst) + 2);
          const q = await qmpOf(dst);
          try {
            await q.execute('stop');
            const inv2 = checkDirtyInvariant(await dirtyRange(q));
            assert.ok(inv2.ok, `gzip → our restore, resumed: ${inv2.reason}`);
          } finally {
            q.close();
          }
        } else {
          await assertRunsOnFrom(dst, saved, `virsh ${v.label} → our restore`);
        }
        t.diagnostic(`${v.label}: ${s.transferred} bytes restored in ${s['time-to-complete']} ms`);
      } finally {
        await destroy(dst.name);
      }
    });
  }

  for (const to of ['libvirt', 'libvirt-sparse'] as const) {
    test(`our save --domain-xml --to ${to} of the running guest → virsh restore${to === 'libvirt-sparse' ? ', then with --parallel-channels 4' : ''}`, async (t) => {
      const d = await runningGuest();
      const xml = join(dir, `${d.name}.migratable.xml`);
      writeFileSync(xml, await virsh('dumpxml', '--migratable', d.name));
      const img = join(dir, `ours-${seq++}.sav`);
      const r = await cli('save', '--qmp', `unix:${d.qmpSock}`, '--out', img, '--domain-xml', xml, '--to', to, '--channels', '2', '--downtime-limit', '20000', '--json');
      assert.equal(r.code, 0, r.stderr);
      const s = JSON.parse(r.stdout);
      assert.equal(s.libvirt.format, to === 'libvirt' ? 'raw' : 'sparse');
      assert.equal(s.libvirt['was-running'], true);
      t.diagnostic(`${to}: saved in ${s['total-time']} ms${to === 'libvirt' ? `, image rewritten in ${s.libvirt['convert-ms']} ms` : ', written in place'}`);
      // Sparse: receive wrote the image in place, no rewrite; raw: rewritten from a snapshot.
      assert.equal(s.libvirt['convert-ms'] === undefined, to === 'libvirt-sparse');
      assert.equal(s['file-size'], statSync(img).size, 'the summary gives the image\'s size');
      assert.deepEqual(readdirSync(dir).filter((f) => f.startsWith('.')), [], 'no temporary file left');
      assert.equal(readFileSync(img).toString('latin1', 0, 16), 'LibvirtQemudSave');
      const saved = await extractedRange(img);
      assert.ok(checkDirtyInvariant(saved).ok, 'invariant in our image');
      await destroy(d.name);
      const variants = to === 'libvirt' ? [[]] : [[], ['--parallel-channels', '4']];
      for (const extra of variants) {
        await virsh('restore', img, '--paused', ...extra);
        assert.match(await virsh('domstate', d.name), /paused/);
        await assertRunsOnFrom(d, saved, `ours (${to}) → virsh restore ${extra.join(' ')}`);
        await destroy(d.name);
      }
      // Without --paused the image's was_running resumes the guest, as libvirt's own images do.
      await virsh('restore', img);
      assert.match(await virsh('domstate', d.name), /running/);
      const before = passes(d);
      await waitPasses(d, before + 2);
      await destroy(d.name);
    });
  }

  test('convert a classic virsh image to sparse → virsh restore --parallel-channels 4; sparse → classic → plain QEMU file', async () => {
    const d = await runningGuest();
    const classic = join(dir, `virsh-${seq++}.sav`);
    await virsh('save', d.name, classic);
    const saved = await extractedRange(classic);
    const sparse = join(dir, `conv-${seq++}.sav`);
    const c = await cli('convert', classic, sparse, '--to', 'libvirt-sparse', '--json');
    assert.equal(c.code, 0, c.stderr);
    assert.equal(JSON.parse(c.stdout)['from-libvirt'], 'raw');
    await virsh('restore', sparse, '--paused', '--parallel-channels', '4');
    await assertRunsOnFrom(d, saved, 'classic → sparse → virsh restore --parallel-channels 4');
    await destroy(d.name);
    // And back (virsh restore of our classic images is covered above): sparse → classic → a plain QEMU file.
    const back = join(dir, `conv-${seq++}.sav`);
    assert.equal((await cli('convert', sparse, back, '--to', 'libvirt')).code, 0);
    assert.ok((await extractedRange(back)).equals(saved), 'the classic image holds the same RAM');
    const plain = join(dir, `conv-${seq++}.mig`);
    assert.equal((await cli('convert', back, plain, '--to', 'stream')).code, 0);
    assert.equal(readFileSync(plain).toString('latin1', 0, 4), 'QEVM');
    assert.ok((await extractedRange(plain)).equals(saved), 'plain QEMU file holds the same RAM');
  });

  test('an unfinished (…Part) image and a truncated header are refused, by us and by virsh', async () => {
    const d = await runningGuest();
    const img = join(dir, `virsh-${seq++}.sav`);
    await virsh('save', d.name, img);
    const bytes = readFileSync(img);
    const part = join(dir, 'part.sav');
    writeFileSync(part, Buffer.concat([Buffer.from('LibvirtQemudPart', 'latin1'), bytes.subarray(16)]));
    const v = await cli('verify', part);
    assert.equal(v.code, 1);
    assert.match(v.stdout, /unfinished \(magic "LibvirtQemudPart"\).*\[INCOMPLETE_IMAGE\]/);
    const dst = domainXml(`${d.name}-dst`, { incoming: true });
    await create(dst, true);
    try {
      const r = await cli('restore', part, '--qmp', `unix:${dst.qmpSock}`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /unfinished/);
      const q = await qmpOf(dst);
      try {
        assert.equal((await q.execute('query-migrate')).status ?? 'none', 'none', 'the destination was not touched');
      } finally {
        q.close();
      }
    } finally {
      await destroy(dst.name);
    }
    const vr = await run('virsh', ['-c', URI, 'restore', part]);
    assert.notEqual(vr.code, 0);
    assert.match(vr.stderr, /incomplete/);
    const cut = join(dir, 'cut.sav');
    writeFileSync(cut, bytes.subarray(0, 80));
    const c = await cli('inspect', cut);
    assert.equal(c.code, 1);
    assert.match(c.stderr, /header is truncated: 80 bytes, the header has 92/);
  });
});

/** pc.ram's dirty range as a snapshot source reads it (pages it does not hold are zero). */
async function dirtyRangeOf(src: SnapshotSource): Promise<Buffer> {
  const PAGE = 4096;
  const out = Buffer.alloc(GUEST_DIRTY_END - GUEST_DIRTY_START);
  const runs: [number, number][] = [];
  src.forEachRun('pc.ram', (first, count) => {
    const end = Math.min(first + count, GUEST_DIRTY_END / PAGE);
    for (let p = Math.max(first, GUEST_DIRTY_START / PAGE); p < end; p += 1024) runs.push([p, Math.min(1024, end - p)]);
  }, GUEST_DIRTY_START / PAGE);
  const scratch = Buffer.alloc(src.scratchBytes(1024));
  for (const [first, count] of runs) {
    Buffer.concat(await src.loadRuns('pc.ram', [first, count], 1, scratch)).copy(out, first * PAGE - GUEST_DIRTY_START);
  }
  return out;
}

// The layout libvirt's sparse images rely on, without libvirt: QEMU told `file:PATH,offset=N`.
describe('QEMU files written at file:PATH,offset=N', { skip: haveQemu('10') ? false : `QEMU 10 not available (${qemuBinary('10')})`, timeout: 180_000 }, () => {
  for (const mappedRam of [false, true]) {
    test(`${mappedRam ? 'mapped-ram (absolute block offsets)' : 'plain stream'}: read with the base offset, the guest invariant holds`, async () => {
      const q = await startQemu({ version: '10', memMiB: MEM_MIB, bootSector: true });
      try {
        await waitGuestPasses(q, 2);
        await q.qmp.execute('stop');
        if (mappedRam) await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }] });
        const f = join(q.dir, 'at-offset.mig');
        const offset = 70_000;
        await q.qmp.execute('migrate', { uri: `file:${f},offset=${offset}` });
        const m = await waitMigration(q.qmp);
        assert.equal(m.status, 'completed', m['error-desc']);
        await assert.rejects(openSnapshot(f), /not a QEMU migration file/, 'without the offset the file is not a migration file');
        const src = await openSnapshot(f, { offset });
        try {
          assert.equal(src.format, mappedRam ? 'mapped-ram' : 'stream');
          assert.equal(src.baseOffset, offset);
          assert.ok(src.deviceState.fileOffset > offset);
          const inv = checkDirtyInvariant(await dirtyRangeOf(src));
          assert.ok(inv.ok, inv.reason);
        } finally {
          await src.close();
        }
      } finally {
        await q.kill();
      }
    });
  }
});
