/**
 * Boots the test image (boot-image.ts) in QEMU under TCG (/dev/kvm here fails in real mode) and
 * reads the guest's report from its serial console. QEMU is always killed at the end.
 */
import { spawn } from 'node:child_process';
import { createWriteStream, type WriteStream } from 'node:fs';
import { trackChild, waitForExit } from './exec.js';

export { ensureBootImage, expectedGuestHash, scratchPattern, readScratch, sha256OfRange } from './boot-image.js';

export interface BootOptions {
  timeoutMs: number;
  /** Serial console output is also written here. */
  logFile?: string;
  extraArgs?: string[];
  /** Stamped into the scratch pattern (QEMU fw_cfg opt/io.bootrestore/nonce); ≤ 43 characters. */
  nonce?: string;
  /** Do not write the scratch area (read-only LUNs). */
  skipScratch?: boolean;
  /** QEMU's iSCSI initiator name (-iscsi initiator-name=...), for target ACLs. */
  initiatorName?: string;
  memoryMiB?: number;
  /** Attach the disk read-only (readonly=on): QEMU refuses a write-protected LUN otherwise. */
  readOnly?: boolean;
  /** Kill QEMU as soon as the BOOT-OK marker arrives (boot-time benchmarks: nothing after it is timed). */
  stopAtMarker?: boolean;
}

/** What the guest's /init printed (lines starting with BOOTRESTORE-). */
export interface GuestReport {
  /** /init ran: the kernel and initramfs came off the disk. */
  markerSeen: boolean;
  /** Guest uptime (s) when /init started. */
  markerUptime?: number;
  diskSectors?: number;
  guestHash?: string;
  hashMiB?: number;
  scratchStatus?: 'OK' | 'BAD' | 'WRITE-FAILED' | 'SKIPPED';
  scratchOk?: boolean;
  /** br.mode=iscsi: iscsistart logged in and the disk appeared. */
  iscsiLoginOk?: boolean;
  /** The disk's attributes as the guest kernel sees them (/sys/block/DEV/{device,queue}/*), e.g. wwid, vendor, write_cache. */
  sysfs: Record<string, string>;
  /** /init reached its end (DONE line). */
  done: boolean;
  doneUptime?: number;
  errors: string[];
}

export interface BootResult extends GuestReport {
  serial: string;
  elapsedMs: number;
  /** Host time from QEMU's start until the BOOT-OK line arrived. */
  markerMs?: number;
  exitCode: number | null;
  timedOut: boolean;
  qemuStderr: string;
}

/** Parses the guest's serial output (init.sh's protocol). */
export function parseGuestSerial(serial: string): GuestReport {
  const report: GuestReport = { markerSeen: false, done: false, errors: [], sysfs: {} };
  for (const raw of serial.split(/\r?\n/)) {
    const at = raw.indexOf('BOOTRESTORE-');
    if (at < 0) continue;
    const line = raw.slice(at + 'BOOTRESTORE-'.length).trim();
    const [word, ...rest] = line.split(/\s+/);
    const uptime = /uptime=([\d.]+)/.exec(line);
    switch (word) {
      case 'BOOT-OK':
        report.markerSeen = true;
        if (uptime) report.markerUptime = Number(uptime[1]);
        break;
      case 'DISK': {
        const sectors = /sectors=(\d+)/.exec(line);
        if (sectors) report.diskSectors = Number(sectors[1]);
        break;
      }
      case 'HASH': {
        if (rest[0] && /^[0-9a-f]{64}$/.test(rest[0])) report.guestHash = rest[0];
        const mib = /mib=(\d+)/.exec(line);
        if (mib) report.hashMiB = Number(mib[1]);
        break;
      }
      case 'SCRATCH': {
        const status = rest[0];
        if (status === 'OK' || status === 'BAD' || status === 'WRITE-FAILED' || status === 'SKIPPED') {
          report.scratchStatus = status;
          if (status !== 'SKIPPED') report.scratchOk = status === 'OK';
        }
        break;
      }
      case 'SYSFS': {
        const entry = /^SYSFS ([a-z_]+)=(.*)$/.exec(line);
        if (entry) report.sysfs[entry[1]!] = entry[2]!;
        break;
      }
      case 'ISCSI-OK':
        report.iscsiLoginOk = true;
        break;
      case 'ERROR':
      case 'ISCSISTART':
        report.errors.push(line);
        break;
      case 'DONE':
        report.done = true;
        if (uptime) report.doneUptime = Number(uptime[1]);
        break;
      default:
        break;
    }
  }
  return report;
}

function commonArgs(opts: BootOptions): string[] {
  const args = ['-machine', 'pc,accel=tcg', '-m', String(opts.memoryMiB ?? 512), '-display', 'none', '-monitor', 'none', '-serial', 'stdio', '-no-reboot'];
  if (opts.nonce !== undefined) {
    if (!/^[A-Za-z0-9._:-]{1,43}$/.test(opts.nonce)) throw new Error(`bad nonce ${JSON.stringify(opts.nonce)}`);
    args.push('-fw_cfg', `name=opt/io.bootrestore/nonce,string=${opts.nonce}`);
  }
  if (opts.skipScratch) args.push('-fw_cfg', 'name=opt/io.bootrestore/scratch,string=skip');
  return args;
}

/** Boots the image from an iSCSI LUN through QEMU's libiscsi block driver (virtio-blk, cache=none). */
export async function bootFromIscsi(url: string, opts: BootOptions): Promise<BootResult> {
  const readOnly = opts.readOnly ? ',readonly=on' : '';
  const args = [...commonArgs(opts), '-nic', 'none', '-drive', `file=${url},format=raw,if=virtio,cache=none${readOnly}`];
  if (opts.initiatorName) args.push('-iscsi', `initiator-name=${opts.initiatorName}`);
  return await runQemu([...args, ...(opts.extraArgs ?? [])], opts);
}

/** Boots the image from a local file (the baseline). The guest writes to the scratch area of `path`. */
export async function bootFromFile(path: string, opts: BootOptions): Promise<BootResult> {
  if (path.includes(',')) throw new Error(`bootFromFile: commas in paths are not supported: ${path}`);
  const readOnly = opts.readOnly ? ',readonly=on' : '';
  const args = [...commonArgs(opts), '-nic', 'none', '-drive', `file=${path},format=raw,if=virtio,cache=none${readOnly}`];
  return await runQemu([...args, ...(opts.extraArgs ?? [])], opts);
}

export interface LinuxInitiatorOptions extends BootOptions {
  kernel: string;
  initrd: string;
  /** The target's port on 127.0.0.1; the guest reaches it as 10.0.2.100:3260 through guestfwd + socat. */
  targetPort: number;
  targetIqn: string;
  /** The guest's initiator name (default iqn.2026-12.io.bootrestore:guest). */
  guestInitiatorName?: string;
}

/**
 * Boots Debian's kernel with the test initramfs in br.mode=iscsi: the Linux kernel initiator
 * (iscsi_tcp + open-iscsi's iscsistart) logs in to the target, and /init checks /dev/sda.
 * The guest network is restricted (no outside access); only 10.0.2.100:3260 is forwarded.
 */
export async function bootLinuxInitiator(opts: LinuxInitiatorOptions): Promise<BootResult> {
  if (!/^[\w.:-]+$/.test(opts.targetIqn)) throw new Error(`bad target IQN ${opts.targetIqn}`);
  const cmdline = ['console=ttyS0,115200', 'quiet', 'panic=-1', 'br.mode=iscsi', `br.target=${opts.targetIqn}`];
  if (opts.guestInitiatorName) cmdline.push(`br.initiator=${opts.guestInitiatorName}`);
  const args = [
    ...commonArgs(opts),
    '-kernel', opts.kernel,
    '-initrd', opts.initrd,
    '-append', cmdline.join(' '),
    '-netdev', `user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:3260-cmd:socat - TCP:127.0.0.1:${opts.targetPort}`,
    '-device', 'virtio-net-pci,netdev=n0,romfile=',
  ];
  return await runQemu([...args, ...(opts.extraArgs ?? [])], opts);
}

async function runQemu(args: string[], opts: BootOptions): Promise<BootResult> {
  const started = performance.now();
  const child = spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  trackChild(child);
  let log: WriteStream | undefined;
  if (opts.logFile) log = createWriteStream(opts.logFile);
  let serial = '';
  let qemuStderr = '';
  let markerMs: number | undefined;
  let timedOut = false;
  let doneTimer: NodeJS.Timeout | undefined;
  child.stdout?.on('data', (chunk: Buffer) => {
    const text = chunk.toString('latin1');
    serial += text;
    log?.write(chunk);
    if (markerMs === undefined && serial.includes('BOOTRESTORE-BOOT-OK')) {
      markerMs = performance.now() - started;
      if (opts.stopAtMarker) child.kill('SIGKILL');
    }
    // After DONE the guest powers off; give it a few seconds, then stop waiting.
    if (doneTimer === undefined && serial.includes('BOOTRESTORE-DONE')) {
      doneTimer = setTimeout(() => child.kill('SIGKILL'), 5_000);
    }
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    qemuStderr += chunk.toString('utf8');
    log?.write(chunk);
  });
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs);
  let exitCode: number | null = null;
  try {
    exitCode = await new Promise<number | null>((resolve, reject) => {
      child.once('error', reject);
      child.once('close', (code) => resolve(code));
    });
  } finally {
    clearTimeout(timer);
    if (doneTimer) clearTimeout(doneTimer);
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGKILL');
      await waitForExit(child, 5_000);
    }
    if (log) await new Promise<void>((resolve) => log.end(resolve));
  }
  const result: BootResult = {
    ...parseGuestSerial(serial),
    serial,
    elapsedMs: performance.now() - started,
    exitCode,
    timedOut,
    qemuStderr,
  };
  if (markerMs !== undefined) result.markerMs = markerMs;
  return result;
}
