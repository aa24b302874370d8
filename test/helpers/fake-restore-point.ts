/**
 * An in-memory RestorePointReader for unit tests of src/cache. Chunks are stored deflated and loaded
 * with async zlib + SHA-256 verification like the real reader, so loads are genuinely asynchronous.
 * Counts loads per chunk index; can mark chunks corrupt (load throws CorruptChunkError).
 */
import { createHash } from 'node:crypto';
import { promisify } from 'node:util';
import { deflate, inflate } from 'node:zlib';
import { CorruptChunkError } from '../../src/backup/errors.js';
import type { RestorePointInfo, RestorePointReader } from '../../src/backup/types.js';
import { xorshift32 } from './prng.js';

const deflateAsync = promisify(deflate);
const inflateAsync = promisify(inflate);

export interface FakeRestorePointOptions {
  readonly imageSize: number;
  readonly chunkSize: number;
  /** Content of chunk `index` (chunkLength bytes), or null for an all-zero chunk. */
  readonly content: (index: number, length: number) => Buffer | null;
  readonly id?: string;
  /** Extra delay per load (ms), to widen race windows. */
  readonly loadDelayMs?: number;
}

export class FakeRestorePoint implements RestorePointReader {
  readonly info: RestorePointInfo;
  readonly imageSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  /** Loads by digest hex. */
  readonly loadsByDigest = new Map<string, number>();
  /** Digests (hex) whose load fails as corrupt. */
  readonly corrupt = new Set<string>();
  loads = 0;
  closed = false;
  private readonly digests: Array<Buffer | null> = [];
  private readonly stored = new Map<string, Buffer>();
  private readonly loadDelayMs: number;

  private constructor(options: FakeRestorePointOptions) {
    this.imageSize = options.imageSize;
    this.chunkSize = options.chunkSize;
    this.chunkCount = Math.ceil(options.imageSize / options.chunkSize);
    this.loadDelayMs = options.loadDelayMs ?? 0;
    let zeroChunks = 0;
    for (let i = 0; i < this.chunkCount; i++) if (options.content(i, this.chunkLength(i)) === null) zeroChunks++;
    this.info = {
      vm: 'fake',
      id: options.id ?? 'fake-point',
      parent: null,
      createdAt: new Date(0).toISOString(),
      imageSize: options.imageSize,
      chunkSize: options.chunkSize,
      chunkCount: this.chunkCount,
      zeroChunks,
      source: 'test',
    };
  }

  static async create(options: FakeRestorePointOptions): Promise<FakeRestorePoint> {
    const point = new FakeRestorePoint(options);
    for (let i = 0; i < point.chunkCount; i++) {
      const data = options.content(i, point.chunkLength(i));
      if (data === null) {
        point.digests.push(null);
        continue;
      }
      if (data.length !== point.chunkLength(i)) throw new Error(`content(${i}) returned ${data.length} bytes`);
      const digest = createHash('sha256').update(data).digest();
      point.digests.push(digest);
      point.stored.set(digest.toString('hex'), await deflateAsync(data));
    }
    return point;
  }

  /** The full image content (zero chunks as zeroes), for model comparisons. */
  async image(): Promise<Buffer> {
    return this.read(0, this.imageSize);
  }

  chunkDigest(index: number): Buffer | null {
    if (index < 0 || index >= this.chunkCount) throw new RangeError(`chunk ${index} out of range`);
    return this.digests[index]!;
  }

  chunkLength(index: number): number {
    return Math.min(this.chunkSize, this.imageSize - index * this.chunkSize);
  }

  async loadChunk(index: number): Promise<Buffer> {
    const digest = this.chunkDigest(index);
    if (digest === null) return Buffer.alloc(this.chunkLength(index));
    return this.loadChunkByDigest(digest, this.chunkLength(index));
  }

  async loadChunkByDigest(digest: Buffer, length: number): Promise<Buffer> {
    const hex = digest.toString('hex');
    this.loads++;
    this.loadsByDigest.set(hex, (this.loadsByDigest.get(hex) ?? 0) + 1);
    if (this.loadDelayMs > 0) await new Promise((r) => setTimeout(r, this.loadDelayMs));
    const stored = this.stored.get(hex);
    if (stored === undefined) throw new CorruptChunkError(hex, 'chunk file is missing');
    if (this.corrupt.has(hex)) throw new CorruptChunkError(hex, 'SHA-256 mismatch (test corruption)');
    const data = await inflateAsync(stored);
    if (data.length !== length || !createHash('sha256').update(data).digest().equals(digest)) {
      throw new CorruptChunkError(hex, 'content does not match digest');
    }
    return data;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    for (let i = Math.floor(offset / this.chunkSize); i * this.chunkSize < offset + length && i < this.chunkCount; i++) {
      const chunk = await this.loadChunk(i);
      const chunkStart = i * this.chunkSize;
      const from = Math.max(offset, chunkStart);
      const to = Math.min(offset + length, chunkStart + chunk.length);
      chunk.copy(out, from - offset, from - chunkStart, to - chunkStart);
    }
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/** Deterministic pseudo-random bytes (xorshift32) from a seed: reproducible test content. */
export function patternBytes(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  const next = xorshift32(seed * 2654435761);
  let i = 0;
  for (; i + 4 <= length; i += 4) out.writeUInt32LE(next(), i);
  for (; i < length; i++) out[i] = (seed + i) & 0xff;
  return out;
}

/** A small seeded PRNG for tests (mulberry32). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
