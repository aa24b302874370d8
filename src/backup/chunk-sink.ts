/**
 * Where a writer puts new chunks, per chunk store: `FileChunkSink` (one file per chunk, "files"
 * repositories) and `PackChunkSink` (pack files, "packs" repositories). Both adopt chunks already
 * in the repository so that a concurrent gc keeps them (see src/backup/maintenance.ts), make new
 * chunks durable before the writer publishes an index, and re-check adopted chunks at the end.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { RepositoryError } from './errors.js';
import { PackWriter, statPack } from './packs.js';
import { Repository, errnoCode, fsyncDir, touchIfPresent, writevFully } from './repository.js';
import { SerialJobs } from './serial-jobs.js';
import { runBounded } from './writer.js';

export interface ChunkSink {
  /** Whether the chunk is already durable in the repository; if so it is marked in use (gc keeps it). */
  adopt(digestHex: string): Promise<boolean>;
  /**
   * Store a new chunk (header + payload); durable after `flush`. The pack sink keeps the buffers
   * until its pack is sealed: callers must not change them afterwards (the engine's source reads
   * and `mergedChunk` hand out buffers of their own).
   */
  put(digestHex: string, header: Buffer, payload: Buffer): Promise<void>;
  flush(): Promise<void>;
  /** After a failure: delete what is not yet in place. */
  abort(): Promise<void>;
  /** Throws if a chunk adopted during the write has disappeared since (a concurrent gc). */
  recheckAdopted(): Promise<void>;
  /** fsync every directory that gained entries. */
  syncDirectories(): Promise<void>;
}

function adoptedChunkGone(hex: string): RepositoryError {
  return new RepositoryError(`chunk ${hex} disappeared during the write (concurrent gc?): nothing was published, run it again`);
}

/** fsync the directories that gained entries (8 at a time), then their parent if there was any. */
async function fsyncTouched(dirs: ReadonlySet<string>, parent: string): Promise<void> {
  if (dirs.size === 0) return;
  const list = [...dirs];
  await runBounded(list.length, 8, (k) => fsyncDir(list[k]!));
  await fsyncDir(parent);
}

export class FileChunkSink implements ChunkSink {
  private readonly adopted = new Set<string>();
  private readonly touchedDirs = new Set<string>();
  private readonly createdDirs = new Set<string>();
  private readonly batch = new DurableBatch(64, 64 * 1024 * 1024, (dir) => this.touchedDirs.add(dir));

  private constructor(
    private readonly repo: Repository,
    /**
     * Chunk prefix directories present when the write starts, listed once. A chunk whose prefix
     * directory was absent cannot have existed then: it needs neither the adoption probe (utimes,
     * which fails with ENOENT for every new chunk of a fresh repository) nor a mkdir probe. A
     * directory another writer creates meanwhile only means a chunk may be written twice
     * (identical content, atomic rename): harmless.
     */
    private readonly prefixDirsAtStart: ReadonlySet<string>,
  ) {}

  static async start(repo: Repository): Promise<FileChunkSink> {
    const names = await fsp.readdir(join(repo.dir, 'chunks')).catch((err: unknown) => {
      if (errnoCode(err) === 'ENOENT') return [];
      throw err;
    });
    return new FileChunkSink(repo, new Set(names));
  }

  async adopt(hex: string): Promise<boolean> {
    if (!this.prefixDirsAtStart.has(this.repo.chunkPrefix(hex))) return false;
    // An existing file is adopted; bumping its mtime tells a concurrent gc it is in use.
    const exists = await touchIfPresent(this.repo.chunkPath(hex));
    if (exists) this.adopted.add(hex);
    return exists;
  }

  async put(hex: string, header: Buffer, payload: Buffer): Promise<void> {
    const dir = this.repo.chunkDir(hex);
    // gc never removes prefix directories: one listed at the start still exists.
    if (!this.createdDirs.has(dir) && !this.prefixDirsAtStart.has(this.repo.chunkPrefix(hex))) {
      await fsp.mkdir(dir, { recursive: true });
      this.createdDirs.add(dir);
    }
    await this.batch.add(this.repo.chunkPath(hex), dir, header, payload);
  }

  flush(): Promise<void> {
    return this.batch.flush();
  }

  abort(): Promise<void> {
    return this.batch.abort();
  }

  async recheckAdopted(): Promise<void> {
    for (const hex of this.adopted) {
      try {
        await fsp.stat(this.repo.chunkPath(hex));
      } catch {
        throw adoptedChunkGone(hex);
      }
    }
  }

  syncDirectories(): Promise<void> {
    return fsyncTouched(this.touchedDirs, join(this.repo.dir, 'chunks'));
  }
}

/**
 * New chunks go into packs (PackWriter); a chunk some pack already holds is adopted by bumping
 * that pack's mtime once per write (gc keeps packs newer than the oldest running writer).
 */
export class PackChunkSink implements ChunkSink {
  private readonly adopted = new Set<string>();
  /** Packs whose mtime this write has bumped. */
  private readonly bumped = new Set<string>();
  private readonly touchedDirs = new Set<string>();
  private readonly writer: PackWriter;

  constructor(private readonly repo: Repository) {
    this.writer = new PackWriter(repo.packs, (dir) => this.touchedDirs.add(dir));
  }

  async adopt(hex: string): Promise<boolean> {
    const store = this.repo.packs;
    await store.ensureLoaded();
    for (let attempt = 0; attempt < 2; attempt++) {
      const location = store.lookup(hex);
      if (location === undefined) return false;
      if (this.bumped.has(location.pack)) break;
      if (await touchIfPresent(store.packPath(location.pack))) {
        this.bumped.add(location.pack);
        break;
      }
      // gc removed or repacked that pack since we loaded the index: look again.
      store.forgetPack(location.pack);
      await store.refresh();
      if (attempt === 1) return false;
    }
    this.adopted.add(hex);
    return true;
  }

  put(hex: string, header: Buffer, payload: Buffer): Promise<void> {
    return this.writer.add(hex, header, payload);
  }

  flush(): Promise<void> {
    return this.writer.flush();
  }

  abort(): Promise<void> {
    return this.writer.abort();
  }

  async recheckAdopted(): Promise<void> {
    const store = this.repo.packs;
    for (const pack of this.bumped) {
      if ((await statPack(store, pack)) !== null) continue;
      // The pack is gone: its chunks we adopted must be in some other pack now.
      store.forgetPack(pack);
      await store.refresh();
      break;
    }
    for (const hex of this.adopted) {
      const location = store.lookup(hex);
      if (location === undefined || (!this.bumped.has(location.pack) && (await statPack(store, location.pack)) === null)) {
        throw adoptedChunkGone(hex);
      }
    }
  }

  syncDirectories(): Promise<void> {
    return fsyncTouched(this.touchedDirs, this.repo.packs.dir);
  }
}

interface PendingFile {
  readonly handle: FileHandle;
  readonly tmp: string;
  readonly final: string;
  readonly dir: string;
}

/**
 * New chunk files are written under temporary names and made durable in groups: one burst of
 * concurrent fdatasyncs lets the file system batch its journal commits (measured: 64 KiB chunks,
 * one fdatasync each, are several times slower). A file gets its final name only after its data is
 * durable, so an existing chunk file is always complete (backups adopt existing chunks by name).
 */
class DurableBatch {
  private pending: PendingFile[] = [];
  private pendingBytes = 0;
  /** Flushes, one at a time in order; after the first failure later ones discard their files. */
  private readonly flushes = new SerialJobs();

  constructor(
    private readonly maxFiles: number,
    private readonly maxBytes: number,
    private readonly onRenamed: (dir: string) => void,
  ) {}

  /** Write `header` + `payload` (one writev) to a temporary file; durable and renamed at the next flush. */
  async add(final: string, dir: string, header: Buffer, payload: Buffer): Promise<void> {
    const tmp = `${final}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
    const handle = await fsp.open(tmp, 'wx', 0o644);
    const size = header.length + payload.length;
    try {
      await writevFully(handle, [header, payload]);
    } catch (err) {
      await handle.close().catch(() => undefined);
      await fsp.rm(tmp, { force: true }).catch(() => undefined);
      throw err;
    }
    this.pending.push({ handle, tmp, final, dir });
    this.pendingBytes += size;
    if (this.pending.length >= this.maxFiles || this.pendingBytes >= this.maxBytes) {
      // The batch syncs in the background while chunks keep being read, hashed and compressed.
      // Back-pressure: with one more batch already waiting behind the running one, wait for it.
      const flushed = this.flush();
      if (this.flushes.inFlight > 2) await flushed;
    }
  }

  /**
   * Make every file added so far durable and rename it into place. Flushes run one at a time, in
   * order; the returned promise rejects with the first failure of this or any earlier flush.
   */
  flush(): Promise<void> {
    const files = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    return this.flushes.run(
      () => this.syncAndRename(files),
      () => discardFiles(files),
    );
  }

  /** After a failure: close and delete files not yet renamed. */
  async abort(): Promise<void> {
    const files = this.pending;
    this.pending = [];
    await this.flushes.settled();
    await discardFiles(files);
  }

  private async syncAndRename(files: PendingFile[]): Promise<void> {
    const renamed = new Set<PendingFile>();
    try {
      await runBounded(files.length, 32, (k) => files[k]!.handle.datasync());
      // Each file is durable now: close and rename them in any order (the index comes later).
      await runBounded(files.length, 32, async (k) => {
        const f = files[k]!;
        await f.handle.close();
        await fsp.rename(f.tmp, f.final);
        renamed.add(f);
        this.onRenamed(f.dir);
      });
    } catch (err) {
      await discardFiles(files.filter((f) => !renamed.has(f)));
      throw err;
    }
  }
}

/** Close (if still open) and delete temporary chunk files that were not renamed into place. */
async function discardFiles(files: readonly PendingFile[]): Promise<void> {
  for (const f of files) {
    await f.handle.close().catch(() => undefined);
    await fsp.rm(f.tmp, { force: true }).catch(() => undefined);
  }
}
