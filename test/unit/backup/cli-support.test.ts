import { describe, expect, it } from 'vitest';
import { UsageError } from '../../../src/cli/args.js';
import { formatBytes, parseCount, parseSize } from '../../../src/backup/cli-support.js';
import { checkChunkSize } from '../../../src/backup/writer.js';

describe('CLI size parsing', () => {
  it('accepts bytes and K/M/G suffixes', () => {
    expect(parseSize('65536', '--chunk-size')).toBe(65536);
    expect(parseSize('256K', '--chunk-size')).toBe(262144);
    expect(parseSize('1MiB', '--chunk-size')).toBe(1048576);
    expect(parseSize('4m', '--chunk-size')).toBe(4194304);
  });

  it('rejects junk with a usage error naming the flag', () => {
    expect(() => parseSize('12X', '--chunk-size')).toThrow(UsageError);
    expect(() => parseSize('-1', '--chunk-size')).toThrow(/--chunk-size/);
    expect(() => parseCount('2.5', '--keep-last')).toThrow(/--keep-last/);
    expect(parseCount('0', '--keep-last')).toBe(0);
  });

  it('chunk sizes must be powers of two from 64 KiB to 16 MiB', () => {
    expect(() => checkChunkSize(65536)).not.toThrow();
    expect(() => checkChunkSize(16 * 1024 * 1024)).not.toThrow();
    expect(() => checkChunkSize(32768)).toThrow(/64 KiB to 16 MiB/);
    expect(() => checkChunkSize(100_000)).toThrow(/power of two/);
    expect(() => checkChunkSize(32 * 1024 * 1024)).toThrow();
  });

  it('formats sizes in binary units', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.50 KiB');
    expect(formatBytes(256 * 1024 * 1024)).toBe('256 MiB');
  });
});
