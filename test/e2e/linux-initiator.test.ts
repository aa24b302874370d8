/**
 * The Linux kernel initiator (iscsi_tcp + open-iscsi's iscsistart, Debian's cloud kernel) in a
 * QEMU TCG guest logs in to a target on the host through a restricted user-mode network
 * (guestfwd 10.0.2.100:3260 → socat → 127.0.0.1:PORT), then its /init reads /dev/sda with O_DIRECT
 * (sha256 of the fixed region) and writes + re-reads the scratch area (docs/boot-image.md).
 *   (a) against Debian's tgt (proves the guest and the helper);
 *   (b) against bootrestore serve (file LUN 0, ACL admitting the guest's initiator name).
 */
import { deriveIdentity } from '../../src/identity.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { copyBootImage, ensureBootImage, expectedGuestHash, readScratch, scratchPattern, sha256, type BootImage } from '../helpers/boot-image.js';
import { bootLinuxInitiator, type BootResult } from '../helpers/qemu.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { startTgt, type TgtTarget } from '../helpers/tgt.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

// Generous: on a loaded 2-core machine these sessions were seen taking 55 s (8.5 s when idle).
const BOOT_TIMEOUT_MS = 180_000;
/** vitest's default (120 s) is too short for a boot plus setup on a loaded machine. */
const BOOT_TEST_TIMEOUT_MS = 300_000;
const GUEST_INITIATOR = 'iqn.2026-12.io.bootrestore:linux-guest';

let image: BootImage;
let scratchDir: TempDir;
let tgt: TgtTarget | undefined;
let server: ServerProcess | undefined;

beforeAll(async () => {
  image = await ensureBootImage();
  if (!image.manifest.iscsistart) throw new Error('the boot image was built without iscsistart (install open-iscsi)');
  scratchDir = await makeTempDir('linux-initiator');
});

afterAll(async () => {
  await tgt?.stop();
  await server?.stop();
  await scratchDir?.remove();
});

function copyOfImage(name: string): Promise<string> {
  return copyBootImage(image, scratchDir.path, name);
}

async function expectGoodSession(result: BootResult, disk: string, nonce: string, expectedWwid?: string): Promise<void> {
  const context = `serial:\n${result.serial.slice(-3000)}\nqemu stderr:\n${result.qemuStderr.slice(-2000)}`;
  expect(result.markerSeen, context).toBe(true);
  expect(result.errors, context).toEqual([]);
  expect(result.iscsiLoginOk, context).toBe(true);
  expect(result.done, context).toBe(true);
  expect(result.diskSectors).toBe(image.manifest.diskBytes / 512);
  expect(result.guestHash, context).toBe(await expectedGuestHash(disk, image.manifest));
  expect(result.guestHash).toBe(image.manifest.hashRegion.sha256);
  expect(result.scratchStatus, context).toBe('OK');
  // The kernel built a device identification from VPD 0x83 and sees 512-byte logical blocks.
  // An NAA designator of type 2, 5 or 6 gives a persistent "naa." name (a type-3 one would give "t10.").
  expect(result.sysfs.wwid, context).toMatch(/^naa\./);
  if (expectedWwid !== undefined) expect(result.sysfs.wwid).toBe(expectedWwid);
  expect(result.sysfs.logical_block_size).toBe('512');
  const expected = scratchPattern(nonce, image.manifest.scratch.endBytes - image.manifest.scratch.startBytes);
  expect(sha256(await readScratch(disk, image.manifest))).toBe(sha256(expected));
}

describe('Linux kernel initiator (iscsistart in a QEMU guest)', () => {
  it('(a) logs in to Debian tgt, reads the LUN and writes its scratch area', async () => {
    const disk = await copyOfImage('tgt.img');
    tgt = await startTgt(disk, { iqn: 'iqn.2026-12.io.bootrestore.test:linux-tgt' });
    const nonce = `linux-tgt-${process.pid}`;
    const result = await bootLinuxInitiator({
      kernel: image.kernel,
      initrd: image.initrd,
      targetPort: tgt.port,
      targetIqn: tgt.iqn,
      guestInitiatorName: GUEST_INITIATOR,
      timeoutMs: BOOT_TIMEOUT_MS,
      nonce,
    });
    await tgt.stop();
    tgt = undefined;
    await expectGoodSession(result, disk, nonce);
    console.info(`linux initiator vs tgt: total ${Math.round(result.elapsedMs)} ms (guest uptime at DONE ${result.doneUptime} s); kernel sees ${JSON.stringify(result.sysfs)}`);
  }, BOOT_TEST_TIMEOUT_MS);

  it('(b) logs in to bootrestore serve, reads the LUN and writes its scratch area', async () => {
    const disk = await copyOfImage('bootrestore.img');
    const iqn = 'iqn.2026-12.io.bootrestore:linux-e2e';
    server = await startServerProcess({
      targets: [{ iqn, luns: [{ lun: 0, file: disk, readOnly: false }], initiators: [GUEST_INITIATOR] }],
    });
    const nonce = `linux-br-${process.pid}`;
    const result = await bootLinuxInitiator({
      kernel: image.kernel,
      initrd: image.initrd,
      targetPort: server.port,
      targetIqn: iqn,
      guestInitiatorName: GUEST_INITIATOR,
      timeoutMs: BOOT_TIMEOUT_MS,
      nonce,
    });
    const expectedWwid = `naa.${deriveIdentity(`file\0${iqn}\0${0}\0${disk}`).naa.toString('hex')}`;
    const exitCode = await server.stop();
    const stderr = server.stderr();
    server = undefined;
    expect(exitCode, stderr.slice(-3000)).toBe(0);
    await expectGoodSession(result, disk, nonce, expectedWwid);
    console.info(`linux initiator vs bootrestore: total ${Math.round(result.elapsedMs)} ms (guest uptime at DONE ${result.doneUptime} s); kernel sees ${JSON.stringify(result.sysfs)}`);
  }, BOOT_TEST_TIMEOUT_MS);
});
