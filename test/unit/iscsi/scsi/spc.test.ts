import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../../../src/log.js';
import { ScsiStatus } from '../../../../src/iscsi/scsi-port.js';
import { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';
import {
  be16,
  be32,
  cdb,
  exec,
  expectGood,
  expectSense,
  makeFixture,
  makeNexus,
  write10,
} from './scsi-test-kit.js';

const inquiry = (evpd: boolean, page: number, alloc = 1024): Buffer =>
  cdb(0x12, 6, [[1, [evpd ? 1 : 0]], [2, [page]], [3, be16(alloc)]]);

const modeSense6 = (pageByte: number, alloc = 255, dbd = false): Buffer =>
  cdb(0x1a, 6, [[1, [dbd ? 0x08 : 0]], [2, [pageByte]], [4, [alloc]]]);

describe('INQUIRY', () => {
  it('standard data: SPC-4, HiSup, CmdQue, TPGS=0, identity strings, version descriptors', async () => {
    const { target, nexus } = await makeFixture({
      identity: { vendor: 'ACME', product: 'RESTORE DISK', revision: '0042' },
    });
    const data = expectGood(await exec(target, nexus, inquiry(false, 0))).dataIn!;
    expect(data.length).toBe(96);
    expect(data[0]).toBe(0x00);
    expect(data[1]! & 0x80).toBe(0); // RMB=0
    expect(data[2]).toBe(0x06);
    expect(data[3]).toBe(0x12); // HISUP + format 2
    expect(data[4]).toBe(91);
    expect(data[5]! & 0x30).toBe(0); // TPGS=0
    expect(data[7]! & 0x02).toBe(0x02);
    expect(data.subarray(8, 16).toString('ascii')).toBe('ACME    ');
    expect(data.subarray(16, 32).toString('ascii')).toBe('RESTORE DISK    ');
    expect(data.subarray(32, 36).toString('ascii')).toBe('0042');
    expect([data.readUInt16BE(58), data.readUInt16BE(60), data.readUInt16BE(62), data.readUInt16BE(64)]).toEqual([
      0x00a0, 0x0960, 0x0460, 0x04c0,
    ]);
  });

  it('cuts the data to the allocation length and rejects a page code without EVPD', async () => {
    const { target, nexus } = await makeFixture();
    expect(expectGood(await exec(target, nexus, inquiry(false, 0, 36))).dataIn!.length).toBe(36);
    expect(expectGood(await exec(target, nexus, inquiry(true, 0x83, 6))).dataIn!.length).toBe(6);
    const s = expectSense(await exec(target, nexus, inquiry(false, 0x80)), 0x05, 0x24, 0x00);
    expect(s.field).toEqual({ inCdb: true, byte: 2 });
  });

  it('VPD 0x00 lists exactly the pages that answer', async () => {
    const { target, nexus } = await makeFixture();
    const page = expectGood(await exec(target, nexus, inquiry(true, 0))).dataIn!;
    const listed = [...page.subarray(4, 4 + page.readUInt16BE(2))];
    expect(listed).toEqual([0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2]);
    for (const code of listed) {
      const p = expectGood(await exec(target, nexus, inquiry(true, code))).dataIn!;
      expect(p[1]).toBe(code);
      expect(p.length).toBe(4 + p.readUInt16BE(2));
    }
    expectSense(await exec(target, nexus, inquiry(true, 0x89)), 0x05, 0x24, 0x00);
  });

  it('VPD 0x80 carries the serial and VPD 0x83 the NAA, T10, relative port and port group designators', async () => {
    const naa = Buffer.from([0x56, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66]);
    const { target, nexus } = await makeFixture({ identity: { serial: 'SER-123', naa, vendor: 'ACME' } });
    const serial = expectGood(await exec(target, nexus, inquiry(true, 0x80))).dataIn!;
    expect(serial.subarray(4).toString('ascii')).toBe('SER-123');

    const page = expectGood(await exec(target, nexus, inquiry(true, 0x83))).dataIn!;
    const designators: Array<{ codeSet: number; piv: boolean; association: number; type: number; value: Buffer }> = [];
    for (let at = 4; at < page.length; at += 4 + page[at + 3]!) {
      designators.push({
        codeSet: page[at]! & 0x0f,
        piv: (page[at + 1]! & 0x80) !== 0,
        association: (page[at + 1]! >> 4) & 0x03,
        type: page[at + 1]! & 0x0f,
        value: page.subarray(at + 4, at + 4 + page[at + 3]!),
      });
    }
    const byType = new Map(designators.map((d) => [d.type, d]));
    expect(byType.get(3)).toMatchObject({ codeSet: 1, association: 0 });
    expect(byType.get(3)!.value.equals(naa)).toBe(true);
    expect(byType.get(1)).toMatchObject({ codeSet: 2, association: 0 });
    expect(byType.get(1)!.value.toString('ascii')).toBe('ACME    SER-123');
    expect(byType.get(4)).toMatchObject({ piv: true, association: 1 });
    expect(byType.get(4)!.value.readUInt32BE(0)).toBe(1);
    expect(byType.get(5)).toMatchObject({ piv: true, association: 1 });
  });

  it('VPD B0/B1/B2 and READ CAPACITY(16) agree on provisioning for an unmap-capable device', async () => {
    const { target, nexus } = await makeFixture({ supportsUnmap: true });
    const b0 = expectGood(await exec(target, nexus, inquiry(true, 0xb0))).dataIn!;
    expect(b0.readUInt16BE(2)).toBe(0x3c);
    expect(b0[5]).toBeGreaterThan(0); // MAXIMUM COMPARE AND WRITE LENGTH
    expect(b0.readUInt32BE(8)).toBe((32 * 1024 * 1024) / 512); // MAXIMUM TRANSFER LENGTH
    expect(b0.readUInt32BE(20)).toBeGreaterThan(0); // MAXIMUM UNMAP LBA COUNT
    expect(b0.readUInt32BE(24)).toBeGreaterThan(0); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    const b1 = expectGood(await exec(target, nexus, inquiry(true, 0xb1))).dataIn!;
    expect(b1.readUInt16BE(4)).toBe(1); // non-rotating
    const b2 = expectGood(await exec(target, nexus, inquiry(true, 0xb2))).dataIn!;
    expect(b2[5]! & 0xe4).toBe(0xe4); // LBPU, LBPWS, LBPWS10, LBPRZ
    expect(b2[6]! & 0x07).toBe(0x02); // thin
    const rc16 = expectGood(await exec(target, nexus, cdb(0x9e, 16, [[1, [0x10]], [10, be32(32)]]))).dataIn!;
    expect(rc16[14]! & 0xc0).toBe(0xc0); // LBPME, LBPRZ
  });

  it('a device without unmap advertises none of it', async () => {
    const { target, nexus } = await makeFixture({ supportsUnmap: false });
    const b0 = expectGood(await exec(target, nexus, inquiry(true, 0xb0))).dataIn!;
    expect(b0.readUInt32BE(20)).toBe(0);
    expect(b0.readUInt32BE(24)).toBe(0);
    const b2 = expectGood(await exec(target, nexus, inquiry(true, 0xb2))).dataIn!;
    expect(b2[5]).toBe(0);
    expect(b2[6]! & 0x07).toBe(0);
    const rc16 = expectGood(await exec(target, nexus, cdb(0x9e, 16, [[1, [0x10]], [10, be32(32)]]))).dataIn!;
    expect(rc16[14]! & 0xc0).toBe(0);
    expectSense(await exec(target, nexus, cdb(0x42, 10)), 0x05, 0x20, 0x00); // UNMAP: not supported
  });
});

describe('absent LUNs', () => {
  it('INQUIRY says qualifier 011b / type 1Fh, REPORT LUNS and REQUEST SENSE work, the rest is 05/25/00', async () => {
    const { target, nexus } = await makeFixture();
    const inq = expectGood(await exec(target, nexus, inquiry(false, 0), { lun: 7 })).dataIn!;
    expect(inq[0]).toBe(0x7f);
    const luns = expectGood(await exec(target, nexus, cdb(0xa0, 12, [[6, be32(64)]]), { lun: 7 })).dataIn!;
    expect(luns.readUInt32BE(0)).toBe(8);
    const sense = expectGood(await exec(target, nexus, cdb(0x03, 6, [[4, [18]]]), { lun: 7 })).dataIn!;
    expect([sense[2]! & 0x0f, sense[12], sense[13]]).toEqual([0x05, 0x25, 0x00]);
    expectSense(await exec(target, nexus, cdb(0x00, 6), { lun: 7 }), 0x05, 0x25, 0x00);
    expectSense(await exec(target, nexus, cdb(0x28, 10), { lun: 7 }), 0x05, 0x25, 0x00);
  });
});

describe('REPORT LUNS', () => {
  it('encodes LUNs below 256 with peripheral and larger ones with flat addressing; checks select report', async () => {
    const target = new ScsiTarget({ logger: silentLogger() });
    target.addLun(0, new MemoryDevice({ blockCount: 8 }));
    target.addLun(5, new MemoryDevice({ blockCount: 8 }));
    target.addLun(300, new MemoryDevice({ blockCount: 8 }));
    const nexus = makeNexus();
    target.nexusAdded(nexus);
    const data = expectGood(await exec(target, nexus, cdb(0xa0, 12, [[6, be32(1024)]]))).dataIn!;
    expect(data.readUInt32BE(0)).toBe(24);
    expect([...data.subarray(8, 16)]).toEqual([0, 0, 0, 0, 0, 0, 0, 0]);
    expect([...data.subarray(16, 18)]).toEqual([0x00, 5]);
    expect([...data.subarray(24, 26)]).toEqual([0x41, 300 & 0xff]);
    const wellKnown = expectGood(await exec(target, nexus, cdb(0xa0, 12, [[2, [1]], [6, be32(1024)]]))).dataIn!;
    expect(wellKnown.readUInt32BE(0)).toBe(0);
    expectSense(await exec(target, nexus, cdb(0xa0, 12, [[2, [0x05]], [6, be32(1024)]])), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, cdb(0xa0, 12, [[6, be32(8)]])), 0x05, 0x24, 0x00);
  });
});

describe('unit attentions', () => {
  it('POWER ON is reported once per nexus; INQUIRY and REPORT LUNS do not consume it, REQUEST SENSE does', async () => {
    const target = new ScsiTarget({ logger: silentLogger() });
    target.addLun(0, new MemoryDevice({ blockCount: 8 }));
    const a = makeNexus();
    const b = makeNexus('iqn.2026-12.test:initiator-b');
    target.nexusAdded(a);
    target.nexusAdded(b);
    expectGood(await exec(target, a, inquiry(false, 0)));
    expectGood(await exec(target, a, cdb(0xa0, 12, [[6, be32(64)]])));
    expectSense(await exec(target, a, cdb(0x00, 6)), 0x06, 0x29, 0x00);
    expectGood(await exec(target, a, cdb(0x00, 6)));
    const rs = expectGood(await exec(target, b, cdb(0x03, 6, [[4, [252]]]))).dataIn!;
    expect([rs[2]! & 0x0f, rs[12], rs[13]]).toEqual([0x06, 0x29, 0x00]);
    expectGood(await exec(target, b, cdb(0x00, 6)));
    const none = expectGood(await exec(target, b, cdb(0x03, 6, [[4, [252]]]))).dataIn!;
    expect([none[2]! & 0x0f, none[12]]).toEqual([0x00, 0x00]);
  });

  it('LUN changes, capacity changes and resets queue their unit attentions', async () => {
    const { target, nexus } = await makeFixture();
    target.addLun(1, new MemoryDevice({ blockCount: 8 }));
    // REPORT LUNS clears REPORTED LUNS DATA HAS CHANGED on LUN 0.
    expectGood(await exec(target, nexus, cdb(0xa0, 12, [[6, be32(64)]])));
    expectGood(await exec(target, nexus, cdb(0x00, 6)));
    // The new LUN starts with POWER ON for this nexus.
    expectSense(await exec(target, nexus, cdb(0x00, 6), { lun: 1 }), 0x06, 0x29, 0x00);
    await target.removeLun(1);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x3f, 0x0e);
    target.notifyCapacityChanged(0);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x2a, 0x09);
    target.reset('lun', 0, nexus);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x29, 0x03);
    target.reset('target', undefined, nexus);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x29, 0x02);
    expectGood(await exec(target, nexus, cdb(0x00, 6)));
  });
});

describe('MODE SENSE / MODE SELECT', () => {
  it('MODE SENSE(6) 0x3F returns all pages in order with a block descriptor, DPOFUA and WP', async () => {
    const { target, nexus } = await makeFixture({ blockCount: 4096 });
    const data = expectGood(await exec(target, nexus, modeSense6(0x3f))).dataIn!;
    expect(data[0]).toBe(data.length - 1);
    expect(data[2]).toBe(0x10); // DPOFUA, not WP
    expect(data[3]).toBe(8);
    expect(data.readUInt32BE(4)).toBe(4096);
    expect(data.readUIntBE(9, 3)).toBe(512);
    const codes: number[] = [];
    for (let at = 12; at < data.length; at += 2 + data[at + 1]!) codes.push(data[at]! & 0x3f);
    expect(codes).toEqual([0x01, 0x08, 0x0a, 0x1c]);
    const caching = data.indexOf(Buffer.from([0x08, 0x12]), 12);
    expect(data[caching + 2]! & 0x04).toBe(0x04); // WCE

    const ro = await makeFixture({ readOnly: true });
    const roData = expectGood(await exec(ro.target, ro.nexus, modeSense6(0x3f, 255, true))).dataIn!;
    expect(roData[2]).toBe(0x90);
    expect(roData[3]).toBe(0); // DBD
  });

  it('MODE SENSE(10) with LLBAA returns a 16-byte block descriptor', async () => {
    const { target, nexus } = await makeFixture({ blockCount: 4096 });
    const data = expectGood(await exec(target, nexus, cdb(0x5a, 10, [[1, [0x10]], [2, [0x0a]], [7, be16(512)]]))).dataIn!;
    expect(data.readUInt16BE(0)).toBe(data.length - 2);
    expect(data[4]! & 0x01).toBe(1);
    expect(data.readUInt16BE(6)).toBe(16);
    expect(data.readUInt32BE(12)).toBe(4096);
    expect(data.readUInt32BE(20)).toBe(512);
    expect(data[24]).toBe(0x0a);
  });

  it('page controls: changeable masks, saved values unsupported, unknown pages rejected', async () => {
    const { target, nexus } = await makeFixture();
    const changeable = expectGood(await exec(target, nexus, modeSense6(0x40 | 0x0a, 255, true))).dataIn!;
    expect(changeable[4 + 2]).toBe(0x04); // D_SENSE changeable
    expect(changeable[4 + 4]).toBe(0x08); // SWP changeable
    expectSense(await exec(target, nexus, modeSense6(0xc0 | 0x3f)), 0x05, 0x39, 0x00);
    expectSense(await exec(target, nexus, modeSense6(0x19)), 0x05, 0x24, 0x00);
  });

  it('MODE SELECT changes D_SENSE (descriptor sense follows) and refuses non-changeable bits', async () => {
    const { target, nexus, device } = await makeFixture();
    const current = expectGood(await exec(target, nexus, modeSense6(0x0a, 255, true))).dataIn!;
    const control = Buffer.from(current.subarray(4, 16));
    control[2] = control[2]! | 0x04; // D_SENSE
    const list = Buffer.concat([Buffer.alloc(4), control]);
    const select = cdb(0x15, 6, [[1, [0x10]], [4, [list.length]]]);
    const done = expectGood(await exec(target, nexus, select, { dataOut: list }));
    expect(done.dataOutLength).toBe(list.length);
    const after = await exec(target, nexus, cdb(0x28, 10, [[2, be32(device.blockCount)], [7, be16(1)]]));
    expect(after.sense![0]).toBe(0x72);
    expectSense(after, 0x05, 0x21, 0x00);

    const bad = Buffer.from(list);
    bad[4 + 3] = 0x10; // QAM is not changeable
    const s = expectSense(await exec(target, nexus, select, { dataOut: bad }), 0x05, 0x26, 0x00);
    expect(s.field).toMatchObject({ inCdb: false, byte: 7 });
    expectGood(await exec(target, nexus, cdb(0x15, 6, [[1, [0x10]]]), { dataOut: Buffer.alloc(0) }));
    expectSense(await exec(target, nexus, cdb(0x15, 6, [[1, [0x11]], [4, [list.length]]]), { dataOut: list }), 0x05, 0x24, 0x00);
  });

  it('SWP makes writes fail with DATA PROTECT and MODE SENSE report WP', async () => {
    const { target, nexus } = await makeFixture();
    const current = expectGood(await exec(target, nexus, modeSense6(0x0a, 255, true))).dataIn!;
    const control = Buffer.from(current.subarray(4, 16));
    control[4] = control[4]! | 0x08;
    const list = Buffer.concat([Buffer.alloc(4), control]);
    expectGood(await exec(target, nexus, cdb(0x15, 6, [[1, [0x10]], [4, [list.length]]]), { dataOut: list }));
    expectSense(await exec(target, nexus, write10(0, 1), { dataOut: Buffer.alloc(512) }), 0x07, 0x27, 0x02);
    const header = expectGood(await exec(target, nexus, modeSense6(0x3f))).dataIn!;
    expect(header[2]! & 0x80).toBe(0x80);
  });
});

describe('SPC-2 RESERVE / RELEASE', () => {
  it('a reservation makes other nexuses conflict until released, and ends with the nexus', async () => {
    const { target, nexus } = await makeFixture();
    const other = makeNexus('iqn.2026-12.test:initiator-b');
    target.nexusAdded(other);
    expectSense(await exec(target, other, cdb(0x00, 6)), 0x06, 0x29, 0x00);
    expectGood(await exec(target, nexus, cdb(0x16, 6)));
    expect((await exec(target, other, cdb(0x00, 6))).status).toBe(ScsiStatus.ReservationConflict);
    expect((await exec(target, other, cdb(0x16, 6))).status).toBe(ScsiStatus.ReservationConflict);
    expectGood(await exec(target, other, inquiry(false, 0)));
    expectGood(await exec(target, other, cdb(0x17, 6))); // releasing someone else's: no effect
    expect((await exec(target, other, cdb(0x00, 6))).status).toBe(ScsiStatus.ReservationConflict);
    target.nexusLost(nexus);
    expectGood(await exec(target, other, cdb(0x00, 6)));
  });
});
