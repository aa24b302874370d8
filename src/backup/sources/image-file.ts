import { open, readFile, type FileHandle } from 'node:fs/promises';
import { SourceError } from '../errors.js';

/** Reads within this many ms of a check that found the file unchanged do not check again. */
const RECHECK_MS = 50;

/**
 * One file of a disk image (the image itself, an extent, a backing file), opened read-only.
 * Records size and mtime at open: reads check (fstat) that the file has not changed since, and the
 * backup checks once more after its last read (`checkUnchangedNow`), so a backup never mixes two
 * versions of a disk without noticing. Reads share one fstat per RECHECK_MS instead of one each
 * (a 64 KiB-chunk backup of 1 GiB made 16,384 of them, one thread-pool round trip apiece).
 */
export class ImageFile {
  private closed = false;
  /** performance.now() of the last check that found the file unchanged. */
  private checkedAt = -Infinity;
  private checking: Promise<void> | null = null;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    /** File size in bytes when opened. */
    readonly size: number,
    private readonly mtimeMs: number,
  ) {}

  static async open(path: string): Promise<ImageFile> {
    let handle: FileHandle;
    try {
      handle = await open(path, 'r');
    } catch (err) {
      throw new SourceError(path, `cannot open: ${errorMessage(err)}`);
    }
    try {
      const stats = await handle.stat();
      if (!stats.isFile() && !stats.isBlockDevice()) {
        throw new SourceError(path, 'not a regular file or block device');
      }
      // A block device's stat size is 0 on Linux: take it from sysfs (sectors of 512 bytes).
      const size = stats.isBlockDevice() ? await blockDeviceSize(path, stats.rdev) : stats.size;
      return new ImageFile(path, handle, size, stats.mtimeMs);
    } catch (err) {
      await handle.close().catch(() => undefined);
      if (err instanceof SourceError) throw err;
      throw new SourceError(path, `cannot stat: ${errorMessage(err)}`);
    }
  }

  /** Throws SourceError if the file changed since open (checked at most every RECHECK_MS). */
  async checkUnchanged(): Promise<void> {
    if (this.closed) throw new SourceError(this.path, 'read after close');
    if (performance.now() - this.checkedAt < RECHECK_MS) return;
    await this.checkUnchangedNow();
  }

  /** Throws SourceError if the file's size or mtime differ from those recorded at open (fstat now). */
  checkUnchangedNow(): Promise<void> {
    if (this.closed) return Promise.reject(new SourceError(this.path, 'read after close'));
    this.checking ??= this.statAndCompare().finally(() => {
      this.checking = null;
    });
    return this.checking;
  }

  private async statAndCompare(): Promise<void> {
    let size: number;
    let mtimeMs: number;
    try {
      const stats = await this.handle.stat();
      size = stats.isBlockDevice() ? this.size : stats.size;
      mtimeMs = stats.mtimeMs;
    } catch (err) {
      throw new SourceError(this.path, `cannot stat: ${errorMessage(err)}`);
    }
    if (size !== this.size) {
      throw new SourceError(this.path, `file changed during read: size was ${this.size}, now ${size}`);
    }
    if (mtimeMs !== this.mtimeMs) {
      throw new SourceError(this.path, 'file changed during read: modification time changed');
    }
    this.checkedAt = performance.now();
  }

  /**
   * Fill `target[targetOffset, targetOffset+length)` from file offset `position`. The whole range
   * must lie inside the file; `what` names the structure for the error message.
   */
  async readInto(target: Buffer, targetOffset: number, length: number, position: number, what: string): Promise<void> {
    if (position < 0 || position + length > this.size) {
      throw new SourceError(
        this.path,
        `${what} at offset ${position} (+${length}) lies beyond the end of the file (${this.size} bytes): truncated or corrupt image`,
      );
    }
    let done = 0;
    while (done < length) {
      let bytesRead: number;
      try {
        ({ bytesRead } = await this.handle.read(target, targetOffset + done, length - done, position + done));
      } catch (err) {
        throw new SourceError(this.path, `read error at offset ${position + done}: ${errorMessage(err)}`);
      }
      if (bytesRead === 0) {
        throw new SourceError(this.path, `file shrank while reading ${what} at offset ${position + done}`);
      }
      done += bytesRead;
    }
  }

  /** Read `length` bytes at `position` into a new buffer (whole range must lie inside the file). */
  async read(position: number, length: number, what: string): Promise<Buffer> {
    const buffer = Buffer.allocUnsafe(length);
    await this.readInto(buffer, 0, length, position, what);
    return buffer;
  }

  /** Read up to `length` bytes at `position`, clamped to the end of the file. */
  async readClamped(position: number, length: number, what: string): Promise<Buffer> {
    const available = Math.max(0, Math.min(length, this.size - position));
    return this.read(position, available, what);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }
}

async function blockDeviceSize(path: string, rdev: number): Promise<number> {
  // Linux dev_t encoding (glibc gnu_dev_major/gnu_dev_minor) for the 32-bit value Node exposes.
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & 0xfff00);
  try {
    const sectors = Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim());
    if (!Number.isSafeInteger(sectors * 512)) throw new Error(`bad size ${sectors}`);
    return sectors * 512;
  } catch (err) {
    throw new SourceError(path, `cannot find the size of block device ${major}:${minor}: ${errorMessage(err)}`);
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Validate a read request against a virtual disk size; throws SourceError naming `file`. */
export function checkReadRange(file: string, offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new SourceError(file, `invalid read range offset=${offset} length=${length}`);
  }
  if (offset + length > size) {
    throw new SourceError(file, `read of ${length} bytes at ${offset} goes beyond the disk size ${size}`);
  }
}

/** A byte range of the virtual disk known to read as zero. */
export interface ZeroRange {
  offset: number;
  length: number;
}

/** Append [offset, offset+length) to a sorted list, merging with the last range when adjacent. */
export function appendRange(ranges: ZeroRange[], offset: number, length: number): void {
  if (length <= 0) return;
  const last = ranges[ranges.length - 1];
  if (last !== undefined && last.offset + last.length === offset) {
    last.length += length;
  } else {
    ranges.push({ offset, length });
  }
}

/** Intersection of two sorted, non-overlapping range lists. */
export function intersectRanges(a: ReadonlyArray<ZeroRange>, b: ReadonlyArray<ZeroRange>): ZeroRange[] {
  const result: ZeroRange[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    const ra = a[i]!;
    const rb = b[j]!;
    const start = Math.max(ra.offset, rb.offset);
    const end = Math.min(ra.offset + ra.length, rb.offset + rb.length);
    if (start < end) appendRange(result, start, end - start);
    if (ra.offset + ra.length < rb.offset + rb.length) i++;
    else j++;
  }
  return result;
}

/** Union of two sorted, non-overlapping range lists (adjacent ranges merged). */
export function unionRanges(a: ReadonlyArray<ZeroRange>, b: ReadonlyArray<ZeroRange>): ZeroRange[] {
  const result: ZeroRange[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    const next = j >= b.length || (i < a.length && a[i]!.offset <= b[j]!.offset) ? a[i++]! : b[j++]!;
    const last = result[result.length - 1];
    if (last !== undefined && next.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, next.offset + next.length - last.offset);
    } else {
      result.push({ offset: next.offset, length: next.length });
    }
  }
  return result;
}

/** Clip a sorted range list to [0, size). */
export function clipRanges(ranges: ReadonlyArray<ZeroRange>, size: number): ZeroRange[] {
  const result: ZeroRange[] = [];
  for (const range of ranges) {
    const end = Math.min(range.offset + range.length, size);
    if (end > range.offset) result.push({ offset: range.offset, length: end - range.offset });
  }
  return result;
}
