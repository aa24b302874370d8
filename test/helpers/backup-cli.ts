/** Build the backup CLI entry with esbuild and run it as a real child process. */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const ENTRY = fileURLToPath(new URL('./backup-cli-entry.ts', import.meta.url));

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/**
 * Bundle the entry into a fresh directory under node_modules/.cache (so that the external packages
 * pino and lru-cache resolve from the project's node_modules). Returns the .mjs path and a cleanup.
 */
export async function buildBackupCli(): Promise<{ cli: string; cleanup: () => Promise<void> }> {
  const cacheDir = join(ROOT, 'node_modules', '.cache');
  await mkdir(cacheDir, { recursive: true });
  const dir = await mkdtemp(join(cacheDir, 'bootrestore-backup-cli-'));
  const outfile = join(dir, 'backup-cli.mjs');
  await build({
    entryPoints: [ENTRY],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    packages: 'external',
    outfile,
    logLevel: 'silent',
    absWorkingDir: ROOT,
  });
  return { cli: outfile, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export interface CliResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Run the CLI to completion (killed after `timeoutMs`). */
export function runCli(cli: string, args: readonly string[], timeoutMs = 120_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}
