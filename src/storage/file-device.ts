import { open, type FileHandle } from 'node:fs/promises';
import { constants as fsConstants } from 'node:fs';
import {
  StorageError,
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

/**
 * A LUN backed by a plain raw file (or block device node). Unmap writes zeroes (the file keeps
 * its allocation: Node has no fallocate(PUNCH_HOLE)); reads of unmapped blocks therefore return
 * zeroes, which is what LBPRZ=1 promises. `status()` is not offered: every block counts as mapped.
 */
export class FileBlockDevice implements BlockDevice {
  readonly blockSize: number;
  readonly supportsUnmap = true;
  private zeroBlock: Buffer | undefined;

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

  async read(lba: number, blocks: number): Promise<Buffer> {
    const length = blocks * this.blockSize;
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.handle.read(buf, done, length - done, lba * this.blockSize + done);
        if (bytesRead === 0) {
          buf.fill(0, done); // the file shrank under us: the rest reads as zeroes
          break;
        }
        done += bytesRead;
      }
    } catch (err) {
      throw new StorageError(`read of ${this.path} at LBA ${lba} failed: ${(err as Error).message}`, 'medium-error', {
        cause: err,
      });
    }
    return buf;
  }

  async write(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    if (this.readOnly) throw new StorageError(`${this.path} is read-only`, 'write-protected');
    try {
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await this.handle.write(data, done, data.length - done, lba * this.blockSize + done);
        done += bytesWritten;
      }
      if (opts.fua) await this.handle.datasync();
    } catch (err) {
      throw new StorageError(`write of ${this.path} at LBA ${lba} failed: ${(err as Error).message}`, 'write-error', {
        cause: err,
      });
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    try {
      await this.handle.datasync();
    } catch (err) {
      throw new StorageError(`flush of ${this.path} failed: ${(err as Error).message}`, 'write-error', { cause: err });
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
