import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StorageError } from '../../../src/block-device.js';
import { FileBlockDevice } from '../../../src/storage/file-device.js';

const identity = { serial: 'TEST0001', naa: Buffer.alloc(8, 0x11), vendor: 'TEST', product: 'FILE' };

/** Block n holds bytes (n * 7 + i) & 0xff: every block distinct, every read checkable. */
function expectedBlocks(lba: number, blocks: number): Buffer {
  const out = Buffer.alloc(blocks * 512);
  for (let b = 0; b < blocks; b++) for (let i = 0; i < 512; i++) out[b * 512 + i] = ((lba + b) * 7 + i) & 0xff;
  return out;
}

describe('FileBlockDevice reads', () => {
  let dir: string;
  let path: string;
  const blockCount = 4096; // 2 MiB

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bootrestore-file-device-'));
    path = join(dir, 'lun.img');
    await writeFile(path, expectedBlocks(0, blockCount));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('returns the right bytes for many concurrent small reads, each in a region of its own', async () => {
    const device = await FileBlockDevice.open({ path, readOnly: true, identity });
    try {
      // 600 reads of 8 blocks: several slabs' worth, all in flight at once.
      const lbas = Array.from({ length: 600 }, (_, i) => (i * 37) % (blockCount - 8));
      const results = await Promise.all(lbas.map((lba) => device.read(lba, 8)));
      results.forEach((buf, i) => expect(buf.equals(expectedBlocks(lbas[i]!, 8))).toBe(true));
      // Results carved from a shared slab never overlap (each read has a region of its own).
      const regions = results.map((buf) => ({ memory: buf.buffer, start: buf.byteOffset, end: buf.byteOffset + buf.length }));
      const byMemory = new Map<ArrayBufferLike, Array<{ start: number; end: number }>>();
      for (const r of regions) {
        const list = byMemory.get(r.memory) ?? [];
        list.push(r);
        byMemory.set(r.memory, list);
      }
      expect(byMemory.size).toBeLessThan(results.length); // the slab is in use: regions share memory
      for (const list of byMemory.values()) {
        list.sort((a, b) => a.start - b.start);
        for (let i = 1; i < list.length; i++) expect(list[i]!.start).toBeGreaterThanOrEqual(list[i - 1]!.end);
      }
    } finally {
      await device.close();
    }
  });

  it('reads large transfers (outside the slab) whole', async () => {
    const device = await FileBlockDevice.open({ path, readOnly: true, identity });
    try {
      const buf = await device.read(100, 2048); // 1 MiB
      expect(buf.length).toBe(1 << 20);
      expect(buf.equals(expectedBlocks(100, 2048))).toBe(true);
    } finally {
      await device.close();
    }
  });

  it('reads zeroes past the end when the file shrank under the device', async () => {
    const small = join(dir, 'shrinking.img');
    await writeFile(small, expectedBlocks(0, 64));
    const device = await FileBlockDevice.open({ path: small, readOnly: false, identity });
    try {
      await truncate(small, 60 * 512 + 100);
      const buf = await device.read(56, 8);
      expect(buf.subarray(0, 4 * 512 + 100).equals(expectedBlocks(56, 8).subarray(0, 4 * 512 + 100))).toBe(true);
      expect(buf.subarray(4 * 512 + 100).every((b) => b === 0)).toBe(true);
    } finally {
      await device.close();
    }
  });

  it('turns an I/O error into a medium-error StorageError', async () => {
    const device = await FileBlockDevice.open({ path, readOnly: true, identity });
    await device.close(); // the descriptor is gone: the read fails with EBADF
    const failure = await device.read(0, 8).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(failure).toBeInstanceOf(StorageError);
    expect((failure as StorageError).kind).toBe('medium-error');
    expect((failure as StorageError).message).toMatch(/LBA 0/);
  });
});

describe('FileBlockDevice write failures', () => {
  it('ENOSPC on a write is space-exhausted; after a failed fdatasync every flush and write fails', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'bootrestore-file-device-w-'));
    try {
      const path = join(dir, 'lun.img');
      await writeFile(path, Buffer.alloc(64 * 512));
      const device = await FileBlockDevice.open({ path, readOnly: false, identity });
      const handle = (device as unknown as { handle: { write: (...a: unknown[]) => Promise<unknown>; datasync: () => Promise<void> } }).handle;
      const write = handle.write.bind(handle);
      const datasync = handle.datasync.bind(handle);
      handle.write = async () => {
        throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
      };
      const full = await device.write(0, Buffer.alloc(512, 1), { fua: false }).then(() => null, (e: unknown) => e as StorageError);
      expect(full?.kind).toBe('space-exhausted');
      handle.write = write;
      await device.write(0, Buffer.alloc(512, 2), { fua: false });
      let failures = 1;
      handle.datasync = async () => {
        if (failures-- > 0) throw Object.assign(new Error('EIO: i/o error, fdatasync'), { code: 'EIO' });
        return datasync();
      };
      const failed = await device.flush().then(() => null, (e: unknown) => e as StorageError);
      expect(failed?.kind).toBe('write-error');
      await expect(device.flush()).rejects.toThrow(/refuses writes until it is opened again/);
      await expect(device.write(1, Buffer.alloc(512, 3), { fua: true })).rejects.toThrow(/refuses writes/);
      expect((await device.read(0, 1)).every((b) => b === 2)).toBe(true);
      await device.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
