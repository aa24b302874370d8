/**
 * The shared chunk cache seen through real clients:
 *  - two LUNs mounted from restore points (of two VMs) that share most chunks: after both are read
 *    in full, the cache holds each shared chunk once (entries = distinct digests, loads = entries);
 *  - memory stays bounded: with a cache of N bytes, a full sequential read of a larger LUN keeps the
 *    server's peak RSS (VmHWM) below N + 150 MiB;
 *  - `cache.preallocate`: the server faults in its whole cache at start; a full read by qemu-img then
 *    reads into those buffers, returns the image's bytes, and RSS stays within the same bound;
 *  - `cache.verify`: a damaged chunk fails the reads that need it (EIO for qemu-io, the digest and
 *    reason logged) under either check; a valid chunk stored under another chunk's digest is caught
 *    by 'sha256' only — the limit of the default 'crc32', shown here as it is.
 */
import { createHash } from 'node:crypto';
import { open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runChecked, runCommand } from '../helpers/exec.js';
import { chunkRecordLocation, corruptChunk, readChunkRecord } from '../helpers/chunk-store.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { backupImage, chunkDigests, cli, cliResult, pseudoRandom, writeTestImage } from '../helpers/repo.js';
import { ControlClient } from '../../src/cli/control-client.js';
import type { ChunkCacheStats } from '../../src/cache/chunk-cache.js';
import type { MountInfo } from '../../src/mounts/manager.js';

const MiB = 1 << 20;
const CHUNK = 256 * 1024;
let dir: TempDir;
let server: ServerProcess | undefined;

beforeAll(async () => {
  dir = await makeTempDir('mount-cache');
});

afterAll(async () => {
  await server?.stop();
  await dir?.remove();
});

/** The control API of the server serving `deltaDir` (its state file appears just after the iSCSI portals listen). */
async function control(deltaDir: string): Promise<ControlClient> {
  for (let attempt = 0; ; attempt++) {
    try {
      const state = JSON.parse(await readFile(join(deltaDir, 'server.json'), 'utf8')) as { control: string };
      return new ControlClient(state.control);
    } catch (err) {
      if (attempt >= 100) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/**
 * A test image of `size` bytes backed up as VM `name` and served, as LUN 0 of target
 * `iqn.2026-12.io.bootrestore.test:NAME`, by a new server (`server`) with this `cache` config.
 */
async function serveImage(name: string, size: number, seed: number, cache: Record<string, unknown>): Promise<{ image: string; deltaDir: string; served: ServerProcess }> {
  const repo = join(dir.path, `repo-${name}`);
  const deltaDir = join(dir.path, `deltas-${name}`);
  const image = join(dir.path, `${name}.img`);
  await writeTestImage(image, size, seed);
  const point = await backupImage(image, repo, name);
  server = await startServerProcess({
    repository: repo,
    deltaDir,
    cache,
    targets: [{ iqn: `iqn.2026-12.io.bootrestore.test:${name}`, luns: [{ lun: 0, backup: { vm: name, point } }] }],
  });
  return { image, deltaDir, served: server };
}

async function readAll(url: string, out: string): Promise<void> {
  await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, out], { timeoutMs: 300_000 });
}

describe('shared chunk cache', () => {
  it('two mounts sharing most chunks: each shared chunk is cached and loaded once', async () => {
    const repo = join(dir.path, 'repo');
    const deltaDir = join(dir.path, 'deltas-shared');
    const a = join(dir.path, 'a.img');
    const b = join(dir.path, 'b.img');
    await writeTestImage(a, 48 * MiB, 11);
    // b = a with a few scattered chunks changed (a clone of the same VM template that drifted).
    const content = await readFile(a);
    for (const off of [3 * MiB, 17 * MiB + 5 * CHUNK, 40 * MiB + CHUNK]) pseudoRandom(CHUNK, off).copy(content, off);
    await writeFile(b, content);
    const pa = await backupImage(a, repo, 'vm-a', ['--chunk-size', String(CHUNK)]);
    const pb = await backupImage(b, repo, 'vm-b', ['--chunk-size', String(CHUNK)]);
    const da = await chunkDigests(a, CHUNK);
    const db = await chunkDigests(b, CHUNK);
    const distinct = new Set([...da, ...db]);
    const shared = [...da].filter((d) => db.has(d)).length;
    expect(shared).toBeGreaterThan(10);
    expect(distinct.size).toBeLessThan(da.size + db.size);

    server = await startServerProcess({
      repository: repo,
      deltaDir,
      cache: { maxBytes: '256MiB' },
      targets: [
        { iqn: 'iqn.2026-12.io.bootrestore.test:shared-a', luns: [{ lun: 0, backup: { vm: 'vm-a', point: pa } }] },
        { iqn: 'iqn.2026-12.io.bootrestore.test:shared-b', luns: [{ lun: 0, backup: { vm: 'vm-b', point: pb } }] },
      ],
    });
    await readAll(server.url(0, 'iqn.2026-12.io.bootrestore.test:shared-a'), join(dir.path, 'ra.img'));
    await readAll(server.url(0, 'iqn.2026-12.io.bootrestore.test:shared-b'), join(dir.path, 'rb.img'));
    expect((await readFile(join(dir.path, 'ra.img'))).equals(await readFile(a))).toBe(true);
    expect((await readFile(join(dir.path, 'rb.img'))).equals(content)).toBe(true);

    const ctl = await control(deltaDir);
    const stats = await ctl.request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    const mounts = await ctl.request<MountInfo[]>('GET', '/v1/mounts');
    console.info(
      `shared cache: ${stats.entries} entries (${distinct.size} distinct non-zero chunks, ${shared} shared), loads ${stats.loads}, ` +
        `shared entries ${stats.sharedEntries}, cross-mount hits ${stats.crossMountHits}, bytes ${stats.bytes}`,
    );
    expect(stats.entries).toBe(distinct.size);
    expect(stats.bytes).toBe(distinct.size * CHUNK);
    expect(stats.loads).toBe(distinct.size);
    expect(stats.sharedEntries).toBe(shared);
    expect(stats.crossMountHits).toBeGreaterThanOrEqual(shared);
    expect(mounts.map((m) => m.vm).sort()).toEqual(['vm-a', 'vm-b']);
    const metrics = await ctl.request<string>('GET', '/metrics');
    expect(metrics).toMatch(/bootrestore_cache_shared_entries \d+/);
    expect(metrics).toContain('bootrestore_lun_reads_total{mount=');
    await server.stop();
    server = undefined;
  });

  it('RSS stays below cache size + 150 MiB during a full sequential read of a larger LUN', async () => {
    const SIZE = 320 * MiB;
    const CACHE = 32 * MiB;
    const { image, deltaDir, served } = await serveImage('big', SIZE, 23, { maxBytes: CACHE });
    const out = join(dir.path, 'big-read.img');
    await readAll(served.url(0), out);
    expect((await readFile(out)).equals(await readFile(image))).toBe(true);
    const status = await readFile(`/proc/${served.child.pid}/status`, 'utf8');
    const hwmKiB = Number(/VmHWM:\s+(\d+) kB/.exec(status)?.[1]);
    const stats = await (await control(deltaDir)).request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    console.info(`RSS peak ${(hwmKiB / 1024).toFixed(1)} MiB after reading ${SIZE / MiB} MiB through a ${CACHE / MiB} MiB cache (cache now ${(stats.bytes / MiB).toFixed(1)} MiB, ${stats.evictions} evictions)`);
    expect(Number.isFinite(hwmKiB)).toBe(true);
    expect(stats.bytes).toBeLessThanOrEqual(CACHE);
    expect(stats.evictions).toBeGreaterThan(0);
    expect(hwmKiB * 1024).toBeLessThan(CACHE + 150 * MiB);
    await served.stop();
    server = undefined;
  });

  it('cache.preallocate: the cache memory is faulted in at start, loads read into it, RSS stays bounded', async () => {
    const SIZE = 192 * MiB;
    const CACHE = 96 * MiB;
    const { image, deltaDir, served } = await serveImage('pre', SIZE, 29, { maxBytes: CACHE, preallocate: true });
    const client = await control(deltaDir);
    let stats = await client.request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    for (let i = 0; i < 300 && stats.preallocating; i++) {
      await new Promise((r) => setTimeout(r, 100));
      stats = await client.request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    }
    expect(stats.preallocating).toBe(false);
    expect(stats.preallocatedBytes).toBeGreaterThan(CACHE - 512 * 1024);
    expect(stats.preallocatedBytes).toBeLessThanOrEqual(CACHE + 16 * 131_097); // + a buffer per concurrent load
    expect(stats.loads).toBe(0);
    // Faulted in, not just reserved address space: the resident set holds it.
    const rssKiB = (status: string, field: string): number => Number(new RegExp(`${field}:\\s+(\\d+) kB`).exec(status)?.[1]);
    const rssAfterReserve = rssKiB(await readFile(`/proc/${served.child.pid}/status`, 'utf8'), 'VmRSS');
    expect(rssAfterReserve * 1024).toBeGreaterThan(stats.preallocatedBytes);
    expect(await client.request<string>('GET', '/metrics')).toContain(`bootrestore_cache_preallocated_bytes ${stats.preallocatedBytes}\n`);
    const listing = await cli(['mounts', '--config', served.configFile]);
    expect(listing.stdout).toMatch(/; \d+\.\d MiB preallocated\n/);

    const out = join(dir.path, 'pre-read.img');
    await readAll(served.url(0), out);
    expect((await readFile(out)).equals(await readFile(image))).toBe(true);
    stats = await client.request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    const hwmKiB = rssKiB(await readFile(`/proc/${served.child.pid}/status`, 'utf8'), 'VmHWM');
    console.info(
      `preallocated ${(stats.preallocatedBytes / MiB).toFixed(1)} MiB (RSS then ${(rssAfterReserve / 1024).toFixed(1)} MiB); ` +
        `after a full read: ${stats.loads} loads, ${stats.recycledBuffers} into recycled or preallocated buffers, ${stats.evictions} evictions, RSS peak ${(hwmKiB / 1024).toFixed(1)} MiB`,
    );
    expect(stats.evictions).toBeGreaterThan(0);
    // Most loads read into a buffer they did not have to allocate. Not all: a chunk whose view was
    // handed out by a read inside one chunk is never reused, so later loads allocate anew (here ~8 %).
    // Without preallocation only the loads after the cache filled would (~27 %: 280 evictions).
    expect(stats.recycledBuffers).toBeGreaterThan(0.8 * stats.loads);
    expect(stats.bytes + stats.freeBufferBytes).toBeLessThanOrEqual(CACHE + 18 * 131_097);
    expect(hwmKiB * 1024).toBeLessThan(CACHE + 150 * MiB);
    await served.stop();
    server = undefined;
  });

  it('cache.preallocate larger than the machine: skipped with a warning, the server serves', async () => {
    const { image, deltaDir, served } = await serveImage('huge', 8 * MiB, 31, { maxBytes: '4096GiB', preallocate: true });
    const stats = await (await control(deltaDir)).request<ChunkCacheStats>('GET', '/v1/mounts/cache');
    expect(stats).toMatchObject({ preallocatedBytes: 0, preallocating: false });
    const warnings = served.logs().filter((l) => l.level === 40).map((l) => String(l.msg));
    expect(warnings.some((m) => m.startsWith('cache.maxBytes is larger than this machine'))).toBe(true);
    expect(warnings.some((m) => m.startsWith('cache.preallocate skipped'))).toBe(true);
    // It still serves the restore point.
    const head = join(dir.path, 'huge-head.img');
    await runChecked('qemu-img', ['dd', '-f', 'raw', '-O', 'raw', 'bs=1M', 'count=4', `if=${served.url(0)}`, `of=${head}`], { timeoutMs: 60_000 });
    expect((await readFile(head)).equals((await readFile(image)).subarray(0, 4 * MiB))).toBe(true);
    await served.stop();
    server = undefined;
  });

  it('cache.verify: a damaged chunk fails only its reads under either check; sha256 also catches a chunk stored under the wrong digest', async () => {
    const name = 'verify';
    const { image, served } = await serveImage(name, 8 * MiB, 37, { maxBytes: '64MiB' }); // verify: default 'crc32'
    const repo = join(dir.path, `repo-${name}`);
    const content = await readFile(image);
    const CHUNK_128K = 128 * 1024; // the backup's default chunk size
    const digestAt = (index: number): string => createHash('sha256').update(content.subarray(index * CHUNK_128K, (index + 1) * CHUNK_128K)).digest('hex');
    // Two chunks of 1 MiB stripe 2 of the test image: pseudo-random, stored once, uncompressed.
    const victim = 17;
    const donor = 18;
    const qemuRead = (chunk: number, url: string): Promise<{ exitCode: number | null; stdout: string; stderr: string }> =>
      runCommand('qemu-io', ['-f', 'raw', '-c', `read -v ${chunk * CHUNK_128K} 16`, url], { timeoutMs: 60_000 });

    // 1. A flipped payload byte: the default check (CRC32) refuses the chunk, the rest serves.
    const damaged = await corruptChunk(repo, digestAt(victim), undefined, 0x10);
    const bad = await qemuRead(victim, served.url(0));
    expect(`${bad.stdout}${bad.stderr}`).toMatch(/read failed|Input\/output error/);
    const good = await qemuRead(victim + 2, served.url(0));
    expect(good.exitCode).toBe(0);
    const failure = await served.waitForLog((l) => l.msg === 'chunk load failed');
    expect(JSON.stringify(failure)).toContain(`corrupt chunk ${digestAt(victim)}: CRC32 mismatch`);
    await damaged.restore();
    await served.stop();
    server = undefined;

    // 2. The victim's record overwritten by the donor's (a valid chunk, same length, its own CRC).
    const at = await chunkRecordLocation(repo, digestAt(victim));
    const donorRecord = await readChunkRecord(await chunkRecordLocation(repo, digestAt(donor)));
    const original = await readChunkRecord(at);
    expect(donorRecord.length).toBe(at.length);
    const put = async (record: Buffer): Promise<void> => {
      const fh = await open(at.path, 'r+');
      try {
        await fh.write(record, 0, record.length, at.offset);
      } finally {
        await fh.close();
      }
    };
    await put(donorRecord);
    try {
      const startWith = async (verify: string | undefined): Promise<ServerProcess> =>
        (server = await startServerProcess({
          repository: repo,
          deltaDir: join(dir.path, `deltas-${name}-${verify ?? 'default'}`),
          cache: verify === undefined ? { maxBytes: '64MiB' } : { maxBytes: '64MiB', verify },
          targets: [{ iqn: `iqn.2026-12.io.bootrestore.test:${name}`, luns: [{ lun: 0, backup: { vm: name, point: 'latest' } }] }],
        }));
      // crc32 (the default): the donor's bytes are served — what this check cannot see.
      const crcServer = await startWith(undefined);
      expect((await cli(['mounts', '--config', crcServer.configFile])).stdout).toContain('; chunks checked by CRC32');
      const whole = join(dir.path, 'verify-whole.img');
      await readAll(crcServer.url(0), whole);
      const servedBytes = await readFile(whole);
      const chunkOf = (b: Buffer, index: number): Buffer => b.subarray(index * CHUNK_128K, (index + 1) * CHUNK_128K);
      expect(chunkOf(servedBytes, victim).equals(chunkOf(content, donor))).toBe(true);
      chunkOf(content, victim).copy(servedBytes, victim * CHUNK_128K);
      expect(servedBytes.equals(content)).toBe(true); // everything else is right
      await crcServer.stop();
      // sha256: refused, reads around it still work.
      const shaServer = await startWith('sha256');
      expect((await cli(['mounts', '--config', shaServer.configFile])).stdout).toContain('; chunks checked by SHA-256');
      const refused = await qemuRead(victim, shaServer.url(0));
      expect(`${refused.stdout}${refused.stderr}`).toMatch(/read failed|Input\/output error/);
      expect((await qemuRead(victim - 1, shaServer.url(0))).exitCode).toBe(0);
      const shaFailure = await shaServer.waitForLog((l) => l.msg === 'chunk load failed');
      expect(JSON.stringify(shaFailure)).toContain(`corrupt chunk ${digestAt(victim)}: SHA-256 of the content does not match its name`);
      await shaServer.stop();
      server = undefined;
      // The backstop for 'crc32': `bootrestore verify` runs both checks and names the chunk.
      const verify = await cliResult(['verify', '--repo', repo]);
      expect(verify.exitCode).toBe(1);
      expect(verify.stdout).toContain(`BAD CHUNK ${digestAt(victim)} (${at.reportedPath}): SHA-256 of the content does not match its name`);
    } finally {
      await put(original);
    }
  });
});
