/** Shared helpers for the SCSI layer unit tests: nexuses, CDB builders, result decoding. */

import { expect } from 'vitest';
import { silentLogger } from '../../../../src/log.js';
import { ScsiStatus, TaskAttribute, type Nexus, type ScsiResult } from '../../../../src/iscsi/scsi-port.js';
import { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import { parseSense, type DecodedSense } from '../../../../src/iscsi/scsi/sense.js';
import { MemoryDevice, type MemoryDeviceOptions } from '../../../helpers/memory-device.js';

let nexusCounter = 0;

export function makeNexus(initiatorName = 'iqn.2026-12.test:initiator-a', isid = '400001370000'): Nexus {
  nexusCounter++;
  return { initiatorName, isid, targetPortalGroupTag: 1, key: `nexus-${nexusCounter}` };
}

export interface Fixture {
  readonly target: ScsiTarget;
  readonly device: MemoryDevice;
  readonly nexus: Nexus;
}

/** A target with one LUN 0 backed by a MemoryDevice; the nexus's POWER ON UA already cleared. */
export async function makeFixture(options: Partial<MemoryDeviceOptions> = {}): Promise<Fixture> {
  const target = new ScsiTarget({ logger: silentLogger() });
  const device = new MemoryDevice({ blockCount: 2048, ...options });
  target.addLun(0, device);
  const nexus = makeNexus();
  target.nexusAdded(nexus);
  const first = await exec(target, nexus, cdb(0x00, 6));
  expectSense(first, 0x6, 0x29, 0x00);
  return { target, device, nexus };
}

/** A CDB of `length` bytes with opcode and then `fields` written at their offsets. */
export function cdb(opcode: number, length: number, fields: Array<[offset: number, bytes: number[] | Buffer]> = []): Buffer {
  const out = Buffer.alloc(Math.max(16, length));
  out[0] = opcode;
  for (const [offset, bytes] of fields) Buffer.from(bytes).copy(out, offset);
  return out;
}

export function be16(v: number): number[] {
  return [(v >> 8) & 0xff, v & 0xff];
}

export function be32(v: number): number[] {
  return [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

export function be64(v: number): number[] {
  return [...be32(Math.floor(v / 2 ** 32)), ...be32(v % 2 ** 32)];
}

export function read10(lba: number, blocks: number, flags = 0): Buffer {
  return cdb(0x28, 10, [[1, [flags]], [2, be32(lba)], [7, be16(blocks)]]);
}

export function write10(lba: number, blocks: number, flags = 0): Buffer {
  return cdb(0x2a, 10, [[1, [flags]], [2, be32(lba)], [7, be16(blocks)]]);
}

export function read16(lba: number, blocks: number): Buffer {
  return cdb(0x88, 16, [[2, be64(lba)], [10, be32(blocks)]]);
}

export function write16(lba: number, blocks: number, flags = 0): Buffer {
  return cdb(0x8a, 16, [[1, [flags]], [2, be64(lba)], [10, be32(blocks)]]);
}

export interface ExecOptions {
  readonly lun?: number;
  readonly dataOut?: Buffer;
  /** Expected data transfer length; defaults to dataOut's length or 64 KiB for reads. */
  readonly expectedDataLength?: number;
  readonly signal?: AbortSignal;
}

export function exec(target: ScsiTarget, nexus: Nexus, cdbBytes: Buffer, options: ExecOptions = {}): Promise<ScsiResult> {
  const edtl = options.expectedDataLength ?? options.dataOut?.length ?? 65536;
  return target.execute({
    nexus,
    lun: options.lun ?? 0,
    cdb: cdbBytes,
    taskAttribute: TaskAttribute.Simple,
    expectedDataLength: edtl,
    ...(options.dataOut !== undefined ? { dataOut: options.dataOut } : {}),
    ...(options.signal !== undefined ? { signal: options.signal } : {}),
  });
}

export function senseOf(result: ScsiResult): DecodedSense {
  expect(result.status).toBe(ScsiStatus.CheckCondition);
  expect(result.sense).toBeDefined();
  const decoded = parseSense(result.sense!);
  expect(decoded).toBeDefined();
  return decoded!;
}

export function expectSense(result: ScsiResult, key: number, asc: number, ascq: number): DecodedSense {
  const s = senseOf(result);
  expect({ key: s.key, asc: s.asc, ascq: s.ascq }).toEqual({ key, asc, ascq });
  return s;
}

export function expectGood(result: ScsiResult): ScsiResult {
  if (result.status !== ScsiStatus.Good) {
    const s = result.sense ? parseSense(result.sense) : undefined;
    throw new Error(`expected GOOD, got status ${result.status} sense ${JSON.stringify(s)}`);
  }
  return result;
}

export function filled(blocks: number, byte: number, blockSize = 512): Buffer {
  return Buffer.alloc(blocks * blockSize, byte);
}
