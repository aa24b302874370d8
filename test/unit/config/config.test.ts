import { describe, expect, it } from 'vitest';
import { validateConfig, parseSize, parsePortal, ConfigError } from '../../../src/config/config.js';

const FILE = '/etc/bootrestore/test.json';
const base = {
  listen: ['127.0.0.1:3260'],
  targets: [{ iqn: 'iqn.2026-12.io.bootrestore:demo', luns: [{ lun: 0, file: 'disk.img' }] }],
};

function errorOf(raw: unknown): ConfigError {
  try {
    validateConfig(raw, FILE, '/etc/bootrestore');
  } catch (err) {
    if (err instanceof ConfigError) return err;
    throw err;
  }
  throw new Error('config was accepted');
}

describe('config validation', () => {
  it('accepts a minimal config, resolves relative paths and applies defaults', () => {
    const c = validateConfig(base, FILE, '/etc/bootrestore');
    expect(c.listen).toEqual([{ host: '127.0.0.1', port: 3260 }]);
    expect(c.targets[0]!.luns[0]).toEqual({ kind: 'file', lun: 0, file: '/etc/bootrestore/disk.img', readOnly: false });
    expect(c.cache).toEqual({ maxBytes: 1024 ** 3, preallocate: false, verify: 'crc32' });
    expect(c.nopInIntervalSeconds).toBe(15);
  });

  it('names file, key and reason for an unknown key', () => {
    const e = errorOf({ ...base, targets: [{ ...base.targets[0], lunz: [] }] });
    expect(e.key).toBe('targets[0].lunz');
    expect(e.message).toContain(FILE);
    expect(e.message).toContain('unknown key');
  });

  it('refuses bad values with the key path', () => {
    expect(errorOf({ ...base, listen: ['127.0.0.1:99999'] }).key).toBe('listen[0]');
    expect(errorOf({ ...base, targets: [{ iqn: 'not-an-iqn', luns: [] }] }).key).toBe('targets[0].iqn');
    expect(
      errorOf({ ...base, targets: [{ iqn: 'iqn.2026-12.io.x:a', luns: [{ lun: 0, file: 'a' }, { lun: 0, file: 'b' }] }] }).key,
    ).toBe('targets[0].luns[1].lun');
    expect(errorOf({ ...base, targets: [{ iqn: 'iqn.2026-12.io.x:a', luns: [{ lun: 1, file: 'a', readOnly: 'yes' }] }] }).key).toBe(
      'targets[0].luns[0].readOnly',
    );
    expect(errorOf({ ...base, cache: { maxBytes: '12 parsecs' } }).key).toBe('cache.maxBytes');
    expect(errorOf({ ...base, cache: { preallocate: 'yes' } }).key).toBe('cache.preallocate');
    expect(validateConfig({ ...base, cache: { preallocate: true } }, FILE, '/etc/b').cache).toEqual({
      maxBytes: 1024 ** 3,
      preallocate: true,
      verify: 'crc32',
    });
    expect(validateConfig({ ...base, cache: { verify: 'sha256' } }, FILE, '/etc/b').cache.verify).toBe('sha256');
    const badVerify = errorOf({ ...base, cache: { verify: 'md5' } });
    expect([badVerify.key, badVerify.reason]).toEqual(['cache.verify', 'must be "crc32" or "sha256", not "md5"']);
    expect(errorOf({ ...base, control: { listen: '0.0.0.0:8080' } }).reason).toContain('loopback');
  });

  it('requires repository and deltaDir for backup LUNs', () => {
    const t = { iqn: 'iqn.2026-12.io.x:a', luns: [{ lun: 0, backup: { vm: 'web1' } }] };
    expect(errorOf({ ...base, targets: [t] }).reason).toContain('repository');
    expect(errorOf({ ...base, repository: '/r', targets: [t] }).reason).toContain('deltaDir');
    const ok = validateConfig({ ...base, repository: 'repo', deltaDir: '/d', cache: { maxBytes: '256MiB' }, targets: [t] }, FILE, '/etc/b');
    expect(ok.targets[0]!.luns[0]).toEqual({ kind: 'backup', lun: 0, vm: 'web1', point: 'latest', readOnly: false });
    expect(ok.repository).toBe('/etc/b/repo');
    expect(ok.cache.maxBytes).toBe(256 * 1024 * 1024);
  });

  it('parses sizes and portals', () => {
    expect(parseSize('1GiB')).toBe(1024 ** 3);
    expect(parseSize('64 KiB')).toBe(65536);
    expect(parseSize('1.5M')).toBe(1.5 * 1024 * 1024);
    expect(parseSize('x')).toBeUndefined();
    expect(parsePortal('[::1]:3260')).toEqual({ host: '::1', port: 3260 });
    expect(parsePortal('host-without-port')).toBeUndefined();
  });
});
