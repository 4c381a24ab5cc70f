// The destination's RAM page sizes as restore learns them (x-query-ramblock's text) and what a
// source announces from them (POSTCOPY_ADVISE's summary).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { isPageSize, pageSizeSummary, parseRamblockText } from '../../src/codec/ram-page-sizes.js';

// QEMU 10.0.2, -m 32 with pc.ram on a 2 MiB hugetlbfs memory-backend-file (x-query-ramblock).
const QEMU10 = '              Block Name    PSize              Offset               Used              Total                HVA  RO\n' +
  '                  pc.ram    2 MiB  0x0000000000000000 0x0000000002000000 0x0000000002000000 0x00007fe338800000  rw\n' +
  '    /rom@etc/acpi/tables    4 KiB  0x0000000002080000 0x0000000000020000 0x0000000000200000 0x00007fe338200000  ro\n' +
  '                 pc.bios    4 KiB  0x0000000002000000 0x0000000000040000 0x0000000000040000 0x00007fe33aa00000  ro\n' +
  '      /rom@etc/acpi/rsdp    4 KiB  0x00000000022c0000 0x0000000000001000 0x0000000000001000 0x00007fe2f2c00000  ro\n';

test('x-query-ramblock text: the page size of every block', () => {
  assert.deepEqual([...parseRamblockText(QEMU10)], [['pc.ram', 2097152], ['/rom@etc/acpi/tables', 4096], ['pc.bios', 4096], ['/rom@etc/acpi/rsdp', 4096]]);
  // HMP's `info ramblock` has CRLF line ends; 1 GiB pages.
  assert.deepEqual([...parseRamblockText(QEMU10.replace('2 MiB', '1 GiB').replace(/\n/g, '\r\n'))][0], ['pc.ram', 1024 ** 3]);
  assert.equal(parseRamblockText('').size, 0);
  assert.equal(parseRamblockText('unknown command').size, 0);
});

test('page sizes and the ADVISE summary', () => {
  assert.ok(isPageSize(4096) && isPageSize(2097152) && isPageSize(2 ** 34));
  assert.ok(!isPageSize(2048) && !isPageSize(12288) && !isPageSize(Number.NaN));
  assert.equal(pageSizeSummary(['pc.ram', 'pc.bios'], new Map()), 4096);
  assert.equal(pageSizeSummary(['pc.ram', 'pc.bios'], new Map([['pc.ram', 2097152]])), 2097152 | 4096);
  // A block that is not in the list does not count.
  assert.equal(pageSizeSummary(['pc.bios'], new Map([['pc.ram', 2097152]])), 4096);
});
