/** An in-memory DiskSource for unit tests; counts the bytes read so tests can check what was read. */
import type { DiskSource } from '../../src/backup/types.js';

export class BufferSource implements DiskSource {
  readonly format = 'raw';
  readonly description: string;
  readonly reads: Array<{ offset: number; length: number }> = [];

  constructor(
    readonly data: Buffer,
    name = 'memory',
    private readonly zeroHint: ReadonlyArray<{ offset: number; length: number }> = [],
  ) {
    this.description = `buffer ${name}`;
  }

  get size(): number {
    return this.data.length;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.data.length) throw new RangeError(`read ${offset}+${length} beyond ${this.data.length}`);
    this.reads.push({ offset, length });
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async zeroRanges(): Promise<ReadonlyArray<{ offset: number; length: number }>> {
    return this.zeroHint;
  }

  async close(): Promise<void> {}
}

export { pseudoRandomBytes } from './prng.js';
