import { spawn } from 'node:child_process';
import { openSync, closeSync, mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadConfig, type ServerConfig } from '../config/config.js';
import { STATE_FILE, type ServerStateFile } from '../service.js';

/** Talks to a running server's control API (see src/control/server.ts). */
export class ControlClient {
  constructor(readonly baseUrl: string) {}

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await fetch(this.baseUrl + path, {
      method,
      ...(body !== undefined ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      /* plain text (metrics) */
    }
    if (!res.ok) {
      const message = typeof parsed === 'object' && parsed !== null && 'error' in parsed ? String((parsed as { error: unknown }).error) : text;
      throw new Error(message);
    }
    return parsed as T;
  }
}

/** The control URL a config points to: its `control.listen`, or the running server's state file. */
async function controlUrlFor(config: ServerConfig): Promise<string | undefined> {
  if (config.control && config.control.port !== 0) return `http://${config.control.host}:${config.control.port}`;
  if (!config.deltaDir) return undefined;
  try {
    const state = JSON.parse(await readFile(join(config.deltaDir, STATE_FILE), 'utf8')) as ServerStateFile;
    return state.control;
  } catch {
    return undefined;
  }
}

/**
 * A client for the server running `configFile`, or undefined when none answers. `forMount`: the
 * caller is about to mount, so a config without "repository" is refused before anything starts.
 */
export async function findServer(configFile: string, forMount = false): Promise<{ client: ControlClient; config: ServerConfig } | undefined> {
  const config = await loadConfig(configFile);
  if (forMount && !config.repository) throw new Error(`${configFile}: mounts need a "repository" key`);
  const url = await controlUrlFor(config);
  if (!url) return undefined;
  const client = new ControlClient(url);
  try {
    await client.request('GET', '/v1/status');
    return { client, config };
  } catch {
    return undefined;
  }
}

export async function requireServer(configFile: string): Promise<ControlClient> {
  const found = await findServer(configFile);
  if (found) return found.client;
  const config = await loadConfig(configFile);
  const hint =
    config.deltaDir === undefined && (config.control === undefined || config.control.port === 0)
      ? ` — note: ${configFile} has neither "deltaDir" nor a fixed "control.listen" port, so a running server cannot be found`
      : '';
  throw new Error(`no bootrestore server is running for ${configFile} (start one with "bootrestore serve --config ${configFile}" or "bootrestore mount")${hint}`);
}

/**
 * Start `bootrestore serve --config FILE` in the background (log: <deltaDir>/server.log) and wait
 * until its control API answers.
 */
export async function startBackgroundServer(configFile: string, timeoutMs = 60_000): Promise<ControlClient> {
  const config = await loadConfig(configFile);
  if (!config.repository) throw new Error(`${configFile}: mounts need a "repository" key`);
  if (!config.deltaDir) throw new Error(`${configFile}: starting a server for mounts needs "deltaDir" (its state and log live there)`);
  mkdirSync(config.deltaDir, { recursive: true });
  const logPath = join(config.deltaDir, 'server.log');
  const log = openSync(logPath, 'a');
  const child = spawn(process.execPath, [process.argv[1]!, 'serve', '--config', configFile], {
    detached: true,
    stdio: ['ignore', log, log],
  });
  closeSync(log);
  let exited: number | null | undefined;
  child.once('exit', (code) => (exited = code));
  child.unref();
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (exited !== undefined) throw new Error(`the server exited with code ${exited} while starting; see ${logPath}`);
    const found = await findServer(configFile);
    if (found) return found.client;
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`the server did not start within ${timeoutMs / 1000} s; see ${logPath}`);
}
