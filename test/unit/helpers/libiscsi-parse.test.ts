/**
 * The parsers in test/helpers (libiscsi tools, guest serial protocol) against real output captured
 * here from Debian's tgt 1.0.85 and libiscsi-bin 1.19, plus small hand-written cases.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseConformanceOutput, parseIscsiLs, parseIscsiPerf, parseKeyValueLines, parseReadCapacity16 } from '../../helpers/libiscsi.js';
import { parseGuestSerial } from '../../helpers/qemu.js';
import { scratchPattern } from '../../helpers/boot-image.js';

const fixture = (name: string): string => readFileSync(join(import.meta.dirname, 'fixtures', name), 'latin1');

describe('parseConformanceOutput', () => {
  it('agrees with CUnit\'s own run summary on tgt\'s real output, counting skips apart', () => {
    const summary = parseConformanceOutput(fixture('tgt-1.0.85-iscsi-test-cu-ALL.txt'));
    expect(summary.cunit).toBeDefined();
    const cunit = summary.cunit!;
    // Every test CUnit ran was seen by the per-test parse, and classified exactly once.
    expect(summary.total).toBe(cunit.ran);
    expect(summary.failed).toBe(cunit.failed);
    expect(summary.passed + summary.skipped).toBe(cunit.passed);
    expect(summary.passed + summary.failed + summary.skipped).toBe(summary.total);
    // Names are Suite.Test and unique.
    expect(new Set(summary.tests.map((t) => t.name)).size).toBe(summary.tests.length);
    // Measured facts from testing-here.md for tgt on ALL: 160 passed / 8 failed / 62 skipped.
    expect([summary.passed, summary.failed, summary.skipped]).toEqual([160, 8, 62]);
    expect(summary.failedTests).toContain('GetLBAStatus.BeyondEol');
    expect(summary.skippedTests).toContain('CompareAndWrite.Simple');
    expect(summary.skippedTests).toContain('MultipathIO.Simple');
    const beyondEol = summary.tests.find((t) => t.name === 'GetLBAStatus.BeyondEol')!;
    expect(beyondEol.details.join('\n')).toMatch(/LBA_OUT_OF_RANGE/);
    expect(beyondEol.details.join('\n')).toMatch(/test_get_lba_status_beyond_eol\.c:38/);
  });

  it('classifies passed, skipped and failed tests in a small sample', () => {
    const sample = [
      'Suite: Alpha',
      '  Test: One ...passed',
      '  Test: Two ...    [SKIPPED] FOO is not implemented.',
      '    [SKIPPED] FOO is not implemented.',
      'passed',
      'Suite: Beta',
      '  Test: One ...    [FAILED] READ10 should have failed',
      'FAILED',
      '    1. test_x.c:12  - CU_ASSERT_EQUAL(_r,0)',
      '  Test: Three ...passed',
    ].join('\n');
    const summary = parseConformanceOutput(sample);
    expect(summary.tests.map((t) => [t.name, t.result])).toEqual([
      ['Alpha.One', 'passed'],
      ['Alpha.Two', 'skipped'],
      ['Beta.One', 'failed'],
      ['Beta.Three', 'passed'],
    ]);
    expect(summary.tests[2]!.details).toEqual(['[FAILED] READ10 should have failed', '1. test_x.c:12  - CU_ASSERT_EQUAL(_r,0)']);
    expect(summary.cunit).toBeUndefined();
  });

  it('counts a test cut off mid-run (crash, timeout) as failed', () => {
    const summary = parseConformanceOutput('Suite: Alpha\n  Test: One ...passed\n  Test: Two ...');
    expect(summary.failedTests).toEqual(['Alpha.Two']);
    expect(summary.passed).toBe(1);
  });
});

describe('parseIscsiPerf', () => {
  it('reads the final average and per-second samples of a sequential run', () => {
    const perf = parseIscsiPerf(fixture('tgt-iscsi-perf-seq.txt'));
    expect(perf.capacityBytes).toBe(1073741824);
    expect(perf.iops).toBe(330);
    expect(perf.mibPerSecond).toBe(330);
    expect(perf.samples).toEqual([400, 362]);
  });

  it('reads a random 4 KiB run', () => {
    const perf = parseIscsiPerf(fixture('tgt-iscsi-perf-rand.txt'));
    expect(perf.iops).toBe(17218);
    expect(perf.mibPerSecond).toBe(67);
    expect(perf.samples.length).toBe(2);
  });

  it('rejects output without a final average', () => {
    expect(() => parseIscsiPerf('Login Failed. iscsi_service failed\n')).toThrow(/iops average/);
  });
});

describe('iscsi-ls, iscsi-inq and iscsi-readcapacity16 parsers', () => {
  it('parses iscsi-ls -s', () => {
    const targets = parseIscsiLs(
      'Target:iqn.2026-12.io.test:t1 Portal:127.0.0.1:13260,1\nLun:0    Type:STORAGE_ARRAY_CONTROLLER\nLun:1    Type:DIRECT_ACCESS (Size:63M)\n',
    );
    expect(targets).toEqual([
      {
        iqn: 'iqn.2026-12.io.test:t1',
        portal: '127.0.0.1:13260,1',
        luns: [
          { lun: 0, type: 'STORAGE_ARRAY_CONTROLLER' },
          { lun: 1, type: 'DIRECT_ACCESS', size: '63M' },
        ],
      },
    ]);
  });

  it('parses iscsi-inq key/value lines, keeping repeated keys', () => {
    const { fields, repeated } = parseKeyValueLines(
      'Peripheral Device Type:DIRECT_ACCESS\nVendor:IET     \nVersion Descriptor:04c0 SBC-3\nVersion Descriptor:0960 iSCSI\n',
    );
    expect(fields['Peripheral Device Type']).toBe('DIRECT_ACCESS');
    expect(fields['Vendor']).toBe('IET');
    expect(repeated['Version Descriptor']).toEqual(['04c0 SBC-3', '0960 iSCSI']);
  });

  it('parses iscsi-readcapacity16', () => {
    const capacity = parseReadCapacity16(
      [
        'RETURNED LOGICAL BLOCK ADDRESS:131071',
        'LOGICAL BLOCK LENGTH IN BYTES:512',
        'P_TYPE:0 PROT_EN:0',
        'P_I_EXPONENT:0 LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:3',
        'LBPME:0 LBPRZ:0',
        'LOWEST ALIGNED LOGICAL BLOCK ADDRESS:0',
        'Total size:67108864',
      ].join('\n'),
    );
    expect(capacity).toEqual({ lastLba: 131071, blockLength: 512, totalBytes: 67108864, lbpme: 0, lbprz: 0, logicalBlocksPerPhysicalExponent: 3, lowestAlignedLba: 0 });
    expect(() => parseReadCapacity16('iscsi_connect failed')).toThrow(/RETURNED LOGICAL BLOCK ADDRESS/);
  });
});

describe('parseGuestSerial', () => {
  it('reads the guest report (lines from real boots: a virtio boot plus SYSFS lines of a Linux-initiator boot)', () => {
    const serial = [
      '\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (version 1.16.2-debian-1.16.2-1)',
      'SYSLINUX 6.04 20210613 Copyright (C) 1994-2015 H. Peter Anvin et al',
      '\x1bc\x1b[?7l\x1b[2JBOOTRESTORE-BOOT-OK uptime=2.10\r',
      'BOOTRESTORE-DISK dev=/dev/vda sectors=131072\r',
      'BOOTRESTORE-SYSFS model=bootrestore LUN\r',
      'BOOTRESTORE-SYSFS wwid=t10.BOOTREST3ab98fb6976584729b9a3986\r',
      'BOOTRESTORE-SYSFS write_cache=write back\r',
      'BOOTRESTORE-HASH b564c5e574efa0a8b6999b0a3a86b7b4178c3c4517c5683e94bae71618b18f20 mib=63 uptime=4.72\r',
      'BOOTRESTORE-SCRATCH OK 33573e2e93fa25bf0c2c324df229f00ed0265a2347b2fe72c5e86fb6d921b4fa\r',
      'BOOTRESTORE-DONE uptime=5.08\r',
      '[    5.124356] reboot: Power down',
    ].join('\n');
    expect(parseGuestSerial(serial)).toEqual({
      markerSeen: true,
      markerUptime: 2.1,
      diskSectors: 131072,
      guestHash: 'b564c5e574efa0a8b6999b0a3a86b7b4178c3c4517c5683e94bae71618b18f20',
      hashMiB: 63,
      scratchStatus: 'OK',
      scratchOk: true,
      done: true,
      doneUptime: 5.08,
      errors: [],
      sysfs: { model: 'bootrestore LUN', wwid: 't10.BOOTREST3ab98fb6976584729b9a3986', write_cache: 'write back' },
    });
  });

  it('reports a failed scratch write, login errors and a boot that never reached /init', () => {
    const report = parseGuestSerial('BOOTRESTORE-BOOT-OK\nBOOTRESTORE-ISCSISTART iscsistart: initiator reported error (19)\nBOOTRESTORE-ERROR iscsistart failed\nBOOTRESTORE-DONE\n');
    expect(report.errors).toEqual(['ISCSISTART iscsistart: initiator reported error (19)', 'ERROR iscsistart failed']);
    expect(report.iscsiLoginOk).toBeUndefined();
    expect(parseGuestSerial('BOOTRESTORE-SCRATCH WRITE-FAILED dd: error writing').scratchOk).toBe(false);
    expect(parseGuestSerial('SeaBIOS\nBooting from Hard Disk...\nKernel panic').markerSeen).toBe(false);
  });
});

describe('scratchPattern', () => {
  it('repeats one 64-byte record, as the guest /init writes it', () => {
    const pattern = scratchPattern('abc123', 1 << 20);
    expect(pattern.length).toBe(1 << 20);
    const record = pattern.subarray(0, 64).toString('ascii');
    expect(record).toBe('BOOTRESTORE-SCRATCH abc123' + ' '.repeat(63 - 26) + '\n');
    expect(pattern.subarray((1 << 20) - 64).toString('ascii')).toBe(record);
    expect(() => scratchPattern('x'.repeat(44), 64)).toThrow(/too long/);
  });
});
