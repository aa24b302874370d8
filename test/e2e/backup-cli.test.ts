/**
 * The backup CLI as a real child process on images made and compared by qemu-img / qemu-io.
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { openRestorePoint } from '../../src/backup/reader.js';
import { buildBackupCli, runCli } from '../helpers/backup-cli.js';
import { corruptChunk, listChunkRecords, listStoredChunks, readChunkRecord } from '../helpers/chunk-store.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const CHUNK = 256 * 1024;

let dir: string;
let cli: string;
let cleanupCli: () => Promise<void> = async () => undefined;

beforeAll(async () => {
  dir = await fsp.mkdtemp(join(tmpdir(), 'bootrestore-backup-e2e-'));
  const built = await buildBackupCli();
  cli = built.cli;
  cleanupCli = built.cleanup;
});
afterAll(async () => {
  await cleanupCli();
  if (dir) await fsp.rm(dir, { recursive: true, force: true });
});

async function qemuIo(image: string, ...commands: string[]): Promise<void> {
  await exec('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), image]);
}

/** qemu-img compare: exit 0 = identical contents. */
async function sameImage(a: string, b: string): Promise<boolean> {
  try {
    await exec('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', a, b]);
    return true;
  } catch {
    return false;
  }
}

async function writeRandom(image: string, offset: number, length: number): Promise<void> {
  const fh = await fsp.open(image, 'r+');
  try {
    await fh.write(randomFillSync(Buffer.alloc(length)), 0, length, offset);
  } finally {
    await fh.close();
  }
}

/** Chunks stored in the repository (chunk files or records in packs); 0 before it exists. */
async function countStoredChunks(repo: string): Promise<number> {
  const exists = await fsp.stat(join(repo, 'repo.json')).then(() => true, () => false);
  return exists ? (await listStoredChunks(repo)).length : 0;
}

interface BackupJson {
  id: string;
  parent: string | null;
  mode: string;
  chunks: number;
  newChunks: number;
  dedupChunks: number;
  zeroChunks: number;
  chunkSize: number;
}

/**
 * `bootrestore backup … --json`. The counts in these tests are for 256 KiB chunks (the default until
 * run 6 of docs/repository-format.md), so that size is passed unless `extra` names one or asks for
 * the default with `--chunk-size default` (dropped from the command line).
 */
async function backup(image: string, repo: string, vm: string, ...extra: string[]): Promise<BackupJson> {
  const at = extra.indexOf('--chunk-size');
  const args = at >= 0 && extra[at + 1] === 'default' ? [...extra.slice(0, at), ...extra.slice(at + 2)] : at >= 0 ? extra : ['--chunk-size', '256K', ...extra];
  const r = await runCli(cli, ['backup', image, '--repo', repo, '--vm', vm, '--json', ...args]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as BackupJson;
}

describe('bootrestore backup / export / verify / list with qemu-img images', () => {
  it('full, incremental and changed-block backups: exact chunk counts, every point exports identical and sparse', async () => {
    const repo = join(dir, 'repo1');
    const disk = join(dir, 'disk.raw');
    await exec('qemu-img', ['create', '-q', '-f', 'raw', disk, '64M']);
    await writeRandom(disk, 0, 8 * MiB);
    await qemuIo(disk, 'write -P 0x5a 20M 4M', 'write -P 0xc3 30M 1M');
    await writeRandom(disk, 40 * MiB, 3 * MiB + 12345);

    const full = await backup(disk, repo, 'vm1');
    expect(full.mode).toBe('full');
    expect(full.chunks).toBe(256);
    // 32 + 12(+1 partial) random chunks; the 0x5a and 0xc3 runs are one chunk each (deduplicated).
    expect(full.newChunks).toBe(32 + 13 + 2);
    expect(full.dedupChunks).toBe(15 + 3);
    expect(full.zeroChunks).toBe(256 - 47 - 18);
    const copy1 = join(dir, 'disk.p1.raw');
    await exec('cp', ['--sparse=always', disk, copy1]);

    // Incremental: 4-KiB writes in five distinct chunks (two in the same chunk 41*4).
    await qemuIo(disk, 'write -P 0x01 4096 4k', 'write -P 0x02 21M 4k', 'write -P 0x03 50M 512', 'write -P 0x04 41M 4k', 'write -P 0x05 43000832 4k', 'write -P 0x06 67104768 4k');
    const inc = await backup(disk, repo, 'vm1');
    expect(inc.mode).toBe('incremental');
    expect(inc.parent).toBe(full.id);
    expect(inc.newChunks).toBe(5);
    expect(await countStoredChunks(repo)).toBe(47 + 5);
    const copy2 = join(dir, 'disk.p2.raw');
    await exec('cp', ['--sparse=always', disk, copy2]);

    // Changed blocks: three ranges (JSON form), only those are read.
    await qemuIo(disk, 'write -P 0x07 7M 64k', 'write -P 0x08 33M 4k', 'write -P 0x09 60M 1M');
    const cbt = join(dir, 'changed.json');
    await fsp.writeFile(cbt, JSON.stringify([{ offset: 7 * MiB, length: 65536 }, { offset: 33 * MiB, length: 4096 }, { offset: 60 * MiB, length: MiB }]));
    const cb = await backup(disk, repo, 'vm1', '--changed-blocks', cbt);
    expect(cb.mode).toBe('changed-blocks');
    // 7M: one random chunk changed; 33M: a zero chunk becomes data; 60M..61M: four zero chunks become one 0x09 pattern chunk.
    expect(cb.newChunks).toBe(3);
    expect(await countStoredChunks(repo)).toBe(47 + 5 + 3);

    for (const [id, expected] of [[full.id, copy1], [inc.id, copy2], [cb.id, disk]] as const) {
      const out = join(dir, `export-${id}.raw`);
      const r = await runCli(cli, ['export', '--repo', repo, '--vm', 'vm1', '--point', id, out]);
      expect(r.code).toBe(0);
      expect(await sameImage(out, expected)).toBe(true);
      const st = await fsp.stat(out);
      expect(st.size).toBe(64 * MiB);
      expect(st.blocks * 512).toBeLessThan(40 * MiB); // zero chunks are holes
      await fsp.rm(out);
    }

    const list = await runCli(cli, ['list', '--repo', repo, '--json']);
    expect(list.code).toBe(0);
    const listed = JSON.parse(list.stdout) as { points: Array<{ id: string; parent: string | null }> };
    expect(listed.points.map((p) => p.id)).toEqual([full.id, inc.id, cb.id]);
    expect(listed.points.map((p) => p.parent)).toEqual([null, full.id, inc.id]);

    // A different image size with --changed-blocks is refused with a clear message.
    await exec('qemu-img', ['resize', '-q', '-f', 'raw', disk, '65M']);
    const refused = await runCli(cli, ['backup', disk, '--repo', repo, '--vm', 'vm1', '--changed-blocks', cbt]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/image size changed from 67108864 .* to 68157440/);
  });

  it('backs up qcow2 and VMDK images (made by qemu-img) to the same chunks as the raw image', async () => {
    const repo = join(dir, 'repo-formats');
    const raw = join(dir, 'fmt.raw');
    await exec('qemu-img', ['create', '-q', '-f', 'raw', raw, '32M']);
    await writeRandom(raw, 1 * MiB, 3 * MiB);
    await qemuIo(raw, 'write -P 0x33 20M 2M');
    const rawPoint = await backup(raw, repo, 'fmt-raw');
    for (const [fmt, opts] of [['qcow2', []], ['vmdk', ['-o', 'subformat=streamOptimized']]] as const) {
      const image = join(dir, `fmt.${fmt}`);
      await exec('qemu-img', ['convert', '-q', '-f', 'raw', '-O', fmt, ...opts, raw, image]);
      const p = await backup(image, repo, `fmt-${fmt}`);
      expect(p.chunks).toBe(rawPoint.chunks);
      expect(p.zeroChunks).toBe(rawPoint.zeroChunks);
      expect(p.newChunks).toBe(0); // every data chunk already stored by the raw backup
      const out = join(dir, `fmt-${fmt}.out`);
      expect((await runCli(cli, ['export', '--repo', repo, '--vm', `fmt-${fmt}`, out])).code).toBe(0);
      expect(await sameImage(out, raw)).toBe(true);
    }
  });

  it('a repeated-content image stores each distinct chunk once', async () => {
    const repo = join(dir, 'repo-dedup');
    const disk = join(dir, 'repeat.raw');
    const block = randomFillSync(Buffer.alloc(MiB));
    await fsp.writeFile(disk, Buffer.concat(Array.from({ length: 32 }, () => block)));
    const r = await backup(disk, repo, 'rep');
    expect(r.chunks).toBe(128);
    expect(r.newChunks).toBe(4);
    expect(r.dedupChunks).toBe(124);
    expect(await countStoredChunks(repo)).toBe(4);
    const out = join(dir, 'repeat.out');
    expect((await runCli(cli, ['export', '--repo', repo, '--vm', 'rep', out])).code).toBe(0);
    expect(await sameImage(out, disk)).toBe(true);
  });

  it('--compression picks the codec of new chunks (brotli-2 in 128 KiB chunks by default, deflate, none); every repository exports identical', async () => {
    const disk = join(dir, 'codecs.raw');
    const lines: string[] = [];
    for (let i = 0, length = 0; length < 8 * MiB; i++) {
      const line = `2026-12-02T16:${i % 60} host${i % 7} sshd[${(i * 7919) % 30000}]: session ${i * 2654435761} opened\n`;
      lines.push(line);
      length += line.length;
    }
    const text = Buffer.from(lines.join('')).subarray(0, 8 * MiB);
    await fsp.writeFile(disk, Buffer.concat([text, randomFillSync(Buffer.alloc(8 * MiB))]));
    const stored: Record<string, number> = {};
    for (const [name, extra, kind] of [
      ['default', ['--chunk-size', 'default'], 2],
      ['deflate', ['--compression', 'deflate'], 1],
      ['brotli-9', ['--compression', 'brotli', '--compression-level', '9'], 2],
      ['deflate-6', ['--compression', 'deflate', '--compression-level', '6'], 1],
      ['none', ['--compression', 'none'], 0],
    ] as const) {
      const repo = join(dir, `repo-codec-${name}`);
      const made = await backup(disk, repo, 'c', ...extra);
      expect(made.chunkSize).toBe(name === 'default' ? 128 * 1024 : CHUNK);
      let bytes = 0;
      const kinds = new Set<number>();
      for (const location of await listChunkRecords(repo)) {
        const record = await readChunkRecord(location);
        bytes += record.length;
        kinds.add(record[5]!); // compression kind in the chunk header
      }
      // Text chunks carry the codec's kind; random chunks are stored as they are (kind 0).
      expect([...kinds].sort()).toEqual(kind === 0 ? [0] : [0, kind]);
      stored[name] = bytes;
      const out = join(dir, `codecs-${name}.out`);
      expect((await runCli(cli, ['export', '--repo', repo, '--vm', 'c', out])).code).toBe(0);
      expect(await sameImage(out, disk)).toBe(true);
      expect((await runCli(cli, ['verify', '--repo', repo])).code).toBe(0);
    }
    expect(stored['default']!).toBeLessThan(stored['deflate']!);
    expect(stored['brotli-9']!).toBeLessThan(stored['default']!);
    expect(stored['deflate-6']!).toBeLessThan(stored['deflate']!);
    expect(stored['deflate']!).toBeLessThan(stored['none']!);
    for (const bad of [
      ['--compression', 'zstd'],
      ['--compression', 'brotli', '--compression-level', '12'],
      ['--compression', 'deflate', '--compression-level', '0'],
      ['--compression', 'none', '--compression-level', '3'],
    ]) {
      const r = await runCli(cli, ['backup', disk, '--repo', join(dir, 'repo-codec-bad'), '--vm', 'c', ...bad]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/compression/);
    }
  });

  it.each([
    ['packs', []],
    ['files', ['--chunk-store', 'files']],
  ] as const)('verify names a corrupted chunk (%s store) and the restore points it breaks (exit 1); the reader refuses it', async (store, storeArgs) => {
    const repo = join(dir, `repo-corrupt-${store}`);
    const disk = join(dir, 'corrupt.raw');
    await exec('qemu-img', ['create', '-q', '-f', 'raw', disk, '16M']);
    await writeRandom(disk, 0, 16 * MiB);
    const p1 = await backup(disk, repo, 'c1', ...storeArgs);
    expect((JSON.parse(await fsp.readFile(join(repo, 'repo.json'), 'utf8')) as { chunkStore: string }).chunkStore).toBe(store);
    await qemuIo(disk, 'write -P 0x42 12M 4k');
    const p2 = await backup(disk, repo, 'c1');
    expect((await runCli(cli, ['verify', '--repo', repo])).code).toBe(0);

    const reader = await openRestorePoint(repo, 'c1', p1.id);
    const digest = reader.chunkDigest(3)!.toString('hex');
    const damaged = await corruptChunk(repo, digest, 1000, 0x20);
    const path = damaged.reportedPath;
    expect(path).toMatch(
      store === 'packs' ? /\/packs\/[0-9a-f]{2}\/[0-9a-f]{32}\.pack@\d+$/ : new RegExp(`/chunks/${digest.slice(0, 2)}/${digest}$`),
    );

    const v = await runCli(cli, ['verify', '--repo', repo]);
    expect(v.code).toBe(1);
    expect(v.stdout).toContain(`BAD CHUNK ${digest} (${path}): CRC32 mismatch; breaks c1/${p1.id}, c1/${p2.id}`);
    const vj = await runCli(cli, ['verify', '--repo', repo, '--json']);
    expect(vj.code).toBe(1);
    expect((JSON.parse(vj.stdout) as { brokenPoints: string[] }).brokenPoints).toEqual([`c1/${p1.id}`, `c1/${p2.id}`]);
    await expect(reader.read(3 * CHUNK, 4096)).rejects.toThrow(/corrupt chunk .*SHA-256 of the content does not match/); // a reader checks the SHA-256 by default (mounts: cache.verify)
    const ex = await runCli(cli, ['export', '--repo', repo, '--vm', 'c1', join(dir, 'corrupt.out')]);
    expect(ex.code).toBe(1);
    expect(ex.stderr).toContain(digest);
    await expect(fsp.stat(join(dir, 'corrupt.out'))).rejects.toThrow(/ENOENT/); // no half-written image left

    await damaged.restore();
    expect((await runCli(cli, ['verify', '--repo', repo])).code).toBe(0);
    await reader.close();
  });

  it('a backup killed with SIGKILL mid-way leaves a valid repository; the next backup works', async () => {
    const repo = join(dir, 'repo-crash');
    const disk = join(dir, 'crash.raw');
    await exec('qemu-img', ['create', '-q', '-f', 'raw', disk, '256M']);
    await writeRandom(disk, 0, 4 * MiB);
    const p1 = await backup(disk, repo, 'crash');
    const copy1 = join(dir, 'crash.p1.raw');
    await exec('cp', ['--sparse=always', disk, copy1]);
    const before = await countStoredChunks(repo);

    for (let off = 0; off < 256 * MiB; off += 64 * MiB) await writeRandom(disk, off, 64 * MiB);
    const child = spawn(process.execPath, [cli, 'backup', disk, '--repo', repo, '--vm', 'crash'], { stdio: 'ignore' });
    let killedAt = -1;
    try {
      const deadline = Date.now() + 60_000;
      while (Date.now() < deadline && child.exitCode === null) {
        const n = (await countStoredChunks(repo)) - before;
        if (n >= 100) {
          child.kill('SIGKILL');
          killedAt = n;
          break;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      await new Promise<void>((resolve) => (child.exitCode !== null || child.signalCode !== null ? resolve() : child.once('exit', () => resolve())));
    } finally {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    }
    expect(killedAt).toBeGreaterThanOrEqual(100);
    expect(child.signalCode).toBe('SIGKILL');
    expect(await countStoredChunks(repo)).toBeLessThan(before + 1024); // it was really mid-way

    const v = await runCli(cli, ['verify', '--repo', repo]);
    expect(v.code).toBe(0);
    const list = JSON.parse((await runCli(cli, ['list', '--repo', repo, '--json'])).stdout) as { points: Array<{ id: string }> };
    expect(list.points.map((p) => p.id)).toEqual([p1.id]);
    const out1 = join(dir, 'crash.out1');
    expect((await runCli(cli, ['export', '--repo', repo, '--vm', 'crash', out1])).code).toBe(0);
    expect(await sameImage(out1, copy1)).toBe(true);
    await fsp.rm(out1);

    // The killed process left its lock and writer marker: both are detected as stale.
    const p2 = await backup(disk, repo, 'crash');
    expect(p2.parent).toBe(p1.id);
    expect(p2.newChunks + p2.dedupChunks).toBe(1024);
    const out2 = join(dir, 'crash.out2');
    expect((await runCli(cli, ['export', '--repo', repo, '--vm', 'crash', out2])).code).toBe(0);
    expect(await sameImage(out2, disk)).toBe(true);
    await fsp.rm(out2);
    const gc = await runCli(cli, ['gc', '--repo', repo, '--grace-seconds', '0', '--json']);
    expect(gc.code).toBe(0);
    expect((await runCli(cli, ['verify', '--repo', repo])).code).toBe(0);
  });

  it('reports usage and repository errors with exit codes 2 and 1', async () => {
    const usage = await runCli(cli, ['backup', '--repo', dir]);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toMatch(/exactly one SOURCE/);
    const missing = await runCli(cli, ['list', '--repo', join(dir, 'no-such-repo')]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/no repository at .*no-such-repo/);
    const badFlag = await runCli(cli, ['verify', '--repo', dir, '--frobnicate']);
    expect(badFlag.code).toBe(2);
  });
});
