// inspect, verify, convert and extract on files real QEMU 10 and 11 wrote with `migrate file:`:
// a paused pc guest (stream), a running q35 guest (mapped-ram, 2 multifd channels) and a running
// pc guest with two NUMA memory backends (several RAM blocks, stream). Each converted file is
// loaded by QEMU itself (migrate-incoming file: with the matching mapped-ram capability), saved
// again and compared page for page with the original; extracted images are compared with the
// source guest's memory (pmemsave); device fields are compared with analyze-migration.py.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { GUEST_DIRTY_END, GUEST_DIRTY_START, checkDirtyInvariant, writeBootSector } from '../guest/bootsector.js';
import { analyzeUnavailable, compareWithAnalyze, runAnalyze } from '../helpers/analyze.js';
import { imageDifferences, imagesOf } from '../helpers/file-images.js';
import { dumpGuestMemory, haveQemu, qemuBinary, startQemu, waitGuestPasses, waitMigration, type QemuInstance, type QemuVersion } from '../helpers/qemu.js';
import { cli, qemuSave } from '../helpers/send.js';
import { writeRandomBlob } from '../helpers/snapshot.js';

const MiB = 1024 * 1024;
const NUMA_ARGS = ['-object', 'memory-backend-ram,id=m0,size=64M', '-object', 'memory-backend-ram,id=m1,size=64M', '-numa', 'node,memdev=m0', '-numa', 'node,memdev=m1'];

interface Scenario {
  name: string;
  machine: 'pc' | 'q35';
  running: boolean;
  mappedRam: boolean;
  numa: boolean;
  /** Guest-physical layout of RAM: [block, GPA of its first byte]. */
  ramBlocks: [string, number][];
}

const SCENARIOS: Scenario[] = [
  { name: 'paused pc guest, stream file', machine: 'pc', running: false, mappedRam: false, numa: false, ramBlocks: [['pc.ram', 0]] },
  { name: 'running q35 guest, mapped-ram file (2 multifd channels)', machine: 'q35', running: true, mappedRam: true, numa: false, ramBlocks: [['pc.ram', 0]] },
  { name: 'running pc guest with two NUMA memory backends, stream file', machine: 'pc', running: true, mappedRam: false, numa: true, ramBlocks: [['m0', 0], ['m1', 64 * MiB]] },
];

const BLOB_GPA = 16 * MiB;
const BLOB_BYTES = 8 * MiB;

/**
 * The running guests boot the dirtying boot sector from a disk padded to 1 MiB (q35's AHCI
 * cannot read a one-sector disk); the paused guest holds a random blob with zero pages in it.
 */
function qemuOptions(version: QemuVersion, s: Scenario, dir: string) {
  const args = [...(s.numa ? NUMA_ARGS : [])];
  if (s.running) args.push('-drive', `file=${join(dir, 'boot.img')},format=raw,if=ide,index=0,media=disk`);
  else args.push('-device', `loader,file=${join(dir, 'blob.bin')},addr=0x${BLOB_GPA.toString(16)},force-raw=on`);
  return { version, memMiB: 128, machine: s.machine, extraArgs: args };
}

function prepareGuest(s: Scenario, dir: string): Buffer | undefined {
  if (s.running) {
    const img = join(dir, 'boot.img');
    writeBootSector(img);
    truncateSync(img, MiB);
    return undefined;
  }
  return writeRandomBlob(join(dir, 'blob.bin'), BLOB_BYTES, [0, 1, 7, 100, 2047]);
}

/** QEMU loads `file` as a destination would (docs/protocol.md §7d), paused afterwards. */
async function qemuLoad(version: QemuVersion, s: Scenario, dir: string, file: string, mappedRam: boolean): Promise<QemuInstance> {
  const q = await startQemu({ ...qemuOptions(version, s, dir), incoming: 'defer', paused: true });
  try {
    await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: mappedRam }] });
    await q.qmp.execute('migrate-incoming', { uri: `file:${file}`, 'exit-on-error': false });
    const st = await waitMigration(q.qmp, { timeoutMs: 120_000 });
    assert.equal(st.status, 'completed', `QEMU ${version} loading ${file}: ${st['error-desc'] ?? ''}\n${q.stderr()}`);
    return q;
  } catch (e) {
    await q.kill();
    throw e;
  }
}

async function json(args: string[]): Promise<any> {
  const r = await cli(args);
  assert.equal(r.code, 0, `multifd ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

for (const version of ['10', '11'] as QemuVersion[]) {
  const skip = haveQemu(version) ? false : `QEMU ${version} not available (${qemuBinary(version)})`;
  describe(`file tools on QEMU ${version} files`, { skip, timeout: 600_000 }, () => {
    for (const s of SCENARIOS) {
      test(s.name, async (t) => {
        const dir = mkdtempSync('/tmp/multifd-filetools-');
        const original = join(dir, 'original.mig');
        const converted = join(dir, 'converted.mig');
        const resaved = join(dir, 'resaved.mig');
        const other = s.mappedRam ? 'stream' : 'mapped-ram';
        let src: QemuInstance | undefined;
        let dst: QemuInstance | undefined;
        try {
          const blob = prepareGuest(s, dir);
          src = await startQemu({ ...qemuOptions(version, s, dir), paused: !s.running });
          if (s.running) await waitGuestPasses(src, 2);
          await qemuSave(src, original, { mappedRam: s.mappedRam, channels: s.mappedRam ? 2 : 0 });

          // inspect: what QEMU wrote, as QEMU describes it.
          const info = await json(['inspect', original, '--json']);
          const machinePrefix = s.machine === 'pc' ? 'pc-i440fx-' : 'pc-q35-';
          assert.equal(info.format, s.mappedRam ? 'mapped-ram' : 'stream');
          assert.equal(info.machine, `${machinePrefix}${version === '10' ? '10.0' : '11.1'}`);
          assert.deepEqual(info.capabilities, s.mappedRam ? ['mapped-ram'] : []);
          const names = info.blocks.map((b: { name: string }) => b.name);
          for (const [b] of s.ramBlocks) assert.ok(names.includes(b), `block ${b} in ${names.join(', ')}`);
          if (s.numa) assert.ok(!names.includes('pc.ram'), 'NUMA backends replace pc.ram');
          for (const [b] of s.ramBlocks) assert.ok(info.blocks.find((x: { name: string }) => x.name === b).present > 0, `${b} has pages`);
          assert.ok(info.sections.filter((x: { type: string }) => x.type === 'FULL').length >= 25, 'device sections listed');
          const v = await cli(['verify', original]);
          assert.equal(v.code, 0, v.stdout + v.stderr);
          assert.match(v.stdout, /: OK \(/);

          // extract equals the source guest's memory (QEMU paused it when the save completed).
          const ex = join(dir, 'extract');
          const exs = await json(['extract', original, '--out', ex, '--json']);
          assert.equal(exs.blocks.length, names.length);
          const images = s.ramBlocks.map(([b]) => readFileSync(join(ex, `${b}.raw`)));
          const ramImage = Buffer.concat(images);
          const guest = await dumpGuestMemory(src, MiB, 127 * MiB);
          assert.ok(guest.equals(ramImage.subarray(MiB, 128 * MiB)), 'extracted RAM = guest memory from 1 MiB to 128 MiB');
          if (blob) assert.ok(ramImage.subarray(BLOB_GPA, BLOB_GPA + BLOB_BYTES).equals(blob), 'the blob the loader put at 16 MiB');
          if (s.running) {
            const inv = checkDirtyInvariant(ramImage.subarray(GUEST_DIRTY_START, GUEST_DIRTY_END));
            assert.ok(inv.ok, inv.reason);
          }
          await src.kill();
          src = undefined;

          // convert, QEMU loads the result, saves it again: page for page what it started from.
          const cs = await json(['convert', original, converted, '--to', other, '--json']);
          assert.equal(cs.to, other);
          const cv = await cli(['verify', converted]);
          assert.equal(cv.code, 0, cv.stdout + cv.stderr);
          assert.deepEqual(imageDifferences(await imagesOf(original), await imagesOf(converted)), [], 'converted = original');
          dst = await qemuLoad(version, s, dir, converted, other === 'mapped-ram');
          await qemuSave(dst, resaved, { mappedRam: s.mappedRam, channels: s.mappedRam ? 2 : 0 });
          await dst.kill();
          dst = undefined;
          assert.deepEqual(imageDifferences(await imagesOf(original), await imagesOf(resaved)), [], 'QEMU re-saved exactly the original pages');
          const again = await json(['inspect', resaved, '--json', '--devices']);
          const orig = await json(['inspect', original, '--json', '--devices']);
          assert.deepEqual(again.devices.map((d: { idstr: string }) => d.idstr), orig.devices.map((d: { idstr: string }) => d.idstr));
          const cpu = (r: any) => r.devices.find((d: { idstr: string }) => d.idstr === 'cpu').fields;
          assert.equal(cpu(again)['env.eip'], cpu(orig)['env.eip'], 'the CPU state went through');
          assert.deepEqual(cpu(again)['env.regs'], cpu(orig)['env.regs']);

          // analyze-migration.py reads stream files only (10.0.2's script fails on mapped-ram).
          const noAnalyze = analyzeUnavailable();
          if (noAnalyze) {
            t.diagnostic(`analyze-migration.py comparison skipped: ${noAnalyze}`);
          } else {
            const streamFile = s.mappedRam ? converted : original;
            const a = await runAnalyze(streamFile);
            assert.ok(a.ok, `analyze-migration.py on ${streamFile}: ${a.ok ? '' : a.error}`);
            const ours = await json(['inspect', streamFile, '--json', '--devices']);
            const c = compareWithAnalyze(a.state, ours.devices);
            assert.deepEqual(c.differences, []);
            assert.ok(c.devices >= 25, `${c.devices} devices compared`);
            t.diagnostic(`analyze-migration.py agrees on ${c.devices} devices, ${c.leaves} values (${s.mappedRam ? 'our converted stream' : "QEMU's stream"})`);
            if (s.mappedRam) {
              const m = await runAnalyze(original);
              t.diagnostic(`analyze-migration.py on QEMU's mapped-ram file: ${m.ok ? 'parsed' : `fails (${m.error.slice(0, 120)})`}`);
            }
          }
          t.diagnostic(`QEMU ${version} ${s.name}: ${info['file-size']} bytes, blocks ${info.blocks.map((b: { name: string; present: number }) => `${b.name}:${b.present}`).join(' ')}; converted to ${other} ${cs['output-size']} bytes in ${cs['elapsed-ms']} ms`);
        } finally {
          await src?.kill();
          await dst?.kill();
          rmSync(dir, { recursive: true, force: true });
        }
      });
    }
  });
}
