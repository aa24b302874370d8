import { describe, expect, it } from 'vitest';
import { LbaRangeLock } from '../../../../src/iscsi/scsi/range-lock.js';

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('LbaRangeLock', () => {
  it('grants disjoint ranges at once and makes overlapping ones wait in arrival order', async () => {
    const lock = new LbaRangeLock();
    const order: string[] = [];
    const first = await lock.acquire(0, 10);
    const disjoint = await lock.acquire(10, 5); // [10,15) does not touch [0,10)
    const overlapA = lock.acquire(5, 1).then((release) => {
      order.push('A');
      return release;
    });
    const overlapB = lock.acquire(9, 2).then((release) => {
      order.push('B');
      return release;
    });
    await tick();
    expect(order).toEqual([]);
    expect(lock.heldCount).toBe(2);
    first();
    await tick();
    // A is granted; B overlaps the still-held [10,15) range.
    expect(order).toEqual(['A']);
    disjoint();
    await tick();
    expect(order).toEqual(['A', 'B']);
    (await overlapA)();
    (await overlapB)();
    expect(lock.heldCount).toBe(0);
  });

  it('a later request does not overtake an earlier overlapping waiter', async () => {
    const lock = new LbaRangeLock();
    const order: string[] = [];
    const held = await lock.acquire(0, 4);
    const wide = lock.acquire(0, 100).then((r) => (order.push('wide'), r));
    const narrow = lock.acquire(50, 1).then((r) => (order.push('narrow'), r));
    await tick();
    expect(order).toEqual([]);
    held();
    await tick();
    expect(order).toEqual(['wide']);
    (await wide)();
    await tick();
    expect(order).toEqual(['wide', 'narrow']);
    (await narrow)();
  });

  it('releasing twice is harmless', async () => {
    const lock = new LbaRangeLock();
    const release = await lock.acquire(1, 1);
    release();
    release();
    expect(lock.heldCount).toBe(0);
  });
});
