/**
 * Sense reasons and sense data (SPC-4 4.5). Handlers never build sense bytes: they return a
 * `SenseReason`; `senseCodeOf` maps it to status + key/ASC/ASCQ and `buildSense` encodes it in
 * fixed format (SPC-4 4.5.3) or descriptor format (SPC-4 4.5.2) when D_SENSE is set.
 */

import { ScsiStatus } from '../scsi-port.js';

/** Why a command did not complete with GOOD status. One entry of SENSE_CODES per value. */
export const enum SenseReason {
  NoSense = 0,
  InvalidOpcode,
  InvalidFieldInCdb,
  InvalidFieldInParameterList,
  ParameterListLengthError,
  LbaOutOfRange,
  LunNotSupported,
  SavingParametersNotSupported,
  InvalidReleaseOfPersistentReservation,
  MediumRemovalPrevented,
  WriteProtected,
  SoftwareWriteProtected,
  UnrecoveredReadError,
  WriteError,
  MiscompareDuringVerify,
  InternalTargetFailure,
  PowerOnReset,
  ScsiBusResetOccurred,
  LogicalUnitResetOccurred,
  ReportedLunsDataChanged,
  CapacityDataChanged,
  ModeParametersChanged,
  ReservationsPreempted,
  ReservationsReleased,
  RegistrationsPreempted,
  TooManyTargetDescriptors,
  UnsupportedTargetDescriptorType,
  TooManySegmentDescriptors,
  UnsupportedSegmentDescriptorType,
  CopyTargetDeviceNotReachable,
  SpaceAllocationFailedWriteProtect,
  /** Status RESERVATION CONFLICT, no sense data (SAM-5 5.3.1). */
  ReservationConflict,
  /** Status TASK ABORTED, no sense data. */
  TaskAborted,
}

export interface SenseCode {
  readonly status: ScsiStatus;
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
}

const check = (key: number, asc: number, ascq: number): SenseCode => ({
  status: ScsiStatus.CheckCondition,
  key,
  asc,
  ascq,
});

/** Sense keys (SPC-4 table 27). */
export const enum SenseKey {
  NoSense = 0x0,
  RecoveredError = 0x1,
  NotReady = 0x2,
  MediumError = 0x3,
  HardwareError = 0x4,
  IllegalRequest = 0x5,
  UnitAttention = 0x6,
  DataProtect = 0x7,
  CopyAborted = 0xa,
  AbortedCommand = 0xb,
  Miscompare = 0xe,
}

/** Indexed by SenseReason. ASC/ASCQ values from SPC-4 table D.1. */
const SENSE_CODES: readonly SenseCode[] = [
  /* NoSense */ check(SenseKey.NoSense, 0x00, 0x00),
  /* InvalidOpcode */ check(SenseKey.IllegalRequest, 0x20, 0x00),
  /* InvalidFieldInCdb */ check(SenseKey.IllegalRequest, 0x24, 0x00),
  /* InvalidFieldInParameterList */ check(SenseKey.IllegalRequest, 0x26, 0x00),
  /* ParameterListLengthError */ check(SenseKey.IllegalRequest, 0x1a, 0x00),
  /* LbaOutOfRange */ check(SenseKey.IllegalRequest, 0x21, 0x00),
  /* LunNotSupported */ check(SenseKey.IllegalRequest, 0x25, 0x00),
  /* SavingParametersNotSupported */ check(SenseKey.IllegalRequest, 0x39, 0x00),
  /* InvalidReleaseOfPersistentReservation */ check(SenseKey.IllegalRequest, 0x26, 0x04),
  /* MediumRemovalPrevented */ check(SenseKey.IllegalRequest, 0x53, 0x02),
  /* WriteProtected */ check(SenseKey.DataProtect, 0x27, 0x00),
  /* SoftwareWriteProtected */ check(SenseKey.DataProtect, 0x27, 0x02),
  /* UnrecoveredReadError */ check(SenseKey.MediumError, 0x11, 0x00),
  /* WriteError */ check(SenseKey.MediumError, 0x0c, 0x00),
  /* MiscompareDuringVerify */ check(SenseKey.Miscompare, 0x1d, 0x00),
  /* InternalTargetFailure */ check(SenseKey.HardwareError, 0x44, 0x00),
  /* PowerOnReset */ check(SenseKey.UnitAttention, 0x29, 0x00),
  /* ScsiBusResetOccurred */ check(SenseKey.UnitAttention, 0x29, 0x02),
  /* LogicalUnitResetOccurred (BUS DEVICE RESET FUNCTION OCCURRED) */ check(SenseKey.UnitAttention, 0x29, 0x03),
  /* ReportedLunsDataChanged */ check(SenseKey.UnitAttention, 0x3f, 0x0e),
  /* CapacityDataChanged */ check(SenseKey.UnitAttention, 0x2a, 0x09),
  /* ModeParametersChanged */ check(SenseKey.UnitAttention, 0x2a, 0x01),
  /* ReservationsPreempted */ check(SenseKey.UnitAttention, 0x2a, 0x03),
  /* ReservationsReleased */ check(SenseKey.UnitAttention, 0x2a, 0x04),
  /* RegistrationsPreempted */ check(SenseKey.UnitAttention, 0x2a, 0x05),
  /* TooManyTargetDescriptors */ check(SenseKey.IllegalRequest, 0x26, 0x06),
  /* UnsupportedTargetDescriptorType */ check(SenseKey.IllegalRequest, 0x26, 0x07),
  /* TooManySegmentDescriptors */ check(SenseKey.IllegalRequest, 0x26, 0x08),
  /* UnsupportedSegmentDescriptorType */ check(SenseKey.IllegalRequest, 0x26, 0x09),
  /* CopyTargetDeviceNotReachable */ check(SenseKey.CopyAborted, 0x0d, 0x02),
  /* SpaceAllocationFailedWriteProtect (SBC-3 4.7.3.7) */ check(SenseKey.DataProtect, 0x27, 0x07),
  /* ReservationConflict */ { status: ScsiStatus.ReservationConflict, key: 0, asc: 0, ascq: 0 },
  /* TaskAborted */ { status: ScsiStatus.TaskAborted, key: 0, asc: 0, ascq: 0 },
];

export function senseCodeOf(reason: SenseReason): SenseCode {
  const code = SENSE_CODES[reason];
  if (code === undefined) throw new RangeError(`no sense code for reason ${reason as number}`);
  return code;
}

/**
 * Sense-key specific field pointer (SPC-4 4.5.2.4.2): which CDB or parameter-list byte (and bit)
 * holds the invalid value.
 */
export interface FieldPointer {
  /** true: the field is in the CDB (C/D = 1); false: in the parameter list. */
  readonly inCdb: boolean;
  readonly byte: number;
  /** Bit 0..7 of the most significant bit of the field; undefined: whole byte (BPV = 0). */
  readonly bit?: number;
}

export interface SenseDetails {
  /** INFORMATION field (for example the miscompare offset); up to 2^53. */
  readonly information?: number;
  readonly field?: FieldPointer;
}

/** Length of fixed-format sense data we build (SPC-4 4.5.3: 18 bytes). */
export const FIXED_SENSE_LENGTH = 18;

function sksBytes(field: FieldPointer, out: Buffer, at: number): void {
  // SKSV=1, C/D, BPV, BIT POINTER; then FIELD POINTER (SPC-4 4.5.2.4.2).
  let b0 = 0x80;
  if (field.inCdb) b0 |= 0x40;
  if (field.bit !== undefined) b0 |= 0x08 | (field.bit & 0x07);
  out[at] = b0;
  out.writeUInt16BE(field.byte & 0xffff, at + 1);
}

/** Encode sense data for a CHECK CONDITION reason. */
export function buildSense(reason: SenseReason, details: SenseDetails = {}, descriptorFormat = false): Buffer {
  const code = senseCodeOf(reason);
  const { information, field } = details;
  if (!descriptorFormat) {
    const sense = Buffer.alloc(FIXED_SENSE_LENGTH);
    sense[0] = 0x70 | (information !== undefined ? 0x80 : 0); // current error, VALID if INFORMATION set
    sense[2] = code.key;
    if (information !== undefined) sense.writeUInt32BE(information > 0xffffffff ? 0xffffffff : information, 3);
    sense[7] = FIXED_SENSE_LENGTH - 8; // additional sense length
    sense[12] = code.asc;
    sense[13] = code.ascq;
    if (field !== undefined) sksBytes(field, sense, 15);
    return sense;
  }
  // Descriptor format (SPC-4 4.5.2): 8-byte header + information (4.5.2.2) + sense-key specific (4.5.2.4).
  const length = 8 + (information !== undefined ? 12 : 0) + (field !== undefined ? 8 : 0);
  const sense = Buffer.alloc(length);
  sense[0] = 0x72;
  sense[1] = code.key;
  sense[2] = code.asc;
  sense[3] = code.ascq;
  sense[7] = length - 8;
  let at = 8;
  if (information !== undefined) {
    sense[at] = 0x00;
    sense[at + 1] = 0x0a;
    sense[at + 2] = 0x80; // VALID
    sense.writeUInt32BE(Math.floor(information / 2 ** 32), at + 4);
    sense.writeUInt32BE(information % 2 ** 32, at + 8);
    at += 12;
  }
  if (field !== undefined) {
    sense[at] = 0x02;
    sense[at + 1] = 0x06;
    sksBytes(field, sense, at + 4);
  }
  return sense;
}

/** Decoded sense (for REQUEST SENSE bookkeeping and tests). */
export interface DecodedSense {
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
  readonly information?: number;
  readonly field?: FieldPointer;
}

/** Parse fixed- or descriptor-format sense data; undefined if it is neither. */
export function parseSense(sense: Buffer): DecodedSense | undefined {
  if (sense.length < 8) return undefined;
  const responseCode = sense[0]! & 0x7f;
  const readSks = (at: number): FieldPointer | undefined => {
    const b0 = sense[at]!;
    if ((b0 & 0x80) === 0) return undefined;
    const bit = (b0 & 0x08) !== 0 ? b0 & 0x07 : undefined;
    return bit === undefined
      ? { inCdb: (b0 & 0x40) !== 0, byte: sense.readUInt16BE(at + 1) }
      : { inCdb: (b0 & 0x40) !== 0, byte: sense.readUInt16BE(at + 1), bit };
  };
  if (responseCode === 0x70 || responseCode === 0x71) {
    if (sense.length < 14) return undefined;
    const info = (sense[0]! & 0x80) !== 0 ? sense.readUInt32BE(3) : undefined;
    const field = sense.length >= 18 ? readSks(15) : undefined;
    return {
      key: sense[2]! & 0x0f,
      asc: sense[12]!,
      ascq: sense[13]!,
      ...(info !== undefined ? { information: info } : {}),
      ...(field !== undefined ? { field } : {}),
    };
  }
  if (responseCode === 0x72 || responseCode === 0x73) {
    let information: number | undefined;
    let field: FieldPointer | undefined;
    const end = Math.min(sense.length, 8 + sense[7]!);
    for (let at = 8; at + 2 <= end; at += 2 + sense[at + 1]!) {
      const type = sense[at]!;
      if (type === 0x00 && at + 12 <= end) information = sense.readUInt32BE(at + 4) * 2 ** 32 + sense.readUInt32BE(at + 8);
      if (type === 0x02 && at + 8 <= end) field = readSks(at + 4);
    }
    return {
      key: sense[1]! & 0x0f,
      asc: sense[2]!,
      ascq: sense[3]!,
      ...(information !== undefined ? { information } : {}),
      ...(field !== undefined ? { field } : {}),
    };
  }
  return undefined;
}
