/**
 * The harness itself: helpers must fail fast and clean up after themselves, or a broken target
 * would hang the suite or leave processes behind.
 */
import { readFileSync } from 'node:fs';
import { copyFile, writeFile, truncate } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBootImage, expectedGuestHash, type BootImage } from '../helpers/boot-image.js';
import { iscsiReadCapacity16 } from '../helpers/libiscsi.js';
import { freePort } from '../helpers/ports.js';
import { bootFromIscsi } from '../helpers/qemu.js';
import { startTgt, stopAllTgt } from '../helpers/tgt.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

let dir: TempDir;
let image: BootImage;

beforeAll(async () => {
  dir = await makeTempDir('harness');
  image = await ensureBootImage();
});

afterAll(async () => {
  await stopAllTgt();
  await dir?.remove();
});

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers signal 0; /proc tells the truth.
  try {
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(' ')[2]?.startsWith('Z');
  } catch {
    return false;
  }
}

async function portAccepts(port: number): Promise<boolean> {
  return await new Promise<boolean>((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

describe('test harness', () => {
  it('runs two tgtd instances side by side and stops both completely', async () => {
    const fileA = join(dir.path, 'a.img');
    const fileB = join(dir.path, 'b.img');
    await writeFile(fileA, '');
    await truncate(fileA, 8 << 20);
    await writeFile(fileB, '');
    await truncate(fileB, 16 << 20);
    const [a, b] = await Promise.all([startTgt(fileA, { iqn: 'iqn.2026-12.io.bootrestore.test:a' }), startTgt(fileB, { iqn: 'iqn.2026-12.io.bootrestore.test:b' })]);
    expect(a.control).not.toBe(b.control);
    expect(a.port).not.toBe(b.port);
    // Each serves its own file.
    expect((await iscsiReadCapacity16(a.url)).totalBytes).toBe(8 << 20);
    expect((await iscsiReadCapacity16(b.url)).totalBytes).toBe(16 << 20);
    await Promise.all([a.stop(), b.stop()]);
    for (const target of [a, b]) {
      expect(target.pid).toBeGreaterThan(0);
      expect(isRunning(target.pid!)).toBe(false);
      expect(await portAccepts(target.port)).toBe(false);
    }
  });

  it('bootFromIscsi fails fast, without a guest report, when no target listens', async () => {
    const port = await freePort();
    const started = performance.now();
    const result = await bootFromIscsi(`iscsi://127.0.0.1:${port}/iqn.2026-12.io.bootrestore:nobody/0`, { timeoutMs: 60_000 });
    expect(result.markerSeen).toBe(false);
    expect(result.done).toBe(false);
    expect(result.timedOut).toBe(false);
    expect(result.exitCode).not.toBe(0);
    expect(result.qemuStderr).toMatch(/iscsi|connect/i);
    expect(performance.now() - started).toBeLessThan(30_000);
  });

  it('bootFromIscsi kills QEMU at the timeout when the guest never reports', async () => {
    // A LUN of zeros: SeaBIOS finds no boot sector and QEMU sits there until killed.
    const zeros = join(dir.path, 'zeros.img');
    await writeFile(zeros, '');
    await truncate(zeros, 4 << 20);
    const tgt = await startTgt(zeros, { iqn: 'iqn.2026-12.io.bootrestore.test:zeros' });
    try {
      const result = await bootFromIscsi(tgt.url, { timeoutMs: 8_000 });
      expect(result.timedOut).toBe(true);
      expect(result.markerSeen).toBe(false);
      expect(result.elapsedMs).toBeLessThan(20_000);
    } finally {
      await tgt.stop();
    }
  });

  it('the image manifest matches the file (the expected hash is not stale)', async () => {
    const copy = join(dir.path, 'copy.img');
    await copyFile(image.image, copy);
    expect(await expectedGuestHash(copy, image.manifest)).toBe(image.manifest.hashRegion.sha256);
  });
});
