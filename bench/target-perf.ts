/**
 * Target throughput, bootrestore against Debian's tgt in one run, same file, same client:
 *   iscsi-perf -m 8  -b 2048 -t S URL      sequential 1 MiB reads, queue depth 8
 *   iscsi-perf -m 32 -b 8    -t S -r URL   random 4 KiB reads, queue depth 32
 * Runs are interleaved (tgt, bootrestore, tgt, bootrestore) so machine noise hits both alike.
 * Build and run with scripts/bench.sh [options]; options:
 *   --seconds N     duration of each iscsi-perf run (default 10; env BENCH_SECONDS)
 *   --size-mib N    size of the served file (default 1024)
 *   --file PATH     serve this file instead of a generated one (it is only read)
 *   --sparse        generate a sparse file instead of one filled with data
 *   --rounds N      repeat the interleaved pair N times and report the median (default 1)
 *   --only tgt|bootrestore
 *   --cli PATH      bootrestore CLI bundle (default dist/bootrestore.mjs)
 *   --json PATH     also write the results as JSON
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { trackChild, waitForExit } from '../test/helpers/exec.js';
import { runIscsiPerf, type PerfResult } from '../test/helpers/libiscsi.js';
import { startTgt, type TgtTarget } from '../test/helpers/tgt.js';
import { median } from './stats.js';

interface Workload {
  name: 'seq-1MiB-qd8' | 'rand-4KiB-qd32';
  queueDepth: number;
  blocksPerRequest: number;
  random: boolean;
}

const WORKLOADS: readonly Workload[] = [
  { name: 'seq-1MiB-qd8', queueDepth: 8, blocksPerRequest: 2048, random: false },
  { name: 'rand-4KiB-qd32', queueDepth: 32, blocksPerRequest: 8, random: true },
];

type TargetName = 'tgt' | 'bootrestore';

interface Measurement {
  target: TargetName;
  workload: Workload['name'];
  round: number;
  iops: number;
  mibPerSecond: number;
  samples: number[];
}

interface RunningTarget {
  name: TargetName;
  url: string;
  stop(): Promise<void>;
}

const { values: options } = parseArgs({
  options: {
    seconds: { type: 'string', default: process.env.BENCH_SECONDS ?? '10' },
    'size-mib': { type: 'string', default: '1024' },
    file: { type: 'string' },
    sparse: { type: 'boolean', default: false },
    rounds: { type: 'string', default: '1' },
    only: { type: 'string' },
    cli: { type: 'string', default: 'dist/bootrestore.mjs' },
    json: { type: 'string' },
  },
  strict: true,
});

function positiveInteger(text: string, what: string): number {
  const value = Number(text);
  if (!Number.isInteger(value) || value <= 0) throw new Error(`--${what} must be a positive integer, got ${JSON.stringify(text)}`);
  return value;
}

const seconds = positiveInteger(options.seconds, 'seconds');
const sizeMiB = positiveInteger(options['size-mib'], 'size-mib');
const rounds = positiveInteger(options.rounds, 'rounds');
if (options.only !== undefined && options.only !== 'tgt' && options.only !== 'bootrestore') {
  throw new Error(`--only must be tgt or bootrestore, got ${options.only}`);
}
const wanted: TargetName[] = options.only ? [options.only as TargetName] : ['tgt', 'bootrestore'];

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

/** A file of sizeMiB MiB: a random 1 MiB block written repeatedly (or a sparse file). */
async function makeLunFile(dir: string): Promise<string> {
  const path = join(dir, 'lun.img');
  if (options.sparse) {
    await writeFile(path, '');
    const handle = await open(path, 'r+');
    await handle.truncate(sizeMiB << 20);
    await handle.close();
    return path;
  }
  const block = randomBytes(1 << 20);
  const handle = await open(path, 'w');
  try {
    for (let i = 0; i < sizeMiB; i++) {
      block.writeUInt32LE(i, 0); // no two MiB alike
      await handle.write(block, 0, block.length, i * block.length);
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
  return path;
}

/** `node CLI serve --config FILE`; ready when the pino log says msg "listening" with a portal. */
async function startBootrestore(file: string, dir: string): Promise<RunningTarget> {
  const iqn = 'iqn.2026-12.io.bootrestore:bench';
  const configFile = join(dir, 'bootrestore.json');
  await writeFile(configFile, JSON.stringify({ listen: ['127.0.0.1:0'], targets: [{ iqn, luns: [{ lun: 0, file, readOnly: true }] }] }, null, 2));
  const child: ChildProcess = spawn(process.execPath, [resolve(options.cli), 'serve', '--config', configFile], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, BOOTRESTORE_LOG_LEVEL: process.env.BOOTRESTORE_LOG_LEVEL ?? 'info' },
  });
  trackChild(child);
  let stderr = '';
  const port = await new Promise<number>((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`bootrestore did not log "listening" in 30 s:\n${stderr.slice(-3000)}`)), 30_000);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`bootrestore exited with ${code} before listening:\n${stderr.slice(-3000)}`));
    });
    child.stderr?.on('data', (chunk: Buffer) => {
      stderr += chunk.toString('utf8');
      for (const line of stderr.split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          const record = JSON.parse(line) as { msg?: unknown; portal?: unknown };
          if (record.msg === 'listening' && typeof record.portal === 'string') {
            clearTimeout(timer);
            resolvePort(Number(record.portal.split(':').pop()));
            return;
          }
        } catch {
          // a partial line: wait for more
        }
      }
      if (stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 16));
    });
  }).catch(async (error: unknown) => {
    child.kill('SIGKILL');
    await waitForExit(child, 5_000);
    throw error;
  });
  return {
    name: 'bootrestore',
    url: `iscsi://127.0.0.1:${port}/${iqn}/0`,
    stop: async () => {
      child.kill('SIGTERM');
      if (!(await waitForExit(child, 15_000))) {
        child.kill('SIGKILL');
        await waitForExit(child, 5_000);
      }
    },
  };
}

async function main(): Promise<number> {
  const dir = await mkdtemp(join(tmpdir(), 'bootrestore-bench-'));
  const targets: RunningTarget[] = [];
  let tgt: TgtTarget | undefined;
  const failures: string[] = [];
  try {
    const file = options.file ? resolve(options.file) : await makeLunFile(dir);
    say(`bench: ${file} (${options.file ? 'given' : options.sparse ? 'sparse' : 'filled'}, ${sizeMiB} MiB generated size), ${seconds} s per run, ${rounds} round(s)`);
    for (const name of wanted) {
      try {
        if (name === 'tgt') {
          tgt = await startTgt(file, { iqn: 'iqn.2026-12.io.bootrestore.bench:tgt', readOnly: true });
          targets.push({ name: 'tgt', url: tgt.url, stop: () => tgt!.stop() });
        } else {
          targets.push(await startBootrestore(file, dir));
        }
      } catch (error) {
        failures.push(`${name}: could not start: ${error instanceof Error ? error.message : String(error)}`);
      }
    }
    // Warm-up (not recorded): both targets read the whole file once, so page cache state is alike.
    for (const target of targets) {
      await runIscsiPerf(target.url, { queueDepth: 8, blocksPerRequest: 2048, seconds: Math.min(seconds, 3), random: false }).catch((error: unknown) => {
        failures.push(`${target.name} warm-up: ${error instanceof Error ? error.message : String(error)}`);
      });
    }
    const measurements: Measurement[] = [];
    for (let round = 0; round < rounds; round++) {
      for (const workload of WORKLOADS) {
        for (const target of targets) {
          let result: PerfResult;
          try {
            result = await runIscsiPerf(target.url, { ...workload, seconds });
          } catch (error) {
            failures.push(`${target.name} ${workload.name}: ${error instanceof Error ? error.message : String(error)}`);
            continue;
          }
          measurements.push({ target: target.name, workload: workload.name, round, iops: result.iops, mibPerSecond: result.mibPerSecond, samples: result.samples });
          say(`  round ${round + 1} ${workload.name.padEnd(15)} ${target.name.padEnd(11)} ${String(result.iops).padStart(7)} IOPS ${String(result.mibPerSecond).padStart(6)} MiB/s`);
        }
      }
    }
    say('');
    say(`${'workload'.padEnd(15)} ${'tgt'.padStart(22)} ${'bootrestore'.padStart(22)}  ratio (bootrestore / tgt)`);
    const summary: Record<string, Partial<Record<TargetName, { iops: number; mibPerSecond: number }>> & { ratio?: number }> = {};
    for (const workload of WORKLOADS) {
      const row: (typeof summary)[string] = {};
      for (const name of ['tgt', 'bootrestore'] as const) {
        const ours = measurements.filter((m) => m.target === name && m.workload === workload.name);
        if (ours.length > 0) row[name] = { iops: median(ours.map((m) => m.iops)), mibPerSecond: median(ours.map((m) => m.mibPerSecond)) };
      }
      if (row.tgt && row.bootrestore && row.tgt.iops > 0) row.ratio = row.bootrestore.iops / row.tgt.iops;
      summary[workload.name] = row;
      const cell = (v?: { iops: number; mibPerSecond: number }): string => (v ? `${v.iops} IOPS ${v.mibPerSecond} MiB/s` : 'n/a').padStart(22);
      say(`${workload.name.padEnd(15)} ${cell(row.tgt)} ${cell(row.bootrestore)}  ${row.ratio !== undefined ? row.ratio.toFixed(2) : 'n/a'}`);
    }
    for (const failure of failures) say(`FAILED ${failure}`);
    if (options.json) {
      await writeFile(options.json, JSON.stringify({ seconds, sizeMiB, rounds, sparse: options.sparse, measurements, summary, failures }, null, 2));
    }
    return failures.length > 0 ? 1 : 0;
  } finally {
    for (const target of targets) await target.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

process.exitCode = await main();
