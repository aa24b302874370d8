/**
 * SBC-3 block commands: READ / WRITE / WRITE AND VERIFY / VERIFY (6/10/12/16), READ CAPACITY,
 * SYNCHRONIZE CACHE, PRE-FETCH, WRITE SAME, UNMAP, GET LBA STATUS, COMPARE AND WRITE, ORWRITE,
 * READ DEFECT DATA.
 *
 * Short Data-Out (the initiator's Expected Data Transfer Length is less than the CDB asks for):
 * libiscsi's iSCSIResiduals tests expect the command to succeed with a residual overflow and only
 * the whole blocks that actually arrived to be written, the rest of the range left untouched. We
 * do exactly that; the transport reports the residual from `dataOutLength`.
 */

import type { LbaRange, SegmentedRead } from '../../block-device.js';
import {
  MAX_COMPARE_AND_WRITE_BLOCKS,
  MAX_UNMAP_BLOCKS,
  MAX_UNMAP_DESCRIPTORS,
  MAX_WRITE_SAME_BLOCKS,
  WRITE_SAME_BATCH_BYTES,
  type CommandContext,
} from './logical-unit.js';
import {
  GOOD,
  LBA_OUT_OF_RANGE,
  PARAMETER_LIST_LENGTH_ERROR,
  fail,
  invalidCdbField,
  invalidParameterField,
  readUInt64,
  truncated,
  writeUInt64,
  type Outcome,
} from './outcome.js';
import { SenseReason } from './sense.js';
import type { ReleaseLock } from './range-lock.js';

/** Offset of the first differing byte, or -1. */
function firstDifference(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** FUA requested, or write cache disabled (WCE=0) in the caching mode page. */
function forceUnitAccess(ctx: CommandContext, fuaBit: boolean): boolean {
  return fuaBit || !ctx.lu.mode.writeCacheEnabled;
}

const dataInOutcome = (dataIn: Buffer): Outcome => ({ dataIn });
const segmentedOutcome = (dataInSegments: SegmentedRead): Outcome => ({ dataInSegments });

/**
 * READ(6/10/12/16) (SBC-3 5.8-5.11). `lengthByte`: where TRANSFER LENGTH starts, for the field pointer.
 * Not async: a refused READ completes synchronously, a good one costs one promise beyond the device's.
 */
export function read(ctx: CommandContext, lba: number, blocks: number, lengthByte: number): Outcome | Promise<Outcome> {
  const lu = ctx.lu;
  const device = lu.device;
  if (lba + blocks > device.blockCount) return LBA_OUT_OF_RANGE;
  if (blocks > lu.maxTransferBlocks) return invalidCdbField(lengthByte);
  if (blocks === 0) return GOOD;
  // Zero-copy where the device offers it: the transport sends the slices and releases them.
  if (device.readSegments !== undefined) return device.readSegments(lba, blocks).then(segmentedOutcome);
  return device.read(lba, blocks).then(dataInOutcome);
}

/** WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16) (SBC-3 5.29-5.35). */
export async function write(
  ctx: CommandContext,
  lba: number,
  blocks: number,
  fuaBit: boolean,
  lengthByte: number,
): Promise<Outcome> {
  const lu = ctx.lu;
  const device = lu.device;
  const blockSize = device.blockSize;
  const dataOutLength = blocks * blockSize;
  if (lba + blocks > device.blockCount) return { ...LBA_OUT_OF_RANGE, dataOutLength };
  if (blocks > lu.maxTransferBlocks) return { ...invalidCdbField(lengthByte), dataOutLength };
  const data = ctx.cmd.dataOut;
  const arrivedBlocks = data === undefined ? 0 : Math.min(blocks, Math.floor(data.length / blockSize));
  if (arrivedBlocks === 0) return { dataOutLength };
  const release = await lockUnlessAborted(ctx, lba, arrivedBlocks);
  if (release === undefined) return { ...fail(SenseReason.TaskAborted), dataOutLength };
  try {
    const payload = data!.length === arrivedBlocks * blockSize ? data! : data!.subarray(0, arrivedBlocks * blockSize);
    await device.write(lba, payload, { fua: forceUnitAccess(ctx, fuaBit) });
  } finally {
    release();
  }
  return { dataOutLength };
}

/** VERIFY(10/12/16) (SBC-3 5.22-5.24): BYTCHK 0 reads the medium, BYTCHK 1 compares with Data-Out. */
export async function verify(
  ctx: CommandContext,
  lba: number,
  blocks: number,
  lengthByte: number,
): Promise<Outcome> {
  const lu = ctx.lu;
  const device = lu.device;
  const blockSize = device.blockSize;
  const byteCheck = (ctx.cdb[1]! & 0x02) !== 0;
  const dataOutLength = byteCheck ? blocks * blockSize : undefined;
  const withLength = (o: Outcome): Outcome => (dataOutLength === undefined ? o : { ...o, dataOutLength });
  if (lba + blocks > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
  if (blocks === 0) return withLength(GOOD);
  if (!byteCheck) {
    // Medium verification: read the range in bounded pieces; a storage error becomes MEDIUM ERROR.
    for (let at = lba; at < lba + blocks; at += lu.maxTransferBlocks) {
      if (ctx.cmd.signal?.aborted === true) return fail(SenseReason.TaskAborted);
      await device.read(at, Math.min(lu.maxTransferBlocks, lba + blocks - at));
    }
    return GOOD;
  }
  if (blocks > lu.maxTransferBlocks) return withLength(invalidCdbField(lengthByte));
  const data = ctx.cmd.dataOut;
  const arrivedBlocks = data === undefined ? 0 : Math.min(blocks, Math.floor(data.length / blockSize));
  if (arrivedBlocks === 0) return withLength(GOOD);
  const stored = await device.read(lba, arrivedBlocks);
  const offset = firstDifference(stored, data!.subarray(0, arrivedBlocks * blockSize));
  if (offset >= 0) return withLength(fail(SenseReason.MiscompareDuringVerify, { information: offset }));
  return withLength(GOOD);
}

/** READ CAPACITY(10) (SBC-3 5.15). */
export function readCapacity10(ctx: CommandContext): Outcome {
  const { cdb, lu } = ctx;
  const pmi = (cdb[8]! & 0x01) !== 0;
  if (!pmi && cdb.readUInt32BE(2) !== 0) return invalidCdbField(2);
  const data = Buffer.alloc(8);
  data.writeUInt32BE(Math.min(lu.device.blockCount - 1, 0xffffffff), 0);
  data.writeUInt32BE(lu.device.blockSize, 4);
  return { dataIn: data };
}

/** READ CAPACITY(16) (SBC-3 5.16). */
export function readCapacity16(ctx: CommandContext): Outcome {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const allocationLength = cdb.readUInt32BE(10);
  const pmi = (cdb[14]! & 0x01) !== 0;
  if (!pmi && readUInt64(cdb, 2) !== 0) return invalidCdbField(2);
  const data = Buffer.alloc(32);
  writeUInt64(data, device.blockCount - 1, 0);
  data.writeUInt32BE(device.blockSize, 8);
  if (device.supportsUnmap) data[14] = 0x80 | 0x40; // LBPME, LBPRZ
  return truncated(data, allocationLength);
}

/** SYNCHRONIZE CACHE(10/16) (SBC-3 5.20, 5.21): NUMBER OF BLOCKS 0 means up to the last LBA. */
export async function synchronizeCache(ctx: CommandContext, lba: number, blocks: number): Promise<Outcome> {
  if (lba + blocks > ctx.lu.device.blockCount) return LBA_OUT_OF_RANGE;
  await ctx.lu.device.flush();
  return GOOD;
}

/** PRE-FETCH(10/16) (SBC-3 5.9, 5.10): warms the storage's cache with one bounded read. */
export async function preFetch(ctx: CommandContext, lba: number, blocks: number): Promise<Outcome> {
  const lu = ctx.lu;
  const device = lu.device;
  if (lba + blocks > device.blockCount) return LBA_OUT_OF_RANGE;
  const count = Math.min(blocks === 0 ? device.blockCount - lba : blocks, lu.maxTransferBlocks);
  if (count === 0) return GOOD;
  const immediate = (ctx.cdb[1]! & 0x02) !== 0;
  const warm = device.read(lba, count).then(
    () => undefined,
    (err: unknown) => ctx.logger.debug({ err, lba, count }, 'pre-fetch read failed'),
  );
  if (!immediate) await warm;
  return GOOD;
}

/** WRITE SAME(10/16) (SBC-3 5.41, 5.42): UNMAP deallocates when the block is zero and the device can. */
export async function writeSame(ctx: CommandContext, lba: number, requestedBlocks: number, sixteen: boolean): Promise<Outcome> {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const blockSize = device.blockSize;
  const unmap = (cdb[1]! & 0x08) !== 0;
  const anchor = (cdb[1]! & 0x10) !== 0;
  const noDataOutBuffer = sixteen && (cdb[1]! & 0x01) !== 0;
  const dataOutLength = noDataOutBuffer ? 0 : blockSize;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });
  if (anchor) return withLength(invalidCdbField(1, 4)); // ANC_SUP=0
  if (unmap && !device.supportsUnmap) return withLength(invalidCdbField(1, 3)); // LBPWS=LBPWS10=0
  if (lba > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
  // NUMBER OF LOGICAL BLOCKS 0: up to the last LBA (WSNZ=0, SBC-3 5.41).
  const blocks = requestedBlocks === 0 ? device.blockCount - lba : requestedBlocks;
  if (lba + blocks > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
  if (blocks > MAX_WRITE_SAME_BLOCKS) return withLength(invalidCdbField(sixteen ? 10 : 7));
  // The Data-Out buffer is exactly one logical block (SBC-3 5.41); anything else is refused whole.
  if (!noDataOutBuffer && ctx.cmd.expectedDataLength !== blockSize) {
    return withLength(fail(SenseReason.InvalidFieldInCdb));
  }
  let block: Buffer;
  if (noDataOutBuffer) {
    block = Buffer.alloc(blockSize);
  } else {
    const data = ctx.cmd.dataOut;
    if (data === undefined || data.length < blockSize) return withLength(PARAMETER_LIST_LENGTH_ERROR);
    block = data.subarray(0, blockSize);
  }
  if (blocks === 0) return withLength(GOOD);
  const release = await lockUnlessAborted(ctx, lba, blocks);
  if (release === undefined) return withLength(fail(SenseReason.TaskAborted));
  try {
    // UNMAP=1: deallocate whatever the block holds, as LIO and tgt do and libiscsi's
    // WriteSame*.UnmapUntilEnd expects (it sends 0xFF blocks with UNMAP and, with LBPRZ=1, reads
    // back zeroes). Initiators that must keep data send a zero block or no UNMAP bit.
    if (unmap && device.supportsUnmap) {
      await device.unmap([{ lba, blocks }]);
      return withLength(GOOD);
    }
    const fua = forceUnitAccess(ctx, false);
    const batchBlocks = Math.max(1, Math.floor(WRITE_SAME_BATCH_BYTES / blockSize));
    const pattern = Buffer.allocUnsafe(Math.min(batchBlocks, blocks) * blockSize).fill(block);
    for (let at = lba; at < lba + blocks; at += batchBlocks) {
      if (ctx.cmd.signal?.aborted === true) return withLength(fail(SenseReason.TaskAborted));
      const n = Math.min(batchBlocks, lba + blocks - at);
      await device.write(at, n * blockSize === pattern.length ? pattern : pattern.subarray(0, n * blockSize), { fua });
    }
  } finally {
    release();
  }
  return withLength(GOOD);
}

/** UNMAP (SBC-3 5.28) with the parameter list checks of 5.28.2. */
export async function unmap(ctx: CommandContext): Promise<Outcome> {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const parameterListLength = cdb.readUInt16BE(7);
  const dataOutLength = parameterListLength;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });
  if ((cdb[1]! & 0x01) !== 0) return withLength(invalidCdbField(1, 0)); // ANCHOR: ANC_SUP=0
  if (parameterListLength === 0) return withLength(GOOD);
  if (parameterListLength < 8) return withLength(PARAMETER_LIST_LENGTH_ERROR);
  const data = ctx.cmd.dataOut;
  if (data === undefined || data.length < parameterListLength) return withLength(PARAMETER_LIST_LENGTH_ERROR);
  const params = data.subarray(0, parameterListLength);
  const blockDescriptorDataLength = params.readUInt16BE(2);
  const descriptorCount = Math.floor(Math.min(blockDescriptorDataLength, parameterListLength - 8) / 16);
  if (descriptorCount > MAX_UNMAP_DESCRIPTORS) return withLength(invalidParameterField(2));
  const ranges: LbaRange[] = [];
  let first = Number.MAX_SAFE_INTEGER;
  let last = 0;
  for (let i = 0; i < descriptorCount; i++) {
    const at = 8 + 16 * i;
    const lba = readUInt64(params, at);
    const blocks = params.readUInt32BE(at + 8);
    if (lba + blocks > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
    if (blocks > MAX_UNMAP_BLOCKS) return withLength(invalidParameterField(at + 8));
    if (blocks === 0) continue;
    ranges.push({ lba, blocks });
    first = Math.min(first, lba);
    last = Math.max(last, lba + blocks);
  }
  if (ranges.length === 0) return withLength(GOOD);
  const release = await lockUnlessAborted(ctx, first, last - first);
  if (release === undefined) return withLength(fail(SenseReason.TaskAborted));
  try {
    await device.unmap(ranges);
  } finally {
    release();
  }
  return withLength(GOOD);
}

/** Most LBA status descriptors returned by one GET LBA STATUS. */
const MAX_LBA_STATUS_DESCRIPTORS = 64;

/** GET LBA STATUS (SBC-3 5.5): device.status if present, else everything mapped. */
export async function getLbaStatus(ctx: CommandContext): Promise<Outcome> {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const startLba = readUInt64(cdb, 2);
  const allocationLength = cdb.readUInt32BE(10);
  if (startLba >= device.blockCount) return LBA_OUT_OF_RANGE;
  const room = Math.max(1, Math.min(MAX_LBA_STATUS_DESCRIPTORS, Math.floor((allocationLength - 8) / 16)));
  const descriptors: Buffer[] = [];
  let lba = startLba;
  while (lba < device.blockCount && descriptors.length < room) {
    const remaining = device.blockCount - lba;
    const status = device.status ? await device.status(lba) : { mapped: true, blocks: remaining };
    const count = Math.max(1, Math.min(status.blocks, remaining, 0xffffffff));
    const d = Buffer.alloc(16);
    writeUInt64(d, lba, 0);
    d.writeUInt32BE(count, 8);
    d[12] = status.mapped ? 0x00 : 0x01; // PROVISIONING STATUS: mapped / deallocated
    descriptors.push(d);
    lba += count;
  }
  const data = Buffer.alloc(8 + 16 * descriptors.length);
  data.writeUInt32BE(4 + 16 * descriptors.length, 0); // PARAMETER DATA LENGTH
  descriptors.forEach((d, i) => d.copy(data, 8 + 16 * i));
  return truncated(data, allocationLength);
}

/**
 * COMPARE AND WRITE (SBC-3 5.2): atomic against every other write to overlapping LBAs of the
 * logical unit. The Data-Out buffer holds the verify blocks, then the write blocks.
 */
export async function compareAndWrite(ctx: CommandContext): Promise<Outcome> {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const blockSize = device.blockSize;
  const lba = readUInt64(cdb, 2);
  const blocks = cdb[13]!;
  const dataOutLength = 2 * blocks * blockSize;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });
  // The initiator must send exactly the verify + write blocks; a NUMBER OF LOGICAL BLOCKS that
  // disagrees with the Data-Out length (e.g. 256 wrapped to 0) is an invalid field.
  if (ctx.cmd.expectedDataLength !== dataOutLength) return withLength(invalidCdbField(13));
  if (blocks === 0) return withLength(GOOD);
  if (blocks > MAX_COMPARE_AND_WRITE_BLOCKS) return withLength(invalidCdbField(13));
  if (lba + blocks > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
  const data = ctx.cmd.dataOut;
  if (data === undefined || data.length < dataOutLength) return withLength(invalidCdbField(13));
  const expected = data.subarray(0, blocks * blockSize);
  const replacement = data.subarray(blocks * blockSize, dataOutLength);
  const release = await lockUnlessAborted(ctx, lba, blocks);
  if (release === undefined) return withLength(fail(SenseReason.TaskAborted));
  try {
    const current = await device.read(lba, blocks);
    const offset = firstDifference(current, expected);
    if (offset >= 0) return withLength(fail(SenseReason.MiscompareDuringVerify, { information: offset }));
    await device.write(lba, replacement, { fua: forceUnitAccess(ctx, (cdb[1]! & 0x08) !== 0) });
  } finally {
    release();
  }
  return withLength(GOOD);
}

/** ORWRITE(16) (SBC-3 5.7): OR the Data-Out into the stored blocks, atomically per range. */
export async function orWrite(ctx: CommandContext): Promise<Outcome> {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const blockSize = device.blockSize;
  const lba = readUInt64(cdb, 2);
  const blocks = cdb.readUInt32BE(10);
  const dataOutLength = blocks * blockSize;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });
  if (lba + blocks > device.blockCount) return withLength(LBA_OUT_OF_RANGE);
  if (blocks > lu.maxTransferBlocks) return withLength(invalidCdbField(10));
  const data = ctx.cmd.dataOut;
  const arrivedBlocks = data === undefined ? 0 : Math.min(blocks, Math.floor(data.length / blockSize));
  if (arrivedBlocks === 0) return withLength(GOOD);
  const release = await lockUnlessAborted(ctx, lba, arrivedBlocks);
  if (release === undefined) return withLength(fail(SenseReason.TaskAborted));
  try {
    // The device's read result may be shared (a cached chunk): OR into a buffer of our own.
    const stored = await device.read(lba, arrivedBlocks);
    const merged = Buffer.allocUnsafe(stored.length);
    for (let i = 0; i < merged.length; i++) merged[i] = stored[i]! | data![i]!;
    await device.write(lba, merged, { fua: forceUnitAccess(ctx, (cdb[1]! & 0x08) !== 0) });
  } finally {
    release();
  }
  return withLength(GOOD);
}

/** READ DEFECT DATA(10) (SBC-3 5.12): an empty list in the requested format. */
export function readDefectData10(ctx: CommandContext): Outcome {
  const data = Buffer.alloc(4);
  data[1] = ctx.cdb[2]! & 0x07; // PLISTV=GLISTV=0 (no lists), DEFECT LIST FORMAT as requested
  return truncated(data, ctx.cdb.readUInt16BE(7));
}

/** READ DEFECT DATA(12) (SBC-3 5.13): an empty list in the requested format. */
export function readDefectData12(ctx: CommandContext): Outcome {
  const data = Buffer.alloc(8);
  data[1] = ctx.cdb[1]! & 0x07;
  return truncated(data, ctx.cdb.readUInt32BE(6));
}

/**
 * The LU's range lock on [lba, lba + blocks), or undefined if the command was aborted while it
 * waited for it. SAM-5 5.6 / RFC 7143 §11.5.1: once a task management function has reported a
 * command aborted, the command must not change the medium; one that waited behind an overlapping
 * command may have been aborted meanwhile. Only a command that waited looks (cmd.signal costs an
 * AbortController); one that got the lock at once is covered by the TMF response, which waits for
 * commands already executing.
 */
async function lockUnlessAborted(ctx: CommandContext, lba: number, blocks: number): Promise<ReleaseLock | undefined> {
  const lock = ctx.lu.lock;
  const waited = lock.wouldWait(lba, blocks);
  const release = await lock.acquire(lba, blocks);
  if (waited && ctx.cmd.signal?.aborted === true) {
    release();
    return undefined;
  }
  return release;
}
