/**
 * The iSCSI transport (src/iscsi/pdu, login, session, server.ts) driven by real initiators:
 * libiscsi's iscsi-ls / iscsi-inq / iscsi-readcapacity16 / iscsi-test-cu, qemu-img and qemu-io.
 * Servers run in-process on 127.0.0.1 with ephemeral ports; every client process is awaited
 * (runCommand kills it on timeout) and the servers are stopped in afterAll.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { pino } from 'pino';
import type { Logger } from '../../src/log.js';
import { IscsiServer } from '../../src/iscsi/server.js';
import { DEFAULT_TARGET_POLICY } from '../../src/iscsi/login/keys.js';
import { MemoryScsiPort } from '../unit/iscsi/transport/memory-scsi-port.js';
import { runCommand } from '../helpers/exec.js';
import { iscsiInq, iscsiLs, iscsiReadCapacity16 } from '../helpers/libiscsi.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const IQN = 'iqn.2026-12.test.bootrestore:transport';
const IQN_DIGEST = 'iqn.2026-12.test.bootrestore:transport-crc';

/** A logger that keeps the JSON lines, to check what was negotiated. */
function capturingLogger(lines: string[]): Logger {
  return pino({ level: 'info' }, { write: (line: string) => void lines.push(line) });
}

function loginRecords(lines: string[]): Array<Record<string, unknown>> {
  return lines
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((r) => r.msg === 'login complete');
}

function pattern(buf: Buffer, seed: number): void {
  let x = seed >>> 0;
  for (let i = 0; i < buf.length; i += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0;
    buf.writeUInt32LE(x, i);
  }
}

let tmp: TempDir;
let plain: IscsiServer;
let digest: IscsiServer;
let plainPorts: Array<{ host: string; port: number }>;
let digestPort: number;
const plainDisk = new MemoryScsiPort();
const digestDisk = new MemoryScsiPort();
const plainLog: string[] = [];
const digestLog: string[] = [];

beforeAll(async () => {
  tmp = await makeTempDir('transport-e2e');
  plainDisk.addLun(0, 16 * MiB, (b) => pattern(b, 1));
  digestDisk.addLun(0, 16 * MiB, (b) => pattern(b, 2));
  plain = new IscsiServer({
    portals: ['127.0.0.1:0', '127.0.0.1:0'],
    targets: [{ iqn: IQN, alias: 'transport e2e', port: plainDisk }],
    logger: capturingLogger(plainLog),
  });
  plainPorts = await plain.start();
  // This target insists on header digests: libiscsi and QEMU offer "None,CRC32C" by default, and
  // the first value of that list the target accepts is CRC32C (RFC 7143 §6.2.1).
  digest = new IscsiServer({
    portals: ['127.0.0.1:0'],
    targets: [{ iqn: IQN_DIGEST, port: digestDisk }],
    logger: capturingLogger(digestLog),
    keyPolicy: { ...DEFAULT_TARGET_POLICY, headerDigests: ['CRC32C'] },
  });
  digestPort = (await digest.start())[0]!.port;
});

afterAll(async () => {
  await plain?.stop();
  await digest?.stop();
  await tmp?.remove();
});

const plainUrl = (): string => `iscsi://127.0.0.1:${plainPorts[0]!.port}/${IQN}/0`;
const digestUrl = (): string => `iscsi://127.0.0.1:${digestPort}/${IQN_DIGEST}/0?header_digest=crc32c`;
const digestImageOpts = (): string =>
  `driver=iscsi,transport=tcp,portal=127.0.0.1:${digestPort},target=${IQN_DIGEST},lun=0,header-digest=crc32c`;

describe('libiscsi tools', () => {
  it('iscsi-ls -s: discovery (SendTargets) lists the target on every portal with TPGT 1, and its LUN', async () => {
    const { targets, result } = await iscsiLs(`iscsi://127.0.0.1:${plainPorts[0]!.port}`);
    expect(result.exitCode).toBe(0);
    expect(targets.map((t) => `${t.iqn} ${t.portal}`).sort()).toEqual(
      plainPorts.map((p) => `${IQN} 127.0.0.1:${p.port},1`).sort(),
    );
    for (const t of targets) expect(t.luns).toEqual([{ lun: 0, type: 'DIRECT_ACCESS', size: expect.any(String) }]);
  });

  it('iscsi-inq: standard INQUIRY and VPD 0x80 come through', async () => {
    const std = await iscsiInq(plainUrl());
    expect(std.result.exitCode).toBe(0);
    expect(std.fields['Vendor']).toBe('BOOTRSTR');
    expect(std.fields['Peripheral Device Type']).toBe('DIRECT_ACCESS');
    const serial = await iscsiInq(plainUrl(), { vpdPage: 0x80 });
    expect(serial.result.exitCode).toBe(0);
    expect(serial.result.stdout).toContain('MEM00000');
  });

  it('iscsi-readcapacity16 reports the LUN size', async () => {
    const rc = await iscsiReadCapacity16(plainUrl());
    expect(rc.blockLength).toBe(512);
    expect(rc.lastLba).toBe((16 * MiB) / 512 - 1);
    expect(rc.totalBytes).toBe(16 * MiB);
  });
});

describe('qemu over the transport', () => {
  it('qemu-img convert reads the whole LUN byte for byte', async () => {
    const out = join(tmp.path, 'plain.raw');
    const r = await runCommand('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', plainUrl(), out], { timeoutMs: 60_000 });
    expect(r.stderr).toBe('');
    expect(r.exitCode).toBe(0);
    expect((await readFile(out)).equals(plainDisk.luns.get(0)!)).toBe(true);
  });

  it("qemu-io 'write -P 0xab 4096 65536' lands exactly there", async () => {
    const disk = plainDisk.luns.get(0)!;
    const before = Buffer.from(disk);
    const r = await runCommand('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 4096 65536', '-c', 'read -P 0xab 4096 65536', plainUrl()], {
      timeoutMs: 60_000,
    });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain('wrote 65536/65536 bytes at offset 4096');
    expect(r.stdout).toContain('read 65536/65536 bytes at offset 4096');
    expect(disk.subarray(4096, 4096 + 65536).every((b) => b === 0xab)).toBe(true);
    expect(disk.subarray(0, 4096).equals(before.subarray(0, 4096))).toBe(true);
    expect(disk.subarray(4096 + 65536).equals(before.subarray(4096 + 65536))).toBe(true);
  });

  it('a 4 MiB write (immediate data + R2T bursts) and read back through qemu-io', async () => {
    const disk = plainDisk.luns.get(0)!;
    const r = await runCommand(
      'qemu-io',
      ['-f', 'raw', '-c', 'write -P 0x3c 1048576 4194304', '-c', 'read -P 0x3c 1048576 4194304', plainUrl()],
      { timeoutMs: 60_000 },
    );
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain('read 4194304/4194304 bytes at offset 1048576');
    expect(disk.subarray(MiB, 5 * MiB).every((b) => b === 0x3c)).toBe(true);
  });
});

describe('with CRC32C header digests', () => {
  it('libiscsi tools log in with header digests and work', async () => {
    const inq = await iscsiInq(digestUrl());
    expect(inq.result.exitCode).toBe(0);
    expect(inq.fields['Vendor']).toBe('BOOTRSTR');
    const rc = await iscsiReadCapacity16(digestUrl());
    expect(rc.totalBytes).toBe(16 * MiB);
    const ls = await iscsiLs(`iscsi://127.0.0.1:${digestPort}`);
    expect(ls.result.exitCode).toBe(0);
    expect(ls.targets.map((t) => t.iqn)).toEqual([IQN_DIGEST]);
  });

  it('qemu-img convert (header-digest=crc32c) reads identical bytes', async () => {
    const out = join(tmp.path, 'digest.raw');
    const r = await runCommand('qemu-img', ['convert', '--image-opts', digestImageOpts(), '-O', 'raw', out], { timeoutMs: 60_000 });
    expect(r.exitCode).toBe(0);
    expect((await readFile(out)).equals(digestDisk.luns.get(0)!)).toBe(true);
  });

  it("qemu-io 'write -P 0xab 4096 65536' (header-digest=crc32c) lands", async () => {
    const disk = digestDisk.luns.get(0)!;
    const r = await runCommand('qemu-io', ['--image-opts', '-c', 'write -P 0xab 4096 65536', digestImageOpts()], { timeoutMs: 60_000 });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toContain('wrote 65536/65536 bytes at offset 4096');
    expect(disk.subarray(4096, 4096 + 65536).every((b) => b === 0xab)).toBe(true);
  });

  it('every normal session on that target really negotiated HeaderDigest=CRC32C', () => {
    const logins = loginRecords(digestLog).filter((r) => r.type === 'Normal');
    // iscsi-inq, iscsi-readcapacity16, iscsi-ls (its LUN listing), qemu-img, qemu-io.
    expect(logins.length).toBeGreaterThanOrEqual(5);
    expect(logins.every((r) => r.headerDigest === true)).toBe(true);
    const initiators = new Set(logins.map((r) => r.initiator));
    expect(initiators.has('iqn.2008-11.org.linux-kvm')).toBe(true);
    // And on the plain target nobody was forced into digests.
    expect(loginRecords(plainLog).every((r) => r.headerDigest === false)).toBe(true);
  });
});

describe('CHAP with libiscsi', () => {
  const IQN_CHAP = 'iqn.2026-12.test.bootrestore:transport-chap';
  let server: IscsiServer | undefined;
  let port = 0;
  const chapDisk = new MemoryScsiPort();
  const log: string[] = [];

  beforeAll(async () => {
    chapDisk.addLun(0, MiB);
    server = new IscsiServer({
      portals: ['127.0.0.1:0'],
      targets: [
        {
          iqn: IQN_CHAP,
          port: chapDisk,
          chap: { initiator: { username: 'alice', secret: 'alice-secret-12' }, target: { username: 'target-x', secret: 'target-secret-34' } },
        },
      ],
      logger: capturingLogger(log),
    });
    port = (await server.start())[0]!.port;
  });
  afterAll(async () => {
    await server?.stop();
  });

  it('logs in with the right secret, one-way and mutual; a wrong secret is refused with 02/01', async () => {
    const ok = await iscsiInq(`iscsi://alice%alice-secret-12@127.0.0.1:${port}/${IQN_CHAP}/0`);
    expect(ok.result.exitCode).toBe(0);
    expect(ok.fields['Vendor']).toBe('BOOTRSTR');
    const mutual = await iscsiInq(
      `iscsi://alice%alice-secret-12@127.0.0.1:${port}/${IQN_CHAP}/0?target_user=target-x&target_password=target-secret-34`,
    );
    expect(mutual.result.exitCode).toBe(0);
    const wrongMutual = await iscsiInq(
      `iscsi://alice%alice-secret-12@127.0.0.1:${port}/${IQN_CHAP}/0?target_user=target-x&target_password=not-the-secret`,
    );
    expect(wrongMutual.result.exitCode).not.toBe(0); // the initiator rejects our (correct for our secret) answer
    const wrong = await iscsiInq(`iscsi://alice%wrong-secret@127.0.0.1:${port}/${IQN_CHAP}/0`);
    expect(wrong.result.exitCode).not.toBe(0);
    const none = await iscsiInq(`iscsi://127.0.0.1:${port}/${IQN_CHAP}/0`);
    expect(none.result.exitCode).not.toBe(0);
    const records = log.map((l) => JSON.parse(l) as Record<string, unknown>);
    // Full feature phase only for the two good logins: with a wrong mutual secret the initiator
    // drops out right after checking our CHAP_R in the security stage.
    expect(records.filter((r) => r.msg === 'login complete' && r.type === 'Normal').length).toBe(2);
    const refused = records.filter((r) => r.msg === 'login refused');
    expect(refused.length).toBe(2);
    expect(refused.every((r) => r.statusClass === 2 && r.statusDetail === 1)).toBe(true);
  });
});
