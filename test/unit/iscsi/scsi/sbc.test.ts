import { describe, expect, it } from 'vitest';
import { ScsiStatus } from '../../../../src/iscsi/scsi-port.js';
import {
  be16,
  be32,
  be64,
  cdb,
  exec,
  expectGood,
  expectSense,
  filled,
  makeFixture,
  read10,
  read16,
  write10,
  write16,
} from './scsi-test-kit.js';

describe('READ / WRITE', () => {
  it('writes and reads back through every CDB size', async () => {
    const { target, nexus, device } = await makeFixture();
    expectGood(await exec(target, nexus, cdb(0x0a, 6, [[2, be16(10)], [4, [2]]]), { dataOut: filled(2, 0x61) }));
    expectGood(await exec(target, nexus, write10(20, 2), { dataOut: filled(2, 0x62) }));
    expectGood(await exec(target, nexus, cdb(0xaa, 12, [[2, be32(30)], [6, be32(2)]]), { dataOut: filled(2, 0x63) }));
    expectGood(await exec(target, nexus, write16(40, 2), { dataOut: filled(2, 0x64) }));
    expect(expectGood(await exec(target, nexus, cdb(0x08, 6, [[2, be16(10)], [4, [2]]]))).dataIn!.equals(filled(2, 0x61))).toBe(true);
    expect(expectGood(await exec(target, nexus, read10(20, 2))).dataIn!.equals(filled(2, 0x62))).toBe(true);
    expect(
      expectGood(await exec(target, nexus, cdb(0xa8, 12, [[2, be32(30)], [6, be32(2)]]))).dataIn!.equals(filled(2, 0x63)),
    ).toBe(true);
    expect(expectGood(await exec(target, nexus, read16(40, 2))).dataIn!.equals(filled(2, 0x64))).toBe(true);
    expect(device.data.subarray(10 * 512, 12 * 512).equals(filled(2, 0x61))).toBe(true);
  });

  it('READ(6) with transfer length 0 reads 256 blocks; READ(10) with 0 reads nothing', async () => {
    const { target, nexus } = await makeFixture();
    expect(expectGood(await exec(target, nexus, cdb(0x08, 6, [[2, be16(0)], [4, [0]]]))).dataIn!.length).toBe(256 * 512);
    expect(expectGood(await exec(target, nexus, read10(5, 0))).dataIn).toBeUndefined();
  });

  it('LBA range errors: 05/21/00 for reads and writes beyond the end, including 64-bit LBAs', async () => {
    const { target, nexus, device } = await makeFixture({ blockCount: 1000 });
    expectGood(await exec(target, nexus, read10(999, 1)));
    expectSense(await exec(target, nexus, read10(999, 2)), 0x05, 0x21, 0x00);
    expectSense(await exec(target, nexus, read10(1000, 1)), 0x05, 0x21, 0x00);
    expectSense(await exec(target, nexus, read10(0xffffffff, 1)), 0x05, 0x21, 0x00);
    expectSense(await exec(target, nexus, read16(2 ** 63, 1)), 0x05, 0x21, 0x00);
    expectSense(await exec(target, nexus, cdb(0x88, 16, [[2, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]], [10, be32(1)]])), 0x05, 0x21, 0x00);
    expectSense(await exec(target, nexus, cdb(0x08, 6, [[1, [0x1f]], [2, be16(0xffff)], [4, [1]]])), 0x05, 0x21, 0x00);
    const w = await exec(target, nexus, write16(999, 2), { dataOut: filled(2, 1) });
    expectSense(w, 0x05, 0x21, 0x00);
    expect(device.writes).toHaveLength(0);
  });

  it('refuses transfers above MAXIMUM TRANSFER LENGTH with INVALID FIELD IN CDB at the length field', async () => {
    const { target, nexus } = await makeFixture({ blockCount: 200_000 });
    const s = expectSense(await exec(target, nexus, read16(0, 65537)), 0x05, 0x24, 0x00);
    expect(s.field).toEqual({ inCdb: true, byte: 10 });
  });

  it('passes FUA to the device, and forces it when the write cache is disabled', async () => {
    const { target, nexus, device } = await makeFixture();
    expectGood(await exec(target, nexus, write10(0, 1, 0x08), { dataOut: filled(1, 1) }));
    expectGood(await exec(target, nexus, write10(1, 1), { dataOut: filled(1, 1) }));
    expect(device.writes.map((w) => w.fua)).toEqual([true, false]);
  });

  it('reports the CDB data length and writes only the whole blocks that arrived (residual rules)', async () => {
    const { target, nexus, device } = await makeFixture();
    // Initiator sends one block for a two-block WRITE: block 0 written, block 1 untouched.
    const short = expectGood(await exec(target, nexus, write10(100, 2), { dataOut: filled(1, 0xaa) }));
    expect(short.dataOutLength).toBe(1024);
    expect(device.data.subarray(100 * 512, 101 * 512).equals(filled(1, 0xaa))).toBe(true);
    expect(device.data.subarray(101 * 512, 102 * 512).equals(filled(1, 0))).toBe(true);
    // Initiator sends more than needed: only the CDB's blocks are written.
    const long = expectGood(await exec(target, nexus, write10(200, 1), { dataOut: filled(3, 0xbb) }));
    expect(long.dataOutLength).toBe(512);
    expect(device.data.subarray(201 * 512, 202 * 512).equals(filled(1, 0))).toBe(true);
    // Nothing sent: nothing written, still GOOD with the CDB's length.
    const none = expectGood(await exec(target, nexus, write10(300, 1), { dataOut: Buffer.alloc(0) }));
    expect(none.dataOutLength).toBe(512);
    expect(device.writes).toHaveLength(2);
  });

  it('read-only LUNs refuse every write command with 07/27/00 and still read', async () => {
    const { target, nexus, device } = await makeFixture({ readOnly: true, supportsUnmap: true });
    expectSense(await exec(target, nexus, write10(0, 1), { dataOut: filled(1, 1) }), 0x07, 0x27, 0x00);
    expectSense(await exec(target, nexus, cdb(0x93, 16, [[13, [1]]]), { dataOut: filled(1, 0) }), 0x07, 0x27, 0x00);
    expectSense(await exec(target, nexus, cdb(0x42, 10, [[8, [24]]]), { dataOut: Buffer.alloc(24) }), 0x07, 0x27, 0x00);
    expectSense(await exec(target, nexus, cdb(0x89, 16, [[13, [1]]]), { dataOut: filled(2, 0) }), 0x07, 0x27, 0x00);
    expectGood(await exec(target, nexus, read10(0, 1)));
    expect(device.writes).toHaveLength(0);
  });

  it('maps storage errors to sense: medium error 03/11/00, write error 03/0C/00, write protected 07/27/00, out of space 07/27/07', async () => {
    const { target, nexus, device } = await makeFixture();
    device.failNext = 'medium-error';
    expectSense(await exec(target, nexus, read10(0, 1)), 0x03, 0x11, 0x00);
    device.failNext = 'write-error';
    expectSense(await exec(target, nexus, write10(0, 1), { dataOut: filled(1, 1) }), 0x03, 0x0c, 0x00);
    device.failNext = 'write-protected';
    expectSense(await exec(target, nexus, write10(0, 1), { dataOut: filled(1, 1) }), 0x07, 0x27, 0x00);
    device.failNext = 'space-exhausted';
    expectSense(await exec(target, nexus, write10(0, 1), { dataOut: filled(1, 1) }), 0x07, 0x27, 0x07);
    expectGood(await exec(target, nexus, read10(0, 1)));
  });

  it('an unexpected device exception becomes HARDWARE ERROR, not a rejected promise', async () => {
    const { target, nexus, device } = await makeFixture();
    device.read = async () => {
      throw new TypeError('boom');
    };
    expectSense(await exec(target, nexus, read10(0, 1)), 0x04, 0x44, 0x00);
  });
});

describe('VERIFY / WRITE AND VERIFY', () => {
  it('BYTCHK=1 compares and reports the miscompare offset in INFORMATION', async () => {
    const { target, nexus } = await makeFixture();
    expectGood(await exec(target, nexus, write10(10, 2), { dataOut: filled(2, 0x33) }));
    const same = cdb(0x2f, 10, [[1, [0x02]], [2, be32(10)], [7, be16(2)]]);
    expect(expectGood(await exec(target, nexus, same, { dataOut: filled(2, 0x33) })).dataOutLength).toBe(1024);
    const different = filled(2, 0x33);
    different[700] = 0;
    const s = expectSense(await exec(target, nexus, same, { dataOut: different }), 0x0e, 0x1d, 0x00);
    expect(s.information).toBe(700);
    // BYTCHK=0 only checks the medium is readable.
    expectGood(await exec(target, nexus, cdb(0x2f, 10, [[2, be32(0)], [7, be16(2048)]])));
    expectSense(await exec(target, nexus, cdb(0x8f, 16, [[2, be64(2047)], [10, be32(2)]])), 0x05, 0x21, 0x00);
  });

  it('WRITE AND VERIFY(16) writes the data', async () => {
    const { target, nexus, device } = await makeFixture();
    expectGood(await exec(target, nexus, cdb(0x8e, 16, [[2, be64(5)], [10, be32(1)]]), { dataOut: filled(1, 0x44) }));
    expect(device.data.subarray(5 * 512, 6 * 512).equals(filled(1, 0x44))).toBe(true);
  });
});

describe('UNMAP / WRITE SAME / GET LBA STATUS', () => {
  const unmapList = (ranges: Array<[number, number]>): Buffer => {
    const list = Buffer.alloc(8 + 16 * ranges.length);
    list.writeUInt16BE(list.length - 2, 0);
    list.writeUInt16BE(16 * ranges.length, 2);
    ranges.forEach(([lba, blocks], i) => {
      list.writeBigUInt64BE(BigInt(lba), 8 + 16 * i);
      list.writeUInt32BE(blocks, 16 + 16 * i);
    });
    return list;
  };
  const unmapCdb = (length: number): Buffer => cdb(0x42, 10, [[7, be16(length)]]);
  const getLbaStatus = (lba: number, alloc = 1024): Buffer => cdb(0x9e, 16, [[1, [0x12]], [2, be64(lba)], [10, be32(alloc)]]);

  it('UNMAP deallocates ranges; GET LBA STATUS reports mapped / deallocated runs', async () => {
    const { target, nexus, device } = await makeFixture({ supportsUnmap: true, blockCount: 1024 });
    expectGood(await exec(target, nexus, write10(0, 64), { dataOut: filled(64, 0x55) }));
    const list = unmapList([
      [8, 8],
      [32, 4],
    ]);
    expect(expectGood(await exec(target, nexus, unmapCdb(list.length), { dataOut: list })).dataOutLength).toBe(list.length);
    expect(device.data.subarray(8 * 512, 16 * 512).equals(filled(8, 0))).toBe(true);
    expect(device.data.subarray(16 * 512, 17 * 512).equals(filled(1, 0x55))).toBe(true);

    const data = expectGood(await exec(target, nexus, getLbaStatus(0))).dataIn!;
    const descriptors: Array<[number, number, number]> = [];
    for (let at = 8; at < 4 + data.readUInt32BE(0); at += 16) {
      descriptors.push([Number(data.readBigUInt64BE(at)), data.readUInt32BE(at + 8), data[at + 12]! & 0x0f]);
    }
    expect(descriptors).toEqual([
      [0, 8, 0],
      [8, 8, 1],
      [16, 16, 0],
      [32, 4, 1],
      [36, 28, 0],
      [64, 960, 1],
    ]);
    // Allocation length 24 holds exactly one descriptor.
    const one = expectGood(await exec(target, nexus, getLbaStatus(9, 24))).dataIn!;
    expect(one.length).toBe(24);
    expect([Number(one.readBigUInt64BE(8)), one.readUInt32BE(16), one[20]]).toEqual([9, 7, 1]);
    expectSense(await exec(target, nexus, getLbaStatus(1024)), 0x05, 0x21, 0x00);
  });

  it('UNMAP parameter list checks (SBC-3 5.28)', async () => {
    const { target, nexus, device } = await makeFixture({ supportsUnmap: true, blockCount: 1024 });
    expectGood(await exec(target, nexus, unmapCdb(0), { dataOut: Buffer.alloc(0) }));
    expectSense(await exec(target, nexus, unmapCdb(4), { dataOut: Buffer.alloc(4) }), 0x05, 0x1a, 0x00);
    const beyond = unmapList([[1020, 8]]);
    expectSense(await exec(target, nexus, unmapCdb(beyond.length), { dataOut: beyond }), 0x05, 0x21, 0x00);
    const tooMany = unmapList(Array.from({ length: 257 }, (_, i): [number, number] => [i, 1]));
    const s = expectSense(await exec(target, nexus, unmapCdb(tooMany.length), { dataOut: tooMany }), 0x05, 0x26, 0x00);
    expect(s.field).toEqual({ inCdb: false, byte: 2 });
    expectSense(await exec(target, nexus, cdb(0x42, 10, [[1, [1]], [7, be16(24)]]), { dataOut: unmapList([[0, 1]]) }), 0x05, 0x24, 0x00);
    expect(device.mapped.every((m) => m === 0)).toBe(true);
  });

  it('WRITE SAME writes the block over the range in batches; UNMAP bit deallocates (whatever the block holds); NDOB writes zeroes', async () => {
    const { target, nexus, device } = await makeFixture({ supportsUnmap: true, blockCount: 8192 });
    const block = filled(1, 0x77);
    expectGood(await exec(target, nexus, cdb(0x41, 10, [[2, be32(0)], [7, be16(5000)]]), { dataOut: block }));
    for (let lba = 0; lba < 5000; lba += 997) {
      expect(device.data.subarray(lba * 512, lba * 512 + 512).equals(block)).toBe(true);
    }
    expect(device.data[5000 * 512]).toBe(0);
    expect(device.writes.length).toBeGreaterThan(1); // batched
    expect(Math.max(...device.writes.map((w) => w.blocks))).toBeLessThanOrEqual(2048);

    expectGood(await exec(target, nexus, cdb(0x93, 16, [[1, [0x08]], [2, be64(100)], [10, be32(50)]]), { dataOut: filled(1, 0) }));
    expect(device.mapped[99]).toBe(1);
    expect(device.mapped.subarray(100, 150).every((m) => m === 0)).toBe(true);

    // UNMAP with a block that is not zeroes deallocates too (libiscsi's WriteSame*.UnmapUntilEnd
    // sends 0xFF blocks and expects zeroes back with LBPRZ=1).
    expectGood(await exec(target, nexus, cdb(0x93, 16, [[1, [0x08]], [2, be64(300)], [10, be32(4)]]), { dataOut: block }));
    expect(device.mapped.subarray(300, 304).every((m) => m === 0)).toBe(true);

    expectGood(await exec(target, nexus, cdb(0x93, 16, [[1, [0x01]], [2, be64(200)], [10, be32(3)]]), { expectedDataLength: 0 }));
    expect(device.data.subarray(200 * 512, 203 * 512).equals(filled(3, 0))).toBe(true);

    // Zero blocks = up to the end of the LUN.
    expectGood(await exec(target, nexus, cdb(0x93, 16, [[2, be64(8190)], [10, be32(0)]]), { dataOut: block }));
    expect(device.data.subarray(8191 * 512).equals(block)).toBe(true);
    // ANCHOR is not supported; a Data-Out that is not one block is refused.
    expectSense(await exec(target, nexus, cdb(0x93, 16, [[1, [0x18]], [10, be32(1)]]), { dataOut: block }), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, cdb(0x41, 10, [[7, be16(1)]]), { dataOut: filled(2, 1) }), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, cdb(0x41, 10, [[2, be32(8190)], [7, be16(3)]]), { dataOut: block }), 0x05, 0x21, 0x00);
  });

  it('a command aborted while it waits for an overlapping one ends TASK ABORTED and changes nothing (WRITE, WRITE SAME, UNMAP, COMPARE AND WRITE, ORWRITE)', async () => {
    const { target, nexus, device } = await makeFixture({ supportsUnmap: true, blockCount: 1024, ioDelayMs: 20 });
    const before = Buffer.from(device.data.subarray(0, 16 * 512));
    // Each runs behind a slow WRITE of blocks 0-15 that holds the range lock; it is aborted while waiting.
    const waiters: Array<{ name: string; cdb: Buffer; dataOut: Buffer }> = [
      { name: 'WRITE(10)', cdb: cdb(0x2a, 10, [[7, be16(2)]]), dataOut: filled(2, 0x11) },
      { name: 'WRITE SAME(16)', cdb: cdb(0x93, 16, [[10, be32(4)]]), dataOut: filled(1, 0x22) },
      { name: 'UNMAP', cdb: cdb(0x42, 10, [[7, be16(24)]]), dataOut: Buffer.from([0, 22, 0, 16, 0, 0, 0, 0, ...be64(0), ...be32(8), 0, 0, 0, 0]) },
      { name: 'COMPARE AND WRITE', cdb: cdb(0x89, 16, [[13, [1]]]), dataOut: Buffer.concat([filled(1, 0x33), filled(1, 0x44)]) },
      { name: 'ORWRITE(16)', cdb: cdb(0x8b, 16, [[10, be32(1)]]), dataOut: filled(1, 0x55) },
    ];
    for (const w of waiters) {
      const holder = exec(target, nexus, cdb(0x2a, 10, [[7, be16(16)]]), { dataOut: filled(16, 0x33) });
      const abort = new AbortController();
      const waiting = exec(target, nexus, w.cdb, { dataOut: w.dataOut, signal: abort.signal });
      await new Promise((r) => setTimeout(r, 5));
      abort.abort();
      expect((await holder).status, w.name).toBe(ScsiStatus.Good);
      expect((await waiting).status, w.name).toBe(ScsiStatus.TaskAborted);
      // Only the holder's write reached the medium.
      expect(device.data.subarray(0, 16 * 512).equals(filled(16, 0x33)), w.name).toBe(true);
      before.copy(device.data);
    }
  });

  it('an aborted task stops a long WRITE SAME between batches with TASK ABORTED', async () => {
    const { target, nexus, device } = await makeFixture({ blockCount: 8192, ioDelayMs: 5 });
    const abort = new AbortController();
    const running = exec(target, nexus, cdb(0x41, 10, [[7, be16(8192)]]), { dataOut: filled(1, 9), signal: abort.signal });
    while (device.writes.length === 0) await new Promise((r) => setTimeout(r, 1));
    abort.abort();
    const result = await running;
    expect(result.status).toBe(ScsiStatus.TaskAborted);
    expect(device.writes.length).toBeLessThan(4);
  });

  it('WRITE SAME with UNMAP on a device without unmap is an invalid field', async () => {
    const { target, nexus } = await makeFixture({ supportsUnmap: false });
    const s = expectSense(await exec(target, nexus, cdb(0x41, 10, [[1, [0x08]], [7, be16(1)]]), { dataOut: filled(1, 0) }), 0x05, 0x24, 0x00);
    expect(s.field).toEqual({ inCdb: true, byte: 1, bit: 3 });
  });

  it('GET LBA STATUS without device.status reports everything mapped', async () => {
    const { target, nexus } = await makeFixture({ reportsStatus: false, blockCount: 100 });
    const data = expectGood(await exec(target, nexus, getLbaStatus(10))).dataIn!;
    expect(data.readUInt32BE(0)).toBe(20);
    expect([Number(data.readBigUInt64BE(8)), data.readUInt32BE(16), data[20]]).toEqual([10, 90, 0]);
  });
});

describe('COMPARE AND WRITE', () => {
  const caw = (lba: number, blocks: number, flags = 0): Buffer => cdb(0x89, 16, [[1, [flags]], [2, be64(lba)], [13, [blocks]]]);

  it('writes when the data matches, reports the miscompare offset otherwise', async () => {
    const { target, nexus, device } = await makeFixture();
    expectGood(await exec(target, nexus, write10(7, 2), { dataOut: filled(2, 0x41) }));
    const ok = expectGood(await exec(target, nexus, caw(7, 2), { dataOut: Buffer.concat([filled(2, 0x41), filled(2, 0x42)]) }));
    expect(ok.dataOutLength).toBe(2048);
    expect(device.data.subarray(7 * 512, 9 * 512).equals(filled(2, 0x42))).toBe(true);
    const wrongVerify = filled(2, 0x42);
    wrongVerify[513] = 0x43;
    const s = expectSense(
      await exec(target, nexus, caw(7, 2), { dataOut: Buffer.concat([wrongVerify, filled(2, 0x44)]) }),
      0x0e,
      0x1d,
      0x00,
    );
    expect(s.information).toBe(513);
    expect(device.data.subarray(7 * 512, 9 * 512).equals(filled(2, 0x42))).toBe(true);
  });

  it('checks block count against MAXIMUM COMPARE AND WRITE LENGTH and the Data-Out length', async () => {
    const { target, nexus } = await makeFixture();
    expectSense(await exec(target, nexus, caw(0, 200), { dataOut: filled(400, 0) }), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, caw(0, 1), { dataOut: filled(1, 0) }), 0x05, 0x24, 0x00);
    expectSense(await exec(target, nexus, caw(2047, 2), { dataOut: filled(4, 0) }), 0x05, 0x21, 0x00);
    expectGood(await exec(target, nexus, caw(0, 0), { expectedDataLength: 0 }));
  });

  it('is atomic: concurrent COMPARE AND WRITEs on one block never both succeed, and writes cannot slip in between', async () => {
    const { target, nexus, device } = await makeFixture({ ioDelayMs: 2 });
    const zero = filled(1, 0);
    const contenders = Array.from({ length: 8 }, (_, i) =>
      exec(target, nexus, caw(3, 1), { dataOut: Buffer.concat([zero, filled(1, i + 1)]) }),
    );
    const results = await Promise.all(contenders);
    const winners = results.flatMap((r, i) => (r.status === ScsiStatus.Good ? [i + 1] : []));
    expect(winners).toHaveLength(1);
    for (const r of results) if (r.status !== ScsiStatus.Good) expectSense(r, 0x0e, 0x1d, 0x00);
    expect(device.data[3 * 512]).toBe(winners[0]);

    // A WRITE issued while a COMPARE AND WRITE is between its read and its write waits for it.
    expectGood(await exec(target, nexus, write10(9, 1), { dataOut: filled(1, 0x10) }));
    const swap = exec(target, nexus, caw(9, 1), { dataOut: Buffer.concat([filled(1, 0x10), filled(1, 0x20)]) });
    const overwrite = exec(target, nexus, write10(9, 1), { dataOut: filled(1, 0x30) });
    expectGood(await swap);
    expectGood(await overwrite);
    expect(device.data[9 * 512]).toBe(0x30);
  });
});

describe('other SBC commands', () => {
  it('READ CAPACITY(10)/(16), SYNCHRONIZE CACHE, PRE-FETCH, READ DEFECT DATA, TUR', async () => {
    const { target, nexus, device } = await makeFixture({ blockCount: 5000 });
    const rc10 = expectGood(await exec(target, nexus, cdb(0x25, 10))).dataIn!;
    expect([rc10.readUInt32BE(0), rc10.readUInt32BE(4)]).toEqual([4999, 512]);
    expectSense(await exec(target, nexus, cdb(0x25, 10, [[2, be32(5)]])), 0x05, 0x24, 0x00); // LBA without PMI
    const rc16 = expectGood(await exec(target, nexus, cdb(0x9e, 16, [[1, [0x10]], [10, be32(12)]]))).dataIn!;
    expect(rc16.length).toBe(12);
    expect(Number(rc16.readBigUInt64BE(0))).toBe(4999);
    expectGood(await exec(target, nexus, cdb(0x35, 10)));
    expectGood(await exec(target, nexus, cdb(0x91, 16, [[2, be64(10)], [10, be32(10)]])));
    expect(device.flushes).toBe(2);
    expectSense(await exec(target, nexus, cdb(0x35, 10, [[2, be32(4999)], [7, be16(2)]])), 0x05, 0x21, 0x00);
    expectGood(await exec(target, nexus, cdb(0x34, 10, [[2, be32(0)], [7, be16(16)]])));
    expectSense(await exec(target, nexus, cdb(0x90, 16, [[2, be64(5000)], [10, be32(1)]])), 0x05, 0x21, 0x00);
    const defects = expectGood(await exec(target, nexus, cdb(0x37, 10, [[2, [0x05]], [7, be16(4)]]))).dataIn!;
    expect([...defects]).toEqual([0, 0x05, 0, 0]);
    expectGood(await exec(target, nexus, cdb(0x00, 6)));
  });

  it('ORWRITE ORs the data into the stored blocks', async () => {
    const { target, nexus, device } = await makeFixture();
    expectGood(await exec(target, nexus, write10(1, 1), { dataOut: filled(1, 0x0f) }));
    expectGood(await exec(target, nexus, cdb(0x8b, 16, [[2, be64(1)], [10, be32(1)]]), { dataOut: filled(1, 0xf0) }));
    expect(device.data.subarray(512, 1024).equals(filled(1, 0xff))).toBe(true);
  });
});
