/**
 * Backup and reader benchmark: bootrestore's repository at several chunk sizes next to restic, on
 * one generated image with realistic content, in the same run.
 *
 *   npx esbuild bench/backup.ts --bundle --platform=node --format=esm --target=node20 \
 *     --packages=external --outfile=node_modules/.cache/bench-backup.mjs
 *   node node_modules/.cache/bench-backup.mjs [--size-mib 1024] [--chunk-sizes 64,256,1024,4096]
 *     [--no-restic] [--no-cold] [--random-reads 2000] [--json FILE] [--dir DIR]
 *     [--codecs deflate:1,brotli:2]  (default: deflate:1)
 *     [--unaligned-system-files] [--chunk-stores packs,files]  (default: packs)
 *
 * The image: 4 MiB regions, in a fixed pseudo-random order: 30% zero, 25% system files (bytes of
 * /usr/lib and /usr/bin, laid out as a filesystem does: each file from a 4 KiB block boundary, a
 * hard-linked file once; `--unaligned-system-files` restores the first version of this bench, which
 * concatenated files byte after byte and repeated hard links, e.g. Mesa's 25 MiB driver 9 times),
 * 10% log-like text, 15% copies of earlier data regions (duplicate files),
 * 20% random (compressed or encrypted data). The incremental step rewrites 400 scattered 4 KiB
 * blocks and one 8 MiB run (~1% of a 1 GiB image).
 * "stored" = disk space (allocated blocks, `du`); "apparent" = sum of file sizes (`du -b`): one file
 * per chunk rounds each up to a 4 KiB block, restic's pack files do not.
 * Reader figures use the plain reader (no cache): a random 4 KiB read loads, verifies and inflates
 * a whole chunk. "cold" = after `echo 3 > /proc/sys/vm/drop_caches` (skipped if not permitted).
 */
import { execFile } from 'node:child_process';
import { promises as fsp, readdirSync, statSync, openSync, readSync, closeSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { backupSource } from '../src/backup/engine.js';
import { openRestorePoint } from '../src/backup/reader.js';
import { xorshift32 } from '../test/helpers/prng.js';
import { RawSource } from '../src/backup/sources/raw.js';
import { codecLevelProblem, DEFAULT_CODEC, DEFAULT_CODEC_LEVEL, type ChunkCodec } from '../src/backup/format.js';
import { runBounded } from '../src/backup/writer.js';
import { CHUNK_STORE_KINDS, DEFAULT_CHUNK_STORE, type ChunkStoreKind } from '../src/backup/repository.js';
import type { DiskSource } from '../src/backup/types.js';

process.env.UV_THREADPOOL_SIZE ??= '16';
const exec = promisify(execFile);
const MiB = 1024 * 1024;

interface Options {
  sizeMib: number;
  chunkSizes: number[];
  restic: boolean;
  cold: boolean;
  randomReads: number;
  json: string | null;
  dir: string | null;
  /** Codec:level pairs; one row per chunk size and pair. */
  codecs: Array<{ codec: ChunkCodec; level: number }>;
  unalignedSystemFiles: boolean;
  /** Chunk stores of the repositories; one row per chunk size, codec and store. */
  chunkStores: ChunkStoreKind[];
}

function parseOptions(argv: string[]): Options {
  const o: Options = { sizeMib: 1024, chunkSizes: [64, 256, 1024, 4096], restic: true, cold: true, randomReads: 2000, json: null, dir: null, codecs: [{ codec: DEFAULT_CODEC, level: DEFAULT_CODEC_LEVEL[DEFAULT_CODEC] }], unalignedSystemFiles: false, chunkStores: [DEFAULT_CHUNK_STORE] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value`);
      return v;
    };
    if (a === '--size-mib') o.sizeMib = Number(next());
    else if (a === '--chunk-sizes') o.chunkSizes = next().split(',').map(Number);
    else if (a === '--no-restic') o.restic = false;
    else if (a === '--no-cold') o.cold = false;
    else if (a === '--random-reads') o.randomReads = Number(next());
    else if (a === '--json') o.json = next();
    else if (a === '--dir') o.dir = next();
    else if (a === '--codecs') {
      o.codecs = next()
        .split(',')
        .map((pair) => {
          const [codec, level] = pair.split(':');
          const c = codec as ChunkCodec;
          const l = level === undefined ? DEFAULT_CODEC_LEVEL[c] : Number(level);
          const problem = codecLevelProblem(c, l);
          if (problem !== undefined) throw new Error(problem);
          return { codec: c, level: l };
        });
    }
    else if (a === '--unaligned-system-files') o.unalignedSystemFiles = true;
    else if (a === '--chunk-stores') {
      o.chunkStores = next().split(',') as ChunkStoreKind[];
      for (const k of o.chunkStores) if (!CHUNK_STORE_KINDS.includes(k)) throw new Error(`unknown chunk store ${k}`);
    }
    else throw new Error(`unknown option ${a}`);
  }
  return o;
}

/** xorshift32 stream: deterministic pseudo-random numbers and bytes. */
class Rng {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = xorshift32(seed);
  }
  below(n: number): number {
    return this.next() % n;
  }
  fill(buf: Buffer): void {
    for (let i = 0; i + 4 <= buf.length; i += 4) buf.writeUInt32LE(this.next(), i);
  }
}

/**
 * Bytes of system files, to fill "system file" regions with real binaries and data. By default laid
 * out as a filesystem stores them: each file starts at a 4 KiB block boundary (the slack stays
 * zero) and a hard-linked file is stored once. `unaligned` concatenates every path's bytes.
 */
function systemBytes(total: number, unaligned: boolean): Buffer {
  const block = 4096;
  const out = Buffer.alloc(total);
  const seenInodes = new Set<string>();
  let filled = 0;
  const walk = (dir: string): void => {
    if (filled >= total) return;
    let names: string[];
    try {
      names = readdirSync(dir).sort();
    } catch {
      return;
    }
    for (const name of names) {
      if (filled >= total) return;
      const path = join(dir, name);
      let st;
      try {
        st = statSync(path);
      } catch {
        continue;
      }
      if (st.isDirectory()) walk(path);
      else if (st.isFile() && st.size > 0) {
        const inode = `${st.dev}:${st.ino}`;
        if (!unaligned && seenInodes.has(inode)) continue;
        seenInodes.add(inode);
        const fd = openSync(path, 'r');
        try {
          const got = readSync(fd, out, filled, Math.min(st.size, total - filled), 0);
          filled += unaligned ? got : Math.min(total, Math.ceil(got / block) * block);
        } catch {
          // unreadable file: skip
        } finally {
          closeSync(fd);
        }
      }
    }
  };
  walk('/usr/lib/x86_64-linux-gnu');
  walk('/usr/bin');
  walk('/usr/share');
  return out.subarray(0, filled);
}

async function makeImage(path: string, sizeMib: number, unalignedSystemFiles: boolean): Promise<void> {
  const region = 4 * MiB;
  const regions = Math.floor((sizeMib * MiB) / region);
  const rng = new Rng(0x1234567);
  const system = systemBytes(Math.ceil(regions * 0.25) * region, unalignedSystemFiles);
  const fh = await fsp.open(path, 'w+');
  await fh.truncate(regions * region);
  const written: number[] = [];
  let systemOffset = 0;
  const buf = Buffer.alloc(region);
  for (let r = 0; r < regions; r++) {
    const roll = rng.below(100);
    if (roll < 30) continue; // zero region: a hole
    if (roll < 55 && systemOffset + region <= system.length) {
      system.copy(buf, 0, systemOffset, systemOffset + region);
      systemOffset += region;
    } else if (roll < 65) {
      const lines: string[] = [];
      let len = 0;
      while (len < region) {
        const line = `2026-12-02T14:${String(rng.below(60)).padStart(2, '0')}:${String(rng.below(60)).padStart(2, '0')} host${rng.below(16)} service[${rng.below(30000)}]: request ${rng.next().toString(16)} took ${rng.below(5000)} ms status ${[200, 200, 200, 404, 500][rng.below(5)]}\n`;
        lines.push(line);
        len += line.length;
      }
      Buffer.from(lines.join('')).copy(buf, 0, 0, region);
    } else if (roll < 80 && written.length > 0) {
      // A copy of an earlier data region, shifted by a multiple of 64 KiB (a duplicate file).
      const from = written[rng.below(written.length)]!;
      const shift = rng.below(64) * 65536;
      const src = Buffer.alloc(region);
      await fh.read(src, 0, region, from * region);
      src.copy(buf, 0, shift);
      src.copy(buf, region - shift, 0, shift);
    } else {
      rng.fill(buf);
    }
    await fh.write(buf, 0, region, r * region);
    written.push(r);
  }
  await fh.sync();
  await fh.close();
}

/** ~1% change: 400 scattered 4 KiB blocks and one 8 MiB run, returned as changed ranges. */
async function modifyImage(path: string, size: number): Promise<Array<{ offset: number; length: number }>> {
  const rng = new Rng(0xbeef);
  const fh = await fsp.open(path, 'r+');
  const ranges: Array<{ offset: number; length: number }> = [];
  const block = Buffer.alloc(4096);
  for (let k = 0; k < 400; k++) {
    rng.fill(block);
    const offset = rng.below(size / 4096) * 4096;
    await fh.write(block, 0, 4096, offset);
    ranges.push({ offset, length: 4096 });
  }
  const run = Buffer.alloc(8 * MiB);
  rng.fill(run);
  const runOffset = Math.floor(size / 3 / MiB) * MiB;
  await fh.write(run, 0, run.length, runOffset);
  ranges.push({ offset: runOffset, length: run.length });
  await fh.sync();
  await fh.close();
  return ranges;
}

/**
 * Bytes of a directory tree as `du` counts them: disk space (allocated blocks, what the user pays)
 * or, `apparent`, the sum of file sizes (no block rounding).
 */
async function duBytes(path: string, apparent = false): Promise<number> {
  const { stdout } = await exec('du', ['-s', '--block-size=1', ...(apparent ? ['--apparent-size'] : []), path]);
  return Number(stdout.split('\t')[0]);
}

async function dropCaches(): Promise<boolean> {
  try {
    await exec('sync');
    await fsp.writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
}

/** Sequential 1 MiB reads over the whole image, 8 in flight: MB/s. */
async function readSequential(repo: string, vm: string, id: string): Promise<number> {
  const reader = await openRestorePoint(repo, vm, id);
  try {
    const size = reader.imageSize;
    const t = performance.now();
    await runBounded(Math.floor(size / MiB), 8, async (k) => {
      await reader.read(k * MiB, MiB);
    });
    return size / ((performance.now() - t) / 1000) / 1e6;
  } finally {
    await reader.close();
  }
}

/** Random 4 KiB reads, 32 in flight: IOPS and repository bytes loaded per read (whole chunks). */
async function readRandom(repo: string, vm: string, id: string, count: number): Promise<{ iops: number; bytesPerOp: number }> {
  const reader = await openRestorePoint(repo, vm, id);
  try {
    const rng = new Rng(42);
    const offsets = Array.from({ length: count }, () => rng.below(reader.imageSize / 4096) * 4096);
    let chunkBytes = 0;
    const t = performance.now();
    await runBounded(count, 32, async (k) => {
      const off = offsets[k]!;
      if (reader.chunkDigest(Math.floor(off / reader.chunkSize)) !== null) chunkBytes += reader.chunkSize;
      await reader.read(off, 4096);
    });
    return { iops: count / ((performance.now() - t) / 1000), bytesPerOp: chunkBytes / count };
  } finally {
    await reader.close();
  }
}

interface Row {
  tool: string;
  chunk: string;
  fullMBps: number;
  fullStoredMiB: number;
  /** Apparent size (sum of file sizes) of the full backup. */
  fullApparentMiB: number;
  fullSeconds: number;
  incMBps: number;
  incStoredMiB: number;
  incSeconds: number;
  cbtSeconds?: number;
  chunks?: number;
  files?: number;
  dedupChunks?: number;
  seqCold?: number;
  seqWarm?: number;
  randCold?: number;
  randWarm?: number;
  randBytesPerOp?: number;
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  const base = o.dir ?? (await fsp.mkdtemp(join(tmpdir(), 'bootrestore-bench-backup-')));
  const image = join(base, 'image.raw');
  const rows: Row[] = [];
  try {
    process.stderr.write(`generating ${o.sizeMib} MiB image in ${base} ...\n`);
    await makeImage(image, o.sizeMib, o.unalignedSystemFiles);
    const pristine = join(base, 'image.orig.raw');
    await exec('cp', ['--sparse=always', image, pristine]);
    const size = (await fsp.stat(image)).size;
    const canDrop = o.cold && (await dropCaches());

    for (const kib of o.chunkSizes) for (const { codec, level } of o.codecs) for (const chunkStore of o.chunkStores) {
      const codecOptions = { codec, compressionLevel: level };
      await exec('cp', ['--sparse=always', pristine, image]);
      const repo = join(base, `repo-${kib}k`);
      process.stderr.write(`bootrestore ${kib} KiB ${codec}-${level} ${chunkStore}: full backup ...\n`);
      let source: DiskSource = await RawSource.open(image);
      const full = await backupSource(repo, source, { vm: 'bench', chunkSize: kib * 1024, chunkStore, ...codecOptions });
      await source.close();
      const fullStored = await duBytes(repo);
      const fullApparent = await duBytes(repo, true);
      const ranges = await modifyImage(image, size);
      source = await RawSource.open(image);
      const inc = await backupSource(repo, source, { vm: 'bench', ...codecOptions });
      await source.close();
      const incStored = (await duBytes(repo)) - fullStored;
      // The same change again via changed-block tracking (reads only the listed ranges).
      source = await RawSource.open(image);
      const cbt = await backupSource(repo, source, { vm: 'bench', changedBlocks: ranges, ...codecOptions });
      await source.close();
      process.stderr.write(`bootrestore ${kib} KiB: reads ...\n`);
      const row: Row = {
        tool: 'bootrestore',
        chunk: `${kib} KiB ${codec}-${level} ${chunkStore}`,
        fullMBps: size / full.stats.seconds / 1e6,
        fullStoredMiB: fullStored / MiB,
        fullApparentMiB: fullApparent / MiB,
        fullSeconds: full.stats.seconds,
        incMBps: size / inc.stats.seconds / 1e6,
        incStoredMiB: incStored / MiB,
        incSeconds: inc.stats.seconds,
        cbtSeconds: cbt.stats.seconds,
        chunks: full.stats.chunks,
        files: full.stats.newChunks,
        dedupChunks: full.stats.dedupChunks,
      };
      if (canDrop) {
        await dropCaches();
        row.seqCold = await readSequential(repo, 'bench', full.info.id);
        await dropCaches();
        row.randCold = (await readRandom(repo, 'bench', full.info.id, o.randomReads)).iops;
      }
      await readSequential(repo, 'bench', full.info.id); // warm the page cache
      row.seqWarm = await readSequential(repo, 'bench', full.info.id);
      const warm = await readRandom(repo, 'bench', full.info.id, o.randomReads);
      row.randWarm = warm.iops;
      row.randBytesPerOp = warm.bytesPerOp;
      rows.push(row);
      await fsp.rm(repo, { recursive: true, force: true });
    }

    if (o.restic) {
      await exec('cp', ['--sparse=always', pristine, image]);
      const repo = join(base, 'restic');
      const env = { ...process.env, RESTIC_PASSWORD: 'bench', RESTIC_REPOSITORY: repo, RESTIC_CACHE_DIR: join(base, 'restic-cache') };
      await exec('restic', ['init', '--repository-version', '2'], { env });
      const emptyStored = await duBytes(repo);
      const emptyApparent = await duBytes(repo, true);
      process.stderr.write('restic: full backup ...\n');
      let t = performance.now();
      await exec('restic', ['backup', '--quiet', image], { env, maxBuffer: 64 * MiB });
      const fullSeconds = (performance.now() - t) / 1000;
      const fullStored = (await duBytes(repo)) - emptyStored;
      const fullApparent = (await duBytes(repo, true)) - emptyApparent;
      await modifyImage(image, size);
      t = performance.now();
      await exec('restic', ['backup', '--quiet', image], { env, maxBuffer: 64 * MiB });
      const incSeconds = (performance.now() - t) / 1000;
      const incStored = (await duBytes(repo)) - emptyStored - fullStored;
      rows.push({
        tool: 'restic 0.14 (zstd auto)',
        chunk: 'CDC ~1 MiB',
        fullMBps: size / fullSeconds / 1e6,
        fullStoredMiB: fullStored / MiB,
        fullApparentMiB: fullApparent / MiB,
        fullSeconds,
        incMBps: size / incSeconds / 1e6,
        incStoredMiB: incStored / MiB,
        incSeconds,
      });
    }

    const fmt = (v: number | undefined, d = 0): string => (v === undefined ? '-' : v.toFixed(d));
    const header = ['tool', 'chunk', 'full MB/s', 'full stored MiB', 'full apparent MiB', 'inc MB/s', 'inc stored MiB', 'cbt s', 'new chunks', 'dedup', 'seq cold MB/s', 'seq warm MB/s', 'rand4k cold IOPS', 'rand4k warm IOPS', 'repo bytes per 4k read'];
    const table = [header];
    for (const r of rows) {
      table.push([
        r.tool,
        r.chunk,
        fmt(r.fullMBps),
        fmt(r.fullStoredMiB, 1),
        fmt(r.fullApparentMiB, 1),
        fmt(r.incMBps),
        fmt(r.incStoredMiB, 1),
        fmt(r.cbtSeconds, 2),
        fmt(r.files),
        fmt(r.dedupChunks),
        fmt(r.seqCold),
        fmt(r.seqWarm),
        fmt(r.randCold),
        fmt(r.randWarm),
        r.randBytesPerOp === undefined ? '-' : `${(r.randBytesPerOp / 1024).toFixed(0)} KiB`,
      ]);
    }
    const widths = header.map((_, c) => Math.max(...table.map((row) => row[c]!.length)));
    const lines = table.map((row) => '| ' + row.map((cell, c) => cell.padEnd(widths[c]!)).join(' | ') + ' |');
    lines.splice(1, 0, '|' + widths.map((w) => '-'.repeat(w + 2)).join('|') + '|');
    process.stdout.write(`image ${o.sizeMib} MiB (${size} bytes, system files ${o.unalignedSystemFiles ? 'concatenated, hard links repeated' : 'block-aligned, hard links once'}), cold reads ${canDrop ? 'after drop_caches' : 'not measured'}\n`);
    process.stdout.write(lines.join('\n') + '\n');
    if (o.json) writeFileSync(o.json, JSON.stringify({ sizeMib: o.sizeMib, rows }, null, 2));
  } finally {
    if (o.dir === null) await fsp.rm(base, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
  process.exitCode = 1;
});
