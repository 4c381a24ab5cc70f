// The destination's RAM page sizes as restore learns them (x-query-ramblock's text) and what a
// source announces from them (POSTCOPY_ADVISE's summary).

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { isPageSize, pageSizeSummary, parseRamblockText } from '../../src/codec/ram-page-sizes.js';
import { DestinationError, InvalidOptionError } from '../../src/codec/errors.js';
import { resolveDestinationPageSizes } from '../../src/conversations/destination-page-sizes.js';

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

describe('restore: the destination page sizes it announces', () => {
  const src = { blockList: [{ name: 'pc.ram', usedLength: 128 * 1024 * 1024 }, { name: 'pc.bios', usedLength: 256 * 1024 }] };
  /** A QMP that answers x-query-ramblock and/or HMP `info ramblock` with `text`, or refuses them. */
  const qmp = (o: { x?: string; hmp?: string }) => ({
    execute: async (cmd: string): Promise<any> => {
      if (cmd === 'x-query-ramblock' && o.x !== undefined) return { 'human-readable-text': o.x };
      if (cmd === 'human-monitor-command' && o.hmp !== undefined) return o.hmp;
      throw new Error(`The command ${cmd} has not been found`);
    },
  }) as unknown as Parameters<typeof resolveDestinationPageSizes>[0];

  test('learnt over QMP (x-query-ramblock, else HMP); 4 KiB blocks left out; nothing to note', async () => {
    for (const q of [qmp({ x: QEMU10 }), qmp({ hmp: QEMU10.replace(/\n/g, '\r\n') })]) {
      const notes: string[] = [];
      assert.deepEqual(await resolveDestinationPageSizes(q, src, undefined, notes), { 'pc.ram': 2097152 });
      assert.deepEqual(notes, []);
    }
  });

  test('a --page-size that agrees is fine; one that contradicts the destination is refused', async () => {
    assert.deepEqual(await resolveDestinationPageSizes(qmp({ x: QEMU10 }), src, { 'pc.ram': 2097152 }, []), { 'pc.ram': 2097152 });
    await assert.rejects(resolveDestinationPageSizes(qmp({ x: QEMU10 }), src, { 'pc.ram': 4096 }, []), (e: Error) => e instanceof DestinationError && /reports 2097152-byte pages/.test(e.message));
  });

  test('nothing learnt: --page-size alone, and a note saying so', async () => {
    const notes: string[] = [];
    assert.deepEqual(await resolveDestinationPageSizes(qmp({}), src, { 'pc.ram': 2097152 }, notes), { 'pc.ram': 2097152 });
    assert.match(notes.join(), /could not learn .*x-query-ramblock: The command x-query-ramblock has not been found.*used --page-size for "pc\.ram"/);
    const none: string[] = [];
    assert.deepEqual(await resolveDestinationPageSizes(qmp({}), src, undefined, none), {});
    assert.match(none.join(), /assumed 4 KiB pages for every block/);
  });

  test('refused up front: a told block the snapshot lacks, a destination with larger host pages, a block no whole number of its pages', async () => {
    await assert.rejects(resolveDestinationPageSizes(qmp({ x: QEMU10 }), src, { 'vga.vram': 2097152 }, []), (e: Error) => e instanceof InvalidOptionError && /"vga\.vram", which the snapshot does not have/.test(e.message));
    await assert.rejects(resolveDestinationPageSizes(qmp({ x: QEMU10.replace(/4 KiB/g, '64 KiB') }), src, undefined, []), (e: Error) => e instanceof DestinationError && /smallest RAM page is 65536 bytes/.test(e.message));
    const odd = { blockList: [{ name: 'pc.ram', usedLength: 3 * 1024 * 1024 }] };
    await assert.rejects(resolveDestinationPageSizes(qmp({ x: QEMU10 }), odd, undefined, []), (e: Error) => e instanceof DestinationError && /not a whole number of 2097152-byte pages.*as the destination QEMU reports/.test(e.message));
  });
});
