/**
 * An in-memory BlockDevice for tests. Tracks which blocks are mapped (for GET LBA STATUS), can
 * inject storage errors, and can delay I/O to expose races.
 */

import {
  StorageError,
  type BlockDevice,
  type BlockDeviceIdentity,
  type LbaRange,
  type LbaStatus,
  type StorageErrorKind,
  type WriteOptions,
} from '../../src/block-device.js';

export interface MemoryDeviceOptions {
  readonly blockSize?: number;
  readonly blockCount: number;
  readonly readOnly?: boolean;
  readonly supportsUnmap?: boolean;
  /** Provide `status()` (GET LBA STATUS); default true. */
  readonly reportsStatus?: boolean;
  readonly identity?: Partial<BlockDeviceIdentity>;
  /** Milliseconds each read/write waits before touching the data (to provoke interleaving). */
  readonly ioDelayMs?: number;
}

let instances = 0;

export class MemoryDevice implements BlockDevice {
  readonly blockSize: number;
  readonly blockCount: number;
  readonly readOnly: boolean;
  readonly supportsUnmap: boolean;
  readonly identity: BlockDeviceIdentity;
  readonly data: Buffer;
  /** One byte per block: 1 = mapped. */
  readonly mapped: Uint8Array;
  readonly writes: Array<{ lba: number; blocks: number; fua: boolean }> = [];
  flushes = 0;
  closed = false;
  ioDelayMs: number;
  /** When set, the next read/write fails with this kind (then clears). */
  failNext: StorageErrorKind | undefined;
  readonly status?: (lba: number) => Promise<LbaStatus>;

  constructor(options: MemoryDeviceOptions) {
    this.blockSize = options.blockSize ?? 512;
    this.blockCount = options.blockCount;
    this.readOnly = options.readOnly ?? false;
    this.supportsUnmap = options.supportsUnmap ?? false;
    this.ioDelayMs = options.ioDelayMs ?? 0;
    // Unique per instance, as VPD 0x83 identities must be (EXTENDED COPY resolves LUs by them).
    const n = ++instances;
    const naa = Buffer.from([0x50, 0x01, 0x40, 0x50, 0, 0, 0, 0]);
    naa.writeUInt32BE(n, 4);
    this.identity = {
      serial: `MEM${String(n).padStart(5, '0')}`,
      naa,
      vendor: 'BOOTRST',
      product: 'MEMORY DISK',
      revision: '0001',
      ...options.identity,
    };
    this.data = Buffer.alloc(this.blockSize * this.blockCount);
    this.mapped = new Uint8Array(this.blockCount);
    if (options.reportsStatus ?? true) this.status = (lba) => this.statusAt(lba);
  }

  private async delay(): Promise<void> {
    if (this.ioDelayMs > 0) await new Promise((r) => setTimeout(r, this.ioDelayMs));
  }

  private check(lba: number, blocks: number, write: boolean): void {
    if (this.closed) throw new Error('device closed');
    if (!Number.isInteger(lba) || !Number.isInteger(blocks) || lba < 0 || blocks < 0 || lba + blocks > this.blockCount) {
      throw new RangeError(`range ${lba}+${blocks} outside device of ${this.blockCount} blocks`);
    }
    if (this.failNext !== undefined) {
      const kind = this.failNext;
      this.failNext = undefined;
      throw new StorageError(`injected ${kind}`, kind);
    }
    if (write && this.readOnly) throw new StorageError('read-only device', 'write-protected');
  }

  async read(lba: number, blocks: number): Promise<Buffer> {
    this.check(lba, blocks, false);
    await this.delay();
    return Buffer.from(this.data.subarray(lba * this.blockSize, (lba + blocks) * this.blockSize));
  }

  async write(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    if (data.length % this.blockSize !== 0) throw new RangeError('partial block write');
    const blocks = data.length / this.blockSize;
    this.check(lba, blocks, true);
    await this.delay();
    data.copy(this.data, lba * this.blockSize);
    this.mapped.fill(1, lba, lba + blocks);
    this.writes.push({ lba, blocks, fua: opts.fua });
  }

  async flush(): Promise<void> {
    this.flushes++;
  }

  async unmap(ranges: ReadonlyArray<LbaRange>): Promise<void> {
    for (const r of ranges) this.check(r.lba, r.blocks, true);
    for (const r of ranges) {
      this.data.fill(0, r.lba * this.blockSize, (r.lba + r.blocks) * this.blockSize);
      this.mapped.fill(0, r.lba, r.lba + r.blocks);
    }
  }

  private async statusAt(lba: number): Promise<LbaStatus> {
    const state = this.mapped[lba]!;
    let end = lba + 1;
    while (end < this.blockCount && this.mapped[end] === state) end++;
    return { mapped: state === 1, blocks: end - lba };
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
