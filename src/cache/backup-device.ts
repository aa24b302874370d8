/**
 * A restore point served as a writable LUN: reads come from the delta where the mount wrote, zeroes
 * where it deallocated, and otherwise from the backup's chunks through the shared chunk cache. Writes,
 * UNMAP and FLUSH go to the delta; the backup is never written.
 */
import {
  type BlockDevice,
  type BlockDeviceIdentity,
  type LbaRange,
  type LbaStatus,
  type SegmentedRead,
  StorageError,
  type WriteOptions,
  wholeRead,
  writeFailure,
} from '../block-device.js';
import type { RestorePointReader } from '../backup/types.js';
import { chunkFileBufferSize } from '../backup/reader.js';
import type { ChunkContent, RestorePointSpec } from '../backup/writer.js';
import { CorruptChunkError } from '../backup/errors.js';
import type { Logger } from '../log.js';
import type { ChunkCache } from './chunk-cache.js';
import { DeltaStore } from './delta-store.js';
import { DeviceMetrics } from './metrics.js';
import { UNIT_BASE, UNIT_PRESENT, UNIT_ZERO } from './unit-map.js';
import { isAllZero } from '../zero-bytes.js';

export const BLOCK_SIZE = 512;
/** Default read-ahead: at most this many chunks … */
const DEFAULT_READ_AHEAD_CHUNKS = 16; // 8 before the chunk workers: see ChunkCacheOptions.maxConcurrentLoads
/** … and at most this many bytes. */
const DEFAULT_READ_AHEAD_BYTES = 8 * 1024 * 1024;
/** GET LBA STATUS scans at most this many uniform segments (units/chunks) per call. */
const STATUS_SCAN_SEGMENTS = 65536;

export interface BackupBlockDeviceOptions {
  readonly reader: RestorePointReader;
  /** Normally the process-wide cache (`processChunkCache`), so mounts share chunks. */
  readonly cache: ChunkCache;
  /** The mount's delta; null for a read-only mount. Its size must be `blockCount × 512`. */
  readonly delta: DeltaStore | null;
  /** Stable name of the mount (cache statistics and logs), e.g. "vm1@2026-12-02T14-07-08.123Z#1". */
  readonly mountId: string;
  /** Stable per mount (VPD 0x80 / 0x83 must not change across target restarts). */
  readonly identity: BlockDeviceIdentity;
  readonly logger: Logger;
  readonly metrics?: DeviceMetrics;
  /** Chunks to prefetch once reads are sequential. Default: up to 16 chunks and 8 MiB; 0 disables. */
  readonly readAheadChunks?: number;
  /**
   * Return a read inside one cached chunk as a view of the shared chunk instead of a copy. Only safe
   * when no caller modifies read results (the BlockDevice contract does not promise that today:
   * ORWRITE merges into the buffer it read). Default false.
   */
  readonly zeroCopyReads?: boolean;
}

/** One chunk of base + delta, for writing a new restore point (`bootrestore commit`). */
export interface ChangedChunk {
  readonly index: number;
  /** Merged content: the base chunk overlaid with the delta; exactly `reader.chunkLength(index)` bytes. */
  readonly data: Buffer;
  /** true when the merged chunk is all zeroes (store it as a zero chunk). */
  readonly allZero: boolean;
}

/** LUN size in bytes for an image: rounded up to whole 512-byte blocks (the tail reads as zeroes). */
export function lunBytesForImage(imageSize: number): number {
  return Math.ceil(imageSize / BLOCK_SIZE) * BLOCK_SIZE;
}

/** Open (or create, or recover) a mount's delta in `deltaDir` and build its device. */
export async function openBackupDevice(
  options: Omit<BackupBlockDeviceOptions, 'delta'> & { readonly deltaDir: string | null; readonly deltaUnitSize?: number },
): Promise<BackupBlockDevice> {
  const delta =
    options.deltaDir === null
      ? null
      : await DeltaStore.open({
          dir: options.deltaDir,
          sizeBytes: lunBytesForImage(options.reader.imageSize),
          logger: options.logger,
          ...(options.deltaUnitSize !== undefined ? { unitSize: options.deltaUnitSize } : {}),
        });
  return new BackupBlockDevice({ ...options, delta });
}

export class BackupBlockDevice implements BlockDevice {
  readonly blockSize = BLOCK_SIZE;
  readonly blockCount: number;
  readonly readOnly: boolean;
  readonly supportsUnmap: boolean;
  readonly identity: BlockDeviceIdentity;
  readonly metrics: DeviceMetrics;
  readonly mountId: string;

  private readonly reader: RestorePointReader;
  private readonly cache: ChunkCache;
  private readonly delta: DeltaStore | null;
  private readonly logger: Logger;
  private readonly lunBytes: number;
  private readonly chunkSize: number;
  private readonly chunkCount: number;
  private readonly unitSize: number;
  /** Cache keys (hex digests) by chunk index, computed on first use. */
  private readonly keys: Array<string | undefined>;
  private readonly readAheadChunks: number;
  private readonly zeroCopyReads: boolean;
  private readonly baseReader = (offset: number, length: number): Promise<Buffer> => this.readBase(offset, length);
  // Sequential-read detection (read-ahead).
  private lastReadStart = -1;
  private lastReadEnd = -1;
  private sequentialReads = 0;
  private sequentialChunks = 0;
  private sequentialLastChunk = -1;
  private prefetchedUpTo = -1;
  private closed = false;

  constructor(options: BackupBlockDeviceOptions) {
    const { reader } = options;
    if (reader.chunkSize % BLOCK_SIZE !== 0 || reader.chunkSize <= 0) {
      throw new RangeError(`chunk size ${reader.chunkSize} is not a multiple of ${BLOCK_SIZE}`);
    }
    this.reader = reader;
    this.cache = options.cache;
    this.delta = options.delta;
    this.logger = options.logger;
    this.identity = options.identity;
    this.mountId = options.mountId;
    this.metrics = options.metrics ?? new DeviceMetrics();
    this.lunBytes = lunBytesForImage(reader.imageSize);
    this.blockCount = this.lunBytes / BLOCK_SIZE;
    this.chunkSize = reader.chunkSize;
    this.chunkCount = reader.chunkCount;
    this.keys = new Array<string | undefined>(this.chunkCount);
    this.zeroCopyReads = options.zeroCopyReads ?? false;
    this.readOnly = this.delta === null;
    this.supportsUnmap = this.delta !== null;
    this.unitSize = this.delta?.unitSize ?? this.chunkSize;
    if (this.delta !== null && this.delta.sizeBytes !== this.lunBytes) {
      throw new RangeError(`delta size ${this.delta.sizeBytes} does not match the LUN size ${this.lunBytes}`);
    }
    const wanted = options.readAheadChunks ?? Math.max(1, Math.min(DEFAULT_READ_AHEAD_CHUNKS, Math.floor(DEFAULT_READ_AHEAD_BYTES / this.chunkSize)));
    // Read-ahead may use at most a quarter of the cache, so it cannot evict what is being read.
    this.readAheadChunks = Math.max(0, Math.min(wanted, Math.floor(this.cache.maxBytes / (4 * this.chunkSize))));
  }

  /**
   * Read `blocks` blocks at `lba`. The result is the caller's own buffer, except with `zeroCopyReads`,
   * where it may be a view of a cached chunk shared with other readers (callers must not modify it).
   */
  read(lba: number, blocks: number): Promise<Buffer> {
    return this.measuredRead(lba, blocks, this.rangeReader);
  }

  /**
   * Zero-copy read (the target's READ Data-In): views of the cached chunks, pinned in the cache until
   * `release`, and of the shared zero buffer; one merged buffer where the delta holds data.
   */
  readSegments(lba: number, blocks: number): Promise<SegmentedRead> {
    return this.measuredRead(lba, blocks, this.segmentReader);
  }

  private readonly rangeReader = (start: number, length: number): Promise<Buffer> => this.readRange(start, length);
  private readonly segmentReader = (start: number, length: number): Promise<SegmentedRead> => this.readSegmentsOf(start, length);

  /** Range check, read-ahead detection and metrics around one read. */
  private async measuredRead<T>(lba: number, blocks: number, readBytes: (start: number, length: number) => Promise<T>): Promise<T> {
    const started = performance.now();
    const start = lba * BLOCK_SIZE;
    const length = blocks * BLOCK_SIZE;
    this.checkRange(lba, blocks);
    this.metrics.readsInFlight++;
    try {
      // The read's own loads are queued first, then the read-ahead it triggers.
      const reading = readBytes(start, length);
      this.noteRead(start, start + length);
      const result = await reading;
      this.metrics.reads++;
      this.metrics.bytesRead += length;
      return result;
    } catch (err) {
      this.metrics.readErrors++;
      throw err;
    } finally {
      this.metrics.readsInFlight--;
      this.metrics.readLatency.observe((performance.now() - started) / 1000);
    }
  }

  async write(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    const delta = this.writableDelta();
    if (data.length % BLOCK_SIZE !== 0) throw new RangeError(`write of ${data.length} bytes is not whole blocks`);
    this.checkRange(lba, data.length / BLOCK_SIZE);
    const started = performance.now();
    this.metrics.writesInFlight++;
    try {
      await delta.write(lba * BLOCK_SIZE, data, opts.fua, this.baseReader);
      this.metrics.writes++;
      this.metrics.bytesWritten += data.length;
    } catch (err) {
      this.metrics.writeErrors++;
      throw asWriteError(err);
    } finally {
      this.metrics.writesInFlight--;
      this.metrics.writeLatency.observe((performance.now() - started) / 1000);
    }
  }

  async flush(): Promise<void> {
    if (this.delta === null) return;
    this.metrics.flushes++;
    try {
      await this.delta.flush();
    } catch (err) {
      throw asWriteError(err);
    }
  }

  async unmap(ranges: ReadonlyArray<LbaRange>): Promise<void> {
    const delta = this.writableDelta();
    for (const r of ranges) this.checkRange(r.lba, r.blocks);
    this.metrics.unmaps++;
    try {
      for (const r of ranges) await delta.deallocate(r.lba * BLOCK_SIZE, r.blocks * BLOCK_SIZE, this.baseReader);
    } catch (err) {
      throw asWriteError(err);
    }
  }

  /**
   * GET LBA STATUS (SBC-3 5.5): written blocks are mapped; deallocated blocks and unwritten blocks of an
   * all-zero backup chunk are deallocated; other unwritten blocks are mapped (they hold backup data).
   */
  async status(lba: number): Promise<LbaStatus> {
    this.checkRange(lba, 1);
    const start = lba * BLOCK_SIZE;
    const map = this.delta?.map;
    const u = this.unitSize;
    const unitCount = this.delta?.unitCount ?? 0;
    let pos = start;
    let mapped: boolean | undefined;
    let baseRunEnd = -1; // end (bytes) of the delta run of UNIT_BASE units containing pos
    for (let segments = 0; pos < this.lunBytes && segments < STATUS_SCAN_SEGMENTS; segments++) {
      let segEnd: number;
      let segMapped: boolean;
      const unit = Math.floor(pos / u);
      const state = map === undefined ? UNIT_BASE : map.state(unit);
      if (state !== UNIT_BASE) {
        segEnd = Math.min(map!.runEnd(unit, unitCount) * u, this.lunBytes);
        segMapped = state === UNIT_PRESENT;
      } else {
        if (pos >= baseRunEnd) baseRunEnd = map === undefined ? this.lunBytes : Math.min(map.runEnd(unit, unitCount) * u, this.lunBytes);
        const chunk = Math.floor(pos / this.chunkSize);
        segEnd = Math.min(baseRunEnd, (chunk + 1) * this.chunkSize, this.lunBytes);
        segMapped = chunk < this.chunkCount && this.reader.chunkDigest(chunk) !== null;
      }
      if (mapped === undefined) mapped = segMapped;
      else if (segMapped !== mapped) break;
      pos = segEnd;
    }
    return { mapped: mapped ?? true, blocks: (pos - start) / BLOCK_SIZE };
  }

  /**
   * For each chunk the delta touches, the merged content (base overlaid with delta), in index order.
   * Run it on a quiesced mount (no writes in flight) to get a consistent restore point.
   */
  async *changedChunks(): AsyncGenerator<ChangedChunk> {
    if (this.delta === null) return;
    for (let index = 0; index < this.chunkCount; index++) {
      const chunkStart = index * this.chunkSize;
      const chunkLength = this.reader.chunkLength(index);
      if (!this.touchesDelta(chunkStart, chunkLength)) continue;
      const merged = await this.readRange(chunkStart, Math.ceil(chunkLength / BLOCK_SIZE) * BLOCK_SIZE);
      const data = Buffer.from(merged.subarray(0, chunkLength));
      yield { index, data, allZero: isAllZero(data) };
    }
  }

  /**
   * Content of chunk `index` of base + delta for a new restore point: 'parent' when the delta does not
   * touch it, 'zero' when the merged chunk is all zeroes, else the merged bytes (`length` of them).
   */
  async mergedChunk(index: number, length: number): Promise<ChunkContent> {
    if (index < 0 || index >= this.chunkCount || length !== this.reader.chunkLength(index)) {
      throw new RangeError(`chunk ${index} (length ${length}) does not match the mounted restore point`);
    }
    const chunkStart = index * this.chunkSize;
    if (!this.touchesDelta(chunkStart, length)) return 'parent';
    const merged = await this.readRange(chunkStart, Math.ceil(length / BLOCK_SIZE) * BLOCK_SIZE);
    const data = Buffer.from(merged.subarray(0, length));
    return isAllZero(data) ? 'zero' : data;
  }

  /** Whether chunk `index` of base + delta still holds bytes of the base chunk (no delta: all of it). */
  keepsBaseBytes(index: number): boolean {
    const delta = this.delta;
    if (delta === null) return true;
    const start = index * this.chunkSize;
    const u = delta.unitSize;
    const endUnit = Math.ceil((start + this.reader.chunkLength(index)) / u);
    for (let unit = Math.floor(start / u); unit < endUnit; unit = delta.map.runEnd(unit, endUnit)) {
      if (delta.map.state(unit) === UNIT_BASE) return true;
    }
    return false;
  }

  /** Statistics of this mount: its counters, its delta and the shared cache. */
  stats(): { mountId: string; metrics: DeviceMetrics; delta: ReturnType<DeltaStore['stats']> | null } {
    return { mountId: this.mountId, metrics: this.metrics, delta: this.delta?.stats() ?? null };
  }

  /** Checkpoint and close the delta, then close the reader (the device owns both). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.delta?.close();
    } finally {
      this.cache.forgetMount(this.mountId);
      await this.reader.close();
    }
  }

  // ---- internals -------------------------------------------------------------------------------

  private checkRange(lba: number, blocks: number): void {
    if (!Number.isSafeInteger(lba) || !Number.isSafeInteger(blocks) || lba < 0 || blocks < 0 || lba + blocks > this.blockCount) {
      throw new RangeError(`LBA range ${lba}+${blocks} outside 0..${this.blockCount}`);
    }
  }

  private writableDelta(): DeltaStore {
    if (this.delta === null) throw new StorageError(`mount ${this.mountId} is read-only`, 'write-protected');
    return this.delta;
  }

  /** Bytes [start, start+length) of the LUN (sector aligned), merged from delta and base. */
  private readRange(start: number, length: number): Promise<Buffer> {
    if (length === 0) return Promise.resolve(Buffer.alloc(0));
    return this.touchesDelta(start, length) ? this.readMixed(this.delta!, start, length) : this.readBaseOwned(start, length);
  }

  /** Whether the delta holds data or zeroes anywhere in [start, start+length) (false without a delta). */
  private touchesDelta(start: number, length: number): boolean {
    const delta = this.delta;
    if (delta === null) return false;
    return delta.map.anyNonBase(Math.floor(start / delta.unitSize), Math.ceil((start + length) / delta.unitSize));
  }

  private async readSegmentsOf(start: number, length: number): Promise<SegmentedRead> {
    if (length === 0) return wholeRead(Buffer.alloc(0));
    if (this.touchesDelta(start, length)) return wholeRead(await this.readMixed(this.delta!, start, length));
    const end = start + length;
    const first = Math.floor(start / this.chunkSize);
    const last = Math.floor((end - 1) / this.chunkSize);
    const segments = new Array<Buffer>(last - first + 1);
    const pinned: Buffer[] = [];
    let loads: Array<Promise<void>> | undefined;
    for (let index = first; index <= last; index++) {
      const chunkStart = index * this.chunkSize;
      const from = Math.max(start, chunkStart) - chunkStart;
      const segmentLength = Math.min(end, chunkStart + this.chunkSize) - chunkStart - from;
      const slot = index - first;
      const hit = this.chunkIfCached(index);
      if (hit !== undefined) segments[slot] = this.pinnedSegment(hit, from, segmentLength, pinned);
      else {
        (loads ??= []).push(
          this.loadChunk(index).then((chunk) => {
            segments[slot] = this.pinnedSegment(chunk, from, segmentLength, pinned);
          }),
        );
      }
    }
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      for (const chunk of pinned) this.cache.unpin(chunk);
    };
    if (loads !== undefined) {
      // Wait for every load (also after a failure), so no pin is taken after the release below.
      const settled = await Promise.allSettled(loads);
      for (const outcome of settled) {
        if (outcome.status === 'rejected') {
          release();
          throw outcome.reason;
        }
      }
    }
    return { segments, length, release };
  }

  /** `length` bytes of a chunk from `from` as a view (the chunk pinned in the cache), or shared zeroes. */
  private pinnedSegment(chunk: Buffer | null, from: number, length: number, pinned: Buffer[]): Buffer {
    if (chunk === null) return sharedZeroes(length);
    if (from + length > chunk.length) return zeroPaddedTail(chunk, from, length);
    this.cache.pin(chunk);
    pinned.push(chunk);
    return chunk.subarray(from, from + length);
  }

  /** Base content for a caller: a copy unless zero-copy reads are enabled. */
  private async readBaseOwned(start: number, length: number): Promise<Buffer> {
    if (this.zeroCopyReads) return this.readBase(start, length);
    const view = await this.readBase(start, length);
    const first = Math.floor(start / this.chunkSize);
    const assembled = first !== Math.floor((start + length - 1) / this.chunkSize);
    if (assembled && !isSharedZeroes(view)) return view; // assembled: already a new buffer
    const copy = Buffer.allocUnsafe(length);
    view.copy(copy);
    return copy;
  }

  private async readMixed(delta: DeltaStore, start: number, length: number): Promise<Buffer> {
    const out = Buffer.allocUnsafe(length);
    const end = start + length;
    const u = delta.unitSize;
    const endUnit = Math.ceil(end / u);
    const pending: Array<Promise<void>> = [];
    let pos = start;
    let unit = Math.floor(start / u);
    while (pos < end) {
      const runEndUnit = delta.map.runEnd(unit, endUnit);
      const runEnd = Math.min(runEndUnit * u, end);
      const state = delta.map.state(unit);
      if (state === UNIT_ZERO) out.fill(0, pos - start, runEnd - start);
      else if (state === UNIT_PRESENT) pending.push(delta.readInto(out, pos - start, runEnd - pos, pos));
      else {
        const p = this.baseInto(out, pos - start, pos, runEnd - pos);
        if (p !== undefined) pending.push(p);
      }
      pos = runEnd;
      unit = runEndUnit;
    }
    if (pending.length > 0) await Promise.all(pending);
    return out;
  }

  /** Base (backup) content of a byte range; a view of the cached chunk when the range lies in one chunk. */
  private async readBase(start: number, length: number): Promise<Buffer> {
    const end = start + length;
    const first = Math.floor(start / this.chunkSize);
    const last = Math.floor((end - 1) / this.chunkSize);
    if (first === last) {
      const hit = this.chunkIfCached(first);
      const chunk = hit !== undefined ? hit : await this.loadChunk(first);
      if (chunk === null) return sharedZeroes(length);
      const from = start - first * this.chunkSize;
      if (from + length <= chunk.length) {
        // The view leaves this module: the cache must never reuse this chunk's memory.
        this.cache.noteEscaped(chunk);
        return chunk.subarray(from, from + length);
      }
      return zeroPaddedTail(chunk, from, length);
    }
    // A range of all-zero chunks: a shared view, no allocation or fill (a fresh 1 MiB result buffer
    // costs ~256 page faults on the event-loop thread, the main cost of a warm sequential read).
    if (this.allZeroChunks(first, last)) return sharedZeroes(length);
    const out = Buffer.allocUnsafe(length);
    const p = this.baseInto(out, 0, start, length);
    if (p !== undefined) await p;
    return out;
  }

  /** Whether chunks first..last (inclusive) are all zero chunks (or beyond the image). */
  private allZeroChunks(first: number, last: number): boolean {
    for (let index = first; index <= last && index < this.chunkCount; index++) {
      if (this.reader.chunkDigest(index) !== null) return false;
    }
    return true;
  }

  /** Copy base content of [start, start+length) into out[at..]; returns a promise only if a chunk must load. */
  private baseInto(out: Buffer, at: number, start: number, length: number): Promise<void> | undefined {
    const end = start + length;
    let pending: Array<Promise<void>> | undefined;
    for (let index = Math.floor(start / this.chunkSize); index * this.chunkSize < end; index++) {
      const chunkStart = index * this.chunkSize;
      const segStart = Math.max(start, chunkStart);
      const segEnd = Math.min(end, chunkStart + this.chunkSize);
      const hit = this.chunkIfCached(index);
      if (hit !== undefined) {
        copySegment(out, at + segStart - start, hit, segStart - chunkStart, segEnd - segStart);
      } else {
        (pending ??= []).push(
          this.loadChunk(index).then((chunk) => copySegment(out, at + segStart - start, chunk, segStart - chunkStart, segEnd - segStart)),
        );
      }
    }
    return pending === undefined ? undefined : Promise.all(pending).then(() => undefined);
  }

  /** The chunk if no load is needed: null for a zero chunk (or beyond the image), undefined on a miss. */
  private chunkIfCached(index: number): Buffer | null | undefined {
    if (index >= this.chunkCount) return null;
    const digest = this.reader.chunkDigest(index);
    if (digest === null) return null;
    const hit = this.cache.getCached(this.keyFor(index, digest), this.mountId);
    if (hit !== undefined) this.metrics.cacheHits++;
    return hit;
  }

  /** Load a chunk through the cache (single-flight, shared with other mounts). */
  private async loadChunk(index: number): Promise<Buffer | null> {
    if (index >= this.chunkCount) return null;
    const digest = this.reader.chunkDigest(index);
    if (digest === null) return null;
    this.metrics.cacheMisses++;
    const key = this.keyFor(index, digest);
    return this.cache.get(key, this.mountId, this.loaderFor(index, digest, key), this.cacheBufferBytes);
  }

  /** Size of the recyclable buffer a chunk load reads the chunk file into (one size for every chunk, also a short last one). */
  get cacheBufferBytes(): number {
    return chunkFileBufferSize(this.chunkSize);
  }

  private loaderFor(index: number, digest: Buffer, key: string): (into: Buffer | undefined) => Promise<Buffer> {
    return async (into) => {
      let data: Buffer;
      try {
        data = await this.reader.loadChunkByDigest(digest, this.reader.chunkLength(index), into);
      } catch (err) {
        this.logger.error({ err, mount: this.mountId, chunk: index, digest: key }, 'chunk load failed');
        if (err instanceof StorageError) throw err;
        throw new CorruptChunkError(key, err instanceof Error ? err.message : String(err));
      }
      this.metrics.chunksLoaded++;
      this.metrics.bytesDecompressed += data.length;
      return data;
    };
  }

  private keyFor(index: number, digest: Buffer): string {
    let key = this.keys[index];
    if (key === undefined) {
      key = digest.toString('hex');
      this.keys[index] = key;
    }
    return key;
  }

  /** Sequential-read detection: after two sequential reads that span two or more chunks, prefetch ahead. */
  private noteRead(start: number, end: number): void {
    const firstChunk = Math.floor(start / this.chunkSize);
    const lastChunk = Math.floor((end - 1) / this.chunkSize);
    const sequential = start > this.lastReadStart && start <= this.lastReadEnd;
    if (sequential) {
      this.sequentialReads++;
      if (lastChunk > this.sequentialLastChunk) {
        this.sequentialChunks += lastChunk - this.sequentialLastChunk;
        this.sequentialLastChunk = lastChunk;
      }
    } else {
      this.sequentialReads = 1;
      this.sequentialChunks = lastChunk - firstChunk + 1;
      this.sequentialLastChunk = lastChunk;
      this.prefetchedUpTo = lastChunk;
    }
    this.lastReadStart = start;
    this.lastReadEnd = end;
    if (this.readAheadChunks === 0 || this.sequentialReads < 2 || this.sequentialChunks < 2) return;
    const to = Math.min(this.chunkCount - 1, lastChunk + this.readAheadChunks);
    for (let index = Math.max(lastChunk + 1, this.prefetchedUpTo + 1); index <= to; index++) {
      const digest = this.reader.chunkDigest(index);
      if (digest !== null) {
        const key = this.keyFor(index, digest);
        const outcome = this.cache.prefetch(key, this.mountId, this.loaderFor(index, digest, key), this.cacheBufferBytes);
        // No slot free: the next read of the stream goes on from this chunk (else it would be a hole
        // in the window that the stream later misses).
        if (outcome === 'busy') return;
        if (outcome === 'started') this.metrics.readAheadChunks++;
      }
      this.prefetchedUpTo = index;
    }
  }
}

/** `length` bytes of the image's last chunk from `from`, zero-padded: its size need not be a multiple of 512. */
function zeroPaddedTail(chunk: Buffer, from: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  if (from < chunk.length) chunk.copy(out, 0, from, chunk.length);
  return out;
}

function copySegment(out: Buffer, at: number, chunk: Buffer | null, from: number, length: number): void {
  if (chunk === null) {
    out.fill(0, at, at + length);
    return;
  }
  const available = Math.max(0, Math.min(length, chunk.length - from));
  if (available > 0) chunk.copy(out, at, from, from + available);
  if (available < length) out.fill(0, at + available, at + length);
}

/** Largest read served from the shared zero buffer; longer all-zero reads get their own buffer. */
const SHARED_ZEROES_MAX = 16 * 1024 * 1024;
/** Never written after allocation: read results may be views of it (callers must not modify results). */
let sharedZeroBuffer = Buffer.alloc(1024 * 1024);
const sharedZeroGenerations = new WeakSet<ArrayBufferLike>([sharedZeroBuffer.buffer]);

/** `length` zero bytes: a view of the shared zero buffer (grown on demand) up to SHARED_ZEROES_MAX. */
function sharedZeroes(length: number): Buffer {
  if (length > SHARED_ZEROES_MAX) return Buffer.alloc(length);
  if (length > sharedZeroBuffer.length) {
    sharedZeroBuffer = Buffer.alloc(Math.min(SHARED_ZEROES_MAX, Math.max(length, 2 * sharedZeroBuffer.length)));
    sharedZeroGenerations.add(sharedZeroBuffer.buffer);
  }
  return sharedZeroBuffer.subarray(0, length);
}

/** true for a view of (any generation of) the shared zero buffer: callers that need their own copy must copy it. */
function isSharedZeroes(buf: Buffer): boolean {
  return sharedZeroGenerations.has(buf.buffer);
}

function asWriteError(err: unknown): unknown {
  if (err instanceof StorageError || err instanceof RangeError) return err;
  return writeFailure(`write failed: ${err instanceof Error ? err.message : String(err)}`, err);
}

export function changedChunks(device: BackupBlockDevice): AsyncGenerator<ChangedChunk> {
  return device.changedChunks();
}


/**
 * A `RestorePointSpec` (src/backup/writer.ts) for `bootrestore commit`: a new restore point whose parent is
 * the mounted one; chunks the delta does not touch are taken from the parent unread ('parent'), touched
 * chunks are the merged content ('zero' when it is all zeroes). Run it on a quiesced mount.
 *
 * `base` must check SHA-256 (openRestorePoint's default): a touched chunk keeps the bytes of its base
 * chunk the delta does not cover, read through the mount's cache, which may only have checked their
 * CRC32 (`cache.verify`). A valid chunk stored under the wrong digest passes that, and once merged and
 * hashed anew nothing could tell it later; so the base of each touched chunk that keeps base bytes is
 * loaded and checked through `base` first, and a mismatch fails the commit with the chunk's digest.
 */
export function commitSpecFor(
  device: BackupBlockDevice,
  base: RestorePointReader,
  options: { readonly vm: string; readonly parent: string; readonly source: string },
): RestorePointSpec {
  return {
    vm: options.vm,
    parent: options.parent,
    imageSize: base.imageSize,
    chunkSize: base.chunkSize,
    source: options.source,
    chunkContent: async (index: number, length: number) => {
      const content = await device.mergedChunk(index, length);
      if (content !== 'parent' && base.chunkDigest(index) !== null && device.keepsBaseBytes(index)) await base.loadChunk(index);
      return content;
    },
  };
}
