import { promisify } from 'node:util';
import { inflate } from 'node:zlib';
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
import { parseVmdkDescriptor, type VmdkDescriptor } from './vmdk-descriptor.js';

const inflateAsync = promisify(inflate);

/*
 * VMDK reader following VMware's "Virtual Disk Format 1.1" ("VMDK 1.1" below): hosted sparse
 * extents (SparseExtentHeader, grain directory and grain tables), stream-optimized compressed
 * grains with markers, flat extents, zero extents; one or several extents per disk.
 */

const SECTOR = 512;
/** "KDMV" read little-endian (VMDK 1.1, SparseExtentHeader.magicNumber). */
const SPARSE_MAGIC = 0x564d444b;
/** gdOffset value meaning "grain directory location is in the footer" (VMDK 1.1, stream-optimized). */
const GD_AT_END = 0xffffffffffffffffn;
/** SparseExtentHeader.flags bits (VMDK 1.1). */
const FLAG_NEWLINE_TEST = 1 << 0;
const FLAG_ZEROED_GRAIN_GTE = 1 << 2;
const FLAG_COMPRESSED = 1 << 16;
const FLAG_MARKERS = 1 << 17;
const COMPRESSION_DEFLATE = 1;
/** Largest text descriptor file we read whole. */
const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
const GRAIN_TABLE_CACHE_BYTES = 16 * 1024 * 1024;
const GRAIN_CACHE_BYTES = 16 * 1024 * 1024;
/** How many grain tables one request loads ahead concurrently. */
const PREFETCH_TABLES = 64;

/** createType values we can read (VMDK 1.1, "Disk Database" / createType). */
const SUPPORTED_CREATE_TYPES: ReadonlySet<string> = new Set([
  'monolithicSparse',
  'streamOptimized',
  'monolithicFlat',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
  'vmfs',
]);

export interface VmdkOpenOptions {
  readonly logger?: Logger;
  /** Opens the parent of a delta disk (a VMDK); without it delta disks are refused. */
  readonly openParent?: (path: string, depth: number) => Promise<DiskSource>;
  /** Position in a parent chain (0 for the top disk); bounded to stop loops. */
  readonly depth?: number;
}

const MAX_PARENT_DEPTH = 32;

interface SparseHeader {
  version: number;
  flags: number;
  /** Extent capacity in sectors. */
  capacity: number;
  /** Grain size in sectors. */
  grainSize: number;
  descriptorOffset: number;
  descriptorSize: number;
  numGTEsPerGT: number;
  rgdOffset: number;
  gdOffset: number;
  compressAlgorithm: number;
}

/** One extent of the disk: `size` bytes of the virtual disk starting where the previous ended. */
interface Extent {
  readonly size: number;
  readonly files: ReadonlyArray<ImageFile>;
  /**
   * Fill out[outOffset, outOffset+length) (zero-filled already) from extent offset `offset`.
   * `parent` (delta disks) fills unallocated parts: arguments are out offset, extent offset, length.
   */
  readInto(out: Buffer, outOffset: number, offset: number, length: number, parent?: ParentReader): Promise<void>;
  /** Append ranges of this extent (shifted by `base`) that read as zero / are unallocated. */
  zeroRanges(base: number, zero: ZeroRange[], unallocated: ZeroRange[]): Promise<void>;
}

type ParentReader = (outOffset: number, extentOffset: number, length: number) => Promise<void>;

class ZeroExtent implements Extent {
  readonly files: ReadonlyArray<ImageFile> = [];
  constructor(readonly size: number) {}
  async readInto(): Promise<void> {}
  async zeroRanges(base: number, zero: ZeroRange[]): Promise<void> {
    appendRange(zero, base, this.size);
  }
}

/** FLAT / VMFS extent: the data lies contiguously in a file from `start` (VMDK 1.1). */
class FlatExtent implements Extent {
  readonly files: ReadonlyArray<ImageFile>;
  constructor(
    private readonly file: ImageFile,
    private readonly start: number,
    readonly size: number,
  ) {
    this.files = [file];
    if (start + size > file.size) {
      throw new SourceError(file.path, `flat extent needs ${start + size} bytes, the file has ${file.size}: truncated`);
    }
  }
  async readInto(out: Buffer, outOffset: number, offset: number, length: number): Promise<void> {
    await this.file.readInto(out, outOffset, length, this.start + offset, 'flat extent data');
  }
  async zeroRanges(): Promise<void> {}
}

/** Hosted sparse extent (VMDK 1.1, "Hosted Sparse Extents" and "Stream-Optimized Compressed Sparse Extents"). */
class SparseExtent implements Extent {
  readonly files: ReadonlyArray<ImageFile>;
  private readonly grainBytes: number;
  private readonly compressed: boolean;
  private readonly zeroedGrains: boolean;
  /** Bytes of virtual disk covered by one grain table. */
  private readonly tableSpan: number;
  private readonly grainTables = new BufferCache(GRAIN_TABLE_CACHE_BYTES);
  private readonly grains = new BufferCache(GRAIN_CACHE_BYTES);

  constructor(
    private readonly file: ImageFile,
    readonly header: SparseHeader,
    /** Grain directory: sector offsets of the grain tables (0 = none). */
    private readonly directory: Uint32Array,
    /** Extent size from the descriptor (≤ capacity). */
    readonly size: number,
  ) {
    this.files = [file];
    this.grainBytes = header.grainSize * SECTOR;
    this.compressed = (header.flags & FLAG_COMPRESSED) !== 0;
    this.zeroedGrains = (header.flags & FLAG_ZEROED_GRAIN_GTE) !== 0;
    this.tableSpan = header.numGTEsPerGT * this.grainBytes;
  }

  static async open(file: ImageFile, size: number, logger: Logger | undefined): Promise<SparseExtent> {
    const header = await readSparseHeader(file);
    if (size > header.capacity * SECTOR) {
      throw new SourceError(file.path, `descriptor extent of ${size / SECTOR} sectors exceeds the sparse capacity ${header.capacity}`);
    }
    const directoryEntries = Math.ceil(header.capacity / (header.numGTEsPerGT * header.grainSize));
    const tableBytes = header.numGTEsPerGT * 4;
    const loadDirectory = async (sectorOffset: number, what: string): Promise<Uint32Array> => {
      const raw = await file.read(sectorOffset * SECTOR, directoryEntries * 4, what);
      const directory = new Uint32Array(directoryEntries);
      for (let i = 0; i < directoryEntries; i++) {
        const entry = raw.readUInt32LE(i * 4);
        if (entry > 1 && entry * SECTOR + tableBytes > file.size) {
          throw new SourceError(file.path, `${what} entry ${i} points beyond the end of the file (sector ${entry})`);
        }
        directory[i] = entry;
      }
      return directory;
    };
    let directory: Uint32Array;
    try {
      directory = await loadDirectory(header.gdOffset, 'grain directory');
    } catch (err) {
      // The redundant grain directory (VMDK 1.1, "rgdOffset") is a copy kept for this case.
      if (header.rgdOffset === 0 || !(err instanceof SourceError)) throw err;
      logger?.warn({ path: file.path, err: err.message }, 'primary VMDK grain directory unusable, using the redundant one');
      directory = await loadDirectory(header.rgdOffset, 'redundant grain directory');
    }
    return new SparseExtent(file, header, directory, size);
  }

  async readInto(out: Buffer, outOffset: number, offset: number, length: number, parent?: ParentReader): Promise<void> {
    const plan = new ReadPlan(this.file, out, parent);
    const compressedUnits: CompressedUnit[] = [];
    const compressedCopies: number[] = []; // per unit: out offset, offset in grain, length
    const end = offset + length;
    if (length > 0) this.prefetchGrainTables(Math.floor(offset / this.tableSpan) + 1, Math.floor((end - 1) / this.tableSpan));
    let position = offset;
    while (position < end) {
      const directoryIndex = Math.floor(position / this.tableSpan);
      const table = this.grainTables.peek(this.directory[directoryIndex] ?? 0) ?? (await this.grainTable(directoryIndex));
      if (table === undefined) {
        // No grain table: unallocated (zero, or the parent's data in a delta disk).
        const spanEnd = Math.min(end, (directoryIndex + 1) * this.tableSpan);
        plan.unallocated(outOffset + (position - offset), position, spanEnd - position);
        position = spanEnd;
        continue;
      }
      const grainIndex = Math.floor(position / this.grainBytes);
      const grainStart = grainIndex * this.grainBytes;
      const grainEnd = Math.min(end, grainStart + this.grainBytes);
      const entry = table.readUInt32LE((grainIndex - directoryIndex * this.header.numGTEsPerGT) * 4);
      const target = outOffset + (position - offset);
      if (entry === 0) {
        plan.unallocated(target, position, grainEnd - position);
      } else if (entry === 1 && this.zeroedGrains) {
        // zeroed grain (VMDK 1.1 zeroed-grain GTE): already zero
      } else if (this.compressed) {
        // Stored length unknown until the marker is read: guess one grain plus a sector.
        compressedUnits.push({ start: entry * SECTOR, length: this.grainBytes + SECTOR, index: grainIndex });
        compressedCopies.push(target, position - grainStart, grainEnd - position);
      } else {
        plan.data(target, entry * SECTOR + (position - grainStart), grainEnd - position);
      }
      position = grainEnd;
    }
    if (compressedUnits.length > 0) {
      const loads = loadCompressedUnits(
        this.file,
        this.grains,
        compressedUnits,
        (stored, unit) => this.inflateGrain(stored, unit.start, unit.index),
        'compressed grain',
      );
      for (let unit = 0; unit < loads.length; unit++) {
        const target = compressedCopies[unit * 3]!;
        const inGrain = compressedCopies[unit * 3 + 1]!;
        const span = compressedCopies[unit * 3 + 2]!;
        plan.task(loads[unit]!.then((grain) => void grain.copy(out, target, inGrain, inGrain + span)));
      }
    }
    await plan.finish();
  }

  async zeroRanges(base: number, zero: ZeroRange[], unallocated: ZeroRange[]): Promise<void> {
    for (let directoryIndex = 0; directoryIndex * this.tableSpan < this.size; directoryIndex++) {
      if (directoryIndex % PREFETCH_TABLES === 0) this.prefetchGrainTables(directoryIndex + 1, directoryIndex + PREFETCH_TABLES);
      const tableStart = directoryIndex * this.tableSpan;
      const table = await this.grainTable(directoryIndex);
      if (table === undefined) {
        appendRange(unallocated, base + tableStart, Math.min(this.tableSpan, this.size - tableStart));
        continue;
      }
      for (let index = 0; index < this.header.numGTEsPerGT; index++) {
        const grainStart = tableStart + index * this.grainBytes;
        if (grainStart >= this.size) break;
        const entry = table.readUInt32LE(index * 4);
        const length = Math.min(this.grainBytes, this.size - grainStart);
        if (entry === 0) appendRange(unallocated, base + grainStart, length);
        else if (entry === 1 && this.zeroedGrains) appendRange(zero, base + grainStart, length);
      }
    }
  }

  /** Begin loading grain tables first..last (bounded); errors surface when the table is awaited. */
  private prefetchGrainTables(first: number, last: number): void {
    for (let index = first; index <= last && index < first + PREFETCH_TABLES; index++) {
      const sector = this.directory[index] ?? 0;
      if (sector > 1 && this.grainTables.peek(sector) === undefined) this.grainTable(index).catch(() => undefined);
    }
  }

  /** Grain table `directoryIndex`, or undefined if not allocated. */
  private async grainTable(directoryIndex: number): Promise<Buffer | undefined> {
    const sector = this.directory[directoryIndex] ?? 0;
    if (sector === 0 || (sector === 1 && this.zeroedGrains)) return undefined;
    const cached = this.grainTables.peek(sector);
    if (cached !== undefined) return cached;
    return this.grainTables.get(sector, () =>
      this.file.read(sector * SECTOR, this.header.numGTEsPerGT * 4, `grain table ${directoryIndex}`),
    );
  }

  /**
   * Inflate a compressed grain (VMDK 1.1: with markers, a {u64 lba, u32 size} marker precedes the
   * zlib data). `stored` holds the bytes from `position`, possibly fewer than the grain needs.
   */
  private async inflateGrain(stored: Buffer, position: number, grainIndex: number): Promise<Buffer> {
    let payload = stored;
    if ((this.header.flags & FLAG_MARKERS) !== 0) {
      if (stored.length < 12) throw new SourceError(this.file.path, `compressed grain ${grainIndex} at ${position} is truncated`);
      const lba = stored.readBigUInt64LE(0);
      const compressedSize = stored.readUInt32LE(8);
      if (lba !== BigInt(grainIndex) * BigInt(this.header.grainSize)) {
        throw new SourceError(
          this.file.path,
          `grain marker at ${position} is for sector ${lba}, expected ${grainIndex * this.header.grainSize}: corrupt grain table`,
        );
      }
      if (compressedSize === 0 || compressedSize > 2 * this.grainBytes + 4096) {
        throw new SourceError(this.file.path, `grain marker at ${position} has an implausible size ${compressedSize}`);
      }
      payload =
        12 + compressedSize <= stored.length
          ? stored.subarray(12, 12 + compressedSize)
          : await this.file.read(position + 12, compressedSize, `compressed grain ${grainIndex}`);
    }
    let grain: Buffer;
    try {
      grain = await inflateAsync(payload, { chunkSize: this.grainBytes + 1024 });
    } catch (err) {
      throw new SourceError(this.file.path, `compressed grain ${grainIndex} at ${position} does not inflate: ${errorMessage(err)}`);
    }
    // The last grain of an extent may be short when the capacity is not a multiple of the grain.
    const expected = Math.min(this.grainBytes, this.header.capacity * SECTOR - grainIndex * this.grainBytes);
    if (grain.length < expected) {
      throw new SourceError(this.file.path, `compressed grain ${grainIndex} inflates to ${grain.length} bytes, expected ${expected}`);
    }
    if (grain.length < this.grainBytes) {
      const full = Buffer.alloc(this.grainBytes);
      grain.copy(full);
      return full;
    }
    return grain.length === this.grainBytes ? grain : grain.subarray(0, this.grainBytes);
  }
}

/** Parse a SparseExtentHeader (VMDK 1.1), following the footer copy when gdOffset is GD_AT_END. */
async function readSparseHeader(file: ImageFile): Promise<SparseHeader> {
  const path = file.path;
  if (file.size < SECTOR) throw new SourceError(path, `file too short for a VMDK sparse header (${file.size} bytes)`);
  const head = await file.read(0, SECTOR, 'VMDK sparse header');
  let header = decodeSparseHeader(head, path, 'header');
  if (header.gdAtEnd) {
    // Stream-optimized: the footer (a copy of the header with the real gdOffset) sits in the
    // second-to-last sector, followed by the end-of-stream marker (VMDK 1.1, "The Footer").
    if (file.size < 3 * SECTOR) throw new SourceError(path, 'grain directory is at the end but the file has no footer');
    const footer = await file.read(file.size - 2 * SECTOR, SECTOR, 'VMDK footer');
    header = decodeSparseHeader(footer, path, 'footer');
    if (header.gdAtEnd) throw new SourceError(path, 'VMDK footer does not give a grain directory offset');
  }
  return header.value;
}

function decodeSparseHeader(raw: Buffer, path: string, what: string): { value: SparseHeader; gdAtEnd: boolean } {
  if (raw.readUInt32LE(0) !== SPARSE_MAGIC) throw new SourceError(path, `VMDK sparse ${what}: bad magic (not "KDMV")`);
  const version = raw.readUInt32LE(4);
  if (version < 1 || version > 3) throw new SourceError(path, `VMDK sparse extent version ${version} is not supported`);
  const flags = raw.readUInt32LE(8);
  // Line-ending check (flag bit 0): detects files mangled by a text-mode transfer.
  if ((flags & FLAG_NEWLINE_TEST) !== 0 && (raw[73] !== 0x0a || raw[74] !== 0x20 || raw[75] !== 0x0d || raw[76] !== 0x0a)) {
    throw new SourceError(path, `VMDK sparse ${what}: line-ending check failed (file corrupted by a text-mode transfer?)`);
  }
  const u64 = (offset: number, name: string): number => {
    const value = raw.readBigUInt64LE(offset);
    if (value > BigInt(Number.MAX_SAFE_INTEGER) / 512n) throw new SourceError(path, `VMDK sparse ${what}: ${name} ${value} out of range`);
    return Number(value);
  };
  const capacity = u64(12, 'capacity');
  const grainSize = u64(20, 'grainSize');
  if (grainSize < 1 || grainSize > 65536 || (grainSize & (grainSize - 1)) !== 0) {
    throw new SourceError(path, `VMDK sparse ${what}: grain size ${grainSize} sectors is not a power of two in 1-65536`);
  }
  const numGTEsPerGT = raw.readUInt32LE(44);
  if (numGTEsPerGT < 1 || numGTEsPerGT > 65536) {
    throw new SourceError(path, `VMDK sparse ${what}: numGTEsPerGT ${numGTEsPerGT} out of range`);
  }
  const gdAtEnd = raw.readBigUInt64LE(56) === GD_AT_END;
  const gdOffset = gdAtEnd ? 0 : u64(56, 'gdOffset');
  if (!gdAtEnd && gdOffset === 0 && capacity > 0) throw new SourceError(path, `VMDK sparse ${what}: no grain directory`);
  const compressAlgorithm = raw.readUInt16LE(77);
  if ((flags & FLAG_COMPRESSED) !== 0 && compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new SourceError(path, `VMDK compression algorithm ${compressAlgorithm} is not supported (only deflate)`);
  }
  return {
    gdAtEnd,
    value: {
      version,
      flags,
      capacity,
      grainSize,
      descriptorOffset: u64(28, 'descriptorOffset'),
      descriptorSize: u64(36, 'descriptorSize'),
      numGTEsPerGT,
      rgdOffset: u64(48, 'rgdOffset'),
      gdOffset,
      compressAlgorithm,
    },
  };
}

/**
 * Open the parent of a delta disk (VMDK 1.1, "parentCID" and "parentFileNameHint") and check that
 * it is the disk the delta was taken from: its CID must equal our parentCID.
 */
async function openParentDisk(path: string, descriptor: VmdkDescriptor, options: VmdkOpenOptions): Promise<DiskSource> {
  const hint = descriptor.parentFileNameHint;
  if (options.openParent === undefined || hint === undefined || hint === '') {
    throw new SourceError(path, `VMDK delta disk (parentCID ${descriptor.parentCid}) without a usable parentFileNameHint`);
  }
  const depth = options.depth ?? 0;
  if (depth >= MAX_PARENT_DEPTH) throw new SourceError(path, `VMDK parent chain deeper than ${MAX_PARENT_DEPTH} disks (a loop?)`);
  const parentPath = isAbsolute(hint) ? hint : resolve(dirname(path), hint);
  let parent: DiskSource;
  try {
    parent = await options.openParent(parentPath, depth + 1);
  } catch (err) {
    throw new SourceError(path, `cannot open parent disk ${parentPath}: ${errorMessage(err)}`);
  }
  const parentCid = parent instanceof VmdkSource ? parent.descriptor.keys.get('CID') : undefined;
  if (parentCid === undefined || parentCid.toLowerCase() !== descriptor.parentCid?.toLowerCase()) {
    await parent.close().catch(() => undefined);
    throw new SourceError(
      path,
      `parent disk ${parentPath} has CID ${parentCid ?? '(none)'}, the delta expects ${descriptor.parentCid}: the parent changed after the snapshot`,
    );
  }
  return parent;
}

export class VmdkSource implements DiskSource {
  readonly format: string;
  readonly size: number;
  readonly description: string;
  private readonly extentStarts: number[];

  private constructor(
    /** The file opened by the caller (descriptor or monolithic sparse file). */
    private readonly file: ImageFile,
    readonly descriptor: VmdkDescriptor,
    private readonly extents: ReadonlyArray<Extent>,
    private readonly parent: DiskSource | undefined,
  ) {
    this.format = `vmdk-${descriptor.createType}`;
    this.extentStarts = [];
    let start = 0;
    for (const extent of extents) {
      this.extentStarts.push(start);
      start += extent.size;
    }
    this.size = start;
    const parts: string[] = [];
    if (extents.length > 1) parts.push(`${extents.length} extents`);
    if (parent !== undefined) parts.push(`parent: ${parent.description}`);
    this.description = `vmdk ${descriptor.createType} ${file.path}${parts.length > 0 ? ` (${parts.join(', ')})` : ''}`;
  }

  static async open(path: string, options: VmdkOpenOptions = {}): Promise<VmdkSource> {
    const file = await ImageFile.open(path);
    try {
      return await VmdkSource.fromFile(file, options);
    } catch (err) {
      await file.close().catch(() => undefined);
      throw err;
    }
  }

  /** Parse an opened descriptor or sparse file; on failure the caller closes `file`. */
  static async fromFile(file: ImageFile, options: VmdkOpenOptions = {}): Promise<VmdkSource> {
    const path = file.path;
    const head = await file.readClamped(0, SECTOR, 'VMDK header');
    let descriptor: VmdkDescriptor;
    let selfIsSparse = false;
    if (head.length >= 4 && head.readUInt32LE(0) === SPARSE_MAGIC) {
      // A sparse file opened directly is the whole disk, one extent: the extent line of its
      // embedded descriptor still names the file it was created as (a renamed copy must not open
      // the original), so only createType and the parent link are taken from it (as qemu does).
      selfIsSparse = true;
      const header = await readSparseHeader(file);
      let embedded: VmdkDescriptor | undefined;
      if (header.descriptorOffset !== 0 && header.descriptorSize !== 0) {
        const bytes = Math.min(header.descriptorSize * SECTOR, MAX_DESCRIPTOR_BYTES);
        const text = (await file.read(header.descriptorOffset * SECTOR, bytes, 'embedded VMDK descriptor')).toString('utf8');
        const trimmed = text.replace(/\0[\s\S]*$/, '');
        if (trimmed.trim() !== '') embedded = parseVmdkDescriptor(trimmed, path);
      }
      descriptor = {
        version: embedded?.version ?? 1,
        createType: embedded?.createType ?? ((header.flags & FLAG_COMPRESSED) !== 0 ? 'streamOptimized' : 'monolithicSparse'),
        parentCid: embedded?.parentCid,
        parentFileNameHint: embedded?.parentFileNameHint,
        extents: [{ access: 'RW', sectors: header.capacity, type: 'SPARSE', fileName: undefined, offsetSectors: 0 }],
        keys: embedded?.keys ?? new Map(),
      };
    } else {
      if (file.size > MAX_DESCRIPTOR_BYTES) {
        throw new SourceError(path, `not a VMDK sparse file and too large (${file.size} bytes) for a descriptor`);
      }
      descriptor = parseVmdkDescriptor((await file.read(0, file.size, 'VMDK descriptor')).toString('utf8'), path);
    }

    if (!SUPPORTED_CREATE_TYPES.has(descriptor.createType)) {
      throw new SourceError(
        path,
        `VMDK createType "${descriptor.createType}" is not supported (supported: ${[...SUPPORTED_CREATE_TYPES].join(', ')})`,
      );
    }
    const opened: ImageFile[] = [];
    const extents: Extent[] = [];
    let parent: DiskSource | undefined;
    try {
      if (descriptor.parentCid !== undefined && descriptor.parentCid.toLowerCase() !== 'ffffffff') {
        parent = await openParentDisk(path, descriptor, options);
      }
      for (const line of descriptor.extents) {
        const size = line.sectors * SECTOR;
        if (line.access === 'NOACCESS') throw new SourceError(path, 'VMDK extent with NOACCESS cannot be read');
        if (line.type === 'ZERO') {
          extents.push(new ZeroExtent(size));
          continue;
        }
        const extentPath = line.fileName === undefined ? path : isAbsolute(line.fileName) ? line.fileName : resolve(dirname(path), line.fileName);
        const isSelf = resolve(extentPath) === resolve(path);
        const openExtentFile = async (): Promise<ImageFile> => {
          if (isSelf) return file;
          let extentFile: ImageFile;
          try {
            extentFile = await ImageFile.open(extentPath);
          } catch (err) {
            throw new SourceError(path, `extent file: ${errorMessage(err)}`);
          }
          opened.push(extentFile);
          return extentFile;
        };
        switch (line.type) {
          case 'FLAT':
          case 'VMFS': {
            if (isSelf) throw new SourceError(path, 'flat extent refers to the descriptor file itself');
            extents.push(new FlatExtent(await openExtentFile(), line.offsetSectors * SECTOR, size));
            break;
          }
          case 'SPARSE': {
            if (isSelf && !selfIsSparse) throw new SourceError(path, 'sparse extent refers to the descriptor file itself');
            extents.push(await SparseExtent.open(await openExtentFile(), size, options.logger));
            break;
          }
          default:
            throw new SourceError(path, `VMDK extent type ${line.type} is not supported`);
        }
      }
    } catch (err) {
      await Promise.all(opened.map((extentFile) => extentFile.close().catch(() => undefined)));
      await parent?.close().catch(() => undefined);
      throw err;
    }
    const source = new VmdkSource(file, descriptor, extents, parent);
    options.logger?.debug({ path, createType: descriptor.createType, extents: extents.length, size: source.size }, 'opened VMDK image');
    return source;
  }

  async checkUnchanged(): Promise<void> {
    await this.file.checkUnchangedNow();
    for (const extent of this.extents) for (const extentFile of extent.files) if (extentFile !== this.file) await extentFile.checkUnchangedNow();
    await this.parent?.checkUnchanged?.();
  }

  async read(offset: number, length: number): Promise<Buffer> {
    checkReadRange(this.file.path, offset, length, this.size);
    const out = Buffer.alloc(length);
    const end = offset + length;
    const tasks: Promise<void>[] = [this.file.checkUnchanged()];
    for (let index = this.extentIndexAt(offset); index < this.extents.length; index++) {
      const start = this.extentStarts[index]!;
      if (start >= end) break;
      const extent = this.extents[index]!;
      const from = Math.max(offset, start);
      const to = Math.min(end, start + extent.size);
      if (to <= from) continue;
      tasks.push(
        (async () => {
          for (const extentFile of extent.files) if (extentFile !== this.file) await extentFile.checkUnchanged();
          const parent = this.parent;
          const readFromParent: ParentReader | undefined =
            parent === undefined
              ? undefined
              : (outOffset, extentOffset, length) => readParent(parent, out, outOffset, start + extentOffset, length);
          await extent.readInto(out, from - offset, from - start, to - from, readFromParent);
        })(),
      );
    }
    await Promise.all(tasks);
    return out;
  }

  async zeroRanges(): Promise<ReadonlyArray<{ offset: number; length: number }>> {
    const zero: ZeroRange[] = [];
    const unallocated: ZeroRange[] = [];
    for (let index = 0; index < this.extents.length; index++) {
      await this.extents[index]!.zeroRanges(this.extentStarts[index]!, zero, unallocated);
    }
    if (this.parent === undefined) return unionRanges(zero, unallocated);
    // Unallocated grains of a delta disk show the parent: zero where it is zero or beyond its end.
    const parentZero = unionRanges(
      [...((await this.parent.zeroRanges?.()) ?? [])],
      this.parent.size < this.size ? [{ offset: this.parent.size, length: this.size - this.parent.size }] : [],
    );
    return clipRanges(unionRanges(zero, intersectRanges(unallocated, parentZero)), this.size);
  }

  async close(): Promise<void> {
    const files = new Set<ImageFile>([this.file]);
    for (const extent of this.extents) for (const extentFile of extent.files) files.add(extentFile);
    try {
      await Promise.all([...files].map((f) => f.close()));
    } finally {
      await this.parent?.close();
    }
  }

  /** Index of the extent containing `offset` (binary search over extent starts). */
  private extentIndexAt(offset: number): number {
    let low = 0;
    let high = this.extentStarts.length - 1;
    while (low < high) {
      const mid = (low + high + 1) >> 1;
      if (this.extentStarts[mid]! <= offset) low = mid;
      else high = mid - 1;
    }
    return low;
  }
}
