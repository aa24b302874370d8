/**
 * The mount life cycle through the CLI, as an operator drives it:
 *   `mount` with no server running starts one in the background and mounts; a second `mount` adds
 *   another LUN to the running server; `mounts` lists both with delta size and cache statistics;
 *   qemu-io writes through one of them; `commit` turns base + delta into a new restore point whose
 *   parent is the mounted one and which holds only the changed chunks as new; `export` of that new
 *   point shows the writes; `unmount --keep` / `--discard` behave as documented; bad requests get
 *   clear errors. prune and gc never take a restore point from under a mount or a kept delta.
 */
import { copyFile, readFile, readdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCommand } from '../helpers/exec.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { backupImage, cli, cliResult, writeJson, writeTestImage } from '../helpers/repo.js';

const MiB = 1 << 20;
const CHUNK = 256 * 1024;
let dir: TempDir;
let configFile: string;
let deltaDir: string;
let repo: string;
let image: string;

async function serverPid(): Promise<number | undefined> {
  try {
    return (JSON.parse(await readFile(join(deltaDir, 'server.json'), 'utf8')) as { pid: number }).pid;
  } catch {
    return undefined;
  }
}

beforeAll(async () => {
  dir = await makeTempDir('mount-cli');
  repo = join(dir.path, 'repo');
  deltaDir = join(dir.path, 'deltas');
  image = join(dir.path, 'disk.img');
  await writeTestImage(image, 24 * MiB, 5);
  await backupImage(image, repo, 'web1');
  configFile = join(dir.path, 'bootrestore.json');
  await writeJson(configFile, { listen: ['127.0.0.1:0'], repository: repo, deltaDir, cache: { maxBytes: '32MiB' }, targets: [] });
});

afterAll(async () => {
  const pid = await serverPid();
  if (pid) {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      /* already gone */
    }
    for (let i = 0; i < 100; i++) {
      try {
        process.kill(pid, 0);
        await new Promise((r) => setTimeout(r, 100));
      } catch {
        break;
      }
    }
  }
  await dir?.remove();
});

describe('bootrestore mount / mounts / commit / unmount', () => {
  it('runs the whole life cycle against a background server', async () => {
    // No server yet: mount starts one.
    expect(await serverPid()).toBeUndefined();
    const first = JSON.parse((await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'web1-test', '--json'])).stdout) as {
      url: string;
      serial: string;
      point: string;
      iqn: string;
    };
    expect(first.url).toMatch(/^iscsi:\/\/127\.0\.0\.1:\d+\/iqn\.2026-12\.io\.bootrestore:mount\.web1-test\/0$/);
    const pid = await serverPid();
    expect(pid).toBeGreaterThan(0);

    // A second mount of the same restore point: another LUN with a different identity.
    const second = JSON.parse((await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'web1-second', '--read-only', '--json'])).stdout) as {
      url: string;
      serial: string;
    };
    expect(second.serial).not.toBe(first.serial);
    expect(await serverPid()).toBe(pid); // same server
    const dup = await cliResult(['mount', '--config', configFile, '--vm', 'web1', '--name', 'web1-test']);
    expect(dup.exitCode).toBe(1);
    expect(dup.stderr).toContain('already mounted');
    const missing = await cliResult(['mount', '--config', configFile, '--vm', 'no-such-vm', '--name', 'x1']);
    expect(missing.exitCode).toBe(1);
    expect(missing.stderr).toMatch(/no-such-vm/);

    // Write through the first mount: two chunks touched.
    const w = await runCommand('qemu-io', ['-f', 'raw', '-c', `write -P 0x42 ${CHUNK + 4096} 8192`, '-c', `write -P 0x43 ${10 * MiB} 512`, '-c', 'flush', first.url], {
      timeoutMs: 60_000,
    });
    expect(w.exitCode, w.stderr + w.stdout).toBe(0);
    const ro = await runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 0 512', second.url], { timeoutMs: 60_000 });
    expect(ro.stdout + ro.stderr).toMatch(/denied|protect|read-only|Operation not permitted|error/i);

    const listed = JSON.parse((await cli(['mounts', '--config', configFile, '--json'])).stdout) as {
      mounts: Array<{ name: string; deltaBytes: number; writes: number; readOnly: boolean }>;
      cache: { maxBytes: number };
    };
    const m1 = listed.mounts.find((m) => m.name === 'web1-test')!;
    expect(m1.deltaBytes).toBeGreaterThanOrEqual(8192 + 512);
    expect(m1.writes).toBe(2);
    expect(listed.mounts.find((m) => m.name === 'web1-second')!.readOnly).toBe(true);
    expect(listed.cache.maxBytes).toBe(32 * MiB);
    const table = (await cli(['mounts', '--config', configFile])).stdout;
    expect(table).toContain('web1-test');
    expect(table).toMatch(/cache: .* in \d+ chunks/);

    // Commit: a new restore point, child of the mounted one, with only the changed chunks new.
    const committed = JSON.parse((await cli(['commit', '--config', configFile, 'web1-test', '--json'])).stdout) as {
      point: string;
      newChunks: number;
    };
    expect(committed.newChunks).toBe(2);
    const points = JSON.parse((await cli(['list', '--repo', repo, '--vm', 'web1', '--json'])).stdout) as unknown;
    const list = (Array.isArray(points) ? points : (points as { points: unknown[] }).points) as Array<{ id: string; parent: string | null }>;
    expect(list.find((p) => p.id === committed.point)?.parent).toBe(first.point);
    const exported = join(dir.path, 'committed.img');
    await cli(['export', '--repo', repo, '--vm', 'web1', '--point', committed.point, exported]);
    const expected = await readFile(image);
    expected.fill(0x42, CHUNK + 4096, CHUNK + 4096 + 8192);
    expected.fill(0x43, 10 * MiB, 10 * MiB + 512);
    expect((await readFile(exported)).equals(expected)).toBe(true);
    expect((await cli(['verify', '--repo', repo])).exitCode).toBe(0);

    // unmount needs an explicit choice; --keep keeps the delta, and mounting the name again resumes it.
    const noChoice = await cliResult(['unmount', '--config', configFile, 'web1-test']);
    expect(noChoice.exitCode).toBe(2);
    await cli(['unmount', '--config', configFile, 'web1-test', '--keep']);
    const again = JSON.parse((await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'web1-test', '--json'])).stdout) as {
      serial: string;
      deltaBytes: number;
    };
    expect(again.serial).toBe(first.serial);
    expect(again.deltaBytes).toBeGreaterThanOrEqual(8192 + 512);
    await cli(['unmount', '--config', configFile, 'web1-test', '--discard']);
    await cli(['unmount', '--config', configFile, 'web1-second', '--discard']);
    expect((await cli(['mounts', '--config', configFile])).stdout).toContain('no mounts');
    const gone = await cliResult(['unmount', '--config', configFile, 'web1-test', '--discard']);
    expect(gone.exitCode).toBe(1);
    expect(gone.stderr).toContain('no mount named');
  });
  it('a failed mount leaves nothing behind; a kept delta is not hidden by a read-only mount; restarts resume cleanly', async () => {
    const badName = await cliResult(['mount', '--config', configFile, '--vm', 'web1', '--name', 'bad1', '--target', 'not-an-iqn']);
    expect(badName.exitCode).toBe(1);
    expect(badName.stderr).toContain('not an iSCSI name');
    await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x1']);
    const clash = await cliResult(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x2', '--target', 'iqn.2026-12.io.bootrestore:mount.x1', '--lun', '0']);
    expect(clash.exitCode).toBe(1);
    expect(clash.stderr).toContain('already used by mount "x1"');
    const badLun = await cliResult(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x3', '--lun', '0x10']);
    expect(badLun.exitCode).toBe(2);
    for (const gone of ['bad1', 'x2', 'x3']) {
      await expect(readFile(join(deltaDir, gone, 'mount.json'))).rejects.toThrow();
    }
    await cli(['unmount', '--config', configFile, 'x1', '--keep']);
    const ro = await cliResult(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x1', '--read-only']);
    expect(ro.exitCode).toBe(1);
    expect(ro.stderr).toContain('kept delta');
    await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x1']);

    // Restart: SIGTERM the background server, then the next CLI mount starts a new one, which
    // resumes x1 from its record.
    const pid = (await serverPid())!;
    process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 150 && (await serverPid()) !== undefined; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await serverPid()).toBeUndefined();
    await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'x4', '--read-only']);
    const listed = JSON.parse((await cli(['mounts', '--config', configFile, '--json'])).stdout) as { mounts: Array<{ name: string }> };
    expect(listed.mounts.map((m) => m.name).sort()).toEqual(['x1', 'x4']);
    await cli(['unmount', '--config', configFile, 'x1', '--discard']);
    await cli(['unmount', '--config', configFile, 'x4', '--discard']);
  });

  it('prune keeps a restore point a mount or a kept delta uses; gc refuses while a mounted point has no index', async () => {
    const oldImage = join(dir.path, 'db1-old.img');
    await writeTestImage(oldImage, 8 * MiB, 21);
    const oldPoint = await backupImage(oldImage, repo, 'db1');
    const newImage = join(dir.path, 'db1-new.img');
    await writeTestImage(newImage, 8 * MiB, 22);
    await backupImage(newImage, repo, 'db1');
    const oldIndex = join(repo, 'vms', 'db1', `${oldPoint}.index`);
    await stat(oldIndex); // the layout this test relies on

    const mounted = JSON.parse((await cli(['mount', '--config', configFile, '--vm', 'db1', '--point', oldPoint, '--name', 'db1-old', '--json'])).stdout) as {
      url: string;
    };
    const w = await runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4096 4096', '-c', 'flush', mounted.url], { timeoutMs: 60_000 });
    expect(w.exitCode, w.stderr + w.stdout).toBe(0);

    const listed = JSON.parse((await cli(['list', '--repo', repo, '--vm', 'db1', '--json'])).stdout) as { points: Array<{ id: string; usedBy: string[] }> };
    expect(listed.points.map((p) => p.usedBy)).toEqual([['mount db1-old'], []]);
    expect(listed.points[0]!.id).toBe(oldPoint);
    expect((await cli(['list', '--repo', repo, '--vm', 'db1'])).stdout).toMatch(new RegExp(`${oldPoint}.*mount db1-old`));

    // A running mount: prune keeps its point and says why; gc (no grace) leaves every chunk it needs.
    const pruned = await cli(['prune', '--repo', repo, '--vm', 'db1', '--keep-last', '1']);
    expect(pruned.stdout).toContain(`kept db1/${oldPoint}: used by mount db1-old`);
    expect(pruned.stdout).toContain('0 removed');
    await stat(oldIndex);
    const gc = JSON.parse((await cli(['gc', '--repo', repo, '--grace-seconds', '0', '--json'])).stdout) as { indexes: number };
    expect(gc.indexes).toBeGreaterThanOrEqual(3);
    expect((await cli(['verify', '--repo', repo])).exitCode).toBe(0);
    const expected = await readFile(oldImage);
    expected.fill(0x5a, 4096, 8192);
    const copy = join(dir.path, 'db1-old-read.img');
    await cli(['unmount', '--config', configFile, 'db1-old', '--keep']);

    // A kept delta needs its base just as much, also with no server running (its record keeps the
    // hold), and a server that starts holds every delta it finds (deltas kept before holds existed).
    const pid = (await serverPid())!;
    process.kill(pid, 'SIGTERM');
    for (let i = 0; i < 150 && (await serverPid()) !== undefined; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await serverPid()).toBeUndefined();
    expect((await cli(['prune', '--repo', repo, '--vm', 'db1', '--keep-last', '1'])).stdout).toContain('used by mount db1-old');
    const holdsDir = process.env.BOOTRESTORE_HOLDS_DIR!;
    for (const name of await readdir(holdsDir)) await rm(join(holdsDir, name));
    await cli(['mount', '--config', configFile, '--vm', 'web1', '--name', 'probe', '--read-only']); // starts a server
    expect((await cli(['prune', '--repo', repo, '--vm', 'db1', '--keep-last', '1'])).stdout).toContain('used by mount db1-old');
    await cli(['unmount', '--config', configFile, 'probe', '--discard']);

    // An index removed behind prune's back stops gc.
    await copyFile(oldIndex, join(dir.path, 'saved.index'));
    await rm(oldIndex);
    const refused = await cliResult(['gc', '--repo', repo, '--grace-seconds', '0']);
    expect(refused.exitCode).toBe(1);
    expect(refused.stderr).toContain(`gc refused: restore point db1@${oldPoint} is used by mount db1-old`);
    await copyFile(join(dir.path, 'saved.index'), oldIndex);

    // Resumed, the mount still reads the VM's write over the base, every chunk intact.
    const resumed = JSON.parse((await cli(['mount', '--config', configFile, '--vm', 'db1', '--name', 'db1-old', '--json'])).stdout) as { url: string };
    const conv = await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', resumed.url, copy], { timeoutMs: 120_000 });
    expect(conv.exitCode, conv.stderr).toBe(0);
    expect((await readFile(copy)).equals(expected)).toBe(true);

    // Discarded (here a kept, unmounted delta), nothing holds the point any more: prune removes it.
    await cli(['unmount', '--config', configFile, 'db1-old', '--keep']);
    await cli(['unmount', '--config', configFile, 'db1-old', '--discard']);
    const finalPrune = await cli(['prune', '--repo', repo, '--vm', 'db1', '--keep-last', '1']);
    expect(finalPrune.stdout).toContain(`removed db1/${oldPoint}`);
    await expect(stat(oldIndex)).rejects.toThrow();
  });
});
