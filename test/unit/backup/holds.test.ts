/**
 * Holds (src/backup/holds.ts): when a mount's claim on a restore point counts as live. The CLI
 * flow (prune keeps, gc refuses) is in test/e2e/mount-cli.test.ts.
 */
import { spawnSync } from 'node:child_process';
import { mkdir, readFile, readdir, rename, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { liveHolds, placeHold, type Hold } from '../../../src/backup/holds.js';
import { collectGarbage, pruneVm } from '../../../src/backup/maintenance.js';
import { verifyRepository } from '../../../src/backup/verify.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { chunkStoreFiles } from '../../helpers/chunk-store.js';
import { makeTempDir, type TempDir } from '../../helpers/tmp.js';

let dir: TempDir;
let repo: string;
let holds: string;

beforeEach(async () => {
  dir = await makeTempDir('holds');
  repo = join(dir.path, 'repo');
  holds = join(dir.path, 'holds');
  await mkdir(repo);
});
afterEach(async () => dir.remove());

/** A pid that is certainly not running: a child that has exited. */
function deadPid(): number {
  return spawnSync(process.execPath, ['-e', '0']).pid!;
}

async function rewrite(file: string, patch: Partial<Hold>): Promise<void> {
  const hold = JSON.parse(await readFile(file, 'utf8')) as Hold;
  await writeFile(file, JSON.stringify({ ...hold, ...patch }));
}

describe('mount holds', () => {
  it('a hold of a running process is live; once the process is gone and no delta record backs it, it is removed', async () => {
    const file = await placeHold({ repository: repo, vm: 'vm1', point: 'p1', holder: 'mount a' }, holds);
    expect((await liveHolds(repo, holds)).map((h) => [h.vm, h.point, h.holder, h.file])).toEqual([['vm1', 'p1', 'mount a', file]]);
    await rewrite(file, { pid: deadPid() });
    expect(await liveHolds(repo, holds)).toEqual([]);
    expect(await readdir(holds)).toEqual([]);
  });

  it('a kept delta keeps its hold after the server died, until its record is gone or names another point', async () => {
    const record = join(dir.path, 'deltas', 'm1', 'mount.json');
    await mkdir(join(dir.path, 'deltas', 'm1'), { recursive: true });
    await writeFile(record, JSON.stringify({ name: 'm1', vm: 'vm1', point: 'p1' }));
    const file = await placeHold({ repository: repo, vm: 'vm1', point: 'p1', holder: 'mount m1', deltaRecord: record }, holds);
    await rewrite(file, { pid: deadPid() });
    expect((await liveHolds(repo, holds)).map((h) => h.holder)).toEqual(['mount m1']);
    await writeFile(record, JSON.stringify({ name: 'm1', vm: 'vm1', point: 'p2' }));
    expect(await liveHolds(repo, holds)).toEqual([]);
  });

  it('a pid from before the last reboot does not keep a hold', async () => {
    const file = await placeHold({ repository: repo, vm: 'vm1', point: 'p1', holder: 'mount a' }, holds);
    await rewrite(file, { bootId: 'some-earlier-boot' }); // pid: this very process
    expect(await liveHolds(repo, holds)).toEqual([]);
  });

  it("holds are per repository (by real path), another host's holds count as live, an unreadable or malformed hold is an error", async () => {
    const other = join(dir.path, 'other');
    await mkdir(other);
    const link = join(dir.path, 'repo-link');
    await symlink(repo, link);
    const file = await placeHold({ repository: link, vm: 'vm1', point: 'p1', holder: 'mount a' }, holds);
    expect(await liveHolds(other, holds)).toEqual([]);
    expect(await liveHolds(repo, holds)).toHaveLength(1);
    // A stale hold of another repository is cleaned up by a look at this one.
    const gone = await placeHold({ repository: other, vm: 'vm2', point: 'p2', holder: 'mount b' }, holds);
    await rewrite(gone, { pid: deadPid() });
    expect(await liveHolds(repo, holds)).toHaveLength(1);
    expect(await readdir(holds)).toEqual([file.slice(holds.length + 1)]);
    await rewrite(file, { pid: deadPid(), host: 'some-other-host' });
    expect(await liveHolds(repo, holds)).toHaveLength(1);
    await writeFile(file, '{"version":1,');
    await expect(liveHolds(repo, holds)).rejects.toThrow(/hold file .* is not JSON/);
    await writeFile(file, 'null');
    await expect(liveHolds(repo, holds)).rejects.toThrow(/hold file .* is not a hold/);
  });

  it('placing the same hold twice gives one file', async () => {
    const req = { repository: repo, vm: 'vm1', point: 'p1', holder: 'mount a', deltaRecord: join(dir.path, 'x', 'mount.json') };
    expect(await placeHold(req, holds)).toBe(await placeHold(req, holds));
    expect(await readdir(holds)).toHaveLength(1);
  });
});

describe('prune and gc with holds (a real repository)', () => {
  const CHUNK = 64 * 1024;
  async function threePoints(): Promise<string[]> {
    const ids: string[] = [];
    for (let seed = 1; seed <= 3; seed++) {
      const r = await backupSource(repo, new BufferSource(pseudoRandomBytes(4 * CHUNK, seed)), { vm: 'vm1', chunkSize: CHUNK });
      ids.push(r.info.id);
    }
    return ids;
  }
  const indexPath = (id: string): string => join(repo, 'vms', 'vm1', `${id}.index`);

  it('prune keeps a held point; an index a dead prune left aside is put back by the next prune', async () => {
    const [p1, p2, p3] = await threePoints();
    await placeHold({ repository: repo, vm: 'vm1', point: p1!, holder: 'mount m1' }, holds);
    // A prune that died after moving p2's index aside.
    await rename(indexPath(p2!), `${indexPath(p2!)}.pruning-${deadPid()}`);
    const result = await pruneVm(repo, 'vm1', 1, { holdsDir: holds });
    expect(result.held.map((h) => [h.id, h.by.startsWith('mount m1 (server pid')])).toEqual([[p1, true]]);
    expect(result.removed).toEqual([p2]); // put back, then pruned for real
    expect(result.kept).toEqual([p1, p3]);
    expect((await readdir(join(repo, 'vms', 'vm1'))).sort()).toEqual([`${p1}.index`, `${p3}.index`]);
    // A malformed hold might protect anything: prune and gc stop and name it.
    await writeFile(join(holds, '0123456789abcdef01234567.json'), 'null');
    await expect(pruneVm(repo, 'vm1', 0, { holdsDir: holds })).rejects.toThrow(/hold file .* is not a hold/);
    await expect(collectGarbage(repo, { holdsDir: holds })).rejects.toThrow(/hold file .* is not a hold/);
    expect(await readdir(join(repo, 'vms', 'vm1'))).toHaveLength(2);
  });

  it('gc marks an index a running prune has moved aside, and refuses while a held point has no index', async () => {
    const [p1] = await threePoints();
    const old = new Date(Date.now() - 3_600_000);
    for (const f of await chunkStoreFiles(repo)) await utimes(f, old, old);
    // A prune (this process: alive) in the middle of its re-check: p1's index is aside.
    const aside = `${indexPath(p1!)}.pruning-${process.pid}`;
    await rename(indexPath(p1!), aside);
    const gc = await collectGarbage(repo, { graceMs: 0, holdsDir: holds });
    expect(gc.removedChunks).toBe(0);
    await rename(aside, indexPath(p1!));
    expect((await verifyRepository(repo)).brokenIndexes).toEqual([]);
    // Held, and its index gone for good: gc deletes nothing.
    await placeHold({ repository: repo, vm: 'vm1', point: p1!, holder: 'mount m1' }, holds);
    await rename(indexPath(p1!), join(dir.path, 'saved.index'));
    await expect(collectGarbage(repo, { graceMs: 0, holdsDir: holds })).rejects.toThrow(`gc refused: restore point vm1@${p1} is used by mount m1`);
    await rename(join(dir.path, 'saved.index'), indexPath(p1!));
    expect((await collectGarbage(repo, { graceMs: 0, holdsDir: holds })).removedChunks).toBe(0);
    expect((await verifyRepository(repo)).brokenIndexes).toEqual([]);
  });
});
