/**
 * libiscsi's conformance suite (iscsi-test-cu ALL, with data loss allowed) against a backup LUN
 * (restore point + chunk cache + delta) and, in the same target process, against a plain file LUN
 * of the same size. The SCSI layer is the same for both, so any test that fails on the backup LUN
 * but not on the file LUN is a fault of the cache/delta device. Also checks the backup is untouched.
 */
import { truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDevice } from '../../src/block-device.js';
import { openRestorePoint } from '../../src/backup/reader.js';
import { Repository } from '../../src/backup/repository.js';
import { writeRestorePoint } from '../../src/backup/writer.js';
import { openBackupDevice } from '../../src/cache/backup-device.js';
import { ChunkCache } from '../../src/cache/chunk-cache.js';
import { deriveIdentity } from '../../src/identity.js';
import { IscsiServer } from '../../src/iscsi/server.js';
import { ScsiTarget } from '../../src/iscsi/scsi/target.js';
import { silentLogger } from '../../src/log.js';
import { FileBlockDevice } from '../../src/storage/file-device.js';
import { patternBytes } from '../helpers/fake-restore-point.js';
import { runConformance, type ConformanceRun } from '../helpers/libiscsi.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;
const IMAGE_SIZE = 64 * MiB;
const IQN_BACKUP = 'iqn.2026-12.io.bootrestore.test:conformance-backup';
const IQN_FILE = 'iqn.2026-12.io.bootrestore.test:conformance-file';

let dir: TempDir;
let server: IscsiServer | undefined;
const devices: BlockDevice[] = [];
let port = 0;
let repoDir: string;
let pointId: string;

const isData = (i: number): boolean => i < 64 || i % 97 === 5;

beforeAll(async () => {
  dir = await makeTempDir('cache-conformance');
  repoDir = join(dir.path, 'repo');
  await Repository.openOrCreate(repoDir);
  const written = await writeRestorePoint(repoDir, {
    vm: 'conf',
    parent: null,
    imageSize: IMAGE_SIZE,
    chunkSize: CHUNK,
    source: 'conformance e2e',
    chunkContent: async (i, len) => (isData(i) ? patternBytes(len, 300 + i) : 'zero'),
  });
  pointId = written.info.id;
  const reader = await openRestorePoint(repoDir, 'conf', pointId);
  const backup = await openBackupDevice({
    reader,
    cache: new ChunkCache({ maxBytes: 32 * MiB, logger: silentLogger() }),
    deltaDir: join(dir.path, 'delta'),
    mountId: 'conformance',
    identity: deriveIdentity('cache-conformance-backup'),
    logger: silentLogger(),
  });
  devices.push(backup);
  const lunFile = join(dir.path, 'file.img');
  await writeFile(lunFile, '');
  await truncate(lunFile, IMAGE_SIZE);
  const file = await FileBlockDevice.open({ path: lunFile, readOnly: false, identity: deriveIdentity('cache-conformance-file') });
  devices.push(file);
  const backupTarget = new ScsiTarget({ logger: silentLogger() });
  backupTarget.addLun(0, backup);
  const fileTarget = new ScsiTarget({ logger: silentLogger() });
  fileTarget.addLun(0, file);
  server = new IscsiServer({
    portals: ['127.0.0.1:0'],
    targets: [
      { iqn: IQN_BACKUP, port: backupTarget },
      { iqn: IQN_FILE, port: fileTarget },
    ],
    logger: silentLogger(),
  });
  const [bound] = await server.start();
  port = bound!.port;
});

afterAll(async () => {
  await server?.stop();
  for (const d of devices) await d.close();
  await dir?.remove();
});

function summary(run: ConformanceRun): string {
  return `${run.passed} passed, ${run.failed} failed, ${run.skipped} skipped of ${run.total} in ${(run.elapsedMs / 1000).toFixed(1)} s`;
}

/** The suites that exercise the block device (reads, writes, provisioning, compare/verify, cache). */
const DEVICE_SUITES = [
  'ALL.Read10', 'ALL.Read12', 'ALL.Read16', 'ALL.ReadCapacity10', 'ALL.ReadCapacity16',
  'ALL.Write10', 'ALL.Write12', 'ALL.Write16', 'ALL.WriteVerify10', 'ALL.WriteVerify16',
  'ALL.WriteSame10', 'ALL.WriteSame16', 'ALL.Unmap', 'ALL.GetLBAStatus', 'ALL.CompareAndWrite',
  'ALL.OrWrite', 'ALL.Verify10', 'ALL.Verify16', 'ALL.SynchronizeCache10', 'ALL.SynchronizeCache16',
  'ALL.Prefetch10', 'ALL.Prefetch16',
].join(',');

describe('iscsi-test-cu: backup LUN vs file LUN', () => {
  it('the backup LUN fails no device conformance test that the file LUN passes or skips', { timeout: 600_000 }, async () => {
    const [onBackup, onFile] = await Promise.all([
      runConformance(`iscsi://127.0.0.1:${port}/${IQN_BACKUP}/0`, { tests: DEVICE_SUITES, timeoutMs: 500_000 }),
      runConformance(`iscsi://127.0.0.1:${port}/${IQN_FILE}/0`, { tests: DEVICE_SUITES, timeoutMs: 500_000 }),
    ]);
    console.log(`iscsi-test-cu (device suites): backup LUN ${summary(onBackup)}; file LUN ${summary(onFile)}`);
    console.log(`backup LUN failed: ${onBackup.failedTests.join(', ') || '-'}; file LUN failed: ${onFile.failedTests.join(', ') || '-'}`);
    const onlyBackupSkipped = onBackup.skippedTests.filter((t) => !onFile.skippedTests.includes(t));
    const onlyFileSkipped = onFile.skippedTests.filter((t) => !onBackup.skippedTests.includes(t));
    console.log(`skipped only on backup: ${onlyBackupSkipped.join(', ') || '-'}; skipped only on file: ${onlyFileSkipped.join(', ') || '-'}`);
    expect(onBackup.timedOut).toBe(false);
    expect(onBackup.total).toBeGreaterThan(60);
    expect(onBackup.tests.some((t) => t.name.startsWith('GetLBAStatus.') && t.result === 'passed')).toBe(true);
    const backupOnlyFailures = onBackup.failedTests.filter((t) => !onFile.failedTests.includes(t));
    const details = onBackup.tests
      .filter((t) => backupOnlyFailures.includes(t.name))
      .map((t) => `${t.name}: ${t.details.join(' | ')}`)
      .join('\n');
    expect(backupOnlyFailures, details).toEqual([]);
    // The suite wrote all over the LUN: the restore point is unchanged.
    const reader = await openRestorePoint(repoDir, 'conf', pointId);
    for (const i of [0, 5, 63, 102]) {
      expect(reader.chunkDigest(i) === null).toBe(!isData(i));
      if (isData(i)) expect((await reader.loadChunk(i)).equals(patternBytes(CHUNK, 300 + i))).toBe(true);
    }
    await reader.close();
  });
});
