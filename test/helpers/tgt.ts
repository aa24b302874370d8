/**
 * Debian's tgt (1.0.85) as a reference iSCSI target on 127.0.0.1: one tgtd per call, serving one
 * file as LUN 1 (tgt's LUN 0 is its own controller). tgtd ignores SIGTERM, so stopping deletes
 * the target with --force and then the "system"; SIGKILL is the fallback, also on process exit.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { runChecked, runCommand, trackChild, waitForExit } from './exec.js';
import { freePort, waitForPort } from './ports.js';

export interface TgtTarget {
  /** iscsi://127.0.0.1:PORT/IQN/1 */
  url: string;
  /** iscsi://127.0.0.1:PORT (for discovery, e.g. iscsi-ls). */
  portalUrl: string;
  port: number;
  iqn: string;
  lun: number;
  /** tgtd's control number (-C). */
  control: number;
  /** tgtd's process id. */
  pid: number | undefined;
  /** tgtd's stdout+stderr so far. */
  log(): string;
  stop(): Promise<void>;
}

export interface TgtOptions {
  iqn?: string;
  readOnly?: boolean;
  /** Backing store type (tgtadm --bstype); default rdwr. Do not use thin provisioning as a baseline. */
  bsType?: string;
}

const started = new Set<TgtTarget>();

/** Stops every tgtd this process started (for afterAll hooks that lost track). */
export async function stopAllTgt(): Promise<void> {
  await Promise.all([...started].map((t) => t.stop()));
}

async function tgtadm(control: number, args: readonly string[]): Promise<string> {
  const result = await runChecked('tgtadm', ['-C', String(control), ...args], { timeoutMs: 15_000 });
  return result.stdout;
}

/** Starts tgtd on 127.0.0.1:<free port> serving `file` as LUN 1 with ACL ALL. */
export async function startTgt(file: string, opts: TgtOptions = {}): Promise<TgtTarget> {
  if (!existsSync(file)) throw new Error(`startTgt: no such file ${file}`);
  const iqn = opts.iqn ?? 'iqn.2026-12.io.bootrestore.test:tgt';
  let lastError: unknown;
  for (let attempt = 0; attempt < 5; attempt++) {
    // A distinct control number per instance (tgtd locks /run/tgtd/socket.N.lock).
    const control = 1000 + Math.floor(Math.random() * 30_000);
    if (existsSync(`/run/tgtd/socket.${control}.lock`) && existsSync(`/run/tgtd/socket.${control}`)) continue;
    const port = await freePort();
    try {
      return await startOnce(file, iqn, control, port, opts);
    } catch (error) {
      lastError = error;
    }
  }
  throw new Error(`startTgt: tgtd did not start: ${String(lastError)}`);
}

async function startOnce(file: string, iqn: string, control: number, port: number, opts: TgtOptions): Promise<TgtTarget> {
  const child: ChildProcess = spawn('tgtd', ['-f', '-C', String(control), '--iscsi', `portal=127.0.0.1:${port}`], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  trackChild(child);
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));
  child.stderr?.on('data', (chunk: Buffer) => (output += chunk.toString('utf8')));

  let stopped = false;
  const target: TgtTarget = {
    url: `iscsi://127.0.0.1:${port}/${iqn}/1`,
    portalUrl: `iscsi://127.0.0.1:${port}`,
    port,
    iqn,
    lun: 1,
    control,
    pid: child.pid,
    log: () => output,
    stop: async () => {
      if (stopped) return;
      stopped = true;
      started.delete(target);
      if (child.exitCode === null && child.signalCode === null) {
        await runCommand('tgtadm', ['-C', String(control), '--lld', 'iscsi', '--op', 'delete', '--mode', 'target', '--tid', '1', '--force'], { timeoutMs: 10_000 });
        await runCommand('tgtadm', ['-C', String(control), '--op', 'delete', '--mode', 'system'], { timeoutMs: 10_000 });
        if (!(await waitForExit(child, 5_000))) {
          child.kill('SIGKILL');
          await waitForExit(child, 5_000);
        }
      }
    },
  };
  started.add(target);
  try {
    // tgtd is ready when its control socket answers.
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`tgtd exited with ${child.exitCode}: ${output}`);
      const probe = await runCommand('tgtadm', ['-C', String(control), '--op', 'show', '--mode', 'sys'], { timeoutMs: 5_000 });
      if (probe.exitCode === 0) break;
      if (Date.now() > deadline) throw new Error(`tgtd -C ${control} did not answer: ${output}${probe.stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    const base = ['--lld', 'iscsi'];
    await tgtadm(control, [...base, '--op', 'new', '--mode', 'target', '--tid', '1', '-T', iqn]);
    const lunArgs = [...base, '--op', 'new', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '-b', file];
    if (opts.bsType) lunArgs.push('--bstype', opts.bsType);
    await tgtadm(control, lunArgs);
    if (opts.readOnly) {
      await tgtadm(control, [...base, '--op', 'update', '--mode', 'logicalunit', '--tid', '1', '--lun', '1', '--params', 'readonly=1']);
    }
    await tgtadm(control, [...base, '--op', 'bind', '--mode', 'target', '--tid', '1', '-I', 'ALL']);
    await waitForPort(port, 5_000);
    const portals = await tgtadm(control, [...base, '--op', 'show', '--mode', 'portal']);
    if (!portals.includes(`127.0.0.1:${port}`)) throw new Error(`tgtd is not listening on 127.0.0.1:${port}: ${portals}`);
    return target;
  } catch (error) {
    await target.stop();
    throw error;
  }
}
