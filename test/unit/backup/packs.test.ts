/**
 * The "packs" chunk store (src/backup/packs.ts), the default of new repositories: layout and read
 * back, damaged packs, gc that deletes and rewrites packs, gc beside a writer that adopts chunks
 * from an old pack, and readers that were opened before gc moved their chunks to a new pack.
 * Small images of 64 KiB chunks; random chunks are stored as they are (records of 24 + 65536 bytes).
 */
import { promises as fsp } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { CorruptChunkError, RepositoryError } from '../../../src/backup/errors.js';
import { exportRestorePoint } from '../../../src/backup/export.js';
import { CHUNK_HEADER_SIZE, sha256 } from '../../../src/backup/format.js';
import { collectGarbage, pruneVm, type GcResult } from '../../../src/backup/maintenance.js';
import { DEFAULT_PACK_TARGET_BYTES, PACK_ENTRY_SIZE, PACK_FOOTER_SIZE, readPackEntries } from '../../../src/backup/packs.js';
import { chunkFileBufferSize, openRestorePoint, readChunk } from '../../../src/backup/reader.js';
import { Repository } from '../../../src/backup/repository.js';
import { verifyRepository } from '../../../src/backup/verify.js';
import { writeRestorePoint } from '../../../src/backup/writer.js';
import { silentLogger } from '../../../src/log.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { chunkRecordLocation, chunkStoreFiles, listChunkRecords, listStoredChunks, readChunkRecord } from '../../helpers/chunk-store.js';
import { readWholePoint } from '../../helpers/repo.js';
import { freshDirPerTest } from '../../helpers/per-test-dir.js';

const CHUNK = 64 * 1024;
/** A random chunk's record: stored as it is (deflate would not make it smaller). */
const RAW_RECORD = CHUNK_HEADER_SIZE + CHUNK;

let dir: string;
let repo: string;
freshDirPerTest('packs', (path) => {
  dir = path;
  repo = join(dir, 'repo');
});

function chunkOf(img: Buffer, i: number): Buffer {
  return img.subarray(i * CHUNK, Math.min(img.length, (i + 1) * CHUNK));
}

function digestOf(img: Buffer, i: number): string {
  return sha256(chunkOf(img, i)).toString('hex');
}

/** Distinct digests of the non-zero chunks of an image, sorted. */
function distinctDigests(img: Buffer): string[] {
  const out = new Set<string>();
  for (let i = 0; i * CHUNK < img.length; i++) if (chunkOf(img, i).some((b) => b !== 0)) out.add(digestOf(img, i));
  return [...out].sort();
}

/** A copy of `img` whose chunks `indexes` are new random content. */
function withNewChunks(img: Buffer, indexes: readonly number[], seed: number): Buffer {
  const out = Buffer.from(img);
  for (const i of indexes) pseudoRandomBytes(CHUNK, seed * 1000 + i).copy(out, i * CHUNK);
  return out;
}

async function backup(vm: string, img: Buffer): Promise<string> {
  return (await backupSource(repo, new BufferSource(img, vm), { vm, chunkSize: CHUNK, logger: silentLogger() })).info.id;
}

const readAll = (vm: string, id: string): Promise<Buffer> => readWholePoint(repo, vm, id);

/** Set every pack's mtime an hour back: older than any gc cutoff of this test. */
async function agePacks(): Promise<Date> {
  const old = new Date(Date.now() - 3_600_000);
  for (const p of await chunkStoreFiles(repo)) await fsp.utimes(p, old, old);
  return old;
}

/** The one pack that holds a chunk. */
async function packOf(digestHex: string): Promise<string> {
  return (await chunkRecordLocation(repo, digestHex)).path;
}

/** Pack paths with their sizes and mtimes: proves that nothing changed. */
async function packSnapshot(): Promise<string[]> {
  const out: string[] = [];
  for (const p of await chunkStoreFiles(repo)) {
    const st = await fsp.stat(p);
    out.push(`${p} ${st.size} ${st.mtimeMs}`);
  }
  return out;
}

describe('pack files', () => {
  it('a backup goes into well-formed packs (no chunks/ directory): every distinct chunk once, read back and exported byte-identical', async () => {
    // 300 random chunks (more than one 16 MiB pack), 20 zero chunks, 10 copies of chunk 0, a 500-byte tail.
    const img = Buffer.alloc(330 * CHUNK + 500);
    pseudoRandomBytes(300 * CHUNK, 21).copy(img, 0);
    for (let c = 320; c < 330; c++) img.copy(img, c * CHUNK, 0, CHUNK);
    pseudoRandomBytes(500, 22).copy(img, 330 * CHUNK);
    const result = await backupSource(repo, new BufferSource(img), { vm: 'v', chunkSize: CHUNK, logger: silentLogger() });
    expect(result.repositoryCreated).toBe(true);
    expect(result.stats.newChunks).toBe(301);
    expect(result.stats.dedupChunks).toBe(10);
    expect(result.stats.zeroChunks).toBe(20);

    const marker = JSON.parse(await fsp.readFile(join(repo, 'repo.json'), 'utf8')) as { chunkStore?: unknown };
    expect(marker.chunkStore).toBe('packs');
    expect((await Repository.open(repo)).chunkStore).toBe('packs');
    await expect(fsp.stat(join(repo, 'chunks'))).rejects.toThrow(/ENOENT/);

    const packs = await chunkStoreFiles(repo);
    expect(packs).toHaveLength(2); // 301 records of ~64 KiB: one sealed at 16 MiB, the rest at the end
    const recordBytes: number[] = [];
    for (const pack of packs) {
      expect(relative(repo, pack)).toMatch(/^packs\/([0-9a-f]{2})\/\1[0-9a-f]{30}\.pack$/);
      // Records back to back from offset 0, then 44-byte entries and the 24-byte footer.
      const entries = await readPackEntries(pack);
      let at = 0;
      for (const e of entries) {
        expect(e.offset).toBe(at);
        at += e.length;
      }
      expect((await fsp.stat(pack)).size).toBe(at + entries.length * PACK_ENTRY_SIZE + PACK_FOOTER_SIZE);
      recordBytes.push(at);
    }
    expect(Math.max(...recordBytes)).toBeGreaterThanOrEqual(DEFAULT_PACK_TARGET_BYTES);
    expect(Math.min(...recordBytes)).toBeLessThan(DEFAULT_PACK_TARGET_BYTES);
    expect(await listStoredChunks(repo)).toEqual(distinctDigests(img));
    // A record is exactly a chunk file of the "files" store: header (magic, lengths) + payload.
    const first = await chunkRecordLocation(repo, digestOf(img, 0));
    expect(first.length).toBe(RAW_RECORD);
    const record = await readChunkRecord(first);
    expect(record.subarray(CHUNK_HEADER_SIZE).equals(chunkOf(img, 0))).toBe(true);

    const reader = await openRestorePoint(repo, 'v', 'latest');
    try {
      expect((await reader.read(0, img.length)).equals(img)).toBe(true);
      expect((await reader.read(CHUNK - 3, 2 * CHUNK + 6)).equals(img.subarray(CHUNK - 3, 3 * CHUNK + 3))).toBe(true);
      // A caller's buffer: an uncompressed record is read into it and the chunk is a view of it.
      const into = Buffer.alloc(chunkFileBufferSize(CHUNK), 0xee);
      const viaInto = await reader.loadChunkByDigest(reader.chunkDigest(5)!, CHUNK, into);
      expect(viaInto.buffer).toBe(into.buffer);
      expect(viaInto.equals(chunkOf(img, 5))).toBe(true);
    } finally {
      await reader.close();
    }
    const out = join(dir, 'export.raw');
    await exportRestorePoint(repo, 'v', 'latest', out);
    expect((await fsp.readFile(out)).equals(img)).toBe(true);
    const report = await verifyRepository(repo);
    expect(report.problems).toEqual([]);
    expect(report.chunksChecked).toBe(301);
  });

  it('an incremental backup adds one pack with exactly the changed chunks', async () => {
    const a = pseudoRandomBytes(12 * CHUNK, 23);
    const p1 = await backup('v', a);
    const before = await chunkStoreFiles(repo);
    const b = withNewChunks(a, [2, 7, 11], 24);
    const inc = await backupSource(repo, new BufferSource(b), { vm: 'v', logger: silentLogger() });
    expect(inc.stats.newChunks).toBe(3);
    const after = await chunkStoreFiles(repo);
    expect(after).toHaveLength(before.length + 1);
    const added = after.find((p) => !before.includes(p))!;
    expect((await readPackEntries(added)).map((e) => e.digestHex).sort()).toEqual([2, 7, 11].map((i) => digestOf(b, i)).sort());
    expect((await listStoredChunks(repo)).length).toBe(12 + 3);
    expect((await readAll('v', p1)).equals(a)).toBe(true);
    expect((await readAll('v', inc.info.id)).equals(b)).toBe(true);
  });
});

describe('a damaged pack', () => {
  const damages = [
    [
      'truncated pack (its last 100 bytes cut)',
      async (pack: string): Promise<void> => {
        const { size } = await fsp.stat(pack);
        await fsp.truncate(pack, size - 100);
      },
      /no pack footer \(bad magic\)/,
    ],
    [
      'entry table whose CRC32 does not match',
      async (pack: string): Promise<void> => {
        // The last byte of the last entry (its record length's high byte), just before the footer.
        const handle = await fsp.open(pack, 'r+');
        try {
          const { size } = await handle.stat();
          await handle.write(Buffer.from([0x01]), 0, 1, size - PACK_FOOTER_SIZE - 1);
        } finally {
          await handle.close();
        }
      },
      /CRC32 of the entry table does not match/,
    ],
  ] as const;

  it.each(damages)('%s: readers and verify name the pack, other packs keep working, backup stores its chunks anew, gc leaves it alone', async (_what, damage, reason) => {
    const a = pseudoRandomBytes(6 * CHUNK, 31);
    const b = pseudoRandomBytes(6 * CHUNK, 32);
    const pa = await backup('a', a);
    const pb = await backup('b', b);
    const packA = await packOf(digestOf(a, 0));
    const packB = await packOf(digestOf(b, 0));
    expect(packB).not.toBe(packA);
    const original = await fsp.readFile(packA);
    await damage(packA);
    const expected = new RegExp(`bad pack ${packA.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}: ${reason.source}`);

    await expect(readPackEntries(packA)).rejects.toThrow(RepositoryError);
    await expect(readPackEntries(packA)).rejects.toThrow(expected);

    // The reader of a restore point in the damaged pack: a medium error that names the pack.
    const readerA = await openRestorePoint(repo, 'a', pa);
    const err = await readerA.loadChunk(0).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CorruptChunkError);
    expect((err as CorruptChunkError).kind).toBe('medium-error');
    expect((err as CorruptChunkError).reason).toMatch(expected);
    await expect(readerA.read(0, a.length)).rejects.toBeInstanceOf(CorruptChunkError);
    await readerA.close();
    // A restore point whose chunks are all in another, intact pack reads back exactly: one damaged
    // pack does not take the others down.
    const readerB = await openRestorePoint(repo, 'b', pb);
    expect((await readerB.read(0, b.length)).equals(b)).toBe(true);
    await readerB.close();

    const report = await verifyRepository(repo);
    expect(report.brokenPoints).toEqual([`a/${pa}`]);
    expect(report.problems.length).toBe(6);
    for (const p of report.problems) expect(`${p.path}: ${p.reason}`).toMatch(expected);
    expect(report.unreadablePacks).toHaveLength(1);
    expect(report.unreadablePacks[0]!.path).toBe(packA);
    expect(`bad pack ${packA}: ${report.unreadablePacks[0]!.reason}`).toMatch(expected);

    // A new backup works; backing up a's content again stores its chunks anew (the damaged pack's
    // chunks count as absent), so the new point reads back while the damaged pack is still there.
    const c = pseudoRandomBytes(2 * CHUNK, 33);
    await backupSource(repo, new BufferSource(c), { vm: 'c', chunkSize: CHUNK });
    const again = await backupSource(repo, new BufferSource(a, 'a'), { vm: 'a2', chunkSize: CHUNK, logger: silentLogger() });
    expect(again.stats.newChunks).toBe(6);
    expect((await readAll('a2', again.info.id)).equals(a)).toBe(true);
    await pruneVm(repo, 'a2', 0);

    // gc leaves the damaged pack alone (it cannot know what is in it) and still does its work:
    // b's pack, unreferenced once b is pruned, and a2's go.
    await agePacks();
    await pruneVm(repo, 'b', 0);
    const gc = await collectGarbage(repo, { graceMs: 0 });
    expect(gc.packs?.unreadablePacks).toBe(1);
    const left = await chunkStoreFiles(repo);
    expect(left).toContain(packA);
    expect(left).not.toContain(packB);
    expect((await fsp.readFile(packA)).equals(original)).toBe(false);

    // Repaired, the pack reads again (new readers).
    await fsp.writeFile(packA, original);
    expect((await readAll('a', pa)).equals(a)).toBe(true);
    expect((await verifyRepository(repo)).problems).toEqual([]);
  });
});

describe('gc of packs', () => {
  /**
   * vm a: p1 = A (10 chunks) → pack P1; p2 changes chunks 0..7 → P2 (8); p3 changes chunk 0 → P3 (1).
   * vm z: 3 chunks → P4. After keeping only a/p3 and dropping z: P1 is 80 % unreferenced (rewrite
   * with its 2 live chunks), P2 12.5 % (below 20 %: kept as is), P3 fully live, P4 fully dead (deleted).
   */
  async function scenario(): Promise<{ c: Buffer; p3: string; p1Pack: string; p2Pack: string; p3Pack: string; p4Pack: string; deadBytes: number }> {
    const a = pseudoRandomBytes(10 * CHUNK, 41);
    const b = withNewChunks(a, [0, 1, 2, 3, 4, 5, 6, 7], 42);
    const c = withNewChunks(b, [0], 43);
    const z = pseudoRandomBytes(3 * CHUNK, 44);
    await backup('a', a);
    await backup('a', b);
    const p3 = await backup('a', c);
    await backup('z', z);
    const p1Pack = await packOf(digestOf(a, 0));
    const p2Pack = await packOf(digestOf(b, 0));
    const p3Pack = await packOf(digestOf(c, 0));
    const p4Pack = await packOf(digestOf(z, 0));
    expect(new Set([p1Pack, p2Pack, p3Pack, p4Pack]).size).toBe(4);
    expect((await pruneVm(repo, 'a', 1)).kept).toEqual([p3]);
    await pruneVm(repo, 'z', 0);
    const dead = new Set([...[0, 1, 2, 3, 4, 5, 6, 7].map((i) => digestOf(a, i)), ...[0, 1, 2].map((i) => digestOf(z, i))]);
    const deadBytes = (await listChunkRecords(repo)).filter((r) => dead.has(r.digestHex)).reduce((n, r) => n + r.length, 0);
    expect(deadBytes).toBe(11 * RAW_RECORD);
    return { c, p3, p1Pack, p2Pack, p3Pack, p4Pack, deadBytes };
  }

  it('deletes fully unreferenced packs, rewrites mostly unreferenced ones verbatim, keeps the rest; every point reads back', async () => {
    const { c, p3, p1Pack, p2Pack, p3Pack, p4Pack, deadBytes } = await scenario();
    const a = pseudoRandomBytes(10 * CHUNK, 41);
    const liveFromP1 = [8, 9].map((i) => digestOf(a, i));
    const p1Records = await Promise.all(liveFromP1.map(async (d) => readChunkRecord(await chunkRecordLocation(repo, d))));
    await agePacks();

    const expected: Partial<GcResult> = {
      indexes: 1,
      referencedChunks: 10,
      chunkFiles: 10 + 8 + 1 + 3,
      removedChunks: 11,
      removedBytes: deadBytes,
      keptRecent: 0,
      packs: { packs: 4, removedPacks: 1, repackedPacks: 1, keptUnreferenced: 1, unreadablePacks: 0 },
    };
    const before = await packSnapshot();
    const dry = await collectGarbage(repo, { graceMs: 0, dryRun: true });
    expect(dry).toMatchObject(expected);
    expect(await packSnapshot()).toEqual(before);

    const gc = await collectGarbage(repo, { graceMs: 0 });
    expect(gc).toMatchObject(expected);
    const after = await chunkStoreFiles(repo);
    expect(after).toHaveLength(3);
    expect(after).toContain(p2Pack);
    expect(after).toContain(p3Pack);
    expect(after).not.toContain(p1Pack);
    expect(after).not.toContain(p4Pack);
    // P1's two live chunks moved, byte for byte, into one new pack.
    const moved = await Promise.all(liveFromP1.map((d) => chunkRecordLocation(repo, d)));
    expect(moved[0]!.path).toBe(moved[1]!.path);
    expect([p1Pack, p2Pack, p3Pack, p4Pack]).not.toContain(moved[0]!.path);
    expect(await readPackEntries(moved[0]!.path)).toHaveLength(2);
    for (const [k, m] of moved.entries()) expect((await readChunkRecord(m)).equals(p1Records[k]!)).toBe(true);
    // Stored: the 10 live chunks and P2's one unreferenced chunk.
    expect(await listStoredChunks(repo)).toEqual([...distinctDigests(c), digestOf(withNewChunks(a, [0, 1, 2, 3, 4, 5, 6, 7], 42), 0)].sort());

    expect((await readAll('a', p3)).equals(c)).toBe(true);
    const report = await verifyRepository(repo);
    expect(report.problems).toEqual([]);
    expect(report.brokenPoints).toEqual([]);
    expect(report.chunksChecked).toBe(10);

    // A second gc has nothing left to do: P2's unreferenced chunk stays below the threshold.
    await agePacks();
    expect(await collectGarbage(repo, { graceMs: 0 })).toMatchObject({
      removedChunks: 0,
      removedBytes: 0,
      packs: { packs: 3, removedPacks: 0, repackedPacks: 0, keptUnreferenced: 1, unreadablePacks: 0 },
    });
    expect((await readAll('a', p3)).equals(c)).toBe(true);
  });

  it('keeps recent packs (default grace) and every pack once no restore point is left: then deletes them all', async () => {
    await scenario();
    // Fresh packs: within the default 5-minute grace.
    const fresh = await collectGarbage(repo);
    expect(fresh.removedChunks).toBe(0);
    expect(fresh.keptRecent).toBe(8 + 1 + 3); // every unreferenced chunk, P2's one included
    await pruneVm(repo, 'a', 0);
    await agePacks();
    const gc = await collectGarbage(repo, { graceMs: 0 });
    expect(gc.packs).toEqual({ packs: 4, removedPacks: 4, repackedPacks: 0, keptUnreferenced: 0, unreadablePacks: 0 });
    expect(gc.removedChunks).toBe(22);
    expect(await chunkStoreFiles(repo)).toEqual([]);
  });
});

describe('gc beside a writer that adopts chunks from an old pack', () => {
  /**
   * Write `img` as vm `vm`; when every chunk but the last is done (adopted or written), run gc
   * (grace 0) before handing over the last chunk: the writer is mid-way, its index not published.
   */
  async function writeWithGcMidway(vm: string, img: Buffer): Promise<{ gc: GcResult; id: string }> {
    const count = Math.ceil(img.length / CHUNK);
    let done = 0;
    let gc: GcResult | undefined;
    const result = await writeRestorePoint(
      repo,
      {
        vm,
        parent: null,
        imageSize: img.length,
        chunkSize: CHUNK,
        source: 'packs.test',
        chunkContent: async (i) => {
          if (i === count - 1) {
            for (let waited = 0; done < count - 1; waited += 5) {
              if (waited > 10_000) throw new Error(`only ${done} of ${count - 1} chunks done`);
              await new Promise((r) => setTimeout(r, 5));
            }
            gc = await collectGarbage(repo, { graceMs: 0 });
          }
          return Buffer.from(chunkOf(img, i));
        },
      },
      { concurrency: 4, logger: silentLogger(), onProgress: (p) => (done = p.chunksDone) },
    );
    return { gc: gc!, id: result.info.id };
  }

  it('a fully unreferenced old pack whose chunks a writer adopts is kept (its mtime was bumped)', async () => {
    const a = pseudoRandomBytes(8 * CHUNK, 51);
    await backup('a', a);
    const pack = await packOf(digestOf(a, 0));
    await pruneVm(repo, 'a', 0);
    const old = await agePacks();
    // Without the writer, this gc would delete the pack.
    expect((await collectGarbage(repo, { graceMs: 0, dryRun: true })).packs).toMatchObject({ removedPacks: 1 });

    // The new image: a's 8 chunks (adopted from the old pack) and one new chunk.
    const img = Buffer.concat([a, pseudoRandomBytes(CHUNK, 52)]);
    const { gc, id } = await writeWithGcMidway('w', img);
    expect(gc.removedChunks).toBe(0);
    expect(gc.keptRecent).toBe(8);
    expect(gc.packs).toMatchObject({ removedPacks: 0, repackedPacks: 0 });
    expect((await fsp.stat(pack)).mtimeMs).toBeGreaterThan(old.getTime() + 60_000);
    expect(await packOf(digestOf(a, 0))).toBe(pack);
    expect((await readAll('w', id)).equals(img)).toBe(true);
    expect((await verifyRepository(repo)).problems).toEqual([]);
  });

  it('a mostly unreferenced old pack whose unreferenced chunks a writer adopts is not rewritten without them', async () => {
    const a = pseudoRandomBytes(10 * CHUNK, 53);
    await backup('a', a);
    const pack = await packOf(digestOf(a, 0));
    const b = withNewChunks(a, [0, 1, 2, 3, 4], 54);
    await backup('a', b);
    await pruneVm(repo, 'a', 1); // a's chunks 0..4 (half the pack) are unreferenced
    await agePacks();
    expect(await collectGarbage(repo, { graceMs: 0, dryRun: true })).toMatchObject({ removedChunks: 5, packs: { repackedPacks: 1 } });

    // The new image takes exactly the 5 unreferenced chunks, then a new one.
    const img = Buffer.concat([a.subarray(0, 5 * CHUNK), pseudoRandomBytes(CHUNK, 55)]);
    const { gc, id } = await writeWithGcMidway('w', img);
    expect(gc.removedChunks).toBe(0);
    expect(gc.keptRecent).toBe(5);
    expect(gc.packs).toMatchObject({ removedPacks: 0, repackedPacks: 0 });
    expect(await packOf(digestOf(a, 0))).toBe(pack);
    expect((await readAll('w', id)).equals(img)).toBe(true);
    expect((await readAll('a', 'latest')).equals(b)).toBe(true);
    expect((await verifyRepository(repo)).problems).toEqual([]);
  });
});

describe('readers and packs that appear or move', () => {
  /** vm a: p1 = 10 chunks (pack P1), p2 changes chunks 0..7 (pack P2); only p2 kept: P1 is rewritten by gc. */
  async function repackScenario(): Promise<{ b: Buffer; p2: string; oldPack: string; movedDigests: string[] }> {
    const a = pseudoRandomBytes(10 * CHUNK, 61);
    await backup('a', a);
    const b = withNewChunks(a, [0, 1, 2, 3, 4, 5, 6, 7], 62);
    const p2 = await backup('a', b);
    const oldPack = await packOf(digestOf(a, 8));
    expect(await packOf(digestOf(b, 0))).not.toBe(oldPack);
    await pruneVm(repo, 'a', 1); // P1: 8 of its 10 chunks unreferenced
    return { b, p2, oldPack, movedDigests: [8, 9].map((i) => digestOf(a, i)) };
  }

  async function gcMovesThem(oldPack: string, movedDigests: readonly string[]): Promise<string> {
    await agePacks();
    const gc = await collectGarbage(repo, { graceMs: 0 });
    expect(gc.packs).toMatchObject({ repackedPacks: 1, removedPacks: 0 });
    await expect(fsp.stat(oldPack)).rejects.toThrow(/ENOENT/);
    const newPack = await packOf(movedDigests[0]!);
    expect(newPack).not.toBe(oldPack);
    expect(await packOf(movedDigests[1]!)).toBe(newPack);
    return newPack;
  }

  it('a reader whose pack index predates a gc rewrite finds the old pack gone, rescans and reads the new pack', async () => {
    const { b, p2, oldPack, movedDigests } = await repackScenario();
    // Has loaded the pack index (through a chunk of P2) but never opened P1.
    const reader = await openRestorePoint(repo, 'a', p2);
    expect((await reader.loadChunk(0)).equals(chunkOf(b, 0))).toBe(true);
    // A repository object whose index still says "P1".
    const r = await Repository.open(repo);
    await r.packs.ensureLoaded();
    expect(r.packs.lookup(movedDigests[0]!)?.pack).toBe(relative(join(repo, 'packs'), oldPack));

    const newPack = await gcMovesThem(oldPack, movedDigests);
    try {
      expect((await readChunk(r, Buffer.from(movedDigests[1]!, 'hex'), CHUNK)).equals(chunkOf(b, 9))).toBe(true);
      // It read the new pack: the index now says so.
      expect(r.packs.lookup(movedDigests[1]!)?.pack).toBe(relative(join(repo, 'packs'), newPack));
      for (const i of [8, 9]) expect((await reader.loadChunk(i)).equals(chunkOf(b, i))).toBe(true);
      expect((await reader.read(0, b.length)).equals(b)).toBe(true);
    } finally {
      await reader.close();
    }
  });

  it('a reader that had the rewritten pack open goes on reading the right bytes', async () => {
    const { b, p2, oldPack, movedDigests } = await repackScenario();
    const reader = await openRestorePoint(repo, 'a', p2);
    expect((await reader.loadChunk(8)).equals(chunkOf(b, 8))).toBe(true); // P1 read (its handle may be pooled)
    await gcMovesThem(oldPack, movedDigests);
    try {
      for (const i of [9, 8]) expect((await reader.loadChunk(i)).equals(chunkOf(b, i))).toBe(true);
      expect((await reader.read(0, b.length)).equals(b)).toBe(true);
    } finally {
      await reader.close();
    }
    expect((await readAll('a', p2)).equals(b)).toBe(true);
  });

  it('a reader opened with prepare loads the pack map at open; one without it scans on its first read', async () => {
    const img = pseudoRandomBytes(4 * CHUNK, 81);
    const id = await backup('a', img);
    const [pack] = await chunkStoreFiles(repo);
    const prepared = await openRestorePoint(repo, 'a', id, { prepare: true });
    const lazy = await openRestorePoint(repo, 'a', id);
    try {
      // Break the pack's entry table (its records stay intact): only a scan from now on sees it.
      const handle = await fsp.open(pack!, 'r+');
      try {
        const { size } = await handle.stat();
        await handle.write(Buffer.from([0x01]), 0, 1, size - PACK_FOOTER_SIZE - 1);
      } finally {
        await handle.close();
      }
      // The prepared reader knew where the records are before the damage and reads them.
      expect((await prepared.loadChunk(2)).equals(chunkOf(img, 2))).toBe(true);
      // The lazy one scans now, finds the table unreadable and reports the chunk missing.
      const err = await lazy.loadChunk(2).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CorruptChunkError);
      expect((err as CorruptChunkError).reason).toMatch(/CRC32 of the entry table does not match/);
    } finally {
      await prepared.close();
      await lazy.close();
    }
  });

  it('a chunk in a pack written after the index was loaded is found by a rescan', async () => {
    await backup('a', pseudoRandomBytes(4 * CHUNK, 71));
    const r = await Repository.open(repo);
    await r.packs.ensureLoaded();
    const n = pseudoRandomBytes(3 * CHUNK, 72);
    await backup('n', n);
    const digest = digestOf(n, 1);
    expect(r.packs.lookup(digest)).toBeUndefined();
    expect((await readChunk(r, Buffer.from(digest, 'hex'), CHUNK)).equals(chunkOf(n, 1))).toBe(true);
    expect(r.packs.lookup(digest)?.pack).toBe(relative(join(repo, 'packs'), await packOf(digest)));
    // A digest no pack holds is missing after the rescan, not an error of another kind.
    const missing = await readChunk(r, Buffer.alloc(32, 0xab), CHUNK).catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(CorruptChunkError);
    expect((missing as CorruptChunkError).reason).toMatch(/chunk is missing \(no readable pack holds it\)/);
  });
});
