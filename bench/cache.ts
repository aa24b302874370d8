/**
 * Micro-benchmark of the cache layer (no iSCSI): BackupBlockDevice over a real repository.
 *
 *   npx esbuild bench/cache.ts --bundle --platform=node --format=cjs --target=node20 \
 *     --outfile=/tmp/bench-cache.cjs --log-level=warning && node /tmp/bench-cache.cjs [imageMiB] [seconds]
 *
 * Measures: warm-cache 4 KiB random reads (ops/s, QD1 and QD32), warm sequential 1 MiB reads (MiB/s,
 * QD1 and QD8), cold sequential 1 MiB reads (read-ahead + async inflate), random 4 KiB writes into the
 * delta (QD32) and 4 KiB random reads over a device whose delta holds those writes.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openRestorePoint } from '../src/backup/reader.js';
import { Repository } from '../src/backup/repository.js';
import { writeRestorePoint } from '../src/backup/writer.js';
import { BackupBlockDevice, openBackupDevice } from '../src/cache/backup-device.js';
import { ChunkCache } from '../src/cache/chunk-cache.js';
import { silentLogger } from '../src/log.js';
import { xorshift32 } from '../test/helpers/prng.js';

const MiB = 1024 * 1024;

function chunkContent(index: number, length: number): Buffer {
  // Half pseudo-random, half repetitive text: deflate has real work, like a disk image.
  const out = Buffer.allocUnsafe(length);
  const next = xorshift32((index + 1) * 2654435761);
  for (let i = 0; i < length / 2; i += 4) out.writeUInt32LE(next(), i);
  out.fill(`chunk ${index} of the benchmark image; `, length / 2);
  return out;
}

async function timed(seconds: number, concurrency: number, op: (k: number) => Promise<unknown>): Promise<{ ops: number; elapsed: number }> {
  const deadline = performance.now() + seconds * 1000;
  let ops = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < deadline) {
        await op(ops++);
      }
    }),
  );
  return { ops, elapsed: (performance.now() - start) / 1000 };
}

async function main(): Promise<void> {
  const imageMiB = Number(process.argv[2] ?? 128);
  const seconds = Number(process.argv[3] ?? 3);
  const logger = silentLogger();
  const scratch = await mkdtemp(join(tmpdir(), 'bootrestore-bench-cache-'));
  try {
    const repoDir = join(scratch, 'repo');
    await Repository.openOrCreate(repoDir);
    const chunkSize = 256 * 1024;
    const t0 = performance.now();
    const written = await writeRestorePoint(repoDir, {
      vm: 'bench',
      parent: null,
      imageSize: imageMiB * MiB,
      chunkSize,
      source: 'bench/cache.ts',
      chunkContent: async (i, len) => chunkContent(i, len),
    });
    const report: Record<string, string> = {};
    report['setup'] = `${imageMiB} MiB image, ${chunkSize / 1024} KiB chunks, written in ${((performance.now() - t0) / 1000).toFixed(1)} s`;

    const reader = await openRestorePoint(repoDir, 'bench', written.info.id);
    const cache = new ChunkCache({ maxBytes: (imageMiB + 64) * MiB, logger });
    const identity = { serial: 'BENCH', naa: Buffer.alloc(8, 3), vendor: 'BOOTREST', product: 'bench' };
    const device: BackupBlockDevice = await openBackupDevice({ reader, cache, deltaDir: join(scratch, 'delta'), mountId: 'bench', identity, logger });
    const blocks = device.blockCount;

    // Baseline: the reader alone (no cache), sequential 1 MiB reads.
    const rs = performance.now();
    for (let off = 0; off < imageMiB * MiB; off += MiB) await reader.read(off, MiB);
    report['baseline: RestorePointReader.read sequential 1 MiB QD1'] = `${(imageMiB / ((performance.now() - rs) / 1000)).toFixed(0)} MiB/s`;
    // Warm the bench device's cache with one sequential pass.
    for (let lba = 0; lba < blocks; lba += 2048) await device.read(lba, Math.min(2048, blocks - lba));
    // A cold pass on a second device with its own, empty cache.
    const coldCache = new ChunkCache({ maxBytes: (imageMiB + 64) * MiB, logger });
    const coldReader = await openRestorePoint(repoDir, 'bench', written.info.id);
    const coldDevice = await openBackupDevice({ reader: coldReader, cache: coldCache, deltaDir: null, mountId: 'cold', identity, logger });
    const cs = performance.now();
    for (let lba = 0; lba < blocks; lba += 2048) await coldDevice.read(lba, Math.min(2048, blocks - lba));
    const coldSeconds = (performance.now() - cs) / 1000;
    report['cold sequential 1 MiB QD1 (read-ahead, inflate)'] = `${(imageMiB / coldSeconds).toFixed(0)} MiB/s (prefetch loads ${coldCache.stats().prefetchLoads}, prefetch hits ${coldCache.stats().prefetchHits})`;
    await coldDevice.close();
    // The same without read-ahead.
    const noRaCache = new ChunkCache({ maxBytes: (imageMiB + 64) * MiB, logger });
    const noRaReader = await openRestorePoint(repoDir, 'bench', written.info.id);
    const noRaDevice = await openBackupDevice({ reader: noRaReader, cache: noRaCache, deltaDir: null, mountId: 'cold-no-ra', identity, logger, readAheadChunks: 0 });
    const ns = performance.now();
    for (let lba = 0; lba < blocks; lba += 2048) await noRaDevice.read(lba, Math.min(2048, blocks - lba));
    report['cold sequential 1 MiB QD1 without read-ahead'] = `${(imageMiB / ((performance.now() - ns) / 1000)).toFixed(0)} MiB/s`;
    await noRaDevice.close();
    // And the reader baseline again, after the cold passes (page cache warm for everyone).
    const rs2 = performance.now();
    for (let off = 0; off < imageMiB * MiB; off += MiB) await reader.read(off, MiB);
    report['baseline again: RestorePointReader.read sequential 1 MiB QD1'] = `${(imageMiB / ((performance.now() - rs2) / 1000)).toFixed(0)} MiB/s`;

    const rand = (): number => Math.floor(Math.random() * (blocks - 8));
    let r = await timed(seconds, 1, () => device.read(rand(), 8));
    report['warm random 4 KiB read QD1'] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    r = await timed(seconds, 32, () => device.read(rand(), 8));
    report['warm random 4 KiB read QD32'] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    const zeroCopyReader = await openRestorePoint(repoDir, 'bench', written.info.id);
    const zeroCopy = await openBackupDevice({ reader: zeroCopyReader, cache, deltaDir: null, mountId: 'zero-copy', identity, logger, zeroCopyReads: true });
    r = await timed(seconds, 32, () => zeroCopy.read(rand(), 8));
    report['warm random 4 KiB read QD32, zeroCopyReads'] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    r = await timed(seconds, 8, (k) => zeroCopy.read(((k * 512) % (blocks - 512)), 512));
    report['warm sequential 256 KiB (one chunk) read QD8, zeroCopyReads'] = `${((r.ops / 4) / r.elapsed).toFixed(0)} MiB/s`;
    r = await timed(seconds, 8, (k) => device.read(((k * 512) % (blocks - 512)), 512));
    report['warm sequential 256 KiB (one chunk) read QD8, copying'] = `${((r.ops / 4) / r.elapsed).toFixed(0)} MiB/s`;
    await zeroCopy.close();
    r = await timed(seconds, 1, (k) => device.read(((k * 2048) % (blocks - 2048)), 2048));
    report['warm sequential 1 MiB read QD1'] = `${((r.ops * 1) / r.elapsed).toFixed(0)} MiB/s`;
    r = await timed(seconds, 8, (k) => device.read(((k * 2048) % (blocks - 2048)), 2048));
    report['warm sequential 1 MiB read QD8'] = `${((r.ops * 1) / r.elapsed).toFixed(0)} MiB/s`;

    const data = Buffer.alloc(4096, 0x5a);
    r = await timed(seconds, 32, () => device.write(Math.floor(Math.random() * (blocks / 8)) * 8, data, { fua: false }));
    report['random 4 KiB write QD32 (delta, aligned)'] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    r = await timed(seconds, 32, () => device.write(rand(), Buffer.alloc(512, 1), { fua: false }));
    report['random 512 B write QD32 (delta, read-modify-write)'] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    const fs0 = performance.now();
    await device.flush();
    report['flush after the writes'] = `${(performance.now() - fs0).toFixed(1)} ms`;
    const deltaStats = device.stats().delta!;
    r = await timed(seconds, 32, () => device.read(rand(), 8));
    report[`random 4 KiB read QD32 with delta (${(deltaStats.deltaBytes / MiB).toFixed(0)} MiB in delta)`] = `${Math.round(r.ops / r.elapsed)} ops/s`;
    r = await timed(seconds, 8, (k) => device.read(((k * 2048) % (blocks - 2048)), 2048));
    report['sequential 1 MiB read QD8 with delta'] = `${((r.ops * 1) / r.elapsed).toFixed(0)} MiB/s`;
    const s = cache.stats();
    report['cache'] = `${s.entries} entries, ${(s.bytes / MiB).toFixed(0)} MiB, hits ${s.hits}, misses ${s.misses}, loads ${s.loads}`;
    await device.close();
    for (const [k, v] of Object.entries(report)) process.stdout.write(`${k.padEnd(62)} ${v}\n`);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
