import { describe, expect, it } from 'vitest';
import { ScsiStatus } from '../../../../src/iscsi/scsi-port.js';
import { COMMANDS } from '../../../../src/iscsi/scsi/commands.js';
import { be16, be32, cdb, exec, expectGood, expectSense, makeFixture, read10 } from './scsi-test-kit.js';

describe('generic CDB mask check', () => {
  it('turns any reserved bit of any command into INVALID FIELD IN CDB with the exact field pointer', async () => {
    const { target, nexus } = await makeFixture({ supportsUnmap: true });
    let checked = 0;
    for (const spec of COMMANDS.all) {
      for (let byte = 1; byte < spec.usage.length; byte++) {
        const forbidden = ~spec.usage[byte]! & 0xff;
        if (forbidden === 0) continue;
        const bit = 31 - Math.clz32(forbidden);
        const bytes = cdb(spec.opcode, spec.usage.length);
        if (spec.serviceAction !== undefined) bytes[1] = spec.serviceAction;
        bytes[byte] = bytes[byte]! | (1 << bit);
        const result = await exec(target, nexus, bytes);
        const s = expectSense(result, 0x05, 0x24, 0x00);
        expect(s.field, `${spec.name} byte ${byte} bit ${bit}`).toEqual({ inCdb: true, byte, bit });
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(100);
  });

  it('rejects RDPROTECT on READ(10) and WRPROTECT on WRITE(10) at byte 1 bit 7', async () => {
    const { target, nexus } = await makeFixture();
    const s = expectSense(await exec(target, nexus, read10(0, 1, 0x20)), 0x05, 0x24, 0x00);
    expect(s.field).toEqual({ inCdb: true, byte: 1, bit: 5 });
    const w = cdb(0x2a, 10, [[1, [0x80]], [7, be16(1)]]);
    const s2 = expectSense(await exec(target, nexus, w, { dataOut: Buffer.alloc(512) }), 0x05, 0x24, 0x00);
    expect(s2.field).toEqual({ inCdb: true, byte: 1, bit: 7 });
  });

  it('accepts DPO and FUA on READ(10)', async () => {
    const { target, nexus } = await makeFixture();
    expectGood(await exec(target, nexus, read10(0, 1, 0x18)));
  });

  it('answers unknown opcodes with INVALID COMMAND OPERATION CODE and unknown service actions with INVALID FIELD', async () => {
    const { target, nexus } = await makeFixture();
    expectSense(await exec(target, nexus, cdb(0x48, 10)), 0x05, 0x20, 0x00); // SANITIZE
    expectSense(await exec(target, nexus, cdb(0x8c, 16)), 0x05, 0x20, 0x00); // READ ATTRIBUTE
    const s = expectSense(await exec(target, nexus, cdb(0x9e, 16, [[1, [0x1f]]])), 0x05, 0x24, 0x00);
    expect(s.field).toEqual({ inCdb: true, byte: 1, bit: 4 });
  });
});

function rsoc(options: number, opcode = 0, sa = 0, alloc = 8192): Buffer {
  return cdb(0xa3, 12, [[1, [0x0c]], [2, [options]], [3, [opcode]], [4, be16(sa)], [6, be32(alloc)]]);
}

describe('REPORT SUPPORTED OPERATION CODES', () => {
  it('lists every command of the table (UNMAP only when the device can unmap), with timeouts when RCTD', async () => {
    const { target, nexus } = await makeFixture({ supportsUnmap: false });
    const data = expectGood(await exec(target, nexus, rsoc(0))).dataIn!;
    const length = data.readUInt32BE(0);
    expect(data.length).toBe(4 + length);
    const listed: string[] = [];
    for (let at = 4; at < data.length; at += 8) {
      const servactv = (data[at + 5]! & 0x01) !== 0;
      listed.push(servactv ? `${data[at]}/${data.readUInt16BE(at + 2)}` : `${data[at]}`);
      const spec = COMMANDS.find(data[at]!, servactv ? data.readUInt16BE(at + 2) : undefined);
      expect(spec).toBeDefined();
      expect(data.readUInt16BE(at + 6)).toBe(spec!.usage.length);
    }
    expect(listed).not.toContain(`${0x42}`);
    expect(listed.length).toBe(COMMANDS.all.length - 1);

    const withTimeouts = expectGood(await exec(target, nexus, rsoc(0x80))).dataIn!;
    expect(withTimeouts.readUInt32BE(0)).toBe(listed.length * 20);
    expect(withTimeouts[4 + 5]! & 0x02).toBe(0x02); // CTDP
    expect(withTimeouts.readUInt16BE(4 + 8)).toBe(0x0a); // timeouts descriptor length
  });

  it('returns the CDB usage data of one command equal to the table mask', async () => {
    const { target, nexus } = await makeFixture();
    const one = expectGood(await exec(target, nexus, rsoc(1, 0x28))).dataIn!;
    expect(one[1]! & 0x07).toBe(0x03); // supported
    expect(one.readUInt16BE(2)).toBe(10);
    expect([...one.subarray(4, 14)]).toEqual([...COMMANDS.find(0x28)!.usage]);

    const bySa = expectGood(await exec(target, nexus, rsoc(2, 0x9e, 0x10))).dataIn!;
    expect(bySa[1]! & 0x07).toBe(0x03);
    expect([...bySa.subarray(4, 20)]).toEqual([...COMMANDS.find(0x9e, 0x10)!.usage]);

    const missing = expectGood(await exec(target, nexus, rsoc(1, 0x9c))).dataIn!; // WRITE ATOMIC(16)
    expect(missing[1]! & 0x07).toBe(0x01); // not supported

    // Asking by opcode alone for a command that has service actions is an invalid field, and vice versa.
    expectSense(await exec(target, nexus, rsoc(1, 0x9e)), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, rsoc(2, 0x28)), 0x05, 0x24, 0x00);
  });

  it('truncates to the allocation length', async () => {
    const { target, nexus } = await makeFixture();
    const result = await exec(target, nexus, rsoc(0, 0, 0, 12));
    expect(result.status).toBe(ScsiStatus.Good);
    expect(result.dataIn!.length).toBe(12);
  });
});

describe('malformed input', () => {
  it('random CDBs and Data-Out never reject, never throw, and always yield a well-formed result', async () => {
    const { target, nexus, device } = await makeFixture({ supportsUnmap: true, blockCount: 4096 });
    let seed = 12345;
    const random = (): number => {
      seed ^= seed << 13;
      seed ^= seed >>> 17;
      seed ^= seed << 5;
      return (seed >>> 0) / 2 ** 32;
    };
    const opcodes = [...new Set(COMMANDS.all.map((s) => s.opcode))];
    const statuses = new Set<number>([ScsiStatus.Good, ScsiStatus.CheckCondition, ScsiStatus.ReservationConflict, ScsiStatus.ConditionMet]);
    const seenStatus = new Map<number, number>();
    for (let i = 0; i < 4000; i++) {
      const bytes = Buffer.alloc(16);
      for (let j = 0; j < 16; j++) bytes[j] = random() < 0.6 ? 0 : Math.floor(random() * 256);
      bytes[0] = random() < 0.9 ? opcodes[Math.floor(random() * opcodes.length)]! : Math.floor(random() * 256);
      // Keep LBAs and lengths mostly small so that many commands reach their handlers.
      if (random() < 0.7) for (let j = 2; j < 16; j++) bytes[j] = bytes[j]! & 0x03;
      const dataOut = random() < 0.5 ? Buffer.alloc(Math.floor(random() * 3000), Math.floor(random() * 256)) : undefined;
      const result = await exec(target, nexus, bytes, { dataOut, expectedDataLength: dataOut?.length ?? 4096 });
      expect(statuses.has(result.status), `status ${result.status} for ${bytes.toString('hex')}`).toBe(true);
      seenStatus.set(result.status, (seenStatus.get(result.status) ?? 0) + 1);
      if (result.status === ScsiStatus.CheckCondition) {
        expect(result.sense!.length).toBeGreaterThanOrEqual(18);
        // HARDWARE ERROR would mean a handler threw: a missing check, not a refused command.
        expect(result.sense![2]! & 0x0f, `hardware error for ${bytes.toString('hex')}`).not.toBe(0x04);
      }
      // Release any SPC-2 reservation or PR the fuzzer created, so later commands keep reaching handlers.
      if (result.status === ScsiStatus.ReservationConflict || bytes[0] === 0x16 || bytes[0] === 0x56) {
        await exec(target, nexus, cdb(0x17, 6));
      }
    }
    expect(seenStatus.get(ScsiStatus.Good) ?? 0).toBeGreaterThan(200);
    expect(seenStatus.get(ScsiStatus.CheckCondition) ?? 0).toBeGreaterThan(200);
    expect(device.closed).toBe(false);
  });

  it('removeLun waits for running commands before closing the device', async () => {
    const { target, nexus, device } = await makeFixture({ ioDelayMs: 20 });
    const reading = exec(target, nexus, read10(0, 8));
    const removing = target.removeLun(0);
    expect(device.closed).toBe(false);
    expectGood(await reading);
    await removing;
    expect(device.closed).toBe(true);
    expectSense(await exec(target, nexus, read10(0, 1)), 0x05, 0x25, 0x00);
  });
});
