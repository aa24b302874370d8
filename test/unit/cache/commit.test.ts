/**
 * The cache layer over the real repository (src/backup writer + reader): a mounted restore point
 * takes writes into its delta, `commitSpecFor` turns base + delta into a new restore point that
 * reuses every untouched chunk from the parent, and a chunk corrupted on disk fails only its reads.
 */
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRestorePoint } from '../../../src/backup/reader.js';
import { Repository } from '../../../src/backup/repository.js';
import { writeRestorePoint } from '../../../src/backup/writer.js';
import { commitSpecFor, openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { silentLogger } from '../../../src/log.js';
import { chunkRecordLocation, corruptChunk, readChunkRecord } from '../../helpers/chunk-store.js';
import { pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { CorruptChunkError } from '../../../src/backup/errors.js';
import { patternBytes, seededRandom } from '../../helpers/fake-restore-point.js';

const KiB = 1024;
const CHUNK = 64 * KiB;
const IMAGE_SIZE = 32 * CHUNK + 1000; // 33 chunks, the last one 1000 bytes: LUN rounds up to whole blocks
const identity = { serial: 'BRCOMMIT1', naa: Buffer.from('6001405a0b0c0d10', 'hex'), vendor: 'BOOTREST', product: 'commit-test' };

let scratch: string;
let repoDir: string;
let basePointId: string;
let baseImage: Buffer;

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-commit-'));
  repoDir = join(scratch, 'repo');
  await Repository.openOrCreate(repoDir);
  baseImage = Buffer.alloc(IMAGE_SIZE);
  for (let i = 0; i * CHUNK < IMAGE_SIZE; i++) {
    if (i % 5 === 4) continue; // zero chunks
    const len = Math.min(CHUNK, IMAGE_SIZE - i * CHUNK);
    patternBytes(len, 4000 + (i % 7)).copy(baseImage, i * CHUNK); // repeated content: dedup inside the point
  }
  const result = await writeRestorePoint(repoDir, {
    vm: 'vm1',
    parent: null,
    imageSize: IMAGE_SIZE,
    chunkSize: CHUNK,
    source: 'commit.test base',
    chunkContent: async (index, length) => Buffer.from(baseImage.subarray(index * CHUNK, index * CHUNK + length)),
  });
  basePointId = result.info.id;
});

afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

describe('BackupBlockDevice over the real repository', () => {
  it('serves the restore point, stores writes in the delta, and commits base + delta as a new restore point', async () => {
    const reader = await openRestorePoint(repoDir, 'vm1', basePointId);
    const device = await openBackupDevice({
      reader,
      cache: new ChunkCache({ maxBytes: 1024 * KiB, logger: silentLogger() }),
      deltaDir: join(scratch, 'delta-commit'),
      mountId: 'vm1-commit',
      identity,
      logger: silentLogger(),
    });
    const lunBytes = device.blockCount * 512;
    expect(lunBytes).toBe(Math.ceil(IMAGE_SIZE / 512) * 512);
    const model = Buffer.alloc(lunBytes);
    baseImage.copy(model);
    let committedId: string;
    try {
      expect((await device.read(0, device.blockCount)).equals(model)).toBe(true);
      const rnd = seededRandom(11);
      const touchedChunks = new Set<number>();
      // Writes confined to chunks 0..19 (so chunks 20..32 stay the parent's), plus an unmap of whole chunk 7.
      for (let k = 0; k < 60; k++) {
        const lba = Math.floor(rnd() * ((20 * CHUNK) / 512 - 64));
        const blocks = 1 + Math.floor(rnd() * 40);
        const data = patternBytes(blocks * 512, 9000 + k);
        await device.write(lba, data, { fua: false });
        data.copy(model, lba * 512);
        for (let c = Math.floor((lba * 512) / CHUNK); c <= Math.floor(((lba + blocks) * 512 - 1) / CHUNK); c++) touchedChunks.add(c);
      }
      await device.unmap([{ lba: (7 * CHUNK) / 512, blocks: CHUNK / 512 }]);
      model.fill(0, 7 * CHUNK, 8 * CHUNK);
      touchedChunks.add(7);
      await device.flush();
      expect((await device.read(0, device.blockCount)).equals(model)).toBe(true);

      const commit = await writeRestorePoint(repoDir, commitSpecFor(device, reader, { vm: 'vm1', parent: basePointId, source: 'commit of vm1-commit' }), {
        logger: silentLogger(),
      });
      committedId = commit.info.id;
      expect(commit.info.parent).toBe(basePointId);
      // Untouched chunks were taken from the parent without reading them.
      // (the writer counts untouched zero chunks as zero chunks, not parent chunks).
      const untouchedDataChunks = Array.from({ length: 33 }, (_, i) => i).filter((i) => !touchedChunks.has(i) && i % 5 !== 4);
      expect(commit.stats.parentChunks).toBe(untouchedDataChunks.length);
      // Only touched chunks were merged and handed over as bytes; the unmapped chunk 7 came as 'zero'.
      expect(commit.stats.bytesRead).toBe((touchedChunks.size - 1) * CHUNK);
      expect(commit.stats.zeroChunks).toBeGreaterThanOrEqual(1); // chunk 7 was unmapped whole
      expect(commit.stats.newChunks).toBeLessThanOrEqual(touchedChunks.size);
    } finally {
      await device.close();
    }
    // The new restore point holds exactly base + delta; the old one is unchanged.
    const committed = await openRestorePoint(repoDir, 'vm1', committedId);
    expect((await committed.read(0, IMAGE_SIZE)).equals(model.subarray(0, IMAGE_SIZE))).toBe(true);
    await committed.close();
    const base = await openRestorePoint(repoDir, 'vm1', basePointId);
    expect((await base.read(0, IMAGE_SIZE)).equals(baseImage)).toBe(true);
    await base.close();
  });

  it('a chunk damaged on disk fails the reads that need it with a medium error; others still work', async () => {
    const reader = await openRestorePoint(repoDir, 'vm1', basePointId);
    const digest = reader.chunkDigest(2)!.toString('hex');
    expect((await Repository.open(repoDir)).chunkStore).toBe('packs'); // the default store
    const damaged = await corruptChunk(repoDir, digest, undefined, 0x55);
    const device = await openBackupDevice({
      reader,
      cache: new ChunkCache({ maxBytes: 1024 * KiB, logger: silentLogger() }),
      deltaDir: null,
      mountId: 'vm1-corrupt',
      identity,
      logger: silentLogger(),
    });
    try {
      // Chunk 2 has the same content as chunk 16 (pattern 4000 + 2): both share the damaged record.
      const blocksPerChunk = CHUNK / 512;
      const results = await Promise.allSettled([
        device.read(2 * blocksPerChunk, 8),
        device.read(0, 8),
        device.read(16 * blocksPerChunk + 100, 1),
        device.read(3 * blocksPerChunk, blocksPerChunk),
      ]);
      expect(results.map((r) => r.status)).toEqual(['rejected', 'fulfilled', 'rejected', 'fulfilled']);
      const reason = (results[0] as PromiseRejectedResult).reason as { kind?: string; message: string };
      expect(reason.kind).toBe('medium-error');
      expect(reason.message).toContain(digest);
      expect((results[3] as PromiseFulfilledResult<Buffer>).value.equals(baseImage.subarray(3 * CHUNK, 4 * CHUNK))).toBe(true);
    } finally {
      await device.close();
      await damaged.restore();
    }
  });

  it("commit refuses a touched chunk whose base is a valid chunk stored under another digest, which a 'crc32' mount serves", async () => {
    // Its own repository: four random (so uncompressed, equal-length) chunks.
    const repo = join(scratch, 'repo-swapped');
    await Repository.openOrCreate(repo);
    const image = Buffer.concat([0, 1, 2, 3].map((i) => pseudoRandomBytes(CHUNK, 700 + i)));
    const point = await writeRestorePoint(repo, {
      vm: 'vm2',
      parent: null,
      imageSize: image.length,
      chunkSize: CHUNK,
      source: 'swapped-chunk test',
      chunkContent: async (index, length) => Buffer.from(image.subarray(index * CHUNK, index * CHUNK + length)),
    });
    const reader = await openRestorePoint(repo, 'vm2', point.info.id, { verification: 'crc32' });
    const victim = reader.chunkDigest(1)!.toString('hex');
    // Chunk 1's record now holds chunk 2's (valid header, CRC and length).
    const at = await chunkRecordLocation(repo, victim);
    const donor = await readChunkRecord(await chunkRecordLocation(repo, reader.chunkDigest(2)!.toString('hex')));
    expect(donor.length).toBe(at.length);
    const fh = await open(at.path, 'r+');
    await fh.write(donor, 0, donor.length, at.offset);
    await fh.close();
    const device = await openBackupDevice({
      reader,
      cache: new ChunkCache({ maxBytes: 1024 * KiB, logger: silentLogger() }),
      deltaDir: join(scratch, 'delta-swapped'),
      mountId: 'vm2-swapped',
      identity,
      logger: silentLogger(),
    });
    try {
      // What 'crc32' cannot see: the mount serves chunk 2's bytes as chunk 1.
      const blocksPerChunk = CHUNK / 512;
      expect((await device.read(blocksPerChunk, blocksPerChunk)).equals(image.subarray(2 * CHUNK, 3 * CHUNK))).toBe(true);
      expect(device.keepsBaseBytes(1)).toBe(true);
      await device.write(blocksPerChunk + 4, Buffer.alloc(1024, 0x5a), { fua: true }); // touches part of chunk 1
      expect(device.keepsBaseBytes(1)).toBe(true);
      // Chunks rewritten or unmapped whole keep nothing of their base: commit need not check it.
      await device.write(3 * blocksPerChunk, Buffer.alloc(CHUNK, 0x6b), { fua: true });
      await device.unmap([{ lba: 0, blocks: blocksPerChunk }]);
      expect([device.keepsBaseBytes(0), device.keepsBaseBytes(2), device.keepsBaseBytes(3)]).toEqual([false, true, false]);
      const base = await openRestorePoint(repo, 'vm2', point.info.id); // 'sha256', as MountManager.commit opens it
      try {
        const err = await writeRestorePoint(repo, commitSpecFor(device, base, { vm: 'vm2', parent: point.info.id, source: 'commit' }), {
          logger: silentLogger(),
        }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(CorruptChunkError);
        expect((err as CorruptChunkError).message).toContain(`corrupt chunk ${victim}: SHA-256 of the content does not match its name`);
      } finally {
        await base.close();
      }
      expect(await (await Repository.open(repo)).listPointIds('vm2')).toEqual([point.info.id]); // nothing committed
    } finally {
      await device.close();
    }
  });
});
