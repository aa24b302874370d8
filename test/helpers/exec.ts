import { spawn, type ChildProcess } from 'node:child_process';

/** Children still running; killed with SIGKILL when this process exits, whatever the reason. */
const liveChildren = new Set<ChildProcess>();
let exitHookInstalled = false;

/** Registers a child so that it never outlives the test process (see liveChildren). */
export function trackChild(child: ChildProcess): void {
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of liveChildren) {
        if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
      }
    });
  }
  liveChildren.add(child);
  child.once('exit', () => liveChildren.delete(child));
}

export interface CommandResult {
  stdout: string;
  stderr: string;
  /** null when killed by a signal. */
  exitCode: number | null;
  signal: NodeJS.Signals | null;
  timedOut: boolean;
  /** SIGINT was sent because the program still ran after `interruptAfterMs`. */
  interrupted: boolean;
  elapsedMs: number;
}

export interface CommandOptions {
  timeoutMs: number;
  /** Send SIGINT once if the program still runs after this many ms (a program that stops cleanly on it). */
  interruptAfterMs?: number;
  env?: Record<string, string>;
  cwd?: string;
}

/** Runs a program to completion (SIGKILL after timeoutMs) and captures its output. Never throws for a non-zero exit. */
export async function runCommand(program: string, args: readonly string[], opts: CommandOptions): Promise<CommandResult> {
  const started = performance.now();
  const child = spawn(program, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: opts.env ? { ...process.env, ...opts.env } : process.env,
    cwd: opts.cwd,
  });
  trackChild(child);
  const stdout: Buffer[] = [];
  const stderr: Buffer[] = [];
  child.stdout?.on('data', (chunk: Buffer) => stdout.push(chunk));
  child.stderr?.on('data', (chunk: Buffer) => stderr.push(chunk));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs);
  let interrupted = false;
  const interruptTimer =
    opts.interruptAfterMs === undefined
      ? undefined
      : setTimeout(() => {
          interrupted = true;
          child.kill('SIGINT');
        }, opts.interruptAfterMs);
  try {
    const [exitCode, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (code, sig) => resolve([code, sig]));
    });
    return {
      stdout: Buffer.concat(stdout).toString('utf8'),
      stderr: Buffer.concat(stderr).toString('utf8'),
      exitCode,
      signal,
      timedOut,
      interrupted,
      elapsedMs: performance.now() - started,
    };
  } finally {
    clearTimeout(timer);
    if (interruptTimer !== undefined) clearTimeout(interruptTimer);
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

/** Like runCommand, but throws (with the output) unless the program exits with status 0. */
export async function runChecked(program: string, args: readonly string[], opts: CommandOptions): Promise<CommandResult> {
  const result = await runCommand(program, args, opts);
  if (result.exitCode !== 0) {
    const why = result.timedOut ? `timed out after ${opts.timeoutMs} ms` : `exit ${result.exitCode ?? result.signal}`;
    throw new Error(`${program} ${args.join(' ')}: ${why}\n${result.stderr}${result.stdout}`.slice(0, 8000));
  }
  return result;
}

/** Waits for a child to exit; resolves false if it is still running after timeoutMs. */
export async function waitForExit(child: ChildProcess, timeoutMs: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return true;
  return await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => {
      child.off('exit', onExit);
      resolve(false);
    }, timeoutMs);
    const onExit = (): void => {
      clearTimeout(timer);
      resolve(true);
    };
    child.once('exit', onExit);
  });
}
