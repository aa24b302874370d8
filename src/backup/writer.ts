/**
 * Creating restore points: chunks are hashed, compressed (async zlib, libuv pool) and written with
 * bounded concurrency; the index is published only after every chunk it names is durable.
 *
 * Used by the backup engine (content from a DiskSource) and by `bootrestore commit` (content from
 * a base restore point plus a write delta) through `writeRestorePoint`.
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { RepositoryError } from './errors.js';
import {
  DIGEST_LENGTH,
  ZERO_DIGEST,
  chunkCountFor,
  DEFAULT_CODEC,
  codecLevelProblem,
  encodeChunkParts,
  type ChunkCodec,
  encodeIndex,
  isAllZero,
  isZeroDigest,
  sha256,
  MAX_CHUNK_SIZE,
  type RestorePointIndex,
} from './format.js';
import { FileChunkSink, PackChunkSink, type ChunkSink } from './chunk-sink.js';
import { Repository, fsyncDir, isPointId, pointIdFor, writeFileAtomic } from './repository.js';
import type { RestorePointInfo } from './types.js';

/** Content of one chunk of a new restore point. */
export type ChunkContent =
  /** The chunk's bytes (exactly the chunk's length). */
  | Buffer
  /** Same as the parent's chunk at this index (no read, no hashing). */
  | 'parent'
  /** All zero (stored as the zero marker, no chunk file). */
  | 'zero';

export interface RestorePointSpec {
  readonly vm: string;
  /** Parent restore point id (must exist and have the same chunk size), or null. */
  readonly parent: string | null;
  readonly imageSize: number;
  readonly chunkSize: number;
  /** Human-readable description of where the content came from. */
  readonly source: string;
  /**
   * Content of chunk `index` (`length` = chunkSize except for the last chunk). Called with bounded
   * concurrency, roughly in index order.
   */
  chunkContent(index: number, length: number): Promise<ChunkContent>;
  /** Called after the last chunk was read, before the index is published (e.g. "source unchanged?"). */
  beforePublish?(): Promise<void>;
}

export interface WriteProgress {
  readonly chunksDone: number;
  readonly chunkCount: number;
  readonly bytesDone: number;
}

export interface WriteOptions {
  readonly logger?: Logger;
  /** Chunks processed at once (default `defaultWriteConcurrency(chunkSize)`). */
  readonly concurrency?: number;
  /** Try to compress each chunk (default true). */
  readonly compress?: boolean;
  /** Codec of new compressed chunks (default brotli, docs/repository-format.md "Codec choice"). */
  readonly codec?: ChunkCodec;
  /** Codec level: brotli 0–11 (default 2), deflate 1–9 (default 1). */
  readonly compressionLevel?: number;
  readonly onProgress?: (p: WriteProgress) => void;
  /** Name of the command for lock/marker files (default "write"). */
  readonly command?: string;
}

export interface WriteStats {
  readonly chunks: number;
  /** All-zero chunks (no chunk file). */
  readonly zeroChunks: number;
  /** Chunks taken from the parent without reading them ('parent' content). */
  readonly parentChunks: number;
  /** Chunks read whose digest equals the parent's digest at the same index. */
  readonly unchangedChunks: number;
  /** Chunks read whose content already existed in the repository (another index, or earlier in this point). */
  readonly dedupChunks: number;
  /** Chunk files written. */
  readonly newChunks: number;
  /** Bytes of content handed to the writer (what was read from the source). */
  readonly bytesRead: number;
  /** Of `bytesRead`, bytes of chunks that were not all zero. */
  readonly nonZeroBytesRead: number;
  readonly newBytesUncompressed: number;
  /** Bytes of new chunk files' payloads (after compression). */
  readonly newBytesStored: number;
  readonly seconds: number;
}

export interface WriteResult {
  readonly info: RestorePointInfo;
  readonly stats: WriteStats;
}

export const MIN_CHUNK_SIZE = 64 * 1024;

/**
 * Chunks in flight: enough for three 1 MiB source reads (the engine reads small chunks in 1 MiB
 * stripes) plus the chunks the encoder workers are compressing, at least 16.
 */
export function defaultWriteConcurrency(chunkSize: number): number {
  return Math.max(16, Math.ceil((3 * 1024 * 1024) / chunkSize));
}

export function checkChunkSize(chunkSize: number): void {
  if (!Number.isSafeInteger(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE || (chunkSize & (chunkSize - 1)) !== 0) {
    throw new RepositoryError(`chunk size ${chunkSize} is invalid: use a power of two from 64 KiB to 16 MiB`);
  }
}

/**
 * Create a restore point from a spec (takes the VM's writer lock and a running-writer marker).
 * Returns when the index is durable. A failure or crash before that leaves no trace but unreferenced
 * chunks, which gc removes.
 */
export async function writeRestorePoint(
  repository: Repository | string,
  spec: RestorePointSpec,
  options: WriteOptions = {},
): Promise<WriteResult> {
  const repo = typeof repository === 'string' ? await Repository.open(repository) : repository;
  const session = await WriteSession.begin(repo, spec.vm, options.command ?? 'write');
  try {
    const parent = spec.parent === null ? null : await repo.readIndex(spec.vm, spec.parent);
    return await session.write(spec, parent, options);
  } finally {
    await session.end();
  }
}

/** The VM lock + writer marker held while a restore point is written. */
export class WriteSession {
  private constructor(
    readonly repo: Repository,
    private readonly release: () => Promise<void>,
  ) {}

  static async begin(repo: Repository, vm: string, command: string): Promise<WriteSession> {
    const lock = await repo.lock(`vm-${vmLockName(vm)}`, command);
    let marker;
    try {
      marker = await repo.registerWriter(`${command} ${vm}`);
    } catch (err) {
      await lock.release();
      throw err;
    }
    return new WriteSession(repo, async () => {
      await marker.release();
      await lock.release();
    });
  }

  async end(): Promise<void> {
    await this.release();
  }

  /** Write chunks and publish the index. The caller holds this session (lock + marker). */
  async write(spec: RestorePointSpec, parent: RestorePointIndex | null, options: WriteOptions): Promise<WriteResult> {
    const logger = options.logger ?? silentLogger();
    const repo = this.repo;
    checkChunkSize(spec.chunkSize);
    if (!Number.isSafeInteger(spec.imageSize) || spec.imageSize <= 0) {
      throw new RepositoryError(`image size ${spec.imageSize} is invalid`);
    }
    if (parent !== null && parent.meta.chunkSize !== spec.chunkSize) {
      throw new RepositoryError(
        `chunk size ${spec.chunkSize} differs from the parent's (${parent.meta.chunkSize}, ${spec.vm}/${parent.meta.id}): a VM keeps its chunk size`,
      );
    }
    const started = performance.now();
    const chunkCount = chunkCountFor(spec.imageSize, spec.chunkSize);
    const digests = Buffer.alloc(chunkCount * DIGEST_LENGTH);
    const parentDigests = parent?.digests ?? Buffer.alloc(0);
    const parentCount = parent?.meta.chunkCount ?? 0;
    const lengthOf = (i: number): number => Math.min(spec.chunkSize, spec.imageSize - i * spec.chunkSize);
    const parentLengthOf = (i: number): number =>
      parent === null ? -1 : Math.min(parent.meta.chunkSize, parent.meta.imageSize - i * parent.meta.chunkSize);

    // Digests known durable in the repository for the whole write: those the parent references
    // (the VM lock keeps the parent index; gc marks it) and those written by this session.
    const known = new Set<string>();
    for (let i = 0; i < parentCount; i++) {
      const d = parentDigests.subarray(i * DIGEST_LENGTH, (i + 1) * DIGEST_LENGTH);
      if (!isZeroDigest(d)) known.add(d.toString('hex'));
    }
    const inFlight = new Map<string, Promise<void>>();

    let zeroChunks = 0;
    let parentChunks = 0;
    let unchangedChunks = 0;
    let dedupChunks = 0;
    let newChunks = 0;
    let bytesRead = 0;
    let nonZeroBytesRead = 0;
    let newBytesUncompressed = 0;
    let newBytesStored = 0;
    let chunksDone = 0;
    const compress = options.compress ?? true;

    const compressionLevel = options.compressionLevel;
    const codec = options.codec ?? DEFAULT_CODEC;
    const codecProblem = codecLevelProblem(codec, compressionLevel);
    if (codecProblem !== undefined) throw new RepositoryError(codecProblem);

    const sink: ChunkSink = repo.chunkStore === 'packs' ? new PackChunkSink(repo) : await FileChunkSink.start(repo);
    const storeChunk = async (hex: string, data: Buffer): Promise<'new' | 'dedup'> => {
      if (known.has(hex)) return 'dedup';
      const pending = inFlight.get(hex);
      if (pending !== undefined) {
        await pending;
        return 'dedup';
      }
      let result: 'new' | 'dedup' = 'dedup';
      const work = (async () => {
        if (!(await sink.adopt(hex))) {
          const encoded = await encodeChunkParts(data, { compress, codec, ...(compressionLevel !== undefined ? { level: compressionLevel } : {}) });
          await sink.put(hex, encoded.header, encoded.payload);
          newBytesUncompressed += data.length;
          newBytesStored += encoded.storedLength;
          result = 'new';
        }
        known.add(hex);
      })();
      inFlight.set(hex, work);
      try {
        await work;
      } finally {
        inFlight.delete(hex);
      }
      return result;
    };

    const processChunk = async (i: number): Promise<void> => {
      const length = lengthOf(i);
      const content = await spec.chunkContent(i, length);
      const slot = digests.subarray(i * DIGEST_LENGTH, (i + 1) * DIGEST_LENGTH);
      if (content === 'zero') {
        zeroChunks++;
      } else if (content === 'parent') {
        if (i >= parentCount || parentLengthOf(i) !== length) {
          throw new RepositoryError(`chunk ${i} cannot be taken from the parent: the parent has no chunk of ${length} bytes there`);
        }
        parentDigests.copy(slot, 0, i * DIGEST_LENGTH, (i + 1) * DIGEST_LENGTH);
        if (isZeroDigest(slot)) zeroChunks++;
        else parentChunks++;
      } else {
        if (content.length !== length) {
          throw new RepositoryError(`chunk ${i}: got ${content.length} bytes, expected ${length}`);
        }
        bytesRead += length;
        if (isAllZero(content)) {
          zeroChunks++;
        } else {
          nonZeroBytesRead += length;
          const digest = sha256(content);
          digest.copy(slot);
          const parentSlot = i < parentCount ? parentDigests.subarray(i * DIGEST_LENGTH, (i + 1) * DIGEST_LENGTH) : null;
          if (parentSlot !== null && parentSlot.equals(digest)) {
            unchangedChunks++;
          } else if ((await storeChunk(digest.toString('hex'), content)) === 'new') {
            newChunks++;
          } else {
            dedupChunks++;
          }
        }
      }
      chunksDone++;
      options.onProgress?.({ chunksDone, chunkCount, bytesDone: Math.min(spec.imageSize, chunksDone * spec.chunkSize) });
    };

    try {
      await runBounded(chunkCount, options.concurrency ?? defaultWriteConcurrency(spec.chunkSize), processChunk);
      await sink.flush();
    } catch (err) {
      await sink.abort();
      throw err;
    }
    // Chunks adopted from other restore points must still be there (a concurrent gc), and every
    // new file's directory entry durable, before an index names them.
    await sink.recheckAdopted();
    await sink.syncDirectories();
    await spec.beforePublish?.();

    // Publish the index: its id sorts after every existing one of this VM.
    const vmDir = repo.vmDir(spec.vm);
    await fsp.mkdir(vmDir, { recursive: true });
    const existing = await repo.listPointIds(spec.vm);
    let when = new Date();
    const last = existing[existing.length - 1];
    if (last !== undefined && pointIdFor(when) <= last) when = new Date(parsePointId(last) + 1);
    const id = pointIdFor(when);
    if (!isPointId(id)) throw new RepositoryError(`cannot derive a restore point id from ${when.toISOString()}`);
    const meta = {
      vm: spec.vm,
      id,
      parent: parent?.meta.id ?? null,
      createdAt: new Date().toISOString(),
      imageSize: spec.imageSize,
      chunkSize: spec.chunkSize,
      chunkCount,
      source: spec.source,
    };
    await writeFileAtomic(repo.indexPath(spec.vm, id), encodeIndex({ meta, digests }));
    await fsyncDir(vmDir);
    await fsyncDir(join(repo.dir, 'vms'));

    const stats: WriteStats = {
      chunks: chunkCount,
      zeroChunks,
      parentChunks,
      unchangedChunks,
      dedupChunks,
      newChunks,
      bytesRead,
      nonZeroBytesRead,
      newBytesUncompressed,
      newBytesStored,
      seconds: (performance.now() - started) / 1000,
    };
    logger.info({ vm: spec.vm, id, ...stats }, 'restore point written');
    return { info: { ...meta, zeroChunks: countZeroDigests(digests) }, stats };
  }
}

/** Lock names are per VM; VM names are already restricted to [A-Za-z0-9._-]. */
function vmLockName(vm: string): string {
  return vm;
}

function parsePointId(id: string): number {
  // 2026-12-02T14-07-08.123Z → 2026-12-02T14:07:08.123Z
  return Date.parse(`${id.slice(0, 13)}:${id.slice(14, 16)}:${id.slice(17)}`);
}

export function countZeroDigests(digests: Buffer): number {
  let zero = 0;
  for (let off = 0; off < digests.length; off += DIGEST_LENGTH) {
    if (digests.subarray(off, off + DIGEST_LENGTH).equals(ZERO_DIGEST)) zero++;
  }
  return zero;
}

/**
 * Run `task(0..count-1)` with at most `limit` running at once, roughly in order. Stops starting
 * new tasks after the first failure, waits for running ones, then rethrows that failure.
 */
export async function runBounded(
  count: number,
  limit: number,
  task: (index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | null = null;
  const worker = async (): Promise<void> => {
    while (failure === null && next < count) {
      const index = next++;
      try {
        await task(index);
      } catch (error) {
        if (failure === null) failure = { error };
      }
    }
  };
  const workers: Promise<void>[] = [];
  for (let w = 0; w < Math.max(1, Math.min(limit, count)); w++) workers.push(worker());
  await Promise.all(workers);
  if (failure !== null) throw (failure as { error: unknown }).error;
}
