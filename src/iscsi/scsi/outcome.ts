/**
 * What a command handler returns: success (with optional Data-In) or a sense reason. Handlers
 * never build sense bytes or SCSI results themselves; the dispatcher in target.ts does.
 */

import type { SegmentedRead } from '../../block-device.js';
import { SenseReason, type FieldPointer } from './sense.js';

export interface Completed {
  readonly failure?: undefined;
  readonly dataIn?: Buffer;
  /** Data-In as slices the device keeps valid until released (READ from a device with readSegments). */
  readonly dataInSegments?: SegmentedRead;
  /** For Data-Out commands: bytes the CDB asked for (the transport reports residuals). */
  readonly dataOutLength?: number;
  /** CONDITION MET instead of GOOD (PRE-FETCH, SBC-3 5.9). */
  readonly conditionMet?: boolean;
}

export interface Failed {
  readonly failure: SenseReason;
  readonly information?: number;
  readonly field?: FieldPointer;
  readonly dataOutLength?: number;
}

export type Outcome = Completed | Failed;

export const GOOD: Completed = Object.freeze({});

export function completed(dataIn: Buffer): Completed {
  return { dataIn };
}

export function fail(reason: SenseReason, extra: { information?: number; field?: FieldPointer } = {}): Failed {
  return { failure: reason, ...extra };
}

/** INVALID FIELD IN CDB pointing at byte/bit of the CDB (SPC-4 4.5.2.4.2). */
export function invalidCdbField(byte: number, bit?: number): Failed {
  return bit === undefined
    ? { failure: SenseReason.InvalidFieldInCdb, field: { inCdb: true, byte } }
    : { failure: SenseReason.InvalidFieldInCdb, field: { inCdb: true, byte, bit } };
}

/** INVALID FIELD IN PARAMETER LIST pointing at byte/bit of the parameter data. */
export function invalidParameterField(byte: number, bit?: number): Failed {
  return bit === undefined
    ? { failure: SenseReason.InvalidFieldInParameterList, field: { inCdb: false, byte } }
    : { failure: SenseReason.InvalidFieldInParameterList, field: { inCdb: false, byte, bit } };
}

export const LBA_OUT_OF_RANGE: Failed = Object.freeze({ failure: SenseReason.LbaOutOfRange });
export const RESERVATION_CONFLICT: Failed = Object.freeze({ failure: SenseReason.ReservationConflict });
export const PARAMETER_LIST_LENGTH_ERROR: Failed = Object.freeze({ failure: SenseReason.ParameterListLengthError });

/** Cut Data-In to the CDB's allocation length (SPC-4 4.2.5.6). */
export function truncated(data: Buffer, allocationLength: number): Completed {
  return { dataIn: data.length > allocationLength ? data.subarray(0, allocationLength) : data };
}

/** Read a 64-bit big-endian field as a JS number (exact to 2^53; larger values stay larger than any device). */
export function readUInt64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}

export function writeUInt64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value % 2 ** 32, at + 4);
}
