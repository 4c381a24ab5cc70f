import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  GUEST_DIRTY_END,
  GUEST_DIRTY_START,
  GUEST_PAGE_SIZE,
  buildBootSector,
  checkDirtyInvariant,
} from '../guest/bootsector.js';

const PAGES = (GUEST_DIRTY_END - GUEST_DIRTY_START) / GUEST_PAGE_SIZE;

/** Builds a dump whose page i has byte 0 = values(i) and noise elsewhere the checker must ignore. */
function dump(values: (i: number) => number, pages = PAGES): Buffer {
  const b = Buffer.alloc(pages * GUEST_PAGE_SIZE);
  for (let i = 0; i < pages; i++) {
    b[i * GUEST_PAGE_SIZE] = values(i) & 0xff;
    b[i * GUEST_PAGE_SIZE + 1] = 0xee;
  }
  return b;
}

test('boot sector is 512 bytes with the 55 AA signature', () => {
  const s = buildBootSector();
  assert.equal(s.length, 512);
  assert.equal(s[510], 0x55);
  assert.equal(s[511], 0xaa);
  assert.equal(s[0], 0xfa, 'starts with cli');
  assert.deepEqual(buildBootSector(), s, 'deterministic');
});

test('boot sector encodes the dirty range bounds', () => {
  const s = buildBootSector();
  const start = Buffer.alloc(4);
  start.writeUInt32LE(GUEST_DIRTY_START);
  const end = Buffer.alloc(4);
  end.writeUInt32LE(GUEST_DIRTY_END);
  assert.ok(s.indexOf(Buffer.concat([Buffer.from([0xb8]), start])) >= 0, 'mov eax, START');
  assert.ok(s.indexOf(Buffer.concat([Buffer.from([0x3d]), end])) >= 0, 'cmp eax, END');
});

test('accepts a mid-pass boundary', () => {
  const r = checkDirtyInvariant(dump((i) => (i < 1000 ? 8 : 7)));
  assert.deepEqual(r, { ok: true, value: 7, boundary: 1000 });
});

test('accepts all pages equal (boundary at 0 or n)', () => {
  const r = checkDirtyInvariant(dump(() => 3));
  assert.equal(r.ok, true);
  assert.equal(r.value, 3);
});

test('accepts the wrap from 255 to 0', () => {
  const r = checkDirtyInvariant(dump((i) => (i < 5 ? 0 : 255)));
  assert.deepEqual(r, { ok: true, value: 255, boundary: 5 });
  const r2 = checkDirtyInvariant(dump((i) => (i < PAGES - 1 ? 0 : 255)));
  assert.deepEqual(r2, { ok: true, value: 255, boundary: PAGES - 1 });
  assert.equal(checkDirtyInvariant(dump(() => 255)).ok, true);
});

test('accepts a boundary at page 1', () => {
  assert.deepEqual(checkDirtyInvariant(dump((i) => (i < 1 ? 2 : 1))), { ok: true, value: 1, boundary: 1 });
});

test('honours a non-default start when naming pages', () => {
  const start = 50 * 1024 * 1024;
  const pages = (GUEST_DIRTY_END - start) / GUEST_PAGE_SIZE;
  assert.equal(checkDirtyInvariant(dump((i) => (i < 10 ? 5 : 4), pages), start).ok, true);
  const bad = checkDirtyInvariant(dump((i) => (i === 20 ? 9 : 4), pages), start);
  assert.equal(bad.ok, false);
  assert.match(bad.reason!, new RegExp('0x' + (start + 20 * GUEST_PAGE_SIZE).toString(16)));
});

test('rejects two boundaries', () => {
  const r = checkDirtyInvariant(dump((i) => (i < 100 ? 8 : i < 200 ? 7 : i < 300 ? 8 : 7)));
  assert.equal(r.ok, false);
  assert.match(r.reason!, /page 200\b/);
  assert.match(r.reason!, /second boundary/);
});

test('rejects a foreign value', () => {
  const r = checkDirtyInvariant(dump((i) => (i === 12345 ? 42 : i < 10 ? 8 : 7)));
  assert.equal(r.ok, false);
  assert.match(r.reason!, /page 12345 /);
  assert.match(r.reason!, /42/);
});

test('rejects a step that is not +1', () => {
  const down = checkDirtyInvariant(dump((i) => (i < 10 ? 7 : 8)));
  assert.equal(down.ok, false);
  assert.match(down.reason!, /page 10 /);
  assert.equal(checkDirtyInvariant(dump((i) => (i < 10 ? 9 : 7))).ok, false);
});

test('rejects a single stale page at the start', () => {
  // The mirror image (only the last page behind) is a legal mid-pass state, this is not.
  assert.equal(checkDirtyInvariant(dump((i) => (i === PAGES - 1 ? 6 : 7))).ok, true);
  const r = checkDirtyInvariant(dump((i) => (i === 0 ? 6 : 7)));
  assert.equal(r.ok, false);
  assert.match(r.reason!, /page 1 /);
});

test('rejects all zero: the guest never ran', () => {
  const r = checkDirtyInvariant(Buffer.alloc(GUEST_DIRTY_END - GUEST_DIRTY_START));
  assert.equal(r.ok, false);
  assert.match(r.reason!, /zero/);
});

test('rejects an empty dump', () => {
  assert.equal(checkDirtyInvariant(Buffer.alloc(0)).ok, false);
});
