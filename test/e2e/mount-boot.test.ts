/**
 * Issue "instant mount", the main claim: back up the bootable test image, mount its restore point
 * with `bootrestore serve` (a backup LUN), boot it with QEMU over iSCSI: the marker appears, the
 * in-guest hash of the fixed region matches, the guest's scratch write reads back — and afterwards
 * every file of the repository is byte-identical to before while the guest's write sits in the delta.
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBootImage, readScratch, scratchPattern, sha256, type BootImage } from '../helpers/boot-image.js';
import { bootFromIscsi } from '../helpers/qemu.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { runChecked } from '../helpers/exec.js';
import { backupImage, cli, hashTree } from '../helpers/repo.js';
import { ControlClient } from '../../src/cli/control-client.js';
import type { MountInfo } from '../../src/mounts/manager.js';

const IQN = 'iqn.2026-12.io.bootrestore.test:mount-boot';
let image: BootImage;
let dir: TempDir;
let server: ServerProcess | undefined;

beforeAll(async () => {
  image = await ensureBootImage();
  dir = await makeTempDir('mount-boot');
});

afterAll(async () => {
  await server?.stop();
  await dir?.remove();
});

describe('boot a VM from a mounted restore point', () => {
  it('boots over iSCSI from the backup; the repository is untouched and the writes are in the delta', async () => {
    const repo = join(dir.path, 'repo');
    const deltaDir = join(dir.path, 'deltas');
    const point = await backupImage(image.image, repo, 'bootvm');
    const before = await hashTree(repo);
    expect(before.size).toBeGreaterThan(2);

    server = await startServerProcess({
      repository: repo,
      deltaDir,
      cache: { maxBytes: '64MiB' },
      targets: [{ iqn: IQN, luns: [{ lun: 0, backup: { vm: 'bootvm', point } }] }],
    });
    const nonce = `mount-${process.pid}`;
    const result = await bootFromIscsi(server.url(0), { timeoutMs: 120_000, nonce, logFile: join(dir.path, 'serial.log') });
    const context = `serial:\n${result.serial.slice(-3000)}\nqemu:\n${result.qemuStderr.slice(-1500)}\nserver:\n${server.stderr().slice(-3000)}`;
    expect(result.markerSeen, context).toBe(true);
    expect(result.errors, context).toEqual([]);
    expect(result.done, context).toBe(true);
    expect(result.guestHash, context).toBe(image.manifest.hashRegion.sha256);
    expect(result.scratchStatus, context).toBe('OK');
    console.info(`boot from mounted restore point: marker after ${Math.round(result.markerMs ?? -1)} ms, done after ${Math.round(result.elapsedMs)} ms`);

    // The guest's write is in the mount's delta…
    const state = JSON.parse(await readFile(join(deltaDir, 'server.json'), 'utf8')) as { control: string };
    const control = new ControlClient(state.control);
    const [mount] = await control.request<MountInfo[]>('GET', '/v1/mounts');
    expect(mount!.deltaBytes).toBeGreaterThanOrEqual(image.manifest.scratch.endBytes - image.manifest.scratch.startBytes);
    expect(mount!.writes).toBeGreaterThan(0);
    const lunCopy = join(dir.path, 'lun.img');
    await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.url(0), lunCopy], { timeoutMs: 120_000 });
    const expectedScratch = scratchPattern(nonce, image.manifest.scratch.endBytes - image.manifest.scratch.startBytes);
    expect(sha256(await readScratch(lunCopy, image.manifest))).toBe(sha256(expectedScratch));
    await server.stop();
    server = undefined;

    // …and not in the backup: the repository's files are byte-identical, and the restore point
    // still exports the original image.
    const after = await hashTree(repo);
    expect([...after.entries()].sort()).toEqual([...before.entries()].sort());
    const exported = join(dir.path, 'export.img');
    await cli(['export', '--repo', repo, '--vm', 'bootvm', '--point', point, exported]);
    expect(sha256(await readScratch(exported, image.manifest))).toBe(sha256(await readScratch(image.image, image.manifest)));
    expect(sha256(await readScratch(exported, image.manifest))).not.toBe(sha256(expectedScratch));
  });
});
