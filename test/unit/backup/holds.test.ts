/**
 * Holds (src/backup/holds.ts): when a mount's claim on a restore point counts as live. The CLI
 * flow (prune keeps, gc refuses) is in test/e2e/mount-cli.test.ts.
 */
import { spawnSync } from 'node:child_process';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { liveHolds, placeHold, type Hold } from '../../../src/backup/holds.js';
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

  it("holds are per repository (by real path), another host's holds count as live, an unreadable hold stops prune and gc", async () => {
    const other = join(dir.path, 'other');
    await mkdir(other);
    const file = await placeHold({ repository: join(repo, '..', 'repo'), vm: 'vm1', point: 'p1', holder: 'mount a' }, holds);
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
    await expect(liveHolds(repo, holds)).rejects.toThrow(/hold file .* is unreadable/);
  });

  it('placing the same hold twice gives one file', async () => {
    const req = { repository: repo, vm: 'vm1', point: 'p1', holder: 'mount a', deltaRecord: join(dir.path, 'x', 'mount.json') };
    expect(await placeHold(req, holds)).toBe(await placeHold(req, holds));
    expect(await readdir(holds)).toHaveLength(1);
  });
});
