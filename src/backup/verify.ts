/**
 * Verify a repository: read every index (checksum), then re-read every referenced chunk once
 * (CRC32, inflate, SHA-256) and report each bad one with the restore points it breaks.
 */
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { CorruptChunkError, RepositoryError } from './errors.js';
import { DIGEST_LENGTH, isZeroDigest } from './format.js';
import { readChunk, type BrokenIndex } from './reader.js';
import { Repository } from './repository.js';
import { runBounded } from './writer.js';

export interface ChunkProblem {
  readonly digest: string;
  readonly path: string;
  readonly reason: string;
  /** "vm/pointId" of every restore point referencing the chunk. */
  readonly points: string[];
}

export interface VerifyReport {
  readonly pointsChecked: number;
  readonly chunksChecked: number;
  readonly bytesChecked: number;
  readonly problems: ChunkProblem[];
  readonly brokenIndexes: BrokenIndex[];
  /** Pack files whose trailer cannot be read (packs repositories): their chunks are unusable. */
  readonly unreadablePacks: Array<{ readonly path: string; readonly reason: string }>;
  /** Restore points that cannot be read back in full ("vm/pointId"). */
  readonly brokenPoints: string[];
  readonly seconds: number;
}

export interface VerifyOptions {
  readonly vm?: string;
  readonly concurrency?: number;
  readonly logger?: Logger;
  readonly onProgress?: (done: number, total: number) => void;
}

export async function verifyRepository(repoDir: string, options: VerifyOptions = {}): Promise<VerifyReport> {
  const logger = options.logger ?? silentLogger();
  const started = performance.now();
  const repo = await Repository.open(repoDir);
  const vms = options.vm === undefined ? await repo.listVms() : [options.vm];
  if (options.vm !== undefined && (await repo.listPointIds(options.vm)).length === 0) {
    throw new RepositoryError(`VM "${options.vm}" has no restore points in ${repoDir}`);
  }
  const brokenIndexes: BrokenIndex[] = [];
  /** digest hex → { length, referencing points } */
  const chunks = new Map<string, { length: number; points: string[] }>();
  let pointsChecked = 0;
  for (const vm of vms) {
    for (const id of await repo.listPointIds(vm)) {
      let index;
      try {
        index = await repo.readIndex(vm, id);
      } catch (err) {
        brokenIndexes.push({ vm, id, reason: err instanceof Error ? err.message : String(err) });
        continue;
      }
      pointsChecked++;
      const name = `${vm}/${id}`;
      const { chunkSize, imageSize, chunkCount } = index.meta;
      for (let i = 0; i < chunkCount; i++) {
        const d = index.digests.subarray(i * DIGEST_LENGTH, (i + 1) * DIGEST_LENGTH);
        if (isZeroDigest(d)) continue;
        const hex = d.toString('hex');
        const entry = chunks.get(hex);
        if (entry === undefined) {
          chunks.set(hex, { length: Math.min(chunkSize, imageSize - i * chunkSize), points: [name] });
        } else if (entry.points[entry.points.length - 1] !== name) {
          entry.points.push(name);
        }
      }
    }
  }
  const list = [...chunks.entries()];
  const problems: ChunkProblem[] = [];
  let done = 0;
  let bytesChecked = 0;
  await runBounded(list.length, options.concurrency ?? 4, async (k) => {
    const [hex, { length, points }] = list[k]!;
    try {
      await readChunk(repo, Buffer.from(hex, 'hex'), length);
      bytesChecked += length;
    } catch (err) {
      if (!(err instanceof CorruptChunkError)) throw err;
      logger.warn({ digest: hex, reason: err.reason, path: err.path }, 'bad chunk');
      problems.push({ digest: hex, path: err.path ?? repo.dir, reason: err.reason, points: [...points] });
    }
    done++;
    options.onProgress?.(done, list.length);
  });
  if (repo.chunkStore === 'packs') await repo.packs.ensureLoaded();
  const unreadablePacks =
    repo.chunkStore === 'packs' ? [...repo.packs.unreadablePacks.entries()].map(([pack, reason]) => ({ path: repo.packs.packPath(pack), reason })) : [];
  problems.sort((a, b) => a.digest.localeCompare(b.digest));
  const brokenPoints = new Set<string>();
  for (const p of problems) for (const name of p.points) brokenPoints.add(name);
  for (const b of brokenIndexes) brokenPoints.add(`${b.vm}/${b.id}`);
  return {
    pointsChecked,
    chunksChecked: list.length,
    bytesChecked,
    problems,
    brokenIndexes,
    unreadablePacks,
    brokenPoints: [...brokenPoints].sort(),
    seconds: (performance.now() - started) / 1000,
  };
}
