import type { ImageFile } from './image-file.js';
import type { BufferCache } from './metadata-cache.js';

/**
 * The I/O of one read request: coalesces host-contiguous data runs into one file read and
 * virtually contiguous unallocated runs into one backing (parent) read; everything runs
 * concurrently. Zero areas need nothing: the output buffer starts zero-filled.
 */
export class ReadPlan {
  private readonly tasks: Promise<void>[] = [];
  private dataOut = 0;
  private dataHost = 0;
  private dataLength = 0;
  private backingOut = 0;
  private backingVirtual = 0;
  private backingLength = 0;

  constructor(
    private readonly file: ImageFile,
    private readonly out: Buffer,
    private readonly readBacking?: (outOffset: number, virtual: number, length: number) => Promise<void>,
  ) {}

  data(outOffset: number, host: number, length: number): void {
    if (this.dataLength > 0 && this.dataOut + this.dataLength === outOffset && this.dataHost + this.dataLength === host) {
      this.dataLength += length;
      return;
    }
    this.flushData();
    this.dataOut = outOffset;
    this.dataHost = host;
    this.dataLength = length;
  }

  unallocated(outOffset: number, virtual: number, length: number): void {
    if (this.readBacking === undefined) return;
    if (this.backingLength > 0 && this.backingOut + this.backingLength === outOffset) {
      this.backingLength += length;
      return;
    }
    this.flushBacking();
    this.backingOut = outOffset;
    this.backingVirtual = virtual;
    this.backingLength = length;
  }

  task(promise: Promise<void>): void {
    this.track(promise);
  }

  async finish(): Promise<void> {
    this.flushData();
    this.flushBacking();
    await Promise.all(this.tasks);
  }

  /**
   * Keep a started I/O for finish(). If planning fails half-way (a corrupt entry), finish() is never
   * called: the no-op handler keeps an I/O error from becoming an unhandled rejection.
   */
  private track(promise: Promise<void>): void {
    promise.catch(() => undefined);
    this.tasks.push(promise);
  }

  private flushData(): void {
    if (this.dataLength > 0) {
      this.track(this.file.readInto(this.out, this.dataOut, this.dataLength, this.dataHost, 'data cluster'));
    }
    this.dataLength = 0;
  }

  private flushBacking(): void {
    if (this.backingLength > 0 && this.readBacking !== undefined) {
      this.track(this.readBacking(this.backingOut, this.backingVirtual, this.backingLength));
    }
    this.backingLength = 0;
  }
}


/**
 * Copy `parent[virtual, virtual+length)` into `out` at `outOffset`; a parent (backing file) smaller
 * than the child reads as zero beyond its end (qcow2 spec, "backing file").
 */
export async function readParent(
  parent: { readonly size: number; read(offset: number, length: number): Promise<Buffer> },
  out: Buffer,
  outOffset: number,
  virtual: number,
  length: number,
): Promise<void> {
  const available = Math.min(length, parent.size - virtual);
  if (available <= 0) return;
  const data = await parent.read(virtual, available);
  data.copy(out, outOffset);
}

/** One compressed unit (qcow2 compressed cluster, VMDK compressed grain) a read needs. */
export interface CompressedUnit {
  /** File offset where the unit's stored bytes start (also its cache key). */
  readonly start: number;
  /** Bytes from `start` that may belong to the unit (exact for qcow2, an upper guess for VMDK). */
  readonly length: number;
  /** Virtual cluster/grain index, for error messages. */
  readonly index: number;
}

/** Units closer than this in the file are fetched with one read. */
const COALESCE_GAP = 4096;
/** Upper bound of one coalesced read of compressed units. */
const MAX_COALESCED_READ = 16 * 1024 * 1024;

/**
 * Load the decompressed contents of `units` through `cache`: units that are not cached are read
 * with as few file reads as possible (neighbours in the file share one read), then decoded
 * concurrently by `decode` (async zlib, off the event loop). Returns one promise per unit.
 */
export function loadCompressedUnits(
  file: ImageFile,
  cache: BufferCache,
  units: ReadonlyArray<CompressedUnit>,
  decode: (stored: Buffer, unit: CompressedUnit) => Promise<Buffer>,
  what: string,
): Promise<Buffer>[] {
  const results = new Array<Promise<Buffer>>(units.length);
  const misses: number[] = [];
  for (let index = 0; index < units.length; index++) {
    const cached = cache.peek(units[index]!.start);
    if (cached !== undefined) results[index] = Promise.resolve(cached);
    else misses.push(index);
  }
  misses.sort((a, b) => units[a]!.start - units[b]!.start);
  let groupFirst = 0;
  while (groupFirst < misses.length) {
    const groupStart = units[misses[groupFirst]!]!.start;
    let groupEnd = groupStart + units[misses[groupFirst]!]!.length;
    let groupLast = groupFirst;
    while (groupLast + 1 < misses.length) {
      const candidate = units[misses[groupLast + 1]!]!;
      const candidateEnd = Math.max(groupEnd, candidate.start + candidate.length);
      if (candidate.start > groupEnd + COALESCE_GAP || candidateEnd - groupStart > MAX_COALESCED_READ) break;
      groupEnd = candidateEnd;
      groupLast++;
    }
    let groupRead: Promise<Buffer> | undefined;
    const readGroup = (): Promise<Buffer> => (groupRead ??= file.readClamped(groupStart, groupEnd - groupStart, what));
    for (let member = groupFirst; member <= groupLast; member++) {
      const index = misses[member]!;
      const unit = units[index]!;
      results[index] = cache.get(unit.start, async () => {
        const group = await readGroup();
        const from = unit.start - groupStart;
        return decode(group.subarray(from, Math.min(group.length, from + unit.length)), unit);
      });
    }
    groupFirst = groupLast + 1;
  }
  return results;
}
