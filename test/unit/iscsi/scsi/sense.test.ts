import { describe, expect, it } from 'vitest';
import { ScsiStatus } from '../../../../src/iscsi/scsi-port.js';
import { SenseReason, buildSense, parseSense, senseCodeOf } from '../../../../src/iscsi/scsi/sense.js';

describe('sense reasons', () => {
  it('maps reasons to the SPC-4 key/ASC/ASCQ the initiators expect', () => {
    const cases: Array<[SenseReason, number, number, number]> = [
      [SenseReason.InvalidOpcode, 0x05, 0x20, 0x00],
      [SenseReason.InvalidFieldInCdb, 0x05, 0x24, 0x00],
      [SenseReason.LbaOutOfRange, 0x05, 0x21, 0x00],
      [SenseReason.LunNotSupported, 0x05, 0x25, 0x00],
      [SenseReason.WriteProtected, 0x07, 0x27, 0x00],
      [SenseReason.UnrecoveredReadError, 0x03, 0x11, 0x00],
      [SenseReason.WriteError, 0x03, 0x0c, 0x00],
      [SenseReason.SpaceAllocationFailedWriteProtect, 0x07, 0x27, 0x07],
      [SenseReason.MiscompareDuringVerify, 0x0e, 0x1d, 0x00],
      [SenseReason.PowerOnReset, 0x06, 0x29, 0x00],
      [SenseReason.CapacityDataChanged, 0x06, 0x2a, 0x09],
      [SenseReason.ReportedLunsDataChanged, 0x06, 0x3f, 0x0e],
      [SenseReason.SavingParametersNotSupported, 0x05, 0x39, 0x00],
    ];
    for (const [reason, key, asc, ascq] of cases) {
      const code = senseCodeOf(reason);
      expect({ status: code.status, key: code.key, asc: code.asc, ascq: code.ascq }).toEqual({
        status: ScsiStatus.CheckCondition,
        key,
        asc,
        ascq,
      });
    }
    expect(senseCodeOf(SenseReason.ReservationConflict).status).toBe(ScsiStatus.ReservationConflict);
  });
});

describe('buildSense', () => {
  it('builds 18-byte fixed format with a CDB field pointer', () => {
    const sense = buildSense(SenseReason.InvalidFieldInCdb, { field: { inCdb: true, byte: 1, bit: 5 } });
    expect(sense.length).toBe(18);
    expect(sense[0]).toBe(0x70); // current, INFORMATION not valid
    expect(sense[2]).toBe(0x05);
    expect(sense[7]).toBe(10);
    expect(sense[12]).toBe(0x24);
    expect(sense[13]).toBe(0x00);
    expect(sense[15]).toBe(0x80 | 0x40 | 0x08 | 5); // SKSV, C/D, BPV, bit 5
    expect(sense.readUInt16BE(16)).toBe(1);
  });

  it('sets VALID and INFORMATION for a miscompare offset', () => {
    const sense = buildSense(SenseReason.MiscompareDuringVerify, { information: 1234 });
    expect(sense[0]).toBe(0xf0);
    expect(sense.readUInt32BE(3)).toBe(1234);
    expect(parseSense(sense)).toEqual({ key: 0x0e, asc: 0x1d, ascq: 0, information: 1234 });
  });

  it('parameter-list field pointers have C/D = 0 and no BPV when no bit is given', () => {
    const sense = buildSense(SenseReason.InvalidFieldInParameterList, { field: { inCdb: false, byte: 300 } });
    expect(sense[15]).toBe(0x80);
    expect(sense.readUInt16BE(16)).toBe(300);
  });

  it('builds descriptor format with information and sense-key specific descriptors', () => {
    const sense = buildSense(
      SenseReason.MiscompareDuringVerify,
      { information: 2 ** 40 + 7, field: { inCdb: true, byte: 13, bit: 7 } },
      true,
    );
    expect(sense[0]).toBe(0x72);
    expect([sense[1], sense[2], sense[3]]).toEqual([0x0e, 0x1d, 0x00]);
    expect(sense[7]).toBe(sense.length - 8);
    expect(sense[8]).toBe(0x00); // information descriptor
    expect(sense[9]).toBe(0x0a);
    expect(sense[20]).toBe(0x02); // sense-key specific descriptor
    expect(parseSense(sense)).toEqual({
      key: 0x0e,
      asc: 0x1d,
      ascq: 0,
      information: 2 ** 40 + 7,
      field: { inCdb: true, byte: 13, bit: 7 },
    });
  });

  it('parseSense rejects garbage instead of guessing', () => {
    expect(parseSense(Buffer.alloc(4))).toBeUndefined();
    expect(parseSense(Buffer.from([0x00, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]))).toBeUndefined();
  });
});
