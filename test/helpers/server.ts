import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, writeFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { trackChild } from './exec.js';

export const REPO_ROOT = resolve(import.meta.dirname, '../..');
export const CLI = join(REPO_ROOT, 'dist/bootrestore.mjs');
/** The launcher users run (bin/bootrestore: the CLI bundle with its glibc malloc settings). */
export const LAUNCHER = join(REPO_ROOT, 'bin/bootrestore');

export interface ServerProcess {
  /** iscsi:// URL of a LUN (default target: the config's first). */
  url(lun: number, iqn?: string, options?: string): string;
  readonly port: number;
  readonly portals: string[];
  readonly configFile: string;
  readonly child: ChildProcess;
  /** SIGTERM and wait for a clean exit (SIGKILL after `graceMs`). Returns the exit code. */
  stop(graceMs?: number): Promise<number | null>;
  /** SIGKILL (crash simulation) and wait for the process to be gone. */
  kill9(): Promise<void>;
  /** Everything the server wrote to stderr (JSON log lines) so far. */
  stderr(): string;
  /** Parsed JSON log lines so far. */
  logs(): Array<Record<string, unknown>>;
  /** The first log line that matches, waiting for it up to `timeoutMs` (logging is asynchronous). */
  waitForLog(match: (line: Record<string, unknown>) => boolean, timeoutMs?: number): Promise<Record<string, unknown>>;
}

/**
 * Spawn `bin/bootrestore serve --config FILE` (run `npm run build` first) and wait until
 * every portal logs "listening". `config` is written to a temp file; its `listen` defaults to
 * 127.0.0.1:0 (an ephemeral port read back from the log).
 */
export async function startServerProcess(
  config: Record<string, unknown>,
  opts: { env?: Record<string, string>; timeoutMs?: number; configDir?: string } = {},
): Promise<ServerProcess> {
  const dir = opts.configDir ?? (await mkdtemp(join(tmpdir(), 'bootrestore-cfg-')));
  const configFile = join(dir, 'bootrestore.json');
  const full: Record<string, unknown> = { listen: ['127.0.0.1:0'], ...config };
  await writeFile(configFile, JSON.stringify(full, null, 2));
  const child = spawn(LAUNCHER, ['serve', '--config', configFile], {
    env: { ...process.env, BOOTRESTORE_LOG_LEVEL: process.env.BOOTRESTORE_LOG_LEVEL ?? 'info', ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  trackChild(child); // never outlives the test process
  let err = '';
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((res) => child.once('exit', (code) => res(code)));
  const portals: string[] = [];
  const wanted = (full.listen as string[]).length;
  await new Promise<void>((res, rej) => {
    const timer = setTimeout(() => rej(new Error(`server did not start in time; stderr:\n${err}`)), opts.timeoutMs ?? 30_000);
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      if (portals.length >= wanted) return;
      for (const line of err.split('\n')) {
        const rec = parseLine(line);
        if (rec?.msg === 'listening' && typeof rec.portal === 'string' && !portals.includes(rec.portal)) portals.push(rec.portal);
      }
      if (portals.length >= wanted) {
        clearTimeout(timer);
        res();
      }
    });
    void exited.then((code) => {
      clearTimeout(timer);
      rej(new Error(`server exited with ${code} before listening; stderr:\n${err}\nstdout:\n${out}`));
    });
  });
  const firstIqn = ((full.targets as Array<{ iqn: string }> | undefined) ?? [])[0]?.iqn ?? '';
  const port = Number(portals[0]!.split(':').pop());
  let done = false;
  const logs = (): Array<Record<string, unknown>> => err.split('\n').map(parseLine).filter((r): r is Record<string, unknown> => r !== undefined);
  return {
    port,
    portals,
    configFile,
    child,
    url: (lun, iqn = firstIqn, options = '') => `iscsi://127.0.0.1:${port}/${iqn}/${lun}${options}`,
    async stop(graceMs = 15_000) {
      if (done) return child.exitCode;
      done = true;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      const code = await exited;
      clearTimeout(timer);
      if (!opts.configDir) await rm(dir, { recursive: true, force: true });
      return code;
    },
    async kill9() {
      done = true;
      child.kill('SIGKILL');
      await exited;
    },
    stderr: () => err,
    logs,
    async waitForLog(match, timeoutMs = 5000) {
      for (const deadline = Date.now() + timeoutMs; ; ) {
        const found = logs().find(match);
        if (found !== undefined) return found;
        if (Date.now() > deadline) throw new Error(`no matching log line within ${timeoutMs} ms; stderr so far:\n${err.slice(-2000)}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    },
  };
}

function parseLine(line: string): Record<string, unknown> | undefined {
  if (!line.startsWith('{')) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}
