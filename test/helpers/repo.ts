/** Helpers for tests that back up images with the real CLI and inspect repositories. */
import { createHash } from 'node:crypto';
import { open, readFile, readdir, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { runChecked, runCommand, type CommandResult } from './exec.js';
import { openRestorePoint } from '../../src/backup/reader.js';
import { LAUNCHER } from './server.js';
import { pseudoRandomBytes } from './buffer-source.js';

/** Run `bin/bootrestore ARGS`; throws with its output on a non-zero exit. */
export function cli(args: readonly string[], timeoutMs = 300_000): Promise<CommandResult> {
  return runChecked(LAUNCHER, args, { timeoutMs });
}

/** Run the CLI and return the result whatever the exit code. */
export function cliResult(args: readonly string[], timeoutMs = 300_000): Promise<CommandResult> {
  return runCommand(LAUNCHER, args, { timeoutMs });
}

export interface BackupSummary {
  point: string;
  newChunks: number;
}

/** `bootrestore backup SOURCE --repo R --vm VM --json` → the new restore point id. */
export async function backupImage(source: string, repo: string, vm: string, extra: readonly string[] = []): Promise<string> {
  const r = await cli(['backup', source, '--repo', repo, '--vm', vm, '--json', ...extra]);
  const parsed = JSON.parse(r.stdout) as Record<string, unknown>;
  const id = (parsed.id ?? parsed.point ?? (parsed.info as Record<string, unknown> | undefined)?.id) as string | undefined;
  if (typeof id !== 'string') throw new Error(`backup --json printed no restore point id:\n${r.stdout}`);
  return id;
}

/** sha256 of every file below `dir` (relative path → hex): proves a tree unchanged. */
export async function hashTree(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const walk = async (d: string): Promise<void> => {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) out.set(relative(dir, p), createHash('sha256').update(await readFile(p)).digest('hex'));
    }
  };
  await walk(dir);
  return out;
}

/** Deterministic pseudo-random bytes (xorshift32): one generator for every test. */
export const pseudoRandom = pseudoRandomBytes;

/**
 * Write a test image: `size` bytes in 1 MiB stripes; stripe i is zero when i % 5 == 1, a copy of
 * stripe 0 when i % 7 == 3 (dedup), else pseudo-random from (seed, i).
 */
export async function writeTestImage(path: string, size: number, seed: number): Promise<void> {
  const MiB = 1 << 20;
  const fh = await open(path, 'w');
  try {
    const first = pseudoRandom(MiB, seed);
    for (let off = 0, i = 0; off < size; off += MiB, i++) {
      const len = Math.min(MiB, size - off);
      if (i % 5 === 1) continue;
      const data = i % 7 === 3 ? first : i === 0 ? first : pseudoRandom(MiB, seed * 1000 + i);
      await fh.write(data, 0, len, off);
    }
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/** Distinct sha256 digests of the non-zero `chunkSize` chunks of a file. */
export async function chunkDigests(path: string, chunkSize: number): Promise<Set<string>> {
  const data = await readFile(path);
  const out = new Set<string>();
  for (let off = 0; off < data.length; off += chunkSize) {
    const chunk = data.subarray(off, Math.min(data.length, off + chunkSize));
    if (chunk.every((b) => b === 0)) continue;
    out.add(createHash('sha256').update(chunk).digest('hex'));
  }
  return out;
}

export async function writeJson(path: string, value: unknown): Promise<void> {
  await writeFile(path, JSON.stringify(value, null, 2));
}

/** Every byte of a restore point ('latest' = the VM's newest), read through the reader API. */
export async function readWholePoint(repoDir: string, vm: string, pointId = 'latest'): Promise<Buffer> {
  const reader = await openRestorePoint(repoDir, vm, pointId);
  try {
    return await reader.read(0, reader.imageSize);
  } finally {
    await reader.close();
  }
}
