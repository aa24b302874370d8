import { open, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants, read as readAt } from 'node:fs';
import {
  StorageError,
  writeFailure,
  type BlockDevice,
  type BlockDeviceIdentity,
  type LbaRange,
  type WriteOptions,
} from '../block-device.js';

export interface FileBlockDeviceOptions {
  readonly path: string;
  readonly readOnly: boolean;
  readonly identity: BlockDeviceIdentity;
  readonly blockSize?: number;
}

/** Largest zero buffer written at once by unmap (bounded memory). */
const ZERO_BATCH_BYTES = 1 << 20;

/** Reads up to this size are carved from a shared slab instead of getting an ArrayBuffer each. */
const SLAB_READ_MAX = 64 * 1024;
const SLAB_BYTES = 128 * 1024;

/**
 * Read buffers for small requests, carved from 128 KiB slabs (the scheme of Node's own Buffer pool,
 * which only serves < 4 KiB). A carved region is never handed out twice: a slab is dropped once
 * full and lives on only as long as some read result still references it. One ArrayBuffer per
 * 128 KiB instead of one per 4 KiB read keeps allocation and GC work off the random-read path.
 */
class ReadSlab {
  private slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
  private used = 0;

  take(length: number): Buffer {
    if (this.used + length > SLAB_BYTES) {
      this.slab = Buffer.allocUnsafeSlow(SLAB_BYTES);
      this.used = 0;
    }
    const start = this.used;
    // Keep regions 8-byte aligned (cheap, and friendly to any later typed-array view).
    this.used = (start + length + 7) & ~7;
    return this.slab.subarray(start, start + length);
  }
}

/**
 * One pending read with the callback API of node:fs (a single promise and no FileHandle
 * bookkeeping per request, unlike FileHandle.read); short reads continue where they stopped.
 */
class PendingRead {
  private done = 0;
  private resolve!: (buf: Buffer) => void;
  private reject!: (err: Error) => void;
  readonly promise: Promise<Buffer>;

  constructor(
    private readonly fd: number,
    private readonly buf: Buffer,
    private readonly position: number,
    private readonly path: string,
    private readonly lba: number,
  ) {
    this.promise = new Promise<Buffer>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.next();
  }

  private next(): void {
    try {
      readAt(this.fd, this.buf, this.done, this.buf.length - this.done, this.position + this.done, this.onRead);
    } catch (err) {
      // Argument errors are thrown, not called back (e.g. fd -1 once the device is closed).
      this.onRead(err as NodeJS.ErrnoException, 0);
    }
  }

  private readonly onRead = (err: NodeJS.ErrnoException | null, bytesRead: number): void => {
    if (err) {
      this.reject(
        new StorageError(`read of ${this.path} at LBA ${this.lba} failed: ${err.message}`, 'medium-error', { cause: err }),
      );
      return;
    }
    if (bytesRead === 0) {
      this.buf.fill(0, this.done); // the file shrank under us: the rest reads as zeroes
      this.resolve(this.buf);
      return;
    }
    this.done += bytesRead;
    if (this.done < this.buf.length) this.next();
    else this.resolve(this.buf);
  };
}

/**
 * A LUN backed by a plain raw file (or block device node). Unmap writes zeroes (the file keeps
 * its allocation: Node has no fallocate(PUNCH_HOLE)); reads of unmapped blocks therefore return
 * zeroes, which is what LBPRZ=1 promises. `status()` is not offered: every block counts as mapped.
 */
export class FileBlockDevice implements BlockDevice {
  readonly blockSize: number;
  readonly supportsUnmap = true;
  private zeroBlock: Buffer | undefined;
  private readonly slab = new ReadSlab();
  /** Set by the first failed fdatasync: see sync(). */
  private syncFailed: StorageError | null = null;

  private constructor(
    private readonly handle: FileHandle,
    readonly blockCount: number,
    readonly readOnly: boolean,
    readonly identity: BlockDeviceIdentity,
    blockSize: number,
    readonly path: string,
  ) {
    this.blockSize = blockSize;
  }

  static async open(opts: FileBlockDeviceOptions): Promise<FileBlockDevice> {
    const blockSize = opts.blockSize ?? 512;
    const flags = opts.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    let handle: FileHandle;
    try {
      handle = await open(opts.path, flags);
    } catch (err) {
      throw new Error(`cannot open LUN file ${opts.path}: ${(err as NodeJS.ErrnoException).message}`);
    }
    const stat = await handle.stat();
    let size = stat.size;
    if (stat.isBlockDevice()) {
      // stat() reports 0 for block devices: find the size by seeking via a read at the end.
      size = await blockDeviceSize(handle);
    } else if (!stat.isFile()) {
      await handle.close();
      throw new Error(`LUN file ${opts.path} is neither a regular file nor a block device`);
    }
    const blockCount = Math.floor(size / blockSize);
    if (blockCount === 0) {
      await handle.close();
      throw new Error(`LUN file ${opts.path} is smaller than one ${blockSize}-byte block`);
    }
    return new FileBlockDevice(handle, blockCount, opts.readOnly, opts.identity, blockSize, opts.path);
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    const length = blocks * this.blockSize;
    const buf = length <= SLAB_READ_MAX ? this.slab.take(length) : Buffer.allocUnsafe(length);
    return new PendingRead(this.handle.fd, buf, lba * this.blockSize, this.path, lba).promise;
  }

  async write(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.path} is read-only`, 'write-protected');
    if (this.syncFailed !== null) throw this.syncFailed;
    try {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await this.handle.write(data, done, data.length - done, lba * this.blockSize + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw writeFailure(`write of ${this.path} at LBA ${lba} failed: ${(err as Error).message}`, err);
    }
    if (opts.fua) await this.sync(`write of ${this.path} at LBA ${lba}`);
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.sync(`flush of ${this.path}`);
  }

  /**
   * fdatasync; a failure is final for this open file: the kernel may have dropped the dirty pages it
   * could not write (and marked them clean), so a later sync that succeeds would not mean the
   * earlier writes are on disk. Every later write and flush fails with the same WRITE ERROR
   * (never "out of space", which invites the initiator to retry) until the LUN is opened again.
   */
  private async sync(what: string): Promise<void> {
    if (this.syncFailed !== null) throw this.syncFailed;
    try {
      await this.handle.datasync();
    } catch (err) {
      this.syncFailed ??= new StorageError(`${what} failed: data sync: ${(err as Error).message}; this LUN refuses writes until it is opened again`, 'write-error', {
        cause: err,
      });
      throw this.syncFailed;
    }
  }

  async unmap(ranges: ReadonlyArray<LbaRange>): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.path} is read-only`, 'write-protected');
    const batchBlocks = Math.max(1, Math.floor(ZERO_BATCH_BYTES / this.blockSize));
    for (const range of ranges) {
      let lba = range.lba;
      let left = range.blocks;
      while (left > 0) {
        const n = Math.min(left, batchBlocks);
        await this.write(lba, this.zeroes(n), { fua: false });
        lba += n;
        left -= n;
      }
    }
  }

  async close(): Promise<void> {
    await this.handle.close();
  }

  private zeroes(blocks: number): Buffer {
    const bytes = blocks * this.blockSize;
    if (!this.zeroBlock || this.zeroBlock.length < bytes) {
      this.zeroBlock = Buffer.alloc(Math.min(ZERO_BATCH_BYTES, Math.max(bytes, this.blockSize)));
    }
    return this.zeroBlock.subarray(0, bytes);
  }
}

async function blockDeviceSize(handle: FileHandle): Promise<number> {
  // Binary search for the last readable byte; block devices do not report st_size.
  const probe = Buffer.allocUnsafe(1);
  let lo = 0;
  let hi = 1;
  while ((await handle.read(probe, 0, 1, hi)).bytesRead === 1) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if ((await handle.read(probe, 0, 1, mid)).bytesRead === 1) lo = mid;
    else hi = mid;
  }
  return lo + 1;
}
