/**
 * Chunk-buffer recycling (the memory bound of a long sequential read through a small cache):
 * evicted chunks' buffers are handed to later loads, but never while a waiter may still copy from
 * them and never once a view of them left the cache (zero-copy reads, delta read-modify-write).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { chunkFileBufferSize, openRestorePoint } from '../../../src/backup/reader.js';
import { openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { silentLogger } from '../../../src/log.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';

const KiB = 1024;
const CHUNK = 64 * KiB;
const identity = { serial: 'BRRECYCLE1', naa: Buffer.from('6001405a0b0c0d1f', 'hex'), vendor: 'BOOTREST', product: 'recycle-test' };

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-recycle-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** A loader that copies `content` into `into` (as the repository reader does) and returns a view of it. */
function intoLoader(content: Buffer, seen: Array<Buffer | undefined>) {
  return async (into: Buffer | undefined): Promise<Buffer> => {
    seen.push(into);
    await new Promise((r) => setTimeout(r, 1));
    if (into === undefined) return Buffer.from(content);
    content.copy(into);
    return into.subarray(0, content.length);
  };
}

describe('ChunkCache buffer recycling', () => {
  it('a load reads into the buffer of an evicted chunk (from the next turn on) and data stays right', async () => {
    // Room for two chunks: the third load evicts the first.
    const cache = new ChunkCache({ maxBytes: 2 * CHUNK, logger: silentLogger() });
    const size = CHUNK + 1;
    const contents = [0, 1, 2, 3].map((i) => pseudoRandomBytes(CHUNK, 100 + i));
    const seen: Array<Buffer | undefined> = [];
    for (let i = 0; i < 3; i++) await cache.get(`k${i}`, 'm', intoLoader(contents[i]!, seen), size);
    expect(cache.has('k0')).toBe(false);
    await nextTurn();
    const d3 = await cache.get('k3', 'm', intoLoader(contents[3]!, seen), size);
    expect(d3.equals(contents[3]!)).toBe(true);
    // The fourth load got k0's buffer back; the first three got new ones.
    expect(seen).toHaveLength(4);
    expect(new Set(seen.slice(0, 3).map((b) => b!.buffer)).size).toBe(3);
    expect(seen[3]!.buffer).toBe(seen[0]!.buffer);
    expect(cache.stats().recycledBuffers).toBe(1);
    // The chunks still cached are intact.
    expect(cache.getCached('k2', 'm')!.equals(contents[2]!)).toBe(true);
    expect(cache.getCached('k3', 'm')!.equals(contents[3]!)).toBe(true);
  });

  it('an escaped chunk (a view handed out) is never recycled', async () => {
    const cache = new ChunkCache({ maxBytes: 2 * CHUNK, logger: silentLogger() });
    const contents = [0, 1, 2, 3].map((i) => pseudoRandomBytes(CHUNK, 200 + i));
    const seen: Array<Buffer | undefined> = [];
    const first = await cache.get('k0', 'm', intoLoader(contents[0]!, seen), CHUNK);
    cache.noteEscaped(first);
    const view = first.subarray(10, 4000);
    for (let i = 1; i < 4; i++) {
      await cache.get(`k${i}`, 'm', intoLoader(contents[i]!, seen), CHUNK);
      await nextTurn();
    }
    expect(cache.has('k0')).toBe(false);
    expect(view.equals(contents[0]!.subarray(10, 4000))).toBe(true);
    for (const b of seen.slice(1)) expect(b!.buffer).not.toBe(first.buffer);
  });

  it('a pinned chunk is not recycled until its last unpin; then it is', async () => {
    const cache = new ChunkCache({ maxBytes: 2 * CHUNK, logger: silentLogger() });
    const contents = [0, 1, 2, 3, 4].map((i) => pseudoRandomBytes(CHUNK, 250 + i));
    const seen: Array<Buffer | undefined> = [];
    const first = await cache.get('k0', 'm', intoLoader(contents[0]!, seen), CHUNK);
    cache.pin(first);
    cache.pin(first);
    const view = first.subarray(100, 5000);
    for (let i = 1; i < 4; i++) {
      await cache.get(`k${i}`, 'm', intoLoader(contents[i]!, seen), CHUNK);
      await nextTurn();
    }
    expect(cache.has('k0')).toBe(false);
    for (const b of seen.slice(1)) expect(b!.buffer).not.toBe(first.buffer);
    expect(view.equals(contents[0]!.subarray(100, 5000))).toBe(true);
    cache.unpin(first);
    await nextTurn();
    await cache.get('k4', 'm', intoLoader(contents[4]!, seen), CHUNK);
    expect(seen[4]!.buffer).not.toBe(first.buffer); // one pin is still held
    cache.unpin(first);
    await nextTurn();
    // Every chunk is evicted in turn; the next load that needs a buffer gets k0's back.
    const more = [5, 6].map((i) => pseudoRandomBytes(CHUNK, 250 + i));
    await cache.get('k5', 'm', intoLoader(more[0]!, seen), CHUNK);
    await cache.get('k6', 'm', intoLoader(more[1]!, seen), CHUNK);
    expect(seen.slice(5).some((b) => b!.buffer === first.buffer)).toBe(true);
  });

  it('waiters of a load whose entry is evicted in the same turn still copy the right bytes', async () => {
    // A cache of one chunk; loads finish together (one gate per round) and write into their buffer as
    // soon as they start, and waiters copy only after a few promise hops: a buffer handed to the next
    // load in the same turn as its eviction would be overwritten before its waiters copy it.
    const cache = new ChunkCache({ maxBytes: CHUNK, maxConcurrentLoads: 4, logger: silentLogger() });
    const contents = Array.from({ length: 16 }, (_, i) => pseudoRandomBytes(CHUNK, 300 + i));
    for (let round = 0; round < 4; round++) {
      let open!: () => void;
      const gate = new Promise<void>((r) => (open = r));
      const loader = (content: Buffer) => async (into: Buffer | undefined): Promise<Buffer> => {
        const target = into ?? Buffer.allocUnsafe(content.length);
        content.copy(target);
        await gate;
        return target.subarray(0, content.length);
      };
      const copies = contents.map((c, i) =>
        cache.get(`r${round}k${i}`, 'm', loader(c), CHUNK).then(async (b) => {
          for (let hop = 0; hop < 5; hop++) await null;
          return Buffer.from(b);
        }),
      );
      await nextTurn();
      open();
      (await Promise.all(copies)).forEach((copy, i) => expect(copy.equals(contents[i]!)).toBe(true));
      await nextTurn();
    }
    expect(cache.stats().recycledBuffers).toBeGreaterThan(0);
  });

  it('a loader that returns its own buffer (a deflated chunk) leaves the scratch buffer free for the next load', async () => {
    const cache = new ChunkCache({ maxBytes: 4 * CHUNK, logger: silentLogger() });
    const seen: Array<Buffer | undefined> = [];
    const own = async (into: Buffer | undefined): Promise<Buffer> => {
      seen.push(into);
      return pseudoRandomBytes(CHUNK, 1);
    };
    await cache.get('a', 'm', own, CHUNK);
    await cache.get('b', 'm', own, CHUNK);
    expect(seen[1]!.buffer).toBe(seen[0]!.buffer);
    expect(cache.stats().recycledBuffers).toBe(1);
  });
});

describe('ChunkCache.preallocate', () => {
  it('reserves the cache in buffers of the given size; loads read into them and the data is right', async () => {
    const size = CHUNK + 25;
    const cache = new ChunkCache({ maxBytes: 16 * CHUNK, logger: silentLogger() });
    const reserving = cache.preallocate(size);
    expect(cache.stats().preallocating).toBe(true);
    await reserving;
    // The cache's bytes plus one buffer for each of the 16 loads that may run at once.
    const expected = Math.floor((16 * CHUNK + 16 * size) / size) * size;
    expect(cache.stats()).toMatchObject({ preallocating: false, preallocatedBytes: expected, freeBufferBytes: expected });
    // Every load of this size gets a preallocated buffer (all zero, shared memory), none a new one.
    const seen: Array<Buffer | undefined> = [];
    const contents = Array.from({ length: 12 }, (_, i) => pseudoRandomBytes(CHUNK, 300 + i));
    for (let i = 0; i < contents.length; i++) {
      const data = await cache.get(`k${i}`, 'm', intoLoader(contents[i]!, seen), size);
      expect(data.equals(contents[i]!)).toBe(true);
    }
    expect(seen.every((b) => b !== undefined && b.buffer instanceof SharedArrayBuffer && b.length === size)).toBe(true);
    expect(cache.stats().recycledBuffers).toBe(12);
    // A second call does nothing.
    await cache.preallocate(size);
    expect(cache.stats().preallocatedBytes).toBe(expected);
    for (let i = 0; i < contents.length; i++) expect(cache.getCached(`k${i}`, 'm')!.equals(contents[i]!)).toBe(true);
  });

  it('free preallocated buffers make room when the cache fills with chunks of another size: free + cached stay bounded', async () => {
    const maxBytes = 32 * CHUNK;
    const cache = new ChunkCache({ maxBytes, maxConcurrentLoads: 2, logger: silentLogger() });
    await cache.preallocate(CHUNK + 25);
    const before = cache.stats();
    expect(before.freeBufferBytes).toBeGreaterThan(maxBytes - CHUNK - 25);
    // Chunks of 2 × CHUNK (another restore point's chunk size) fill the whole cache.
    const seen: Array<Buffer | undefined> = [];
    for (let i = 0; i < 40; i++) {
      await cache.get(`big${i}`, 'm', intoLoader(pseudoRandomBytes(2 * CHUNK, 400 + i), seen), 2 * CHUNK + 25);
      const s = cache.stats();
      // Beyond maxBytes: at most maxFreeBuffers (maxConcurrentLoads + 2) free buffers of each size.
      expect(s.bytes + s.freeBufferBytes).toBeLessThanOrEqual(maxBytes + 4 * (2 * CHUNK + 25) + 4 * (CHUNK + 25));
    }
    const after = cache.stats();
    expect(after.bytes).toBeGreaterThan(maxBytes - 2 * CHUNK);
    expect(after.freeBufferBytes).toBeLessThan(before.freeBufferBytes / 4);
  });

  it('counts the buffers of loads in flight: free + cached + in flight stay within maxBytes + a buffer per load slot', async () => {
    const maxBytes = 32 * CHUNK;
    const size = CHUNK + 25;
    const cache = new ChunkCache({ maxBytes, logger: silentLogger() });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const contents = Array.from({ length: 16 }, (_, i) => pseudoRandomBytes(CHUNK, 600 + i));
    const loads = contents.map((c, i) =>
      cache.get(`k${i}`, 'm', async (into) => {
        await gate;
        c.copy(into!);
        return into!.subarray(0, c.length);
      }, size),
    );
    await nextTurn();
    expect(cache.stats().loadsInFlight).toBe(16);
    await cache.preallocate(size);
    const during = cache.stats();
    expect(during.freeBufferBytes + during.bytes + 16 * size).toBeLessThanOrEqual(maxBytes + 16 * size);
    release();
    await Promise.all(loads);
    const after = cache.stats();
    expect(after.freeBufferBytes + after.bytes).toBeLessThanOrEqual(maxBytes + 16 * size);
    for (let i = 0; i < contents.length; i++) expect(cache.getCached(`k${i}`, 'm')!.equals(contents[i]!)).toBe(true);
  });

  it('stops at maxBytes (plus a buffer per concurrent load) when loads fill the cache while it reserves', async () => {
    const maxBytes = 64 * CHUNK;
    const size = CHUNK + 25;
    const cache = new ChunkCache({ maxBytes, logger: silentLogger() });
    const reserving = cache.preallocate(size);
    const seen: Array<Buffer | undefined> = [];
    const contents = Array.from({ length: 40 }, (_, i) => pseudoRandomBytes(CHUNK, 500 + i));
    await Promise.all(contents.map((c, i) => cache.get(`k${i}`, 'm', intoLoader(c, seen), size)));
    await reserving;
    const s = cache.stats();
    expect(s.bytes).toBe(40 * CHUNK);
    expect(s.bytes + s.freeBufferBytes).toBeLessThanOrEqual(maxBytes + 16 * size);
    for (let i = 0; i < contents.length; i++) expect(cache.getCached(`k${i}`, 'm')!.equals(contents[i]!)).toBe(true);
  });
});

describe('BackupBlockDevice over a real repository with a small cache', () => {
  it('readSegments: views of cached chunks that stay intact until released, merged data where the delta wrote', async () => {
    const repo = join(scratch, 'repo-segments');
    const image = Buffer.alloc(64 * CHUNK);
    for (let c = 0; c < 64; c++) {
      if (c % 8 === 5) continue; // zero chunks
      if (c % 4 === 3) Buffer.from(`text chunk ${c} `.repeat(5000)).copy(image, c * CHUNK, 0, CHUNK);
      else pseudoRandomBytes(CHUNK, 7000 + c).copy(image, c * CHUNK);
    }
    await backupSource(repo, new BufferSource(image), { vm: 'vm', chunkSize: CHUNK, logger: silentLogger() });
    const reader = await openRestorePoint(repo, 'vm', 'latest');
    const cache = new ChunkCache({ maxBytes: 8 * CHUNK, logger: silentLogger() });
    const device = await openBackupDevice({ reader, cache, deltaDir: join(scratch, 'delta-segments'), mountId: 'segments', identity, logger: silentLogger() });
    const join_ = (r: { segments: readonly Buffer[]; length: number }): Buffer => {
      const all = Buffer.concat(r.segments as Buffer[]);
      expect(all.length).toBe(r.length);
      return all;
    };
    try {
      // Held reads (like Data-In queued on a slow socket) while the whole LUN streams through the cache.
      const held = await Promise.all(
        [0, 5, 13].map(async (c) => ({ at: c * CHUNK + 1024, read: await device.readSegments((c * CHUNK + 1024) / 512, (2 * CHUNK) / 512) })),
      );
      for (let pass = 0; pass < 2; pass++) {
        for (let lba = 0; lba < device.blockCount; lba += (3 * CHUNK) / 512) {
          const blocks = Math.min((3 * CHUNK) / 512, device.blockCount - lba);
          const r = await device.readSegments(lba, blocks);
          expect(join_(r).equals(image.subarray(lba * 512, (lba + blocks) * 512))).toBe(true);
          r.release();
          await nextTurn();
        }
      }
      for (const { at, read } of held) {
        expect(join_(read).equals(image.subarray(at, at + 2 * CHUNK))).toBe(true);
        read.release();
      }
      expect(cache.stats().recycledBuffers).toBeGreaterThan(20);
      // A write in the range: the read merges delta and base.
      const patch = Buffer.alloc(4096, 0x5a);
      await device.write((10 * CHUNK + 8192) / 512, patch, { fua: false });
      const expected = Buffer.from(image.subarray(10 * CHUNK, 12 * CHUNK));
      patch.copy(expected, 8192);
      const merged = await device.readSegments((10 * CHUNK) / 512, (2 * CHUNK) / 512);
      expect(join_(merged).equals(expected)).toBe(true);
      merged.release();
    } finally {
      await device.close();
    }
  });

  it('sequential reads recycle chunk buffers; zero-copy views handed out earlier keep their bytes', async () => {
    const repo = join(scratch, 'repo');
    // 64 chunks: random (incompressible: read into recycled buffers) and text (deflated: own buffers).
    const image = Buffer.alloc(64 * CHUNK);
    for (let c = 0; c < 64; c++) {
      if (c % 4 === 3) Buffer.from(`text chunk ${c} `.repeat(5000)).copy(image, c * CHUNK, 0, CHUNK);
      else pseudoRandomBytes(CHUNK, 5000 + c).copy(image, c * CHUNK);
    }
    await backupSource(repo, new BufferSource(image), { vm: 'vm', chunkSize: CHUNK, logger: silentLogger() });
    const reader = await openRestorePoint(repo, 'vm', 'latest');
    const cache = new ChunkCache({ maxBytes: 8 * CHUNK, logger: silentLogger() });
    const device = await openBackupDevice({
      reader,
      cache,
      deltaDir: join(scratch, 'delta'),
      mountId: 'seq',
      identity,
      logger: silentLogger(),
      zeroCopyReads: true,
    });
    try {
      expect(chunkFileBufferSize(CHUNK)).toBeGreaterThan(CHUNK);
      // Zero-copy views of single chunks, kept while the rest of the LUN streams through the cache.
      const views = [0, 1, 2].map(async (c) => ({ c, view: await device.read((c * CHUNK) / 512 + 3, 8) }));
      const kept = await Promise.all(views);
      const blocksPerRead = (4 * CHUNK) / 512; // 4 chunks per read: assembled, no views escape
      const pending: Array<Promise<void>> = [];
      for (let lba = 0; lba < device.blockCount; lba += blocksPerRead) {
        const at = lba;
        pending.push(
          device.read(at, blocksPerRead).then((data) => {
            expect(data.equals(image.subarray(at * 512, at * 512 + data.length))).toBe(true);
          }),
        );
        if (pending.length === 4) await Promise.all(pending.splice(0));
      }
      await Promise.all(pending);
      for (const { c, view } of kept) expect(view.equals(image.subarray(c * CHUNK + 1536, c * CHUNK + 1536 + 4096))).toBe(true);
      const stats = cache.stats();
      expect(stats.evictions).toBeGreaterThan(40);
      expect(stats.recycledBuffers).toBeGreaterThan(20);
      // A second full pass (all misses again) still reads the image exactly.
      const again = await device.read(0, device.blockCount);
      expect(again.equals(image)).toBe(true);
    } finally {
      await device.close();
    }
  });
});
