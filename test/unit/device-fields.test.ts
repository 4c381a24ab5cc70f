// The vmdesc-driven device field decoder: synthetic descriptions and bytes covering every shape
// QEMU writes (integers of each size and sign, bools, opaque buffers, nested structs, struct and
// scalar arrays, arrays split in two entries, nested subsections, nullptr, capability), what
// bad input turns into (typed errors with offsets, never a hang or unbounded output), and every
// device of QEMU's own files decoded to the exact end of its section.

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeDeviceFields, structToJson, structToLines, type DecodedStruct } from '../../src/codec/device-fields.js';
import { ProtocolError } from '../../src/codec/errors.js';
import { findTrailingVmdesc, walkDeviceState, type VmdescDevice } from '../../src/codec/vmdesc.js';
import { scenarios } from '../helpers/fixtures.js';

function be(n: number | bigint, size: number): Buffer {
  const b = Buffer.alloc(size);
  let v = BigInt.asUintN(size * 8, BigInt(n));
  for (let i = size - 1; i >= 0; i--) { b[i] = Number(v & 0xffn); v >>= 8n; }
  return b;
}

function sub(name: string, version: number): Buffer {
  return Buffer.concat([Buffer.from([0x05, name.length]), Buffer.from(name, 'latin1'), be(version, 4)]);
}

const DEVICE: VmdescDevice = {
  name: 'testdev', instance_id: 0, vmsd_name: 'testdev', version: 3,
  fields: [
    { name: 'u8', type: 'uint8', size: 1 },
    { name: 's16', type: 'int16', size: 2 },
    { name: 'u32', type: 'uint32', size: 4 },
    { name: 's64', type: 'int64', size: 8 },
    { name: 'big', type: 'uint64', size: 8 },
    { name: 'le', type: 'int32 le', size: 4 },
    { name: 'flag', type: 'bool', size: 1 },
    { name: 'blob', type: 'buffer', size: 5 },
    { name: 'regs', type: 'uint16', size: 2, array_len: 3 },
    { name: 'one', type: 'uint8', size: 1, array_len: 1 },
    { name: 'inner', type: 'struct', size: 6, struct: { vmsd_name: 'inner', version: 1, fields: [
      { name: 'a', type: 'uint32', size: 4 },
      { name: 'pair', type: 'struct', size: 2, struct: { vmsd_name: 'pair', version: 1, fields: [{ name: 'x', type: 'uint8', size: 1 }, { name: 'y', type: 'int8', size: 1 }] } },
    ] } },
    { name: 'ents', type: 'struct', size: 3, array_len: 2, struct: { vmsd_name: 'ent', version: 1, fields: [{ name: 'k', type: 'uint8', size: 1 }, { name: 'v', type: 'uint16', size: 2 }] } },
    // 10.0 lists struct-array elements one by one with "index"; the last element has none.
    { name: 'split', type: 'struct', size: 1, index: 0, struct: { vmsd_name: 'el', version: 1, fields: [{ name: 'b', type: 'uint8', size: 1 }] } },
    { name: 'split', type: 'struct', size: 1, struct: { vmsd_name: 'el', version: 1, fields: [{ name: 'b', type: 'uint8', size: 1 }] } },
    { name: 'ptr', type: 'nullptr', size: 1 },
    { name: 'ts', type: 'timer', size: 8 },
  ],
  subsections: [
    { vmsd_name: 'testdev/extra', version: 2, fields: [{ name: 'e', type: 'uint32', size: 4 }], subsections: [{ vmsd_name: 'testdev/extra/deep', version: 1, fields: [{ name: 'd', type: 'bool', size: 1 }] }] },
    { vmsd_name: 'testdev/second', version: 1, fields: [{ name: 's', type: 'int8', size: 1 }] },
  ],
};

function deviceBytes(): Buffer {
  return Buffer.concat([
    be(0xfe, 1), be(-2, 2), be(0xdeadbeef, 4), be(-5n, 8), be(0xffffffffffffffffn, 8), be(7, 4),
    Buffer.from([1]), Buffer.from('hello'), be(1, 2), be(2, 2), be(0xffff, 2), be(9, 1),
    be(0x01020304, 4), be(0x80, 1), be(-1, 1),
    be(1, 1), be(0x100, 2), be(2, 1), be(0x200, 2),
    be(0x11, 1), be(0x22, 1),
    Buffer.from('0'), Buffer.alloc(8, 0xab),
    sub('testdev/extra', 2), be(42, 4), sub('testdev/extra/deep', 1), Buffer.from([0]),
    sub('testdev/second', 1), be(-128, 1),
  ]);
}

function expectError(fn: () => unknown, code: string, offset: number, msg?: RegExp): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof ProtocolError, `expected a ProtocolError, got ${String(e)}`);
    assert.equal(e.code, code, e.message);
    assert.equal(e.offset, offset, `offset of "${e.message}"`);
    if (msg) assert.match(e.message, msg);
    return true;
  });
}

describe('device field decoder', () => {
  test('decodes every field shape, with offsets relative to base, and ends at the last byte', () => {
    const data = deviceBytes();
    const prefix = Buffer.alloc(10, 0xee);
    const { state, end, issues } = decodeDeviceFields(Buffer.concat([prefix, data]), DEVICE, 10, { base: 1000 });
    assert.equal(end, 10 + data.length);
    assert.deepEqual(issues, []);
    assert.equal(state.offset, 1010);
    assert.equal(state.size, data.length);
    assert.deepEqual(structToJson(state), {
      u8: 254, s16: -2, u32: 0xdeadbeef, s64: -5, big: '18446744073709551615', le: 7, flag: true, blob: Buffer.from('hello').toString('hex'),
      regs: [1, 2, 0xffff], one: [9],
      inner: { a: 0x01020304, pair: { x: 0x80, y: -1 } },
      ents: [{ k: 1, v: 0x100 }, { k: 2, v: 0x200 }],
      split: [{ b: 0x11 }, { b: 0x22 }],
      ptr: null, ts: 'abababababababab',
      'testdev/extra': { e: 42, 'testdev/extra/deep': { d: false } },
      'testdev/second': { s: -128 },
    });
    const u32 = state.fields.find((f) => f.name === 'u32')!.values[0]!;
    assert.equal(u32.offset, 1010 + 3, 'u32 sits after u8 and s16');
    const extra = state.subsections[0]!;
    assert.equal(extra.version, 2);
    assert.equal(extra.offset, 1010 + data.indexOf(sub('testdev/extra', 2)));
  });

  test('text rendering folds scalar arrays and shows nested structs and subsections', () => {
    const { state } = decodeDeviceFields(deviceBytes(), DEVICE, 0);
    const text = structToLines(state).join('\n');
    assert.match(text, /^s16 = -2 \(0xfffe\)$/m);
    assert.match(text, /^regs = \[0x1, 0x2, 0xffff\]$/m);
    assert.match(text, /^ents\[1\]: ent\n {2}k = 0x2$/m);
    assert.match(text, /^split\[0\]: el$/m, '10.0 element index shown');
    assert.match(text, /^subsection testdev\/extra \(version 2\):\n {2}e = 0x2a\n {2}subsection testdev\/extra\/deep/m);
    const zeros = decodeDeviceFields(Buffer.alloc(1024), { vmsd_name: 'z', fields: [{ name: 'q', type: 'uint32', size: 4, array_len: 256 }] }, 0);
    assert.deepEqual(structToLines(zeros.state), ['q = [0x0 ×256]']);
  });

  test('input that ends early is a TRUNCATED error at the offset where bytes ran out', () => {
    const data = deviceBytes();
    for (const cut of [0, 1, 7, 30, data.length - 1]) {
      assert.throws(() => decodeDeviceFields(data.subarray(0, cut), DEVICE, 0, { base: 500 }), (e: unknown) => {
        assert.ok(e instanceof ProtocolError);
        assert.equal(e.code, 'TRUNCATED', `cut at ${cut}: ${e.message}`);
        assert.ok(e.offset! >= 500 && e.offset! <= 500 + cut, `offset ${e.offset} within the data for cut ${cut}`);
        return true;
      });
    }
  });

  test('a missing or misnamed subsection is a BAD_VMDESC error at the subsection', () => {
    const data = deviceBytes();
    const at = data.indexOf(sub('testdev/second', 1));
    const renamed = Buffer.from(data);
    renamed.write('X', at + 2 + 'testdev/'.length, 'latin1');
    expectError(() => decodeDeviceFields(renamed, DEVICE, 0, { base: 100 }), 'BAD_VMDESC', 100 + at, /subsection "testdev\/Xecond" where the VMDESCRIPTION expects "testdev\/second"/);
    const dropped = data.subarray(0, at);
    expectError(() => decodeDeviceFields(Buffer.concat([dropped, Buffer.from([0x7e, 0, 0, 0, 1])]), DEVICE, 0), 'BAD_VMDESC', at, /subsection "testdev\/second" of testdev not found/);
  });

  test('hostile descriptions fail typed instead of hanging or allocating without bound', () => {
    const huge: VmdescDevice = { name: 'h', instance_id: 0, fields: [{ name: 'nothing', type: 'uint8', size: 0, array_len: 1e12 }] };
    expectError(() => decodeDeviceFields(Buffer.alloc(0), huge, 0, { maxValues: 10_000 }), 'BAD_VMDESC', 0, /more than 10000 decoded values/);
    const hugeStruct: VmdescDevice = { name: 'h', instance_id: 0, fields: [{ name: 's', type: 'struct', size: 0, array_len: 2 ** 40, struct: { fields: [] } }] };
    expectError(() => decodeDeviceFields(Buffer.alloc(0), hugeStruct, 0, { maxValues: 10_000 }), 'BAD_VMDESC', 0);
    const negative = { name: 'n', instance_id: 0, fields: [{ name: 'f', type: 'buffer', size: -1 }] } as VmdescDevice;
    expectError(() => decodeDeviceFields(Buffer.alloc(4), negative, 0), 'BAD_VMDESC', 0, /bad size/);
    const notList = { name: 'n', instance_id: 0, fields: 'oops' } as unknown as VmdescDevice;
    expectError(() => decodeDeviceFields(Buffer.alloc(4), notList, 0), 'BAD_VMDESC', 0, /not a list of objects/);
    let deep: VmdescDevice = { name: 'd', instance_id: 0, fields: [] };
    for (let i = 0; i < 100; i++) deep = { name: 'd', instance_id: 0, fields: [{ name: 'n', type: 'struct', size: 0, struct: deep }] };
    expectError(() => decodeDeviceFields(Buffer.alloc(0), deep, 0), 'BAD_VMDESC', 0, /nests too deeply/);
  });

  test('a struct whose bytes disagree with its recorded size, and a bad nullptr marker, are reported as issues', () => {
    const desc: VmdescDevice = { name: 'm', instance_id: 0, fields: [
      { name: 's', type: 'struct', size: 3, struct: { fields: [{ name: 'a', type: 'uint16', size: 2 }] } },
      { name: 'p', type: 'nullptr', size: 1 },
    ] };
    const r = decodeDeviceFields(Buffer.from([0, 1, 0x31]), desc, 0, { base: 40 });
    assert.equal(r.end, 3);
    assert.deepEqual(r.issues.map((i) => i.offset), [40, 42]);
    assert.match(r.issues[0]!.message, /2 bytes in the stream, the VMDESCRIPTION says 3/);
    assert.match(r.issues[1]!.message, /nullptr field m\.p/);
  });

  for (const s of scenarios((e) => e.transport === 'file')) {
    test(`${s.label}: every device decodes to exactly the end walkDeviceState finds`, () => {
      const file = s.main();
      const tail = file.subarray(s.check.main.offsets.first_device!);
      const found = findTrailingVmdesc(tail)!;
      assert.ok(found, 'the fixture ends with a vmdesc');
      const layout = walkDeviceState(tail, found.vmdesc, 0);
      assert.equal(layout.sections.length, s.check.main.device_sections);
      let leaves = 0;
      for (const sec of layout.sections) {
        const desc = found.vmdesc.devices.find((d) => d.name === sec.idstr && d.instance_id === sec.instanceId)!;
        const header = 14 + Buffer.byteLength(sec.idstr, 'latin1');
        const r = decodeDeviceFields(tail, desc, sec.offset + header);
        assert.equal(r.end, sec.offset + sec.length - 5, `${sec.idstr} ends at its footer`);
        assert.deepEqual(r.issues, [], `${sec.idstr} matches its vmdesc sizes`);
        leaves += countLeaves(r.state);
      }
      assert.ok(leaves > 2000, `decoded ${leaves} values`);
    });
  }
});

function countLeaves(s: DecodedStruct): number {
  let n = 0;
  for (const f of s.fields) for (const v of f.values) n += v.kind === 'struct' ? countLeaves(v) : 1;
  for (const sub of s.subsections) n += countLeaves(sub.state);
  return n;
}
