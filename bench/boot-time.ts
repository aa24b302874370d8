/**
 * Boot time of the test image (docs/boot-image.md) under QEMU TCG, every source in one run:
 *   file         local raw file (baseline)
 *   tgt          Debian's tgt serving a copy of the file
 *   br-file      bootrestore serving a copy of the file (file LUN)
 *   br-backup    bootrestore serving the latest restore point of a backup of the file
 *                (a fresh server per boot: cold chunk cache; writes go to a delta)
 * Reported per boot: host ms until /init printed its marker, the guest's uptime then (so
 * "pre-kernel" = BIOS + syslinux loading ~19 MB through int13), and host ms until DONE.
 * Run: scripts/bench.sh boot-time [--rounds N] [--chunk-size SIZE (default: the backup default)] [--only a,b] [--json FILE]
 */
import { copyFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ensureBootImage } from '../test/helpers/boot-image.js';
import { runChecked } from '../test/helpers/exec.js';
import { bootFromFile, bootFromIscsi, type BootResult } from '../test/helpers/qemu.js';
import { CLI, startServerProcess } from '../test/helpers/server.js';
import { startTgt } from '../test/helpers/tgt.js';

type Source = 'file' | 'tgt' | 'br-file' | 'br-backup';
const ALL_SOURCES: readonly Source[] = ['file', 'tgt', 'br-file', 'br-backup'];

const { values: options } = parseArgs({
  options: {
    rounds: { type: 'string', default: '1' },
    'chunk-size': { type: 'string' },
    only: { type: 'string' },
    'timeout-s': { type: 'string', default: '300' },
    json: { type: 'string' },
  },
  strict: true,
});

const rounds = Number(options.rounds);
const timeoutMs = Number(options['timeout-s']) * 1000;
if (!Number.isInteger(rounds) || rounds <= 0) throw new Error(`--rounds must be a positive integer, got ${options.rounds}`);
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) throw new Error(`--timeout-s must be positive, got ${options['timeout-s']}`);
const sources = (options.only ? options.only.split(',') : [...ALL_SOURCES]) as Source[];
for (const source of sources) {
  if (!ALL_SOURCES.includes(source)) throw new Error(`--only: unknown source ${source} (known: ${ALL_SOURCES.join(', ')})`);
}

interface BootMeasurement {
  source: Source;
  round: number;
  ok: boolean;
  markerMs?: number;
  markerUptimeS?: number;
  doneUptimeS?: number;
  totalMs: number;
  problem?: string;
}

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

async function main(): Promise<number> {
  const image = await ensureBootImage();
  const dir = await mkdtemp(join(tmpdir(), 'bootrestore-boot-bench-'));
  // Mount holds of this run's throw-away repositories stay in its folder, not the machine's.
  process.env.BOOTRESTORE_HOLDS_DIR = join(dir, 'holds');
  const measurements: BootMeasurement[] = [];
  try {
    let repo: string | undefined;
    if (sources.includes('br-backup')) {
      repo = join(dir, 'repo');
      const chunkSize = options['chunk-size'] !== undefined ? ['--chunk-size', options['chunk-size']] : [];
      await runChecked(process.execPath, [CLI, 'backup', image.image, '--repo', repo, '--vm', 'bootvm', ...chunkSize], { timeoutMs: 300_000 });
    }
    say(`boot-time: image ${image.manifest.key}, ${rounds} round(s), backup chunk size ${options['chunk-size'] ?? 'default'}`);
    for (let round = 0; round < rounds; round++) {
      for (const source of sources) {
        const disk = join(dir, `${source}-${round}.img`);
        const nonce = `${source}-${round}`;
        let result: BootResult;
        if (source === 'file') {
          await copyFile(image.image, disk);
          result = await bootFromFile(disk, { timeoutMs, nonce });
        } else if (source === 'tgt') {
          await copyFile(image.image, disk);
          const tgt = await startTgt(disk, { iqn: 'iqn.2026-12.io.bootrestore.bench:boot' });
          try {
            result = await bootFromIscsi(tgt.url, { timeoutMs, nonce });
          } finally {
            await tgt.stop();
          }
        } else {
          const iqn = 'iqn.2026-12.io.bootrestore:boot-bench';
          let lun: Record<string, unknown>;
          const config: Record<string, unknown> = {};
          if (source === 'br-file') {
            await copyFile(image.image, disk);
            lun = { lun: 0, file: disk, readOnly: false };
          } else {
            lun = { lun: 0, backup: { vm: 'bootvm', point: 'latest', mount: `bench-${round}` }, readOnly: false };
            config.repository = repo;
            config.deltaDir = join(dir, `delta-${round}`);
          }
          const server = await startServerProcess({ ...config, targets: [{ iqn, luns: [lun] }] });
          try {
            result = await bootFromIscsi(server.url(0), { timeoutMs, nonce });
          } finally {
            await server.stop();
          }
        }
        const ok = result.markerSeen && result.done && result.guestHash === image.manifest.hashRegion.sha256 && result.scratchOk === true;
        const measurement: BootMeasurement = { source, round, ok, totalMs: Math.round(result.elapsedMs) };
        if (result.markerMs !== undefined) measurement.markerMs = Math.round(result.markerMs);
        if (result.markerUptime !== undefined) measurement.markerUptimeS = result.markerUptime;
        if (result.doneUptime !== undefined) measurement.doneUptimeS = result.doneUptime;
        if (!ok) measurement.problem = `marker=${result.markerSeen} done=${result.done} hash=${result.guestHash} scratch=${result.scratchStatus} timedOut=${result.timedOut} ${result.qemuStderr.slice(-300)}`;
        measurements.push(measurement);
        const preKernel = measurement.markerMs !== undefined && measurement.markerUptimeS !== undefined ? measurement.markerMs - measurement.markerUptimeS * 1000 : NaN;
        say(
          `  round ${round + 1} ${source.padEnd(10)} ${ok ? 'ok  ' : 'FAIL'} marker ${String(measurement.markerMs ?? '-').padStart(6)} ms` +
            ` (pre-kernel ~${Number.isNaN(preKernel) ? '-' : Math.round(preKernel)} ms) done at guest uptime ${measurement.doneUptimeS ?? '-'} s, total ${measurement.totalMs} ms` +
            (measurement.problem ? `\n    ${measurement.problem}` : ''),
        );
      }
    }
    if (options.json) await writeFile(options.json, JSON.stringify({ rounds, chunkSize: options['chunk-size'] ?? 'default', measurements }, null, 2));
    return measurements.every((m) => m.ok) ? 0 : 1;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

process.exitCode = await main();
