import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StorageError } from '../../../src/block-device.js';
import { BackupBlockDevice, openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { silentLogger } from '../../../src/log.js';
import { FakeRestorePoint, patternBytes, seededRandom } from '../../helpers/fake-restore-point.js';

const identity = { serial: 'BRTEST0001', naa: Buffer.from('6001405a0b0c0d0e', 'hex'), vendor: 'BOOTREST', product: 'unit-test' };
const KiB = 1024;
const MiB = 1024 * KiB;

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-cache-dev-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

let dirCounter = 0;
async function makeDevice(
  point: FakeRestorePoint,
  opts: { cacheBytes?: number; readOnly?: boolean; cache?: ChunkCache; mountId?: string } = {},
): Promise<BackupBlockDevice> {
  const cache = opts.cache ?? new ChunkCache({ maxBytes: opts.cacheBytes ?? 64 * MiB, logger: silentLogger() });
  return openBackupDevice({
    reader: point,
    cache,
    deltaDir: opts.readOnly ? null : join(scratch, `delta-${++dirCounter}`),
    mountId: opts.mountId ?? `m${dirCounter}`,
    identity,
    logger: silentLogger(),
  });
}

/** 4 MiB image, 256 KiB chunks; chunks 3 and 9 are zero chunks. */
async function standardPoint(imageSize = 4 * MiB): Promise<FakeRestorePoint> {
  return FakeRestorePoint.create({
    imageSize,
    chunkSize: 256 * KiB,
    content: (i, len) => (i === 3 || i === 9 ? null : patternBytes(len, 1000 + i)),
  });
}

describe('BackupBlockDevice reads', () => {
  it('reads the restore point exactly, including zero chunks, and exposes its geometry', async () => {
    const point = await standardPoint();
    const dev = await makeDevice(point);
    try {
      expect(dev.blockSize).toBe(512);
      expect(dev.blockCount).toBe((4 * MiB) / 512);
      expect(dev.readOnly).toBe(false);
      expect(dev.supportsUnmap).toBe(true);
      const image = await point.image();
      expect((await dev.read(0, dev.blockCount)).equals(image)).toBe(true);
      // Reads across chunk boundaries and inside the zero chunk.
      const rnd = seededRandom(7);
      for (let k = 0; k < 100; k++) {
        const lba = Math.floor(rnd() * dev.blockCount);
        const blocks = 1 + Math.floor(rnd() * Math.min(1200, dev.blockCount - lba));
        const got = await dev.read(lba, blocks);
        expect(got.equals(image.subarray(lba * 512, (lba + blocks) * 512))).toBe(true);
      }
    } finally {
      await dev.close();
    }
  });

  it('exposes an image whose size is not a multiple of 512 as whole blocks with a zero-padded tail', async () => {
    const imageSize = 3 * 256 * KiB + 1000; // last chunk 1000 bytes
    const point = await FakeRestorePoint.create({ imageSize, chunkSize: 256 * KiB, content: (i, len) => patternBytes(len, 50 + i) });
    const dev = await makeDevice(point);
    try {
      expect(dev.blockCount).toBe(Math.ceil(imageSize / 512));
      const image = await point.image();
      const all = await dev.read(0, dev.blockCount);
      expect(all.length).toBe(dev.blockCount * 512);
      expect(all.subarray(0, imageSize).equals(image)).toBe(true);
      expect(all.subarray(imageSize).every((b) => b === 0)).toBe(true);
      const tail = await dev.read(dev.blockCount - 1, 1);
      expect(tail.subarray(0, imageSize % 512).equals(image.subarray(imageSize - (imageSize % 512)))).toBe(true);
      expect(tail.subarray(imageSize % 512).every((b) => b === 0)).toBe(true);
      // A write into the padded last block reads back whole.
      const last = patternBytes(512, 99);
      await dev.write(dev.blockCount - 1, last, { fua: false });
      expect((await dev.read(dev.blockCount - 1, 1)).equals(last)).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it('read results are the caller\'s own buffers: modifying one (as ORWRITE does) does not touch the cache', async () => {
    const point = await standardPoint();
    const cache = new ChunkCache({ maxBytes: 64 * MiB, logger: silentLogger() });
    const dev = await makeDevice(point, { cache });
    const other = await makeDevice(point, { cache, readOnly: true });
    try {
      const image = await point.image();
      const first = await dev.read(16, 8); // inside chunk 0, a cache hit path
      first.fill(0xff);
      const again = await dev.read(16, 8);
      expect(again.equals(image.subarray(16 * 512, 24 * 512))).toBe(true);
      expect((await other.read(16, 8)).equals(image.subarray(16 * 512, 24 * 512))).toBe(true);
      expect(point.loads).toBe(1 + 14); // image() loaded 14 data chunks; the device loaded chunk 0 once
    } finally {
      await dev.close();
      await other.close();
    }
  });

  it('a read-only mount refuses writes and unmap with write-protected', async () => {
    const point = await standardPoint();
    const dev = await makeDevice(point, { readOnly: true });
    try {
      expect(dev.readOnly).toBe(true);
      expect(dev.supportsUnmap).toBe(false);
      await expect(dev.write(0, Buffer.alloc(512), { fua: false })).rejects.toMatchObject({ kind: 'write-protected' });
      await expect(dev.unmap([{ lba: 0, blocks: 8 }])).rejects.toMatchObject({ kind: 'write-protected' });
      expect((await dev.read(0, 8)).equals((await point.image()).subarray(0, 4096))).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it('a corrupt chunk fails only the reads that touch it, as a medium error naming the digest', async () => {
    const point = await standardPoint();
    const dev = await makeDevice(point);
    try {
      const bad = point.chunkDigest(5)!.toString('hex');
      point.corrupt.add(bad);
      const image = await point.image().catch(() => null);
      expect(image).toBeNull(); // the fake really refuses the corrupt chunk
      const chunkBlocks = (256 * KiB) / 512;
      const results = await Promise.allSettled([
        dev.read(5 * chunkBlocks + 10, 8), // inside the bad chunk
        dev.read(4 * chunkBlocks, 8), // a good chunk
        dev.read(5 * chunkBlocks - 4, 8), // straddles into the bad chunk
        dev.read(6 * chunkBlocks, 16), // a good chunk
      ]);
      expect(results.map((r) => r.status)).toEqual(['rejected', 'fulfilled', 'rejected', 'fulfilled']);
      const err = (results[0] as PromiseRejectedResult).reason as StorageError;
      expect(err).toBeInstanceOf(StorageError);
      expect(err.kind).toBe('medium-error');
      expect(err.message).toContain(bad);
      const good = (results[1] as PromiseFulfilledResult<Buffer>).value;
      expect(good.equals(patternBytes(256 * KiB, 1004).subarray(0, 4096))).toBe(true);
      expect(dev.metrics.readErrors).toBe(2);
      // A partial write into the corrupt chunk needs its base content: it fails as well, storing nothing.
      await expect(dev.write(5 * chunkBlocks + 1, Buffer.alloc(512, 1), { fua: false })).rejects.toMatchObject({ kind: 'medium-error' });
      // A whole-unit write does not need the base: it succeeds and then reads back without the chunk.
      await dev.write(5 * chunkBlocks, Buffer.alloc(4096, 7), { fua: false });
      expect((await dev.read(5 * chunkBlocks, 8)).every((b) => b === 7)).toBe(true);
      point.corrupt.delete(bad);
      expect((await dev.read(5 * chunkBlocks + 8, 8)).equals(patternBytes(256 * KiB, 1005).subarray(4096, 8192))).toBe(true);
    } finally {
      await dev.close();
    }
  });
});

describe('BackupBlockDevice writes (delta)', () => {
  it('random writes of random sizes at 512-byte granularity read back like a model buffer, also after reopen', async () => {
    const point = await standardPoint();
    const cache = new ChunkCache({ maxBytes: 64 * MiB, logger: silentLogger() });
    const deltaDir = join(scratch, 'model-delta');
    const open = () =>
      openBackupDevice({ reader: point, cache, deltaDir, mountId: 'model', identity, logger: silentLogger() });
    const model = await point.image();
    let dev = await open();
    const rnd = seededRandom(42);
    const blocks = dev.blockCount;
    try {
      for (let k = 0; k < 400; k++) {
        const lba = Math.floor(rnd() * blocks);
        const n = 1 + Math.floor(rnd() * Math.min(rnd() < 0.8 ? 9 : 300, blocks - lba));
        const r = rnd();
        if (r < 0.75) {
          const data = patternBytes(n * 512, 5000 + k);
          // Issue some writes concurrently with a read of an overlapping range.
          await Promise.all([dev.write(lba, data, { fua: rnd() < 0.1 }), dev.read(lba, n)]);
          data.copy(model, lba * 512);
        } else if (r < 0.9) {
          await dev.unmap([{ lba, blocks: n }]);
          model.fill(0, lba * 512, (lba + n) * 512);
        } else {
          await dev.flush();
        }
        if (k % 50 === 0) expect((await dev.read(0, blocks)).equals(model)).toBe(true);
      }
      expect((await dev.read(0, blocks)).equals(model)).toBe(true);
      for (let k = 0; k < 300; k++) {
        const lba = Math.floor(rnd() * blocks);
        const n = 1 + Math.floor(rnd() * Math.min(64, blocks - lba));
        expect((await dev.read(lba, n)).equals(model.subarray(lba * 512, (lba + n) * 512))).toBe(true);
      }
      await dev.close();
      dev = await open();
      expect((await dev.read(0, blocks)).equals(model)).toBe(true);
      expect(point.closed).toBe(true); // the device closed its reader
    } finally {
      await dev.close();
    }
  });

  it('concurrent partial writes into one 4 KiB unit never lose each other (read-modify-write is serialised)', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 1 * MiB, chunkSize: 256 * KiB, content: (i, len) => patternBytes(len, 7 + i), loadDelayMs: 5 });
    const dev = await makeDevice(point);
    try {
      const model = await point.image();
      const writes: Array<Promise<void>> = [];
      // Eight 512-byte writes, one per sector of unit 3, all in flight at once; plus two straddling writes.
      for (let s = 0; s < 8; s++) {
        const data = Buffer.alloc(512, 0x10 + s);
        writes.push(dev.write(3 * 8 + s, data, { fua: false }));
        data.copy(model, (3 * 8 + s) * 512);
      }
      const straddle = Buffer.alloc(1024, 0xee);
      writes.push(dev.write(5 * 8 - 1, straddle, { fua: false }));
      straddle.copy(model, (5 * 8 - 1) * 512);
      await Promise.all(writes);
      expect((await dev.read(0, dev.blockCount)).equals(model)).toBe(true);
      expect(dev.stats().delta!.presentUnits).toBe(3); // units 3, 4 and 5
    } finally {
      await dev.close();
    }
  });

  it('unmap and write-same-zero semantics: whole units deallocate, partial units read as zeroes, base stays untouched', async () => {
    const point = await standardPoint();
    const dev = await makeDevice(point);
    try {
      const model = await point.image();
      // Unaligned unmap of blocks 3..48: units 1..5 whole, units 0 and 6 partly.
      await dev.unmap([{ lba: 3, blocks: 46 }]);
      model.fill(0, 3 * 512, 49 * 512);
      // A second range in the same call, unit-aligned.
      await dev.unmap([
        { lba: 1000, blocks: 16 },
        { lba: 2048, blocks: 512 },
      ]);
      model.fill(0, 1000 * 512, 1016 * 512);
      model.fill(0, 2048 * 512, 2560 * 512);
      expect((await dev.read(0, dev.blockCount)).equals(model)).toBe(true);
      const st = dev.stats().delta!;
      // Units 1..5 from the first range, 125..126 (1000..1015), 256..319 (2048..2559).
      expect(st.zeroUnits).toBe(5 + 2 + 64);
      // Partial units 0 and 6 hold zeroes written into the delta.
      expect(st.presentUnits).toBe(2);
      // Writing into a deallocated unit fills the rest with zeroes, not base data.
      const data = Buffer.alloc(512, 0xab);
      await dev.write(2048 + 3, data, { fua: false });
      data.copy(model, (2048 + 3) * 512);
      expect((await dev.read(2048, 16)).equals(model.subarray(2048 * 512, 2064 * 512))).toBe(true);
      // Unmap of the whole device, then everything reads zero; the backup itself is unchanged.
      await dev.unmap([{ lba: 0, blocks: dev.blockCount }]);
      expect((await dev.read(0, dev.blockCount)).every((b) => b === 0)).toBe(true);
      expect((await point.image()).equals(await (await standardPoint()).image())).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it('status() reports honest mapped/deallocated runs (backup zero chunks, writes, unmaps)', async () => {
    const point = await standardPoint(); // 16 chunks of 512 blocks; chunks 3 and 9 are zero
    const dev = await makeDevice(point);
    try {
      const C = 512; // blocks per chunk
      expect(await dev.status!(0)).toEqual({ mapped: true, blocks: 3 * C });
      expect(await dev.status!(100)).toEqual({ mapped: true, blocks: 3 * C - 100 });
      expect(await dev.status!(3 * C)).toEqual({ mapped: false, blocks: C });
      expect(await dev.status!(4 * C)).toEqual({ mapped: true, blocks: 5 * C });
      expect(await dev.status!(9 * C + 5)).toEqual({ mapped: false, blocks: C - 5 });
      expect(await dev.status!(15 * C)).toEqual({ mapped: true, blocks: C });
      // Writing into the zero chunk maps one unit; unmapping in a data chunk deallocates.
      await dev.write(3 * C + 16, Buffer.alloc(4096, 1), { fua: false });
      expect(await dev.status!(3 * C)).toEqual({ mapped: false, blocks: 16 });
      expect(await dev.status!(3 * C + 16)).toEqual({ mapped: true, blocks: 8 });
      expect(await dev.status!(3 * C + 24)).toEqual({ mapped: false, blocks: C - 24 });
      await dev.unmap([{ lba: 1 * C, blocks: 64 }]);
      expect(await dev.status!(0)).toEqual({ mapped: true, blocks: C });
      expect(await dev.status!(C)).toEqual({ mapped: false, blocks: 64 });
      expect(await dev.status!(C + 64)).toEqual({ mapped: true, blocks: 2 * C - 64 });
      // A run ends exactly at the end of the device.
      const last = await dev.status!(dev.blockCount - 1);
      expect(last).toEqual({ mapped: true, blocks: 1 });
    } finally {
      await dev.close();
    }
    // A read-only mount (no delta) reports the backup's layout alone.
    const ro = await makeDevice(await standardPoint(), { readOnly: true });
    try {
      expect(await ro.status!(0)).toEqual({ mapped: true, blocks: 3 * 512 });
      expect(await ro.status!(3 * 512 + 7)).toEqual({ mapped: false, blocks: 512 - 7 });
      expect(await ro.status!(10 * 512)).toEqual({ mapped: true, blocks: 6 * 512 });
    } finally {
      await ro.close();
    }
  });
});
