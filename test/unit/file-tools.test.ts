// inspect, verify, convert and extract without QEMU: on QEMU's own 10.0 and 11.1 files (the
// golden fixtures) and on a synthetic stream file with what a paused guest never produces (pages
// rewritten in a later round, pages zeroed later, CONTINUE chains, a block name with '/' and
// ':'). Page contents are checked against an independent replay of the records, device state
// byte for byte, and every mutated file must fail verify with the right offsets.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { RamFlag, SectionType, TARGET_PAGE_SIZE } from '../../src/codec/constants.js';
import { encodeConfiguration } from '../../src/codec/configuration.js';
import {
  encodeBlockEntry,
  encodeEos,
  encodeFooter,
  encodeMemSize,
  encodePageRecordHeader,
  encodeSectionFull,
  encodeSectionShort,
  encodeStreamHeader,
  encodeSwitchoverStart,
  encodeZeroRecord,
} from '../../src/codec/stream-encode.js';
import { convert } from '../../src/conversations/convert.js';
import { blockFileName, blockFileNames, extract } from '../../src/conversations/extract.js';
import { inspect } from '../../src/conversations/inspect.js';
import { verify, type VerifyResult } from '../../src/conversations/verify.js';
import { MappedRamSnapshot } from '../../src/engine/mapped-ram-reader.js';
import { openSnapshot } from '../../src/engine/open-snapshot.js';
import { parseVmdesc, type Vmdesc, type VmdescStruct } from '../../src/codec/vmdesc.js';
import { encodeQemuJson, vmdescForConfiguration } from '../../src/codec/vmdesc-config.js';
import { imagesOf } from '../helpers/file-images.js';
import { compareMappedRamFiles } from '../helpers/snapshot.js';
import { receive } from '../../src/conversations/receive.js';
import { dirtySyntheticGuest, makeSyntheticGuest, sendSyntheticMigration } from '../../src/demo/synthetic-source.js';
import { analyzeUnavailable, compareWithAnalyze, runAnalyze } from '../helpers/analyze.js';
import { BLOB_OFFSET, guestBlob, scenarios, type Scenario } from '../helpers/fixtures.js';
import { verifyText } from '../../src/cli/file-format.js';

const PAGE = TARGET_PAGE_SIZE;
const BIN = fileURLToPath(new URL('../../../bin/multifd.js', import.meta.url));
const dir = mkdtempSync('/tmp/file-tools-test-');
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const tmp = (name: string): string => join(dir, `${n++}-${name}`);

function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, ...args], { timeout: 60_000, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

/** A CLI failure: exit 1, one `multifd: error:` line, no stack trace. */
function assertCleanError(r: { code: number; stderr: string }, pattern: RegExp): void {
  assert.equal(r.code, 1, r.stderr);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `one line: ${r.stderr}`);
  assert.match(lines[0]!, /^multifd: error: /);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(r.stderr, /^\s+at /m, 'no stack trace');
}

/** Device sections through EOF (raw bytes) and the parsed VMDESCRIPTION. */
async function deviceStateOf(file: string): Promise<{ sections: Buffer; vmdesc: Vmdesc }> {
  const s = await openSnapshot(file);
  try {
    const ds = s.deviceState;
    const vmdescAt = ds.fileOffset + ds.vmdescOffset!;
    const sections = Buffer.from(await s.readAt(ds.fileOffset, vmdescAt - ds.fileOffset));
    const vmdesc = parseVmdesc((await s.readAt(vmdescAt, s.fileSize - vmdescAt)).subarray(5));
    return { sections, vmdesc };
  } finally {
    await s.close();
  }
}

async function assertSameContent(a: string, b: string): Promise<void> {
  const [ia, ib] = await Promise.all([imagesOf(a), imagesOf(b)]);
  assert.deepEqual([...ib.keys()], [...ia.keys()], 'same blocks in the same order');
  for (const [name, img] of ia) assert.ok(img.equals(ib.get(name)!), `block ${name} equal page for page`);
  const [da, db] = [await deviceStateOf(a), await deviceStateOf(b)];
  assert.ok(da.sections.equals(db.sections), 'device sections byte for byte');
  assert.deepEqual(db.vmdesc.devices, da.vmdesc.devices, 'vmdesc devices unchanged');
  const caps = (await inspect(b)).capabilities;
  const sub = (db.vmdesc.configuration as VmdescStruct | undefined)?.subsections?.find((x) => x.vmsd_name === 'configuration/capabilities');
  if (da.vmdesc.configuration) assert.equal(sub !== undefined, caps.length > 0, "the vmdesc's configuration entry follows the capability list");
}

// ---- a synthetic stream file ----

const BLOCK_A = '/objects/m0:ram';
const VMDESC_DEVICE = { name: 'testdev', instance_id: 0, vmsd_name: 'testdev', version: 1, fields: [{ name: 'regs', type: 'uint32', size: 4, array_len: 4 }] };

function pageOf(seed: number): Buffer {
  const b = Buffer.alloc(PAGE, seed & 0xff || 1);
  b.writeUInt32LE(seed, 0);
  return b;
}

/** QEMU's record sequence with two rounds; returns the file and the expected final images. */
function syntheticStream(opts: { extraVmdescDevice?: boolean } = {}): { file: Buffer; images: Map<string, Buffer>; present: Map<string, number> } {
  const sizes: [string, number][] = [[BLOCK_A, 64 * PAGE], ['rom', 4 * PAGE]];
  const images = new Map(sizes.map(([n, l]) => [n, Buffer.alloc(l)]));
  const parts: Buffer[] = [
    encodeStreamHeader(),
    encodeConfiguration({ machine: 'pc-i440fx-10.0', capabilities: [] }),
    encodeSectionFull(SectionType.START, 2, 'ram', 0, 4),
    encodeMemSize(sizes.reduce((t, [, l]) => t + l, 0)),
    ...sizes.map(([name, l]) => encodeBlockEntry(name, l)),
    encodeEos(), encodeFooter(2),
  ];
  let last: string | undefined;
  const page = (block: string, p: number, data: Buffer): void => {
    parts.push(encodePageRecordHeader(RamFlag.PAGE, p * PAGE, block === last ? undefined : block), data);
    data.copy(images.get(block)!, p * PAGE);
    last = block;
  };
  const zero = (block: string, p: number): void => {
    parts.push(encodeZeroRecord(p * PAGE, block === last ? undefined : block));
    images.get(block)!.fill(0, p * PAGE, (p + 1) * PAGE);
    last = block;
  };
  parts.push(encodeSectionShort(SectionType.PART, 2));
  for (let p = 0; p < 40; p++) {
    if (p % 9 === 5) zero(BLOCK_A, p);
    else if (p === 11) page(BLOCK_A, p, Buffer.alloc(PAGE)); // data that happens to be zero
    else page(BLOCK_A, p, pageOf(p));
  }
  page('rom', 1, pageOf(0xa1));
  page('rom', 3, pageOf(0xa3));
  parts.push(encodeEos(), encodeFooter(2), encodeSectionShort(SectionType.PART, 2));
  page(BLOCK_A, 3, pageOf(1003)); // rewritten in round 2
  zero(BLOCK_A, 7); // zeroed later
  page(BLOCK_A, 63, pageOf(63));
  page(BLOCK_A, 5, pageOf(505)); // was zero, now data
  parts.push(encodeEos(), encodeFooter(2), encodeSwitchoverStart(), encodeSectionShort(SectionType.END, 2));
  page(BLOCK_A, 62, pageOf(62));
  parts.push(encodeEos(), encodeFooter(2));
  const regs = Buffer.alloc(16);
  for (let i = 0; i < 4; i++) regs.writeUInt32BE(0x1000 + i, i * 4);
  const devices = [VMDESC_DEVICE, ...(opts.extraVmdescDevice ? [{ ...VMDESC_DEVICE, name: 'ghost' }] : [])];
  const vmdesc = Buffer.from(JSON.stringify({ page_size: PAGE, devices }));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(vmdesc.length);
  parts.push(encodeSectionFull(SectionType.FULL, 3, 'testdev', 0, 1), regs, encodeFooter(3), Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION]), len, vmdesc);
  const present = new Map([...images].map(([name, img]) => {
    let k = 0;
    for (let p = 0; p < img.length / PAGE; p++) if (img.subarray(p * PAGE, (p + 1) * PAGE).some((b) => b !== 0)) k++;
    return [name, k];
  }));
  return { file: Buffer.concat(parts), images, present };
}

function fixtureFile(s: Scenario): string {
  const p = join(dir, `${s.entry.qemu}-${s.entry.scenario}.mig`);
  if (!existsSync(p)) writeFileSync(p, s.main());
  return p;
}

function errorsOf(r: VerifyResult): { code: string; offset: number; message: string }[] {
  return r.problems.filter((p) => p.severity === 'error').map(({ code, offset, message }) => ({ code, offset, message }));
}

const FILES = scenarios((e) => e.transport === 'file');

describe('inspect and verify on QEMU files', () => {
  for (const s of FILES) {
    test(`${s.label}: verify passes, inspect finds the offsets and page counts QEMU wrote`, async () => {
      const file = fixtureFile(s);
      const v = await verify(file);
      assert.equal(v.ok, true, JSON.stringify(v.problems));
      assert.equal(v.problems.length, 0);
      const r = await inspect(file, { devices: true });
      const m = s.check.main;
      assert.equal(r.format, s.entry.scenario === 'mapped-ram-file' ? 'mapped-ram' : 'stream');
      assert.equal(r.machine, m.machine);
      assert.equal(r['file-size'], m.bytes);
      const at = (type: string, idstr?: string) => r.sections.find((x) => x.type === type && (idstr === undefined || x.idstr === idstr))?.offset;
      assert.equal(at('START', 'ram'), m.offsets.ram_START);
      assert.equal(at('COMMAND', 'SWITCHOVER_START'), m.offsets.cmd_SWITCHOVER_START);
      assert.equal(at('END', 'ram'), m.offsets.ram_END);
      assert.equal(r['device-state'].offset, m.offsets.first_device);
      assert.equal(at('EOF'), m.offsets.eof);
      assert.equal(at('VMDESCRIPTION'), m.vmdesc_offset);
      assert.equal(r.devices!.length, m.device_sections);
      assert.deepEqual(r.devices!.map((d) => [d.idstr, d['instance-id'], d.version, d['section-id']]), m.devices.map(([id, inst, ver, sid]) => [id, inst, ver, sid]));
      for (const b of r.blocks) {
        assert.equal(b.present, s.check.memory!.blocks[b.name]!.nonzero_pages, `${b.name} present pages`);
        assert.equal(b.present + b.zero, b.pages);
        const facts = m.ram_blocks.find((x) => x.name === b.name)!.mapped_ram;
        if (facts) {
          assert.equal(b['mapped-ram']!.headerOffset, facts.header_offset);
          assert.equal(b['mapped-ram']!.pagesOffset, facts.pages_offset);
          assert.equal(b['mapped-ram']!.bitsSet, facts.bits_set);
        }
      }
      const cpu = r.devices!.find((d) => d.idstr === 'cpu')!;
      assert.equal(cpu.fields!['env.eip'], 0xfff0, 'a never-run guest sits at the reset vector');
    });
  }

  const noAnalyze = analyzeUnavailable();
  test('inspect --devices --json agrees with analyze-migration.py on every device field (stream files, ours and QEMU\'s)', { skip: noAnalyze ?? false }, async (t) => {
    const files = FILES.filter((s) => s.entry.scenario === 'stream-file').map(fixtureFile);
    // Our stream writer's output too: converted from QEMU's mapped-ram file.
    const converted = tmp('from-mapped.mig');
    await convert({ input: fixtureFile(FILES.find((s) => s.entry.scenario === 'mapped-ram-file')!), output: converted, to: 'stream' });
    files.push(converted);
    for (const f of files) {
      const a = await runAnalyze(f);
      assert.ok(a.ok, `analyze-migration.py failed on ${f}: ${a.ok ? '' : a.error}`);
      const r = await cli(['inspect', f, '--devices', '--json']);
      assert.equal(r.code, 0, r.stderr);
      const c = compareWithAnalyze(a.state, JSON.parse(r.stdout).devices);
      t.diagnostic(`${f}: ${c.devices} devices, ${c.leaves} values compared`);
      assert.deepEqual(c.differences, []);
      assert.ok(c.devices >= 30 && c.leaves > 2000);
    }
  });
});

describe('verify finds problems in mutated files, with offsets', () => {
  const stream = () => FILES.find((s) => s.entry.scenario === 'stream-file' && s.entry.qemu === '10.0')!;
  const mapped = () => FILES.find((s) => s.entry.scenario === 'mapped-ram-file' && s.entry.qemu === '10.0')!;

  test('a stream file cut inside RAM: the cut record and the missing VMDESCRIPTION, and the CLI exits 1', async () => {
    const f = tmp('cut.mig');
    const whole = stream().main();
    writeFileSync(f, whole.subarray(0, 300_000));
    const v = await verify(f);
    assert.equal(v.ok, false);
    const errs = errorsOf(v);
    assert.equal(errs.length, 2, JSON.stringify(errs));
    assert.equal(errs[0]!.code, 'TRUNCATED');
    assert.ok(errs[0]!.offset < 300_000 && errs[0]!.offset > 300_000 - PAGE - 64, `the cut record starts just before the end (${errs[0]!.offset})`);
    assert.deepEqual([errs[1]!.code, errs[1]!.offset], ['TRUNCATED', 300_000]);
    assert.match(errs[1]!.message, /does not end with a VMDESCRIPTION/);
    const r = await cli(['verify', f]);
    assert.equal(r.code, 1);
    assert.match(r.stdout, /FAILED .* 2 error\(s\)/);
    assert.match(r.stdout, new RegExp(`at 0x${errs[0]!.offset.toString(16)} \\(byte ${errs[0]!.offset}\\)`));
  });

  test('a RAM section footer with the wrong id is BAD_FOOTER at the footer', async () => {
    const f = tmp('footer.mig');
    const b = Buffer.from(stream().main());
    const footer = stream().check.main.offsets.ram_START_end! - 5;
    assert.equal(b[footer], SectionType.FOOTER);
    b.writeUInt32BE(99, footer + 1);
    writeFileSync(f, b);
    const errs = errorsOf(await verify(f));
    assert.deepEqual(errs.map((e) => [e.code, e.offset]), [['BAD_FOOTER', footer]]);
  });

  test('mapped-ram: a bitmap beyond EOF, a bitmap over its pages region and a broken device footer are all reported', async () => {
    const s = mapped();
    const b = Buffer.from(s.main());
    const blocks = s.check.main.ram_blocks;
    const ram = blocks.find((x) => x.name === 'pc.ram')!.mapped_ram!;
    const bios = blocks.find((x) => x.name === 'pc.bios')!.mapped_ram!;
    b.writeBigUInt64BE(BigInt(b.length + 100), ram.header_offset + 12);
    b.writeBigUInt64BE(BigInt(bios.pages_offset), bios.header_offset + 12);
    const inspectBefore = await inspect(fixtureFile(s), { devices: true });
    const fdc = inspectBefore.devices!.find((d) => d.idstr === 'fdc')!;
    const fdcFooter = fdc.offset + fdc.size - 5;
    b[fdcFooter] = 0x7d;
    const f = tmp('mapped-bad.mig');
    writeFileSync(f, b);
    const v = await verify(f);
    const errs = errorsOf(v);
    assert.deepEqual(errs.map((e) => [e.code, e.offset]), [
      ['BAD_MAPPED_RAM', bios.pages_offset],
      ['BAD_MAPPED_RAM', b.length + 100],
      ['BAD_FOOTER', fdcFooter],
    ].sort((x, y) => (x[1] as number) - (y[1] as number)));
    assert.match(errs.find((e) => e.offset === b.length + 100)!.message, /block "pc.ram" bitmap .* beyond the end of the file/);
    assert.match(errs.find((e) => e.offset === bios.pages_offset)!.message, /block "pc.bios" bitmap .* overlaps its pages region/);
    assert.match(errs.find((e) => e.code === 'BAD_FOOTER')!.message, /footer of device section "fdc"/);
    assertCleanError(await cli(['inspect', f]), /bitmap lies beyond the end of the file \(at byte \d+, 0x[0-9a-f]+\)/);
  });

  test('mapped-ram cut inside a pages region: the set page past EOF and the missing rest are reported', async () => {
    const s = mapped();
    const ram = s.check.main.ram_blocks.find((x) => x.name === 'pc.ram')!.mapped_ram!;
    const cut = ram.pages_offset + BLOB_OFFSET + 3 * PAGE; // inside the blob's 20 pages
    const f = tmp('mapped-cut.mig');
    writeFileSync(f, s.main().subarray(0, cut));
    const errs = errorsOf(await verify(f));
    assert.ok(errs.length >= 3, JSON.stringify(errs));
    assert.ok(errs.some((e) => e.code === 'TRUNCATED' && /page \d+ \(set in the bitmap\)/.test(e.message)));
    assert.ok(errs.some((e) => e.code === 'TRUNCATED' && e.offset === cut && /pages region/.test(e.message)));
    assert.ok(errs.some((e) => /does not end with a VMDESCRIPTION/.test(e.message)));
  });

  test('a VMDESCRIPTION listing a device the file lacks, and a zero-length file', async () => {
    const f = tmp('ghost.mig');
    const syn = syntheticStream({ extraVmdescDevice: true });
    writeFileSync(f, syn.file);
    const errs = errorsOf(await verify(f));
    assert.equal(errs.length, 1, JSON.stringify(errs));
    assert.equal(errs[0]!.code, 'BAD_VMDESC');
    assert.match(errs[0]!.message, /lists device "ghost" instance 0, but the file has no section for it/);
    assert.equal(errs[0]!.offset, syn.file.lastIndexOf(Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION])) + 1);
    const empty = tmp('empty.mig');
    writeFileSync(empty, Buffer.alloc(0));
    const v = await verify(empty);
    assert.equal(v.ok, false);
    assert.equal(errorsOf(v)[0]!.code, 'TRUNCATED');
  });

  test('CLI errors are one line naming the file and offset', async () => {
    const junk = tmp('junk.mig');
    writeFileSync(junk, 'not a migration file at all');
    assertCleanError(await cli(['inspect', junk]), /junk\.mig is not a QEMU migration file we can read: .*bad magic.*\(at byte 0, 0x0\)/);
    assertCleanError(await cli(['extract', junk, '--out', tmp('x')]), /bad magic/);
    assertCleanError(await cli(['inspect', join(dir, 'missing.mig')]), /ENOENT/);
    const cut = tmp('cut2.mig');
    writeFileSync(cut, stream().main().subarray(0, 1000));
    assertCleanError(await cli(['convert', cut, tmp('o.mig'), '--to', 'mapped-ram']), /cut2\.mig: file is truncated.*\(at byte \d+/);
  });
});

describe('convert', () => {
  test('synthetic stream → mapped-ram → stream → mapped-ram keeps every page and the device state (small batches)', async () => {
    const syn = syntheticStream();
    const s0 = tmp('syn.mig');
    writeFileSync(s0, syn.file);
    const got = await imagesOf(s0);
    for (const [name, img] of syn.images) assert.ok(got.get(name)!.equals(img), `the oracle replays ${name}`);
    const m1 = tmp('syn-m1.mig');
    const s2 = tmp('syn-s2.mig');
    const m3 = tmp('syn-m3.mig');
    const sum1 = await convert({ input: s0, output: m1, to: 'mapped-ram', batchPages: 3 });
    await convert({ input: m1, output: s2, to: 'stream', batchPages: 5 });
    await convert({ input: s2, output: m3, to: 'mapped-ram', batchPages: 64 });
    assert.equal(sum1.pages, [...syn.present.values()].reduce((a, b) => a + b, 0));
    for (const f of [m1, s2, m3]) {
      await assertSameContent(s0, f);
      const v = await verify(f);
      assert.equal(v.ok, true, `${f}: ${JSON.stringify(v.problems)}`);
      const r = await inspect(f);
      assert.equal(r.format, f === s2 ? 'stream' : 'mapped-ram');
      assert.deepEqual(r.capabilities, f === s2 ? [] : ['mapped-ram']);
      assert.equal(r.machine, 'pc-i440fx-10.0');
      assert.deepEqual(r.blocks.map((b) => [b.name, b.present]), [...syn.present]);
      assert.equal(r['switchover-start'], true);
      assert.equal(r['ram-section']['section-id'], 2);
    }
    const m = await MappedRamSnapshot.open(m1);
    try {
      const bm = m.blocks.get(BLOCK_A)!.bitmap;
      assert.equal(bm.test(7), false, 'zeroed later: clear');
      assert.equal(bm.test(11), false, 'zero data: clear');
      assert.equal(bm.test(5), true, 'zero, then data: set');
    } finally {
      await m.close();
    }
  });

  test("the vmdesc's configuration entry: QEMU's JSON re-encodes byte for byte, follows a capability change, and a stale one is an informational verify line (QEMU's own quirk)", async () => {
    const stream = FILES.find((x) => x.entry.scenario === 'stream-file' && x.entry.qemu === '11.1')!;
    const mapped = FILES.find((x) => x.entry.scenario === 'mapped-ram-file' && x.entry.qemu === '11.1')!;
    const jsonOf = (b: Buffer): string => {
      const at = b.lastIndexOf(Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION])) + 1;
      return b.subarray(at + 5, at + 5 + b.readUInt32BE(at + 1)).toString('utf8');
    };
    const sj = jsonOf(stream.main());
    const mj = jsonOf(mapped.main());
    assert.equal(encodeQemuJson(JSON.parse(sj)), sj);
    const config = { machine: 'pc-i440fx-11.1', capabilities: ['mapped-ram'] };
    assert.equal(vmdescForConfiguration(parseVmdesc(mj), config), undefined, 'already describes mapped-ram');
    const added = vmdescForConfiguration(parseVmdesc(sj), config)!;
    assert.deepEqual(added.configuration, JSON.parse(mj).configuration, "adding mapped-ram gives exactly QEMU's entry");
    const removed = vmdescForConfiguration(parseVmdesc(mj), { ...config, capabilities: [] })!;
    assert.equal(encodeQemuJson(removed.configuration), encodeQemuJson(JSON.parse(sj).configuration));
    const two = vmdescForConfiguration(parseVmdesc(sj), { ...config, capabilities: ['x-ignore-shared', 'mapped-ram'] })!;
    assert.deepEqual((two.configuration as VmdescStruct).subsections![0]!.fields![1], { name: 'capabilities', array_len: 2, type: 'capability', size: 16 });
    // A mapped-ram file whose vmdesc still describes no capabilities: loadable, but flagged.
    const b = Buffer.from(mapped.main());
    const at = b.lastIndexOf(Buffer.from([SectionType.EOF, SectionType.VMDESCRIPTION])) + 1;
    const stale = Buffer.from(encodeQemuJson({ ...JSON.parse(mj), configuration: JSON.parse(sj).configuration }));
    const len = Buffer.alloc(4);
    len.writeUInt32BE(stale.length);
    const f = tmp('stale.mig');
    writeFileSync(f, Buffer.concat([b.subarray(0, at + 1), len, stale]));
    const v = await verify(f);
    assert.equal(v.ok, true);
    // Issue 21: QEMU writes such entries itself, so this is information, not a warning.
    assert.deepEqual(v.problems.map((p) => [p.severity, p.code, p.offset]), [['info', 'BAD_VMDESC', at]]);
    assert.equal(v.warnings, 0);
    assert.match(v.problems[0]!.message, /configuration entry does not describe the configuration record/);
    assert.match(v.problems[0]!.message, /quirk of QEMU's own files.*no action needed/);
    const text = verifyText(v);
    assert.match(text, /: OK \(/);
    assert.doesNotMatch(text, /warning/);
    assert.match(text, /\n  info    at 0x[0-9a-f]+ .*QEMU's own files/);
  });

  test("the demo's synthetic guest (received as mapped-ram after 3 rounds) converts to stream and back to its final state", async () => {
    const out = tmp('received.mig');
    const guest = makeSyntheticGuest(8);
    const expected = makeSyntheticGuest(8);
    const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels: 2 });
    await Promise.all([h.done, sendSyntheticMigration(await h.listening, guest, { channels: 2, rounds: 3 })]);
    for (let r = 2; r <= 3; r++) dirtySyntheticGuest(expected, r);
    const st = tmp('received-stream.mig');
    const back = tmp('received-back.mig');
    await convert({ input: out, output: st, to: 'stream', batchPages: 100 });
    await convert({ input: st, output: back, to: 'mapped-ram', batchPages: 33 });
    for (const f of [st, back]) {
      const images = await imagesOf(f);
      for (const b of expected.blocks) assert.ok(images.get(b.name)!.equals(b.data), `${f}: ${b.name} is the source's final state`);
      assert.equal((await verify(f)).ok, true);
    }
    const cmp = await compareMappedRamFiles(out, back);
    assert.deepEqual(cmp.map((c) => [c.name, c.differingPages, c.bitDifferences]), expected.blocks.map((b) => [b.name, 0, 0]));
  });

  for (const s of FILES) {
    test(`${s.label}: converts to the other format and back page for page`, async () => {
      const input = fixtureFile(s);
      const other = s.entry.scenario === 'stream-file' ? 'mapped-ram' : 'stream';
      const a = tmp('a.mig');
      const b = tmp('b.mig');
      await convert({ input, output: a, to: other });
      await convert({ input: a, output: b, to: other === 'stream' ? 'mapped-ram' : 'stream', batchPages: 7 });
      await assertSameContent(input, a);
      await assertSameContent(input, b);
      assert.equal((await verify(b)).ok, true);
    });
  }

  test('refuses to overwrite without --force, never writes over its input, and an interrupted run leaves nothing', async () => {
    const input = fixtureFile(FILES[0]!);
    const out = tmp('exists.mig');
    writeFileSync(out, 'keep me');
    const r = await cli(['convert', input, out, '--to', 'stream']);
    assertCleanError(r, /exists.mig already exists \(use --force to overwrite it\)/);
    assert.equal(readFileSync(out, 'utf8'), 'keep me');
    const ok = await cli(['convert', input, out, '--to', 'stream', '--force', '--json']);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(JSON.parse(ok.stdout).to, 'stream');
    assert.equal((await verify(out)).ok, true);
    await assert.rejects(convert({ input, output: input, to: 'stream', force: true }), /is the input file/);
    const sub = join(dir, 'interrupted');
    mkdirSync(sub);
    const ac = new AbortController();
    await assert.rejects(convert({
      input: fixtureFile(FILES.find((x) => x.entry.scenario === 'mapped-ram-file')!), output: join(sub, 'out.mig'), to: 'stream', batchPages: 4, signal: ac.signal,
      onProgress: (p) => { if (p.pagesDone > 0) ac.abort(); },
    }), /interrupted/);
    assert.deepEqual(readdirSync(sub), [], 'neither output nor temporary file');
  });
});

describe('extract', () => {
  test('block file names are sanitised and unique', () => {
    assert.equal(blockFileName('/rom@etc/acpi/tables'), 'rom_etc_acpi_tables.raw');
    assert.equal(blockFileName('0000:00:02.0/vga.vram'), '0000_00_02.0_vga.vram.raw');
    assert.equal(blockFileName('../../etc/passwd'), 'etc_passwd.raw');
    assert.equal(blockFileName('...'), 'block.raw');
    assert.deepEqual([...blockFileNames(['a/b', 'a:b', 'a_b']).values()], ['a_b.raw', 'a_b-2.raw', 'a_b-3.raw']);
  });

  for (const s of FILES) {
    test(`${s.label}: every block's image equals the final RAM (the guest blob in pc.ram), absent pages as holes`, async () => {
      const input = fixtureFile(s);
      const out = tmp('extract');
      const r = await cli(['extract', input, '--out', out, '--json']);
      assert.equal(r.code, 0, r.stderr);
      const summary = JSON.parse(r.stdout);
      const images = await imagesOf(input);
      assert.equal(summary.blocks.length, images.size);
      for (const b of summary.blocks) {
        const img = readFileSync(b.output);
        assert.ok(img.equals(images.get(b.name)!), `${b.name} image`);
        assert.ok(b.output.startsWith(out + '/'), 'written inside --out');
      }
      const ram = readFileSync(join(out, 'pc.ram.raw'));
      assert.equal(ram.length, 16 << 20);
      assert.ok(ram.subarray(BLOB_OFFSET, BLOB_OFFSET + guestBlob().length).equals(guestBlob()), 'the blob QEMU held');
      assert.ok(statSync(join(out, 'pc.ram.raw')).blocks * 512 < 1 << 20, 'sparse: only the present pages take space');
      const one = tmp('pc-ram.img');
      const single = await extract({ file: input, out: one, block: 'pc.ram' });
      assert.equal(single.blocks.length, 1);
      assert.ok(readFileSync(one).equals(ram));
      await assert.rejects(extract({ file: input, out: one, block: 'pc.ram' }), /already exists/);
      await assert.rejects(extract({ file: input, out: one, block: 'nope' }), /no RAM block "nope" .*blocks: pc\.ram/);
      // Images are local files: an object URL as --out is refused by name, not taken as a path.
      await assert.rejects(extract({ file: input, out: 's3://bucket/pc.raw', block: 'pc.ram' }), { code: 'INVALID_OPTION', message: /local files, not to s3:\/\/bucket\/pc\.raw/ });
    });
  }
});
