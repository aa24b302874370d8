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
import { DIGEST_LENGTH, isZeroDigest } from './format.js';
import { Repository, errnoCode, fsyncDir } from './repository.js';
import { WriteSession } from './writer.js';

export interface PruneResult {
  readonly removed: string[];
  readonly kept: string[];
}

/** Delete all but the newest `keepLast` restore points of `vm` (indexes only; gc frees chunks). */
export async function pruneVm(repoDir: string, vm: string, keepLast: number, options: { dryRun?: boolean } = {}): Promise<PruneResult> {
  if (!Number.isSafeInteger(keepLast) || keepLast < 0) throw new RepositoryError(`--keep-last must be a non-negative integer, got ${keepLast}`);
  const repo = await Repository.open(repoDir);
  const session = await WriteSession.begin(repo, vm, 'prune');
  try {
    const ids = await repo.listPointIds(vm);
    if (ids.length === 0) throw new RepositoryError(`VM "${vm}" has no restore points in ${repoDir}`);
    const cut = Math.max(0, ids.length - keepLast);
    const removed = ids.slice(0, cut);
    const kept = ids.slice(cut);
    if (!options.dryRun) {
      for (const id of removed) await fsp.rm(repo.indexPath(vm, id), { force: true });
      if (removed.length > 0) await fsyncDir(repo.vmDir(vm));
    }
    return { removed, kept };
  } finally {
    await session.end();
  }
}

export interface GcOptions {
  /** Extra safety margin below the cutoff, in ms (default 5 minutes: clock steps, coarse mtimes). */
  readonly graceMs?: number;
  readonly dryRun?: boolean;
  readonly logger?: Logger;
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
        for (let off = 0; off < index.digests.length; off += DIGEST_LENGTH) {
          const d = index.digests.subarray(off, off + DIGEST_LENGTH);
          if (!isZeroDigest(d)) referenced.add(d.toString('hex'));
        }
      }
    }

    // Sweep.
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
        const aside = `${path}.gc-${process.pid}`;
        try {
          await fsp.rename(path, aside);
        } catch (err) {
          if (errnoCode(err) === 'ENOENT') continue;
          throw err;
        }
        const after = await fsp.stat(aside);
        if (after.mtimeMs >= cutoff) {
          // Adopted by a writer between our stat and the rename: put it back.
          await fsp.rename(aside, path);
          keptRecent++;
          continue;
        }
        await fsp.rm(aside, { force: true });
        removedChunks++;
        removedBytes += after.size;
        changed = true;
      }
      if (changed && !options.dryRun) await fsyncDir(dir);
    }
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
      chunkFiles,
      removedChunks,
      removedBytes,
      keptRecent,
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
