import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mkdtemp, rm, writeFile, utimes, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openSource } from '../../../../src/backup/sources/open.js';
import { clipRanges, intersectRanges, unionRanges } from '../../../../src/backup/sources/image-file.js';
import { BufferCache } from '../../../../src/backup/sources/metadata-cache.js';
import { SourceError } from '../../../../src/backup/errors.js';

let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'bootrestore-sources-unit-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function pattern(length: number, seed: number): Buffer {
  const buffer = Buffer.alloc(length);
  for (let i = 0; i < length; i++) buffer[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return buffer;
}

describe('range helpers', () => {
  it('unionRanges merges overlapping and adjacent ranges', () => {
    expect(unionRanges([{ offset: 0, length: 10 }, { offset: 30, length: 5 }], [{ offset: 10, length: 5 }, { offset: 32, length: 10 }])).toEqual([
      { offset: 0, length: 15 },
      { offset: 30, length: 12 },
    ]);
    expect(unionRanges([], [{ offset: 4, length: 4 }])).toEqual([{ offset: 4, length: 4 }]);
  });

  it('intersectRanges keeps only common parts', () => {
    expect(
      intersectRanges(
        [{ offset: 0, length: 100 }, { offset: 200, length: 50 }],
        [{ offset: 50, length: 160 }, { offset: 240, length: 100 }],
      ),
    ).toEqual([
      { offset: 50, length: 50 },
      { offset: 200, length: 10 },
      { offset: 240, length: 10 },
    ]);
    expect(intersectRanges([{ offset: 0, length: 10 }], [{ offset: 10, length: 10 }])).toEqual([]);
  });

  it('clipRanges cuts at the disk size', () => {
    expect(clipRanges([{ offset: 0, length: 10 }, { offset: 90, length: 20 }, { offset: 120, length: 5 }], 100)).toEqual([
      { offset: 0, length: 10 },
      { offset: 90, length: 10 },
    ]);
  });
});

describe('BufferCache', () => {
  it('shares one load between concurrent requests and evicts by bytes', async () => {
    const cache = new BufferCache(1000);
    let loads = 0;
    const load = async (): Promise<Buffer> => {
      loads++;
      await new Promise((resolve) => setTimeout(resolve, 5));
      return Buffer.alloc(600, loads);
    };
    const [a, b] = await Promise.all([cache.get(1, load), cache.get(1, load)]);
    expect(loads).toBe(1);
    expect(a).toBe(b);
    expect(cache.peek(1)).toBe(a);
    await cache.get(2, load); // 1200 bytes > 1000: key 1 goes
    expect(loads).toBe(2);
    expect(cache.peek(1)).toBeUndefined();
    expect(cache.peek(2)?.[0]).toBe(2);
  });

  it('does not cache a failed load', async () => {
    const cache = new BufferCache(1000);
    await expect(cache.get(1, () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect((await cache.get(1, async () => Buffer.from('ok'))).toString()).toBe('ok');
  });
});

describe('raw source', () => {
  it('reads exact ranges, refuses reads past the end, detects a rewrite of the same size', async () => {
    const content = pattern(10_000, 1);
    const path = join(dir, 'disk.img');
    await writeFile(path, content);
    const source = await openSource(path);
    try {
      expect(source.format).toBe('raw');
      expect(source.size).toBe(10_000);
      expect((await source.read(1234, 5000)).equals(content.subarray(1234, 6234))).toBe(true);
      await expect(source.read(9_000, 1_001)).rejects.toBeInstanceOf(SourceError);
      await expect(source.read(-1, 1)).rejects.toBeInstanceOf(SourceError);
      await expect(source.read(0.5, 1)).rejects.toBeInstanceOf(SourceError);
      // Same size, new content and mtime: still a change.
      await writeFile(path, pattern(10_000, 2));
      await utimes(path, new Date(), new Date(Date.now() + 5_000));
      // The final check a backup makes before it publishes sees it at once; reads share one fstat
      // per 50 ms, so a read after that interval sees it too.
      await expect(source.checkUnchanged!()).rejects.toThrow(/changed during read: modification time/);
      await new Promise((resolve) => setTimeout(resolve, 60));
      await expect(source.read(0, 10)).rejects.toThrow(/changed during read: modification time/);
    } finally {
      await source.close();
    }
  });

  it('an empty file is a zero-size raw disk', async () => {
    const path = join(dir, 'empty.img');
    await writeFile(path, Buffer.alloc(0));
    const source = await openSource(path);
    expect(source.size).toBe(0);
    expect((await source.read(0, 0)).length).toBe(0);
    await source.close();
  });
});

describe('VMDK descriptor with FLAT and ZERO extents', () => {
  it('reads ZERO extents as zeroes and reports them in zeroRanges()', async () => {
    const a = pattern(4096, 3);
    const b = pattern(2048, 4);
    await writeFile(join(dir, 'data.bin'), Buffer.concat([Buffer.alloc(1024, 0xee), a, b]));
    await writeFile(
      join(dir, 'zero.vmdk'),
      '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n' +
        'RW 8 FLAT "data.bin" 2\nRW 16 ZERO\nRW 4 FLAT "data.bin" 10\n',
    );
    const source = await openSource(join(dir, 'zero.vmdk'));
    try {
      expect(source.format).toBe('vmdk-monolithicFlat');
      expect(source.size).toBe((8 + 16 + 4) * 512);
      const expected = Buffer.concat([a, Buffer.alloc(16 * 512), b]);
      expect((await source.read(0, source.size)).equals(expected)).toBe(true);
      expect((await source.read(4000, 9000)).equals(expected.subarray(4000, 13000))).toBe(true);
      expect(await source.zeroRanges?.()).toEqual([{ offset: 4096, length: 8192 }]);
    } finally {
      await source.close();
    }
  });

  it('refuses a flat extent longer than its file', async () => {
    await writeFile(join(dir, 'short.bin'), Buffer.alloc(1024));
    await writeFile(join(dir, 'short.vmdk'), '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT "short.bin" 0\n');
    await expect(openSource(join(dir, 'short.vmdk'))).rejects.toThrow(/short\.bin: flat extent needs 4096 bytes, the file has 1024/);
  });

  it('a descriptor that looks like text but is broken is an error, not a raw disk', async () => {
    await writeFile(join(dir, 'broken.vmdk'), '# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT\n');
    const error = await openSource(join(dir, 'broken.vmdk')).catch((err: unknown) => err);
    expect(error).toBeInstanceOf(SourceError);
    expect((error as SourceError).file).toBe(join(dir, 'broken.vmdk'));
    // The file is left as it was.
    expect((await readFile(join(dir, 'broken.vmdk'), 'utf8')).startsWith('# Disk DescriptorFile')).toBe(true);
  });
});

describe('qcow2 built by hand (512-byte clusters)', () => {
  /**
   * Cluster 0 header (v3), cluster 1 L1 table, cluster 2 L2 table, clusters 3-4 data. L2 entries:
   * 0 → data A, 1 → zero flag, 2 → unallocated, 3 → data B, 4 → beyond the end of the file.
   */
  function buildQcow2(): { image: Buffer; a: Buffer; b: Buffer } {
    const cluster = 512;
    const image = Buffer.alloc(5 * cluster);
    image.writeUInt32BE(0x514649fb, 0);
    image.writeUInt32BE(3, 4);
    image.writeUInt32BE(9, 20); // cluster_bits
    image.writeBigUInt64BE(64n * 512n, 24); // size: one L2 table's worth
    image.writeUInt32BE(1, 36); // l1_size
    image.writeBigUInt64BE(512n, 40); // l1_table_offset
    image.writeUInt32BE(4, 96); // refcount_order
    image.writeUInt32BE(104, 100); // header_length
    image.writeBigUInt64BE((1n << 63n) | 1024n, 512); // L1[0] → L2 at 1024
    const l2 = 1024;
    image.writeBigUInt64BE((1n << 63n) | 1536n, l2 + 0);
    image.writeBigUInt64BE(1n, l2 + 8);
    image.writeBigUInt64BE(0n, l2 + 16);
    image.writeBigUInt64BE((1n << 63n) | 2048n, l2 + 24);
    image.writeBigUInt64BE((1n << 63n) | (1n << 20n), l2 + 32);
    const a = pattern(cluster, 5);
    const b = pattern(cluster, 6);
    a.copy(image, 1536);
    b.copy(image, 2048);
    return { image, a, b };
  }

  it('reads data, zero and unallocated clusters and reports zero ranges from the L2 table', async () => {
    const { image, a, b } = buildQcow2();
    await writeFile(join(dir, 'hand.qcow2'), image);
    const source = await openSource(join(dir, 'hand.qcow2'));
    try {
      expect(source.format).toBe('qcow2');
      expect(source.size).toBe(32 * 1024);
      expect((await source.read(0, 2048)).equals(Buffer.concat([a, Buffer.alloc(1024), b]))).toBe(true);
      expect((await source.read(100, 1948)).equals(Buffer.concat([a, Buffer.alloc(1024), b]).subarray(100))).toBe(true);
      expect(await source.zeroRanges?.()).toEqual([
        { offset: 512, length: 1024 },
        { offset: 2560, length: 32 * 1024 - 2560 },
      ]);
    } finally {
      await source.close();
    }
  });

  it('a cluster beyond the end of the file fails the read with a SourceError; the rest stays readable', async () => {
    const { image } = buildQcow2();
    await writeFile(join(dir, 'hand-bad.qcow2'), image);
    const source = await openSource(join(dir, 'hand-bad.qcow2'));
    try {
      const error = await source.read(0, 8 * 512).catch((err: unknown) => err);
      expect(error).toBeInstanceOf(SourceError);
      expect((error as Error).message).toMatch(/hand-bad\.qcow2: data cluster at offset 1048576 .* beyond the end of the file/);
      // The source stays usable for the good part.
      expect((await source.read(0, 512)).equals(image.subarray(1536, 2048))).toBe(true);
    } finally {
      await source.close();
    }
  });

  it('refuses a version 1 image and a v2 header cut short', async () => {
    const { image } = buildQcow2();
    const v1 = Buffer.from(image);
    v1.writeUInt32BE(1, 4);
    await writeFile(join(dir, 'v1.qcow2'), v1);
    await expect(openSource(join(dir, 'v1.qcow2'))).rejects.toThrow(/v1\.qcow2: qcow2 version 1 is not supported/);
    await writeFile(join(dir, 'cut.qcow2'), image.subarray(0, 90));
    await expect(openSource(join(dir, 'cut.qcow2'))).rejects.toThrow(/cut\.qcow2: file too short for a qcow2 version 3 header/);
  });
});
