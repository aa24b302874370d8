/**
 * Sequential read throughput of the disk-image source parsers (src/backup/sources), as backup uses
 * them: whole image, chunk by chunk, one read at a time.
 *
 *   npx esbuild bench/sources.ts --bundle --platform=node --format=esm --outfile=/tmp/bench-sources.mjs
 *   node /tmp/bench-sources.mjs [--size-mib 1024] [--chunk-kib 1024] [--parallel 1] [--dir /tmp] [--formats a,b]
 *
 * Makes a raw image of --size-mib with mixed content (random, zero, half-random blocks: about half
 * compressible), converts it with qemu-img to each format, then times our parser reading it all.
 * For reference it also times `qemu-img convert -O raw` of the same image into /dev/shm (qemu's own
 * reader plus a memory write). Images stay in the page cache: this measures parser CPU cost, not disks.
 * --parallel N keeps N chunk reads in flight (in order), as the backup engine may.
 * Prints one line per format and a JSON summary. MB/s here means MiB/s.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, writeSync, closeSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSource } from '../src/backup/sources/open.js';
import { xorshift32 } from '../test/helpers/prng.js';

interface Options {
  sizeMiB: number;
  chunkKiB: number;
  parallel: number;
  dir: string;
  formats: string[] | undefined;
}

function parseArgs(argv: string[]): Options {
  const options: Options = { sizeMiB: 1024, chunkKiB: 1024, parallel: 1, dir: tmpdir(), formats: undefined };
  for (let i = 0; i < argv.length; i++) {
    const value = argv[i + 1];
    switch (argv[i]) {
      case '--size-mib':
        options.sizeMiB = Number(value);
        i++;
        break;
      case '--chunk-kib':
        options.chunkKiB = Number(value);
        i++;
        break;
      case '--parallel':
        options.parallel = Number(value);
        i++;
        break;
      case '--dir':
        options.dir = String(value);
        i++;
        break;
      case '--formats':
        options.formats = String(value).split(',');
        i++;
        break;
      default:
        throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  return options;
}

const VARIANTS: Array<{ name: string; file: string; args: string[] }> = [
  { name: 'raw', file: 'image.raw', args: [] },
  { name: 'qcow2-64k', file: 'image-64k.qcow2', args: ['-O', 'qcow2'] },
  { name: 'qcow2-2m', file: 'image-2m.qcow2', args: ['-O', 'qcow2', '-o', 'cluster_size=2M'] },
  { name: 'qcow2-64k-compressed', file: 'image-c.qcow2', args: ['-O', 'qcow2', '-c'] },
  { name: 'qcow2-64k-extl2', file: 'image-extl2.qcow2', args: ['-O', 'qcow2', '-o', 'extended_l2=on'] },
  { name: 'vmdk-monolithicSparse', file: 'image-sparse.vmdk', args: ['-O', 'vmdk', '-o', 'subformat=monolithicSparse'] },
  { name: 'vmdk-streamOptimized', file: 'image-stream.vmdk', args: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'] },
  { name: 'vmdk-monolithicFlat', file: 'image-flat.vmdk', args: ['-O', 'vmdk', '-o', 'subformat=monolithicFlat'] },
];

function makeImage(path: string, sizeMiB: number): void {
  const next = xorshift32(0x2545f491);
  const block = Buffer.alloc(1024 * 1024);
  const words = new Uint32Array(block.buffer, block.byteOffset, block.length / 4);
  const fd = openSync(path, 'w');
  try {
    for (let mib = 0; mib < sizeMiB; mib++) {
      // Per 64 KiB: 1 in 8 zero, 3 in 8 random, 4 in 8 half random / half zero.
      for (let sub = 0; sub < 16; sub++) {
        const kind = (mib * 16 + sub) % 8;
        const start = sub * 16384; // in words
        for (let w = 0; w < 16384; w++) {
          words[start + w] = kind === 0 ? 0 : kind <= 3 ? next() : w < 8192 ? next() : 0;
        }
      }
      writeSync(fd, block);
    }
  } finally {
    closeSync(fd);
  }
}

async function timeRead(path: string, chunk: number, parallel: number): Promise<{ seconds: number; cpuSeconds: number; size: number; format: string }> {
  const source = await openSource(path);
  try {
    const cpuBefore = process.cpuUsage();
    const started = process.hrtime.bigint();
    let checksum = 0;
    const inFlight: Promise<Buffer>[] = [];
    for (let offset = 0; offset < source.size || inFlight.length > 0; offset += chunk) {
      if (offset < source.size) inFlight.push(source.read(offset, Math.min(chunk, source.size - offset)));
      if (inFlight.length >= parallel || offset + chunk >= source.size) {
        const data = await inFlight.shift()!;
        checksum ^= data[data.length - 1] ?? 0;
      }
    }
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    const cpu = process.cpuUsage(cpuBefore);
    if (checksum === -1) throw new Error('unreachable');
    // CPU time of the whole process (all threads: zlib and fs work runs in libuv's pool).
    return { seconds, cpuSeconds: (cpu.user + cpu.system) / 1e6, size: source.size, format: source.format };
  } finally {
    await source.close();
  }
}

function timeQemuConvert(path: string): number | undefined {
  if (!existsSync('/dev/shm')) return undefined;
  const out = join('/dev/shm', `bench-sources-${process.pid}.raw`);
  const started = process.hrtime.bigint();
  const result = spawnSync('qemu-img', ['convert', '-O', 'raw', path, out], { stdio: 'inherit' });
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  rmSync(out, { force: true });
  return result.status === 0 ? seconds : undefined;
}

async function main(): Promise<void> {
  const options = parseArgs(process.argv.slice(2));
  const dir = mkdtempSync(join(options.dir, 'bench-sources-'));
  const results: Array<Record<string, unknown>> = [];
  try {
    const raw = join(dir, 'image.raw');
    makeImage(raw, options.sizeMiB);
    for (const variant of VARIANTS) {
      if (options.formats !== undefined && !options.formats.includes(variant.name)) continue;
      const path = join(dir, variant.file);
      if (variant.args.length > 0) {
        const made = spawnSync('qemu-img', ['convert', '-f', 'raw', ...variant.args, raw, path], { stdio: 'inherit' });
        if (made.status !== 0) throw new Error(`qemu-img convert for ${variant.name} failed`);
      }
      await timeRead(path, options.chunkKiB * 1024, options.parallel); // warm the page cache
      const run = await timeRead(path, options.chunkKiB * 1024, options.parallel);
      const qemuSeconds = timeQemuConvert(path);
      const mibPerSecond = run.size / 1048576 / run.seconds;
      const qemuMiBPerSecond = qemuSeconds === undefined ? undefined : run.size / 1048576 / qemuSeconds;
      const cpuMsPerGiB = (run.cpuSeconds * 1000) / (run.size / 1073741824);
      results.push({
        variant: variant.name,
        format: run.format,
        sizeMiB: run.size / 1048576,
        seconds: run.seconds,
        mibPerSecond,
        cpuMsPerGiB,
        qemuMiBPerSecond,
      });
      process.stdout.write(
        `${variant.name.padEnd(24)} ${mibPerSecond.toFixed(0).padStart(6)} MiB/s  CPU ${cpuMsPerGiB.toFixed(0).padStart(6)} ms/GiB` +
          `  (qemu-img convert to /dev/shm: ${qemuMiBPerSecond?.toFixed(0) ?? 'n/a'} MiB/s)\n`,
      );
      if (variant.args.length > 0) rmSync(path, { force: true });
      if (variant.name === 'vmdk-monolithicFlat') rmSync(path.replace(/\.vmdk$/, '-flat.vmdk'), { force: true });
    }
    process.stdout.write(`${JSON.stringify({ chunkKiB: options.chunkKiB, parallel: options.parallel, results })}\n`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
