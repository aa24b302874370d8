/**
 * Repository on a local directory: layout, atomic writes, locks and running-writer markers.
 *
 *   repo.json                         format marker (version, created, chunk store)
 *   packs/<2 hex>/<32 hex>.pack       chunk store "packs" (default): many chunk records per file
 *   chunks/<2 hex>/<64 hex>           chunk store "files": one file per chunk, named by the SHA-256
 *                                     of its uncompressed content (4 hex digits in the first layout)
 *   vms/<vm>/<pointId>.index          one complete index per restore point
 *   locks/vm-<vm>.lock                exclusive writer lock of one VM (backup, commit, prune)
 *   locks/gc.lock                     exclusive lock of the garbage collector
 *   writers/<pid>-<nonce>.json        "writer in progress" markers (start time): gc keeps newer chunks
 *
 * Every file is written to a temporary name, fsynced, renamed into place and its directory fsynced.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, constants as fsConstants } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { RepositoryError } from './errors.js';
import { decodeIndex, type RestorePointIndex } from './format.js';
import { PackStore } from './packs.js';

export const REPOSITORY_FORMAT = 'bootrestore-repository';
export const REPOSITORY_FORMAT_VERSION = 1;

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const POINT_ID_RE = /^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}-[0-9]{2}-[0-9]{2}\.[0-9]{3}Z$/;

/** VM names become directory names: letters, digits, '.', '_', '-' (not starting with '.'). */
export function checkVmName(vm: string): void {
  if (!NAME_RE.test(vm)) {
    throw new RepositoryError(`invalid VM name "${vm}": use letters, digits, ".", "_" and "-" (max 128, not starting with "." or "-")`);
  }
}

export function isPointId(id: string): boolean {
  return POINT_ID_RE.test(id);
}

/** Restore point ids are UTC timestamps with ':' replaced by '-': they sort by time. */
export function pointIdFor(date: Date): string {
  return date.toISOString().replace(/:/g, '-');
}

export function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err ? String((err as { code: unknown }).code) : undefined;
}

/** Hex digits of a chunk's directory name in new repositories: 256 directories, as git and restic use. */
export const CHUNK_PREFIX_LENGTH = 2;
/** Repositories whose repo.json has no `chunkPrefixLength` (the first layout) use 4 (65,536 directories). */
const LEGACY_CHUNK_PREFIX_LENGTH = 4;

/**
 * How chunks are stored: "packs" (many chunk records per pack file, src/backup/packs.ts; the
 * default for new repositories) or "files" (one file per chunk; repositories made before packs).
 */
export type ChunkStoreKind = 'files' | 'packs';
export const CHUNK_STORE_KINDS: readonly ChunkStoreKind[] = ['packs', 'files'];
export const DEFAULT_CHUNK_STORE: ChunkStoreKind = 'packs';

export interface CreateOptions {
  /** Chunk store of a new repository (default DEFAULT_CHUNK_STORE); ignored when it exists. */
  readonly chunkStore?: ChunkStoreKind;
}

export class Repository {
  /** The pack store (chunkStore "packs" only). */
  private packStore: PackStore | null = null;

  private constructor(
    readonly dir: string,
    /** Hex digits of the digest that name a chunk's directory (`chunks/<prefix>/<digest>`). */
    readonly chunkPrefixLength: number,
    readonly chunkStore: ChunkStoreKind,
  ) {}

  /** The pack index of a "packs" repository (one per Repository object). */
  get packs(): PackStore {
    if (this.chunkStore !== 'packs') throw new RepositoryError(`repository ${this.dir} stores chunks as files, not packs`);
    this.packStore ??= new PackStore(join(this.dir, 'packs'));
    return this.packStore;
  }

  /** Open an existing repository; throws RepositoryError naming the path and reason. */
  static async open(dir: string): Promise<Repository> {
    const marker = join(dir, 'repo.json');
    let text: string;
    try {
      text = await fsp.readFile(marker, 'utf8');
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') {
        throw new RepositoryError(`no repository at ${dir}: ${marker} does not exist`);
      }
      throw new RepositoryError(`cannot read ${marker}: ${err instanceof Error ? err.message : String(err)}`);
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new RepositoryError(`${marker} is not valid JSON`);
    }
    const p = parsed as { format?: unknown; version?: unknown; chunkPrefixLength?: unknown; chunkStore?: unknown };
    if (typeof parsed !== 'object' || parsed === null || p.format !== REPOSITORY_FORMAT) {
      throw new RepositoryError(`${marker} is not a bootrestore repository marker`);
    }
    if (p.version !== REPOSITORY_FORMAT_VERSION) {
      throw new RepositoryError(`${marker}: unsupported repository format version ${String(p.version)}`);
    }
    const prefixLength = p.chunkPrefixLength ?? LEGACY_CHUNK_PREFIX_LENGTH;
    if (typeof prefixLength !== 'number' || !Number.isInteger(prefixLength) || prefixLength < 1 || prefixLength > 4) {
      throw new RepositoryError(`${marker}: chunkPrefixLength must be an integer from 1 to 4 (got ${JSON.stringify(prefixLength)})`);
    }
    // Repositories made before packs have no chunkStore: their chunks are files.
    const chunkStore = p.chunkStore ?? 'files';
    if (chunkStore !== 'files' && chunkStore !== 'packs') {
      throw new RepositoryError(`${marker}: chunkStore must be "packs" or "files" (got ${JSON.stringify(chunkStore)})`);
    }
    return new Repository(dir, prefixLength, chunkStore);
  }

  /** Open the repository, creating it if `dir` does not exist or is an empty directory. */
  static async openOrCreate(dir: string, options: CreateOptions = {}): Promise<{ repo: Repository; created: boolean }> {
    let entries: string[] | null = null;
    try {
      entries = await fsp.readdir(dir);
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw new RepositoryError(`cannot read ${dir}: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (entries !== null && entries.length > 0) return { repo: await Repository.open(dir), created: false };
    const chunkStore = options.chunkStore ?? DEFAULT_CHUNK_STORE;
    await fsp.mkdir(dir, { recursive: true });
    const subdirs = [chunkStore === 'packs' ? 'packs' : 'chunks', 'vms', 'locks', 'writers'];
    for (const sub of subdirs) await fsp.mkdir(join(dir, sub), { recursive: true });
    const marker = JSON.stringify(
      {
        format: REPOSITORY_FORMAT,
        version: REPOSITORY_FORMAT_VERSION,
        created: new Date().toISOString(),
        chunkStore,
        chunkPrefixLength: CHUNK_PREFIX_LENGTH,
      },
      null,
      2,
    );
    await writeFileAtomic(join(dir, 'repo.json'), Buffer.from(marker + '\n'));
    await fsyncDir(dir);
    return { repo: new Repository(dir, CHUNK_PREFIX_LENGTH, chunkStore), created: true };
  }

  /** Name of the directory (under chunks/) that holds a chunk. */
  chunkPrefix(digestHex: string): string {
    return digestHex.slice(0, this.chunkPrefixLength);
  }

  chunkDir(digestHex: string): string {
    return join(this.dir, 'chunks', this.chunkPrefix(digestHex));
  }

  chunkPath(digestHex: string): string {
    return join(this.dir, 'chunks', this.chunkPrefix(digestHex), digestHex);
  }

  /** Whether a name under chunks/ is a chunk directory of this repository's layout. */
  isChunkPrefix(name: string): boolean {
    return name.length === this.chunkPrefixLength && /^[0-9a-f]+$/.test(name);
  }

  vmDir(vm: string): string {
    checkVmName(vm);
    return join(this.dir, 'vms', vm);
  }

  indexPath(vm: string, id: string): string {
    return join(this.vmDir(vm), `${id}.index`);
  }

  async listVms(): Promise<string[]> {
    const dir = join(this.dir, 'vms');
    try {
      const entries = await fsp.readdir(dir, { withFileTypes: true });
      return entries.filter((e) => e.isDirectory() && NAME_RE.test(e.name)).map((e) => e.name).sort();
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return [];
      throw err;
    }
  }

  /** Restore point ids of a VM, oldest first. Temporary and foreign files are ignored. */
  async listPointIds(vm: string): Promise<string[]> {
    try {
      const names = await fsp.readdir(this.vmDir(vm));
      return names
        .filter((n) => n.endsWith('.index') && isPointId(n.slice(0, -'.index'.length)))
        .map((n) => n.slice(0, -'.index'.length))
        .sort();
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return [];
      throw err;
    }
  }

  /** Resolve 'latest' or check that the id exists. */
  async resolvePointId(vm: string, pointId: string): Promise<string> {
    const ids = await this.listPointIds(vm);
    if (pointId === 'latest') {
      const last = ids[ids.length - 1];
      if (last === undefined) throw new RepositoryError(`VM "${vm}" has no restore points in ${this.dir}`);
      return last;
    }
    if (!ids.includes(pointId)) {
      throw new RepositoryError(`restore point "${pointId}" of VM "${vm}" does not exist (${this.indexPath(vm, pointId)})`);
    }
    return pointId;
  }

  async readIndex(vm: string, id: string): Promise<RestorePointIndex> {
    const path = this.indexPath(vm, id);
    let file: Buffer;
    try {
      file = await fsp.readFile(path);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') throw new RepositoryError(`restore point "${id}" of VM "${vm}" does not exist (${path})`);
      throw new RepositoryError(`cannot read index ${path}: ${err instanceof Error ? err.message : String(err)}`);
    }
    const index = decodeIndex(file, path);
    if (index.meta.vm !== vm || index.meta.id !== id) {
      throw new RepositoryError(`bad index ${path}: it describes ${index.meta.vm}/${index.meta.id}`);
    }
    return index;
  }

  /** Take an exclusive lock (`locks/<name>.lock`); stale locks of dead local processes are broken. */
  async lock(name: string, command: string): Promise<RepositoryLock> {
    const dir = join(this.dir, 'locks');
    await fsp.mkdir(dir, { recursive: true });
    const path = join(dir, `${name}.lock`);
    const content = JSON.stringify({ pid: process.pid, host: hostname(), command, since: new Date().toISOString() });
    for (let attempt = 0; attempt < 5; attempt++) {
      try {
        const handle = await fsp.open(path, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL, 0o644);
        try {
          await handle.writeFile(content + '\n');
          await handle.sync();
        } finally {
          await handle.close();
        }
        return new RepositoryLock(path);
      } catch (err) {
        if (errnoCode(err) !== 'EEXIST') throw err;
      }
      const holder = await readLockHolder(path);
      if (holder === null) continue; // removed meanwhile, or not yet written: retry
      if (holder.host === hostname() && !isProcessAlive(holder.pid)) {
        // Stale: move it aside atomically so that only one breaker wins, then retry.
        const aside = `${path}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
        const moved = await fsp.rename(path, aside).then(() => true, () => false);
        if (moved) {
          // Another process may have broken the stale lock and taken a fresh one in between:
          // if what we moved is not the stale holder, put it back and report it.
          const movedHolder = await readLockHolder(aside);
          if (movedHolder !== null && movedHolder.pid !== holder.pid && isProcessAlive(movedHolder.pid)) {
            await fsp.link(aside, path).catch(() => undefined);
          }
          await fsp.rm(aside, { force: true });
        }
        continue;
      }
      throw new RepositoryError(
        `repository ${this.dir} is locked (${path}): ${holder.command} by pid ${holder.pid} on ${holder.host} since ${holder.since}`,
      );
    }
    throw new RepositoryError(`could not take lock ${path}`);
  }

  /** Announce a running writer: gc keeps every chunk not older than the oldest announced start. */
  async registerWriter(command: string): Promise<WriterMarker> {
    const dir = join(this.dir, 'writers');
    await fsp.mkdir(dir, { recursive: true });
    const path = join(dir, `${process.pid}-${randomBytes(6).toString('hex')}.json`);
    const startedAt = Date.now();
    const content = JSON.stringify({ pid: process.pid, host: hostname(), command, startedAt });
    await writeFileAtomic(path, Buffer.from(content + '\n'));
    await fsyncDir(dir);
    return new WriterMarker(path, startedAt);
  }

  /** Start times of live writers; markers of dead local processes are removed. */
  async liveWriterStarts(): Promise<number[]> {
    const dir = join(this.dir, 'writers');
    const starts: number[] = [];
    for (const name of await readdirIfPresent(dir)) {
      if (!name.endsWith('.json')) continue;
      const path = join(dir, name);
      let parsed: { pid?: unknown; host?: unknown; startedAt?: unknown };
      try {
        parsed = JSON.parse(await fsp.readFile(path, 'utf8')) as typeof parsed;
      } catch {
        continue;
      }
      if (typeof parsed.pid !== 'number' || typeof parsed.startedAt !== 'number') continue;
      if (parsed.host === hostname() && !isProcessAlive(parsed.pid)) {
        await fsp.rm(path, { force: true });
        continue;
      }
      starts.push(parsed.startedAt);
    }
    return starts;
  }
}

export class RepositoryLock {
  constructor(readonly path: string) {}
  async release(): Promise<void> {
    await fsp.rm(this.path, { force: true });
  }
}

export class WriterMarker {
  constructor(
    readonly path: string,
    readonly startedAt: number,
  ) {}
  async release(): Promise<void> {
    await fsp.rm(this.path, { force: true });
  }
}

interface LockHolder {
  pid: number;
  host: string;
  command: string;
  since: string;
}

async function readLockHolder(path: string): Promise<LockHolder | null> {
  let text: string;
  try {
    text = await fsp.readFile(path, 'utf8');
  } catch {
    return null;
  }
  try {
    const v = JSON.parse(text) as Partial<LockHolder>;
    if (typeof v.pid !== 'number') throw new Error('no pid');
    return { pid: v.pid, host: String(v.host), command: String(v.command), since: String(v.since) };
  } catch {
    // A lock file being written right now is empty for an instant; an unparsable old one is stale.
    const st = await fsp.stat(path).catch(() => null);
    if (st === null || Date.now() - st.mtimeMs < 2000) return null;
    return { pid: 0, host: hostname(), command: 'unknown (unreadable lock file)', since: st.mtime.toISOString() };
  }
}

/** The names in `dir`, or none if it does not exist (any other error throws). */
export async function readdirIfPresent(dir: string): Promise<string[]> {
  try {
    return await fsp.readdir(dir);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return [];
    throw err;
  }
}

export function isProcessAlive(pid: number): boolean {
  if (!Number.isSafeInteger(pid) || pid <= 0) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errnoCode(err) === 'EPERM';
  }
}

/** Write `data` to `path` via a temporary file, fsync and rename (the caller fsyncs the directory). */
export async function writeFileAtomic(path: string, data: Buffer): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  const handle = await fsp.open(tmp, 'wx', 0o644);
  try {
    await handle.writeFile(data);
    await handle.datasync();
  } catch (err) {
    await handle.close().catch(() => undefined);
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await handle.close();
  try {
    await fsp.rename(tmp, path);
  } catch (err) {
    await fsp.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

/** Bump a file's times to now; false if it does not exist (any other error throws). */
export async function touchIfPresent(path: string): Promise<boolean> {
  const now = new Date();
  return fsp.utimes(path, now, now).then(
    () => true,
    (err: unknown) => {
      if (errnoCode(err) === 'ENOENT') return false;
      throw err;
    },
  );
}

/** Write `buffers` at `position` (one writev; a regular file takes it whole, a short write is finished). */
export async function writevFully(handle: FileHandle, buffers: readonly Buffer[], position = 0): Promise<void> {
  const size = buffers.reduce((n, b) => n + b.length, 0);
  let written = (await handle.writev(buffers, position)).bytesWritten;
  while (written < size) {
    const rest = Buffer.concat(buffers).subarray(written);
    written += (await handle.write(rest, 0, rest.length, position + written)).bytesWritten;
  }
}

export async function fsyncDir(dir: string): Promise<void> {
  const handle = await fsp.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
