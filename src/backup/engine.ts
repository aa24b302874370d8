/**
 * The backup engine: reads a DiskSource chunk by chunk and writes a restore point. The first
 * backup of a VM is full; later ones compare each chunk's digest with the parent (latest point),
 * or with `changedBlocks` read only the listed byte ranges and take the parent's digests elsewhere.
 */
import { silentLogger } from '../log.js';
import { RepositoryError, SourceError } from './errors.js';
import { chunkCountFor } from './format.js';
import { Repository, checkVmName, type ChunkStoreKind } from './repository.js';
import type { DiskSource } from './types.js';
import { WriteSession, checkChunkSize, type ChunkContent, type WriteOptions, type WriteResult } from './writer.js';

/**
 * Default chunk size: 128 KiB, chosen from bench/backup.ts run 6 on the 1 GiB bench image
 * (docs/repository-format.md, "Measurements"; pack store, codecs on worker threads, restic in the
 * same run). 128 KiB with brotli-2 backs up at 1.7x restic's speed into 0.97x its space; 256 KiB
 * stores 4 % more than restic whatever the codec (fixed chunks miss shifted copies that smaller
 * chunks find); 64 KiB stores 9 % less than restic at 1.6x its speed but has 2x the index and
 * pack-map size per GiB of 128 KiB (16,384 digests per GiB) for 6 % less space. A random 4 KiB
 * read loads 128 KiB; a cold boot fetches less than with larger chunks.
 */
export const DEFAULT_CHUNK_SIZE = 128 * 1024;

export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

/** What to back up, plus the writer's options (concurrency, compression, logger, progress). */
export interface BackupOptions extends Omit<WriteOptions, 'command'> {
  readonly vm: string;
  /** Chunk size for the VM's first backup; later backups keep the VM's chunk size. */
  readonly chunkSize?: number;
  /** Byte ranges changed since the parent: only these are read (requires a parent of equal size). */
  readonly changedBlocks?: ReadonlyArray<ByteRange>;
  /** Chunk store of the repository if this backup creates it (default "packs"). */
  readonly chunkStore?: ChunkStoreKind;
}

export interface BackupResult extends WriteResult {
  readonly repositoryCreated: boolean;
  readonly mode: 'full' | 'incremental' | 'changed-blocks';
}

export async function backupSource(repoDir: string, source: DiskSource, options: BackupOptions): Promise<BackupResult> {
  const logger = options.logger ?? silentLogger();
  // Refuse bad arguments before anything is created on disk.
  if (options.chunkSize !== undefined) checkChunkSize(options.chunkSize);
  checkVmName(options.vm);
  const { repo, created } = await Repository.openOrCreate(repoDir, options.chunkStore !== undefined ? { chunkStore: options.chunkStore } : {});
  const session = await WriteSession.begin(repo, options.vm, 'backup');
  try {
    const ids = await repo.listPointIds(options.vm);
    const parentId = ids[ids.length - 1] ?? null;
    const parent = parentId === null ? null : await repo.readIndex(options.vm, parentId);
    let chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (parent !== null) {
      if (options.chunkSize !== undefined && options.chunkSize !== parent.meta.chunkSize) {
        throw new RepositoryError(
          `VM "${options.vm}" uses chunk size ${parent.meta.chunkSize} (since its first backup); --chunk-size ${options.chunkSize} cannot change it`,
        );
      }
      chunkSize = parent.meta.chunkSize;
    }
    const imageSize = source.size;
    if (!Number.isSafeInteger(imageSize) || imageSize <= 0) throw new SourceError(source.description, `image size ${imageSize} is not usable`);
    const chunkCount = chunkCountFor(imageSize, chunkSize);

    let changed: Uint8Array | null = null;
    if (options.changedBlocks !== undefined) {
      if (parent === null) {
        throw new RepositoryError(`--changed-blocks needs a previous backup of VM "${options.vm}" to take unchanged chunks from; it has none`);
      }
      if (parent.meta.imageSize !== imageSize) {
        throw new SourceError(
          source.description,
          `image size changed from ${parent.meta.imageSize} (restore point ${parent.meta.id}) to ${imageSize}: a changed-block backup is impossible, run a backup without --changed-blocks`,
        );
      }
      changed = changedChunkMap(options.changedBlocks, imageSize, chunkSize);
    }
    const zeroChunks = source.zeroRanges ? fullyCoveredChunks(await source.zeroRanges(), imageSize, chunkSize) : null;

    const stripes = changed === null && chunkSize < STRIPE_BYTES ? new StripeReader(source, chunkSize, chunkCount, zeroChunks) : null;
    const chunkContent = async (index: number, length: number): Promise<ChunkContent> => {
      if (changed !== null && changed[index] === 0) return 'parent';
      if (zeroChunks !== null && zeroChunks[index] === 1) return 'zero';
      return stripes !== null ? stripes.chunk(index, length) : source.read(index * chunkSize, length);
    };
    logger.debug({ vm: options.vm, parent: parentId, chunkSize, chunkCount }, 'backup starting');
    const result = await session.write(
      {
        vm: options.vm,
        parent: parentId,
        imageSize,
        chunkSize,
        source: source.description,
        chunkContent,
        // Reads share one fstat per 50 ms: check once more after the last one.
        beforePublish: async () => source.checkUnchanged?.(),
      },
      parent,
      { ...options, logger },
    );
    return {
      ...result,
      repositoryCreated: created,
      mode: parent === null ? 'full' : changed !== null ? 'changed-blocks' : 'incremental',
    };
  } finally {
    await session.end();
  }
}

/** A full or incremental backup reads the source this many bytes at a time (several small chunks). */
export const STRIPE_BYTES = 1024 * 1024;

/**
 * Reads a source in stripes of STRIPE_BYTES and hands out each chunk as a view of its stripe: one
 * read (one thread-pool round trip, ~60 µs of event-loop time on this paravirtual guest) per
 * stripe instead of one per chunk. Every chunk is asked for once, in roughly ascending order; a
 * stripe is forgotten when the last of its chunks has been handed out. Stripes that hold chunks the
 * source reported as zero are not read whole (those chunks are never asked for).
 */
class StripeReader {
  private readonly chunksPerStripe: number;
  private readonly stripes = new Map<number, { readonly data: Promise<Buffer>; remaining: number }>();

  constructor(
    private readonly source: DiskSource,
    private readonly chunkSize: number,
    private readonly chunkCount: number,
    /** Chunks known to be zero: never asked for. */
    private readonly zeroChunks: Uint8Array | null,
  ) {
    this.chunksPerStripe = STRIPE_BYTES / chunkSize;
  }

  async chunk(index: number, length: number): Promise<Buffer> {
    const stripe = Math.floor(index / this.chunksPerStripe);
    let entry = this.stripes.get(stripe);
    if (entry === undefined) {
      const first = stripe * this.chunksPerStripe;
      const end = Math.min(this.chunkCount, first + this.chunksPerStripe);
      let remaining = 0;
      for (let i = first; i < end; i++) if (this.zeroChunks === null || this.zeroChunks[i] === 0) remaining++;
      // A stripe with chunks the source says are zero (unallocated): read its other chunks alone.
      if (remaining < end - first) return this.source.read(index * this.chunkSize, length);
      const offset = first * this.chunkSize;
      const bytes = Math.min(this.source.size, end * this.chunkSize) - offset;
      entry = { data: this.source.read(offset, bytes), remaining };
      this.stripes.set(stripe, entry);
    }
    if (--entry.remaining === 0) this.stripes.delete(stripe);
    const data = await entry.data;
    const at = (index - stripe * this.chunksPerStripe) * this.chunkSize;
    return data.subarray(at, at + length);
  }
}

/** Chunks touched by any of `ranges` (1 = read it). Ranges must lie inside the image. */
export function changedChunkMap(ranges: ReadonlyArray<ByteRange>, imageSize: number, chunkSize: number): Uint8Array {
  const map = new Uint8Array(chunkCountFor(imageSize, chunkSize));
  for (const [n, r] of ranges.entries()) {
    if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.offset < 0 || r.length < 0) {
      throw new RepositoryError(`changed block ${n + 1}: offset and length must be non-negative integers`);
    }
    if (r.offset + r.length > imageSize) {
      throw new RepositoryError(`changed block ${n + 1} (offset ${r.offset}, length ${r.length}) ends beyond the image (${imageSize} bytes)`);
    }
    if (r.length === 0) continue;
    const first = Math.floor(r.offset / chunkSize);
    const last = Math.floor((r.offset + r.length - 1) / chunkSize);
    map.fill(1, first, last + 1);
  }
  return map;
}

/** Chunks lying entirely inside the union of `ranges` (1 = known zero, need not be read). */
export function fullyCoveredChunks(ranges: ReadonlyArray<ByteRange>, imageSize: number, chunkSize: number): Uint8Array {
  const map = new Uint8Array(chunkCountFor(imageSize, chunkSize));
  const sorted = ranges
    .filter((r) => r.length > 0 && r.offset >= 0)
    .map((r) => ({ start: r.offset, end: Math.min(imageSize, r.offset + r.length) }))
    .sort((a, b) => a.start - b.start);
  const merged: { start: number; end: number }[] = [];
  for (const r of sorted) {
    const prev = merged[merged.length - 1];
    if (prev !== undefined && r.start <= prev.end) prev.end = Math.max(prev.end, r.end);
    else merged.push({ ...r });
  }
  for (const r of merged) {
    const first = Math.ceil(r.start / chunkSize);
    for (let i = first; i < map.length; i++) {
      const end = Math.min(imageSize, (i + 1) * chunkSize);
      if (end > r.end) break;
      map[i] = 1;
    }
  }
  return map;
}

/**
 * Parse a changed-blocks file. Two forms are accepted:
 *  - JSON: `[{"offset": 0, "length": 65536}, ...]`
 *  - text: one "offset length" pair per line (decimal or 0x hex), blank lines and '#' comments ignored.
 */
export function parseChangedBlocks(text: string, file: string): ByteRange[] {
  const trimmed = text.trim();
  if (trimmed.startsWith('[')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(trimmed);
    } catch (err) {
      throw new SourceError(file, `not valid JSON: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (!Array.isArray(parsed)) throw new SourceError(file, 'expected a JSON array of {offset, length}');
    return parsed.map((entry: unknown, n) => {
      const e = entry as { offset?: unknown; length?: unknown } | null;
      if (typeof e !== 'object' || e === null || typeof e.offset !== 'number' || typeof e.length !== 'number') {
        throw new SourceError(file, `entry ${n + 1} is not {"offset": number, "length": number}`);
      }
      return { offset: e.offset, length: e.length };
    });
  }
  const ranges: ByteRange[] = [];
  const lines = text.split('\n');
  for (let n = 0; n < lines.length; n++) {
    const line = lines[n]!.replace(/#.*/, '').trim();
    if (line === '') continue;
    const parts = line.split(/[\s,]+/);
    const nums = parts.map((p) => (/^(0x[0-9a-fA-F]+|[0-9]+)$/.test(p) ? Number(p) : NaN));
    if (nums.length !== 2 || nums.some((v) => !Number.isSafeInteger(v))) {
      throw new SourceError(file, `line ${n + 1}: expected "offset length", got "${lines[n]!.trim()}"`);
    }
    ranges.push({ offset: nums[0]!, length: nums[1]! });
  }
  return ranges;
}
