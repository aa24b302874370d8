/**
 * Read access to restore points. Opens files read-only and never writes to the repository:
 * several readers may run beside a backup, prune or gc.
 */
import { CorruptChunkError, RepositoryError } from './errors.js';
import { ChunkDecodeFailure, chunkWorkers, type ChunkChecks, type DecodeRequest } from './chunk-workers.js';
import { CHUNK_HEADER_SIZE, DIGEST_LENGTH, MAX_CHUNK_SIZE, decodeStoredChunk, isZeroDigest, type RestorePointIndex } from './format.js';
import type { ChunkLocation } from './packs.js';
import { Repository } from './repository.js';
import type { ChunkVerification, RestorePointInfo, RestorePointReader } from './types.js';
import { countZeroDigests, runBounded } from './writer.js';

/**
 * Read and verify one chunk (its file, or its record in a pack: the same bytes) — header, CRC32
 * and/or SHA-256 (`checks`, default both), inflate: CorruptChunkError on any problem. The read and all checks run on a chunk worker
 * (src/backup/chunk-workers.ts); the event loop only looks the chunk up.
 *
 * A valid chunk file is at most header + `length` bytes (a payload is stored compressed only if that
 * is smaller), so one read of that size + 1 gets all of it; the extra byte detects a file longer
 * than any valid one. A pack record is read at its offset and length from the pack's trailer.
 *
 * `into` (optional, at least `length` bytes) receives the content and the result is a view of it,
 * so a cache can recycle the memory of evicted chunks. The worker writes into it directly when it
 * is shared memory (a SharedArrayBuffer), else the content is copied into it.
 */
export async function readChunk(
  repo: Repository,
  digest: Buffer,
  length: number,
  into?: Buffer,
  checks: ChunkChecks = 'crc32+sha256',
): Promise<Buffer> {
  if (!Number.isSafeInteger(length) || length < 0 || length > MAX_CHUNK_SIZE) {
    throw new RepositoryError(`chunk length ${length} is out of range (0..${MAX_CHUNK_SIZE})`);
  }
  const request = { digest, expectedLength: length, checks, ...(into !== undefined ? { into } : {}) };
  if (repo.chunkStore === 'files') {
    const path = repo.chunkPath(digest.toString('hex'));
    return decodeStoredChunk({ ...request, from: { kind: 'file', path } }, path);
  }
  return readPackedChunk(repo, request);
}

/** A chunk's record in its pack ("packs" store); a pack gone since the scan (gc) means one rescan. */
async function readPackedChunk(repo: Repository, request: Omit<DecodeRequest, 'from'>): Promise<Buffer> {
  const hex = request.digest.toString('hex');
  const store = repo.packs;
  for (let attempt = 0; ; attempt++) {
    let location: ChunkLocation | undefined;
    try {
      // Known chunks (every one after the first scan) are found without a promise.
      location = (attempt === 0 ? store.lookup(hex) : undefined) ?? (await store.locate(hex));
    } catch (err) {
      throw new CorruptChunkError(hex, `cannot read the pack index: ${err instanceof Error ? err.message : String(err)}`, store.dir);
    }
    if (location === undefined) {
      const unreadable = [...store.unreadablePacks.entries()].slice(0, 3).map(([, reason]) => reason);
      const more = store.unreadablePacks.size > 3 ? `, and ${store.unreadablePacks.size - 3} more` : '';
      const hint = unreadable.length === 0 ? '' : `; unreadable packs: ${unreadable.join('; ')}${more}`;
      throw new CorruptChunkError(hex, `chunk is missing (no readable pack holds it)${hint}`, store.dir);
    }
    if (location.length > CHUNK_HEADER_SIZE + request.expectedLength) {
      const reason = `record of ${location.length} bytes is longer than a chunk of ${request.expectedLength} bytes can be`;
      throw new CorruptChunkError(hex, reason, packRecordPath(repo, location));
    }
    try {
      return await chunkWorkers().decode({ ...request, from: { kind: 'record', path: store.packPath(location.pack), offset: location.offset, length: location.length } });
    } catch (err) {
      if (!(err instanceof ChunkDecodeFailure)) throw err;
      if (err.code === 'ENOENT' && attempt === 0) {
        store.forgetPack(location.pack);
        continue;
      }
      throw new CorruptChunkError(hex, err.reason, packRecordPath(repo, location));
    }
  }
}

/** Bytes `readChunk` needs to read the file of a chunk of `length` bytes (header + payload + 1). */
export function chunkFileBufferSize(length: number): number {
  return CHUNK_HEADER_SIZE + length + 1;
}

/** "…/packs/ab/ab….pack@OFFSET": where verify and logs say a packed chunk is. */
export function packRecordPath(repo: Repository, location: ChunkLocation): string {
  return `${repo.packs.packPath(location.pack)}@${location.offset}`;
}

export function infoOf(index: RestorePointIndex): RestorePointInfo {
  return { ...index.meta, zeroChunks: countZeroDigests(index.digests) };
}

class RepositoryRestorePoint implements RestorePointReader {
  readonly info: RestorePointInfo;
  readonly imageSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  private closed = false;

  constructor(
    private readonly repo: Repository,
    private readonly index: RestorePointIndex,
    private readonly readConcurrency: number,
    private readonly verification: ChunkVerification,
  ) {
    this.info = infoOf(index);
    this.imageSize = index.meta.imageSize;
    this.chunkSize = index.meta.chunkSize;
    this.chunkCount = index.meta.chunkCount;
  }

  chunkDigest(index: number): Buffer | null {
    this.checkIndex(index);
    const digest = this.index.digests.subarray(index * DIGEST_LENGTH, (index + 1) * DIGEST_LENGTH);
    return isZeroDigest(digest) ? null : digest;
  }

  chunkLength(index: number): number {
    this.checkIndex(index);
    return Math.min(this.chunkSize, this.imageSize - index * this.chunkSize);
  }

  async loadChunk(index: number): Promise<Buffer> {
    const digest = this.chunkDigest(index);
    const length = this.chunkLength(index);
    if (digest === null) return Buffer.alloc(length);
    return this.loadChunkByDigest(digest, length);
  }

  async loadChunkByDigest(digest: Buffer, length: number, into?: Buffer): Promise<Buffer> {
    if (this.closed) throw new RepositoryError(`restore point ${this.info.vm}/${this.info.id} is closed`);
    if (digest.length !== DIGEST_LENGTH) throw new RepositoryError(`digest must be ${DIGEST_LENGTH} bytes`);
    // One check is enough for serving (OpenOptions.verification); `bootrestore verify` runs both.
    return readChunk(this.repo, digest, length, into, this.verification);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.imageSize) {
      throw new RangeError(`read of ${length} bytes at ${offset} is outside the image (${this.imageSize} bytes)`);
    }
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    await runBounded(last - first + 1, this.readConcurrency, async (k) => {
      const index = first + k;
      if (this.chunkDigest(index) === null) return; // zero chunk: `out` is already zero
      const chunk = await this.loadChunk(index);
      const chunkStart = index * this.chunkSize;
      const from = Math.max(offset, chunkStart);
      const to = Math.min(offset + length, chunkStart + chunk.length);
      chunk.copy(out, from - offset, from - chunkStart, to - chunkStart);
    });
    return out;
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private checkIndex(index: number): void {
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.chunkCount) {
      throw new RangeError(`chunk ${index} out of range (0..${this.chunkCount - 1})`);
    }
  }
}

export interface OpenOptions {
  /** Chunks loaded at once by read() (default 8). */
  readonly readConcurrency?: number;
  /**
   * Get ready for the first read now rather than on it: load the pack map ("packs" store) and
   * start the chunk workers. A mount does this, so its first reads (a booting VM's) do not wait
   * for a scan of every pack and for worker threads to start.
   */
  readonly prepare?: boolean;
  /**
   * How each loaded chunk is checked (default 'sha256': its content hashes to its name, which also
   * covers the stored payload). 'crc32' checks only the stored payload's CRC32 (written at backup
   * time): it catches bit rot and damaged records for ~a quarter of the CPU of a cold read, but not a
   * valid chunk stored or mapped under the wrong name. Mounts use config `cache.verify`.
   */
  readonly verification?: ChunkVerification;
}

/** Open a restore point ('latest' = newest of the VM). Loads only its index; chunks on demand. */
export async function openRestorePoint(
  repoDir: string,
  vm: string,
  pointId: string,
  options: OpenOptions = {},
): Promise<RestorePointReader> {
  const repo = await Repository.open(repoDir);
  const id = await repo.resolvePointId(vm, pointId);
  const index = await repo.readIndex(vm, id);
  if (options.prepare === true) {
    // A pack that cannot be read is not an error here: its chunks' reads fail and name it.
    await Promise.all([chunkWorkers().start(), repo.chunkStore === 'packs' ? repo.packs.ensureLoaded() : undefined]);
  }
  return new RepositoryRestorePoint(repo, index, options.readConcurrency ?? 8, options.verification ?? 'sha256');
}

export interface BrokenIndex {
  readonly vm: string;
  readonly id: string;
  readonly reason: string;
}

export interface RestorePointListing {
  readonly points: RestorePointInfo[];
  /** Index files that exist but cannot be read or fail their checksum. */
  readonly broken: BrokenIndex[];
}

/** Restore points of one VM or all VMs (oldest first per VM), plus unreadable indexes. */
export async function listRestorePointsDetailed(repoDir: string, vm?: string): Promise<RestorePointListing> {
  const repo = await Repository.open(repoDir);
  const vms = vm === undefined ? await repo.listVms() : [vm];
  if (vm !== undefined && (await repo.listPointIds(vm)).length === 0) {
    throw new RepositoryError(`VM "${vm}" has no restore points in ${repoDir}`);
  }
  const points: RestorePointInfo[] = [];
  const broken: BrokenIndex[] = [];
  for (const v of vms) {
    for (const id of await repo.listPointIds(v)) {
      try {
        points.push(infoOf(await repo.readIndex(v, id)));
      } catch (err) {
        broken.push({ vm: v, id, reason: err instanceof Error ? err.message : String(err) });
      }
    }
  }
  return { points, broken };
}

/** Restore points of one VM or all VMs. Throws RepositoryError if any index is unreadable. */
export async function listRestorePoints(repoDir: string, vm?: string): Promise<RestorePointInfo[]> {
  const { points, broken } = await listRestorePointsDetailed(repoDir, vm);
  if (broken.length > 0) throw new RepositoryError(broken.map((b) => b.reason).join('; '));
  return points;
}
