/**
 * Repository maintenance: prune (drop old restore points of a VM) and gc (mark & sweep of chunks).
 *
 * gc safety rule (documented in docs/repository-format.md):
 *  - gc takes `locks/gc.lock` (one gc at a time) and refuses to run if any index is unreadable
 *    (it could not know which chunks that index needs).
 *  - cutoff = min(gc start, start of the oldest live writer marker in `writers/`) − grace.
 *    Writers register their marker before touching any chunk, create new chunks after their start
 *    and bump the mtime of every existing chunk they adopt, so a chunk with mtime ≥ cutoff may be
 *    in use by a running writer and is kept.
 *  - An unreferenced chunk with mtime < cutoff is first renamed aside (atomic); if its mtime is
 *    then ≥ cutoff (a writer adopted it between our stat and the rename) it is put back, else it
 *    is deleted. A writer that finds the chunk gone (ENOENT on its mtime bump) writes it anew, and
 *    re-checks adopted chunks before publishing its index.
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { RepositoryError } from './errors.js';
import { describeHold, liveHolds } from './holds.js';
import { CHUNK_HEADER_SIZE, DIGEST_LENGTH, decodeIndex, isZeroDigest, type RestorePointIndex } from './format.js';
import { PackWriter, isPackTempName, statPack } from './packs.js';
import { Repository, errnoCode, fsyncDir, isProcessAlive, readdirIfPresent } from './repository.js';
import { WriteSession } from './writer.js';

export interface PruneResult {
  readonly removed: string[];
  readonly kept: string[];
  /** Older than the newest `keepLast` but kept: a mount uses them (they are also in `kept`). */
  readonly held: { id: string; by: string }[];
}

/**
 * Delete all but the newest `keepLast` restore points of `vm` (indexes only; gc frees chunks).
 * Restore points a mount holds (src/backup/holds.ts) are kept whatever their age.
 */
export async function pruneVm(repoDir: string, vm: string, keepLast: number, options: { dryRun?: boolean; holdsDir?: string } = {}): Promise<PruneResult> {
  if (!Number.isSafeInteger(keepLast) || keepLast < 0) throw new RepositoryError(`--keep-last must be a non-negative integer, got ${keepLast}`);
  const repo = await Repository.open(repoDir);
  const session = await WriteSession.begin(repo, vm, 'prune');
  try {
    await restoreInterruptedPrunes(repo, vm);
    const ids = await repo.listPointIds(vm);
    if (ids.length === 0) throw new RepositoryError(`VM "${vm}" has no restore points in ${repoDir}`);
    const cut = Math.max(0, ids.length - keepLast);
    const holdersOf = async (): Promise<Map<string, string>> => {
      const holders = new Map<string, string>();
      for (const hold of await liveHolds(repoDir, options.holdsDir)) {
        if (hold.vm === vm && !holders.has(hold.point)) holders.set(hold.point, describeHold(hold));
      }
      return holders;
    };
    const holders = await holdersOf();
    const removed = ids.slice(0, cut).filter((id) => !holders.has(id));
    const held = ids.slice(0, cut).flatMap((id) => (holders.has(id) ? [{ id, by: holders.get(id)! }] : []));
    if (!options.dryRun && removed.length > 0) {
      // A mount may place its hold between our look at the holds and the delete: move the indexes
      // aside (gc still marks them there), look again, and put back what is held now.
      const aside = (id: string): string => `${repo.indexPath(vm, id)}${PRUNING}${process.pid}`;
      for (const id of removed) await fsp.rename(repo.indexPath(vm, id), aside(id));
      const heldNow = await holdersOf();
      for (const id of [...removed]) {
        if (heldNow.has(id)) {
          await fsp.rename(aside(id), repo.indexPath(vm, id));
          removed.splice(removed.indexOf(id), 1);
          held.push({ id, by: heldNow.get(id)! });
        } else {
          await fsp.rm(aside(id), { force: true });
        }
      }
      await fsyncDir(repo.vmDir(vm));
    }
    const kept = ids.filter((id) => !removed.includes(id));
    held.sort((a, b) => a.id.localeCompare(b.id));
    return { removed, kept, held };
  } finally {
    await session.end();
  }
}

/** Suffix of an index that prune has moved aside while it re-checks the holds: `<id>.index.pruning-<pid>`. */
const PRUNING = '.pruning-';
const PRUNING_RE = /^([^/]+\.index)\.pruning-(\d+)$/;

/** Indexes a prune moved aside and never finished with (it died): put back, the next prune decides again. */
async function restoreInterruptedPrunes(repo: Repository, vm: string): Promise<void> {
  const dir = repo.vmDir(vm);
  for (const name of await readdirIfPresent(dir)) {
    const m = PRUNING_RE.exec(name);
    if (!m || isProcessAlive(Number(m[2]))) continue;
    const target = join(dir, m[1]!);
    if (await fsp.stat(target).then(() => true, () => false)) await fsp.rm(join(dir, name), { force: true });
    else await fsp.rename(join(dir, name), target);
  }
}

export interface GcOptions {
  /** Extra safety margin below the cutoff, in ms (default 5 minutes: clock steps, coarse mtimes). */
  readonly graceMs?: number;
  readonly dryRun?: boolean;
  readonly logger?: Logger;
  /** Where mounts record their holds (default: holdsDir()). */
  readonly holdsDir?: string;
}

export interface GcResult {
  readonly indexes: number;
  readonly referencedChunks: number;
  readonly chunkFiles: number;
  readonly removedChunks: number;
  readonly removedBytes: number;
  /** Unreferenced chunks kept because they are newer than the cutoff. */
  readonly keptRecent: number;
  readonly removedTempFiles: number;
  /** "packs" repositories: what happened to the pack files. */
  readonly packs?: PackSweep;
  readonly cutoff: string;
  readonly seconds: number;
}

const CHUNK_NAME_RE = /^[0-9a-f]{64}$/;
const TEMP_RE = /\.tmp-\d+-[0-9a-f]+$|\.gc-\d+$/;

export async function collectGarbage(repoDir: string, options: GcOptions = {}): Promise<GcResult> {
  const logger = options.logger ?? silentLogger();
  const started = Date.now();
  const t0 = performance.now();
  const repo = await Repository.open(repoDir);
  const lock = await repo.lock('gc', 'gc');
  try {
    // Cutoff first: writers starting later only create or bump chunks after this instant.
    const writerStarts = await repo.liveWriterStarts();
    const cutoff = Math.min(started, ...writerStarts) - (options.graceMs ?? 5 * 60_000);

    // Mark.
    const referenced = new Set<string>();
    const marked = new Set<string>();
    const markIndex = (index: RestorePointIndex): void => {
      for (let off = 0; off < index.digests.length; off += DIGEST_LENGTH) {
        const d = index.digests.subarray(off, off + DIGEST_LENGTH);
        if (!isZeroDigest(d)) referenced.add(d.toString('hex'));
      }
    };
    let indexes = 0;
    for (const vm of await repo.listVms()) {
      for (const id of await repo.listPointIds(vm)) {
        let index;
        try {
          index = await repo.readIndex(vm, id);
        } catch (err) {
          throw new RepositoryError(
            `gc refused: ${err instanceof Error ? err.message : String(err)}; fix or remove that index first (nothing was deleted)`,
          );
        }
        indexes++;
        marked.add(`${vm}/${id}`);
        markIndex(index);
      }
      // Indexes a running prune has moved aside while it re-checks the holds: it may put them back.
      for (const name of await readdirIfPresent(repo.vmDir(vm))) {
        const m = PRUNING_RE.exec(name);
        if (!m) continue;
        const path = join(repo.vmDir(vm), name);
        const file = await fsp.readFile(path).catch(() => null);
        if (file === null) continue; // finished meanwhile: put back (then listed above) or deleted
        markIndex(decodeIndex(file, path));
        marked.add(`${vm}/${m[1]!.slice(0, -'.index'.length)}`);
      }
    }

    // A mounted restore point whose index gc did not see still reads its chunks: gc cannot know them.
    // (Checked after marking: a mount that places its hold later opens an index that was marked.)
    for (const hold of await liveHolds(repoDir, options.holdsDir)) {
      if (!marked.has(`${hold.vm}/${hold.point}`)) {
        throw new RepositoryError(
          `gc refused: restore point ${hold.vm}@${hold.point} is used by ${describeHold(hold)} but its index is gone, ` +
            `so gc cannot tell which chunks it reads; commit or unmount (--discard) that mount first ` +
            `(hold file ${hold.file}; nothing was deleted)`,
        );
      }
    }

    // Sweep.
    const sweep =
      repo.chunkStore === 'packs'
        ? await sweepPacks(repo, referenced, cutoff, options)
        : await sweepChunkFiles(repo, referenced, cutoff, options);
    let { removedTempFiles } = sweep;
    // Temporary index files of writers that died (their restore point was never published).
    for (const vm of await repo.listVms()) {
      const vmDir = repo.vmDir(vm);
      for (const name of await fsp.readdir(vmDir)) {
        if (!TEMP_RE.test(name)) continue;
        const st = await fsp.stat(join(vmDir, name)).catch(() => null);
        if (st === null || st.mtimeMs >= cutoff) continue;
        if (!options.dryRun) await fsp.rm(join(vmDir, name), { force: true });
        removedTempFiles++;
      }
    }
    const result: GcResult = {
      indexes,
      referencedChunks: referenced.size,
      ...sweep,
      removedTempFiles,
      cutoff: new Date(cutoff).toISOString(),
      seconds: (performance.now() - t0) / 1000,
    };
    logger.info(result, 'gc finished');
    return result;
  } finally {
    await lock.release();
  }
}

/** What a sweep of chunk files or packs reports: its part of the gc result. */
type SweepResult = Pick<GcResult, 'chunkFiles' | 'removedChunks' | 'removedBytes' | 'keptRecent' | 'removedTempFiles' | 'packs'>;

/** Sweep of a "files" repository: each unreferenced chunk file older than the cutoff goes. */
async function sweepChunkFiles(repo: Repository, referenced: ReadonlySet<string>, cutoff: number, options: GcOptions): Promise<SweepResult> {
  let chunkFiles = 0;
  let removedChunks = 0;
  let removedBytes = 0;
  let keptRecent = 0;
  let removedTempFiles = 0;
  const chunksDir = join(repo.dir, 'chunks');
  const prefixes = await fsp.readdir(chunksDir).catch((err: unknown) => {
    if (errnoCode(err) === 'ENOENT') return [] as string[];
    throw err;
  });
  for (const prefix of prefixes.sort()) {
    if (!repo.isChunkPrefix(prefix)) continue;
    const dir = join(chunksDir, prefix);
    let changed = false;
    for (const name of await fsp.readdir(dir)) {
      const path = join(dir, name);
      if (TEMP_RE.test(name)) {
        const st = await fsp.stat(path).catch(() => null);
        if (st !== null && st.mtimeMs < cutoff) {
          if (!options.dryRun) await fsp.rm(path, { force: true });
          removedTempFiles++;
          changed = true;
        }
        continue;
      }
      if (!CHUNK_NAME_RE.test(name)) continue;
      chunkFiles++;
      if (referenced.has(name)) continue;
      const st = await fsp.stat(path).catch(() => null);
      if (st === null) continue;
      if (st.mtimeMs >= cutoff) {
        keptRecent++;
        continue;
      }
      if (options.dryRun) {
        removedChunks++;
        removedBytes += st.size;
        continue;
      }
      const outcome = await removeUnlessAdopted(path, cutoff);
      if (outcome === 'gone') continue;
      if (outcome === 'adopted') {
        keptRecent++;
        continue;
      }
      removedChunks++;
      removedBytes += outcome.size;
      changed = true;
    }
    if (changed && !options.dryRun) await fsyncDir(dir);
  }
  return { chunkFiles, removedChunks, removedBytes, keptRecent, removedTempFiles };
}

/**
 * Remove `path` unless a writer adopts it meanwhile: rename it aside (atomic), then look at its
 * mtime again; a writer that bumped it after our first stat (≥ cutoff) gets it back.
 */
async function removeUnlessAdopted(path: string, cutoff: number): Promise<'gone' | 'adopted' | { size: number }> {
  const aside = `${path}.gc-${process.pid}`;
  try {
    await fsp.rename(path, aside);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return 'gone';
    throw err;
  }
  const after = await fsp.stat(aside);
  if (after.mtimeMs >= cutoff) {
    await fsp.rename(aside, path);
    return 'adopted';
  }
  await fsp.rm(aside, { force: true });
  return { size: after.size };
}

export interface PackSweep {
  readonly packs: number;
  /** Packs deleted because no index references any of their chunks. */
  readonly removedPacks: number;
  /** Packs rewritten without their unreferenced chunks (at least REPACK_DEAD_FRACTION of their bytes). */
  readonly repackedPacks: number;
  /** Unreferenced chunks left in packs that are mostly referenced (below the repack threshold). */
  readonly keptUnreferenced: number;
  /** Packs whose trailer cannot be read: left alone (`verify` names them). */
  readonly unreadablePacks: number;
}

/** A pack is rewritten when at least this share of its bytes belongs to unreferenced chunks. */
export const REPACK_DEAD_FRACTION = 0.2;

/**
 * Sweep of a "packs" repository. A pack with unreferenced chunks and an mtime below the cutoff
 * is deleted if nothing in it is referenced, or rewritten when ≥ REPACK_DEAD_FRACTION of its bytes
 * are unreferenced: its referenced records are copied verbatim into a new pack, which is durable
 * (and registered) before the old pack is removed with the same rename-and-recheck as chunk files.
 * Readers that miss a chunk rescan the packs and find it in the new pack.
 */
async function sweepPacks(repo: Repository, referenced: ReadonlySet<string>, cutoff: number, options: GcOptions): Promise<SweepResult> {
  const store = repo.packs;
  await store.refresh();
  let chunkFiles = 0;
  let removedChunks = 0;
  let removedBytes = 0;
  let keptRecent = 0;
  let removedTempFiles = 0;
  let removedPacks = 0;
  let repackedPacks = 0;
  let keptUnreferenced = 0;
  const changedDirs = new Set<string>();

  // Temporary files of writers (or gcs) that died.
  const prefixes = await fsp.readdir(store.dir).catch((err: unknown) => {
    if (errnoCode(err) === 'ENOENT') return [] as string[];
    throw err;
  });
  for (const prefix of prefixes) {
    const dir = join(store.dir, prefix);
    const names = await fsp.readdir(dir).catch(() => [] as string[]);
    for (const name of names) {
      if (!isPackTempName(name)) continue;
      const st = await fsp.stat(join(dir, name)).catch(() => null);
      if (st === null || st.mtimeMs >= cutoff) continue;
      if (!options.dryRun) await fsp.rm(join(dir, name), { force: true });
      removedTempFiles++;
      changedDirs.add(dir);
    }
  }

  const packs = store.packs();
  for (const [pack, entries] of packs) {
    chunkFiles += entries.length;
    const dead = entries.filter((e) => !referenced.has(e.digestHex));
    if (dead.length === 0) continue;
    const st = await statPack(store, pack);
    if (st === null) continue;
    if (st.mtimeMs >= cutoff) {
      keptRecent += dead.length;
      continue;
    }
    const deadBytes = dead.reduce((n, e) => n + e.length, 0);
    const live = entries.filter((e) => referenced.has(e.digestHex));
    if (live.length > 0 && deadBytes < REPACK_DEAD_FRACTION * st.size) {
      keptUnreferenced += dead.length;
      continue;
    }
    if (options.dryRun) {
      removedChunks += dead.length;
      removedBytes += deadBytes;
      if (live.length > 0) repackedPacks++;
      else removedPacks++;
      continue;
    }
    if (live.length > 0) {
      // Copy the referenced records that no other pack holds, verbatim, into a new durable pack.
      const writer = new PackWriter(store, (dir) => changedDirs.add(dir));
      try {
        const toCopy = live.filter((e) => {
          const elsewhere = store.lookup(e.digestHex);
          return elsewhere === undefined || elsewhere.pack === pack;
        });
        const records = await store.readRecords(pack, toCopy);
        for (const [k, e] of toCopy.entries()) {
          const record = records[k]!;
          await writer.add(e.digestHex, record.subarray(0, CHUNK_HEADER_SIZE), record.subarray(CHUNK_HEADER_SIZE));
        }
        await writer.flush();
      } catch (err) {
        await writer.abort();
        throw err;
      }
      for (const dir of changedDirs) await fsyncDir(dir);
      await fsyncDir(store.dir);
    }
    const outcome = await removeUnlessAdopted(store.packPath(pack), cutoff);
    if (outcome === 'gone') continue;
    if (outcome === 'adopted') {
      keptRecent += dead.length;
      continue;
    }
    store.forgetPack(pack);
    changedDirs.add(join(store.packPath(pack), '..'));
    removedChunks += dead.length;
    removedBytes += deadBytes;
    if (live.length > 0) repackedPacks++;
    else removedPacks++;
  }
  if (!options.dryRun) for (const dir of changedDirs) await fsyncDir(dir);
  return {
    chunkFiles,
    removedChunks,
    removedBytes,
    keptRecent,
    removedTempFiles,
    packs: { packs: packs.length, removedPacks, repackedPacks, keptUnreferenced, unreadablePacks: store.unreadablePacks.size },
  };
}
