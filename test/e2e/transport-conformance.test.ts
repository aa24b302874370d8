/**
 * libiscsi's conformance suite (iscsi-test-cu) through this transport in front of the real SCSI
 * layer (src/iscsi/scsi) and a 64 MiB file-backed LUN: the iSCSI family (transport behaviour) and
 * ALL. Separate from transport.test.ts because ALL alone takes 50-130 s on this (shared, loaded) machine.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { silentLogger } from '../../src/log.js';
import { DEFAULT_TARGET_POLICY } from '../../src/iscsi/login/keys.js';
import { IscsiServer } from '../../src/iscsi/server.js';
import { ScsiTarget } from '../../src/iscsi/scsi/target.js';
import { FileBlockDevice } from '../../src/storage/file-device.js';
import { iscsiInq, runConformance } from '../helpers/libiscsi.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const IQN_CONFORMANCE = 'iqn.2026-12.test.bootrestore:transport-cu';
/** The two initiator names iscsi-test-cu logs in with (reservation tests use both). */
const LIBISCSI_TEST_INITIATORS = [
  'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test',
  'iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2',
];

let tmp: TempDir;

beforeAll(async () => {
  tmp = await makeTempDir('transport-cu');
});

afterAll(async () => {
  await tmp?.remove();
});

describe('iscsi-test-cu against the real SCSI layer behind this transport', () => {
  let server: IscsiServer | undefined;
  let url = '';
  let device: FileBlockDevice | undefined;

  beforeAll(async () => {
    const file = join(tmp.path, 'cu.img');
    await writeFile(file, Buffer.alloc(0));
    await truncate(file, 64 * MiB);
    device = await FileBlockDevice.open({
      path: file,
      readOnly: false,
      identity: { serial: 'TRANSPORT0001', naa: Buffer.from('6001405000000a01', 'hex'), vendor: 'BOOTRSTR', product: 'TRANSPORT-CU' },
    });
    const scsi = new ScsiTarget({ logger: silentLogger() });
    scsi.addLun(0, device);
    server = new IscsiServer({
      portals: ['127.0.0.1:0'],
      // Only the suite's two initiator names are admitted: both must get in.
      targets: [{ iqn: IQN_CONFORMANCE, port: scsi, allowedInitiators: LIBISCSI_TEST_INITIATORS }],
      logger: silentLogger(),
    });
    const port = (await server.start())[0]!.port;
    url = `iscsi://127.0.0.1:${port}/${IQN_CONFORMANCE}/0`;
  });

  afterAll(async () => {
    await server?.stop();
    await device?.close();
  });

  it('the ACL admits both of the suite initiator names and no other', async () => {
    for (const name of LIBISCSI_TEST_INITIATORS) {
      expect((await iscsiInq(url, { initiatorName: name })).result.exitCode).toBe(0);
    }
    expect((await iscsiInq(url, { initiatorName: 'iqn.2026-12.test:stranger' })).result.exitCode).not.toBe(0);
  });

  it('the iSCSI family (CmdSN window, DataSN, residuals, task management) passes completely', async () => {
    const run = await runConformance(url, { tests: 'iSCSI', timeoutMs: 120_000 });
    console.info(`iscsi-test-cu iSCSI: ${run.passed} passed / ${run.failed} failed / ${run.skipped} skipped (${run.elapsedMs.toFixed(0)} ms)`);
    expect(run.timedOut).toBe(false);
    expect(run.failedTests).toEqual([]);
    expect(run.exitCode).toBe(0);
    expect(run.passed).toBeGreaterThanOrEqual(14);
    expect(run.skipped).toBe(0);
  });

  it('ALL: no failures', async () => {
    const run = await runConformance(url, { tests: 'ALL', timeoutMs: 240_000 });
    console.info(
      `iscsi-test-cu ALL: ${run.passed} passed / ${run.failed} failed / ${run.skipped} skipped of ${run.total} ` +
        `(${run.elapsedMs.toFixed(0)} ms); skipped: ${run.skippedTests.join(', ')}`,
    );
    expect(run.timedOut).toBe(false);
    expect(run.failedTests).toEqual([]);
    expect(run.exitCode).toBe(0);
    expect(run.total).toBeGreaterThan(200);
  }, 250_000);
});

describe('iscsi-test-cu with CRC32C header digests', () => {
  it('ALL with ?header_digest=crc32c: every session negotiates CRC32C and nothing fails', async () => {
    const file = join(tmp.path, 'cu-digest.img');
    await writeFile(file, Buffer.alloc(0));
    await truncate(file, 64 * MiB);
    const device = await FileBlockDevice.open({
      path: file,
      readOnly: false,
      identity: { serial: 'TRANSPORT0002', naa: Buffer.from('6001405000000a02', 'hex'), vendor: 'BOOTRSTR', product: 'TRANSPORT-CU' },
    });
    // Capture login records to prove what was negotiated. libiscsi's tools offer "None,CRC32C"
    // whatever the URL says, so this target accepts only CRC32C (RFC 7143 §13.1 list rule).
    const logins: Array<{ headerDigest?: boolean; type?: string }> = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, done) {
        for (const line of chunk.toString('utf8').split('\n')) {
          if (!line.includes('"headerDigest"')) continue;
          logins.push(JSON.parse(line) as { headerDigest?: boolean; type?: string });
        }
        done();
      },
    });
    const scsi = new ScsiTarget({ logger: silentLogger() });
    scsi.addLun(0, device);
    const server = new IscsiServer({
      portals: ['127.0.0.1:0'],
      targets: [{ iqn: IQN_CONFORMANCE, port: scsi, allowedInitiators: LIBISCSI_TEST_INITIATORS }],
      logger: pino({ level: 'info' }, sink),
      keyPolicy: { ...DEFAULT_TARGET_POLICY, headerDigests: ['CRC32C'] },
    });
    try {
      const port = (await server.start())[0]!.port;
      const run = await runConformance(`iscsi://127.0.0.1:${port}/${IQN_CONFORMANCE}/0?header_digest=crc32c`, { tests: 'ALL', timeoutMs: 300_000 });
      console.info(
        `iscsi-test-cu ALL with CRC32C header digests: ${run.passed} passed / ${run.failed} failed / ${run.skipped} skipped of ${run.total} ` +
          `(${run.elapsedMs.toFixed(0)} ms), ${logins.length} logins`,
      );
      expect(run.timedOut).toBe(false);
      expect(run.failedTests).toEqual([]);
      expect(run.exitCode).toBe(0);
      expect(run.total).toBeGreaterThan(200);
      expect(logins.length).toBeGreaterThan(20);
      expect(logins.every((l) => l.headerDigest === true)).toBe(true);
    } finally {
      await server.stop();
      await device.close();
    }
  }, 320_000);
});
