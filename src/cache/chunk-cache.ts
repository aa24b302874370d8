/**
 * The process-wide cache of decompressed backup chunks.
 *
 * - Keyed by the chunk's SHA-256 (hex), so restore points and VMs that share a chunk share one entry.
 * - Bounded in bytes (`lru-cache` `maxSize` + `sizeCalculation`); a chunk larger than the whole cache is
 *   returned to the caller but not kept.
 * - Single-flight: concurrent misses on one digest wait for one load.
 * - Loads are bounded (`maxConcurrentLoads`): memory use is at most maxBytes + maxConcurrentLoads × chunk size
 *   + (maxConcurrentLoads + 2) free recycled buffers per chunk size (plus buffers still referenced by callers).
 *   Preallocated buffers (`preallocate`) stay within that bound: free ones, cached bytes and the buffers
 *   of loads in flight stay within maxBytes + maxConcurrentLoads buffers, or the free ones within
 *   maxFreeBuffers if that is more.
 * - Never blocks the event loop: loading (read + inflate + verify) is the reader's async work.
 * - Recycles memory: a load may be given a buffer of an evicted chunk to read into (`bufferBytes`), so a
 *   long sequential read does not leave a trail of evicted chunks for the garbage collector (they are
 *   old-generation objects by then and would pile up to ~64 MiB before V8 collects them). A buffer is
 *   reused only if no view of it escaped (`noteEscaped`), not while a caller holds it pinned (`pin` /
 *   `unpin`: e.g. a chunk queued on a socket) and only from the next event-loop turn on, after every
 *   waiter of its load has copied what it needed.
 */
import { LRUCache } from 'lru-cache';
import type { Logger } from '../log.js';

/**
 * Loads one verified, decompressed chunk (normally `RestorePointReader.loadChunkByDigest`). `into`, when
 * given, is a recycled buffer the loader may read into; the result may be a view of it.
 */
export type ChunkLoader = (into: Buffer | undefined) => Promise<Buffer>;

/** What `ChunkCache.prefetch` did: started a load, found the chunk cached or loading, or had no slot. */
export type PrefetchOutcome = 'started' | 'present' | 'busy';

export interface ChunkCacheOptions {
  /** Upper bound of cached bytes (decompressed chunk lengths). */
  readonly maxBytes: number;
  /**
   * Loads running at once (further misses queue; prefetches use at most three quarters of them).
   * Default 16 (cold sequential pass: 370–390 MiB/s with 8 and 8 chunks read-ahead, 450–555 with 16 and 16).
   */
  readonly maxConcurrentLoads?: number;
  readonly logger: Logger;
}

/** Cache statistics as a plain object (for `bootrestore mounts`, metrics and tests). */
export interface ChunkCacheStats {
  readonly maxBytes: number;
  readonly bytes: number;
  readonly entries: number;
  readonly hits: number;
  readonly misses: number;
  /** Misses that joined a load already in flight (single-flight). */
  readonly joinedLoads: number;
  /** Loads started (demand + prefetch). */
  readonly loads: number;
  readonly loadFailures: number;
  readonly bytesDecompressed: number;
  readonly evictions: number;
  readonly prefetchLoads: number;
  /** Prefetched entries that were later read. */
  readonly prefetchHits: number;
  /** Prefetches skipped because the entry was cached/in flight or loads were saturated. */
  readonly prefetchSkipped: number;
  readonly loadsInFlight: number;
  readonly loadsQueued: number;
  /** Entries currently cached that were used by two or more distinct mounts (shared chunks). */
  readonly sharedEntries: number;
  /** Loads that read into a recycled buffer (of an evicted chunk, or preallocated) instead of a new one. */
  readonly recycledBuffers: number;
  /** Bytes of chunk buffers preallocated and faulted in so far (`preallocate`; 0 if not asked for). */
  readonly preallocatedBytes: number;
  /** True while `preallocate` is still faulting in memory. */
  readonly preallocating: boolean;
  /** Bytes of buffers kept free for later loads (recycled or preallocated). */
  readonly freeBufferBytes: number;
  /** Hits by a mount on an entry first loaded by another mount. */
  readonly crossMountHits: number;
  /** Per mount: hits, misses and cross-mount hits. */
  readonly byMount: Readonly<Record<string, { hits: number; misses: number; crossMountHits: number }>>;
}

interface CacheEntry {
  readonly data: Buffer;
  /** The recycled-pool buffer `data` is a view of (returned to the pool on eviction), if any. */
  readonly slot: Buffer | undefined;
  /** Mount that caused the load. */
  readonly loadedBy: string;
  /** Distinct mounts that used this entry (small: a handful of mounts share a chunk). */
  readonly users: Set<string>;
  prefetched: boolean;
}

interface MountCounters {
  hits: number;
  misses: number;
  crossMountHits: number;
}

export class ChunkCache {
  readonly maxBytes: number;
  private readonly lru: LRUCache<string, CacheEntry>;
  private readonly inFlight = new Map<string, Promise<Buffer>>();
  private readonly maxConcurrentLoads: number;
  /** Loads running at once beyond which no prefetch starts (the rest are kept for demand loads). */
  private readonly maxPrefetchLoads: number;
  private runningLoads = 0;
  private readonly loadQueue: Array<() => void> = [];
  private readonly logger: Logger;
  private readonly mountCounters = new Map<string, MountCounters>();
  private sharedEntryCount = 0;
  /** Free recyclable buffers by size (bounded: `maxFreeBuffers` per size, see `putFree`). */
  private readonly freeBuffers = new Map<number, Buffer[]>();
  private readonly maxFreeBuffers: number;
  /** Bytes of all buffers in `freeBuffers`. */
  private freeBytes = 0;
  /** Bytes of the buffers that running loads read into. */
  private inFlightBufferBytes = 0;
  /** The buffer size `preallocate` reserved memory for (its free list may exceed `maxFreeBuffers`). */
  private reservedBufferBytes = 0;
  private preallocatedBytes = 0;
  private preallocating = false;
  /** Buffers of evicted entries, free again from the next event-loop turn (see `retire`). */
  private retiring: Buffer[] = [];
  private retireScheduled = false;
  /** Backing stores of cached chunks that were handed out as views: never recycled. */
  private readonly escaped = new WeakSet<ArrayBufferLike>();
  private recycledBuffers = 0;
  /** Pin counts by backing store: such buffers are not recycled until unpinned. */
  private readonly pins = new Map<ArrayBufferLike, number>();
  /** Retired slots that were pinned at retirement: recycled when their last pin goes. */
  private readonly retiredWhilePinned = new Map<ArrayBufferLike, Buffer>();
  private counters = {
    hits: 0,
    misses: 0,
    joinedLoads: 0,
    loads: 0,
    loadFailures: 0,
    bytesDecompressed: 0,
    evictions: 0,
    prefetchLoads: 0,
    prefetchHits: 0,
    prefetchSkipped: 0,
    crossMountHits: 0,
  };

  constructor(options: ChunkCacheOptions) {
    if (!(options.maxBytes > 0)) throw new RangeError(`chunk cache size must be > 0 (got ${options.maxBytes})`);
    this.maxBytes = options.maxBytes;
    this.maxConcurrentLoads = Math.max(1, options.maxConcurrentLoads ?? 16);
    this.maxPrefetchLoads = this.maxConcurrentLoads - Math.floor(this.maxConcurrentLoads / 4);
    this.logger = options.logger;
    this.maxFreeBuffers = this.maxConcurrentLoads + 2;
    this.lru = new LRUCache<string, CacheEntry>({
      maxSize: options.maxBytes,
      maxEntrySize: options.maxBytes,
      sizeCalculation: (entry) => Math.max(1, entry.data.length),
      dispose: (entry, _key, reason) => {
        if (entry.users.size >= 2) this.sharedEntryCount--;
        if (reason === 'evict') this.counters.evictions++;
        if (entry.slot !== undefined) this.retire(entry.slot);
      },
    });
  }

  /**
   * The cached chunk, or undefined. Synchronous: the read path uses it to avoid a promise per hit.
   * The returned buffer is shared: callers must not modify it.
   */
  getCached(key: string, mount: string): Buffer | undefined {
    const entry = this.lru.get(key);
    if (entry === undefined) return undefined;
    this.noteHit(entry, mount);
    return entry.data;
  }

  /**
   * The chunk with this key, loading it once if absent (concurrent callers share the load).
   * The returned buffer is shared: callers must not modify it.
   */
  get(key: string, mount: string, load: ChunkLoader, bufferBytes = 0): Promise<Buffer> {
    const cached = this.getCached(key, mount);
    if (cached !== undefined) return Promise.resolve(cached);
    const counters = this.countersFor(mount);
    counters.misses++;
    this.counters.misses++;
    const pending = this.inFlight.get(key);
    if (pending !== undefined) {
      this.counters.joinedLoads++;
      return pending;
    }
    return this.startLoad(key, mount, load, false, bufferBytes);
  }

  /**
   * Start loading a chunk in the background if it is neither cached nor loading and a load slot is
   * free: 'started'; 'present' if it is cached or loading; 'busy' if prefetches may not start now.
   * Prefetch never queues, and it leaves a quarter of the load slots to demand loads, so a read
   * that misses does not wait for a full window of read-ahead to finish first.
   */
  prefetch(key: string, mount: string, load: ChunkLoader, bufferBytes = 0): PrefetchOutcome {
    if (this.lru.has(key) || this.inFlight.has(key)) {
      this.counters.prefetchSkipped++;
      return 'present';
    }
    if (this.runningLoads >= this.maxPrefetchLoads) {
      this.counters.prefetchSkipped++;
      return 'busy';
    }
    this.counters.prefetchLoads++;
    this.startLoad(key, mount, load, true, bufferBytes).catch((err: unknown) => {
      // The demand read of this chunk (if any) reports the error; a failed prefetch only logs.
      this.logger.debug({ err, chunk: key }, 'prefetch failed');
    });
    return 'started';
  }

  /**
   * A view of `chunk` (a buffer this cache returned) leaves the caller's synchronous code (for example it
   * is returned as a read result): its memory must never be reused for another chunk.
   */
  noteEscaped(chunk: Buffer): void {
    this.escaped.add(chunk.buffer);
  }

  /**
   * Keep the memory of `chunk` (a buffer this cache returned, or a view of it) from being reused until
   * the matching `unpin`. Cheaper than `noteEscaped` for views whose use ends at a known time.
   */
  pin(chunk: Buffer): void {
    const store = chunk.buffer;
    this.pins.set(store, (this.pins.get(store) ?? 0) + 1);
  }

  unpin(chunk: Buffer): void {
    const store = chunk.buffer;
    const count = this.pins.get(store);
    if (count === undefined) return;
    if (count > 1) {
      this.pins.set(store, count - 1);
      return;
    }
    this.pins.delete(store);
    const slot = this.retiredWhilePinned.get(store);
    if (slot !== undefined) {
      this.retiredWhilePinned.delete(store);
      this.retire(slot);
    }
  }

  has(key: string): boolean {
    return this.lru.has(key);
  }

  stats(): ChunkCacheStats {
    const byMount: Record<string, { hits: number; misses: number; crossMountHits: number }> = {};
    for (const [mount, c] of this.mountCounters) byMount[mount] = { ...c };
    return {
      maxBytes: this.maxBytes,
      bytes: this.lru.calculatedSize,
      entries: this.lru.size,
      ...this.counters,
      loadsInFlight: this.runningLoads,
      loadsQueued: this.loadQueue.length,
      sharedEntries: this.sharedEntryCount,
      recycledBuffers: this.recycledBuffers,
      preallocatedBytes: this.preallocatedBytes,
      preallocating: this.preallocating,
      freeBufferBytes: this.freeBytes,
      byMount,
    };
  }

  /** Forget a mount's per-mount counters (called when a mount is removed). */
  forgetMount(mount: string): void {
    this.mountCounters.delete(mount);
  }

  /** Drop every entry (tests). Their buffers stay free for later loads. */
  clear(): void {
    this.lru.clear();
  }

  private noteHit(entry: CacheEntry, mount: string): void {
    this.counters.hits++;
    const counters = this.countersFor(mount);
    counters.hits++;
    if (entry.prefetched) {
      entry.prefetched = false;
      this.counters.prefetchHits++;
    }
    if (entry.loadedBy !== mount) {
      counters.crossMountHits++;
      this.counters.crossMountHits++;
    }
    if (!entry.users.has(mount)) {
      entry.users.add(mount);
      if (entry.users.size === 2) this.sharedEntryCount++;
    }
  }

  private countersFor(mount: string): MountCounters {
    let c = this.mountCounters.get(mount);
    if (c === undefined) {
      c = { hits: 0, misses: 0, crossMountHits: 0 };
      this.mountCounters.set(mount, c);
    }
    return c;
  }

  private startLoad(key: string, mount: string, load: ChunkLoader, prefetched: boolean, bufferBytes: number): Promise<Buffer> {
    const promise = this.runLoad(key, mount, load, prefetched, bufferBytes);
    this.inFlight.set(key, promise);
    // Clean up whichever way the load ends; the caller handles the rejection.
    promise.then(
      () => this.inFlight.delete(key),
      () => this.inFlight.delete(key),
    );
    return promise;
  }

  private async runLoad(key: string, mount: string, load: ChunkLoader, prefetched: boolean, bufferBytes: number): Promise<Buffer> {
    await this.acquireLoadSlot();
    this.counters.loads++;
    const scratch = bufferBytes > 0 ? this.takeBuffer(bufferBytes) : undefined;
    const scratchBytes = scratch?.length ?? 0;
    this.inFlightBufferBytes += scratchBytes;
    try {
      let data: Buffer;
      try {
        data = await load(scratch);
      } finally {
        this.inFlightBufferBytes -= scratchBytes;
      }
      this.counters.bytesDecompressed += data.length;
      // The loader either put the chunk into `scratch` (the entry owns it now) or returned a buffer of
      // its own (a loader that does not use it): then `scratch` is free again.
      const owned = scratch !== undefined && data.buffer === scratch.buffer;
      if (scratch !== undefined && !owned) this.putFree(scratch);
      const entry: CacheEntry = { data, slot: owned ? scratch : undefined, loadedBy: mount, users: new Set([mount]), prefetched };
      // lru-cache ignores entries larger than maxEntrySize; the caller still gets the data.
      this.lru.set(key, entry);
      if (this.reservedBufferBytes > 0) this.trimReserve();
      return data;
    } catch (err) {
      this.counters.loadFailures++;
      throw err;
    } finally {
      this.releaseLoadSlot();
    }
  }

  /**
   * A buffer of exactly `bytes` bytes: a recycled one if free, else a new one of shared memory, so
   * that the chunk worker that decodes the chunk writes it there directly (src/backup/chunk-workers.ts):
   * no copy. (calloc clears, and so faults in, heap memory it reuses on this thread; memory it takes
   * fresh from the kernel is first touched by the worker.)
   */
  private takeBuffer(bytes: number): Buffer {
    const free = this.freeBuffers.get(bytes);
    const recycled = free?.pop();
    if (recycled !== undefined) {
      this.freeBytes -= recycled.length;
      this.recycledBuffers++;
      return recycled;
    }
    return Buffer.from(new SharedArrayBuffer(bytes));
  }

  /**
   * Keep `buffer` for a later load: up to `maxFreeBuffers` per size, and of the preallocated size
   * more as long as they fit within `reserveLimit`. A buffer not kept is left to the garbage collector.
   */
  private putFree(buffer: Buffer): void {
    let free = this.freeBuffers.get(buffer.length);
    if (free === undefined) {
      free = [];
      this.freeBuffers.set(buffer.length, free);
    }
    // Like every size, the reserved one keeps `maxFreeBuffers` whatever the limit: buffers of pinned
    // chunks come back late, and dropping them would only make later loads allocate anew.
    const keep = free.length < this.maxFreeBuffers || (buffer.length === this.reservedBufferBytes && this.reservedUse() + buffer.length <= this.reserveLimit());
    if (keep) {
      free.push(buffer);
      this.freeBytes += buffer.length;
    }
  }

  /**
   * Drop free preallocated buffers beyond `reserveLimit`, down to `maxFreeBuffers` (the cache filled
   * with chunks of another size, or with views it cannot recycle).
   */
  private trimReserve(): void {
    const free = this.freeBuffers.get(this.reservedBufferBytes);
    if (free === undefined) return;
    const limit = this.reserveLimit();
    while (free.length > this.maxFreeBuffers && this.reservedUse() > limit) this.freeBytes -= free.pop()!.length;
  }

  /** What `preallocate` reserves: the cache's bytes plus one buffer per load that can run at once. */
  private reserveLimit(): number {
    return this.maxBytes + this.maxConcurrentLoads * this.reservedBufferBytes;
  }

  /** Chunk memory the reserve bound counts: free buffers, cached bytes, buffers of loads in flight. */
  private reservedUse(): number {
    return this.freeBytes + this.lru.calculatedSize + this.inFlightBufferBytes;
  }

  /**
   * Reserve the cache's memory now, in buffers of `bufferBytes` (what the mounts' loads ask for, see
   * `BackupBlockDevice.cacheBufferBytes`), so the first reads after a server start do not pay for
   * new memory: on a virtual machine the first touch of a page costs a fault in the guest and often
   * one in the host (measured here: 0.1–1.9 s per GiB). Runs on the event loop in slices of
   * ~`PREALLOCATE_SLICE_MS`, yielding between them, so reads that start meanwhile are served (and
   * use what is ready). The work is the same as a cold read would do when it first fills the cache
   * (Node allocates array buffers with calloc, which clears them on the allocating thread); it is
   * just done before the reads. Stops when free, cached and in-flight buffers reach maxBytes plus one
   * buffer per concurrent load (`reserveLimit`). At most once per cache; resolves when done.
   */
  async preallocate(bufferBytes: number): Promise<void> {
    if (this.reservedBufferBytes > 0 || !(bufferBytes > 0)) return;
    if (bufferBytes > this.maxBytes) {
      this.logger.warn({ bufferBytes, maxBytes: this.maxBytes }, 'cache.preallocate skipped: a chunk buffer is larger than the whole cache');
      return;
    }
    this.reservedBufferBytes = bufferBytes;
    this.preallocating = true;
    const started = performance.now();
    try {
      while (this.reservedUse() + bufferBytes <= this.reserveLimit()) {
        const sliceEnd = performance.now() + PREALLOCATE_SLICE_MS;
        do {
          const buffer = Buffer.from(new SharedArrayBuffer(bufferBytes));
          // calloc leaves memory it got fresh from the kernel untouched: fault that in too.
          for (let offset = 0; offset < bufferBytes; offset += PAGE_BYTES) buffer[offset] = 0;
          this.putFree(buffer);
          this.preallocatedBytes += bufferBytes;
        } while (this.reservedUse() + bufferBytes <= this.reserveLimit() && performance.now() < sliceEnd);
        await new Promise((resolve) => setImmediate(resolve));
      }
      this.logger.info({ bytes: this.preallocatedBytes, bufferBytes, ms: Math.round(performance.now() - started) }, 'cache memory preallocated');
    } finally {
      this.preallocating = false;
    }
  }

  /**
   * An evicted entry's buffer becomes free on the next turn of the event loop: waiters of the load that
   * filled it copy from it in promise reactions of the current turn. Buffers with escaped views are
   * left to the garbage collector; pinned ones wait for their last `unpin`.
   */
  private retire(slot: Buffer): void {
    this.retiring.push(slot);
    if (this.retireScheduled) return;
    this.retireScheduled = true;
    setImmediate(() => {
      this.retireScheduled = false;
      const retiring = this.retiring;
      this.retiring = [];
      for (const buffer of retiring) {
        if (this.escaped.has(buffer.buffer)) continue;
        if (this.pins.has(buffer.buffer)) this.retiredWhilePinned.set(buffer.buffer, buffer);
        else this.putFree(buffer);
      }
    });
  }

  private acquireLoadSlot(): Promise<void> | void {
    if (this.runningLoads < this.maxConcurrentLoads) {
      this.runningLoads++;
      return;
    }
    return new Promise<void>((resolve) => {
      this.loadQueue.push(() => {
        this.runningLoads++;
        resolve();
      });
    });
  }

  private releaseLoadSlot(): void {
    this.runningLoads--;
    const next = this.loadQueue.shift();
    if (next !== undefined) next();
  }
}

/** Longest stretch `preallocate` keeps the event loop before it yields. */
const PREALLOCATE_SLICE_MS = 2;
const PAGE_BYTES = 4096;

let processCache: ChunkCache | undefined;

/**
 * The one cache of this process (created on first use with these options; later calls return the same
 * instance and ignore the options). Mounts share it so identical chunks are cached once.
 */
export function processChunkCache(options: ChunkCacheOptions): ChunkCache {
  processCache ??= new ChunkCache(options);
  return processCache;
}
