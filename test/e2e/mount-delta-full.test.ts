/**
 * A mounted restore point whose delta's file system fills up (a 2 MiB tmpfs as deltaDir), with a
 * real initiator (qemu-io over libiscsi): the write that finds no space fails with SPACE
 * ALLOCATION FAILED WRITE PROTECT (07/27/07), which QEMU turns into ENOSPC ("No space left on
 * device"; a QEMU guest with the default werror=enospc is paused, not handed an I/O error); every
 * write acknowledged before it, flushed, reads back; reads keep working; once there is room again
 * and the mount is opened again, writes work; the repository is untouched.
 * Needs permission to mount a tmpfs (CI runs as root); without it the test is reported skipped
 * (and a warning says why).
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runCommand } from '../helpers/exec.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import type { TempDir } from '../helpers/tmp.js';
import { backupImage, cli, cliResult, hashTree, writeTestImage } from '../helpers/repo.js';

const MiB = 1 << 20;
const IMAGE_SIZE = 16 * MiB;

// The small file system is mounted when the file loads, so that a machine that does not allow it
// reports the test as skipped (with the reason below) instead of passing it.
const dirPath = mkdtempSync(join(tmpdir(), 'bootrestore-delta-full-'));
const deltaMount = join(dirPath, 'deltas');
mkdirSync(deltaMount);
const mountAttempt = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', deltaMount], { encoding: 'utf8' });
const mounted = mountAttempt.status === 0;
if (!mounted) console.warn(`mount-delta-full: SKIPPED, cannot mount a tmpfs here: ${mountAttempt.stderr || mountAttempt.error?.message}`);
const dir: TempDir = { path: dirPath, remove: () => rm(dirPath, { recursive: true, force: true }) };
let server: ServerProcess | undefined;

afterAll(async () => {
  await server?.stop();
  if (mounted) spawnSync('umount', [deltaMount]);
  await dir.remove();
});

describe('a full delta file system', () => {
  it.skipIf(!mounted)('fails the write that finds no space with 07/27/07 and loses no acknowledged write', async () => {
    const image = join(dir.path, 'base.img');
    await writeTestImage(image, IMAGE_SIZE, 11);
    const repo = join(dir.path, 'repo');
    const point = await backupImage(image, repo, 'full');
    const before = await hashTree(repo);
    // Something else on the same file system, removed later to make room again.
    const filler = join(deltaMount, 'filler');
    await writeFile(filler, Buffer.alloc(512 * 1024, 1));
    server = await startServerProcess({ repository: repo, deltaDir: deltaMount, cache: { maxBytes: '16MiB' }, targets: [] });
    const mountCli = async (): Promise<string> =>
      (JSON.parse((await cli(['mount', '--config', server!.configFile, '--vm', 'full', '--point', point, '--name', 'full1', '--json'])).stdout) as { url: string }).url;
    let url = await mountCli();

    // 1 MiB acknowledged and flushed: fits.
    const first = await runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 1M', '-c', 'flush', url], { timeoutMs: 60_000 });
    expect(first.exitCode, first.stderr + first.stdout).toBe(0);
    expect(first.stdout + first.stderr).not.toMatch(/failed/i);
    // 4 MiB more cannot fit in what is left of 2 MiB.
    const second = await runCommand('qemu-io', ['-f', 'raw', '-c', `write -P 0x62 ${4 * MiB} 4M`, url], { timeoutMs: 60_000 });
    expect(second.stdout + second.stderr).toMatch(/No space left on device/);

    // The flushed write and the untouched base read back; reads of the LUN keep working.
    const copy = join(dir.path, 'after.img');
    const conv = await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, copy], { timeoutMs: 120_000 });
    expect(conv.exitCode, conv.stderr).toBe(0);
    const got = await readFile(copy);
    const base = await readFile(image);
    expect(got.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x61))).toBe(true);
    expect(got.subarray(MiB, 4 * MiB).equals(base.subarray(MiB, 4 * MiB))).toBe(true);
    // Where the failed write went: each 512-byte sector is the old or the new content, never other bytes.
    for (let at = 4 * MiB; at < 8 * MiB; at += 512) {
      const sector = got.subarray(at, at + 512);
      if (!sector.equals(base.subarray(at, at + 512)) && !sector.equals(Buffer.alloc(512, 0x62))) throw new Error(`sector at ${at} is garbage`);
    }
    expect(got.subarray(8 * MiB).equals(base.subarray(8 * MiB))).toBe(true);
    expect(server.stderr()).toContain('(no space left for it)'); // classified, not just passed on

    // Unmounting goes through although its last flush finds no room (the delta is kept); with room
    // again, the same mount opened again takes writes, and nothing earlier was lost.
    const unmount = await cliResult(['unmount', '--config', server.configFile, 'full1', '--keep']);
    expect(unmount.exitCode, unmount.stderr).toBe(0);
    expect(server.stderr()).toContain('flush before closing the LUN failed');
    await rm(filler);
    url = await mountCli();
    const third = await runCommand('qemu-io', ['-f', 'raw', '-c', `write -P 0x63 ${12 * MiB} 256k`, '-c', 'flush', url], { timeoutMs: 60_000 });
    expect(third.exitCode, third.stderr + third.stdout).toBe(0);
    expect(third.stdout + third.stderr).not.toMatch(/failed/i);
    const copy2 = join(dir.path, 'after2.img');
    const conv2 = await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, copy2], { timeoutMs: 120_000 });
    expect(conv2.exitCode, conv2.stderr).toBe(0);
    const got2 = await readFile(copy2);
    expect(got2.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x61))).toBe(true);
    expect(got2.subarray(12 * MiB, 12 * MiB + 256 * 1024).equals(Buffer.alloc(256 * 1024, 0x63))).toBe(true);
    expect(got2.subarray(MiB, 4 * MiB).equals(base.subarray(MiB, 4 * MiB))).toBe(true);
    expect(await hashTree(repo)).toEqual(before);
  });
});
