/**
 * All-zero ranges of a restore point are served as views of one shared zero buffer (no allocation or
 * fill per read). These tests prove the results stay correct, that owned-result mounts still get a
 * buffer of their own, and that writes over zero chunks never touch the shared buffer.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type BackupBlockDevice, openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { silentLogger } from '../../../src/log.js';
import { FakeRestorePoint, patternBytes } from '../../helpers/fake-restore-point.js';

const identity = { serial: 'BRTEST0002', naa: Buffer.from('6001405a0b0c0d0f', 'hex'), vendor: 'BOOTREST', product: 'unit-test' };
const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 256 * KiB;
const BLOCKS_PER_CHUNK = CHUNK / 512;

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-zero-reads-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/** 8 MiB image of 256 KiB chunks: chunks 2..5 (1 MiB) and 12..27 (4 MiB) are zero chunks, the rest data. */
async function pointWithZeroRuns(): Promise<FakeRestorePoint> {
  return FakeRestorePoint.create({
    imageSize: 8 * MiB,
    chunkSize: CHUNK,
    content: (i, len) => ((i >= 2 && i <= 5) || (i >= 12 && i <= 27) ? null : patternBytes(len, 300 + i)),
  });
}

let counter = 0;
async function makeDevice(point: FakeRestorePoint, opts: { zeroCopyReads: boolean; writable: boolean }): Promise<BackupBlockDevice> {
  return openBackupDevice({
    reader: point,
    cache: new ChunkCache({ maxBytes: 64 * MiB, logger: silentLogger() }),
    deltaDir: opts.writable ? join(scratch, `delta-${++counter}`) : null,
    mountId: `z${++counter}`,
    identity,
    logger: silentLogger(),
    zeroCopyReads: opts.zeroCopyReads,
  });
}

const isZero = (b: Buffer): boolean => b.every((x) => x === 0);

describe('reads of all-zero chunk ranges', () => {
  it('zero-copy mount: shares one zero buffer across reads, of 1 chunk, 4 chunks and 16 chunks, and stays exact', async () => {
    const point = await pointWithZeroRuns();
    const image = await point.image();
    const dev = await makeDevice(point, { zeroCopyReads: true, writable: false });
    try {
      const run1 = await dev.read(2 * BLOCKS_PER_CHUNK, 4 * BLOCKS_PER_CHUNK); // 1 MiB, 4 zero chunks
      const single = await dev.read(3 * BLOCKS_PER_CHUNK + 7, 100); // inside one zero chunk
      expect(run1.length).toBe(MiB);
      expect(isZero(run1)).toBe(true);
      expect(isZero(single)).toBe(true);
      expect(single.buffer).toBe(run1.buffer); // both views of the shared zero buffer: no allocation
      const run4 = await dev.read(12 * BLOCKS_PER_CHUNK, 16 * BLOCKS_PER_CHUNK); // 4 MiB: grows the shared buffer
      expect(run4.length).toBe(4 * MiB);
      expect(isZero(run4)).toBe(true);
      // A range with data and zero chunks is assembled, exactly.
      const mixed = await dev.read(1 * BLOCKS_PER_CHUNK + 3, 6 * BLOCKS_PER_CHUNK);
      expect(mixed.buffer).not.toBe(run1.buffer);
      expect(mixed.equals(image.subarray((BLOCKS_PER_CHUNK + 3) * 512, (7 * BLOCKS_PER_CHUNK + 3) * 512))).toBe(true);
      expect((await dev.read(0, dev.blockCount)).equals(image)).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it('owned-result mount: every zero read is the caller\'s own buffer (modifying it changes no later read)', async () => {
    const point = await pointWithZeroRuns();
    const dev = await makeDevice(point, { zeroCopyReads: false, writable: false });
    try {
      const run = await dev.read(2 * BLOCKS_PER_CHUNK, 4 * BLOCKS_PER_CHUNK);
      const single = await dev.read(4 * BLOCKS_PER_CHUNK, 8);
      expect(isZero(run) && isZero(single)).toBe(true);
      expect(run.buffer).not.toBe(single.buffer);
      run.fill(0xaa);
      single.fill(0x55);
      expect(isZero(await dev.read(2 * BLOCKS_PER_CHUNK, 4 * BLOCKS_PER_CHUNK))).toBe(true);
      expect(isZero(await dev.read(4 * BLOCKS_PER_CHUNK, 8))).toBe(true);
      expect(isZero(await dev.read(12 * BLOCKS_PER_CHUNK, 16 * BLOCKS_PER_CHUNK))).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it('a partial write into a zero chunk reads back merged, and other zero ranges stay zero', async () => {
    const point = await pointWithZeroRuns();
    const dev = await makeDevice(point, { zeroCopyReads: true, writable: true });
    try {
      const data = patternBytes(4096, 9);
      const lba = 3 * BLOCKS_PER_CHUNK + 16; // inside zero chunk 3, not unit aligned on both ends
      await dev.write(lba, data, { fua: false });
      const chunk = await dev.read(3 * BLOCKS_PER_CHUNK, BLOCKS_PER_CHUNK);
      const expected = Buffer.alloc(CHUNK);
      data.copy(expected, 16 * 512);
      expect(chunk.equals(expected)).toBe(true);
      // The shared zero buffer was only read from: untouched zero ranges are still zero.
      expect(isZero(await dev.read(4 * BLOCKS_PER_CHUNK, 2 * BLOCKS_PER_CHUNK))).toBe(true);
      expect(isZero(await dev.read(12 * BLOCKS_PER_CHUNK, 16 * BLOCKS_PER_CHUNK))).toBe(true);
    } finally {
      await dev.close();
    }
  });
});
