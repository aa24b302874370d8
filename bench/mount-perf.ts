/**
 * Instant-mount performance, side by side in one run (issue: instant mount):
 *   A. raw-file LUN served by bootrestore            (the upper bound for a mount)
 *   B. mounted restore point, cold cache             (server just started, repository evicted from the page cache)
 *   B2. as B, with `cache.preallocate`                 (read once the server has reserved its cache memory)
 *   B3. as B2, with `cache.verify: "sha256"`           (each chunk's SHA-256 checked instead of its CRC32)
 *   C. mounted restore point, warm cache             (after one full read; cache larger than the image)
 *   E. cold mount in a running server                (another restore point, mounted with `bootrestore
 *                                                      mount` into a server that has served a full pass:
 *                                                      its cache is full, its code warm; repository evicted)
 *   D. Debian's tgt serving the same raw file        (the baseline)
 * Workloads: one full sequential pass with 1 MiB reads at QD8 (qemu-img bench: a cold pass that
 * never re-reads), iscsi-perf sequential 1 MiB QD8 and random 4 KiB QD32 (S seconds each), and the
 * time until the boot marker of the test image booted by QEMU (raw file LUN vs cold mount).
 * Usage: scripts/bench.sh mount-perf [--seconds N] [--size-mib N] [--skip-boot] [--boot-rounds N] [--json FILE]
 */
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { runChecked, runCommand } from '../test/helpers/exec.js';
import { runIscsiPerf } from '../test/helpers/libiscsi.js';
import { startTgt } from '../test/helpers/tgt.js';
import { startServerProcess, type ServerProcess } from '../test/helpers/server.js';
import { backupImage, cli, writeTestImage } from '../test/helpers/repo.js';
import { makeTempDir } from '../test/helpers/tmp.js';
import { ensureBootImage } from '../test/helpers/boot-image.js';
import { bootFromIscsi } from '../test/helpers/qemu.js';
import { median } from './stats.js';

const { values: options } = parseArgs({
  options: {
    seconds: { type: 'string', default: process.env.BENCH_SECONDS ?? '10' },
    'size-mib': { type: 'string', default: '1024' },
    'skip-boot': { type: 'boolean', default: false },
    'boot-rounds': { type: 'string', default: '9' },
    json: { type: 'string' },
  },
  strict: true,
});
const seconds = Number(options.seconds);
const sizeMiB = Number(options['size-mib']);
const bootRounds = Math.max(1, Number(options['boot-rounds']));
const IQN = 'iqn.2026-12.io.bootrestore.bench:mount';
const say = (line: string): void => void process.stdout.write(line + '\n');

/**
 * Evict every file of a repository from the OS page cache (POSIX_FADV_DONTNEED through GNU dd's
 * `iflag=nocache count=0`), so that a cold mount reads its chunks from the disk. Only the
 * repository: QEMU's own binaries and firmware stay cached, as they are for the raw-file runs.
 * Returns false if a file could not be evicted.
 */
async function evictFromPageCache(dirPath: string): Promise<boolean> {
  const files: string[] = [];
  const walk = async (at: string): Promise<void> => {
    for (const entry of await readdir(at, { withFileTypes: true })) {
      const path = join(at, entry.name);
      if (entry.isDirectory()) await walk(path);
      else if (entry.isFile()) files.push(path);
    }
  };
  await walk(dirPath);
  let ok = true;
  for (const file of files) {
    const r = await runCommand('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: 60_000 });
    if (r.exitCode !== 0) ok = false;
  }
  return ok;
}

/** One sequential pass over the whole LUN, 1 MiB reads at QD8, with qemu-img bench. MiB/s. */
async function sequentialPass(url: string): Promise<number> {
  const r = await runChecked('qemu-img', ['bench', '-f', 'raw', '-t', 'none', '-c', String(sizeMiB), '-d', '8', '-s', '1M', '-S', '1M', url], {
    timeoutMs: 600_000,
  });
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout + r.stderr);
  if (!m) throw new Error(`qemu-img bench printed no time:\n${r.stdout}${r.stderr}`);
  return sizeMiB / Number(m[1]);
}

interface Row {
  name: string;
  seqPassMiBs?: number;
  seqIops?: number;
  seqMiBs?: number;
  randIops?: number;
  bootMarkerMs?: number;
}

async function measure(name: string, url: string, opts: { pass: boolean; perf?: boolean }): Promise<Row> {
  const row: Row = { name };
  if (opts.pass) row.seqPassMiBs = await sequentialPass(url);
  if (opts.perf === false) {
    say(`  ${name.padEnd(26)} pass ${row.seqPassMiBs?.toFixed(0) ?? '-'} MiB/s`);
    return row;
  }
  const seq = await runIscsiPerf(url, { queueDepth: 8, blocksPerRequest: 2048, seconds, random: false });
  row.seqIops = seq.iops;
  row.seqMiBs = seq.mibPerSecond;
  const rand = await runIscsiPerf(url, { queueDepth: 32, blocksPerRequest: 8, seconds, random: true });
  row.randIops = rand.iops;
  say(
    `  ${name.padEnd(26)} pass ${row.seqPassMiBs?.toFixed(0) ?? '-'} MiB/s; seq ${row.seqMiBs} MiB/s (${row.seqIops} IOPS); rand 4K ${row.randIops} IOPS`,
  );
  return row;
}

/** Sum of the read latencies of the mount served by the server whose deltaDir is `deltaDir` (its /metrics). */
async function readLatencySumMs(deltaDir: string): Promise<number> {
  const state = JSON.parse(await readFile(join(deltaDir, 'server.json'), 'utf8')) as { control: string };
  const text = await (await fetch(`${state.control}/metrics`)).text();
  const sums = [...text.matchAll(/^bootrestore_lun_read_latency_seconds_sum\{[^}]*\} ([0-9.eE+-]+)$/gm)].map((m) => Number(m[1]));
  if (sums.length === 0) throw new Error('no read latency in /metrics');
  return sums.reduce((a, b) => a + b, 0) * 1000;
}

async function main(): Promise<number> {
  const dir = await makeTempDir('bench-mount');
  // Mount holds of this run's throw-away repositories stay in its folder, not the machine's.
  process.env.BOOTRESTORE_HOLDS_DIR = join(dir.path, 'holds');
  const servers: ServerProcess[] = [];
  const rows: Row[] = [];
  try {
    const image = join(dir.path, 'disk.img');
    say(`bench mount: ${sizeMiB} MiB image (1/5 zero, 1/7 repeated, rest random), ${seconds} s per iscsi-perf run`);
    await writeTestImage(image, sizeMiB << 20, 42);
    const repo = join(dir.path, 'repo');
    const t0 = performance.now();
    const point = await backupImage(image, repo, 'bench');
    say(`  backup: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    const mountConfig = (deltaDir: string, cacheBytes: number): Record<string, unknown> => ({
      repository: repo,
      deltaDir: join(dir.path, deltaDir),
      cache: { maxBytes: cacheBytes },
      targets: [{ iqn: IQN, luns: [{ lun: 0, backup: { vm: 'bench', point }, readOnly: true }] }],
    });

    // A. raw file LUN (bootrestore)
    const raw = await startServerProcess({ targets: [{ iqn: IQN, luns: [{ lun: 0, file: image, readOnly: true }] }] });
    servers.push(raw);
    await sequentialPass(raw.url(0)); // page cache warm for the file-based rows
    rows.push(await measure('A raw-file LUN', raw.url(0), { pass: true }));
    await raw.stop();

    // D. tgt, same file
    const tgt = await startTgt(image, { iqn: 'iqn.2026-12.io.bootrestore.bench:tgt', readOnly: true });
    try {
      rows.push(await measure('D tgt raw file', tgt.url, { pass: true }));
    } finally {
      await tgt.stop();
    }

    // B. cold mount: fresh server, empty cache, the repository's files not in the page cache
    const dropped = await evictFromPageCache(repo);
    const cold = await startServerProcess(mountConfig('d-cold', (sizeMiB + 256) << 20));
    servers.push(cold);
    rows.push(await measure(`B mount cold${dropped ? '' : ' (page cache kept)'}`, cold.url(0), { pass: true }));
    // C. warm: the same server, now holding every chunk
    rows.push(await measure('C mount warm', cold.url(0), { pass: true }));
    await cold.stop();

    // B2. as B, with `cache.preallocate`: the new server faults its cache memory in at start (on
    // the event loop, in slices). Timed from the start of the read, as B, once the reservation is
    // complete (how long that took is printed); the repository's files are evicted after it.
    // B3. as B2, with `cache.verify: "sha256"` instead of the default CRC32 check of each chunk.
    const preallocatedPass = async (row: string, deltas: string, cacheExtra: Record<string, unknown>): Promise<void> => {
      const cacheBytes = (sizeMiB + 256) << 20;
      const reserving = await startServerProcess({ ...mountConfig(deltas, cacheBytes), cache: { maxBytes: cacheBytes, preallocate: true, ...cacheExtra } });
      servers.push(reserving);
      const reserveStart = performance.now();
      let cacheState: { preallocating: boolean; preallocatedBytes: number } = { preallocating: true, preallocatedBytes: 0 };
      while (cacheState.preallocating && performance.now() - reserveStart < 120_000) {
        await new Promise((r) => setTimeout(r, 50));
        cacheState = (JSON.parse((await cli(['mounts', '--config', reserving.configFile, '--json'])).stdout) as { cache: typeof cacheState }).cache;
      }
      say(`  ${row.split(' ')[0]} server: ${(cacheState.preallocatedBytes / (1 << 20)).toFixed(0)} MiB of cache preallocated within ${((performance.now() - reserveStart) / 1000).toFixed(1)} s of its start (polled)`);
      const evicted = await evictFromPageCache(repo);
      rows.push(await measure(`${row}${evicted ? '' : ' (page cache kept)'}`, reserving.url(0), { pass: true, perf: false }));
      await reserving.stop();
    };
    await preallocatedPass('B2 mount cold, preallocated', 'd-prealloc', {});
    await preallocatedPass('B3 as B2, cache.verify sha256', 'd-prealloc-sha', { verify: 'sha256' });

    // E. cold mount in a running server. A server that has just started (B) gives its cache memory
    // the kernel has to fault in and zero (on this VM ~1 s per GiB: the host backs guest memory only
    // when first touched) and runs code V8 has not optimised yet. A server that has been serving has
    // neither cost: its cache is full and recycles the buffers of evicted chunks. Here: a server with
    // a 512 MiB cache reads all of restore point 1, then a second image's restore point is mounted
    // with the CLI and read cold (its chunks are in no cache, the repository not in the page cache).
    const image2 = join(dir.path, 'disk2.img');
    await writeTestImage(image2, sizeMiB << 20, 43);
    const point2 = await backupImage(image2, repo, 'bench2');
    const running = await startServerProcess(mountConfig('d-running', 512 << 20));
    servers.push(running);
    await sequentialPass(running.url(0));
    const mounted = JSON.parse((await cli(['mount', '--config', running.configFile, '--vm', 'bench2', '--point', point2, '--read-only', '--json'])).stdout) as { url: string };
    const droppedAgain = await evictFromPageCache(repo);
    rows.push(await measure(`E mount cold, running server${droppedAgain ? '' : ' (page cache kept)'}`, mounted.url, { pass: true, perf: false }));
    await running.stop();

    if (!options['skip-boot']) {
      // Boot times vary by a few hundred ms from one boot to the next: interleaved rounds, medians.
      // Only the time to the marker counts, so QEMU is stopped there (the tests boot to the end
      // and check the guest's disk hash and writes).
      const boot = await ensureBootImage();
      const bootRepo = join(dir.path, 'boot-repo');
      const bootPoint = await backupImage(boot.image, bootRepo, 'bootvm');
      const copy = join(dir.path, 'boot-copy.img');
      await writeFile(copy, await readFile(boot.image));
      const fileMs: number[] = [];
      const mountMs: number[] = [];
      const pairRatios: number[] = [];
      const readWaits: number[] = [];
      let failed = 0;
      for (let round = 0; round < bootRounds; round++) {
        const fileServer = await startServerProcess({ targets: [{ iqn: IQN, luns: [{ lun: 0, file: copy }] }] });
        servers.push(fileServer);
        const fromFile = await bootFromIscsi(fileServer.url(0), { timeoutMs: 180_000, nonce: `bench-file-${round}`, stopAtMarker: true });
        await fileServer.stop();
        // A new server, a new mount (empty delta, empty cache), the repository not in the page cache.
        await evictFromPageCache(bootRepo);
        const mountServer = await startServerProcess({
          repository: bootRepo,
          deltaDir: join(dir.path, `d-boot-${round}`),
          cache: { maxBytes: '256MiB' },
          targets: [{ iqn: IQN, luns: [{ lun: 0, backup: { vm: 'bootvm', point: bootPoint } }] }],
        });
        servers.push(mountServer);
        const fromMount = await bootFromIscsi(mountServer.url(0), { timeoutMs: 180_000, nonce: `bench-mount-${round}`, stopAtMarker: true });
        // What the cold path cost the guest directly: the time its reads spent in the mount, summed.
        const readWaitMs = await readLatencySumMs(join(dir.path, `d-boot-${round}`)).catch(() => undefined);
        if (readWaitMs !== undefined) readWaits.push(readWaitMs);
        await mountServer.stop();
        for (const [result, into] of [[fromFile, fileMs], [fromMount, mountMs]] as const) {
          if (result.markerSeen && result.markerMs !== undefined) into.push(result.markerMs);
          else failed++;
        }
        if (fromFile.markerMs !== undefined && fromMount.markerMs !== undefined) pairRatios.push(fromMount.markerMs / fromFile.markerMs);
        say(
          `  boot ${round + 1}/${bootRounds} to marker: raw-file LUN ${fromFile.markerMs?.toFixed(0) ?? 'FAILED'} ms; cold mount ${fromMount.markerMs?.toFixed(0) ?? 'FAILED'} ms` +
            (readWaitMs !== undefined ? ` (its reads took ${readWaitMs.toFixed(0)} ms in all)` : ''),
        );
      }
      const sortedRatios = [...pairRatios].sort((a, b) => a - b);
      if (sortedRatios.length > 0) {
        say(
          `  boot ratio per round (cold mount / raw-file LUN, same round): median ${median(sortedRatios).toFixed(3)}, ` +
            `range ${sortedRatios[0]!.toFixed(2)}–${sortedRatios[sortedRatios.length - 1]!.toFixed(2)}, ${sortedRatios.filter((r) => r <= 1.05).length} of ${sortedRatios.length} rounds <= 1.05; ` +
            `cold-mount reads took ${median(readWaits).toFixed(0)} ms per boot (median)`,
        );
      }
      const fileMedian = median(fileMs), mountMedian = median(mountMs);
      say(`  boot to marker, median of ${bootRounds}: raw-file LUN ${fileMedian.toFixed(0)} ms; cold mount ${mountMedian.toFixed(0)} ms` + (failed > 0 ? ` (${failed} boots FAILED)` : ''));
      rows.push({ name: 'boot raw-file LUN', ...(fileMs.length > 0 ? { bootMarkerMs: fileMedian } : {}) });
      rows.push({ name: 'boot cold mount', ...(mountMs.length > 0 ? { bootMarkerMs: mountMedian } : {}) });
    }

    const byName = (prefix: string): Row | undefined => rows.find((r) => r.name.startsWith(prefix));
    const ratio = (a?: number, b?: number): string => (a !== undefined && b ? (a / b).toFixed(2) : 'n/a');
    const A = byName('A '), B = byName('B '), C = byName('C '), D = byName('D ');
    say('');
    say('ratios                          seq pass  seq QD8  rand QD32');
    say(`  warm mount / raw-file LUN      ${ratio(C?.seqPassMiBs, A?.seqPassMiBs).padStart(8)} ${ratio(C?.seqIops, A?.seqIops).padStart(8)} ${ratio(C?.randIops, A?.randIops).padStart(10)}   (goal >= 0.9)`);
    say(`  cold mount / raw-file LUN      ${ratio(B?.seqPassMiBs, A?.seqPassMiBs).padStart(8)} ${ratio(B?.seqIops, A?.seqIops).padStart(8)} ${ratio(B?.randIops, A?.randIops).padStart(10)}`);
    say(`  raw-file LUN / tgt             ${ratio(A?.seqPassMiBs, D?.seqPassMiBs).padStart(8)} ${ratio(A?.seqIops, D?.seqIops).padStart(8)} ${ratio(A?.randIops, D?.randIops).padStart(10)}`);
    say(`  warm mount / tgt               ${ratio(C?.seqPassMiBs, D?.seqPassMiBs).padStart(8)} ${ratio(C?.seqIops, D?.seqIops).padStart(8)} ${ratio(C?.randIops, D?.randIops).padStart(10)}`);
    const E = byName('E '), B2 = byName('B2 '), B3 = byName('B3 ');
    const mbs = (mib?: number): string => (mib === undefined ? 'n/a' : `${mib.toFixed(0)} MiB/s = ${((mib * 1.048576) / 1000).toFixed(2)} GB/s`);
    say(`  cold sequential pass (goal >= 1 GB/s where the disk allows): new server ${mbs(B?.seqPassMiBs)}; new server, preallocated cache ${mbs(B2?.seqPassMiBs)} (with cache.verify sha256: ${mbs(B3?.seqPassMiBs)}); running server ${mbs(E?.seqPassMiBs)}`);
    const bf = byName('boot raw'), bm = byName('boot cold');
    if (bf?.bootMarkerMs && bm?.bootMarkerMs) say(`  boot to marker, cold mount / raw-file LUN: ${(bm.bootMarkerMs / bf.bootMarkerMs).toFixed(2)} (goal <= 1.05)`);
    if (options.json) await writeFile(options.json, JSON.stringify({ sizeMiB, seconds, rows }, null, 2));
    return 0;
  } finally {
    for (const s of servers) await s.stop().catch(() => undefined);
    await dir.remove();
  }
}

process.exitCode = await main();
