import { describe, expect, it } from 'vitest';
import { silentLogger } from '../../../../src/log.js';
import type { Nexus, ScsiResult } from '../../../../src/iscsi/scsi-port.js';
import { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';
import { be32, cdb, exec, expectGood, expectSense, makeNexus } from './scsi-test-kit.js';

interface Cscd {
  readonly naa: Buffer;
  readonly type?: number;
  readonly blockLength?: number;
}

interface SegmentSpec {
  readonly src: number;
  readonly dst: number;
  readonly blocks: number;
  readonly srcLba: number;
  readonly dstLba: number;
  readonly type?: number;
}

/** EXTENDED COPY(LID1) parameter list (SPC-4 6.4.3) with identification CSCDs and block→block segments. */
function parameterList(cscds: Cscd[], segments: SegmentSpec[], listId = 1, listIdUsage = 0): Buffer {
  const targets = cscds.map((c) => {
    const d = Buffer.alloc(32);
    d[0] = c.type ?? 0xe4;
    d[4] = 0x01; // binary
    d[5] = 0x03; // association 0, NAA
    d[7] = c.naa.length;
    c.naa.copy(d, 8);
    d.writeUIntBE(c.blockLength ?? 512, 29, 3);
    return d;
  });
  const segs = segments.map((s) => {
    const d = Buffer.alloc(28);
    d[0] = s.type ?? 0x02;
    d.writeUInt16BE(24, 2);
    d.writeUInt16BE(s.src, 4);
    d.writeUInt16BE(s.dst, 6);
    d.writeUInt16BE(s.blocks, 10);
    d.writeBigUInt64BE(BigInt(s.srcLba), 12);
    d.writeBigUInt64BE(BigInt(s.dstLba), 20);
    return d;
  });
  const header = Buffer.alloc(16);
  header[0] = listId;
  header[1] = listIdUsage << 3;
  header.writeUInt16BE(32 * targets.length, 2);
  header.writeUInt32BE(28 * segs.length, 8);
  return Buffer.concat([header, ...targets, ...segs]);
}

const xcopyCdb = (length: number): Buffer => cdb(0x83, 16, [[10, be32(length)]]);

async function setup(): Promise<{ target: ScsiTarget; nexus: Nexus; a: MemoryDevice; b: MemoryDevice }> {
  const target = new ScsiTarget({ logger: silentLogger() });
  const a = new MemoryDevice({ blockCount: 20_000 });
  const b = new MemoryDevice({ blockCount: 20_000 });
  target.addLun(0, a);
  target.addLun(1, b);
  const nexus = makeNexus();
  target.nexusAdded(nexus);
  expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x29, 0x00);
  expectSense(await exec(target, nexus, cdb(0x00, 6), { lun: 1 }), 0x06, 0x29, 0x00);
  for (let i = 0; i < a.data.length; i += 512) a.data.writeUInt32BE(i / 512, i); // block number in each block
  return { target, nexus, a, b };
}

const xcopy = (target: ScsiTarget, nexus: Nexus, list: Buffer, lun = 1): Promise<ScsiResult> =>
  exec(target, nexus, xcopyCdb(list.length), { lun, dataOut: list });

describe('EXTENDED COPY (LID1)', () => {
  it('copies blocks between two LUs named by their NAA designators, in several pieces', async () => {
    const { target, nexus, a, b } = await setup();
    const list = parameterList([{ naa: a.identity.naa }, { naa: b.identity.naa }], [
      { src: 0, dst: 1, blocks: 10_000, srcLba: 100, dstLba: 5 },
      { src: 0, dst: 1, blocks: 3, srcLba: 0, dstLba: 19_997 },
    ]);
    expect(expectGood(await xcopy(target, nexus, list)).dataOutLength).toBe(list.length);
    expect(b.data.subarray(5 * 512, 10_005 * 512).equals(a.data.subarray(100 * 512, 10_100 * 512))).toBe(true);
    expect(b.data.subarray(19_997 * 512).equals(a.data.subarray(0, 3 * 512))).toBe(true);
    expect(b.data.readUInt32BE(4 * 512)).toBe(0); // untouched before the range
    expect(b.writes.length).toBeGreaterThan(1); // 10,000 blocks = 5 MB: bounded pieces

    // RECEIVE COPY RESULTS / COPY STATUS for list id 1: completed, 2 segments, bytes moved.
    const status = expectGood(await exec(target, nexus, cdb(0x84, 16, [[1, [0x00]], [2, [1]], [10, be32(64)]]), { lun: 1 })).dataIn!;
    expect(status[4]).toBe(0x01);
    expect(status.readUInt16BE(5)).toBe(2);
    expect(status.readUInt32BE(8)).toBe(10_003 * 512);
    expectSense(await exec(target, nexus, cdb(0x84, 16, [[1, [0x00]], [2, [9]], [10, be32(64)]])), 0x05, 0x24, 0x00);
  });

  it('copies overlapping ranges within one LU as if through a buffer', async () => {
    const { target, nexus, a } = await setup();
    const before = Buffer.from(a.data.subarray(0, 12_000 * 512));
    const list = parameterList([{ naa: a.identity.naa }], [{ src: 0, dst: 0, blocks: 10_000, srcLba: 0, dstLba: 2_000 }]);
    expectGood(await xcopy(target, nexus, list, 0));
    expect(a.data.subarray(2_000 * 512, 12_000 * 512).equals(before.subarray(0, 10_000 * 512))).toBe(true);
  });

  it('parameter list checks: length, descriptor types and counts, indexes, ranges', async () => {
    const { target, nexus, a, b } = await setup();
    const good = parameterList([{ naa: a.identity.naa }, { naa: b.identity.naa }], [{ src: 0, dst: 1, blocks: 1, srcLba: 0, dstLba: 0 }]);
    expectGood(await exec(target, nexus, xcopyCdb(0), { lun: 1, dataOut: Buffer.alloc(0) }));
    expectSense(await exec(target, nexus, xcopyCdb(good.length - 1), { lun: 1, dataOut: good.subarray(0, good.length - 1) }), 0x05, 0x1a, 0x00);
    const fc = parameterList([{ naa: a.identity.naa, type: 0xe0 }], [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 }]);
    expectSense(await xcopy(target, nexus, fc), 0x05, 0x26, 0x07);
    const stream = parameterList([{ naa: a.identity.naa }], [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1, type: 0x03 }]);
    expectSense(await xcopy(target, nexus, stream), 0x05, 0x26, 0x09);
    const manyTargets = parameterList(Array.from({ length: 17 }, () => ({ naa: a.identity.naa })), [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 }]);
    expectSense(await xcopy(target, nexus, manyTargets), 0x05, 0x26, 0x06);
    const manySegments = parameterList([{ naa: a.identity.naa }], Array.from({ length: 65 }, () => ({ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 })));
    expectSense(await xcopy(target, nexus, manySegments), 0x05, 0x26, 0x08);
    const badIndex = parameterList([{ naa: a.identity.naa }], [{ src: 0, dst: 1, blocks: 1, srcLba: 0, dstLba: 0 }]);
    expectSense(await xcopy(target, nexus, badIndex), 0x0a, 0x0d, 0x02);
    const unknownLu = parameterList([{ naa: Buffer.alloc(8, 0x77) }], [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 }]);
    expectSense(await xcopy(target, nexus, unknownLu), 0x0a, 0x0d, 0x02);
    const beyond = parameterList([{ naa: a.identity.naa }, { naa: b.identity.naa }], [{ src: 0, dst: 1, blocks: 2, srcLba: 0, dstLba: 19_999 }]);
    expectSense(await xcopy(target, nexus, beyond), 0x0a, 0x0d, 0x02);
    const wrongBlockSize = parameterList([{ naa: a.identity.naa, blockLength: 4096 }], [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 }]);
    expectSense(await xcopy(target, nexus, wrongBlockSize), 0x05, 0x26, 0x00);
    expect(b.writes).toHaveLength(0);
  });

  it('refuses to write a read-only destination and refuses ambiguous designators', async () => {
    const target = new ScsiTarget({ logger: silentLogger() });
    const src = new MemoryDevice({ blockCount: 100 });
    const ro = new MemoryDevice({ blockCount: 100, readOnly: true });
    const twin = new MemoryDevice({ blockCount: 100, identity: { naa: src.identity.naa } });
    target.addLun(0, src);
    target.addLun(1, ro);
    const nexus = makeNexus();
    target.nexusAdded(nexus);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x29, 0x00);
    const toRo = parameterList([{ naa: src.identity.naa }, { naa: ro.identity.naa }], [{ src: 0, dst: 1, blocks: 1, srcLba: 0, dstLba: 0 }]);
    expectSense(await xcopy(target, nexus, toRo, 0), 0x07, 0x27, 0x00);
    target.addLun(2, twin);
    expectSense(await exec(target, nexus, cdb(0x00, 6)), 0x06, 0x3f, 0x0e);
    const ambiguous = parameterList([{ naa: src.identity.naa }], [{ src: 0, dst: 0, blocks: 1, srcLba: 0, dstLba: 1 }]);
    expectSense(await xcopy(target, nexus, ambiguous, 0), 0x0a, 0x0d, 0x02);
  });

  it('RECEIVE COPY RESULTS / OPERATING PARAMETERS and VPD 0x8F advertise what is implemented', async () => {
    const { target, nexus } = await setup();
    const op = expectGood(await exec(target, nexus, cdb(0x84, 16, [[1, [0x03]], [10, be32(256)]]))).dataIn!;
    expect(op.readUInt32BE(0)).toBe(op.length - 4);
    expect(op.readUInt16BE(8)).toBe(16);
    expect(op.readUInt16BE(10)).toBe(64);
    expect([...op.subarray(44, 44 + op[43]!)]).toEqual([0x02, 0xe4]);
    const page = expectGood(await exec(target, nexus, cdb(0x12, 6, [[1, [1]], [2, [0x8f]], [4, [255]]]))).dataIn!;
    expect(page.readUInt16BE(4)).toBe(0x0001); // SUPPORTED COMMANDS descriptor
    const listLength = page[8]!;
    expect([...page.subarray(9, 9 + listLength)]).toEqual([0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
    const std = expectGood(await exec(target, nexus, cdb(0x12, 6, [[4, [36]]]))).dataIn!;
    expect(std[5]! & 0x08).toBe(0x08); // 3PC
  });
});
