/**
 * The SCSI layer (src/iscsi/scsi) behind the real transport, driven by real clients:
 * libiscsi's conformance suite (iscsi-test-cu) and qemu-img. Memory-backed LUNs, 127.0.0.1 only.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { silentLogger } from '../../src/log.js';
import { IscsiServer } from '../../src/iscsi/server.js';
import type { ScsiCommand, ScsiResult } from '../../src/iscsi/scsi-port.js';
import { ScsiTarget } from '../../src/iscsi/scsi/target.js';
import { MemoryDevice } from '../helpers/memory-device.js';
import { runConformance } from '../helpers/libiscsi.js';
import { runCommand } from '../helpers/exec.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';

const IQN = 'iqn.2026-12.test.bootrestore:scsi-conformance';
const MiB = 1024 * 1024;
/** Skipped tests tgt 1.0.85 had in the same suite here (docs: testing-here.md). */
const TGT_SKIPPED = 62;

/** The real target, recording which opcodes reached which LUN (to prove which commands a client used). */
class ObservedTarget extends ScsiTarget {
  readonly seen: Array<{ lun: number; opcode: number }> = [];
  override execute(cmd: ScsiCommand): Promise<ScsiResult> {
    this.seen.push({ lun: cmd.lun, opcode: cmd.cdb[0]! });
    return super.execute(cmd);
  }
}

let server: IscsiServer | undefined;
let scsi: ObservedTarget;
let copySource: MemoryDevice;
let copyDestination: MemoryDevice;
let port = 0;
let tmp: TempDir;
let mapLun: MemoryDevice;

const url = (lun: number): string => `iscsi://127.0.0.1:${port}/${IQN}/${lun}`;

beforeAll(async () => {
  tmp = await makeTempDir('scsi-e2e');
  scsi = new ObservedTarget({ logger: silentLogger() });
  // LUN 0: the conformance LUN (≥ 64 MiB, thin). LUN 1: read-only. LUN 2: for qemu-img.
  scsi.addLun(0, new MemoryDevice({ blockCount: (64 * MiB) / 512, supportsUnmap: true }));
  scsi.addLun(1, new MemoryDevice({ blockCount: (16 * MiB) / 512, supportsUnmap: true, readOnly: true }));
  mapLun = new MemoryDevice({ blockCount: (8 * MiB) / 512, supportsUnmap: true, identity: { serial: 'MAP0001' } });
  scsi.addLun(2, mapLun);
  // LUNs 3 and 4: EXTENDED COPY source and destination for qemu-img's copy offload.
  copySource = new MemoryDevice({ blockCount: (16 * MiB) / 512 });
  for (let i = 0; i < copySource.data.length; i += 4) copySource.data.writeUInt32BE((i * 2654435761) >>> 0, i);
  copyDestination = new MemoryDevice({ blockCount: (16 * MiB) / 512 });
  scsi.addLun(3, copySource);
  scsi.addLun(4, copyDestination);
  server = new IscsiServer({ portals: ['127.0.0.1:0'], targets: [{ iqn: IQN, port: scsi }], logger: silentLogger() });
  const bound = await server.start();
  port = bound[0]!.port;
});

afterAll(async () => {
  await server?.stop();
  await tmp?.remove();
});

describe('libiscsi iscsi-test-cu against the SCSI layer', () => {
  it('every SCSI-family test passes (multipath enabled), with fewer skipped tests than tgt', async () => {
    const run = await runConformance(url(0), { tests: 'SCSI', multipathUrl: url(0), timeoutMs: 240_000 });
    const skipLines = run.output.split('\n').filter((l) => l.includes('[SKIPPED]')).length;
    console.info(
      `iscsi-test-cu SCSI: ${run.passed} passed / ${run.failed} failed / ${run.skipped} skipped tests ` +
        `(${skipLines} [SKIPPED] lines) in ${Math.round(run.elapsedMs)} ms; skipped: ${run.skippedTests.join(', ')}`,
    );
    expect(run.timedOut).toBe(false);
    expect(run.failedTests).toEqual([]);
    expect(run.exitCode).toBe(0);
    expect(run.total).toBeGreaterThan(200);
    expect(run.cunit?.failed).toBe(0);
    expect(run.skipped).toBeLessThan(TGT_SKIPPED);
    // The suites this layer must really exercise (not skip).
    for (const suite of ['CompareAndWrite.Simple', 'Unmap.Simple', 'GetLBAStatus.UnmapSingle', 'WriteSame16.Unmap',
      'ReportSupportedOpcodes.OneCommand', 'ProutReserve.AccessEAAR', 'MultipathIO.CompareAndWriteAsync', 'OrWrite.Simple',
      'ExtendedCopy.Simple', 'ExtendedCopy.DescrLimits', 'ExtendedCopy.ValidSegDescr', 'ReceiveCopyResults.CopyStatus']) {
      const test = run.tests.find((t) => t.name === suite);
      expect(test?.result, suite).toBe('passed');
    }
  });

  it('residual tests pass (short and long Data-Out, EDTL ≠ CDB length)', async () => {
    const run = await runConformance(url(0), { tests: 'iSCSI.iSCSIResiduals', timeoutMs: 120_000 });
    expect(run.failedTests).toEqual([]);
    expect(run.skipped).toBe(0);
    expect(run.passed).toBe(10);
  });

  it('ReadOnly suite passes against the read-only LUN without skipping', async () => {
    const run = await runConformance(url(1), { tests: 'SCSI.ReadOnly', timeoutMs: 60_000 });
    expect(run.failedTests).toEqual([]);
    expect(run.tests.map((t) => [t.name, t.result])).toEqual([['ReadOnly.ReadOnlySBC', 'passed']]);
  });
});

describe('qemu-img against the SCSI layer', () => {
  it('qemu-img map sees the holes GET LBA STATUS reports and convert reads the exact bytes', async () => {
    // 1 MiB of data at 2 MiB and 4 KiB at 6 MiB; the rest never written (deallocated).
    const pattern = Buffer.alloc(MiB);
    for (let i = 0; i < pattern.length; i++) pattern[i] = (i * 131 + 7) & 0xff;
    await mapLun.write((2 * MiB) / 512, pattern, { fua: false });
    await mapLun.write((6 * MiB) / 512, pattern.subarray(0, 4096), { fua: false });

    const map = await runCommand('qemu-img', ['map', '--output=json', url(2)], { timeoutMs: 60_000 });
    expect(map.exitCode, map.stderr).toBe(0);
    const extents = JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
    const dataExtents = extents.filter((e) => e.data).map((e) => [e.start, e.length]);
    expect(dataExtents).toEqual([
      [2 * MiB, MiB],
      [6 * MiB, 4096],
    ]);

    const out = join(tmp.path, 'lun2.raw');
    const convert = await runCommand('qemu-img', ['convert', '-O', 'raw', url(2), out], { timeoutMs: 60_000 });
    expect(convert.exitCode, convert.stderr).toBe(0);
    const copy = await readFile(out);
    expect(copy.length).toBe(8 * MiB);
    expect(copy.equals(mapLun.data)).toBe(true);
  });

  it('qemu-img writes through WRITE and zeroes with WRITE SAME / UNMAP', async () => {
    const src = join(tmp.path, 'src.raw');
    const image = Buffer.alloc(8 * MiB);
    for (let i = 0; i < MiB; i++) image[MiB + i] = (i * 17 + 3) & 0xff;
    const { writeFile } = await import('node:fs/promises');
    await writeFile(src, image);
    const convert = await runCommand('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, url(2)], { timeoutMs: 60_000 });
    expect(convert.exitCode, convert.stderr).toBe(0);
    expect(mapLun.data.equals(image)).toBe(true);
    // The zero areas of the source were zeroed on the LUN (by WRITE SAME or UNMAP): nothing left of the old pattern.
    expect(mapLun.data.subarray(2 * MiB, 3 * MiB).every((b) => b === 0)).toBe(true);
    const compare = await runCommand('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, url(2)], { timeoutMs: 60_000 });
    expect(compare.exitCode, compare.stdout + compare.stderr).toBe(0);
  });
});

describe('EXTENDED COPY with a real client', () => {
  it('qemu-img convert -C offloads the copy to EXTENDED COPY and the destination gets the exact bytes', async () => {
    const before = scsi.seen.length;
    const convert = await runCommand('qemu-img', ['convert', '-C', '-n', '-f', 'raw', '-O', 'raw', url(3), url(4)], {
      timeoutMs: 60_000,
    });
    expect(convert.exitCode, convert.stderr).toBe(0);
    expect(copyDestination.data.equals(copySource.data)).toBe(true);
    const used = scsi.seen.slice(before);
    const xcopies = used.filter((c) => c.opcode === 0x83);
    expect(xcopies.length).toBeGreaterThan(0);
    // No data went through the initiator: no WRITE of any size reached the destination.
    const writes = used.filter((c) => c.lun === 4 && [0x0a, 0x2a, 0xaa, 0x8a].includes(c.opcode));
    expect(writes).toEqual([]);
  });
});
