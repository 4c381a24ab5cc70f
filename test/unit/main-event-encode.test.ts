// The relay re-encodes every main-channel record it parses; for QEMU's own streams the result must
// be the input, byte for byte (CONTINUE flags, zero records, commands, device state and vmdesc).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MainStreamParser } from '../../src/codec/main-stream-parser.js';
import { encodeMainEvent } from '../../src/codec/main-event-encode.js';
import { scenarios } from '../helpers/fixtures.js';

for (const s of scenarios((e) => e.transport === 'tcp')) {
  test(`${s.label}: main stream parsed and re-encoded is byte-identical`, () => {
    const input = s.main();
    const parser = new MainStreamParser();
    const out: Buffer[] = [];
    let continued = 0;
    // Odd chunk sizes, so records straddle pushes as they do on a socket.
    for (let at = 0; at < input.length; at += 65_521) {
      parser.push(input.subarray(at, at + 65_521));
      for (let ev = parser.next(); ev !== null; ev = parser.next()) {
        if ((ev.type === 'ram-page' || ev.type === 'ram-zero') && ev.continued) continued++;
        out.push(...encodeMainEvent(ev));
      }
    }
    const got = Buffer.concat(out);
    assert.equal(got.length, input.length, 'same length');
    const diff = got.findIndex((b, i) => b !== input[i]);
    assert.equal(diff, -1, `first difference at byte ${diff}`);
    assert.equal(continued, s.check.main.ram_record_counts.CONTINUE, 'every CONTINUE record QEMU wrote was seen as one');
  });
}
