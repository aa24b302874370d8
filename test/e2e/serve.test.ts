/**
 * `bootrestore serve` as an operator runs it: a bad config is refused with file, key and reason;
 * CHAP from the config is enforced for real initiators; VPD 0x80/0x83 identity stays the same across
 * restarts (derived from the config); SIGTERM stops the server cleanly (exit 0) while a client is
 * connected, and a write flushed before it is in the file.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCommand } from '../helpers/exec.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { cliResult, writeTestImage } from '../helpers/repo.js';

const IQN = 'iqn.2026-12.io.bootrestore.test:serve';
let dir: TempDir;
let server: ServerProcess | undefined;
let disk: string;

beforeAll(async () => {
  dir = await makeTempDir('serve');
  disk = join(dir.path, 'disk.img');
  await writeTestImage(disk, 16 << 20, 3);
});

afterAll(async () => {
  await server?.stop();
  await dir?.remove();
});

async function inq(url: string, page: number): Promise<string> {
  const r = await runCommand('iscsi-inq', ['-e', '1', '-c', String(page), url], { timeoutMs: 30_000 });
  expect(r.exitCode, r.stderr).toBe(0);
  return r.stdout;
}

describe('bootrestore serve', () => {
  it('refuses a bad config naming the file, the key and the reason', async () => {
    const file = join(dir.path, 'bad.json');
    await writeFile(file, JSON.stringify({ listen: ['127.0.0.1:0'], targets: [{ iqn: IQN, luns: [{ lun: 0, file: disk, readonly: true }] }] }));
    const r = await cliResult(['serve', '--config', file], 30_000);
    expect(r.exitCode).toBe(78);
    expect(r.stderr).toContain(file);
    expect(r.stderr).toContain('targets[0].luns[0].readonly');
    expect(r.stderr).toContain('unknown key');
    const missing = await cliResult(['serve', '--config', join(dir.path, 'nope.json')], 30_000);
    expect(missing.exitCode).toBe(78);
    expect(missing.stderr).toMatch(/nope\.json.*cannot read/);
    const noFile = join(dir.path, 'nofile.json');
    await writeFile(noFile, JSON.stringify({ listen: ['127.0.0.1:0'], targets: [{ iqn: IQN, luns: [{ lun: 0, file: join(dir.path, 'absent.img') }] }] }));
    const r2 = await cliResult(['serve', '--config', noFile], 30_000);
    expect(r2.exitCode).toBe(1);
    expect(r2.stderr).toContain('absent.img');
  });

  it('enforces CHAP from the config, keeps the LUN identity across restarts, stops cleanly on SIGTERM', async () => {
    const config = {
      targets: [{ iqn: IQN, chap: { username: 'operator', secret: 'correct-horse1' }, luns: [{ lun: 0, file: disk }] }],
    };
    server = await startServerProcess(config);
    const port = server.port;
    const noAuth = await runCommand('iscsi-ls', ['-s', `iscsi://127.0.0.1:${port}`], { timeoutMs: 30_000 });
    const withAuth = `iscsi://operator%correct-horse1@127.0.0.1:${port}/${IQN}/0`;
    const wrong = await runCommand('iscsi-inq', [`iscsi://operator%wrong-secret1@127.0.0.1:${port}/${IQN}/0`], { timeoutMs: 30_000 });
    expect(wrong.exitCode).not.toBe(0);
    const noCreds = await runCommand('iscsi-inq', [`iscsi://127.0.0.1:${port}/${IQN}/0`], { timeoutMs: 30_000 });
    expect(noCreds.exitCode).not.toBe(0);
    expect(noAuth.stdout).toContain(IQN); // discovery needs no CHAP; the normal session does
    const serial1 = await inq(withAuth, 128);
    const ident1 = await inq(withAuth, 131);
    expect(serial1).toMatch(/Unit Serial Number:\[[0-9a-f]{24}\]/);
    // VPD 0x83: an NAA and a T10 vendor designator for the logical unit (ESXi, Linux and QEMU name the LUN from them).
    expect(ident1).toMatch(/Association:\(0\) LOGICAL_UNIT\s+Designator Type:\(3\) NAA/);
    expect(ident1).toMatch(/Association:\(0\) LOGICAL_UNIT\s+Designator Type:\(1\) T10_VENDORT_ID\s+Designator:\[BOOTREST[0-9a-f]{24}\]/);
    // VPD 0 lists every page the kernel, QEMU and ESXi ask for.
    const pages = await inq(withAuth, 0);
    for (const page of ['0x80 UNIT_SERIAL_NUMBER', '0x83 DEVICE_IDENTIFICATION', '0xb0 BLOCK_LIMITS', '0xb1', '0xb2 LOGICAL_BLOCK_PROVISIONING']) {
      expect(pages).toContain(`Page:${page}`);
    }
    const capacity = await runCommand('iscsi-readcapacity16', [withAuth], { timeoutMs: 30_000 });
    expect(capacity.stdout).toContain(`Total size:${16 << 20}`);

    // A write flushed before SIGTERM is in the file; the server exits 0.
    const w = await runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 1M 64k', '-c', 'flush', withAuth], { timeoutMs: 60_000 });
    expect(w.exitCode, w.stderr + w.stdout).toBe(0);
    expect(await server.stop()).toBe(0);
    expect(server.logs().some((l) => l.msg === 'stopped')).toBe(true);
    const content = await readFile(disk);
    expect(content.subarray(1 << 20, (1 << 20) + 65536).every((b) => b === 0x77)).toBe(true);

    // Same config, new process: same identity.
    server = await startServerProcess(config);
    const url2 = `iscsi://operator%correct-horse1@127.0.0.1:${server.port}/${IQN}/0`;
    expect(await inq(url2, 128)).toBe(serial1);
    expect(await inq(url2, 131)).toBe(ident1);
    expect(await server.stop()).toBe(0);
    server = undefined;
  });
});
