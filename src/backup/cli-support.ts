/** Small helpers shared by the backup-related CLI commands (formatting, progress, sizes). */
import { UsageError } from '../cli/args.js';

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${units[u]}`;
}

/** Parse "262144", "256K", "256KiB", "1M", "4MiB" into bytes. */
export function parseSize(text: string, flag: string): number {
  const m = /^([0-9]+)\s*(k|kib|m|mib|g|gib)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`${flag}: "${text}" is not a size (examples: 65536, 256K, 1M)`);
  const mult: Record<string, number> = { k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3 };
  const value = Number(m[1]) * (m[2] ? mult[m[2].toLowerCase()]! : 1);
  if (!Number.isSafeInteger(value)) throw new UsageError(`${flag}: "${text}" is too large`);
  return value;
}

export function parseCount(text: string, flag: string): number {
  if (!/^[0-9]+$/.test(text)) throw new UsageError(`${flag}: "${text}" is not a non-negative integer`);
  return Number(text);
}

/** A one-line progress bar on stderr, only when stderr is a TTY; redrawn at most 5 times a second. */
export class ProgressBar {
  private last = 0;
  private readonly enabled: boolean;
  private readonly started = performance.now();

  constructor(private readonly label: string) {
    this.enabled = process.stderr.isTTY === true;
  }

  update(done: number, total: number, bytesDone?: number): void {
    if (!this.enabled) return;
    const now = performance.now();
    if (now - this.last < 200 && done < total) return;
    this.last = now;
    const width = 30;
    const frac = total === 0 ? 1 : done / total;
    const filled = Math.round(frac * width);
    const secs = (now - this.started) / 1000;
    const rate = bytesDone !== undefined && secs > 0 ? `  ${(bytesDone / secs / 1e6).toFixed(0)} MB/s` : '';
    process.stderr.write(
      `\r${this.label} [${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${(frac * 100).toFixed(0).padStart(3)}%  ${done}/${total}${rate}  `,
    );
  }

  finish(): void {
    if (this.enabled) process.stderr.write('\r\x1b[K');
  }
}

export function usageRequested(argv: readonly string[]): boolean {
  return argv.includes('--help') || argv.includes('-h');
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, null, 2) + '\n');
}

/**
 * fdatasync, reads and zlib all run on libuv's thread pool (4 threads by default); with one chunk
 * file per fdatasync, 4 threads leave the disk idle between journal commits. libuv sizes the pool
 * when it is first used, so this must run before any asynchronous fs or zlib call of the process.
 * An explicit UV_THREADPOOL_SIZE wins.
 */
export function useLargerThreadPool(size = 16): void {
  process.env.UV_THREADPOOL_SIZE ??= String(size);
}
