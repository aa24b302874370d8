/**
 * Why `iscsi-perf -t N` sometimes never exits (the "hang" of cache-backup-lun's sequential run), shown
 * deterministically, and that runIscsiPerf still ends and reports.
 *
 * iscsi-perf's progress() prints at the first completion ≥ 1 s after its previous print and sets
 * `finished` only when that print's remaining time `runtime - floor(elapsed)` is exactly 0. With reads
 * of 1.6 s at queue depth 1 and `-t 2`, prints fall at ~1.6 s (1 s left) and ~3.2 s (floor 3: the
 * unsigned remaining time wraps), so it never stops by itself. The target answers every command.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IscsiServer } from '../../src/iscsi/server.js';
import { ScsiTarget } from '../../src/iscsi/scsi/target.js';
import { silentLogger } from '../../src/log.js';
import { runCommand } from '../helpers/exec.js';
import { ISCSI_PERF_STOP_GRACE_MS, runIscsiPerf } from '../helpers/libiscsi.js';
import { MemoryDevice } from '../helpers/memory-device.js';

const IQN = 'iqn.2026-12.io.bootrestore.test:perf-runtime';
const READ_DELAY_MS = 1600;
let server: IscsiServer | undefined;
let device: MemoryDevice;
let url: string;

beforeAll(async () => {
  device = new MemoryDevice({ blockCount: 8192, ioDelayMs: READ_DELAY_MS });
  const scsi = new ScsiTarget({ logger: silentLogger() });
  scsi.addLun(0, device);
  server = new IscsiServer({ portals: ['127.0.0.1:0'], targets: [{ iqn: IQN, port: scsi }], logger: silentLogger() });
  const [bound] = await server.start();
  url = `iscsi://127.0.0.1:${bound!.port}/${IQN}/0`;
});

afterAll(async () => {
  await server?.stop();
});

describe('iscsi-perf runtime', () => {
  it('iscsi-perf -t 2 misses its stop second with 1.6 s reads and keeps reading, though every read completes', async () => {
    const r = await runCommand('iscsi-perf', ['-m', '1', '-b', '8', '-t', '2', url], { timeoutMs: 9000 });
    expect(r.timedOut).toBe(true);
    // It kept issuing reads after its 2 s: about one per 1.6 s, all answered.
    const samples = (r.stdout.match(/iops current/g) ?? []).length;
    expect(samples).toBeGreaterThanOrEqual(3);
    // Its remaining-time display wrapped below zero (hours ≈ 2^64 / 3600).
    expect(r.stdout).toMatch(/51240955760304\d\d:\d\d:\d\d - lba/);
  });

  it('runIscsiPerf stops it with SIGINT after the grace time and reports its running average', async () => {
    const result = await runIscsiPerf(url, { queueDepth: 1, blocksPerRequest: 8, seconds: 2, random: false });
    expect(result.interrupted).toBe(true);
    expect(result.elapsedMs).toBeGreaterThanOrEqual(2000 + ISCSI_PERF_STOP_GRACE_MS);
    expect(result.elapsedMs).toBeLessThan(2000 + ISCSI_PERF_STOP_GRACE_MS + 3 * READ_DELAY_MS + 2000);
    expect(result.iops).toBe(0); // 1 read per 1.6 s: iscsi-perf's integer average is 0 IOPS …
    expect(result.samples.length).toBeGreaterThanOrEqual(3); // … but it did read throughout.
  });
});
