/**
 * A restore point served as a writable LUN through the real iSCSI target (in this process), used by
 * real clients: qemu-img convert reads it back byte for byte; qemu-io writes, discards and
 * write-zeroes land in the delta (the repository is untouched); qemu-img map sees the backup's zero
 * chunks as holes (GET LBA STATUS); the delta survives closing and reopening the mount; a chunk
 * damaged in the repository fails only the reads that need it; iscsi-perf reads through the cache.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openRestorePoint } from '../../src/backup/reader.js';
import { Repository } from '../../src/backup/repository.js';
import { writeRestorePoint } from '../../src/backup/writer.js';
import { BackupBlockDevice, openBackupDevice } from '../../src/cache/backup-device.js';
import { ChunkCache } from '../../src/cache/chunk-cache.js';
import { IscsiServer } from '../../src/iscsi/server.js';
import { ScsiTarget } from '../../src/iscsi/scsi/target.js';
import { silentLogger } from '../../src/log.js';
import { corruptChunk } from '../helpers/chunk-store.js';
import { runChecked, runCommand } from '../helpers/exec.js';
import { patternBytes } from '../helpers/fake-restore-point.js';
import { runIscsiPerf } from '../helpers/libiscsi.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const IMAGE_SIZE = 16 * MiB;
const IQN = 'iqn.2026-12.io.bootrestore.test:cache-lun';
const ZERO_CHUNKS = new Set([10, 11, 12, 13, 100, 200, 201]);
const identity = { serial: 'BRCACHEE2E1', naa: Buffer.from('6001405a0b0c0e01', 'hex'), vendor: 'BOOTREST', product: 'cache-e2e' };

let dir: TempDir;
let repoDir: string;
let pointId: string;
let baseImage: Buffer;
let cache: ChunkCache;
let device: BackupBlockDevice | undefined;
let server: IscsiServer | undefined;
let url: string;

async function mount(): Promise<void> {
  const reader = await openRestorePoint(repoDir, 'vm1', pointId);
  device = await openBackupDevice({ reader, cache, deltaDir: join(dir.path, 'delta'), mountId: 'vm1-e2e', identity, logger: silentLogger() });
  const scsi = new ScsiTarget({ logger: silentLogger() });
  scsi.addLun(0, device);
  server = new IscsiServer({ portals: ['127.0.0.1:0'], targets: [{ iqn: IQN, port: scsi }], logger: silentLogger() });
  const [bound] = await server.start();
  url = `iscsi://127.0.0.1:${bound!.port}/${IQN}/0`;
}

async function unmount(): Promise<void> {
  await server?.stop();
  server = undefined;
  await device?.close();
  device = undefined;
}

async function convertToFile(name: string): Promise<Buffer> {
  const out = join(dir.path, name);
  await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, out], { timeoutMs: 120_000 });
  return readFile(out);
}

beforeAll(async () => {
  dir = await makeTempDir('cache-e2e');
  repoDir = join(dir.path, 'repo');
  await Repository.openOrCreate(repoDir);
  baseImage = Buffer.alloc(IMAGE_SIZE);
  for (let i = 0; i < IMAGE_SIZE / CHUNK; i++) if (!ZERO_CHUNKS.has(i)) patternBytes(CHUNK, 700 + i).copy(baseImage, i * CHUNK);
  const written = await writeRestorePoint(repoDir, {
    vm: 'vm1',
    parent: null,
    imageSize: IMAGE_SIZE,
    chunkSize: CHUNK,
    source: 'cache-backup-lun e2e',
    chunkContent: async (i, len) => (ZERO_CHUNKS.has(i) ? 'zero' : Buffer.from(baseImage.subarray(i * CHUNK, i * CHUNK + len))),
  });
  pointId = written.info.id;
  cache = new ChunkCache({ maxBytes: 8 * MiB, logger: silentLogger() });
  await mount();
});

afterAll(async () => {
  await unmount();
  await dir?.remove();
});

describe('backup LUN (cache + delta) with real clients', () => {
  const model = (): Buffer => modelImage;
  let modelImage: Buffer;

  it('qemu-img convert reads the restore point byte for byte (cache smaller than the image)', async () => {
    const got = await convertToFile('read1.raw');
    expect(got.length).toBe(IMAGE_SIZE);
    expect(got.equals(baseImage)).toBe(true);
    modelImage = Buffer.from(baseImage);
    const s = cache.stats();
    expect(s.bytes).toBeLessThanOrEqual(8 * MiB);
    expect(s.loads).toBeGreaterThanOrEqual(IMAGE_SIZE / CHUNK - ZERO_CHUNKS.size);
  });

  it('qemu-img map reports the backup\'s zero chunks as holes (GET LBA STATUS)', async () => {
    const r = await runChecked('qemu-img', ['map', '--output=json', '-f', 'raw', url], { timeoutMs: 60_000 });
    const extents = JSON.parse(r.stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    const holes = extents.filter((e) => !e.data).map((e) => [e.start / CHUNK, e.length / CHUNK]);
    expect(holes).toEqual([
      [10, 4],
      [100, 1],
      [200, 2],
    ]);
  });

  it('qemu-io writes, discards and write-zeroes go to the delta and read back; the repository is untouched', async () => {
    const cmds = [
      'write -P 0xab 1536 4096', // unaligned: read-modify-write of two 4 KiB units
      'write -P 0xcd 1048576 65536',
      'write -P 0x5e 720896 512', // inside zero chunk 11
      'discard 2097152 131072',
      'write -z -u 4194304 65536', // WRITE SAME with UNMAP
      'write -z 6291456 8192', // WRITE SAME (zeroes, no unmap)
      'flush',
    ];
    const args = ['-f', 'raw'];
    for (const c of cmds) args.push('-c', c);
    args.push(url);
    await runChecked('qemu-io', args, { timeoutMs: 60_000 });
    const m = model();
    m.fill(0xab, 1536, 1536 + 4096);
    m.fill(0xcd, 1048576, 1048576 + 65536);
    m.fill(0x5e, 720896, 720896 + 512);
    m.fill(0, 2097152, 2097152 + 131072);
    m.fill(0, 4194304, 4194304 + 65536);
    m.fill(0, 6291456, 6291456 + 8192);
    const got = await convertToFile('read2.raw');
    expect(got.equals(m)).toBe(true);
    const delta = device!.stats().delta!;
    expect(delta.presentUnits).toBeGreaterThan(0);
    expect(delta.zeroUnits).toBeGreaterThanOrEqual((131072 + 65536) / 4096);
    expect(device!.metrics.writes).toBeGreaterThanOrEqual(3);
    // The restore point itself is unchanged.
    const reader = await openRestorePoint(repoDir, 'vm1', pointId);
    expect((await reader.read(0, IMAGE_SIZE)).equals(baseImage)).toBe(true);
    await reader.close();
  });

  it('the delta survives unmount and remount (qemu-img reads the same content again)', async () => {
    await unmount();
    await mount();
    const got = await convertToFile('read3.raw');
    expect(got.equals(model())).toBe(true);
  });

  it('iscsi-perf random 4 KiB and sequential 1 MiB reads run through the cache', async () => {
    // If iscsi-perf hangs, say whether the device still had requests in flight (a stuck read) or not.
    const withDeviceState = (err: unknown): never => {
      const s = cache.stats();
      throw new Error(
        `${err instanceof Error ? err.message : String(err)}\n-- device: reads in flight ${device!.metrics.readsInFlight}, reads ${device!.metrics.reads}, ` +
          `read errors ${device!.metrics.readErrors}; cache loads in flight ${s.loadsInFlight}, queued ${s.loadsQueued}`,
      );
    };
    const random = await runIscsiPerf(url, { queueDepth: 32, blocksPerRequest: 8, seconds: 3, random: true }).catch(withDeviceState);
    const sequential = await runIscsiPerf(url, { queueDepth: 8, blocksPerRequest: 2048, seconds: 3, random: false }).catch(withDeviceState);
    console.log(`iscsi-perf over the backup LUN (16 MiB image, 8 MiB cache): random 4 KiB QD32 ${random.iops} IOPS; sequential 1 MiB QD8 ${sequential.mibPerSecond} MiB/s` +
        // iscsi-perf may miss the second in which it stops by itself (see runIscsiPerf): then it was stopped by SIGINT.
        `${random.interrupted || sequential.interrupted ? ' (stopped by SIGINT: random ' + String(random.interrupted) + ', sequential ' + String(sequential.interrupted) + ')' : ''}`);
    expect(random.iops).toBeGreaterThan(0);
    expect(sequential.mibPerSecond).toBeGreaterThan(0);
  });

  it('a chunk damaged in the repository fails only the reads that need it (medium error)', async () => {
    expect((await Repository.open(repoDir)).chunkStore).toBe('packs'); // the default store
    const reader = await openRestorePoint(repoDir, 'vm1', pointId);
    const victim = 150; // untouched by the writes above
    const digest = reader.chunkDigest(victim)!.toString('hex');
    await reader.close();
    const damaged = await corruptChunk(repoDir, digest, undefined, 0xff);
    cache.clear();
    try {
      const bad = await runCommand('qemu-io', ['-f', 'raw', '-c', `read ${victim * CHUNK} 4096`, url], { timeoutMs: 60_000 });
      expect(`${bad.stdout}${bad.stderr}`).toMatch(/read failed|Input\/output error/);
      const good = await runCommand('qemu-io', ['-f', 'raw', '-c', `read -P 0x00 ${10 * CHUNK} 4096`, '-c', `read ${(victim + 1) * CHUNK} 4096`, url], { timeoutMs: 60_000 });
      expect(good.exitCode).toBe(0);
      expect(`${good.stdout}${good.stderr}`).not.toMatch(/failed|error/i);
      expect(device!.metrics.readErrors).toBeGreaterThanOrEqual(1);
    } finally {
      await damaged.restore();
    }
  });
});
