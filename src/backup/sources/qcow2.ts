import { promisify } from 'node:util';
import { inflateRaw, constants as zlibConstants } from 'node:zlib';
import { dirname, isAbsolute, resolve } from 'node:path';
import type { DiskSource } from '../types.js';
import { SourceError } from '../errors.js';
import type { Logger } from '../../log.js';
import {
  ImageFile,
  appendRange,
  checkReadRange,
  clipRanges,
  errorMessage,
  intersectRanges,
  unionRanges,
  type ZeroRange,
} from './image-file.js';
import { BufferCache } from './metadata-cache.js';
import { ReadPlan, loadCompressedUnits, readParent, type CompressedUnit } from './read-plan.js';

const inflateRawAsync = promisify(inflateRaw);

/*
 * qcow2 reader, following QEMU's docs/interop/qcow2.txt ("qcow2 spec" below). Only what reading the
 * active image needs: header, header extensions, L1/L2 tables, compressed clusters, subclusters,
 * backing files. Refcounts and snapshots are not needed to read the current state.
 */

const QCOW2_MAGIC = 0x514649fb;
/** Incompatible feature bits (qcow2 spec, header bytes 72-79). */
const INCOMPAT_DIRTY = 1n << 0n;
const INCOMPAT_CORRUPT = 1n << 1n;
const INCOMPAT_DATA_FILE = 1n << 2n;
const INCOMPAT_COMPRESSION = 1n << 3n;
const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/** Header extension types (qcow2 spec, "Header extensions"). */
const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_ENCRYPTION = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

const MIN_CLUSTER_BITS = 9;
const MAX_CLUSTER_BITS = 21;
const MAX_BACKING_DEPTH = 32;
const TWO_POW_32 = 0x1_0000_0000;

/** Default bounds of the per-image caches. */
const L2_CACHE_BYTES = 32 * 1024 * 1024;
const DECOMPRESSED_CACHE_BYTES = 16 * 1024 * 1024;
/** How many L2 tables one request loads ahead concurrently. */
const PREFETCH_TABLES = 64;

/** Opens a backing file; supplied by open.ts so this module does not import the format detector. */
export type BackingOpener = (path: string, format: string | undefined, depth: number) => Promise<DiskSource>;

export interface Qcow2OpenOptions {
  readonly openBacking: BackingOpener;
  readonly logger?: Logger;
  /** Position in a backing chain (0 for the top image); bounded to stop loops. */
  readonly depth?: number;
}

interface Qcow2Header {
  version: number;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  headerLength: number;
  incompatibleFeatures: bigint;
  compressionType: number;
  backingFileName: string | undefined;
  backingFormat: string | undefined;
  featureNames: Map<number, string>;
  hasEncryptionExtension: boolean;
  dataFileName: string | undefined;
}

export class Qcow2Source implements DiskSource {
  readonly format = 'qcow2';
  readonly size: number;
  readonly description: string;

  private readonly clusterSize: number;
  private readonly clusterBits: number;
  /** log2 of L2 entries per table. */
  private readonly l2Bits: number;
  private readonly l2EntryBytes: number;
  private readonly extendedL2: boolean;
  /** Subcluster size (cluster size without extended L2 entries). */
  private readonly subclusterSize: number;
  private readonly subclusterBits: number;
  /** L2 table offsets by L1 index (0 = no table). */
  private readonly l1: Float64Array;
  private readonly l2Cache = new BufferCache(L2_CACHE_BYTES);
  private readonly decompressedCache = new BufferCache(DECOMPRESSED_CACHE_BYTES);
  /** Bits of a compressed cluster descriptor that hold the host offset (qcow2 spec: x = 62 - (cluster_bits - 8)). */
  private readonly compressedOffsetBits: bigint;

  private constructor(
    private readonly file: ImageFile,
    private readonly header: Qcow2Header,
    l1: Float64Array,
    private readonly backing: DiskSource | undefined,
  ) {
    this.size = header.size;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2EntryBytes = this.extendedL2 ? 16 : 8;
    this.l2Bits = header.clusterBits - (this.extendedL2 ? 4 : 3);
    this.subclusterBits = this.extendedL2 ? header.clusterBits - 5 : header.clusterBits;
    this.subclusterSize = 2 ** this.subclusterBits;
    this.compressedOffsetBits = BigInt(62 - (header.clusterBits - 8));
    this.l1 = l1;
    const parts = [`cluster ${this.clusterSize}`];
    if (this.extendedL2) parts.push('extended L2');
    if (backing !== undefined) parts.push(`backing: ${backing.description}`);
    this.description = `qcow2 v${header.version} ${file.path} (${parts.join(', ')})`;
  }

  /** Open a qcow2 image (the file is closed again if anything about it is refused). */
  static async open(path: string, options: Qcow2OpenOptions): Promise<Qcow2Source> {
    const file = await ImageFile.open(path);
    try {
      return await Qcow2Source.fromFile(file, options);
    } catch (err) {
      await file.close().catch(() => undefined);
      throw err;
    }
  }

  /** Parse an opened file; on failure the caller closes it. */
  static async fromFile(file: ImageFile, options: Qcow2OpenOptions): Promise<Qcow2Source> {
    const header = await readHeader(file);
    const clusterSize = 2 ** header.clusterBits;
    const l1 = await readL1Table(file, header, clusterSize);
    let backing: DiskSource | undefined;
    if (header.backingFileName !== undefined) {
      const depth = options.depth ?? 0;
      if (depth >= MAX_BACKING_DEPTH) {
        throw new SourceError(file.path, `backing chain deeper than ${MAX_BACKING_DEPTH} images (a loop?)`);
      }
      const name = header.backingFileName;
      if (name.startsWith('json:') || /^[a-z+]+:\/\//i.test(name)) {
        throw new SourceError(file.path, `backing file "${name}" is not a local file: not supported`);
      }
      const backingPath = isAbsolute(name) ? name : resolve(dirname(file.path), name);
      const format = header.backingFormat;
      if (format !== undefined && format !== 'raw' && format !== 'qcow2' && format !== 'vmdk') {
        throw new SourceError(file.path, `backing file format "${format}" is not supported (raw, qcow2, vmdk are)`);
      }
      try {
        backing = await options.openBacking(backingPath, format, depth + 1);
      } catch (err) {
        throw new SourceError(file.path, `cannot open backing file ${backingPath}: ${errorMessage(err)}`);
      }
    }
    const source = new Qcow2Source(file, header, l1, backing);
    options.logger?.debug(
      { path: file.path, version: header.version, clusterSize, size: header.size, backing: backing?.description },
      'opened qcow2 image',
    );
    return source;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkReadRange(this.file.path, offset, length, this.size);
    await this.file.checkUnchanged();
    // Zero-filled: unallocated-without-backing and zero (sub)clusters need no further work.
    const out = Buffer.alloc(length);
    const backing = this.backing;
    const plan = new ReadPlan(
      this.file,
      out,
      backing === undefined ? undefined : (outOffset, virtual, span) => readParent(backing, out, outOffset, virtual, span),
    );
    const end = offset + length;
    const l2Span = 2 ** (this.l2Bits + this.clusterBits);
    const entriesPerTable = 2 ** this.l2Bits;

    const compressedUnits: CompressedUnit[] = [];
    const compressedCopies: number[] = []; // per unit: out offset, offset in cluster, length

    // Start loading every L2 table the request needs at once (small clusters need many).
    if (length > 0) this.prefetchL2Tables(Math.floor(offset / l2Span) + 1, Math.floor((end - 1) / l2Span));

    let position = offset;
    while (position < end) {
      const clusterIndex = Math.floor(position / this.clusterSize);
      const l1Index = Math.floor(clusterIndex / entriesPerTable);
      const l2Index = clusterIndex - l1Index * entriesPerTable;
      const l2Table = this.l2Cache.peek(this.l1[l1Index] ?? 0) ?? (await this.l2TableFor(l1Index));
      if (l2Table === undefined) {
        // No L2 table: its whole span is unallocated.
        const spanEnd = Math.min(end, (l1Index + 1) * l2Span);
        plan.unallocated(position - offset, position, spanEnd - position);
        position = spanEnd;
        continue;
      }
      const clusterStart = clusterIndex * this.clusterSize;
      const clusterEnd = Math.min(end, clusterStart + this.clusterSize);
      const entryOffset = l2Index * this.l2EntryBytes;
      const high = l2Table.readUInt32BE(entryOffset);
      const low = l2Table.readUInt32BE(entryOffset + 4);

      if ((high & 0x40000000) !== 0) {
        // Compressed cluster (qcow2 spec, "Compressed Clusters Descriptor"): bit 62 set.
        compressedUnits.push(this.compressedLocation(high, low, clusterIndex));
        compressedCopies.push(position - offset, position - clusterStart, clusterEnd - position);
        position = clusterEnd;
        continue;
      }

      const hostCluster = (high & 0x00ffffff) * TWO_POW_32 + ((low & 0xfffffe00) >>> 0);
      if (!this.extendedL2) {
        // Standard cluster descriptor: bit 0 "reads as zero" (version 3 only), bits 9-55 host offset.
        if ((low & 1) !== 0 && this.header.version >= 3) {
          // zero: the output is already zero
        } else if (hostCluster === 0) {
          plan.unallocated(position - offset, position, clusterEnd - position);
        } else {
          this.checkHostCluster(hostCluster, clusterIndex);
          plan.data(position - offset, hostCluster + (position - clusterStart), clusterEnd - position);
        }
        position = clusterEnd;
        continue;
      }

      // Extended L2 entry (qcow2 spec, "Extended L2 Entries"): second word bits 0-31 allocated,
      // bits 32-63 reads-as-zero, one bit per subcluster.
      const bitmapZero = l2Table.readUInt32BE(entryOffset + 8);
      const bitmapAlloc = l2Table.readUInt32BE(entryOffset + 12);
      if (bitmapAlloc === 0xffffffff && bitmapZero === 0 && hostCluster !== 0) {
        this.checkHostCluster(hostCluster, clusterIndex);
        plan.data(position - offset, hostCluster + (position - clusterStart), clusterEnd - position);
        position = clusterEnd;
        continue;
      }
      if (bitmapAlloc === 0 && (bitmapZero === 0 || bitmapZero === 0xffffffff)) {
        if (bitmapZero === 0) plan.unallocated(position - offset, position, clusterEnd - position);
        position = clusterEnd;
        continue;
      }
      let sub = Math.floor((position - clusterStart) / this.subclusterSize);
      while (position < clusterEnd) {
        const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * this.subclusterSize);
        const allocated = (bitmapAlloc >>> sub) & 1;
        const zero = (bitmapZero >>> sub) & 1;
        if (allocated !== 0 && zero !== 0) {
          throw new SourceError(this.file.path, `corrupt extended L2 entry for cluster ${clusterIndex}: subcluster ${sub} both allocated and zero`);
        } else if (allocated !== 0) {
          if (hostCluster === 0) {
            throw new SourceError(this.file.path, `corrupt extended L2 entry for cluster ${clusterIndex}: allocated subcluster without host cluster`);
          }
          this.checkHostCluster(hostCluster, clusterIndex);
          plan.data(position - offset, hostCluster + (position - clusterStart), subEnd - position);
        } else if (zero === 0) {
          plan.unallocated(position - offset, position, subEnd - position);
        }
        position = subEnd;
        sub++;
      }
    }
    if (compressedUnits.length > 0) {
      const loads = loadCompressedUnits(
        this.file,
        this.decompressedCache,
        compressedUnits,
        (stored, unit) => this.inflateCluster(stored, unit.index),
        'compressed cluster',
      );
      for (let unit = 0; unit < loads.length; unit++) {
        const outOffset = compressedCopies[unit * 3]!;
        const inCluster = compressedCopies[unit * 3 + 1]!;
        const span = compressedCopies[unit * 3 + 2]!;
        plan.task(loads[unit]!.then((cluster) => void cluster.copy(out, outOffset, inCluster, inCluster + span)));
      }
    }
    await plan.finish();
    return out;
  }

  private checkHostCluster(hostCluster: number, clusterIndex: number): void {
    if (hostCluster % this.clusterSize !== 0) {
      throw new SourceError(
        this.file.path,
        `corrupt L2 entry for cluster ${clusterIndex}: host offset ${hostCluster} is not cluster aligned`,
      );
    }
  }

  /** Begin loading L2 tables first..last (bounded); errors surface when the table is awaited. */
  private prefetchL2Tables(first: number, last: number): void {
    for (let l1Index = first; l1Index <= last && l1Index < first + PREFETCH_TABLES; l1Index++) {
      const l2Offset = this.l1[l1Index] ?? 0;
      if (l2Offset !== 0 && this.l2Cache.peek(l2Offset) === undefined) this.l2TableFor(l1Index).catch(() => undefined);
    }
  }

  /** The L2 table of L1 entry `l1Index`, or undefined if none is allocated. */
  private async l2TableFor(l1Index: number): Promise<Buffer | undefined> {
    const l2Offset = this.l1[l1Index];
    if (l2Offset === undefined || l2Offset === 0) return undefined;
    const cached = this.l2Cache.peek(l2Offset);
    if (cached !== undefined) return cached;
    return this.l2Cache.get(l2Offset, () => this.file.read(l2Offset, this.clusterSize, `L2 table of L1 entry ${l1Index}`));
  }

  /** Where a compressed cluster's data lies (qcow2 spec, "Compressed Clusters Descriptor"). */
  private compressedLocation(high: number, low: number, clusterIndex: number): CompressedUnit {
    const descriptor = (BigInt(high) << 32n) | BigInt(low);
    const offsetMask = (1n << this.compressedOffsetBits) - 1n;
    const start = Number(descriptor & offsetMask);
    const extraSectors = Number((descriptor >> this.compressedOffsetBits) & ((1n << (62n - this.compressedOffsetBits)) - 1n));
    if (start >= this.file.size) {
      throw new SourceError(this.file.path, `compressed cluster ${clusterIndex} at ${start} lies beyond the end of the file`);
    }
    // The data runs from the host offset to the end of its last 512-byte sector; the last one in
    // the file may end early.
    const length = Math.min((extraSectors + 1) * 512 - (start % 512), this.file.size - start);
    return { start, length, index: clusterIndex };
  }

  private async inflateCluster(stored: Buffer, clusterIndex: number): Promise<Buffer> {
    let inflated: Buffer;
    try {
      // Raw deflate without zlib header (qcow2 spec, compression type 0). The last sector may hold
      // bytes after the end of the stream: Z_SYNC_FLUSH accepts a stream without a final block too.
      inflated = await inflateRawAsync(stored, { finishFlush: zlibConstants.Z_SYNC_FLUSH, chunkSize: this.clusterSize + 1024 });
    } catch (err) {
      throw new SourceError(this.file.path, `compressed cluster ${clusterIndex} does not inflate: ${errorMessage(err)}`);
    }
    if (inflated.length < this.clusterSize) {
      throw new SourceError(
        this.file.path,
        `compressed cluster ${clusterIndex} inflates to ${inflated.length} bytes, expected ${this.clusterSize}`,
      );
    }
    return inflated.length === this.clusterSize ? inflated : inflated.subarray(0, this.clusterSize);
  }

  async checkUnchanged(): Promise<void> {
    await this.file.checkUnchangedNow();
    await this.backing?.checkUnchanged?.();
  }

  async zeroRanges(): Promise<ReadonlyArray<{ offset: number; length: number }>> {
    await this.file.checkUnchanged();
    const zero: ZeroRange[] = [];
    const unallocated: ZeroRange[] = [];
    const l2Span = 2 ** (this.l2Bits + this.clusterBits);
    const entriesPerTable = 2 ** this.l2Bits;
    for (let l1Index = 0; l1Index * l2Span < this.size; l1Index++) {
      if (l1Index % PREFETCH_TABLES === 0) this.prefetchL2Tables(l1Index + 1, l1Index + PREFETCH_TABLES);
      const l2Table = await this.l2TableFor(l1Index);
      const spanStart = l1Index * l2Span;
      if (l2Table === undefined) {
        appendRange(unallocated, spanStart, Math.min(l2Span, this.size - spanStart));
        continue;
      }
      for (let l2Index = 0; l2Index < entriesPerTable; l2Index++) {
        const clusterStart = spanStart + l2Index * this.clusterSize;
        if (clusterStart >= this.size) break;
        const entryOffset = l2Index * this.l2EntryBytes;
        const high = l2Table.readUInt32BE(entryOffset);
        const low = l2Table.readUInt32BE(entryOffset + 4);
        if ((high & 0x40000000) !== 0) continue; // compressed: holds data
        if (!this.extendedL2) {
          if ((low & 1) !== 0 && this.header.version >= 3) appendRange(zero, clusterStart, this.clusterSize);
          else if ((high & 0x00ffffff) === 0 && (low & 0xfffffe00) === 0) appendRange(unallocated, clusterStart, this.clusterSize);
          continue;
        }
        const bitmapZero = l2Table.readUInt32BE(entryOffset + 8);
        const bitmapAlloc = l2Table.readUInt32BE(entryOffset + 12);
        for (let sub = 0; sub < 32; sub++) {
          const subStart = clusterStart + sub * this.subclusterSize;
          if (((bitmapAlloc >>> sub) & 1) !== 0) continue;
          if (((bitmapZero >>> sub) & 1) !== 0) appendRange(zero, subStart, this.subclusterSize);
          else appendRange(unallocated, subStart, this.subclusterSize);
        }
      }
    }
    let result: ZeroRange[];
    if (this.backing === undefined) {
      result = unionRanges(zero, unallocated);
    } else {
      // Unallocated areas show the backing file: zero where it is zero, or beyond its end.
      const backingZero = unionRanges(
        [...(await (this.backing.zeroRanges?.() ?? Promise.resolve([])))],
        this.backing.size < this.size ? [{ offset: this.backing.size, length: this.size - this.backing.size }] : [],
      );
      result = unionRanges(zero, intersectRanges(unallocated, backingZero));
    }
    return clipRanges(result, this.size);
  }

  async close(): Promise<void> {
    this.l2Cache.clear();
    this.decompressedCache.clear();
    try {
      await this.file.close();
    } finally {
      await this.backing?.close();
    }
  }
}

/** Parse and validate the header (qcow2 spec, "Header") and its extensions. */
async function readHeader(file: ImageFile): Promise<Qcow2Header> {
  const path = file.path;
  if (file.size < 72) throw new SourceError(path, `file too short for a qcow2 header (${file.size} bytes)`);
  const head = await file.readClamped(0, 4096, 'qcow2 header');
  if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw new SourceError(path, 'not a qcow2 image (bad magic)');
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new SourceError(path, `qcow2 version ${version} is not supported (only 2 and 3)`);
  }
  const backingFileOffset = readSafeU64(head, 8, path, 'backing file offset');
  const backingFileSize = head.readUInt32BE(16);
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw new SourceError(path, `cluster_bits ${clusterBits} out of range (${MIN_CLUSTER_BITS}-${MAX_CLUSTER_BITS})`);
  }
  const clusterSize = 2 ** clusterBits;
  const size = readSafeU64(head, 24, path, 'virtual size');
  const cryptMethod = head.readUInt32BE(32);
  if (cryptMethod !== 0) {
    throw new SourceError(path, `encrypted qcow2 images are not supported (crypt_method ${cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : cryptMethod})`);
  }
  const l1Size = head.readUInt32BE(36);
  const l1TableOffset = readSafeU64(head, 40, path, 'L1 table offset');

  let incompatibleFeatures = 0n;
  let headerLength = 72;
  let compressionType = 0;
  if (version === 3) {
    if (head.length < 104) throw new SourceError(path, 'file too short for a qcow2 version 3 header');
    incompatibleFeatures = head.readBigUInt64BE(72);
    headerLength = head.readUInt32BE(100);
    if (headerLength < 104 || headerLength % 8 !== 0 || headerLength > clusterSize) {
      throw new SourceError(path, `invalid header_length ${headerLength}`);
    }
    if (headerLength > 104) {
      if (head.length < 105) throw new SourceError(path, 'qcow2 header truncated');
      compressionType = head.readUInt8(104);
    }
  }

  // Header extensions follow the header up to the end of the first cluster (qcow2 spec).
  const featureNames = new Map<number, string>();
  let backingFormat: string | undefined;
  let hasEncryptionExtension = false;
  let dataFileName: string | undefined;
  const extensionLimit = Math.min(clusterSize, file.size);
  const extensionArea = extensionLimit <= head.length ? head : await file.read(0, extensionLimit, 'qcow2 header extensions');
  let extOffset = headerLength;
  while (extOffset + 8 <= extensionLimit) {
    const type = extensionArea.readUInt32BE(extOffset);
    const length = extensionArea.readUInt32BE(extOffset + 4);
    if (type === EXT_END) break;
    const dataStart = extOffset + 8;
    if (dataStart + length > extensionLimit) {
      throw new SourceError(path, `header extension 0x${type.toString(16)} runs past the first cluster`);
    }
    const data = extensionArea.subarray(dataStart, dataStart + length);
    switch (type) {
      case EXT_BACKING_FORMAT:
        backingFormat = data.toString('utf8');
        break;
      case EXT_FEATURE_NAMES:
        for (let at = 0; at + 48 <= data.length; at += 48) {
          if (data.readUInt8(at) === 0) {
            featureNames.set(data.readUInt8(at + 1), data.toString('utf8', at + 2, at + 48).replace(/\0.*$/s, ''));
          }
        }
        break;
      case EXT_ENCRYPTION:
        hasEncryptionExtension = true;
        break;
      case EXT_DATA_FILE:
        dataFileName = data.toString('utf8');
        break;
      default:
        break; // Unknown extensions are ignorable by definition (qcow2 spec).
    }
    extOffset = dataStart + Math.ceil(length / 8) * 8;
  }

  if (hasEncryptionExtension) throw new SourceError(path, 'encrypted qcow2 images are not supported');
  const unknown = incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) names.push(featureNames.get(bit) ?? `bit ${bit}`);
    }
    throw new SourceError(path, `unknown incompatible qcow2 features: ${names.join(', ')}`);
  }
  if (incompatibleFeatures & INCOMPAT_CORRUPT) {
    throw new SourceError(path, 'image is marked corrupt (incompatible feature bit 1): repair it with qemu-img check -r');
  }
  if (incompatibleFeatures & INCOMPAT_DATA_FILE || dataFileName !== undefined) {
    throw new SourceError(path, `qcow2 images with an external data file${dataFileName ? ` (${dataFileName})` : ''} are not supported`);
  }
  if (incompatibleFeatures & INCOMPAT_COMPRESSION && compressionType !== 0) {
    throw new SourceError(path, `compression type ${compressionType === 1 ? 'zstd' : compressionType} is not supported (only zlib)`);
  }
  if (compressionType !== 0 && !(incompatibleFeatures & INCOMPAT_COMPRESSION)) {
    throw new SourceError(path, `compression type ${compressionType} set without its incompatible feature bit`);
  }
  if (incompatibleFeatures & INCOMPAT_EXTL2 && clusterBits < 14) {
    throw new SourceError(path, `extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`);
  }

  let backingFileName: string | undefined;
  if (backingFileOffset !== 0) {
    if (backingFileSize === 0 || backingFileSize > 1023 || backingFileOffset + backingFileSize > Math.min(clusterSize, file.size)) {
      throw new SourceError(path, `invalid backing file name location (offset ${backingFileOffset}, size ${backingFileSize})`);
    }
    backingFileName = extensionArea.toString('utf8', backingFileOffset, backingFileOffset + backingFileSize);
  }

  return {
    version,
    clusterBits,
    size,
    l1Size,
    l1TableOffset,
    headerLength,
    incompatibleFeatures,
    compressionType,
    backingFileName,
    backingFormat,
    featureNames,
    hasEncryptionExtension,
    dataFileName,
  };
}

async function readL1Table(file: ImageFile, header: Qcow2Header, clusterSize: number): Promise<Float64Array> {
  const path = file.path;
  const extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  const needed = Math.ceil(header.size / (clusterSize * l2Entries));
  if (header.l1Size < needed) {
    throw new SourceError(path, `L1 table has ${header.l1Size} entries, the virtual size needs ${needed}`);
  }
  if (needed === 0) return new Float64Array(0);
  if (header.l1TableOffset % clusterSize !== 0 || header.l1TableOffset === 0) {
    throw new SourceError(path, `L1 table offset ${header.l1TableOffset} is not cluster aligned`);
  }
  const raw = await file.read(header.l1TableOffset, needed * 8, 'L1 table');
  const l1 = new Float64Array(needed);
  for (let i = 0; i < needed; i++) {
    const high = raw.readUInt32BE(i * 8);
    const low = raw.readUInt32BE(i * 8 + 4);
    // Bits 9-55: L2 table offset; bits 0-8 and 56-62 reserved (qcow2 spec, "L1 table entry").
    const offset = (high & 0x00ffffff) * TWO_POW_32 + ((low & 0xfffffe00) >>> 0);
    if (offset !== 0) {
      if (offset % clusterSize !== 0) {
        throw new SourceError(path, `corrupt L1 entry ${i}: L2 table offset ${offset} is not cluster aligned`);
      }
      if (offset + clusterSize > file.size) {
        throw new SourceError(path, `corrupt L1 entry ${i}: L2 table offset ${offset} beyond the end of the file (${file.size} bytes)`);
      }
    }
    l1[i] = offset;
  }
  return l1;
}

function readSafeU64(buffer: Buffer, offset: number, path: string, what: string): number {
  const value = buffer.readBigUInt64BE(offset);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new SourceError(path, `${what} ${value} is out of range`);
  return Number(value);
}
