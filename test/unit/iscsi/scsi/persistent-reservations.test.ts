import { describe, expect, it } from 'vitest';
import type { Nexus, ScsiResult } from '../../../../src/iscsi/scsi-port.js';
import { ScsiStatus } from '../../../../src/iscsi/scsi-port.js';
import type { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import { be16, be32, cdb, exec, expectGood, expectSense, filled, makeFixture, makeNexus, read10, write10 } from './scsi-test-kit.js';

const enum Sa {
  Register = 0,
  Reserve = 1,
  Release = 2,
  Clear = 3,
  Preempt = 4,
  RegisterAndIgnore = 6,
}

function prOut(target: ScsiTarget, nexus: Nexus, sa: number, type: number, key: bigint, saKey: bigint, flags = 0): Promise<ScsiResult> {
  const params = Buffer.alloc(24);
  params.writeBigUInt64BE(key, 0);
  params.writeBigUInt64BE(saKey, 8);
  params[20] = flags;
  return exec(target, nexus, cdb(0x5f, 10, [[1, [sa]], [2, [type]], [5, be32(24)]]), { dataOut: params });
}

async function prIn(target: ScsiTarget, nexus: Nexus, sa: number): Promise<Buffer> {
  return expectGood(await exec(target, nexus, cdb(0x5e, 10, [[1, [sa]], [7, be16(4096)]]))).dataIn!;
}

async function twoInitiators(): Promise<{ target: ScsiTarget; a: Nexus; b: Nexus }> {
  const { target, nexus: a } = await makeFixture();
  const b = makeNexus('iqn.2026-12.test:initiator-b', '400001370001');
  target.nexusAdded(b);
  expectSense(await exec(target, b, cdb(0x00, 6)), 0x06, 0x29, 0x00);
  return { target, a, b };
}

const conflict = (r: ScsiResult): boolean => r.status === ScsiStatus.ReservationConflict;

describe('PERSISTENT RESERVE conflict table (SPC-4 5.13.1)', () => {
  // [type, unregistered read, unregistered write, registered read, registered write]: true = conflict
  const table: Array<[string, number, boolean, boolean, boolean, boolean]> = [
    ['Write Exclusive', 1, false, true, false, true],
    ['Exclusive Access', 3, true, true, true, true],
    ['Write Exclusive - Registrants Only', 5, false, true, false, false],
    ['Exclusive Access - Registrants Only', 6, true, true, false, false],
    ['Write Exclusive - All Registrants', 7, false, true, false, false],
    ['Exclusive Access - All Registrants', 8, true, true, false, false],
  ];
  for (const [name, type, unregRead, unregWrite, regRead, regWrite] of table) {
    it(`${name}: access of another initiator, unregistered and registered`, async () => {
      const { target, a, b } = await twoInitiators();
      expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
      expectGood(await prOut(target, a, Sa.Reserve, type, 0xaan, 0n));
      // The holder itself may do everything.
      expectGood(await exec(target, a, read10(0, 1)));
      expectGood(await exec(target, a, write10(0, 1), { dataOut: filled(1, 1) }));
      // INQUIRY, TUR and READ CAPACITY are always allowed.
      expectGood(await exec(target, b, cdb(0x12, 6, [[4, [36]]])));
      expectGood(await exec(target, b, cdb(0x00, 6)));
      expectGood(await exec(target, b, cdb(0x25, 10)));

      expect(conflict(await exec(target, b, read10(0, 1)))).toBe(unregRead);
      expect(conflict(await exec(target, b, write10(0, 1), { dataOut: filled(1, 2) }))).toBe(unregWrite);
      expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0xbbn));
      expect(conflict(await exec(target, b, read10(0, 1)))).toBe(regRead);
      expect(conflict(await exec(target, b, write10(0, 1), { dataOut: filled(1, 3) }))).toBe(regWrite);
      // A second RESERVE by the other registrant conflicts unless it already is a holder (all-registrants).
      const second = await prOut(target, b, Sa.Reserve, type, 0xbbn, 0n);
      if (type >= 7) expectGood(second);
      else expect(conflict(second)).toBe(true);
    });
  }
});

describe('PERSISTENT RESERVE OUT service actions', () => {
  it('REGISTER checks the reservation key; READ KEYS lists keys and the generation counts changes', async () => {
    const { target, a, b } = await twoInitiators();
    expect(conflict(await prOut(target, a, Sa.Register, 0, 0x1n, 0x10n))).toBe(true); // not registered, key ≠ 0
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0x10n));
    expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0x20n));
    expect(conflict(await prOut(target, a, Sa.Register, 0, 0x99n, 0x11n))).toBe(true); // wrong key
    expectGood(await prOut(target, a, Sa.RegisterAndIgnore, 0, 0x99n, 0x11n));
    const keys = await prIn(target, a, 0);
    expect(keys.readUInt32BE(0)).toBe(3); // generation: three successful registrations
    expect(keys.readUInt32BE(4)).toBe(16);
    expect([keys.readBigUInt64BE(8), keys.readBigUInt64BE(16)].sort()).toEqual([0x11n, 0x20n]);
    // Unregister.
    expectGood(await prOut(target, b, Sa.Register, 0, 0x20n, 0n));
    expect((await prIn(target, a, 0)).readUInt32BE(4)).toBe(8);
  });

  it('RESERVE needs a registration, READ RESERVATION shows it, RELEASE needs the same type', async () => {
    const { target, a, b } = await twoInitiators();
    expect(conflict(await prOut(target, a, Sa.Reserve, 1, 0x10n, 0n))).toBe(true);
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0x10n));
    expectGood(await prOut(target, a, Sa.Reserve, 1, 0x10n, 0n));
    expectGood(await prOut(target, a, Sa.Reserve, 1, 0x10n, 0n)); // same type again: fine
    expect(conflict(await prOut(target, a, Sa.Reserve, 3, 0x10n, 0n))).toBe(true);
    const res = await prIn(target, b, 1);
    expect(res.readUInt32BE(4)).toBe(16);
    expect(res.readBigUInt64BE(8)).toBe(0x10n);
    expect(res[21]).toBe(1);
    expectSense(await prOut(target, a, Sa.Release, 3, 0x10n, 0n), 0x05, 0x26, 0x04);
    expectGood(await prOut(target, a, Sa.Release, 1, 0x10n, 0n));
    expect((await prIn(target, b, 1)).readUInt32BE(4)).toBe(0);
    expectGood(await exec(target, b, write10(0, 1), { dataOut: filled(1, 1) }));
  });

  it('PREEMPT takes over the reservation and removes the preempted registration with a UA', async () => {
    const { target, a, b } = await twoInitiators();
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0xbbn));
    expectGood(await prOut(target, a, Sa.Reserve, 3, 0xaan, 0n));
    expect(conflict(await exec(target, b, read10(0, 1)))).toBe(true);
    expectGood(await prOut(target, b, Sa.Preempt, 3, 0xbbn, 0xaan));
    expectSense(await exec(target, a, cdb(0x00, 6)), 0x06, 0x2a, 0x05); // REGISTRATIONS PREEMPTED
    expect(conflict(await exec(target, a, read10(0, 1)))).toBe(true);
    expectGood(await exec(target, b, read10(0, 1)));
    expect(conflict(await prOut(target, a, Sa.Register, 0, 0xaan, 0x1n))).toBe(true); // gone
    expect(conflict(await prOut(target, b, Sa.Preempt, 3, 0xbbn, 0xccn))).toBe(true); // no such key
    expectSense(await prOut(target, b, Sa.Preempt, 3, 0xbbn, 0n), 0x05, 0x26, 0x00);
  });

  it('CLEAR drops every registration and the reservation; others get RESERVATIONS PREEMPTED', async () => {
    const { target, a, b } = await twoInitiators();
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0xbbn));
    expectGood(await prOut(target, a, Sa.Reserve, 5, 0xaan, 0n));
    expectGood(await prOut(target, a, Sa.Clear, 0, 0xaan, 0n));
    expectSense(await exec(target, b, cdb(0x00, 6)), 0x06, 0x2a, 0x03);
    const keys = await prIn(target, a, 0);
    expect(keys.readUInt32BE(4)).toBe(0);
  });

  it('an all-registrants reservation survives its creator unregistering while others stay registered', async () => {
    const { target, a, b } = await twoInitiators();
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0xbbn));
    expectGood(await prOut(target, a, Sa.Reserve, 8, 0xaan, 0n));
    expectGood(await prOut(target, a, Sa.Register, 0, 0xaan, 0n));
    expect(conflict(await exec(target, a, read10(0, 1)))).toBe(true);
    expectGood(await exec(target, b, read10(0, 1)));
    expectGood(await prOut(target, b, Sa.Register, 0, 0xbbn, 0n));
    expectGood(await exec(target, a, read10(0, 1)));
  });

  it('rejects unsupported options and bad parameter lists without changing state', async () => {
    const { target, a } = await twoInitiators();
    expectSense(await prOut(target, a, Sa.Register, 0, 0n, 0x1n, 0x01), 0x05, 0x26, 0x00); // APTPL
    expectSense(await prOut(target, a, Sa.Register, 0, 0n, 0x1n, 0x08), 0x05, 0x26, 0x00); // SPEC_I_PT
    expectSense(await exec(target, a, cdb(0x5f, 10, [[5, be32(8)]]), { dataOut: Buffer.alloc(8) }), 0x05, 0x1a, 0x00);
    expectSense(await exec(target, a, cdb(0x5f, 10, [[1, [7]], [5, be32(24)]]), { dataOut: Buffer.alloc(24) }), 0x05, 0x24, 0x00);
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0x1n));
    expectSense(await prOut(target, a, Sa.Reserve, 2, 0x1n, 0n), 0x05, 0x24, 0x00); // type 2 is not defined
    expectSense(await exec(target, a, cdb(0x5e, 10, [[1, [4]], [7, be16(64)]])), 0x05, 0x24, 0x00);
    expect((await prIn(target, a, 0)).readUInt32BE(0)).toBe(1);
  });

  it('REPORT CAPABILITIES and READ FULL STATUS describe registrants with iSCSI TransportIDs', async () => {
    const { target, a, b } = await twoInitiators();
    const caps = await prIn(target, a, 2);
    expect(caps.readUInt16BE(0)).toBe(8);
    expect(caps[4]).toBe(0xea);
    expect(caps[5]).toBe(0x01);
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expectGood(await prOut(target, b, Sa.Register, 0, 0n, 0xbbn));
    expectGood(await prOut(target, a, Sa.Reserve, 1, 0xaan, 0n));
    const full = await prIn(target, b, 3);
    const entries: Array<{ key: bigint; holder: boolean; name: string }> = [];
    for (let at = 8; at < 8 + full.readUInt32BE(4); ) {
      const idLength = full.readUInt32BE(at + 20);
      const id = full.subarray(at + 24, at + 24 + idLength);
      expect(id[0]).toBe(0x45);
      entries.push({
        key: full.readBigUInt64BE(at),
        holder: (full[at + 12]! & 0x01) === 1,
        name: id.subarray(4, 4 + id.readUInt16BE(2)).toString('utf8').replace(/\0+$/, ''),
      });
      at += 24 + idLength;
    }
    expect(entries).toEqual([
      { key: 0xaan, holder: true, name: 'iqn.2026-12.test:initiator-a,i,0x400001370000' },
      { key: 0xbbn, holder: false, name: 'iqn.2026-12.test:initiator-b,i,0x400001370001' },
    ]);
  });

  it('persistent reservations survive a LUN reset and the loss of the nexus (new session, same I_T nexus)', async () => {
    const { target, a, b } = await twoInitiators();
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expectGood(await prOut(target, a, Sa.Reserve, 3, 0xaan, 0n));
    target.reset('lun', 0, b);
    expectSense(await exec(target, b, cdb(0x00, 6)), 0x06, 0x29, 0x03);
    expect(conflict(await exec(target, b, read10(0, 1)))).toBe(true);
    target.nexusLost(a);
    const again: Nexus = { ...a, key: `${a.key}-relogin` };
    target.nexusAdded(again);
    expectSense(await exec(target, again, cdb(0x00, 6)), 0x06, 0x29, 0x00);
    expectGood(await exec(target, again, read10(0, 1)));
    expect(conflict(await exec(target, b, read10(0, 1)))).toBe(true);
  });

  it('SPC-2 RESERVE conflicts while persistent registrations exist', async () => {
    const { target, a, b } = await twoInitiators();
    expectGood(await prOut(target, a, Sa.Register, 0, 0n, 0xaan));
    expect(conflict(await exec(target, b, cdb(0x16, 6)))).toBe(true);
    expect(conflict(await exec(target, a, cdb(0x16, 6)))).toBe(true);
  });
});
