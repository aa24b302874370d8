/**
 * Disk-image source parsers against the real qemu-img/qemu-io (Debian qemu-utils 7.2): every image
 * is made by qemu-img from one random raw image, then read by our parser and compared byte for byte
 * with `qemu-img convert -O raw` of the same file.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { appendFile, open, readFile, rename, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { openSource } from '../../src/backup/sources/open.js';
import { SourceError } from '../../src/backup/errors.js';
import type { DiskSource } from '../../src/backup/types.js';
import { runChecked } from '../helpers/exec.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { xorshift32 } from '../helpers/prng.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const BLOCK = 64 * KiB;
/** 24 MiB plus a 3.5 KiB tail: sector aligned (qemu rounds to sectors) but not cluster aligned. */
const IMAGE_SIZE = 24 * MiB + 7 * 512;
/** A 4 MiB hole: every sparse format must report it in zeroRanges(), whatever its cluster size. */
const HOLE = { offset: 8 * MiB, length: 4 * MiB };

let tmp: TempDir;
let dir: string;
let sourceRaw: string;
let luksImageReady: Promise<unknown>;


function randomBytes(next: () => number, length: number): Buffer {
  const words = new Uint32Array(Math.ceil(length / 4));
  for (let i = 0; i < words.length; i++) words[i] = next();
  return Buffer.from(words.buffer, 0, length);
}

/** Holes, repeated blocks, random blocks, half-zero blocks, byte patterns, a short random tail. */
function makeSourceImage(): Buffer {
  const next = xorshift32(0x5eed1234);
  const image = Buffer.alloc(IMAGE_SIZE);
  const repeated = randomBytes(next, BLOCK);
  for (let block = 0; block * BLOCK < IMAGE_SIZE; block++) {
    const start = block * BLOCK;
    const length = Math.min(BLOCK, IMAGE_SIZE - start);
    if (start >= HOLE.offset && start < HOLE.offset + HOLE.length) continue;
    switch (block % 8) {
      case 1:
        break; // zero block
      case 2:
      case 6:
        repeated.copy(image, start, 0, length);
        break;
      case 4:
        randomBytes(next, length >> 1).copy(image, start + (length >> 1));
        break;
      case 7:
        image.fill(block & 0xff, start, start + length);
        break;
      default:
        randomBytes(next, length).copy(image, start);
    }
  }
  return image;
}

async function qemuImg(...args: string[]): Promise<void> {
  await runChecked('qemu-img', args, { timeoutMs: 60_000, cwd: dir });
}

async function qemuIo(image: string, format: string, ...commands: string[]): Promise<void> {
  const args = ['-f', format];
  for (const command of commands) args.push('-c', command);
  args.push(image);
  await runChecked('qemu-io', args, { timeoutMs: 60_000, cwd: dir });
}

/** What qemu itself reads from an image: `qemu-img convert -O raw`. */
async function qemuReference(image: string): Promise<Buffer> {
  const out = join(dir, `reference-${Date.now()}-${Math.random().toString(36).slice(2)}.raw`);
  await qemuImg('convert', '-O', 'raw', image, out);
  const data = await readFile(out);
  await truncate(out, 0);
  return data;
}

function covers(ranges: ReadonlyArray<{ offset: number; length: number }>, offset: number, length: number): boolean {
  let position = offset;
  for (const range of ranges) {
    if (range.offset <= position && range.offset + range.length > position) position = range.offset + range.length;
    if (position >= offset + length) return true;
  }
  return position >= offset + length;
}

interface Expectations {
  format: string | RegExp;
  /** Ranges that zeroRanges() must cover (the image has no data there). */
  zeroCovered?: ReadonlyArray<{ offset: number; length: number }>;
}

/** Read the whole image through our parser in several patterns and compare with qemu's view. */
async function checkAgainstQemu(image: string, expect_: Expectations): Promise<DiskSource> {
  const reference = await qemuReference(join(dir, image));
  const source = await openSource(join(dir, image));
  try {
    if (typeof expect_.format === 'string') expect(source.format).toBe(expect_.format);
    else expect(source.format).toMatch(expect_.format);
    expect(source.size).toBe(reference.length);
    // Sequential 1 MiB reads (what backup does), then 4 MiB + 3 KiB reads (crossing clusters/extents oddly).
    for (const chunk of [MiB, 4 * MiB + 3 * KiB]) {
      for (let offset = 0; offset < source.size; offset += chunk) {
        const length = Math.min(chunk, source.size - offset);
        const data = await source.read(offset, length);
        expect(data.length).toBe(length);
        if (!data.equals(reference.subarray(offset, offset + length))) {
          throw new Error(`${image}: mismatch in ${length} bytes at ${offset} (chunk ${chunk})`);
        }
      }
    }
    // Unaligned random reads, some in parallel.
    const next = xorshift32(source.size ^ 0x1234);
    const reads: Promise<void>[] = [];
    for (let i = 0; i < 40; i++) {
      const offset = next() % source.size;
      const length = Math.min(source.size - offset, next() % (300 * KiB));
      reads.push(
        source.read(offset, length).then((data) => {
          if (!data.equals(reference.subarray(offset, offset + length))) {
            throw new Error(`${image}: mismatch in random read of ${length} at ${offset}`);
          }
        }),
      );
    }
    await Promise.all(reads);
    expect((await source.read(source.size - 1, 1))[0]).toBe(reference[reference.length - 1]);
    expect((await source.read(0, 0)).length).toBe(0);
    await expect(source.read(source.size - 10, 11)).rejects.toBeInstanceOf(SourceError);

    // zeroRanges: sorted, disjoint, inside the disk, and really zero in qemu's view.
    const ranges = (await source.zeroRanges?.()) ?? [];
    let previousEnd = 0;
    for (const range of ranges) {
      expect(range.length).toBeGreaterThan(0);
      expect(range.offset).toBeGreaterThanOrEqual(previousEnd);
      expect(range.offset + range.length).toBeLessThanOrEqual(source.size);
      previousEnd = range.offset + range.length;
      const slice = reference.subarray(range.offset, range.offset + range.length);
      if (slice.some((byte) => byte !== 0)) {
        throw new Error(`${image}: zeroRanges() reports [${range.offset}, +${range.length}) but it holds data`);
      }
    }
    for (const must of expect_.zeroCovered ?? []) {
      if (!covers(ranges, must.offset, must.length)) {
        throw new Error(`${image}: zeroRanges() does not cover [${must.offset}, +${must.length}): ${JSON.stringify(ranges.slice(0, 20))}`);
      }
    }
    return source;
  } catch (err) {
    await source.close();
    throw err;
  }
}

async function check(image: string, expectations: Expectations): Promise<void> {
  const source = await checkAgainstQemu(image, expectations);
  await source.close();
}

async function expectSourceError(image: string, pattern: RegExp, readAll = false, named = image): Promise<void> {
  const path = join(dir, image);
  const attempt = async (): Promise<void> => {
    const source = await openSource(path);
    try {
      if (readAll) {
        for (let offset = 0; offset < source.size; offset += MiB) await source.read(offset, Math.min(MiB, source.size - offset));
        await source.zeroRanges?.();
      }
    } finally {
      await source.close();
    }
  };
  const error = await attempt().then(
    () => undefined,
    (err: unknown) => err,
  );
  expect(error, `${image}: expected a SourceError`).toBeInstanceOf(SourceError);
  const message = (error as SourceError).message;
  expect(message).toMatch(pattern);
  expect(message).toContain(named);
}

beforeAll(async () => {
  tmp = await makeTempDir('sources');
  dir = tmp.path;
  sourceRaw = join(dir, 'source.raw');
  await writeFile(sourceRaw, makeSourceImage());
  // Making a LUKS image takes seconds of key stretching: start it now, in parallel with the rest.
  luksImageReady = qemuImg(
    'create', '-f', 'qcow2', '--object', 'secret,id=s0,data=password',
    '-o', 'encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10', 'luks.qcow2', '4M',
  ).then(
    () => undefined,
    (err: unknown) => err,
  );
});

afterAll(async () => {
  await luksImageReady; // never leave qemu-img running
  // BOOTRESTORE_KEEP_TMP=1 keeps the images for debugging a failure.
  if (process.env.BOOTRESTORE_KEEP_TMP !== '1') await tmp?.remove();
});

describe('raw', () => {
  it('reads a raw file as is', async () => {
    await check('source.raw', { format: 'raw' });
  });
});

describe('qcow2 made by qemu-img convert', () => {
  const variants: Array<{ name: string; options: string[] }> = [
    { name: 'v2-64k.qcow2', options: ['-o', 'compat=0.10,cluster_size=64k'] },
    { name: 'v3-512.qcow2', options: ['-o', 'compat=1.1,cluster_size=512'] },
    { name: 'v3-64k.qcow2', options: ['-o', 'compat=1.1,cluster_size=64k'] },
    { name: 'v3-2m.qcow2', options: ['-o', 'compat=1.1,cluster_size=2M'] },
    { name: 'v3-compressed-64k.qcow2', options: ['-c', '-o', 'compat=1.1,cluster_size=64k'] },
    { name: 'v2-compressed-4k.qcow2', options: ['-c', '-o', 'compat=0.10,cluster_size=4k'] },
    { name: 'v3-compressed-2m.qcow2', options: ['-c', '-o', 'compat=1.1,cluster_size=2M'] },
    { name: 'v3-extl2-64k.qcow2', options: ['-o', 'compat=1.1,cluster_size=64k,extended_l2=on'] },
    { name: 'v3-extl2-2m.qcow2', options: ['-o', 'compat=1.1,cluster_size=2M,extended_l2=on'] },
  ];
  for (const variant of variants) {
    it(variant.name, async () => {
      await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...variant.options, 'source.raw', variant.name);
      await check(variant.name, { format: 'qcow2', zeroCovered: [HOLE] });
    });
  }
});

describe('qcow2 backing chains made by qemu-img create + qemu-io', () => {
  it('raw base <- qcow2 v3 overlay (relative backing path, zero clusters over data)', async () => {
    await qemuImg('create', '-f', 'qcow2', '-b', 'source.raw', '-F', 'raw', 'over-raw.qcow2');
    await qemuIo('over-raw.qcow2', 'qcow2', 'write -P 0x55 0 64k', 'write -z 2M 64k', 'write -P 0xa1 5000k 3000', 'write -P 0x07 24M 3584');
    await check('over-raw.qcow2', { format: 'qcow2', zeroCovered: [{ offset: 2 * MiB, length: 64 * KiB }] });
  });

  it('qcow2 base <- qcow2 mid <- larger qcow2 top (zero flag in mid, top beyond the base)', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'base.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'mid.qcow2');
    await qemuIo('mid.qcow2', 'qcow2', 'write -P 0xaa 1M 300k', 'write -z 4M 1M', 'write -P 0x3c 8200k 10k', 'write -P 0x77 24M 3584');
    await qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '32M');
    await qemuIo('top.qcow2', 'qcow2', 'write -P 0x99 100k 64k', 'write -P 0x42 30M 4k', 'write -P 0x43 1100k 1k');
    const source = await checkAgainstQemu('top.qcow2', {
      format: 'qcow2',
      zeroCovered: [
        { offset: 4 * MiB, length: MiB }, // zero clusters in mid, unallocated in top
        { offset: 12 * MiB - 2 * MiB, length: 2 * MiB }, // the hole, unallocated in all three
        { offset: 26 * MiB, length: 4 * MiB }, // beyond the backing file's size
      ],
    });
    expect(source.size).toBe(32 * MiB);
    expect(source.description).toMatch(/backing: qcow2 .*mid\.qcow2.*backing: qcow2 .*base\.qcow2/);
    await source.close();
  });

  it('VMDK base <- qcow2 overlay', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'base-for-qcow2.vmdk');
    await qemuImg('create', '-f', 'qcow2', '-b', 'base-for-qcow2.vmdk', '-F', 'vmdk', 'over-vmdk.qcow2');
    await qemuIo('over-vmdk.qcow2', 'qcow2', 'write -P 0x31 3M 70k', 'write -z 128k 64k');
    await check('over-vmdk.qcow2', { format: 'qcow2', zeroCovered: [HOLE, { offset: 128 * KiB, length: 64 * KiB }] });
  });

  it('qcow2 v2 (compat=0.10) overlay over a v2 base', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10,cluster_size=4k', 'source.raw', 'base-v2.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'base-v2.qcow2', '-F', 'qcow2', 'over-v2.qcow2');
    await qemuIo('over-v2.qcow2', 'qcow2', 'write -P 0x21 3M 100k', 'write -z 6M 64k', 'write -P 0x22 9M 512');
    await check('over-v2.qcow2', { format: 'qcow2', zeroCovered: [{ offset: 9 * MiB + 64 * KiB, length: 2 * MiB }] });
  });

  it('extended L2 overlay with subcluster writes and zero subclusters', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'base-for-extl2.qcow2');
    await qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', '-b', 'base-for-extl2.qcow2', '-F', 'qcow2', 'over-extl2.qcow2');
    await qemuIo('over-extl2.qcow2', 'qcow2', 'write -P 0x11 70k 2k', 'write -P 0x12 131k 1k', 'write -z 200k 8k', 'write -z 8M 6k');
    await check('over-extl2.qcow2', { format: 'qcow2', zeroCovered: [{ offset: 200 * KiB, length: 8 * KiB }, HOLE] });
  });
});

describe('VMDK made by qemu-img convert', () => {
  const subformats: Array<{ subformat: string; sparse: boolean }> = [
    { subformat: 'monolithicSparse', sparse: true },
    { subformat: 'streamOptimized', sparse: true },
    { subformat: 'monolithicFlat', sparse: false },
    { subformat: 'twoGbMaxExtentSparse', sparse: true },
    { subformat: 'twoGbMaxExtentFlat', sparse: false },
  ];
  for (const { subformat, sparse } of subformats) {
    it(subformat, async () => {
      const name = `${subformat}.vmdk`;
      await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${subformat}`, 'source.raw', name);
      await check(name, { format: `vmdk-${subformat}`, ...(sparse ? { zeroCovered: [HOLE] } : {}) });
    });
  }

  it('a hand-written descriptor with several FLAT extents in two files, at offsets', async () => {
    const image = await readFile(sourceRaw);
    // Two data files holding pieces of the source, the first behind an 8-sector junk prefix.
    const junk = Buffer.alloc(8 * 512, 0xee);
    await writeFile(join(dir, 'pieces-a.bin'), Buffer.concat([junk, image.subarray(0, 5 * MiB), image.subarray(7 * MiB)]));
    await writeFile(join(dir, 'pieces-b.bin'), Buffer.concat([junk, junk, image.subarray(5 * MiB, 7 * MiB)]));
    const sectors = (bytes: number): number => bytes / 512;
    const descriptor = [
      '# Disk DescriptorFile',
      'version=1',
      'CID=12345678',
      'parentCID=ffffffff',
      'createType="twoGbMaxExtentFlat"',
      '',
      '# Extent description',
      `RW ${sectors(5 * MiB)} FLAT "pieces-a.bin" 8`,
      `RW ${sectors(2 * MiB)} FLAT "pieces-b.bin" 16`,
      `RW ${sectors(IMAGE_SIZE - 7 * MiB)} FLAT "pieces-a.bin" ${8 + sectors(5 * MiB)}`,
      '',
      'ddb.virtualHWVersion = "4"',
      'ddb.adapterType = "ide"',
      '',
    ].join('\r\n');
    await writeFile(join(dir, 'multi.vmdk'), descriptor);
    const source = await checkAgainstQemu('multi.vmdk', { format: 'vmdk-twoGbMaxExtentFlat' });
    expect(source.description).toContain('3 extents');
    expect((await source.read(0, IMAGE_SIZE)).equals(image)).toBe(true);
    await source.close();
  });

  it('a renamed monolithicSparse file reads itself, not the file its embedded descriptor names', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'original-name.vmdk');
    await rename(join(dir, 'original-name.vmdk'), join(dir, 'renamed.vmdk'));
    await writeFile(join(dir, 'original-name.vmdk'), Buffer.alloc(4096, 0x66)); // a different disk under the old name
    await check('renamed.vmdk', { format: 'vmdk-monolithicSparse', zeroCovered: [HOLE] });
  });

  it('a delta disk (monolithicSparse with a parent) over a monolithicSparse base, zeroed grains over data', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'delta-base.vmdk');
    await qemuImg('create', '-f', 'vmdk', '-o', 'zeroed_grain=on', '-b', 'delta-base.vmdk', '-F', 'vmdk', 'delta-child.vmdk');
    await qemuIo('delta-child.vmdk', 'vmdk', 'write -P 0x5a 1M 200k', 'write -z 4M 1M', 'write -P 0x5b 9M 3k');
    const source = await checkAgainstQemu('delta-child.vmdk', {
      format: 'vmdk-monolithicSparse',
      zeroCovered: [
        { offset: 4 * MiB, length: MiB }, // zeroed grains in the child over data in the parent
        { offset: 10 * MiB, length: 2 * MiB }, // unallocated in both
      ],
    });
    expect(source.description).toMatch(/parent: vmdk monolithicSparse .*delta-base\.vmdk/);
    await source.close();

    // A parent whose CID no longer matches the child's parentCID was changed after the snapshot.
    const base = await readFile(join(dir, 'delta-base.vmdk'));
    const cidAt = base.indexOf('CID=', 512);
    expect(cidAt).toBeGreaterThan(0);
    await patchFile('delta-base.vmdk', cidAt + 4, Buffer.from('0badc0de'));
    await expectSourceError('delta-child.vmdk', /parent disk .*delta-base\.vmdk has CID 0badc0de/);
  });

  it('an ESXi-style descriptor (createType "vmfs", one VMFS extent) over a flat file', async () => {
    await writeFile(
      join(dir, 'esxi.vmdk'),
      '# Disk DescriptorFile\nversion=1\nencoding="UTF-8"\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\n' +
        `# Extent description\nRW ${IMAGE_SIZE / 512} VMFS "source.raw"\n\n# The Disk Data Base\n#DDB\n\n` +
        'ddb.adapterType = "lsilogic"\nddb.thinProvisioned = "1"\nddb.virtualHWVersion = "14"\n',
    );
    await check('esxi.vmdk', { format: 'vmdk-vmfs' });
  });

  it('a hand-written twoGbMaxExtentSparse descriptor over two sparse extents made by qemu-img', async () => {
    const image = await readFile(sourceRaw);
    const split = 10 * MiB;
    await writeFile(join(dir, 'part1.raw'), image.subarray(0, split));
    await writeFile(join(dir, 'part2.raw'), image.subarray(split));
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'part1.raw', 'two-s001.vmdk');
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'part2.raw', 'two-s002.vmdk');
    const descriptor =
      // qemu 7.2 reads an extent line that follows a blank line twice: keep the usual comment there.
      '# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n\n# Extent description\n' +
      `RW ${split / 512} SPARSE "two-s001.vmdk"\nRW ${(IMAGE_SIZE - split) / 512} SPARSE "two-s002.vmdk"\n\nddb.adapterType = "ide"\n`;
    await writeFile(join(dir, 'two.vmdk'), descriptor);
    const source = await checkAgainstQemu('two.vmdk', { format: 'vmdk-twoGbMaxExtentSparse', zeroCovered: [HOLE] });
    expect((await source.read(0, IMAGE_SIZE)).equals(image)).toBe(true);
    await source.close();
  });

  it('monolithicSparse with a damaged grain directory falls back to the redundant one', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'rgd.vmdk');
    const header = (await readFile(join(dir, 'rgd.vmdk'))).subarray(0, 512);
    expect(header.readUInt32LE(8) & 2).toBe(2); // qemu writes a redundant grain directory
    const gdOffset = Number(header.readBigUInt64LE(56));
    const damaged = Buffer.alloc(4);
    damaged.writeUInt32LE(0x7ffffff0);
    await patchFile('rgd.vmdk', gdOffset * 512, damaged);
    const source = await openSource(join(dir, 'rgd.vmdk'));
    try {
      expect((await source.read(0, IMAGE_SIZE)).equals(await readFile(sourceRaw))).toBe(true);
    } finally {
      await source.close();
    }
  });

  it('a VMware-style streamOptimized file (grain directory in the footer, markers, end-of-stream)', async () => {
    const image = await readFile(sourceRaw);
    const capacitySectors = 4 * MiB / 512;
    const content = Buffer.alloc(4 * MiB);
    image.copy(content, 0, 0, 4 * MiB);
    await writeFile(join(dir, 'vmware-stream.vmdk'), buildStreamOptimized(content, capacitySectors, 'vmware-stream.vmdk'));
    await check('vmware-stream.vmdk', { format: 'vmdk-streamOptimized', zeroCovered: [{ offset: BLOCK, length: BLOCK }] });
  });
});

/**
 * A stream-optimized VMDK laid out as VMware writes it (VMDK 1.1, "Stream-Optimized Compressed
 * Sparse Extents"): header with gdOffset = GD_AT_END, embedded descriptor, compressed grains with
 * grain markers, GT marker + grain table, GD marker + grain directory, footer marker + footer,
 * end-of-stream marker. Test fixture only; qemu-img reads it as the reference.
 */
function buildStreamOptimized(content: Buffer, capacitySectors: number, fileName: string): Buffer {
  const grainSectors = 128;
  const grainBytes = grainSectors * 512;
  const gtEntries = 512;
  const sectorsFor = (bytes: number): number => Math.ceil(bytes / 512);
  const parts: Buffer[] = [];
  let sector = 0;
  const push = (buffer: Buffer): number => {
    const padded = Buffer.alloc(sectorsFor(buffer.length) * 512);
    buffer.copy(padded);
    parts.push(padded);
    const at = sector;
    sector += padded.length / 512;
    return at;
  };
  const header = (gdOffset: bigint): Buffer => {
    const h = Buffer.alloc(512);
    h.writeUInt32LE(0x564d444b, 0);
    h.writeUInt32LE(3, 4);
    h.writeUInt32LE(1 | (1 << 16) | (1 << 17), 8);
    h.writeBigUInt64LE(BigInt(capacitySectors), 12);
    h.writeBigUInt64LE(BigInt(grainSectors), 20);
    h.writeBigUInt64LE(1n, 28); // descriptor at sector 1
    h.writeBigUInt64LE(2n, 36); // 2 sectors
    h.writeUInt32LE(gtEntries, 44);
    h.writeBigUInt64LE(0n, 48);
    h.writeBigUInt64LE(gdOffset, 56);
    h.writeBigUInt64LE(128n, 64);
    h[73] = 0x0a;
    h[74] = 0x20;
    h[75] = 0x0d;
    h[76] = 0x0a;
    h.writeUInt16LE(1, 77);
    return h;
  };
  const marker = (value: number, type: number): Buffer => {
    const m = Buffer.alloc(512);
    m.writeBigUInt64LE(BigInt(value), 0);
    m.writeUInt32LE(0, 8);
    m.writeUInt32LE(type, 12);
    return m;
  };
  push(header(0xffffffffffffffffn));
  const descriptorText = [
    '# Disk DescriptorFile',
    'version=1',
    'CID=fffffffe',
    'parentCID=ffffffff',
    'createType="streamOptimized"',
    '',
    `RW ${capacitySectors} SPARSE "${fileName}"`,
    '',
    'ddb.adapterType = "lsilogic"',
    '',
  ].join('\n');
  const descriptor = Buffer.alloc(1024);
  descriptor.write(descriptorText);
  push(descriptor);
  const grainTable = Buffer.alloc(gtEntries * 4);
  for (let grain = 0; grain * grainBytes < content.length; grain++) {
    const data = content.subarray(grain * grainBytes, (grain + 1) * grainBytes);
    if (data.every((byte) => byte === 0)) continue;
    const compressed = deflateSync(data);
    const withMarker = Buffer.alloc(12 + compressed.length);
    withMarker.writeBigUInt64LE(BigInt(grain * grainSectors), 0);
    withMarker.writeUInt32LE(compressed.length, 8);
    compressed.copy(withMarker, 12);
    grainTable.writeUInt32LE(push(withMarker), grain * 4);
  }
  push(marker(sectorsFor(grainTable.length), 1));
  const gtSector = push(grainTable);
  const directory = Buffer.alloc(512);
  directory.writeUInt32LE(gtSector, 0);
  push(marker(1, 2));
  const gdSector = push(directory);
  push(marker(1, 3));
  push(header(BigInt(gdSector)));
  push(Buffer.alloc(512)); // end-of-stream marker
  return Buffer.concat(parts);
}

describe('malformed, refused and changing images', () => {
  it('truncated qcow2 header', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'trunc-header.qcow2');
    await truncate(join(dir, 'trunc-header.qcow2'), 50);
    await expectSourceError('trunc-header.qcow2', /too short/);
  });

  it('qcow2 truncated after its metadata (data clusters missing)', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'trunc-data.qcow2');
    await truncate(join(dir, 'trunc-data.qcow2'), 6 * MiB);
    await expectSourceError('trunc-data.qcow2', /beyond the end of the file/, true);
  });

  it('qcow2 with an impossible cluster size', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'bad-cluster.qcow2');
    await patchFile('bad-cluster.qcow2', 20, Buffer.from([0, 0, 0, 40]));
    await expectSourceError('bad-cluster.qcow2', /cluster_bits 40/);
  });

  it('qcow2 with an unknown incompatible feature bit', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'bad-feature.qcow2');
    await patchFile('bad-feature.qcow2', 72 + 7, Buffer.from([1 << 6]));
    await expectSourceError('bad-feature.qcow2', /unknown incompatible qcow2 features: bit 6/);
  });

  it('encrypted qcow2 (LUKS) is refused', async () => {
    const failure = await luksImageReady;
    if (failure !== undefined) throw failure;
    await expectSourceError('luks.qcow2', /encrypted/);
  });

  it('qcow2 with an external data file is refused', async () => {
    await qemuImg('create', '-f', 'qcow2', '-o', 'data_file=external.raw', 'external.qcow2', '4M');
    await expectSourceError('external.qcow2', /external data file/);
  });

  it('qcow2 with zstd compression is refused', async () => {
    await qemuImg('create', '-f', 'qcow2', '-o', 'compression_type=zstd', 'zstd.qcow2', '4M');
    await expectSourceError('zstd.qcow2', /zstd is not supported/);
  });

  it('qcow2 with a corrupt compressed cluster', async () => {
    await qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', 'source.raw', 'bad-deflate.qcow2');
    // Find cluster 7's compressed data from the L1 and L2 tables.
    const file = await readFile(join(dir, 'bad-deflate.qcow2'));
    const l1Offset = Number(file.readBigUInt64BE(40));
    const l2Offset = Number(file.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
    // Cluster 7 holds a byte pattern (see makeSourceImage): it compresses. Random clusters do
    // not, and qemu stores those uncompressed.
    const entry = file.readBigUInt64BE(l2Offset + 7 * 8);
    expect(entry & (1n << 62n)).not.toBe(0n);
    const hostOffset = Number(entry & ((1n << 54n) - 1n)); // cluster_bits 16: x = 54
    await patchFile('bad-deflate.qcow2', hostOffset, Buffer.alloc(16, 0xff));
    await expectSourceError('bad-deflate.qcow2', /does not inflate/, true);
  });

  it('qcow2 backing file missing', async () => {
    await qemuImg('create', '-f', 'qcow2', '-u', '-b', 'gone.raw', '-F', 'raw', 'orphan.qcow2', '4M');
    await expectSourceError('orphan.qcow2', /cannot open backing file .*gone\.raw/);
  });

  it('truncated VMDK sparse header', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'trunc.vmdk');
    await truncate(join(dir, 'trunc.vmdk'), 100);
    await expectSourceError('trunc.vmdk', /too short/);
  });

  it('VMDK sparse file truncated inside its grains', async () => {
    await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', 'source.raw', 'trunc-grains.vmdk');
    await truncate(join(dir, 'trunc-grains.vmdk'), 4 * MiB);
    await expectSourceError('trunc-grains.vmdk', /beyond the end of the file/, true);
  });

  it('VMDK with an unsupported createType, a missing extent file, or a parent it cannot find', async () => {
    const descriptor = (createType: string, extent: string, parent = 'ffffffff'): string =>
      `# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=${parent}\ncreateType="${createType}"\n${extent}\n`;
    await writeFile(join(dir, 'sesparse.vmdk'), descriptor('seSparse', 'RW 8192 SESPARSE "x-sesparse.vmdk"'));
    await expectSourceError('sesparse.vmdk', /createType "seSparse" is not supported/);
    await writeFile(join(dir, 'vmfssparse.vmdk'), descriptor('vmfsSparse', 'RW 8192 VMFSSPARSE "x-delta.vmdk"'));
    await expectSourceError('vmfssparse.vmdk', /createType "vmfsSparse" is not supported/);
    await writeFile(join(dir, 'missing-extent.vmdk'), descriptor('monolithicFlat', 'RW 8192 FLAT "nowhere-flat.vmdk" 0'));
    await expectSourceError('missing-extent.vmdk', /nowhere-flat\.vmdk: cannot open/);
    await writeFile(join(dir, 'child.vmdk'), descriptor('monolithicSparse', 'RW 8192 SPARSE "child-s.vmdk"', '1234abcd'));
    await expectSourceError('child.vmdk', /delta disk .*without a usable parentFileNameHint/);
    await writeFile(join(dir, 'garbage.vmdk'), '# Disk DescriptorFile\nthis is not a descriptor line\n');
    await expectSourceError('garbage.vmdk', /line 2 is not understood/);
  });

  it('VMDK streamOptimized with a corrupt grain', async () => {
    const image = await readFile(sourceRaw);
    const stream = buildStreamOptimized(Buffer.from(image.subarray(0, MiB)), MiB / 512, 'vmware-stream-bad.vmdk');
    // The first grain's zlib data starts after its 12-byte marker in sector 3 (header, 2 descriptor sectors).
    stream.fill(0xff, 3 * 512 + 12, 3 * 512 + 40);
    await writeFile(join(dir, 'vmware-stream-bad.vmdk'), stream);
    await expectSourceError('vmware-stream-bad.vmdk', /does not inflate/, true);
  });

  it('a file that changes size after open makes read() fail (raw, qcow2, VMDK extent)', async () => {
    for (const [name, changed] of [
      ['grow.raw', 'grow.raw'],
      ['grow.qcow2', 'grow.qcow2'],
      ['grow.vmdk', 'grow-flat.vmdk'],
    ] as const) {
      if (name.endsWith('.raw')) await writeFile(join(dir, name), Buffer.alloc(MiB, 1));
      else if (name.endsWith('.qcow2')) await qemuImg('convert', '-f', 'raw', '-O', 'qcow2', 'source.raw', name);
      else await qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat', 'source.raw', name);
      const source = await openSource(join(dir, name));
      try {
        await source.read(0, 4096);
        await appendFile(join(dir, changed), Buffer.alloc(512, 7));
        // The check a backup makes after its last read sees it at once; reads share one fstat per
        // 50 ms, so a read after that interval sees it too.
        const checked = await source.checkUnchanged!().then(
          () => undefined,
          (err: unknown) => err,
        );
        await new Promise((resolve) => setTimeout(resolve, 60));
        const error = await source.read(0, 4096).then(
          () => undefined,
          (err: unknown) => err,
        );
        for (const e of [checked, error]) {
          expect(e, name).toBeInstanceOf(SourceError);
          expect((e as Error).message).toMatch(/changed during read/);
          expect((e as Error).message).toContain(changed);
        }
      } finally {
        await source.close();
      }
    }
  });

  it('a missing file', async () => {
    await expectSourceError('does-not-exist.qcow2', /cannot open/);
  });
});

async function patchFile(name: string, offset: number, bytes: Buffer): Promise<void> {
  const handle = await open(join(dir, name), 'r+');
  try {
    await handle.write(bytes, 0, bytes.length, offset);
  } finally {
    await handle.close();
  }
}
