import { type BlockDevice, type LbaRange, type LbaStatus, type SegmentedRead, type WriteOptions, wholeRead } from '../block-device.js';

/**
 * Wraps a device so that writes can be held back while a consistent snapshot is taken
 * (`bootrestore commit`): `quiesce()` waits for running writes and holds new ones until the
 * returned release function is called. Reads pass straight through.
 */
export class GatedDevice implements BlockDevice {
  private running = 0;
  private drained: (() => void) | undefined;
  private gate: Promise<void> | undefined;

  constructor(readonly inner: BlockDevice) {}

  get blockSize(): number {
    return this.inner.blockSize;
  }
  get blockCount(): number {
    return this.inner.blockCount;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get identity(): BlockDevice['identity'] {
    return this.inner.identity;
  }
  get supportsUnmap(): boolean {
    return this.inner.supportsUnmap;
  }

  read(lba: number, blocks: number): Promise<Buffer> {
    return this.inner.read(lba, blocks);
  }

  readSegments(lba: number, blocks: number): Promise<SegmentedRead> {
    if (this.inner.readSegments !== undefined) return this.inner.readSegments(lba, blocks);
    return this.inner.read(lba, blocks).then(wholeRead);
  }

  write(lba: number, data: Buffer, opts: WriteOptions): Promise<void> {
    return this.modify(() => this.inner.write(lba, data, opts));
  }

  unmap(ranges: ReadonlyArray<LbaRange>): Promise<void> {
    return this.modify(() => this.inner.unmap(ranges));
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  status(lba: number): Promise<LbaStatus> {
    return this.inner.status ? this.inner.status(lba) : Promise.resolve({ mapped: true, blocks: this.blockCount - lba });
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  /** Wait for running writes, hold new ones; call the result to let them go. */
  async quiesce(): Promise<() => void> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((resolve) => (open = resolve));
    if (this.running > 0) await new Promise<void>((resolve) => (this.drained = resolve));
    return () => {
      this.gate = undefined;
      open();
    };
  }

  private async modify(op: () => Promise<void>): Promise<void> {
    while (this.gate) await this.gate;
    this.running++;
    try {
      await op();
    } finally {
      if (--this.running === 0 && this.drained) {
        const done = this.drained;
        this.drained = undefined;
        done();
      }
    }
  }
}
