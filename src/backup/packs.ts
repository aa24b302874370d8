/**
 * Pack files: the chunk store of repositories with `"chunkStore": "packs"` (the default for new
 * repositories; see docs/repository-format.md).
 *
 * A pack holds many chunk records back to back, each exactly what a chunk file of the "files"
 * layout holds (24-byte chunk header + payload), then a trailer that says where each record is:
 *
 *   record 0 … record n-1
 *   entries: n × 44 bytes  (SHA-256 digest 32, record offset u64 LE, record length u32 LE)
 *   footer:  24 bytes      (magic "BRPK" u32 LE, version u8, 3 zero bytes, entry count u32 LE,
 *                           CRC32 of the entries u32 LE, offset of the entries u64 LE)
 *
 * Packs live at `packs/<2 hex>/<32 hex>.pack` (a random name). Like every repository file a pack
 * is written under a temporary name, fdatasynced and renamed: a pack that has its name is complete.
 * One pack per ~16 MiB of new chunks replaces hundreds of chunk files (open, write, fdatasync,
 * close, rename each) and their 4 KiB block rounding.
 *
 * The store keeps every pack's entries in memory (digest → pack, offset, length): ~150 bytes a
 * chunk, 0.6 MiB per GiB of 256 KiB chunks. A digest it does not know makes it look for packs
 * that appeared since (another writer, a repack by gc) before it calls the chunk missing.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, type Stats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { RepositoryError } from './errors.js';
import { DIGEST_LENGTH } from './format.js';
import { errnoCode, writevFully } from './repository.js';
import { SerialJobs } from './serial-jobs.js';
import { runBounded } from './writer.js';

export const PACK_MAGIC = 0x4b505242; // "BRPK" little-endian
export const PACK_FORMAT_VERSION = 1;
export const PACK_ENTRY_SIZE = DIGEST_LENGTH + 8 + 4;
export const PACK_FOOTER_SIZE = 24;
/** A pack is sealed once its records reach this many bytes. */
export const DEFAULT_PACK_TARGET_BYTES = 16 * 1024 * 1024;

const PACK_NAME_RE = /^[0-9a-f]{32}\.pack$/;
const PREFIX_RE = /^[0-9a-f]{2}$/;

/** Where a chunk's record is: `pack` is relative to packs/ ("ab/ab….pack"). */
export interface ChunkLocation {
  readonly pack: string;
  readonly offset: number;
  readonly length: number;
}

export interface PackEntry {
  readonly digestHex: string;
  readonly offset: number;
  readonly length: number;
}

/** Build a pack's trailer (entries + footer) for records at the given offsets. */
export function encodePackTrailer(entries: readonly PackEntry[], entriesOffset: number): Buffer {
  const trailer = Buffer.alloc(entries.length * PACK_ENTRY_SIZE + PACK_FOOTER_SIZE);
  entries.forEach((e, k) => {
    const at = k * PACK_ENTRY_SIZE;
    trailer.write(e.digestHex, at, DIGEST_LENGTH, 'hex');
    trailer.writeBigUInt64LE(BigInt(e.offset), at + DIGEST_LENGTH);
    trailer.writeUInt32LE(e.length, at + DIGEST_LENGTH + 8);
  });
  const entriesBytes = entries.length * PACK_ENTRY_SIZE;
  const footer = trailer.subarray(entriesBytes);
  footer.writeUInt32LE(PACK_MAGIC, 0);
  footer.writeUInt8(PACK_FORMAT_VERSION, 4);
  footer.writeUInt32LE(entries.length, 8);
  footer.writeUInt32LE(crc32(trailer.subarray(0, entriesBytes)), 12);
  footer.writeBigUInt64LE(BigInt(entriesOffset), 16);
  return trailer;
}

/** Read and check a pack's trailer; throws RepositoryError naming the pack and the problem. */
export async function readPackEntries(path: string): Promise<PackEntry[]> {
  const handle = await fsp.open(path, 'r');
  try {
    const { size } = await handle.stat();
    const bad = (reason: string): RepositoryError => new RepositoryError(`bad pack ${path}: ${reason}`);
    if (size < PACK_FOOTER_SIZE) throw bad(`${size} bytes, shorter than its footer`);
    const footer = Buffer.alloc(PACK_FOOTER_SIZE);
    await readFully(handle, footer, size - PACK_FOOTER_SIZE);
    if (footer.readUInt32LE(0) !== PACK_MAGIC) throw bad('no pack footer (bad magic)');
    const version = footer.readUInt8(4);
    if (version !== PACK_FORMAT_VERSION) throw bad(`unsupported pack format version ${version}`);
    const count = footer.readUInt32LE(8);
    const entriesOffset = Number(footer.readBigUInt64LE(16));
    if (entriesOffset + count * PACK_ENTRY_SIZE + PACK_FOOTER_SIZE !== size) {
      throw bad(`footer says ${count} entries at ${entriesOffset}, which does not match its ${size} bytes`);
    }
    const table = Buffer.alloc(count * PACK_ENTRY_SIZE);
    await readFully(handle, table, entriesOffset);
    if (crc32(table) !== footer.readUInt32LE(12)) throw bad('CRC32 of the entry table does not match');
    const entries: PackEntry[] = [];
    for (let k = 0; k < count; k++) {
      const at = k * PACK_ENTRY_SIZE;
      const offset = Number(table.readBigUInt64LE(at + DIGEST_LENGTH));
      const length = table.readUInt32LE(at + DIGEST_LENGTH + 8);
      if (offset + length > entriesOffset) throw bad(`entry ${k} points past the records`);
      entries.push({ digestHex: table.toString('hex', at, at + DIGEST_LENGTH), offset, length });
    }
    return entries;
  } finally {
    await handle.close();
  }
}

async function readFully(handle: FileHandle, into: Buffer, position: number): Promise<void> {
  let filled = 0;
  while (filled < into.length) {
    const { bytesRead } = await handle.read(into, filled, into.length - filled, position + filled);
    if (bytesRead === 0) throw new RepositoryError(`unexpected end of file at ${position + filled}`);
    filled += bytesRead;
  }
}

/** A pack's name under packs/ for a new random id. */
export function newPackName(): string {
  const id = randomBytes(16).toString('hex');
  return `${id.slice(0, 2)}/${id}.pack`;
}

export function isPackTempName(name: string): boolean {
  return /\.pack\.tmp-\d+-[0-9a-f]+$|\.pack\.gc-\d+$/.test(name);
}

/**
 * The pack store of one repository: which pack holds which chunk. Never writes; `PackWriter`
 * adds the packs it seals. Chunks are read by the chunk workers (src/backup/chunk-workers.ts),
 * which keep their own handles.
 */
export class PackStore {
  private readonly locations = new Map<string, ChunkLocation>();
  /** Further copies of a chunk in other packs (rare: two writers at once, a repack put back). */
  private readonly otherLocations = new Map<string, ChunkLocation[]>();
  /** Loaded packs → their entries. */
  private readonly packEntries = new Map<string, readonly PackEntry[]>();
  private loaded: Promise<void> | null = null;
  private refreshing: Promise<void> | null = null;

  constructor(readonly dir: string) {}

  /** `pack` is a name under packs/ ("ab/ab….pack"); a plain concatenation (once per chunk read). */
  packPath(pack: string): string {
    return `${this.dir}/${pack}`;
  }

  /** Packs whose trailer could not be read at the last scan → why (their chunks count as missing). */
  readonly unreadablePacks = new Map<string, string>();

  /** Load every pack's entries (once; later calls wait for the first; a failed load is retried). */
  ensureLoaded(): Promise<void> {
    this.loaded ??= this.refresh().catch((err: unknown) => {
      this.loaded = null;
      throw err;
    });
    return this.loaded;
  }

  /** Look for packs added or removed since the last scan (one scan at a time; callers share it). */
  refresh(): Promise<void> {
    this.refreshing ??= this.scan().finally(() => {
      this.refreshing = null;
    });
    return this.refreshing;
  }

  /** Location of a chunk among the packs known now (no scan). */
  lookup(digestHex: string): ChunkLocation | undefined {
    return this.locations.get(digestHex);
  }

  /** Location of a chunk; a digest not known triggers one scan for new packs. */
  async locate(digestHex: string): Promise<ChunkLocation | undefined> {
    await this.ensureLoaded();
    const known = this.locations.get(digestHex);
    if (known !== undefined) return known;
    await this.refresh();
    return this.locations.get(digestHex);
  }

  /** Every loaded pack with its entries (for gc). */
  packs(): Array<[string, readonly PackEntry[]]> {
    return [...this.packEntries.entries()];
  }

  /** Register a durable pack (from a scan, this process's writer or gc); its locations win. */
  addPack(pack: string, entries: readonly PackEntry[]): void {
    this.packEntries.set(pack, entries);
    for (const e of entries) {
      const location = { pack, offset: e.offset, length: e.length };
      const previous = this.locations.get(e.digestHex);
      if (previous !== undefined && previous.pack !== pack) {
        const others = this.otherLocations.get(e.digestHex) ?? [];
        others.push(previous);
        this.otherLocations.set(e.digestHex, others);
      }
      this.locations.set(e.digestHex, location);
    }
  }

  /** Forget a pack that was deleted; a chunk it held stays known if another pack holds it too. */
  forgetPack(pack: string): void {
    const entries = this.packEntries.get(pack);
    if (entries === undefined) return;
    this.packEntries.delete(pack);
    for (const e of entries) {
      const others = this.otherLocations.get(e.digestHex)?.filter((l) => l.pack !== pack) ?? [];
      if (this.locations.get(e.digestHex)?.pack === pack) {
        const next = others.pop();
        if (next === undefined) this.locations.delete(e.digestHex);
        else this.locations.set(e.digestHex, next);
      }
      if (others.length > 0) this.otherLocations.set(e.digestHex, others);
      else this.otherLocations.delete(e.digestHex);
    }
  }

  /**
   * Read the records of one pack (gc copies the referenced ones of a pack it rewrites): one open,
   * one read per entry, the handle closed at the end.
   */
  async readRecords(pack: string, entries: readonly PackEntry[]): Promise<Buffer[]> {
    const handle = await fsp.open(this.packPath(pack), 'r');
    try {
      const records: Buffer[] = [];
      for (const e of entries) {
        const record = Buffer.allocUnsafe(e.length);
        await readFully(handle, record, e.offset);
        records.push(record);
      }
      return records;
    } finally {
      await handle.close();
    }
  }

  private async scan(): Promise<void> {
    const present = new Set<string>();
    let prefixes: string[];
    try {
      prefixes = await fsp.readdir(this.dir);
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      prefixes = [];
    }
    const toLoad: string[] = [];
    for (const prefix of prefixes) {
      if (!PREFIX_RE.test(prefix)) continue;
      for (const name of await fsp.readdir(join(this.dir, prefix))) {
        if (!PACK_NAME_RE.test(name)) continue;
        const pack = `${prefix}/${name}`;
        present.add(pack);
        if (!this.packEntries.has(pack)) toLoad.push(pack);
      }
    }
    for (const pack of [...this.packEntries.keys()]) if (!present.has(pack)) this.forgetPack(pack);
    for (const pack of [...this.unreadablePacks.keys()]) if (!present.has(pack)) this.unreadablePacks.delete(pack);
    await runBounded(toLoad.length, 16, async (k) => {
      const pack = toLoad[k]!;
      let entries: PackEntry[];
      try {
        entries = await readPackEntries(this.packPath(pack));
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return; // removed meanwhile (gc)
        // One damaged pack must not take the others down: its chunks are missing (reads of them
        // fail with MEDIUM ERROR, verify names the pack, a backup stores them anew); the next
        // scan tries it again.
        this.unreadablePacks.set(pack, err instanceof Error ? err.message : String(err));
        return;
      }
      this.unreadablePacks.delete(pack);
      this.addPack(pack, entries);
    });
  }
}

interface PendingRecord {
  readonly entry: PackEntry;
  readonly header: Buffer;
  readonly payload: Buffer;
}

/**
 * Collects new chunk records into packs: a pack is sealed (written in one writev, fdatasynced,
 * renamed, its directory noted for the final fsync) once it reaches `targetBytes`. Seals run in
 * the background one at a time while the writer keeps hashing and compressing; with one more seal
 * waiting behind the running one, `add` waits (bounded memory: ~3 packs).
 */
export class PackWriter {
  private records: PendingRecord[] = [];
  private bytes = 0;
  /** Seals, one at a time in order; the first failure sticks. */
  private readonly seals = new SerialJobs();
  private readonly tempFiles = new Set<string>();

  constructor(
    private readonly store: PackStore,
    private readonly onSealed: (dir: string) => void,
    private readonly targetBytes = DEFAULT_PACK_TARGET_BYTES,
  ) {}

  /** Add one chunk record (header + payload). */
  async add(digestHex: string, header: Buffer, payload: Buffer): Promise<void> {
    this.seals.throwIfFailed();
    const length = header.length + payload.length;
    this.records.push({ entry: { digestHex, offset: this.bytes, length }, header, payload });
    this.bytes += length;
    if (this.bytes >= this.targetBytes) {
      const sealed = this.seal();
      if (this.seals.inFlight > 2) await sealed;
    }
  }

  /** Seal the open pack (if any) and wait until every pack is durable; rejects with the first failure. */
  flush(): Promise<void> {
    return this.seal();
  }

  /** After a failure: wait for running seals and delete temporary files. */
  async abort(): Promise<void> {
    this.records = [];
    this.bytes = 0;
    await this.seals.settled();
    await Promise.all([...this.tempFiles].map((t) => fsp.rm(t, { force: true }).catch(() => undefined)));
  }

  private seal(): Promise<void> {
    const records = this.records;
    const bytes = this.bytes;
    this.records = [];
    this.bytes = 0;
    return this.seals.run(async () => {
      if (records.length > 0) await this.writePack(records, bytes);
    });
  }

  private async writePack(records: readonly PendingRecord[], recordBytes: number): Promise<void> {
    const pack = newPackName();
    const final = this.store.packPath(pack);
    const dir = join(final, '..');
    await fsp.mkdir(dir, { recursive: true });
    const tmp = `${final}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    const entries = records.map((r) => r.entry);
    const buffers: Buffer[] = [];
    for (const r of records) buffers.push(r.header, r.payload);
    buffers.push(encodePackTrailer(entries, recordBytes));
    this.tempFiles.add(tmp);
    const handle = await fsp.open(tmp, 'wx', 0o644);
    try {
      await writevFully(handle, buffers);
      await handle.datasync();
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw err;
    }
    await handle.close();
    await fsp.rename(tmp, final);
    this.tempFiles.delete(tmp);
    this.store.addPack(pack, entries);
    this.onSealed(dir);
  }
}

/** Stat a pack, or null if it is gone. */
export async function statPack(store: PackStore, pack: string): Promise<Stats | null> {
  return fsp.stat(store.packPath(pack)).catch((err: unknown) => {
    if (errnoCode(err) === 'ENOENT') return null;
    throw err;
  });
}

