import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { CorruptChunkError, RepositoryError, SourceError } from '../../../src/backup/errors.js';
import {
  CHUNK_HEADER_SIZE,
  ChunkCompression,
  decodeChunk,
  decodeIndex,
  encodeChunk,
  encodeIndex,
  isAllZero,
  sha256,
} from '../../../src/backup/format.js';
import { changedChunkMap, fullyCoveredChunks, parseChangedBlocks } from '../../../src/backup/engine.js';
import { pseudoRandomBytes } from '../../helpers/buffer-source.js';

describe('chunk files', () => {
  const text = Buffer.from('the quick brown fox jumps over the lazy dog\n'.repeat(3000));
  const random = pseudoRandomBytes(64 * 1024, 7);

  it('compresses compressible data (brotli by default, deflate on request), stores random data as is; all decode', async () => {
    const a = await encodeChunk(text);
    expect(a.compression).toBe(ChunkCompression.Brotli);
    expect(a.file.length).toBeLessThan(text.length / 4);
    expect((await decodeChunk(a.file, sha256(text), text.length)).equals(text)).toBe(true);
    for (const level of [0, 5, 11]) {
      const br = await encodeChunk(text, { codec: 'brotli', level });
      expect(br.compression).toBe(ChunkCompression.Brotli);
      expect((await decodeChunk(br.file, sha256(text), text.length)).equals(text)).toBe(true);
    }
    const d = await encodeChunk(text, { codec: 'deflate' });
    expect(d.compression).toBe(ChunkCompression.Deflate);
    expect(d.file.length).toBeLessThan(text.length / 4);
    expect((await decodeChunk(d.file, sha256(text), text.length)).equals(text)).toBe(true);
    const b = await encodeChunk(random);
    expect(b.compression).toBe(ChunkCompression.None);
    expect(b.file.length).toBe(CHUNK_HEADER_SIZE + random.length);
    expect((await decodeChunk(b.file, sha256(random), random.length)).equals(random)).toBe(true);
  });

  it('a flipped payload byte fails the CRC', async () => {
    for (const codec of ['brotli', 'deflate'] as const) {
      const { file } = await encodeChunk(text, { codec });
      file[CHUNK_HEADER_SIZE + 10]! ^= 0x01;
      await expect(decodeChunk(file, sha256(text), text.length, '/x/chunk')).rejects.toThrow(/CRC32 mismatch/);
      await expect(decodeChunk(file, sha256(text), text.length)).rejects.toBeInstanceOf(CorruptChunkError);
    }
  });

  it('a corrupt compressed stream with a matching CRC is a corrupt chunk, never wrong data or a crash', async () => {
    for (const codec of ['brotli', 'deflate'] as const) {
      for (const at of [0, 7, 40]) {
        const { file } = await encodeChunk(text, { codec });
        file[CHUNK_HEADER_SIZE + at]! ^= 0x5a;
        file.writeUInt32LE(crc32(file.subarray(CHUNK_HEADER_SIZE)), 16);
        const err = await decodeChunk(file, sha256(text), text.length).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(CorruptChunkError);
        expect((err as CorruptChunkError).reason).toMatch(/decompress|inflate|SHA-256/);
      }
    }
  });

  it("the 'sha256' serving check (no CRC) still rejects a flipped payload byte, by its SHA-256", async () => {
    for (const [content, compress] of [
      [text, true],
      [random, false],
    ] as const) {
      const { file } = await encodeChunk(content, { compress });
      expect((await decodeChunk(file, sha256(content), content.length, undefined, 'sha256')).equals(content)).toBe(true);
      file[CHUNK_HEADER_SIZE + 10]! ^= 0x01;
      const err = await decodeChunk(file, sha256(content), content.length, undefined, 'sha256').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CorruptChunkError);
      expect((err as CorruptChunkError).reason).toMatch(/SHA-256|decompress|inflate/);
    }
  });

  it("the 'crc32' serving check rejects a flipped payload byte or a damaged stream; it cannot tell a valid chunk stored under the wrong name, which 'sha256' does", async () => {
    for (const [content, compress] of [
      [text, true],
      [random, false],
    ] as const) {
      const { file } = await encodeChunk(content, { compress });
      expect((await decodeChunk(file, sha256(content), content.length, undefined, 'crc32')).equals(content)).toBe(true);
      const flipped = Buffer.from(file);
      flipped[CHUNK_HEADER_SIZE + 10]! ^= 0x01;
      const err = await decodeChunk(flipped, sha256(content), content.length, '/x/chunk', 'crc32').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CorruptChunkError);
      expect((err as CorruptChunkError).reason).toBe('CRC32 mismatch');
    }
    // A valid chunk of the same length filed under another chunk's digest: the limit of 'crc32'.
    const other = pseudoRandomBytes(random.length, 8);
    const { file: otherFile } = await encodeChunk(other, { compress: false });
    expect((await decodeChunk(otherFile, sha256(random), random.length, undefined, 'crc32')).equals(other)).toBe(true);
    const err = await decodeChunk(otherFile, sha256(random), random.length, undefined, 'sha256').catch((e: unknown) => e);
    expect((err as CorruptChunkError).reason).toMatch(/SHA-256/);
  });

  it('content that passes the CRC but not the SHA-256 is rejected (never wrong data)', async () => {
    const { file } = await encodeChunk(random, { compress: false });
    file[CHUNK_HEADER_SIZE + 5]! ^= 0x80;
    file.writeUInt32LE(crc32(file.subarray(CHUNK_HEADER_SIZE)), 16);
    const err = await decodeChunk(file, sha256(random), random.length, '/repo/chunks/ab/cd').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptChunkError);
    expect((err as CorruptChunkError).reason).toMatch(/SHA-256/);
    expect((err as CorruptChunkError).path).toBe('/repo/chunks/ab/cd');
  });

  it('rejects truncated files, bad magic and a length other than the index expects', async () => {
    const { file } = await encodeChunk(text);
    const d = sha256(text);
    await expect(decodeChunk(file.subarray(0, 10), d, text.length)).rejects.toThrow(/shorter than the header/);
    await expect(decodeChunk(file.subarray(0, file.length - 1), d, text.length)).rejects.toThrow(/payload is/);
    const badMagic = Buffer.from(file);
    badMagic[0] = 0;
    await expect(decodeChunk(badMagic, d, text.length)).rejects.toThrow(/bad magic/);
    await expect(decodeChunk(file, d, text.length - 1)).rejects.toThrow(/index expects/);
  });

  it('isAllZero sees a single non-zero byte anywhere', () => {
    const z = Buffer.alloc(200_000);
    expect(isAllZero(z)).toBe(true);
    z[199_999] = 1;
    expect(isAllZero(z)).toBe(false);
  });
});

describe('index files', () => {
  const meta = {
    vm: 'vm1',
    id: '2026-12-02T14-07-08.123Z',
    parent: null,
    createdAt: '2026-12-02T14:07:08.123Z',
    imageSize: 3 * 65536 + 100,
    chunkSize: 65536,
    chunkCount: 4,
    source: 'raw /x',
  };
  const digests = Buffer.concat([sha256(Buffer.from('a')), Buffer.alloc(32), sha256(Buffer.from('b')), sha256(Buffer.from('c'))]);

  it('round-trips metadata and digests', () => {
    const decoded = decodeIndex(encodeIndex({ meta, digests }), '/p');
    expect(decoded.meta).toEqual(meta);
    expect(decoded.digests.equals(digests)).toBe(true);
  });

  it('any flipped byte fails the checksum and names the file', () => {
    const file = encodeIndex({ meta, digests });
    for (const pos of [3, 20, file.length - 40, file.length - 1]) {
      const bad = Buffer.from(file);
      bad[pos]! ^= 0x10;
      expect(() => decodeIndex(bad, '/repo/vms/vm1/x.index')).toThrow(/bad index \/repo\/vms\/vm1\/x.index/);
    }
    expect(() => decodeIndex(file.subarray(0, 20), '/p')).toThrow(RepositoryError);
  });

  it('refuses a chunk count that does not fit the image size', () => {
    expect(() => encodeIndex({ meta: { ...meta, chunkCount: 5 }, digests: Buffer.concat([digests, Buffer.alloc(32)]) })).not.toThrow();
    const file = encodeIndex({ meta: { ...meta, chunkCount: 5 }, digests: Buffer.concat([digests, Buffer.alloc(32)]) });
    expect(() => decodeIndex(file, '/p')).toThrow(/does not fit image size/);
  });
});

describe('changed blocks', () => {
  it('parses JSON and "offset length" lines with comments and hex', () => {
    expect(parseChangedBlocks('[{"offset":0,"length":512},{"offset":4096,"length":1}]', 'f')).toEqual([
      { offset: 0, length: 512 },
      { offset: 4096, length: 1 },
    ]);
    expect(parseChangedBlocks('# changed\n0 512\n\n0x1000 0x10  # hex\n', 'f')).toEqual([
      { offset: 0, length: 512 },
      { offset: 4096, length: 16 },
    ]);
  });

  it('names the file and line of a bad entry', () => {
    expect(() => parseChangedBlocks('0 512\nabc 3\n', '/cbt.txt')).toThrow(/\/cbt.txt: line 2/);
    expect(() => parseChangedBlocks('[{"offset":"0"}]', '/cbt.json')).toThrow(SourceError);
    expect(() => parseChangedBlocks('[1,', '/cbt.json')).toThrow(/not valid JSON/);
  });

  it('maps ranges to every chunk they touch and rejects ranges beyond the image', () => {
    const map = changedChunkMap([{ offset: 65535, length: 2 }, { offset: 5 * 65536, length: 65536 }], 8 * 65536, 65536);
    expect([...map]).toEqual([1, 1, 0, 0, 0, 1, 0, 0]);
    expect(() => changedChunkMap([{ offset: 8 * 65536 - 1, length: 2 }], 8 * 65536, 65536)).toThrow(/beyond the image/);
    expect(() => changedChunkMap([{ offset: -1, length: 2 }], 8 * 65536, 65536)).toThrow(/non-negative/);
  });

  it('zero-range hints cover only whole chunks (the short last chunk included)', () => {
    const size = 4 * 65536 + 1000;
    // [100, 131172) and [131182, end): chunk 0 starts before 100, chunk 2 holds the 10-byte gap.
    const gapped = fullyCoveredChunks([{ offset: 100, length: 2 * 65536 }, { offset: 2 * 65536 + 110, length: 3 * 65536 }], size, 65536);
    expect([...gapped]).toEqual([0, 1, 0, 1, 1]);
    // Touching ranges merge: chunk 2 is then covered too.
    const touching = fullyCoveredChunks([{ offset: 100, length: 2 * 65536 }, { offset: 2 * 65536 + 100, length: 3 * 65536 }], size, 65536);
    expect([...touching]).toEqual([0, 1, 1, 1, 1]);
  });
});
