import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackupBlockDevice, openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { silentLogger } from '../../../src/log.js';
import { FakeRestorePoint, patternBytes, seededRandom } from '../../helpers/fake-restore-point.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const identity = { serial: 'BRCACHE01', naa: Buffer.from('6001405a0b0c0d0f', 'hex'), vendor: 'BOOTREST', product: 'cache-test' };

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-cache-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

function device(point: FakeRestorePoint, cache: ChunkCache, mountId: string, readAheadChunks?: number): Promise<BackupBlockDevice> {
  return openBackupDevice({
    reader: point,
    cache,
    deltaDir: join(scratch, mountId),
    mountId,
    identity,
    logger: silentLogger(),
    ...(readAheadChunks !== undefined ? { readAheadChunks } : {}),
  });
}

async function flushMacrotasks(): Promise<void> {
  for (let i = 0; i < 20; i++) await new Promise((r) => setTimeout(r, 5));
}

describe('ChunkCache', () => {
  it('single-flight: N concurrent misses on one chunk load it once and all get the same bytes', async () => {
    const cache = new ChunkCache({ maxBytes: 8 * MiB, logger: silentLogger() });
    let loads = 0;
    const content = patternBytes(256 * KiB, 3);
    const load = async (): Promise<Buffer> => {
      loads++;
      await new Promise((r) => setTimeout(r, 20));
      return Buffer.from(content);
    };
    const results = await Promise.all(Array.from({ length: 32 }, (_, i) => cache.get('k1', `mount${i % 2}`, load)));
    expect(loads).toBe(1);
    for (const r of results) expect(r.equals(content)).toBe(true);
    const s = cache.stats();
    expect(s.loads).toBe(1);
    expect(s.misses).toBe(32);
    expect(s.joinedLoads).toBe(31);
    expect(s.bytesDecompressed).toBe(content.length);
    // Afterwards: hits, no more loads.
    await cache.get('k1', 'mount0', load);
    expect(loads).toBe(1);
    expect(cache.stats().hits).toBe(1);
  });

  it('single-flight through devices: concurrent reads of one chunk from a device load it once', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 4 * MiB, chunkSize: 1 * MiB, content: (i, len) => patternBytes(len, i + 1), loadDelayMs: 10 });
    const cache = new ChunkCache({ maxBytes: 16 * MiB, logger: silentLogger() });
    const dev = await device(point, cache, 'sf', 0);
    try {
      const reads = await Promise.all(Array.from({ length: 16 }, (_, i) => dev.read(2048 + i * 64, 8)));
      const expected = patternBytes(1 * MiB, 2);
      reads.forEach((r, i) => expect(r.equals(expected.subarray(i * 64 * 512, i * 64 * 512 + 4096))).toBe(true));
      expect(point.loads).toBe(1);
    } finally {
      await dev.close();
    }
  });

  it('a failed load is not cached and is reported to every waiter; the next read retries', async () => {
    const cache = new ChunkCache({ maxBytes: 1 * MiB, logger: silentLogger() });
    let fail = true;
    const load = async (): Promise<Buffer> => {
      await new Promise((r) => setTimeout(r, 5));
      if (fail) throw new Error('boom');
      return Buffer.alloc(4096, 1);
    };
    const settled = await Promise.allSettled([cache.get('x', 'm', load), cache.get('x', 'm', load)]);
    expect(settled.map((s) => s.status)).toEqual(['rejected', 'rejected']);
    expect(cache.has('x')).toBe(false);
    fail = false;
    expect((await cache.get('x', 'm', load)).length).toBe(4096);
    expect(cache.stats().loadFailures).toBe(1);
  });

  it('bounds its size: a sweep over 4x the cache size never holds more than maxBytes and evicts LRU entries', async () => {
    const maxBytes = 2 * MiB;
    const cache = new ChunkCache({ maxBytes, logger: silentLogger() });
    const chunk = 64 * KiB;
    let maxSeen = 0;
    for (let i = 0; i < (4 * maxBytes) / chunk; i++) {
      await cache.get(`c${i}`, 'm', async () => Buffer.alloc(chunk, i & 0xff));
      maxSeen = Math.max(maxSeen, cache.stats().bytes);
    }
    const s = cache.stats();
    expect(maxSeen).toBeLessThanOrEqual(maxBytes);
    expect(s.bytes).toBe(maxBytes);
    expect(s.entries).toBe(maxBytes / chunk);
    expect(s.evictions).toBe((3 * maxBytes) / chunk);
    // The most recent entries survive, the oldest are gone.
    expect(cache.has(`c${(4 * maxBytes) / chunk - 1}`)).toBe(true);
    expect(cache.has('c0')).toBe(false);
  });

  it('memory: reading a device 4x larger than the cache keeps cached bytes ≤ maxBytes and reads stay correct', async () => {
    const chunkSize = 256 * KiB;
    const point = await FakeRestorePoint.create({ imageSize: 8 * MiB, chunkSize, content: (i, len) => patternBytes(len, 77 + i) });
    const maxBytes = 2 * MiB;
    const cache = new ChunkCache({ maxBytes, logger: silentLogger(), maxConcurrentLoads: 4 });
    const dev = await device(point, cache, 'mem');
    const image = await point.image();
    try {
      let maxSeen = 0;
      const blocksPerRead = (128 * KiB) / 512;
      // Two sequential passes (with read-ahead) and a random pass, QD 8.
      for (let pass = 0; pass < 3; pass++) {
        const rnd = seededRandom(pass);
        for (let lba = 0; lba < dev.blockCount; lba += blocksPerRead * 8) {
          const batch = Array.from({ length: 8 }, (_, q) => {
            const at = pass < 2 ? lba + q * blocksPerRead : Math.floor(rnd() * (dev.blockCount - blocksPerRead));
            return dev.read(at, blocksPerRead).then((buf) => {
              expect(buf.equals(image.subarray(at * 512, at * 512 + buf.length))).toBe(true);
            });
          });
          await Promise.all(batch);
          maxSeen = Math.max(maxSeen, cache.stats().bytes);
        }
      }
      await flushMacrotasks();
      const s = cache.stats();
      expect(maxSeen).toBeLessThanOrEqual(maxBytes);
      expect(s.bytes).toBeLessThanOrEqual(maxBytes);
      expect(s.evictions).toBeGreaterThan(0);
      // In-flight loads are bounded too.
      expect(s.loadsInFlight).toBe(0);
    } finally {
      await dev.close();
    }
  });

  it('chunks shared by two restore points / mounts are cached once (stats prove the sharing)', async () => {
    const chunkSize = 256 * KiB;
    // Point A and point B share chunks 0..5; chunks 6..7 differ.
    const a = await FakeRestorePoint.create({ imageSize: 2 * MiB, chunkSize, content: (i, len) => patternBytes(len, i < 6 ? 500 + i : 600 + i), id: 'A' });
    const b = await FakeRestorePoint.create({ imageSize: 2 * MiB, chunkSize, content: (i, len) => patternBytes(len, i < 6 ? 500 + i : 700 + i), id: 'B' });
    const cache = new ChunkCache({ maxBytes: 32 * MiB, logger: silentLogger() });
    const devA = await device(a, cache, 'vmA', 0);
    const devB = await device(b, cache, 'vmB', 0);
    try {
      const imageA = await a.image();
      const imageB = await b.image();
      a.loads = 0;
      b.loads = 0;
      expect((await devA.read(0, devA.blockCount)).equals(imageA)).toBe(true);
      expect((await devB.read(0, devB.blockCount)).equals(imageB)).toBe(true);
      // B loaded only its two own chunks; the six shared ones came from A's loads.
      expect(a.loads).toBe(8);
      expect(b.loads).toBe(2);
      const s = cache.stats();
      expect(s.entries).toBe(10);
      expect(s.bytes).toBe(10 * chunkSize);
      expect(s.sharedEntries).toBe(6);
      expect(s.crossMountHits).toBe(6);
      expect(s.byMount['vmB']!.crossMountHits).toBe(6);
      expect(s.byMount['vmA']!.crossMountHits).toBe(0);
      expect(devB.metrics.chunksLoaded).toBe(2);
      expect(devB.metrics.cacheHits).toBe(6);
    } finally {
      await devA.close();
      await devB.close();
    }
  });
});

describe('read-ahead', () => {
  const chunkSize = 256 * KiB;
  const blocksPerChunk = chunkSize / 512;

  it('prefetches the next chunks on sequential reads and later reads hit the cache', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 8 * MiB, chunkSize, content: (i, len) => patternBytes(len, 900 + i) });
    const cache = new ChunkCache({ maxBytes: 64 * MiB, logger: silentLogger() });
    const dev = await device(point, cache, 'seq', 4);
    try {
      // 64 KiB sequential reads: 4 per chunk. After crossing into chunk 1, chunks 2..5 are prefetched.
      const step = 128;
      for (let lba = 0; lba < 2 * blocksPerChunk; lba += step) await dev.read(lba, step);
      await flushMacrotasks();
      const s = cache.stats();
      expect(s.prefetchLoads).toBe(4);
      expect(dev.metrics.readAheadChunks).toBe(4);
      for (const i of [2, 3, 4, 5]) expect(cache.has(point.chunkDigest(i)!.toString('hex'))).toBe(true);
      expect(cache.has(point.chunkDigest(6)!.toString('hex'))).toBe(false);
      // Continue sequentially: chunk 2's reads are hits on a prefetched entry.
      const missesBefore = dev.metrics.cacheMisses;
      for (let lba = 2 * blocksPerChunk; lba < 3 * blocksPerChunk; lba += step) await dev.read(lba, step);
      expect(dev.metrics.cacheMisses).toBe(missesBefore);
      expect(cache.stats().prefetchHits).toBe(1);
      // Entering chunk 2 extends the window by one (chunk 6).
      await flushMacrotasks();
      expect(cache.stats().prefetchLoads).toBe(5);
    } finally {
      await dev.close();
    }
  });

  it('leaves no holes when loads are saturated: the stream goes on prefetching from the first chunk it could not start', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 8 * MiB, chunkSize, content: (i, len) => patternBytes(len, 700 + i) });
    // 4 load slots: at most 3 prefetches at once (one is kept for demand loads), read-ahead 8 chunks.
    const cache = new ChunkCache({ maxBytes: 64 * MiB, maxConcurrentLoads: 4, logger: silentLogger() });
    const dev = await device(point, cache, 'holes', 8);
    try {
      const step = 128;
      for (let lba = 0; lba < 16 * blocksPerChunk; lba += step) {
        expect((await dev.read(lba, step)).equals(await point.read(lba * 512, step * 512))).toBe(true);
        // Let the started loads finish (the fake decompresses on the thread pool).
        for (let i = 0; i < 4 && cache.stats().loadsInFlight > 0; i++) await new Promise((r) => setTimeout(r, 5));
        expect(cache.stats().loadsInFlight).toBe(0);
      }
      // Only the stream's first two chunks were demand misses (read-ahead starts once a stream spans
      // two chunks): every later chunk had been prefetched, although each read could start at most
      // 3 of the 8 chunks of its window.
      expect(dev.metrics.cacheMisses).toBe(2);
      expect(cache.stats().prefetchLoads).toBeGreaterThanOrEqual(15);
      expect(cache.stats().loadsInFlight).toBeLessThanOrEqual(4);
    } finally {
      await dev.close();
    }
  });

  it('does not prefetch on random reads, nor on a single large read', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 8 * MiB, chunkSize, content: (i, len) => patternBytes(len, 900 + i) });
    const cache = new ChunkCache({ maxBytes: 64 * MiB, logger: silentLogger() });
    const dev = await device(point, cache, 'rnd', 4);
    try {
      const rnd = seededRandom(3);
      for (let k = 0; k < 200; k++) await dev.read(Math.floor(rnd() * (dev.blockCount - 8)), 8);
      await dev.read(0, 3 * blocksPerChunk); // one read spanning three chunks is not a sequential stream
      await flushMacrotasks();
      expect(cache.stats().prefetchLoads).toBe(0);
      expect(dev.metrics.readAheadChunks).toBe(0);
    } finally {
      await dev.close();
    }
  });

  it('is disabled when the cache is too small to hold the read-ahead window', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 8 * MiB, chunkSize, content: (i, len) => patternBytes(len, 900 + i) });
    const cache = new ChunkCache({ maxBytes: 3 * chunkSize, logger: silentLogger() });
    const dev = await device(point, cache, 'small', 8);
    try {
      for (let lba = 0; lba < 4 * blocksPerChunk; lba += 128) await dev.read(lba, 128);
      await flushMacrotasks();
      expect(cache.stats().prefetchLoads).toBe(0);
      expect(cache.stats().bytes).toBeLessThanOrEqual(3 * chunkSize);
    } finally {
      await dev.close();
    }
  });
});
