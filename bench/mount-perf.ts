/**
 * Instant-mount performance, side by side in one run (issue: instant mount):
 *   A. raw-file LUN served by bootrestore            (the upper bound for a mount)
 *   B. mounted restore point, cold cache             (server just started, OS page cache dropped if allowed)
 *   C. mounted restore point, warm cache             (after one full read; cache larger than the image)
 *   D. Debian's tgt serving the same raw file        (the baseline)
 * Workloads: one full sequential pass with 1 MiB reads at QD8 (qemu-img bench: a cold pass that
 * never re-reads), iscsi-perf sequential 1 MiB QD8 and random 4 KiB QD32 (S seconds each), and the
 * time until the boot marker of the test image booted by QEMU (raw file LUN vs cold mount).
 * Usage: scripts/bench.sh mount [--seconds N] [--size-mib N] [--skip-boot] [--json FILE]
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { runChecked } from '../test/helpers/exec.js';
import { runIscsiPerf } from '../test/helpers/libiscsi.js';
import { startTgt } from '../test/helpers/tgt.js';
import { startServerProcess, type ServerProcess } from '../test/helpers/server.js';
import { backupImage, writeTestImage } from '../test/helpers/repo.js';
import { makeTempDir } from '../test/helpers/tmp.js';
import { ensureBootImage } from '../test/helpers/boot-image.js';
import { bootFromIscsi } from '../test/helpers/qemu.js';

const { values: options } = parseArgs({
  options: {
    seconds: { type: 'string', default: process.env.BENCH_SECONDS ?? '10' },
    'size-mib': { type: 'string', default: '1024' },
    'skip-boot': { type: 'boolean', default: false },
    json: { type: 'string' },
  },
  strict: true,
});
const seconds = Number(options.seconds);
const sizeMiB = Number(options['size-mib']);
const IQN = 'iqn.2026-12.io.bootrestore.bench:mount';
const say = (line: string): void => void process.stdout.write(line + '\n');

async function dropPageCache(): Promise<boolean> {
  try {
    await runChecked('sync', [], { timeoutMs: 60_000 });
    await writeFile('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch {
    return false;
  }
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

async function measure(name: string, url: string, opts: { pass: boolean }): Promise<Row> {
  const row: Row = { name };
  if (opts.pass) row.seqPassMiBs = await sequentialPass(url);
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

async function main(): Promise<number> {
  const dir = await makeTempDir('bench-mount');
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

    // B. cold mount: fresh server, empty cache, OS page cache dropped where permitted
    const dropped = await dropPageCache();
    const cold = await startServerProcess(mountConfig('d-cold', (sizeMiB + 256) << 20));
    servers.push(cold);
    rows.push(await measure(`B mount cold${dropped ? '' : ' (page cache kept)'}`, cold.url(0), { pass: true }));
    // C. warm: the same server, now holding every chunk
    rows.push(await measure('C mount warm', cold.url(0), { pass: true }));
    await cold.stop();

    if (!options['skip-boot']) {
      const boot = await ensureBootImage();
      const bootRepo = join(dir.path, 'boot-repo');
      const bootPoint = await backupImage(boot.image, bootRepo, 'bootvm');
      const copy = join(dir.path, 'boot-copy.img');
      await writeFile(copy, await readFile(boot.image));
      const fileServer = await startServerProcess({ targets: [{ iqn: IQN, luns: [{ lun: 0, file: copy }] }] });
      servers.push(fileServer);
      const fromFile = await bootFromIscsi(fileServer.url(0), { timeoutMs: 180_000, nonce: 'bench-file' });
      await fileServer.stop();
      await dropPageCache();
      const mountServer = await startServerProcess({
        repository: bootRepo,
        deltaDir: join(dir.path, 'd-boot'),
        cache: { maxBytes: '256MiB' },
        targets: [{ iqn: IQN, luns: [{ lun: 0, backup: { vm: 'bootvm', point: bootPoint } }] }],
      });
      servers.push(mountServer);
      const fromMount = await bootFromIscsi(mountServer.url(0), { timeoutMs: 180_000, nonce: 'bench-mount' });
      await mountServer.stop();
      const ok = fromFile.markerSeen && fromMount.markerSeen && fromFile.done && fromMount.done;
      say(
        `  boot to marker / done: raw-file LUN ${fromFile.markerMs?.toFixed(0)} / ${fromFile.elapsedMs.toFixed(0)} ms; cold mount ${fromMount.markerMs?.toFixed(0)} / ${fromMount.elapsedMs.toFixed(0)} ms` +
          (ok ? '' : ' (a boot FAILED)'),
      );
      rows.push({ name: 'boot raw-file LUN', ...(fromFile.markerMs !== undefined ? { bootMarkerMs: fromFile.markerMs } : {}) });
      rows.push({ name: 'boot cold mount', ...(fromMount.markerMs !== undefined ? { bootMarkerMs: fromMount.markerMs } : {}) });
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
    say(`  cold sequential pass: ${B?.seqPassMiBs?.toFixed(0)} MiB/s (goal >= 1 GB/s where the disk allows)`);
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
