/**
 * Test-only ScsiTargetPort over in-memory buffers: just enough SPC/SBC (INQUIRY with VPD 0x00/0x80/
 * 0x83, READ CAPACITY 10/16, READ/WRITE 10/16, TEST UNIT READY, REPORT LUNS, MODE SENSE 6/10,
 * SYNCHRONIZE CACHE) for libiscsi's tools and qemu to use a LUN. It records every command and
 * can hold commands (to test ABORT TASK).
 */
import {
  ScsiStatus,
  type Nexus,
  type ScsiCommand,
  type ScsiResult,
  type ScsiTargetPort,
} from '../../../../src/iscsi/scsi-port.js';

const BLOCK = 512;

function sense(key: number, asc: number, ascq: number): ScsiResult {
  const s = Buffer.alloc(18);
  s[0] = 0x70;
  s[2] = key;
  s[7] = 10;
  s[12] = asc;
  s[13] = ascq;
  return { status: ScsiStatus.CheckCondition, sense: s };
}

function cut(buf: Buffer, allocationLength: number): Buffer {
  return buf.subarray(0, Math.min(buf.length, allocationLength));
}

export class MemoryScsiPort implements ScsiTargetPort {
  readonly luns = new Map<number, Buffer>();
  readonly executed: ScsiCommand[] = [];
  readonly resets: Array<{ kind: 'lun' | 'target'; lun: number | undefined }> = [];
  readonly nexuses = new Set<string>();
  /** When set, commands with this opcode wait until released (or aborted). */
  holdOpcode: number | undefined;
  /** Answer a held command normally even if it was aborted meanwhile (a SCSI layer that ignores the signal). */
  answerAborted = false;
  /** When set, READ answers with `dataInSegments`: slices of this many bytes, counted below. */
  readSegmentBytes: number | undefined;
  segmentedReads = 0;
  segmentReleases = 0;
  private held: Array<() => void> = [];

  addLun(lun: number, sizeBytes: number, fill?: (buf: Buffer) => void): Buffer {
    const buf = Buffer.alloc(sizeBytes);
    fill?.(buf);
    this.luns.set(lun, buf);
    return buf;
  }

  releaseHeld(): void {
    const h = this.held;
    this.held = [];
    for (const f of h) f();
  }

  get heldCount(): number {
    return this.held.length;
  }

  lunNumbers(): number[] {
    return [...this.luns.keys()].sort((a, b) => a - b);
  }
  reset(kind: 'lun' | 'target', lun: number | undefined, _from: Nexus): void {
    this.resets.push({ kind, lun });
  }
  nexusLost(nexus: Nexus): void {
    this.nexuses.delete(nexus.key);
  }
  nexusAdded(nexus: Nexus): void {
    this.nexuses.add(nexus.key);
  }

  async execute(cmd: ScsiCommand): Promise<ScsiResult> {
    this.executed.push(cmd);
    const cdb = cmd.cdb;
    const op = cdb[0]!;
    if (this.holdOpcode === op) {
      await new Promise<void>((resolve) => {
        this.held.push(resolve);
        cmd.signal?.addEventListener('abort', () => resolve());
      });
      if (cmd.signal?.aborted && !this.answerAborted) return { status: ScsiStatus.TaskAborted };
    }
    if (op === 0xa0) return this.reportLuns(cdb);
    const disk = this.luns.get(cmd.lun);
    if (!disk) {
      if (op === 0x12) {
        const inq = Buffer.alloc(36);
        inq[0] = 0x7f; // peripheral qualifier 011b, type 1Fh: no LU here
        inq[4] = 31;
        return { status: ScsiStatus.Good, dataIn: cut(inq, cdb.readUInt16BE(3)) };
      }
      return sense(0x05, 0x25, 0x00);
    }
    const blocks = disk.length / BLOCK;
    switch (op) {
      case 0x00: // TEST UNIT READY
        return { status: ScsiStatus.Good };
      case 0x12:
        return this.inquiry(cdb, cmd.lun);
      case 0x25: {
        const d = Buffer.alloc(8);
        d.writeUInt32BE(Math.min(blocks - 1, 0xffffffff), 0);
        d.writeUInt32BE(BLOCK, 4);
        return { status: ScsiStatus.Good, dataIn: d };
      }
      case 0x9e: {
        if ((cdb[1]! & 0x1f) !== 0x10) return sense(0x05, 0x20, 0x00);
        const d = Buffer.alloc(32);
        d.writeBigUInt64BE(BigInt(blocks - 1), 0);
        d.writeUInt32BE(BLOCK, 8);
        return { status: ScsiStatus.Good, dataIn: cut(d, cdb.readUInt32BE(10)) };
      }
      case 0x1a: {
        const d = Buffer.from([3, 0, 0, 0]);
        return { status: ScsiStatus.Good, dataIn: cut(d, cdb[4]!) };
      }
      case 0x5a: {
        const d = Buffer.from([0, 6, 0, 0, 0, 0, 0, 0]);
        return { status: ScsiStatus.Good, dataIn: cut(d, cdb.readUInt16BE(7)) };
      }
      case 0x35:
      case 0x91:
        return { status: ScsiStatus.Good };
      case 0x28:
      case 0x88: {
        const lba = op === 0x28 ? cdb.readUInt32BE(2) : Number(cdb.readBigUInt64BE(2));
        const count = op === 0x28 ? cdb.readUInt16BE(7) : cdb.readUInt32BE(10);
        if (lba + count > blocks) return sense(0x05, 0x21, 0x00);
        await Promise.resolve();
        const data = disk.subarray(lba * BLOCK, (lba + count) * BLOCK);
        if (this.readSegmentBytes === undefined) return { status: ScsiStatus.Good, dataIn: data };
        const segments: Buffer[] = [];
        for (let at = 0; at < data.length; at += this.readSegmentBytes) segments.push(data.subarray(at, at + this.readSegmentBytes));
        this.segmentedReads++;
        return {
          status: ScsiStatus.Good,
          dataInSegments: { segments, length: data.length, release: () => void this.segmentReleases++ },
        };
      }
      case 0x2a:
      case 0x8a: {
        const lba = op === 0x2a ? cdb.readUInt32BE(2) : Number(cdb.readBigUInt64BE(2));
        const count = op === 0x2a ? cdb.readUInt16BE(7) : cdb.readUInt32BE(10);
        const bytes = count * BLOCK;
        if (lba + count > blocks) return { ...sense(0x05, 0x21, 0x00), dataOutLength: bytes };
        const data = cmd.dataOut ?? Buffer.alloc(0);
        data.copy(disk, lba * BLOCK, 0, Math.min(bytes, data.length));
        return { status: ScsiStatus.Good, dataOutLength: bytes };
      }
      default:
        return sense(0x05, 0x20, 0x00);
    }
  }

  private reportLuns(cdb: Buffer): ScsiResult {
    const luns = this.lunNumbers();
    const d = Buffer.alloc(8 + luns.length * 8);
    d.writeUInt32BE(luns.length * 8, 0);
    luns.forEach((lun, i) => {
      d[8 + i * 8 + 1] = lun;
    });
    return { status: ScsiStatus.Good, dataIn: cut(d, cdb.readUInt32BE(6)) };
  }

  private inquiry(cdb: Buffer, lun: number): ScsiResult {
    const alloc = cdb.readUInt16BE(3);
    if (cdb[1]! & 1) {
      const page = cdb[2]!;
      let d: Buffer;
      if (page === 0x00) d = Buffer.from([0, 0, 0, 3, 0x00, 0x80, 0x83]);
      else if (page === 0x80) {
        const serial = Buffer.from(`MEM${lun.toString().padStart(5, '0')}`);
        d = Buffer.concat([Buffer.from([0, 0x80, 0, serial.length]), serial]);
      } else if (page === 0x83) {
        const naa = Buffer.from([0x60, 0x01, 0x40, 0x50, 0, 0, 0, lun]);
        d = Buffer.concat([Buffer.from([0, 0x83, 0, 12, 0x01, 0x03, 0x00, 0x08]), naa]);
      } else return sense(0x05, 0x24, 0x00);
      return { status: ScsiStatus.Good, dataIn: cut(d, alloc) };
    }
    if (cdb[2] !== 0) return sense(0x05, 0x24, 0x00);
    const d = Buffer.alloc(36, 0x20);
    d[0] = 0x00;
    d[1] = 0;
    d[2] = 0x05;
    d[3] = 0x02;
    d[4] = 31;
    d[5] = 0;
    d[6] = 0;
    d[7] = 0x02;
    d.write('BOOTRSTR', 8, 'ascii');
    d.write('MEMORY DISK', 16, 'ascii');
    d.write('0001', 32, 'ascii');
    return { status: ScsiStatus.Good, dataIn: cut(d, alloc) };
  }
}
