import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { CorruptChunkError, RepositoryError, SourceError } from '../../../src/backup/errors.js';
import { exportRestorePoint } from '../../../src/backup/export.js';
import { collectGarbage, pruneVm } from '../../../src/backup/maintenance.js';
import { listRestorePoints, listRestorePointsDetailed, openRestorePoint } from '../../../src/backup/reader.js';
import { RawSource } from '../../../src/backup/sources/raw.js';
import { verifyRepository } from '../../../src/backup/verify.js';
import { writeRestorePoint, type ChunkContent } from '../../../src/backup/writer.js';
import { silentLogger } from '../../../src/log.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { chunkStoreFiles, corruptChunk, listStoredChunks } from '../../helpers/chunk-store.js';
import { readWholePoint } from '../../helpers/repo.js';
import { freshDirPerTest } from '../../helpers/per-test-dir.js';

const CHUNK = 64 * 1024;

let dir: string;
let repo: string;
freshDirPerTest('backup-unit', (path) => {
  dir = path;
  repo = join(dir, 'repo');
});

/** 40 chunks of 64 KiB + 1000 bytes: random, zero, text and repeated regions. */
function sampleImage(): Buffer {
  const img = Buffer.alloc(40 * CHUNK + 1000);
  pseudoRandomBytes(10 * CHUNK, 1).copy(img, 0); // chunks 0..9 random
  // chunks 10..19 zero
  Buffer.from('log line: all is well\n'.repeat(30_000)).copy(img, 20 * CHUNK, 0, 10 * CHUNK); // 20..29 text
  const block = pseudoRandomBytes(CHUNK, 2);
  for (let c = 30; c < 40; c++) block.copy(img, c * CHUNK); // 30..39 the same block ten times
  pseudoRandomBytes(1000, 3).copy(img, 40 * CHUNK); // short last chunk
  return img;
}

const readAll = (vm: string, id: string): Promise<Buffer> => readWholePoint(repo, vm, id);

describe('full backup and reader', () => {
  it('round-trips a raw file byte for byte; zero chunks cost no file; repeated chunks are stored once', async () => {
    const img = sampleImage();
    const path = join(dir, 'disk.raw');
    await fsp.writeFile(path, img);
    const source = await RawSource.open(path);
    const result = await backupSource(repo, source, { vm: 'vm1', chunkSize: CHUNK, logger: silentLogger() });
    await source.close();
    expect(result.repositoryCreated).toBe(true);
    expect(result.mode).toBe('full');
    expect(result.stats.chunks).toBe(41);
    expect(result.stats.zeroChunks).toBe(10);
    // 10 random + 10 text (the text repeats with period 22 bytes, so its chunks differ) + 1 repeated + last = 22
    expect(result.stats.newChunks).toBe(22);
    expect(result.stats.dedupChunks).toBe(9);
    expect(await listStoredChunks(repo)).toHaveLength(22);

    const reader = await openRestorePoint(repo, 'vm1', 'latest');
    expect(reader.info.id).toBe(result.info.id);
    expect(reader.imageSize).toBe(img.length);
    expect(reader.chunkDigest(15)).toBeNull();
    expect(reader.chunkLength(40)).toBe(1000);
    expect((await reader.read(0, img.length)).equals(img)).toBe(true);
    // Unaligned reads across chunk boundaries, including the zero region and the short tail.
    for (const [off, len] of [[CHUNK - 7, 20], [9 * CHUNK + 100, 3 * CHUNK], [40 * CHUNK - 5, 1005], [12345, 0]] as const) {
      expect((await reader.read(off, len)).equals(img.subarray(off, off + len))).toBe(true);
    }
    expect((await reader.loadChunk(31)).equals(img.subarray(31 * CHUNK, 32 * CHUNK))).toBe(true);
    await expect(reader.read(img.length - 1, 2)).rejects.toThrow(RangeError);
    await reader.close();
  });

  it('exports an identical, sparse raw image', async () => {
    const img = sampleImage();
    await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const out = join(dir, 'export.raw');
    const res = await exportRestorePoint(repo, 'vm1', 'latest', out);
    expect(res.zeroChunksSkipped).toBe(10);
    expect((await fsp.readFile(out)).equals(img)).toBe(true);
    const st = await fsp.stat(out);
    expect(st.size).toBe(img.length);
    expect(st.blocks * 512).toBeLessThanOrEqual(img.length - 10 * CHUNK + 4096);
    await expect(exportRestorePoint(repo, 'vm1', 'latest', out)).rejects.toThrow(/already exists/);
  });

  it('reads zero-range hints without reading those chunks', async () => {
    const img = sampleImage();
    const source = new BufferSource(img, 'hinted', [{ offset: 10 * CHUNK, length: 10 * CHUNK }]);
    const result = await backupSource(repo, source, { vm: 'vm1', chunkSize: CHUNK });
    expect(result.stats.zeroChunks).toBe(10);
    expect(result.stats.bytesRead).toBe(img.length - 10 * CHUNK);
    expect(source.reads.some((r) => r.offset >= 10 * CHUNK && r.offset < 20 * CHUNK)).toBe(false);
    expect((await readAll('vm1', result.info.id)).equals(img)).toBe(true);
  });
});

describe('incremental backups', () => {
  /** Changes bytes in chunks 3, 17 (zero before), 25 and 40 (the short tail). */
  function modify(img: Buffer): { changed: Buffer; ranges: Array<{ offset: number; length: number }> } {
    const changed = Buffer.from(img);
    const ranges = [
      { offset: 3 * CHUNK + 100, length: 10 },
      { offset: 17 * CHUNK + 4096, length: 512 },
      { offset: 25 * CHUNK, length: 1 },
      { offset: 40 * CHUNK + 999, length: 1 },
    ];
    for (const r of ranges) for (let i = 0; i < r.length; i++) changed[r.offset + i] = (changed[r.offset + i]! + 1 + i) & 0xff;
    return { changed, ranges };
  }

  it('adds exactly the changed chunks and both points read back exactly', async () => {
    const img = sampleImage();
    const first = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const before = (await listStoredChunks(repo)).length;
    const { changed } = modify(img);
    const second = await backupSource(repo, new BufferSource(changed), { vm: 'vm1' });
    expect(second.mode).toBe('incremental');
    expect(second.info.parent).toBe(first.info.id);
    expect(second.info.chunkSize).toBe(CHUNK); // kept from the first backup
    expect(second.stats.newChunks).toBe(4);
    expect((await listStoredChunks(repo)).length - before).toBe(4);
    expect(second.stats.unchangedChunks).toBe(41 - 4 - 9); // 9 zero chunks remain
    expect((await readAll('vm1', first.info.id)).equals(img)).toBe(true);
    expect((await readAll('vm1', second.info.id)).equals(changed)).toBe(true);
  });

  it('with changed blocks reads only the listed ranges and still adds exactly the changed chunks', async () => {
    const img = sampleImage();
    const first = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const before = (await listStoredChunks(repo)).length;
    const { changed, ranges } = modify(img);
    const source = new BufferSource(changed);
    const second = await backupSource(repo, source, { vm: 'vm1', changedBlocks: ranges });
    expect(second.mode).toBe('changed-blocks');
    expect(source.reads.map((r) => r.offset / CHUNK).sort((a, b) => a - b)).toEqual([3, 17, 25, 40]);
    expect(second.stats.parentChunks).toBe(41 - 4 - 9); // chunk 17 was zero and changed: 9 zero chunks remain
    expect(second.stats.zeroChunks).toBe(9);
    expect(second.stats.newChunks).toBe(4);
    expect((await listStoredChunks(repo)).length - before).toBe(4);
    expect((await readAll('vm1', first.info.id)).equals(img)).toBe(true);
    expect((await readAll('vm1', second.info.id)).equals(changed)).toBe(true);
  });

  it('refuses changed blocks without a parent, after a size change, and a different chunk size', async () => {
    const img = sampleImage();
    await expect(
      backupSource(repo, new BufferSource(img), { vm: 'vm1', changedBlocks: [{ offset: 0, length: 1 }] }),
    ).rejects.toThrow(/has none/);
    await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const bigger = Buffer.concat([img, Buffer.alloc(CHUNK)]);
    const err = await backupSource(repo, new BufferSource(bigger, 'bigger'), { vm: 'vm1', changedBlocks: [] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SourceError);
    expect(String(err)).toMatch(/image size changed from 2622440 .* to 2687976/);
    await expect(backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: 4 * CHUNK })).rejects.toThrow(/cannot change it/);
    expect(await listRestorePoints(repo, 'vm1')).toHaveLength(1);
    // Nothing was left locked by the failures.
    await expect(backupSource(repo, new BufferSource(img), { vm: 'vm1' })).resolves.toBeDefined();
  });
});

describe('writeRestorePoint (base + replacement chunks, as commit uses it)', () => {
  it('creates a point from a parent where only replaced chunks are new', async () => {
    const img = sampleImage();
    const base = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const before = (await listStoredChunks(repo)).length;
    const replacement = pseudoRandomBytes(CHUNK, 99);
    const expected = Buffer.from(img);
    replacement.copy(expected, 5 * CHUNK);
    expected.fill(0, 6 * CHUNK, 7 * CHUNK);
    const result = await writeRestorePoint(repo, {
      vm: 'vm1',
      parent: base.info.id,
      imageSize: img.length,
      chunkSize: CHUNK,
      source: 'commit of test',
      chunkContent: async (i): Promise<ChunkContent> => (i === 5 ? replacement : i === 6 ? 'zero' : 'parent'),
    });
    expect(result.stats.newChunks).toBe(1);
    expect(result.stats.bytesRead).toBe(CHUNK);
    expect((await listStoredChunks(repo)).length - before).toBe(1);
    expect(result.info.parent).toBe(base.info.id);
    expect((await readAll('vm1', result.info.id)).equals(expected)).toBe(true);
    expect((await readAll('vm1', base.info.id)).equals(img)).toBe(true);
  });

  it('rejects content of the wrong length and publishes nothing', async () => {
    const img = sampleImage();
    const base = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    await expect(
      writeRestorePoint(repo, {
        vm: 'vm1',
        parent: base.info.id,
        imageSize: img.length,
        chunkSize: CHUNK,
        source: 'bad',
        chunkContent: async (i) => (i === 2 ? Buffer.alloc(10, 1) : 'parent'),
      }),
    ).rejects.toThrow(/got 10 bytes/);
    expect(await listRestorePoints(repo, 'vm1')).toHaveLength(1);
  });
});

describe.each(['packs', 'files'] as const)('corruption (%s store)', (chunkStore) => {
  it('verify names a flipped chunk and its restore points; the reader throws CorruptChunkError, never data', async () => {
    const img = sampleImage();
    const p1 = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK, chunkStore });
    const p2 = await backupSource(repo, new BufferSource(img), { vm: 'vm1' });
    await backupSource(repo, new BufferSource(pseudoRandomBytes(4 * CHUNK, 50)), { vm: 'other', chunkSize: CHUNK });
    expect((await verifyRepository(repo)).problems).toEqual([]);

    const reader = await openRestorePoint(repo, 'vm1', p1.info.id);
    // Read it once first: a pack's read handle is pooled, the damage must be seen through it all the same.
    expect((await reader.loadChunk(4)).equals(img.subarray(4 * CHUNK, 5 * CHUNK))).toBe(true);
    const digest = reader.chunkDigest(4)!.toString('hex');
    const damaged = await corruptChunk(repo, digest, undefined);
    expect(damaged.store).toBe(chunkStore);
    const { path } = damaged;
    if (chunkStore === 'files') {
      expect(damaged.reportedPath).toBe(join(repo, 'chunks', digest.slice(0, 2), digest));
    } else {
      expect(damaged.reportedPath).toMatch(/\/packs\/[0-9a-f]{2}\/[0-9a-f]{32}\.pack@\d+$/);
      expect(damaged.reportedPath).toBe(`${path}@${damaged.offset}`);
    }

    const report = await verifyRepository(repo);
    expect(report.problems).toHaveLength(1);
    expect(report.problems[0]!.digest).toBe(digest);
    expect(report.problems[0]!.path).toBe(damaged.reportedPath);
    expect(report.problems[0]!.reason).toMatch(/CRC32/);
    expect(report.problems[0]!.points).toEqual([`vm1/${p1.info.id}`, `vm1/${p2.info.id}`]);
    expect(report.brokenPoints).toEqual([`vm1/${p1.info.id}`, `vm1/${p2.info.id}`]);
    expect((await verifyRepository(repo, { vm: 'other' })).problems).toEqual([]);

    const err = await reader.loadChunk(4).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptChunkError);
    expect((err as CorruptChunkError).kind).toBe('medium-error');
    await expect(reader.read(4 * CHUNK + 10, 10)).rejects.toBeInstanceOf(CorruptChunkError);
    expect((await reader.read(0, 4 * CHUNK)).equals(img.subarray(0, 4 * CHUNK))).toBe(true);
    await damaged.restore();
    expect((await reader.loadChunk(4)).equals(img.subarray(4 * CHUNK, 5 * CHUNK))).toBe(true);
    expect((await verifyRepository(repo)).problems).toEqual([]);

    // The file that holds the chunk disappears (for packs: with every other chunk of that pack).
    await fsp.rm(path);
    // A reader that has the pack open may go on reading the unlinked file (POSIX): right bytes or
    // "missing", never other data. A reader opened now finds no pack holding the chunk.
    const stale = await reader.loadChunk(4).catch((e: unknown) => e);
    if (Buffer.isBuffer(stale)) expect(chunkStore === 'packs' && stale.equals(img.subarray(4 * CHUNK, 5 * CHUNK))).toBe(true);
    else expect(String(stale)).toMatch(/missing/);
    const fresh = await openRestorePoint(repo, 'vm1', p1.info.id);
    const gone = await fresh.loadChunk(4).catch((e: unknown) => e);
    expect(gone).toBeInstanceOf(CorruptChunkError);
    expect((gone as CorruptChunkError).reason).toMatch(chunkStore === 'packs' ? /chunk is missing \(no readable pack holds it\)/ : /chunk file is missing/);
    await fresh.close();
    const missing = (await verifyRepository(repo)).problems;
    expect(missing.map((p) => p.digest)).toContain(digest);
    for (const p of missing) expect(p.reason).toMatch(/missing/);
    if (chunkStore === 'files') expect(missing).toHaveLength(1);
    await reader.close();
  });
});

describe('damaged index', () => {

  it('a damaged index is reported by name and list/open/gc refuse it without losing anything', async () => {
    const img = sampleImage();
    const p1 = await backupSource(repo, new BufferSource(img), { vm: 'vm1', chunkSize: CHUNK });
    const indexPath = join(repo, 'vms', 'vm1', `${p1.info.id}.index`);
    const file = await fsp.readFile(indexPath);
    file[40]! ^= 1;
    await fsp.writeFile(indexPath, file);
    const listing = await listRestorePointsDetailed(repo);
    expect(listing.broken[0]!.reason).toContain(indexPath);
    await expect(openRestorePoint(repo, 'vm1', p1.info.id)).rejects.toThrow(/checksum mismatch/);
    const before = (await listStoredChunks(repo)).length;
    await expect(collectGarbage(repo, { graceMs: 0 })).rejects.toThrow(/gc refused/);
    expect((await listStoredChunks(repo)).length).toBe(before);
    expect((await verifyRepository(repo)).brokenIndexes).toHaveLength(1);
  });
});

describe('repository errors, locks, prune and gc', () => {
  it('names the path of a missing repository and of a missing restore point', async () => {
    await expect(openRestorePoint(join(dir, 'nope'), 'vm1', 'latest')).rejects.toThrow(/no repository at .*nope: .*repo.json does not exist/);
    await backupSource(repo, new BufferSource(sampleImage()), { vm: 'vm1', chunkSize: CHUNK });
    await expect(openRestorePoint(repo, 'vm1', '2020-01-01T00-00-00.000Z')).rejects.toThrow(RepositoryError);
    await expect(openRestorePoint(repo, 'vm2', 'latest')).rejects.toThrow(/has no restore points/);
    await expect(openRestorePoint(repo, '../etc', 'latest')).rejects.toThrow(/invalid VM name/);
  });

  it('a live lock holder blocks a second writer; a dead one is detected as stale', async () => {
    await backupSource(repo, new BufferSource(sampleImage()), { vm: 'vm1', chunkSize: CHUNK });
    const lockPath = join(repo, 'locks', 'vm-vm1.lock');
    // A live holder: this very process (pid alive).
    await fsp.writeFile(lockPath, JSON.stringify({ pid: process.pid, host: (await import('node:os')).hostname(), command: 'backup', since: 'x' }));
    await expect(backupSource(repo, new BufferSource(sampleImage()), { vm: 'vm1' })).rejects.toThrow(/is locked .*backup by pid/);
    // A dead holder: a pid that exited.
    const { spawnSync } = await import('node:child_process');
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
    await fsp.writeFile(lockPath, JSON.stringify({ pid: Number(dead.stdout), host: (await import('node:os')).hostname(), command: 'backup', since: 'x' }));
    const res = await backupSource(repo, new BufferSource(sampleImage()), { vm: 'vm1' });
    expect(res.mode).toBe('incremental');
    await expect(fsp.stat(lockPath)).rejects.toThrow(/ENOENT/);
  });

  it('prune keeps the newest points; gc frees exactly the unreferenced chunks and respects writers and grace', async () => {
    const a = pseudoRandomBytes(8 * CHUNK, 11);
    const b = Buffer.from(a);
    pseudoRandomBytes(2 * CHUNK, 12).copy(b, 0); // chunks 0,1 differ
    const p1 = await backupSource(repo, new BufferSource(a), { vm: 'vm1', chunkSize: CHUNK });
    const p2 = await backupSource(repo, new BufferSource(b), { vm: 'vm1' });
    expect((await listStoredChunks(repo)).length).toBe(10);
    const pr = await pruneVm(repo, 'vm1', 1);
    expect(pr.removed).toEqual([p1.info.id]);
    expect(pr.kept).toEqual([p2.info.id]);

    // Default grace (5 min): freshly written chunks are kept.
    expect((await collectGarbage(repo)).removedChunks).toBe(0);
    // A live writer that started before the chunks were written protects them too.
    const { Repository } = await import('../../../src/backup/repository.js');
    const r = await Repository.open(repo);
    const marker = await r.registerWriter('test');
    const old = new Date(Date.now() - 3_600_000);
    for (const f of await chunkStoreFiles(repo)) await fsp.utimes(f, old, old);
    await fsp.writeFile(marker.path, JSON.stringify({ pid: process.pid, host: (await import('node:os')).hostname(), startedAt: Date.now() - 7_200_000 }));
    expect((await collectGarbage(repo, { graceMs: 0 })).removedChunks).toBe(0);
    await marker.release();

    const gc = await collectGarbage(repo, { graceMs: 0 });
    expect(gc.removedChunks).toBe(2);
    expect(gc.referencedChunks).toBe(8);
    // Packs (the default store): p1's pack lost 2 of its 8 chunks (25 % of its bytes), so it is rewritten.
    expect(gc.packs).toEqual({ packs: 2, removedPacks: 0, repackedPacks: 1, keptUnreferenced: 0, unreadablePacks: 0 });
    expect((await listStoredChunks(repo)).length).toBe(8);
    expect((await verifyRepository(repo)).problems).toEqual([]);
    expect((await readAll('vm1', p2.info.id)).equals(b)).toBe(true);
    await expect(pruneVm(repo, 'vm1', -1)).rejects.toThrow(/non-negative/);
  });
});

describe.each(['packs', 'files'] as const)('gc beside a running backup (%s store)', (chunkStore) => {
  it('never deletes a chunk that a concurrent backup adopts (orphaned, old chunks; grace 0)', async () => {
    const img = pseudoRandomBytes(64 * CHUNK, 77);
    for (let round = 0; round < 4; round++) {
      const vmA = `a${round}`;
      await backupSource(repo, new BufferSource(img), { vm: vmA, chunkSize: CHUNK, chunkStore });
      await pruneVm(repo, vmA, 0); // every chunk is now unreferenced...
      const old = new Date(Date.now() - 3_600_000);
      for (const f of await chunkStoreFiles(repo)) await fsp.utimes(f, old, old); // ...and old
      const vmB = `b${round}`;
      // Start both at once: their fs calls interleave on libuv's pool.
      const [b, gc] = await Promise.all([
        backupSource(repo, new BufferSource(img), { vm: vmB, chunkSize: CHUNK, concurrency: 4 }),
        (async () => {
          await new Promise((r) => setTimeout(r, round * 3));
          return collectGarbage(repo, { graceMs: 0 });
        })(),
      ]);
      expect(b.stats.newChunks + b.stats.dedupChunks).toBe(64);
      expect(gc.removedChunks).toBeLessThanOrEqual(64);
      const report = await verifyRepository(repo, { vm: vmB });
      expect(report.problems).toEqual([]);
      expect((await readAll(vmB, b.info.id)).equals(img)).toBe(true);
      await pruneVm(repo, vmB, 0);
    }
  });
});

describe('chunk directory layout', () => {
  it('new "files" repositories use 2-digit chunk directories; a repository of the first layout (4 digits) keeps working', async () => {
    const img = sampleImage();
    await backupSource(repo, new BufferSource(img), { vm: 'a', chunkSize: CHUNK, chunkStore: 'files', logger: silentLogger() });
    const marker = JSON.parse(await fsp.readFile(join(repo, 'repo.json'), 'utf8')) as Record<string, unknown>;
    expect(marker.chunkStore).toBe('files');
    expect(marker.chunkPrefixLength).toBe(2);
    for (const f of await chunkStoreFiles(repo)) expect(f.split('/').at(-2)).toHaveLength(2);

    // Turn it into the first layout: no chunkPrefixLength in repo.json, chunks/<4 hex>/<digest>.
    delete marker.chunkPrefixLength;
    await fsp.writeFile(join(repo, 'repo.json'), JSON.stringify(marker));
    for (const f of await chunkStoreFiles(repo)) {
      const name = f.split('/').at(-1)!;
      await fsp.mkdir(join(repo, 'chunks', name.slice(0, 4)), { recursive: true });
      await fsp.rename(f, join(repo, 'chunks', name.slice(0, 4), name));
    }
    for (const prefix of await fsp.readdir(join(repo, 'chunks'))) if (prefix.length === 2) await fsp.rmdir(join(repo, 'chunks', prefix));
    expect((await readAll('a', 'latest')).equals(img)).toBe(true);
    const changed = Buffer.from(img);
    pseudoRandomBytes(CHUNK, 99).copy(changed, 3 * CHUNK);
    const inc = await backupSource(repo, new BufferSource(changed), { vm: 'a', logger: silentLogger() });
    expect(inc.stats.newChunks).toBe(1);
    const files = await chunkStoreFiles(repo);
    expect(files).toHaveLength(22 + 1);
    for (const f of files) expect(f.split('/').at(-2)).toHaveLength(4);
    expect((await readAll('a', 'latest')).equals(changed)).toBe(true);
    expect((await verifyRepository(repo)).problems).toEqual([]);
    await pruneVm(repo, 'a', 1);
    expect((await collectGarbage(repo, { graceMs: 0 })).removedChunks).toBe(1);
    expect((await readAll('a', 'latest')).equals(changed)).toBe(true);

    marker.chunkPrefixLength = 7;
    await fsp.writeFile(join(repo, 'repo.json'), JSON.stringify(marker));
    await expect(openRestorePoint(repo, 'a', 'latest')).rejects.toThrow(/chunkPrefixLength must be an integer from 1 to 4/);
  });
});
