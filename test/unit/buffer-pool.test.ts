// The fixed-size buffer pool behind the S3 reader's chunks: reuse, the bound on what it keeps,
// and refusing what is not its own.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';
import { BufferPool } from '../../src/engine/buffer-pool.js';

describe('BufferPool', () => {
  test('a buffer given back is the next one taken; none made while free ones wait', () => {
    const pool = new BufferPool(4096, 2);
    const a = pool.take();
    const b = pool.take();
    assert.equal(a.length, 4096);
    assert.notEqual(a.buffer, b.buffer);
    pool.give(a);
    assert.equal(pool.take(), a);
    pool.give(a);
    pool.give(b);
    const taken = [pool.take(), pool.take()];
    assert.deepEqual(new Set(taken), new Set([a, b]));
    assert.deepEqual(pool.stats, { allocated: 2, reused: 3, dropped: 0 });
  });

  test('at most `capacity` are kept; more given back are dropped, and take() never fails', () => {
    const pool = new BufferPool(1024, 2);
    const bufs = Array.from({ length: 5 }, () => pool.take());
    for (const b of bufs) pool.give(b);
    assert.equal(pool.idle, 2);
    assert.equal(pool.stats.dropped, 3);
    pool.take();
    pool.take();
    assert.equal(pool.take().length, 1024, 'an empty pool makes a new buffer');
    assert.equal(pool.stats.allocated, 6);
    pool.clear();
    assert.equal(pool.idle, 0);
  });

  test('views, other sizes and double returns are refused (they would hand out memory in use)', () => {
    const pool = new BufferPool(8192, 4);
    const a = pool.take();
    assert.throws(() => pool.give(a.subarray(0, 4096)), /does not belong/);
    assert.throws(() => pool.give(a.subarray(4096)), /does not belong/);
    assert.throws(() => pool.give(Buffer.alloc(4096)), /does not belong/);
    pool.give(a);
    assert.throws(() => pool.give(a), /twice/);
    assert.throws(() => new BufferPool(0, 1), RangeError);
    assert.throws(() => new BufferPool(10, -1), RangeError);
  });
});
