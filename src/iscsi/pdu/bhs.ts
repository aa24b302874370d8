/**
 * Basic Header Segment layouts (RFC 7143 §11). Every PDU is a 48-byte BHS, optional AHS, optional
 * header digest, a data segment padded to 4 bytes, optional data digest (§11.1).
 * Decoders read from a BHS view; encoders fill a fresh or caller-provided 48-byte buffer.
 * Initiator-side encoders exist too: tests and tools build requests with them.
 */
import { AhsType, BHS_LENGTH, Opcode, RESERVED_TAG } from './opcodes.js';

/** One received PDU: views into the receive buffer, valid until the caller lets go of them. */
export interface Pdu {
  /** The 48-byte BHS. */
  readonly bhs: Buffer;
  /** All AHS bytes (TotalAHSLength * 4), or an empty buffer. */
  readonly ahs: Buffer;
  /** The data segment without padding. */
  readonly data: Buffer;
}

// ---- fields common to all PDUs (§11.2.1) ----

export function opcodeOf(bhs: Buffer): number {
  return bhs[0]! & 0x3f;
}
export function isImmediate(bhs: Buffer): boolean {
  return (bhs[0]! & 0x40) !== 0;
}
export function isFinal(bhs: Buffer): boolean {
  return (bhs[1]! & 0x80) !== 0;
}
export function totalAhsBytes(bhs: Buffer): number {
  return bhs[4]! * 4;
}
export function dataSegmentLength(bhs: Buffer): number {
  return (bhs[5]! << 16) | (bhs[6]! << 8) | bhs[7]!;
}
export function initiatorTaskTag(bhs: Buffer): number {
  return bhs.readUInt32BE(16);
}
export function setDataSegmentLength(bhs: Buffer, length: number): void {
  bhs[5] = (length >>> 16) & 0xff;
  bhs[6] = (length >>> 8) & 0xff;
  bhs[7] = length & 0xff;
}
export function padLength(length: number): number {
  return (4 - (length & 3)) & 3;
}

function newBhs(opcode: number, immediate: boolean, flags: number): Buffer {
  const bhs = Buffer.alloc(BHS_LENGTH);
  bhs[0] = (immediate ? 0x40 : 0) | (opcode & 0x3f);
  bhs[1] = flags & 0xff;
  return bhs;
}

// ---- LUN (SAM-5 4.7): 8 bytes; peripheral (00b) and flat (01b) single-level addressing ----

/** Value for LUN fields that cannot name a present LU (other methods, multi-level, bus ≠ 0). */
export const UNSUPPORTED_LUN = 0xffffffff;

export function decodeLun(bhs: Buffer, offset = 8): number {
  const b0 = bhs[offset]!;
  const b1 = bhs[offset + 1]!;
  for (let i = 2; i < 8; i++) if (bhs[offset + i] !== 0) return UNSUPPORTED_LUN;
  const method = b0 >>> 6;
  if (method === 0) return b0 === 0 ? b1 : UNSUPPORTED_LUN; // peripheral, bus 0
  if (method === 1) return ((b0 & 0x3f) << 8) | b1; // flat space
  return UNSUPPORTED_LUN;
}

/** Encode a LUN number as SAM single-level LUN (peripheral below 256, flat up to 16383). */
export function encodeLun(lun: number, target: Buffer, offset = 8): void {
  target.fill(0, offset, offset + 8);
  if (lun < 256) target[offset + 1] = lun;
  else {
    target[offset] = 0x40 | ((lun >>> 8) & 0x3f);
    target[offset + 1] = lun & 0xff;
  }
}

// ---- Initiator → target PDUs ----

export interface ScsiCommandFields {
  readonly immediate: boolean;
  /** F: no unsolicited Data-Out PDUs follow (§11.3.1). */
  readonly final: boolean;
  readonly read: boolean;
  readonly write: boolean;
  readonly taskAttribute: number;
  readonly lun: number;
  readonly itt: number;
  readonly expectedDataLength: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
  /** The full CDB: BHS bytes 32-47 plus the Extended CDB AHS (§11.3.5). */
  readonly cdb: Buffer;
  /** Bidirectional Read Data Length AHS value, if present (§11.2.2.3). */
  readonly bidiReadLength: number | undefined;
}

export class AhsError extends Error {}

/** Decode a SCSI Command PDU (§11.3). Throws AhsError on a malformed AHS. */
export function decodeScsiCommand(pdu: Pdu): ScsiCommandFields {
  const { bhs, ahs } = pdu;
  let cdb = bhs.subarray(32, 48);
  let bidiReadLength: number | undefined;
  let off = 0;
  while (off < ahs.length) {
    if (off + 4 > ahs.length) throw new AhsError('truncated AHS header');
    const len = ahs.readUInt16BE(off);
    const type = ahs[off + 2]!;
    const end = off + 3 + len;
    if (len === 0 || end > ahs.length) throw new AhsError(`AHS length ${len} exceeds TotalAHSLength`);
    if (type === AhsType.ExtendedCdb) {
      // AHSLength counts the reserved byte plus CDB bytes beyond 16.
      const ext = ahs.subarray(off + 4, end);
      const full = Buffer.allocUnsafe(16 + ext.length);
      bhs.copy(full, 0, 32, 48);
      ext.copy(full, 16);
      cdb = full;
    } else if (type === AhsType.BidirectionalReadDataLength) {
      if (len !== 5) throw new AhsError('Bidirectional Read Data Length AHS must have AHSLength 5');
      bidiReadLength = ahs.readUInt32BE(off + 4);
    } else {
      throw new AhsError(`unknown AHS type ${type}`);
    }
    off = end + padLength(3 + len);
  }
  return {
    immediate: isImmediate(bhs),
    final: isFinal(bhs),
    read: (bhs[1]! & 0x40) !== 0,
    write: (bhs[1]! & 0x20) !== 0,
    taskAttribute: bhs[1]! & 0x07,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    expectedDataLength: bhs.readUInt32BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
    cdb,
    bidiReadLength,
  };
}

export interface EncodedPdu {
  readonly bhs: Buffer;
  readonly ahs?: Buffer;
}

export function encodeScsiCommand(f: Omit<ScsiCommandFields, 'bidiReadLength'> & { bidiReadLength?: number }): EncodedPdu {
  const flags = (f.final ? 0x80 : 0) | (f.read ? 0x40 : 0) | (f.write ? 0x20 : 0) | (f.taskAttribute & 7);
  const bhs = newBhs(Opcode.ScsiCommand, f.immediate, flags);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.expectedDataLength >>> 0, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  f.cdb.copy(bhs, 32, 0, Math.min(16, f.cdb.length));
  const parts: Buffer[] = [];
  if (f.cdb.length > 16) {
    const extLen = f.cdb.length - 16;
    const seg = Buffer.alloc(4 + extLen + padLength(3 + extLen + 1));
    seg.writeUInt16BE(extLen + 1, 0);
    seg[2] = AhsType.ExtendedCdb;
    f.cdb.copy(seg, 4, 16);
    parts.push(seg);
  }
  if (f.bidiReadLength !== undefined) {
    const seg = Buffer.alloc(8);
    seg.writeUInt16BE(5, 0);
    seg[2] = AhsType.BidirectionalReadDataLength;
    seg.writeUInt32BE(f.bidiReadLength, 4);
    parts.push(seg);
  }
  if (parts.length === 0) return { bhs };
  const ahs = Buffer.concat(parts);
  bhs[4] = ahs.length / 4;
  return { bhs, ahs };
}

export interface NopOutFields {
  readonly immediate: boolean;
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
}

export function decodeNopOut(bhs: Buffer): NopOutFields {
  return {
    immediate: isImmediate(bhs),
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
  };
}

export function encodeNopOut(f: NopOutFields): Buffer {
  const bhs = newBhs(Opcode.NopOut, f.immediate, 0x80);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  return bhs;
}

export interface TaskManagementRequestFields {
  readonly immediate: boolean;
  readonly function: number;
  readonly lun: number;
  readonly itt: number;
  readonly referencedTaskTag: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
  readonly refCmdSN: number;
  readonly expDataSN: number;
}

export function decodeTaskManagementRequest(bhs: Buffer): TaskManagementRequestFields {
  return {
    immediate: isImmediate(bhs),
    function: bhs[1]! & 0x7f,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    referencedTaskTag: bhs.readUInt32BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
    refCmdSN: bhs.readUInt32BE(32),
    expDataSN: bhs.readUInt32BE(36),
  };
}

export function encodeTaskManagementRequest(f: TaskManagementRequestFields): Buffer {
  const bhs = newBhs(Opcode.TaskManagementRequest, f.immediate, 0x80 | (f.function & 0x7f));
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.referencedTaskTag >>> 0, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  bhs.writeUInt32BE(f.refCmdSN >>> 0, 32);
  bhs.writeUInt32BE(f.expDataSN >>> 0, 36);
  return bhs;
}

/** Login stages (§11.12.3): CSG / NSG values. */
export const enum LoginStage {
  Security = 0,
  Operational = 1,
  FullFeature = 3,
}

export interface LoginRequestFields {
  /** T: the initiator is ready to transit to NSG. */
  readonly transit: boolean;
  /** C: the text is continued in the next PDU. */
  readonly continue: boolean;
  readonly csg: number;
  readonly nsg: number;
  readonly versionMax: number;
  readonly versionMin: number;
  /** ISID as 12 lowercase hex digits. */
  readonly isid: string;
  readonly tsih: number;
  readonly itt: number;
  readonly cid: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
}

export function decodeLoginRequest(bhs: Buffer): LoginRequestFields {
  const b1 = bhs[1]!;
  return {
    transit: (b1 & 0x80) !== 0,
    continue: (b1 & 0x40) !== 0,
    csg: (b1 >>> 2) & 3,
    nsg: b1 & 3,
    versionMax: bhs[2]!,
    versionMin: bhs[3]!,
    isid: bhs.toString('hex', 8, 14),
    tsih: bhs.readUInt16BE(14),
    itt: bhs.readUInt32BE(16),
    cid: bhs.readUInt16BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
  };
}

export function encodeLoginRequest(f: LoginRequestFields): Buffer {
  const flags = (f.transit ? 0x80 : 0) | (f.continue ? 0x40 : 0) | ((f.csg & 3) << 2) | (f.transit ? f.nsg & 3 : 0);
  const bhs = newBhs(Opcode.LoginRequest, true, flags);
  bhs[2] = f.versionMax;
  bhs[3] = f.versionMin;
  Buffer.from(f.isid.padStart(12, '0'), 'hex').copy(bhs, 8);
  bhs.writeUInt16BE(f.tsih, 14);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt16BE(f.cid, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  return bhs;
}

export interface TextRequestFields {
  readonly immediate: boolean;
  readonly final: boolean;
  readonly continue: boolean;
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
}

export function decodeTextRequest(bhs: Buffer): TextRequestFields {
  return {
    immediate: isImmediate(bhs),
    final: isFinal(bhs),
    continue: (bhs[1]! & 0x40) !== 0,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
  };
}

export function encodeTextRequest(f: TextRequestFields): Buffer {
  const bhs = newBhs(Opcode.TextRequest, f.immediate, (f.final ? 0x80 : 0) | (f.continue ? 0x40 : 0));
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  return bhs;
}

export interface DataOutFields {
  readonly final: boolean;
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
  readonly expStatSN: number;
  readonly dataSN: number;
  readonly bufferOffset: number;
}

export function decodeDataOut(bhs: Buffer): DataOutFields {
  return {
    final: isFinal(bhs),
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    expStatSN: bhs.readUInt32BE(28),
    dataSN: bhs.readUInt32BE(36),
    bufferOffset: bhs.readUInt32BE(40),
  };
}

export function encodeDataOut(f: DataOutFields): Buffer {
  const bhs = newBhs(Opcode.DataOut, false, f.final ? 0x80 : 0);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  bhs.writeUInt32BE(f.dataSN >>> 0, 36);
  bhs.writeUInt32BE(f.bufferOffset >>> 0, 40);
  return bhs;
}

export interface LogoutRequestFields {
  readonly immediate: boolean;
  readonly reason: number;
  readonly itt: number;
  readonly cid: number;
  readonly cmdSN: number;
  readonly expStatSN: number;
}

export function decodeLogoutRequest(bhs: Buffer): LogoutRequestFields {
  return {
    immediate: isImmediate(bhs),
    reason: bhs[1]! & 0x7f,
    itt: bhs.readUInt32BE(16),
    cid: bhs.readUInt16BE(20),
    cmdSN: bhs.readUInt32BE(24),
    expStatSN: bhs.readUInt32BE(28),
  };
}

export function encodeLogoutRequest(f: LogoutRequestFields): Buffer {
  const bhs = newBhs(Opcode.LogoutRequest, f.immediate, 0x80 | (f.reason & 0x7f));
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt16BE(f.cid, 20);
  bhs.writeUInt32BE(f.cmdSN >>> 0, 24);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  return bhs;
}

export interface SnackFields {
  readonly type: number;
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
  readonly expStatSN: number;
  readonly begRun: number;
  readonly runLength: number;
}

export function decodeSnack(bhs: Buffer): SnackFields {
  return {
    type: bhs[1]! & 0x0f,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    expStatSN: bhs.readUInt32BE(28),
    begRun: bhs.readUInt32BE(40),
    runLength: bhs.readUInt32BE(44),
  };
}

export function encodeSnack(f: SnackFields): Buffer {
  const bhs = newBhs(Opcode.Snack, false, 0x80 | (f.type & 0x0f));
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  bhs.writeUInt32BE(f.expStatSN >>> 0, 28);
  bhs.writeUInt32BE(f.begRun >>> 0, 40);
  bhs.writeUInt32BE(f.runLength >>> 0, 44);
  return bhs;
}

// ---- Target → initiator PDUs ----
// Sequence fields every target PDU carries at 24/28/32: StatSN, ExpCmdSN, MaxCmdSN.

export interface SequenceNumbers {
  readonly statSN: number;
  readonly expCmdSN: number;
  readonly maxCmdSN: number;
}

function writeSequence(bhs: Buffer, s: SequenceNumbers): void {
  bhs.writeUInt32BE(s.statSN >>> 0, 24);
  bhs.writeUInt32BE(s.expCmdSN >>> 0, 28);
  bhs.writeUInt32BE(s.maxCmdSN >>> 0, 32);
}

export function decodeSequence(bhs: Buffer): SequenceNumbers {
  return { statSN: bhs.readUInt32BE(24), expCmdSN: bhs.readUInt32BE(28), maxCmdSN: bhs.readUInt32BE(32) };
}

export interface NopInFields extends SequenceNumbers {
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
}

export function encodeNopIn(f: NopInFields): Buffer {
  const bhs = newBhs(Opcode.NopIn, false, 0x80);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  writeSequence(bhs, f);
  return bhs;
}

export function decodeNopIn(bhs: Buffer): NopInFields {
  return { lun: decodeLun(bhs), itt: bhs.readUInt32BE(16), ttt: bhs.readUInt32BE(20), ...decodeSequence(bhs) };
}

/** Residual flags shared by SCSI Response and Data-In (§11.4.5). */
export interface ResidualFields {
  readonly overflow: boolean;
  readonly underflow: boolean;
  readonly residualCount: number;
}

export interface ScsiResponseFields extends SequenceNumbers, ResidualFields {
  /** 0x00 command completed at target, 0x01 target failure (§11.4.3). */
  readonly response: number;
  readonly status: number;
  readonly itt: number;
  readonly expDataSN: number;
  readonly bidiOverflow?: boolean;
  readonly bidiUnderflow?: boolean;
  readonly bidiReadResidualCount?: number;
}

export function encodeScsiResponse(f: ScsiResponseFields): Buffer {
  const flags =
    0x80 |
    (f.bidiOverflow ? 0x10 : 0) |
    (f.bidiUnderflow ? 0x08 : 0) |
    (f.overflow ? 0x04 : 0) |
    (f.underflow ? 0x02 : 0);
  const bhs = newBhs(Opcode.ScsiResponse, false, flags);
  bhs[2] = f.response;
  bhs[3] = f.status;
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  writeSequence(bhs, f);
  bhs.writeUInt32BE(f.expDataSN >>> 0, 36);
  bhs.writeUInt32BE((f.bidiReadResidualCount ?? 0) >>> 0, 40);
  bhs.writeUInt32BE(f.residualCount >>> 0, 44);
  return bhs;
}

export function decodeScsiResponse(bhs: Buffer): ScsiResponseFields {
  const b1 = bhs[1]!;
  return {
    bidiOverflow: (b1 & 0x10) !== 0,
    bidiUnderflow: (b1 & 0x08) !== 0,
    overflow: (b1 & 0x04) !== 0,
    underflow: (b1 & 0x02) !== 0,
    response: bhs[2]!,
    status: bhs[3]!,
    itt: bhs.readUInt32BE(16),
    ...decodeSequence(bhs),
    expDataSN: bhs.readUInt32BE(36),
    bidiReadResidualCount: bhs.readUInt32BE(40),
    residualCount: bhs.readUInt32BE(44),
  };
}

export interface DataInFields extends ResidualFields {
  readonly final: boolean;
  /** S: status is in this PDU (phase collapse, §11.7.1). */
  readonly hasStatus: boolean;
  readonly status: number;
  readonly lun: number;
  readonly itt: number;
  readonly statSN: number;
  readonly expCmdSN: number;
  readonly maxCmdSN: number;
  readonly dataSN: number;
  readonly bufferOffset: number;
}

/** Fill a Data-In BHS into `bhs` (48 bytes, any prior content). */
export function encodeDataInInto(bhs: Buffer, f: DataInFields): void {
  bhs.fill(0, 0, BHS_LENGTH);
  bhs[0] = Opcode.DataIn;
  bhs[1] =
    (f.final ? 0x80 : 0) | (f.hasStatus ? (f.overflow ? 0x04 : 0) | (f.underflow ? 0x02 : 0) | 0x01 : 0);
  if (f.hasStatus) bhs[3] = f.status;
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(RESERVED_TAG, 20);
  if (f.hasStatus) bhs.writeUInt32BE(f.statSN >>> 0, 24);
  bhs.writeUInt32BE(f.expCmdSN >>> 0, 28);
  bhs.writeUInt32BE(f.maxCmdSN >>> 0, 32);
  bhs.writeUInt32BE(f.dataSN >>> 0, 36);
  bhs.writeUInt32BE(f.bufferOffset >>> 0, 40);
  if (f.hasStatus) bhs.writeUInt32BE(f.residualCount >>> 0, 44);
}

export function decodeDataIn(bhs: Buffer): DataInFields {
  const b1 = bhs[1]!;
  return {
    final: (b1 & 0x80) !== 0,
    hasStatus: (b1 & 0x01) !== 0,
    overflow: (b1 & 0x04) !== 0,
    underflow: (b1 & 0x02) !== 0,
    status: bhs[3]!,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    statSN: bhs.readUInt32BE(24),
    expCmdSN: bhs.readUInt32BE(28),
    maxCmdSN: bhs.readUInt32BE(32),
    dataSN: bhs.readUInt32BE(36),
    bufferOffset: bhs.readUInt32BE(40),
    residualCount: bhs.readUInt32BE(44),
  };
}

export interface ReadyToTransferFields extends SequenceNumbers {
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
  readonly r2tSN: number;
  readonly bufferOffset: number;
  readonly desiredLength: number;
}

export function encodeReadyToTransfer(f: ReadyToTransferFields): Buffer {
  const bhs = newBhs(Opcode.ReadyToTransfer, false, 0x80);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  writeSequence(bhs, f);
  bhs.writeUInt32BE(f.r2tSN >>> 0, 36);
  bhs.writeUInt32BE(f.bufferOffset >>> 0, 40);
  bhs.writeUInt32BE(f.desiredLength >>> 0, 44);
  return bhs;
}

export function decodeReadyToTransfer(bhs: Buffer): ReadyToTransferFields {
  return {
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    ...decodeSequence(bhs),
    r2tSN: bhs.readUInt32BE(36),
    bufferOffset: bhs.readUInt32BE(40),
    desiredLength: bhs.readUInt32BE(44),
  };
}

export interface TaskManagementResponseFields extends SequenceNumbers {
  readonly response: number;
  readonly itt: number;
}

export function encodeTaskManagementResponse(f: TaskManagementResponseFields): Buffer {
  const bhs = newBhs(Opcode.TaskManagementResponse, false, 0x80);
  bhs[2] = f.response;
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  writeSequence(bhs, f);
  return bhs;
}

export function decodeTaskManagementResponse(bhs: Buffer): TaskManagementResponseFields {
  return { response: bhs[2]!, itt: bhs.readUInt32BE(16), ...decodeSequence(bhs) };
}

export interface LoginResponseFields extends SequenceNumbers {
  readonly transit: boolean;
  readonly continue: boolean;
  readonly csg: number;
  readonly nsg: number;
  readonly versionMax: number;
  readonly versionActive: number;
  readonly isid: string;
  readonly tsih: number;
  readonly itt: number;
  readonly statusClass: number;
  readonly statusDetail: number;
}

export function encodeLoginResponse(f: LoginResponseFields): Buffer {
  const flags = (f.transit ? 0x80 : 0) | (f.continue ? 0x40 : 0) | ((f.csg & 3) << 2) | (f.transit ? f.nsg & 3 : 0);
  const bhs = newBhs(Opcode.LoginResponse, false, flags);
  bhs[2] = f.versionMax;
  bhs[3] = f.versionActive;
  Buffer.from(f.isid.padStart(12, '0').slice(0, 12), 'hex').copy(bhs, 8);
  bhs.writeUInt16BE(f.tsih, 14);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  writeSequence(bhs, f);
  bhs[36] = f.statusClass;
  bhs[37] = f.statusDetail;
  return bhs;
}

export function decodeLoginResponse(bhs: Buffer): LoginResponseFields {
  const b1 = bhs[1]!;
  return {
    transit: (b1 & 0x80) !== 0,
    continue: (b1 & 0x40) !== 0,
    csg: (b1 >>> 2) & 3,
    nsg: b1 & 3,
    versionMax: bhs[2]!,
    versionActive: bhs[3]!,
    isid: bhs.toString('hex', 8, 14),
    tsih: bhs.readUInt16BE(14),
    itt: bhs.readUInt32BE(16),
    ...decodeSequence(bhs),
    statusClass: bhs[36]!,
    statusDetail: bhs[37]!,
  };
}

export interface TextResponseFields extends SequenceNumbers {
  readonly final: boolean;
  readonly continue: boolean;
  readonly lun: number;
  readonly itt: number;
  readonly ttt: number;
}

export function encodeTextResponse(f: TextResponseFields): Buffer {
  const bhs = newBhs(Opcode.TextResponse, false, (f.final ? 0x80 : 0) | (f.continue ? 0x40 : 0));
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  bhs.writeUInt32BE(f.ttt >>> 0, 20);
  writeSequence(bhs, f);
  return bhs;
}

export function decodeTextResponse(bhs: Buffer): TextResponseFields {
  return {
    final: isFinal(bhs),
    continue: (bhs[1]! & 0x40) !== 0,
    lun: decodeLun(bhs),
    itt: bhs.readUInt32BE(16),
    ttt: bhs.readUInt32BE(20),
    ...decodeSequence(bhs),
  };
}

export interface LogoutResponseFields extends SequenceNumbers {
  readonly response: number;
  readonly itt: number;
  readonly time2Wait: number;
  readonly time2Retain: number;
}

export function encodeLogoutResponse(f: LogoutResponseFields): Buffer {
  const bhs = newBhs(Opcode.LogoutResponse, false, 0x80);
  bhs[2] = f.response;
  bhs.writeUInt32BE(f.itt >>> 0, 16);
  writeSequence(bhs, f);
  bhs.writeUInt16BE(f.time2Wait, 40);
  bhs.writeUInt16BE(f.time2Retain, 42);
  return bhs;
}

export function decodeLogoutResponse(bhs: Buffer): LogoutResponseFields {
  return {
    response: bhs[2]!,
    itt: bhs.readUInt32BE(16),
    ...decodeSequence(bhs),
    time2Wait: bhs.readUInt16BE(40),
    time2Retain: bhs.readUInt16BE(42),
  };
}

export interface RejectFields extends SequenceNumbers {
  readonly reason: number;
  readonly dataSNOrR2TSN: number;
}

/** Reject (§11.17): the data segment carries the rejected PDU's BHS. */
export function encodeReject(f: RejectFields): Buffer {
  const bhs = newBhs(Opcode.Reject, false, 0x80);
  bhs[2] = f.reason;
  bhs.writeUInt32BE(RESERVED_TAG, 16);
  writeSequence(bhs, f);
  bhs.writeUInt32BE(f.dataSNOrR2TSN >>> 0, 36);
  return bhs;
}

export function decodeReject(bhs: Buffer): RejectFields {
  return { reason: bhs[2]!, ...decodeSequence(bhs), dataSNOrR2TSN: bhs.readUInt32BE(36) };
}

export interface AsyncMessageFields extends SequenceNumbers {
  readonly lun: number;
  readonly asyncEvent: number;
  readonly asyncVCode: number;
  readonly parameter1: number;
  readonly parameter2: number;
  readonly parameter3: number;
}

export function encodeAsyncMessage(f: AsyncMessageFields): Buffer {
  const bhs = newBhs(Opcode.AsyncMessage, false, 0x80);
  encodeLun(f.lun, bhs);
  bhs.writeUInt32BE(RESERVED_TAG, 16);
  writeSequence(bhs, f);
  bhs[36] = f.asyncEvent;
  bhs[37] = f.asyncVCode;
  bhs.writeUInt16BE(f.parameter1, 38);
  bhs.writeUInt16BE(f.parameter2, 40);
  bhs.writeUInt16BE(f.parameter3, 42);
  return bhs;
}

export function decodeAsyncMessage(bhs: Buffer): AsyncMessageFields {
  return {
    lun: decodeLun(bhs),
    ...decodeSequence(bhs),
    asyncEvent: bhs[36]!,
    asyncVCode: bhs[37]!,
    parameter1: bhs.readUInt16BE(38),
    parameter2: bhs.readUInt16BE(40),
    parameter3: bhs.readUInt16BE(42),
  };
}
