/**
 * The backup and reader fast paths (bench/backup.ts measures them): the prefix-directory listing
 * that skips adoption probes in a fresh repository, header+payload writev, deflate levels, and the
 * reader's single right-sized read. Each test checks the behaviour the fast path must keep.
 * The prefix-directory and chunk-file tests are about the "files" chunk store (one file per chunk):
 * their repositories are created with `chunkStore: 'files'` (new repositories default to packs).
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { crc32, deflateRawSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { CorruptChunkError, RepositoryError } from '../../../src/backup/errors.js';
import { CHUNK_HEADER_SIZE, CHUNK_MAGIC, ChunkCompression, MAX_CHUNK_SIZE, decodeChunk, sha256 } from '../../../src/backup/format.js';
import { chunkFileBufferSize, openRestorePoint } from '../../../src/backup/reader.js';
import { Repository } from '../../../src/backup/repository.js';
import { silentLogger } from '../../../src/log.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { listChunkRecords, readChunkRecord } from '../../helpers/chunk-store.js';
import { readWholePoint } from '../../helpers/repo.js';
import { freshDirPerTest } from '../../helpers/per-test-dir.js';

const CHUNK = 64 * 1024;

let dir: string;
let repo: string;
freshDirPerTest('fast-paths', (path) => {
  dir = path;
  repo = join(dir, 'repo');
});

/** 12 chunks: 4 random, 2 zero, 4 distinct text chunks, 2 copies of chunk 0, plus a short tail. */
function image(): Buffer {
  const img = Buffer.alloc(12 * CHUNK + 777);
  pseudoRandomBytes(4 * CHUNK, 7).copy(img, 0);
  for (let c = 6; c < 10; c++) Buffer.from(`chunk ${c}: the quick brown fox jumps over the lazy dog\n`.repeat(2000)).copy(img, c * CHUNK, 0, CHUNK);
  img.copy(img, 10 * CHUNK, 0, CHUNK);
  img.copy(img, 11 * CHUNK, 0, CHUNK);
  pseudoRandomBytes(777, 8).copy(img, 12 * CHUNK);
  return img;
}

/** Every chunk file of a "files" repository, sorted. */
async function chunkFiles(repoDir: string): Promise<string[]> {
  const out: string[] = [];
  for (const prefix of await fsp.readdir(join(repoDir, 'chunks'))) {
    for (const name of await fsp.readdir(join(repoDir, 'chunks', prefix))) out.push(join(repoDir, 'chunks', prefix, name));
  }
  return out.sort();
}

/** The "files" store: these tests are about one file per chunk. */
const FILES = { chunkStore: 'files' } as const;

const readAll = (vm: string): Promise<Buffer> => readWholePoint(repo, vm);

describe('writer fast paths', () => {
  it('a second VM with the same content adopts every existing chunk (mtime bumped) and writes none', async () => {
    const img = image();
    const first = await backupSource(repo, new BufferSource(img, 'a'), { vm: 'a', chunkSize: CHUNK, ...FILES, logger: silentLogger() });
    expect((await Repository.open(repo)).chunkStore).toBe('files');
    // 4 random + 4 text + tail; chunks 10 and 11 repeat chunk 0.
    expect(first.stats.newChunks).toBe(9);
    expect(first.stats.dedupChunks).toBe(2);
    const files = await chunkFiles(repo);
    expect(files).toHaveLength(9);
    const old = new Date('2001-01-01T00:00:00Z');
    for (const f of files) await fsp.utimes(f, old, old);

    const second = await backupSource(repo, new BufferSource(img, 'b'), { vm: 'b', chunkSize: CHUNK, logger: silentLogger() });
    expect(second.stats.newChunks).toBe(0);
    expect(second.stats.dedupChunks).toBe(11);
    expect(await chunkFiles(repo)).toEqual(files);
    for (const f of files) expect((await fsp.stat(f)).mtimeMs).toBeGreaterThan(old.getTime() + 1000);
    expect((await readAll('b')).equals(img)).toBe(true);
  });

  it('a chunk file deleted from an existing prefix directory is written anew, and one in a new directory too', async () => {
    const img = image();
    await backupSource(repo, new BufferSource(img, 'a'), { vm: 'a', chunkSize: CHUNK, ...FILES, logger: silentLogger() });
    const files = await chunkFiles(repo);
    // Remove one chunk file (its directory stays) and one whole prefix directory.
    await fsp.rm(files[0]!);
    await fsp.rm(join(files[1]!, '..'), { recursive: true });
    const second = await backupSource(repo, new BufferSource(img, 'b'), { vm: 'b', chunkSize: CHUNK, logger: silentLogger() });
    expect(second.stats.newChunks).toBe(2);
    expect(await chunkFiles(repo)).toEqual(files);
    expect((await readAll('b')).equals(img)).toBe(true);
    expect((await readAll('a')).equals(img)).toBe(true);
  });

  it('codecs and levels give readable chunks in the same format; an invalid codec or level publishes nothing', async () => {
    const img = image();
    const level1 = await backupSource(join(dir, 'r1'), new BufferSource(img), { vm: 'v', chunkSize: CHUNK, codec: 'deflate', logger: silentLogger() }); // deflate-1
    const level6 = await backupSource(repo, new BufferSource(img), { vm: 'v', chunkSize: CHUNK, codec: 'deflate', compressionLevel: 6, logger: silentLogger() });
    expect(level6.stats.newChunks).toBe(level1.stats.newChunks);
    expect(level6.stats.newBytesStored).toBeLessThanOrEqual(level1.stats.newBytesStored);
    expect(level6.stats.newBytesStored).toBeLessThan(level6.stats.newBytesUncompressed);
    expect((await readAll('v')).equals(img)).toBe(true);
    // The same image with the default codec (brotli-2) in another repository: smaller, same content.
    const brotli = await backupSource(join(dir, 'r2'), new BufferSource(img), { vm: 'v', chunkSize: CHUNK, logger: silentLogger() });
    const kinds = new Set<number>();
    for (const rec of await listChunkRecords(join(dir, 'r2'))) kinds.add((await readChunkRecord(rec)).readUInt8(5));
    expect(kinds.has(ChunkCompression.Brotli)).toBe(true);
    expect(kinds.has(ChunkCompression.Deflate)).toBe(false);
    expect(brotli.stats.newChunks).toBe(level1.stats.newChunks);
    expect(brotli.stats.newBytesStored).toBeLessThan(level1.stats.newBytesStored);
    const reader = await openRestorePoint(join(dir, 'r2'), 'v', 'latest');
    expect((await reader.read(0, img.length)).equals(img)).toBe(true);
    await reader.close();
    for (const [codec, bad] of [
      ['deflate', 0],
      ['deflate', 10],
      ['brotli', 12],
      ['brotli', -1],
      ['brotli', 2.5],
      ['zstd', undefined],
    ] as const) {
      await expect(
        backupSource(repo, new BufferSource(img), {
          vm: 'w',
          chunkSize: CHUNK,
          codec: codec as 'brotli',
          ...(bad !== undefined ? { compressionLevel: bad } : {}),
          logger: silentLogger(),
        }),
      ).rejects.toThrow(RepositoryError);
    }
    const r = await Repository.open(repo);
    expect(await r.listPointIds('w')).toEqual([]);
  });
});

describe('chunk files written before the fast paths', () => {
  it('a chunk deflated with zlib defaults (16 KiB output steps, level 1) decodes', async () => {
    const content = Buffer.from('older repositories stay readable\n'.repeat(8000)).subarray(0, 200_000);
    const payload = deflateRawSync(content, { level: 1 });
    const header = Buffer.alloc(CHUNK_HEADER_SIZE);
    header.writeUInt32LE(CHUNK_MAGIC, 0);
    header.writeUInt8(1, 4);
    header.writeUInt8(1, 5);
    header.writeUInt32LE(content.length, 8);
    header.writeUInt32LE(payload.length, 12);
    header.writeUInt32LE(crc32(payload), 16);
    const decoded = await decodeChunk(Buffer.concat([header, payload]), sha256(content), content.length);
    expect(decoded.equals(content)).toBe(true);
  });
});

describe('reader fast path', () => {
  it('rejects a chunk file with trailing bytes, a truncated one, and an impossible length, never returning data', async () => {
    const img = image();
    await backupSource(repo, new BufferSource(img), { vm: 'v', chunkSize: CHUNK, ...FILES, logger: silentLogger() });
    const reader = await openRestorePoint(repo, 'v', 'latest');
    try {
      const r = await Repository.open(repo);
      // Chunk 0 is random (stored as is: the file is exactly header + 64 KiB); chunk 6 is deflated text.
      for (const index of [0, 6]) {
        const digest = reader.chunkDigest(index)!;
        const path = r.chunkPath(digest.toString('hex'));
        const original = await fsp.readFile(path);
        expect((await reader.loadChunk(index)).equals(img.subarray(index * CHUNK, (index + 1) * CHUNK))).toBe(true);

        await fsp.writeFile(path, Buffer.concat([original, Buffer.alloc(CHUNK + 100, 1)]));
        const longer = await reader.loadChunk(index).catch((e: unknown) => e);
        expect(longer).toBeInstanceOf(CorruptChunkError);
        expect(String(longer)).toMatch(index === 0 ? /longer than a chunk/ : /payload is|longer than a chunk/);

        await fsp.writeFile(path, Buffer.concat([original, Buffer.from([0])]));
        await expect(reader.loadChunk(index)).rejects.toBeInstanceOf(CorruptChunkError);

        await fsp.writeFile(path, original.subarray(0, original.length - 1));
        await expect(reader.loadChunk(index)).rejects.toThrow(/payload is/);

        await fsp.writeFile(path, original);
        expect((await reader.loadChunk(index)).equals(img.subarray(index * CHUNK, (index + 1) * CHUNK))).toBe(true);
      }
      await expect(reader.loadChunkByDigest(reader.chunkDigest(0)!, MAX_CHUNK_SIZE + 1)).rejects.toThrow(RepositoryError);
      await expect(reader.loadChunkByDigest(reader.chunkDigest(0)!, -1)).rejects.toThrow(RepositoryError);
      // A caller's buffer (the cache recycles evicted chunks' memory): the content of an
      // uncompressed and of a compressed chunk lands in it (copied from the worker's result for
      // ordinary memory, written by the worker for shared memory); one too small is not used.
      const into = Buffer.alloc(chunkFileBufferSize(CHUNK), 0xee);
      const raw = await reader.loadChunkByDigest(reader.chunkDigest(0)!, CHUNK, into);
      expect(raw.buffer).toBe(into.buffer);
      expect(raw.equals(img.subarray(0, CHUNK))).toBe(true);
      const text = await reader.loadChunkByDigest(reader.chunkDigest(6)!, CHUNK, into);
      expect(text.buffer).toBe(into.buffer);
      expect(text.equals(img.subarray(6 * CHUNK, 7 * CHUNK))).toBe(true);
      const shared = Buffer.from(new SharedArrayBuffer(chunkFileBufferSize(CHUNK))).fill(0xee);
      for (const index of [0, 6]) {
        const got = await reader.loadChunkByDigest(reader.chunkDigest(index)!, CHUNK, shared);
        expect(got.buffer).toBe(shared.buffer);
        expect(got.equals(img.subarray(index * CHUNK, (index + 1) * CHUNK))).toBe(true);
      }
      const small = Buffer.alloc(100);
      const own = await reader.loadChunkByDigest(reader.chunkDigest(1)!, CHUNK, small);
      expect(own.buffer).not.toBe(small.buffer);
      expect(own.equals(img.subarray(CHUNK, 2 * CHUNK))).toBe(true);
      // The short last chunk reads back through the same path.
      expect((await reader.read(12 * CHUNK, 777)).equals(img.subarray(12 * CHUNK))).toBe(true);
    } finally {
      await reader.close();
    }
  });
});
