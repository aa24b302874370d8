import type { DiskSource } from '../types.js';
import { ImageFile, checkReadRange } from './image-file.js';

/** A raw disk image: virtual offset = file offset. */
export class RawSource implements DiskSource {
  readonly format = 'raw';
  readonly size: number;
  readonly description: string;

  private constructor(private readonly file: ImageFile) {
    this.size = file.size;
    this.description = `raw ${file.path}`;
  }

  static async open(path: string): Promise<RawSource> {
    return new RawSource(await ImageFile.open(path));
  }

  /** Wrap an already opened file (used by the format detector, which opened it to probe). */
  static fromFile(file: ImageFile): RawSource {
    return new RawSource(file);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkReadRange(this.file.path, offset, length, this.size);
    await this.file.checkUnchanged();
    const buffer = Buffer.allocUnsafe(length);
    await this.file.readInto(buffer, 0, length, offset, 'data');
    return buffer;
  }

  checkUnchanged(): Promise<void> {
    return this.file.checkUnchangedNow();
  }

  /** Holes cannot be found without SEEK_HOLE (not exposed by Node): nothing known. */
  async zeroRanges(): Promise<ReadonlyArray<{ offset: number; length: number }>> {
    return [];
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
