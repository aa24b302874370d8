/**
 * The seam between the iSCSI target and storage. `src/iscsi` serves any object that implements
 * `BlockDevice`; `src/cache` (backup + delta) and `src/storage/file-device.ts` (raw file) implement it.
 * Neither side imports the other: both import only this module.
 */

export interface BlockDeviceIdentity {
  /** Unit serial number (VPD 0x80): printable ASCII, stable across restarts. */
  readonly serial: string;
  /** NAA designator for VPD 0x83 (8 bytes NAA 2/3/5 or 16 bytes NAA 6), stable across restarts. */
  readonly naa: Buffer;
  /** T10 vendor identification (≤ 8 ASCII chars). */
  readonly vendor: string;
  /** Product identification (≤ 16 ASCII chars). */
  readonly product: string;
  /** Product revision (≤ 4 ASCII chars). */
  readonly revision?: string;
}

export interface LbaRange {
  readonly lba: number;
  readonly blocks: number;
}

/** Provisioning state of a run of blocks starting at some LBA (SBC-3 5.5 GET LBA STATUS). */
export interface LbaStatus {
  /** true: mapped (holds data); false: deallocated (reads return zeroes). */
  readonly mapped: boolean;
  /** Number of blocks from the queried LBA that share this state (≥ 1). */
  readonly blocks: number;
}

/**
 * Data of a read as consecutive read-only slices (for example views of cached chunks), valid until
 * `release` is called. Lets the target send cached data to the socket without assembling a copy.
 */
export interface SegmentedRead {
  readonly segments: readonly Buffer[];
  /** Total bytes in `segments`. */
  readonly length: number;
  /** Call exactly once when the slices are no longer used (sent or dropped); the device may then reuse them. */
  readonly release: () => void;
}

const releaseNothing = (): void => {};

/** A SegmentedRead of one buffer the caller owns (nothing to release). */
export function wholeRead(data: Buffer): SegmentedRead {
  return { segments: [data], length: data.length, release: releaseNothing };
}

export interface WriteOptions {
  /** Force unit access: the data must be durable before the promise resolves. */
  readonly fua: boolean;
}

export interface BlockDevice {
  /** Logical block size in bytes: 512 for every LUN an ESXi host may see. */
  readonly blockSize: number;
  /** Number of logical blocks. JS numbers are exact to 2^53: ample for LBAs and byte offsets. */
  readonly blockCount: number;
  readonly readOnly: boolean;
  readonly identity: BlockDeviceIdentity;
  /**
   * true when unmap() is supported and later reads of unmapped blocks return zeroes (the target
   * then advertises LBPME/LBPRZ and accepts UNMAP / WRITE SAME with UNMAP).
   */
  readonly supportsUnmap: boolean;
  /**
   * Read `blocks` blocks from `lba`. The caller guarantees the range is within the device. The
   * result may be shared with other readers (e.g. a view of a cached chunk): callers must never
   * modify it. Implementations must not modify a `write` argument either.
   */
  read(lba: number, blocks: number): Promise<Buffer>;
  /**
   * Optional zero-copy form of read(): the same bytes, as slices the device keeps unchanged until
   * the result's release() is called. The target uses it for READ Data-In.
   */
  readSegments?(lba: number, blocks: number): Promise<SegmentedRead>;
  /** Write whole blocks (data.length is a multiple of blockSize). */
  write(lba: number, data: Buffer, opts: WriteOptions): Promise<void>;
  /** Make every acknowledged write durable (SYNCHRONIZE CACHE). */
  flush(): Promise<void>;
  /** Deallocate ranges; subsequent reads return zeroes. */
  unmap(ranges: ReadonlyArray<LbaRange>): Promise<void>;
  /** Provisioning status at `lba` (GET LBA STATUS); absent means "everything mapped". */
  status?(lba: number): Promise<LbaStatus>;
  /** Release resources (file handles). Called once when the LUN is removed or the server stops. */
  close(): Promise<void>;
}

/** Base class of typed storage errors; the SCSI layer maps each kind to one sense reason. */
export class StorageError extends Error {
  constructor(
    message: string,
    readonly kind: StorageErrorKind,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'StorageError';
  }
}

export type StorageErrorKind =
  /** Data cannot be read back correctly (corrupt or missing chunk, I/O error on read) → 03/11/00. */
  | 'medium-error'
  /** A write could not be stored (I/O error on write) → 03/0C/00. */
  | 'write-error'
  /**
   * The storage behind the LUN is full (ENOSPC, EDQUOT) → 07/27/07 SPACE ALLOCATION FAILED WRITE
   * PROTECT (SBC-3 4.7.3.7): initiators treat it as "out of space" (QEMU's default werror=enospc
   * pauses the VM, the Linux block layer returns ENOSPC) instead of as a failing disk.
   */
  | 'space-exhausted'
  /** The device refuses writes → 07/27/00. */
  | 'write-protected';

export function isStorageError(e: unknown): e is StorageError {
  return e instanceof StorageError;
}

/** A StorageError for a failed write, flush or journal update: 'space-exhausted' when the file system is full. */
export function writeFailure(message: string, cause: unknown): StorageError {
  const code = (cause as { code?: unknown } | null)?.code;
  const full = code === 'ENOSPC' || code === 'EDQUOT';
  return new StorageError(full ? `${message} (no space left for it)` : message, full ? 'space-exhausted' : 'write-error', { cause });
}
