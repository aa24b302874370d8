/**
 * A real guest boots the test image (docs/boot-image.md) under QEMU TCG and reports, on its serial
 * console, that /init ran, the sha256 of the fixed region read with O_DIRECT, and whether a
 * pattern written to the scratch area read back intact.
 *   (a) from a local file: proves the image and the guest protocol;
 *   (b) over iSCSI from Debian's tgt: proves the QEMU/iSCSI helper against a reference target;
 *   (c) over iSCSI from bootrestore (`bootrestore serve`, a file LUN, ACL with QEMU's initiator name);
 *   (d) the same from a read-only LUN: the guest's scratch write must fail and change nothing.
 * Booting from a mounted backup restore point: test/e2e/mount-boot.test.ts.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyBootImage, ensureBootImage, expectedGuestHash, readScratch, scratchPattern, sha256, type BootImage } from '../helpers/boot-image.js';
import { bootFromFile, bootFromIscsi, type BootResult } from '../helpers/qemu.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { startTgt, type TgtTarget } from '../helpers/tgt.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

// Generous: on a loaded 2-core machine TCG boots were seen taking 50 s (6 s when idle).
const BOOT_TIMEOUT_MS = 150_000;
/** vitest's default (120 s) is too short for a boot plus setup on a loaded machine. */
const BOOT_TEST_TIMEOUT_MS = 400_000;
const QEMU_INITIATOR = 'iqn.2026-12.io.bootrestore:qemu-boot-test';

let image: BootImage;
let scratchDir: TempDir;
let tgt: TgtTarget | undefined;
let server: ServerProcess | undefined;

beforeAll(async () => {
  image = await ensureBootImage();
  scratchDir = await makeTempDir('boot-e2e');
});

afterAll(async () => {
  await tgt?.stop();
  await server?.stop();
  await scratchDir?.remove();
});

function copyOfImage(name: string): Promise<string> {
  return copyBootImage(image, scratchDir.path, name);
}

/** What every successful boot must show; `disk` is the file whose content the guest saw. */
async function expectGoodBoot(result: BootResult, disk: string, nonce: string): Promise<void> {
  const context = `serial:\n${result.serial.slice(-3000)}\nqemu stderr:\n${result.qemuStderr.slice(-2000)}`;
  expect(result.markerSeen, context).toBe(true);
  expect(result.errors, context).toEqual([]);
  expect(result.done, context).toBe(true);
  expect(result.timedOut, context).toBe(false);
  expect(result.diskSectors).toBe(image.manifest.diskBytes / 512);
  expect(result.hashMiB).toBe(image.manifest.hashRegion.endBytes / (1 << 20));
  // The region the guest hashed is unchanged by the boot (the scratch area lies outside it).
  expect(result.guestHash).toBe(image.manifest.hashRegion.sha256);
  expect(result.guestHash).toBe(await expectedGuestHash(disk, image.manifest));
  expect(result.scratchStatus, context).toBe('OK');
  // The guest's write reached the backing file, byte for byte.
  const expected = scratchPattern(nonce, image.manifest.scratch.endBytes - image.manifest.scratch.startBytes);
  expect(sha256(await readScratch(disk, image.manifest))).toBe(sha256(expected));
}

describe('boot image under QEMU', () => {
  it('(a) boots from a local file: marker, hash of the fixed region, scratch write read back', async () => {
    const disk = await copyOfImage('local.img');
    const nonce = `file-${process.pid}`;
    const result = await bootFromFile(disk, { timeoutMs: BOOT_TIMEOUT_MS, nonce, logFile: join(scratchDir.path, 'local-serial.log') });
    await expectGoodBoot(result, disk, nonce);
    console.info(`boot from file: marker ${Math.round(result.markerMs ?? -1)} ms (guest uptime ${result.markerUptime} s), total ${Math.round(result.elapsedMs)} ms (image ensure ${Math.round(image.ensureMs)} ms)`);
  }, BOOT_TEST_TIMEOUT_MS);

  it('(b) boots over iSCSI from Debian tgt (QEMU libiscsi driver, virtio-blk, cache=none)', async () => {
    const disk = await copyOfImage('tgt.img');
    tgt = await startTgt(disk, { iqn: 'iqn.2026-12.io.bootrestore.test:boot-tgt' });
    const nonce = `tgt-${process.pid}`;
    const result = await bootFromIscsi(tgt.url, { timeoutMs: BOOT_TIMEOUT_MS, nonce, initiatorName: QEMU_INITIATOR });
    await tgt.stop();
    tgt = undefined;
    await expectGoodBoot(result, disk, nonce);
    console.info(`boot over tgt: marker ${Math.round(result.markerMs ?? -1)} ms (guest uptime ${result.markerUptime} s), total ${Math.round(result.elapsedMs)} ms`);
  }, BOOT_TEST_TIMEOUT_MS);

  it('(c) boots over iSCSI from bootrestore serve (file LUN 0; the initiator ACL admits QEMU and refuses another name)', async () => {
    const disk = await copyOfImage('bootrestore.img');
    const iqn = 'iqn.2026-12.io.bootrestore:boot-e2e';
    server = await startServerProcess({
      targets: [{ iqn, luns: [{ lun: 0, file: disk, readOnly: false }], initiators: [QEMU_INITIATOR] }],
    });
    // An initiator the ACL does not list gets no LUN: QEMU fails to open the drive, no guest runs.
    const refused = await bootFromIscsi(server.url(0), { timeoutMs: 60_000, initiatorName: 'iqn.2026-12.io.bootrestore:not-on-the-list' });
    expect(refused.markerSeen).toBe(false);
    expect(refused.timedOut).toBe(false);
    expect(refused.exitCode, refused.qemuStderr).not.toBe(0);
    expect(refused.qemuStderr).toMatch(/iscsi/i);
    const nonce = `br-${process.pid}`;
    const result = await bootFromIscsi(server.url(0), { timeoutMs: BOOT_TIMEOUT_MS, nonce, initiatorName: QEMU_INITIATOR });
    const exitCode = await server.stop();
    const stderr = server.stderr();
    server = undefined;
    expect(exitCode, stderr.slice(-3000)).toBe(0);
    await expectGoodBoot(result, disk, nonce);
    console.info(`boot over bootrestore: marker ${Math.round(result.markerMs ?? -1)} ms (guest uptime ${result.markerUptime} s), total ${Math.round(result.elapsedMs)} ms`);
  }, BOOT_TEST_TIMEOUT_MS);

  it('(d) boots from a read-only bootrestore LUN: reads are right, the guest\'s write is refused, the file is untouched', async () => {
    const disk = await copyOfImage('bootrestore-ro.img');
    const scratchBefore = sha256(await readScratch(disk, image.manifest));
    const iqn = 'iqn.2026-12.io.bootrestore:boot-e2e-ro';
    server = await startServerProcess({
      targets: [{ iqn, luns: [{ lun: 0, file: disk, readOnly: true }], initiators: [QEMU_INITIATOR] }],
    });
    const result = await bootFromIscsi(server.url(0), { timeoutMs: BOOT_TIMEOUT_MS, nonce: `ro-${process.pid}`, initiatorName: QEMU_INITIATOR, readOnly: true });
    await server.stop();
    server = undefined;
    const context = `serial:\n${result.serial.slice(-3000)}\nqemu stderr:\n${result.qemuStderr.slice(-2000)}`;
    expect(result.markerSeen, context).toBe(true);
    expect(result.done, context).toBe(true);
    expect(result.guestHash, context).toBe(image.manifest.hashRegion.sha256);
    expect(result.scratchStatus, context).toBe('WRITE-FAILED');
    expect(sha256(await readScratch(disk, image.manifest))).toBe(scratchBefore);
  }, BOOT_TEST_TIMEOUT_MS);
});
