/**
 * Public types of the backup module. `src/cache` uses `RestorePointReader` (plus the reader's
 * `chunkFileBufferSize`, the writer's `RestorePointSpec`/`ChunkContent` and `CorruptChunkError`);
 * the source parsers (raw, qcow2, VMDK) implement `DiskSource`.
 */

/** A disk image opened for reading by one of our parsers (raw, qcow2, VMDK). */
export interface DiskSource {
  /** Virtual size of the disk in bytes (what the guest sees). */
  readonly size: number;
  /** Human-readable description, e.g. "qcow2 /path/disk.qcow2 (backing: base.qcow2)". */
  readonly description: string;
  /** Format name: 'raw' | 'qcow2' | 'vmdk-monolithicSparse' | 'vmdk-streamOptimized' | 'vmdk-monolithicFlat' ... */
  readonly format: string;
  /**
   * Read `length` bytes at virtual `offset` (unallocated areas read as zeroes). Reads beyond `size`
   * are an error. Returns a buffer of exactly `length` bytes.
   */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: allocation map hint. Returns ranges [offset, length) that are known to read as zero
   * (unallocated in the image), so backup can skip reading them. May return [] if unknown.
   */
  zeroRanges?(): Promise<ReadonlyArray<{ offset: number; length: number }>>;
  /**
   * Optional: throw SourceError if any file of the image changed since it was opened (checked now).
   * The backup calls it after its last read, before it publishes the restore point.
   */
  checkUnchanged?(): Promise<void>;
  close(): Promise<void>;
}

/** Summary of one restore point, as listed by `bootrestore list`. */
export interface RestorePointInfo {
  readonly vm: string;
  /** Restore point id: sortable, e.g. "2026-12-02T14-07-08.123Z". */
  readonly id: string;
  readonly parent: string | null;
  readonly createdAt: string;
  readonly imageSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  readonly zeroChunks: number;
  readonly source: string;
}

/**
 * How a reader checks each chunk it loads: 'sha256' (the content hashes to the digest it is
 * stored under) or 'crc32' (the stored payload's CRC32 from backup time). See OpenOptions.verification.
 */
export type ChunkVerification = 'crc32' | 'sha256';

/**
 * Random access to one restore point. Used by `src/cache` (which adds the LRU cache and read-ahead)
 * and by export/verify. Never writes to the repository.
 */
export interface RestorePointReader {
  readonly info: RestorePointInfo;
  readonly imageSize: number;
  readonly chunkSize: number;
  readonly chunkCount: number;
  /** SHA-256 digest of chunk `index` (uncompressed content), or null for an all-zero chunk. */
  chunkDigest(index: number): Buffer | null;
  /** Uncompressed length of chunk `index` (chunkSize, except possibly the last chunk). */
  chunkLength(index: number): number;
  /**
   * Load, decompress (asynchronously) and verify chunk `index`. Zero chunks return a zero buffer.
   * Throws `CorruptChunkError` if the chunk is missing, its header or lengths are wrong, or its
   * check fails (SHA-256 or CRC32, as the reader was opened). Does no caching of its own.
   */
  loadChunk(index: number): Promise<Buffer>;
  /**
   * Load and verify the chunk with this digest (shared by restore points: the cache keys by it).
   * `into` (optional): a buffer the implementation may read into instead of allocating; the result
   * may then be a view of it (the caller owns `into` and must keep it unchanged while it uses the result).
   */
  loadChunkByDigest(digest: Buffer, length: number, into?: Buffer): Promise<Buffer>;
  /** Read any byte range (convenience; loads the chunks it needs concurrently). */
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}
