/**
 * EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): block-to-block copies between
 * logical units of this target, named by identification CSCD descriptors (0xE4) that carry one of
 * our VPD 0x83 designators. Only the block → block segment descriptor (0x02) is supported.
 * Copies run in bounded pieces, each under the destination's LBA range lock.
 */

import type { CommandContext, LogicalUnit } from './logical-unit.js';
import {
  GOOD,
  PARAMETER_LIST_LENGTH_ERROR,
  fail,
  invalidCdbField,
  invalidParameterField,
  readUInt64,
  truncated,
  type Outcome,
} from './outcome.js';
import { ReservationAccess } from './persistent-reservations.js';
import { SenseReason } from './sense.js';

/** Limits reported by RECEIVE COPY RESULTS / OPERATING PARAMETERS (SPC-4 6.18.4). */
export const MAX_CSCD_DESCRIPTORS = 16;
export const MAX_SEGMENT_DESCRIPTORS = 64;
export const MAX_DESCRIPTOR_LIST_LENGTH = 4096;
/** Bytes moved per read/write while executing a segment. */
const COPY_PIECE_BYTES = 4 * 1024 * 1024;

const HEADER_LENGTH = 16;
const IDENTIFICATION_CSCD = 0xe4;
const BLOCK_TO_BLOCK_SEGMENT = 0x02;
const BLOCK_TO_BLOCK_LENGTH = 28;

/** Result of the last EXTENDED COPY per list identifier, kept for COPY STATUS (SPC-4 6.18.3). */
export interface CopyResult {
  readonly segmentsProcessed: number;
  readonly succeeded: boolean;
  readonly bytesTransferred: number;
}

/** Length of a CSCD descriptor by type code (SPC-4 table 111). */
function cscdLength(type: number): number | undefined {
  if (type >= 0xe0 && type <= 0xe9) return 32;
  if (type === 0xea || type === 0xeb) return 64;
  return undefined;
}

/** Length of a segment descriptor by type code (SPC-4 table 112), or undefined if unknown. */
function segmentLength(type: number, params: Buffer, at: number): number | undefined {
  if (type > 0x1f || at + 4 > params.length) return undefined;
  return 4 + params.readUInt16BE(at + 2);
}

const copyAborted = (): Outcome => fail(SenseReason.CopyTargetDeviceNotReachable);

/** The logical unit an identification CSCD descriptor names, by its VPD 0x83 designator. */
function findLogicalUnit(ctx: CommandContext, designation: Buffer): LogicalUnit | undefined {
  const codeSet = designation[0]! & 0x0f;
  const association = (designation[1]! >> 4) & 0x03;
  const type = designation[1]! & 0x0f;
  const length = Math.min(designation[3]!, 16);
  const value = designation.subarray(4, 4 + length);
  if (association !== 0) return undefined;
  const matches = (lu: LogicalUnit): boolean => {
    const identity = lu.device.identity;
    if (type === 3 && codeSet === 1) return identity.naa.equals(value);
    if (type === 1 && codeSet === 2) {
      const vendor = Buffer.alloc(8, 0x20);
      vendor.write(identity.vendor.slice(0, 8), 'ascii');
      const full = Buffer.concat([vendor, Buffer.from(identity.serial, 'ascii')]);
      return full.subarray(0, length).equals(value) && full.length === length;
    }
    return false;
  };
  // A designator shared by two LUs is a configuration error: refuse rather than guess.
  let found: LogicalUnit | undefined;
  for (const lu of ctx.target.logicalUnits()) {
    if (!matches(lu)) continue;
    if (found !== undefined) return undefined;
    found = lu;
  }
  return found;
}

function accessible(ctx: CommandContext, lu: LogicalUnit, access: ReservationAccess): boolean {
  if (lu.reservationHolder !== undefined && lu.reservationHolder !== ctx.session.nexus.key) return false;
  const pr = lu.persistentReservations;
  return pr.reservation === undefined || pr.allows(ctx.session.itNexusId, access);
}

interface Segment {
  readonly source: LogicalUnit;
  readonly destination: LogicalUnit;
  readonly blocks: number;
  readonly sourceLba: number;
  readonly destinationLba: number;
}

/** EXTENDED COPY(LID1) (SPC-4 6.4). */
export async function extendedCopy(ctx: CommandContext): Promise<Outcome> {
  const { cdb, session } = ctx;
  const parameterListLength = cdb.readUInt32BE(10);
  const dataOutLength = parameterListLength;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });
  if (parameterListLength === 0) return withLength(GOOD);
  const params = ctx.cmd.dataOut?.subarray(0, parameterListLength);
  if (params === undefined || params.length < parameterListLength || parameterListLength < HEADER_LENGTH) {
    return withLength(PARAMETER_LIST_LENGTH_ERROR);
  }
  const listId = params[0]!;
  const listIdUsage = (params[1]! >> 3) & 0x03;
  const cscdListLength = params.readUInt16BE(2);
  const segmentListLength = params.readUInt32BE(8);
  const inlineDataLength = params.readUInt32BE(12);
  if (inlineDataLength !== 0) return withLength(invalidParameterField(12));
  if (listIdUsage === 0x01) return withLength(invalidParameterField(1, 4));
  if (HEADER_LENGTH + cscdListLength + segmentListLength > parameterListLength) {
    return withLength(PARAMETER_LIST_LENGTH_ERROR);
  }
  if (cscdListLength + segmentListLength > MAX_DESCRIPTOR_LIST_LENGTH) return withLength(PARAMETER_LIST_LENGTH_ERROR);

  // CSCD descriptors (SPC-4 6.4.5): count and types first, then what they name.
  const cscds: Buffer[] = [];
  for (let at = HEADER_LENGTH; at < HEADER_LENGTH + cscdListLength; ) {
    const type = params[at]!;
    const length = cscdLength(type);
    if (length === undefined) return withLength(fail(SenseReason.UnsupportedTargetDescriptorType));
    if (at + length > HEADER_LENGTH + cscdListLength) return withLength(PARAMETER_LIST_LENGTH_ERROR);
    cscds.push(params.subarray(at, at + length));
    at += length;
  }
  if (cscds.length > MAX_CSCD_DESCRIPTORS) return withLength(fail(SenseReason.TooManyTargetDescriptors));
  const segmentStart = HEADER_LENGTH + cscdListLength;
  const rawSegments: Array<{ type: number; at: number; length: number }> = [];
  for (let at = segmentStart; at < segmentStart + segmentListLength; ) {
    const type = params[at]!;
    const length = segmentLength(type, params, at);
    if (length === undefined || at + length > segmentStart + segmentListLength) {
      return withLength(PARAMETER_LIST_LENGTH_ERROR);
    }
    rawSegments.push({ type, at, length });
    at += length;
  }
  if (rawSegments.length > MAX_SEGMENT_DESCRIPTORS) return withLength(fail(SenseReason.TooManySegmentDescriptors));
  for (const cscd of cscds) {
    if (cscd[0] !== IDENTIFICATION_CSCD) return withLength(fail(SenseReason.UnsupportedTargetDescriptorType));
  }
  for (const s of rawSegments) {
    if (s.type !== BLOCK_TO_BLOCK_SEGMENT) return withLength(fail(SenseReason.UnsupportedSegmentDescriptorType));
    if (s.length !== BLOCK_TO_BLOCK_LENGTH) return withLength(invalidParameterField(s.at + 2));
  }

  // Resolve each CSCD to a logical unit (6.4.5.6 identification descriptor).
  const units: Array<LogicalUnit | undefined> = [];
  for (let i = 0; i < cscds.length; i++) {
    const cscd = cscds[i]!;
    const at = HEADER_LENGTH + 32 * i;
    // Byte 1 bits 7-5 (SPC-3's LU ID TYPE and NUL) are reserved in SPC-4, which we claim: ignored,
    // as libiscsi's ValidTgtDescr expects of an SPC-4 device.
    if ((cscd[1]! & 0x1f) !== 0) return withLength(copyAborted()); // only direct-access devices
    const lu = findLogicalUnit(ctx, cscd.subarray(4, 24));
    if (lu === undefined) return withLength(copyAborted());
    const diskBlockLength = cscd.readUIntBE(29, 3);
    if (diskBlockLength !== lu.device.blockSize) return withLength(invalidParameterField(at + 29));
    units.push(lu);
  }

  const segments: Segment[] = [];
  for (const s of rawSegments) {
    const descriptor = params.subarray(s.at, s.at + s.length);
    if ((descriptor[1]! & 0x02) !== 0) return withLength(invalidParameterField(s.at + 1, 1)); // DC=1 unsupported
    const source = units[descriptor.readUInt16BE(4)];
    const destination = units[descriptor.readUInt16BE(6)];
    if (source === undefined || destination === undefined) return withLength(copyAborted());
    const blocks = descriptor.readUInt16BE(10);
    const sourceLba = readUInt64(descriptor, 12);
    const destinationLba = readUInt64(descriptor, 20);
    if (sourceLba + blocks > source.device.blockCount || destinationLba + blocks > destination.device.blockCount) {
      return withLength(copyAborted());
    }
    if (source.device.blockSize !== destination.device.blockSize) return withLength(copyAborted());
    if (!accessible(ctx, source, ReservationAccess.Read) || !accessible(ctx, destination, ReservationAccess.Write)) {
      return withLength(copyAborted());
    }
    const protection = destination.writeProtection();
    if (protection !== undefined) return withLength(fail(protection));
    segments.push({ source, destination, blocks, sourceLba, destinationLba });
  }

  let bytesTransferred = 0;
  let processed = 0;
  let succeeded = false;
  try {
    for (const segment of segments) {
      bytesTransferred += await copySegment(segment, ctx.cmd.signal);
      processed++;
    }
    succeeded = true;
    ctx.logger.debug({ lun: ctx.lu.lun, segments: segments.length, bytes: bytesTransferred }, 'extended copy done');
  } catch (err) {
    if (err instanceof CopyAborted) return withLength(fail(SenseReason.TaskAborted));
    throw err;
  } finally {
    if (listIdUsage === 0x00) {
      session.copyResults.set(listId, { segmentsProcessed: processed, succeeded, bytesTransferred });
    }
  }
  return withLength(GOOD);
}

/** The task was aborted (task management) between two pieces of a copy. */
class CopyAborted extends Error {}

async function copySegment(segment: Segment, signal: AbortSignal | undefined): Promise<number> {
  const { source, destination, blocks, sourceLba, destinationLba } = segment;
  if (blocks === 0) return 0;
  const blockSize = source.device.blockSize;
  const pieceBlocks = Math.max(1, Math.floor(COPY_PIECE_BYTES / blockSize));
  const offsets: number[] = [];
  for (let done = 0; done < blocks; done += pieceBlocks) offsets.push(done);
  // Overlapping forward copy on one LU: copy from the end so no source block is overwritten first.
  if (source === destination && destinationLba > sourceLba && destinationLba < sourceLba + blocks) offsets.reverse();
  for (const done of offsets) {
    if (signal?.aborted === true) throw new CopyAborted();
    const n = Math.min(pieceBlocks, blocks - done);
    const release = await destination.lock.acquire(destinationLba + done, n);
    try {
      const data = await source.device.read(sourceLba + done, n);
      await destination.device.write(destinationLba + done, data, { fua: !destination.mode.writeCacheEnabled });
    } finally {
      release();
    }
  }
  return blocks * blockSize;
}

/** RECEIVE COPY RESULTS (SPC-4 6.18): COPY STATUS(LID1) and OPERATING PARAMETERS. */
export function receiveCopyResults(ctx: CommandContext): Outcome {
  const { cdb } = ctx;
  const serviceAction = cdb[1]! & 0x1f;
  const allocationLength = cdb.readUInt32BE(10);
  if (serviceAction === 0x03) {
    const implemented = [BLOCK_TO_BLOCK_SEGMENT, IDENTIFICATION_CSCD];
    const data = Buffer.alloc(44 + implemented.length);
    data.writeUInt32BE(data.length - 4, 0); // AVAILABLE DATA
    data[4] = 0x01; // SNLID: list identifiers need not be unique when not held
    data.writeUInt16BE(MAX_CSCD_DESCRIPTORS, 8);
    data.writeUInt16BE(MAX_SEGMENT_DESCRIPTORS, 10);
    data.writeUInt32BE(MAX_DESCRIPTOR_LIST_LENGTH, 12);
    data.writeUInt32BE(0xffff * 512, 16); // MAXIMUM SEGMENT LENGTH (bytes)
    data.writeUInt32BE(0, 20); // MAXIMUM INLINE DATA LENGTH: no inline data
    data.writeUInt32BE(0, 24); // HELD DATA LIMIT
    data.writeUInt16BE(1, 36); // TOTAL CONCURRENT COPIES
    data[38] = 1; // MAXIMUM CONCURRENT COPIES
    data[39] = 9; // DATA SEGMENT GRANULARITY: 2^9 bytes
    data[43] = implemented.length;
    implemented.forEach((code, i) => (data[44 + i] = code));
    return truncated(data, allocationLength);
  }
  if (serviceAction === 0x00) {
    const result = ctx.session.copyResults.get(cdb[2]!);
    if (result === undefined) return invalidCdbField(2);
    const data = Buffer.alloc(12);
    data.writeUInt32BE(8, 0);
    data[4] = result.succeeded ? 0x01 : 0x02; // COPY MANAGER STATUS: completed / completed with error
    data.writeUInt16BE(result.segmentsProcessed, 5);
    data[7] = 0x00; // TRANSFER COUNT UNITS: bytes
    data.writeUInt32BE(Math.min(result.bytesTransferred, 0xffffffff), 8);
    return truncated(data, allocationLength);
  }
  return invalidCdbField(1, 4);
}

/** VPD 0x8F third-party copy page (SPC-4 7.8.17) with the Supported Commands descriptor. */
export function thirdPartyCopyPage(): Buffer {
  const commands = Buffer.from([0x83, 1, 0x00, 0x84, 2, 0x00, 0x03]);
  const bodyLength = 1 + commands.length;
  const padded = (bodyLength + 3) & ~3;
  const descriptor = Buffer.alloc(4 + padded);
  descriptor.writeUInt16BE(0x0001, 0); // SUPPORTED COMMANDS
  descriptor.writeUInt16BE(padded, 2);
  descriptor[4] = commands.length;
  commands.copy(descriptor, 5);
  const page = Buffer.alloc(4 + descriptor.length);
  page[1] = 0x8f;
  page.writeUInt16BE(descriptor.length, 2);
  descriptor.copy(page, 4);
  return page;
}
