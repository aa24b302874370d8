/**
 * SPC-4 primary commands: INQUIRY and VPD pages, REPORT LUNS, REQUEST SENSE, TEST UNIT READY,
 * MODE SENSE / MODE SELECT, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, RESERVE / RELEASE.
 */

import type { BlockDevice } from '../../block-device.js';
import {
  MAX_COMPARE_AND_WRITE_BLOCKS,
  MAX_UNMAP_BLOCKS,
  MAX_UNMAP_DESCRIPTORS,
  MAX_WRITE_SAME_BLOCKS,
  type CommandContext,
  type LogicalUnit,
} from './logical-unit.js';
import { thirdPartyCopyPage } from './extended-copy.js';
import { ModePages, PageControl } from './mode-pages.js';
import {
  GOOD,
  PARAMETER_LIST_LENGTH_ERROR,
  RESERVATION_CONFLICT,
  fail,
  invalidCdbField,
  invalidParameterField,
  truncated,
  writeUInt64,
  type Outcome,
} from './outcome.js';
import { SenseReason, buildSense } from './sense.js';

export const enum Opcode {
  TestUnitReady = 0x00,
  RequestSense = 0x03,
  Inquiry = 0x12,
  ReportLuns = 0xa0,
}

function asciiField(text: string, length: number): Buffer {
  const out = Buffer.alloc(length, 0x20);
  out.write(text.replace(/[^\x20-\x7e]/g, ' ').slice(0, length), 0, 'ascii');
  return out;
}

/** Standard INQUIRY data (SPC-4 6.6.2), 96 bytes with version descriptors. */
function standardInquiry(device: BlockDevice | undefined): Buffer {
  const data = Buffer.alloc(96);
  // Peripheral qualifier 000b / type 00h (direct access), or 011b / 1Fh for an absent LUN.
  data[0] = device === undefined ? 0x7f : 0x00;
  data[1] = 0x00; // RMB=0
  data[2] = 0x06; // VERSION: SPC-4
  data[3] = 0x10 | 0x02; // HISUP, RESPONSE DATA FORMAT 2
  data[4] = data.length - 5;
  data[5] = 0x08; // TPGS=0, 3PC=1 (EXTENDED COPY), PROTECT=0
  data[6] = 0x00;
  data[7] = 0x02; // CMDQUE
  const identity = device?.identity;
  asciiField(identity?.vendor ?? 'BOOTRST', 8).copy(data, 8);
  asciiField(identity?.product ?? 'NO LUN', 16).copy(data, 16);
  asciiField(identity?.revision ?? '0001', 4).copy(data, 32);
  // Version descriptors (SPC-4 table 144): SAM-5, iSCSI, SPC-4, SBC-3.
  const versions = [0x00a0, 0x0960, 0x0460, 0x04c0];
  versions.forEach((v, i) => data.writeUInt16BE(v, 58 + 2 * i));
  return data;
}

const SUPPORTED_VPD_PAGES = [0x00, 0x80, 0x83, 0x8f, 0xb0, 0xb1, 0xb2];

function vpdPage(code: number, body: Buffer): Buffer {
  const page = Buffer.alloc(4 + body.length);
  page[0] = 0x00; // qualifier/type: direct access
  page[1] = code;
  page.writeUInt16BE(body.length, 2);
  body.copy(page, 4);
  return page;
}

/** Designation descriptor (SPC-4 7.8.6.1). */
function designator(byte0: number, byte1: number, value: Buffer): Buffer {
  const d = Buffer.alloc(4 + value.length);
  d[0] = byte0;
  d[1] = byte1;
  d[3] = value.length;
  value.copy(d, 4);
  return d;
}

function deviceIdentificationPage(device: BlockDevice): Buffer {
  const { identity } = device;
  const designators = [
    // NAA (designator type 3), binary, association 0 = the logical unit: ESXi and Linux name the device from it.
    designator(0x01, 0x03, identity.naa),
    // T10 vendor ID based (type 1), ASCII, association 0: vendor + serial.
    designator(0x02, 0x01, Buffer.concat([asciiField(identity.vendor, 8), Buffer.from(identity.serial, 'ascii')])),
    // Relative target port (type 4), PIV=1, association 1 = target port, protocol iSCSI (5).
    designator(0x51, 0x94, Buffer.from([0, 0, 0, 1])),
    // Target port group (type 5), PIV=1, association 1.
    designator(0x51, 0x95, Buffer.from([0, 0, 0, 1])),
  ];
  return vpdPage(0x83, Buffer.concat(designators));
}

function blockLimitsPage(lu: LogicalUnit): Buffer {
  const device = lu.device;
  const body = Buffer.alloc(0x3c); // SBC-3 6.5.3
  body[1] = MAX_COMPARE_AND_WRITE_BLOCKS; // MAXIMUM COMPARE AND WRITE LENGTH (byte 5)
  body.writeUInt16BE(Math.max(1, Math.floor(4096 / device.blockSize)), 2); // OPTIMAL TRANSFER LENGTH GRANULARITY
  body.writeUInt32BE(lu.maxTransferBlocks, 4); // MAXIMUM TRANSFER LENGTH
  body.writeUInt32BE(Math.max(1, Math.floor((1024 * 1024) / device.blockSize)), 8); // OPTIMAL TRANSFER LENGTH
  body.writeUInt32BE(lu.maxTransferBlocks, 12); // MAXIMUM PREFETCH LENGTH
  if (device.supportsUnmap) {
    body.writeUInt32BE(MAX_UNMAP_BLOCKS, 16); // MAXIMUM UNMAP LBA COUNT
    body.writeUInt32BE(MAX_UNMAP_DESCRIPTORS, 20); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    body.writeUInt32BE(1, 24); // OPTIMAL UNMAP GRANULARITY
  }
  writeUInt64(body, MAX_WRITE_SAME_BLOCKS, 32); // MAXIMUM WRITE SAME LENGTH
  return vpdPage(0xb0, body);
}

function blockDeviceCharacteristicsPage(): Buffer {
  const body = Buffer.alloc(0x3c); // SBC-3 6.5.2
  body.writeUInt16BE(1, 0); // MEDIUM ROTATION RATE: non-rotating
  return vpdPage(0xb1, body);
}

function logicalBlockProvisioningPage(device: BlockDevice): Buffer {
  const body = Buffer.alloc(4); // SBC-3 6.5.4, no provisioning group descriptor
  if (device.supportsUnmap) {
    body[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU, LBPWS, LBPWS10, LBPRZ
    body[2] = 0x02; // PROVISIONING TYPE: thin
  }
  return vpdPage(0xb2, body);
}

/** INQUIRY (SPC-4 6.6). `lu` undefined: the LUN is not present. */
export function inquiry(cdb: Buffer, lu: LogicalUnit | undefined): Outcome {
  const evpd = (cdb[1]! & 0x01) !== 0;
  const pageCode = cdb[2]!;
  const allocationLength = cdb.readUInt16BE(3);
  if (!evpd) {
    if (pageCode !== 0) return invalidCdbField(2);
    return truncated(standardInquiry(lu?.device), allocationLength);
  }
  if (lu === undefined) return invalidCdbField(1, 0);
  const device = lu.device;
  let page: Buffer;
  switch (pageCode) {
    case 0x00:
      page = vpdPage(0x00, Buffer.from(SUPPORTED_VPD_PAGES));
      break;
    case 0x80:
      page = vpdPage(0x80, Buffer.from(device.identity.serial, 'ascii'));
      break;
    case 0x83:
      page = deviceIdentificationPage(device);
      break;
    case 0x8f:
      page = thirdPartyCopyPage();
      break;
    case 0xb0:
      page = blockLimitsPage(lu);
      break;
    case 0xb1:
      page = blockDeviceCharacteristicsPage();
      break;
    case 0xb2:
      page = logicalBlockProvisioningPage(device);
      break;
    default:
      return invalidCdbField(2);
  }
  return truncated(page, allocationLength);
}

/** REPORT LUNS (SPC-4 6.33) with SAM-5 peripheral (LUN < 256) or flat addressing. */
export function reportLuns(cdb: Buffer, luns: readonly number[]): Outcome {
  const selectReport = cdb[2]!;
  const allocationLength = cdb.readUInt32BE(6);
  if (allocationLength < 16) return invalidCdbField(6);
  let listed: readonly number[];
  if (selectReport === 0x00 || selectReport === 0x02) listed = luns;
  else if (selectReport === 0x01) listed = []; // well-known LUNs: none
  else return invalidCdbField(2);
  const data = Buffer.alloc(8 + 8 * listed.length);
  data.writeUInt32BE(8 * listed.length, 0);
  listed.forEach((lun, i) => {
    const at = 8 + 8 * i;
    if (lun < 256) {
      data[at + 1] = lun;
    } else {
      data[at] = 0x40 | ((lun >> 8) & 0x3f);
      data[at + 1] = lun & 0xff;
    }
  });
  return truncated(data, allocationLength);
}

/** REQUEST SENSE (SPC-4 6.39): returns `reason` (NO SENSE, a pending UA, LUN NOT SUPPORTED) as data. */
export function requestSense(cdb: Buffer, reason: SenseReason): Outcome {
  const descriptorFormat = (cdb[1]! & 0x01) !== 0;
  return truncated(buildSense(reason, {}, descriptorFormat), cdb[4]!);
}

export function testUnitReady(): Outcome {
  return GOOD;
}

/** MODE SENSE(6) / MODE SENSE(10) (SPC-4 6.11, 6.12). */
export function modeSense(ctx: CommandContext, ten: boolean): Outcome {
  const { cdb, lu } = ctx;
  const device = lu.device;
  const dbd = (cdb[1]! & 0x08) !== 0;
  const llbaa = ten && (cdb[1]! & 0x10) !== 0;
  const pageControl = (cdb[2]! >> 6) as PageControl;
  const pageCode = cdb[2]! & 0x3f;
  const subpage = cdb[3]!;
  const allocationLength = ten ? cdb.readUInt16BE(7) : cdb[4]!;
  if (pageControl === PageControl.Saved) return fail(SenseReason.SavingParametersNotSupported);
  if (!ModePages.hasPage(pageCode)) return invalidCdbField(2, 5);
  if (subpage !== 0 && !(pageCode === 0x3f && subpage === 0xff)) return invalidCdbField(3);

  const pages = lu.mode.pages(pageCode, pageControl);
  const changeable = pageControl === PageControl.Changeable;
  let blockDescriptor = Buffer.alloc(0);
  if (!dbd) {
    if (llbaa) {
      blockDescriptor = Buffer.alloc(16); // SBC-3 6.4.2.3 long LBA block descriptor
      if (!changeable) {
        writeUInt64(blockDescriptor, device.blockCount, 0);
        blockDescriptor.writeUInt32BE(device.blockSize, 12);
      }
    } else {
      blockDescriptor = Buffer.alloc(8); // SBC-3 6.4.2.2 short LBA block descriptor
      if (!changeable) {
        blockDescriptor.writeUInt32BE(Math.min(device.blockCount, 0xffffffff), 0);
        blockDescriptor.writeUIntBE(device.blockSize, 5, 3);
      }
    }
  }
  // DEVICE-SPECIFIC PARAMETER (SBC-3 6.4.1): WP, DPOFUA.
  const deviceSpecific = (lu.writeProtection() !== undefined ? 0x80 : 0) | 0x10;
  const headerLength = ten ? 8 : 4;
  const data = Buffer.alloc(headerLength + blockDescriptor.length + pages.length);
  if (ten) {
    data.writeUInt16BE(data.length - 2, 0);
    data[3] = deviceSpecific;
    data[4] = llbaa && !dbd ? 0x01 : 0x00; // LONGLBA
    data.writeUInt16BE(blockDescriptor.length, 6);
  } else {
    data[0] = Math.min(0xff, data.length - 1);
    data[2] = deviceSpecific;
    data[3] = blockDescriptor.length;
  }
  blockDescriptor.copy(data, headerLength);
  pages.copy(data, headerLength + blockDescriptor.length);
  return truncated(data, allocationLength);
}

/** MODE SELECT(6) / MODE SELECT(10) (SPC-4 6.9, 6.10). Only changeable bits may change. */
export function modeSelect(ctx: CommandContext, ten: boolean): Outcome {
  const { cdb, lu } = ctx;
  const pf = (cdb[1]! & 0x10) !== 0;
  const sp = (cdb[1]! & 0x01) !== 0;
  const parameterListLength = ten ? cdb.readUInt16BE(7) : cdb[4]!;
  const dataOutLength = parameterListLength;
  if (sp) return { ...invalidCdbField(1, 0), dataOutLength };
  if (parameterListLength === 0) return { dataOutLength };
  const data = ctx.cmd.dataOut?.subarray(0, parameterListLength) ?? Buffer.alloc(0);
  const headerLength = ten ? 8 : 4;
  if (data.length < parameterListLength || data.length < headerLength) return { ...PARAMETER_LIST_LENGTH_ERROR, dataOutLength };
  const longLba = ten && (data[4]! & 0x01) !== 0;
  const blockDescriptorLength = ten ? data.readUInt16BE(6) : data[3]!;
  const descriptorSize = longLba ? 16 : 8;
  if (headerLength + blockDescriptorLength > data.length) return { ...PARAMETER_LIST_LENGTH_ERROR, dataOutLength };
  if (blockDescriptorLength % descriptorSize !== 0) {
    return { ...invalidParameterField(ten ? 6 : 3), dataOutLength };
  }
  for (let at = headerLength; at < headerLength + blockDescriptorLength; at += descriptorSize) {
    // The block length may be restated but not changed.
    const lengthAt = longLba ? at + 12 : at + 5;
    const blockLength = longLba ? data.readUInt32BE(lengthAt) : data.readUIntBE(lengthAt, 3);
    if (blockLength !== 0 && blockLength !== lu.device.blockSize) {
      return { ...invalidParameterField(lengthAt), dataOutLength };
    }
  }
  const pageOffset = headerLength + blockDescriptorLength;
  const pages = data.subarray(pageOffset);
  if (pages.length > 0 && !pf) return { ...invalidCdbField(1, 4), dataOutLength };
  const result = lu.mode.select(pages, pageOffset);
  if (!result.ok) {
    if (result.kind === 'length') return { ...PARAMETER_LIST_LENGTH_ERROR, dataOutLength };
    return { ...invalidParameterField(result.byte, result.bit), dataOutLength };
  }
  if (result.changed) {
    // SPC-4 7.5.4: other I_T nexuses learn MODE PARAMETERS CHANGED.
    const me = ctx.session.nexus.key;
    ctx.target.establishUnitAttention(lu.lun, SenseReason.ModeParametersChanged, (s) => s.nexus.key !== me);
  }
  return { dataOutLength };
}

/** START STOP UNIT (SBC-3 5.25): no power states to change; eject refused while prevented. */
export function startStopUnit(ctx: CommandContext): Outcome {
  const { cdb, lu } = ctx;
  const loej = (cdb[4]! & 0x02) !== 0;
  const start = (cdb[4]! & 0x01) !== 0;
  const powerCondition = cdb[4]! >> 4;
  if (powerCondition === 0 && loej && !start && lu.preventingNexuses.size > 0) {
    return fail(SenseReason.MediumRemovalPrevented);
  }
  return GOOD;
}

/** PREVENT ALLOW MEDIUM REMOVAL (SPC-4 6.13, SBC-3 5.11). */
export function preventAllowMediumRemoval(ctx: CommandContext): Outcome {
  const prevent = ctx.cdb[4]! & 0x03;
  if (prevent === 0x01) ctx.lu.preventingNexuses.add(ctx.session.nexus.key);
  else if (prevent === 0x00) ctx.lu.preventingNexuses.delete(ctx.session.nexus.key);
  else return invalidCdbField(4, 1); // 10b / 11b: obsolete for direct access devices
  return GOOD;
}

/** RESERVE(6) / RESERVE(10) (SPC-2 7.21, 7.22): logical unit reservation only. */
export function reserve(ctx: CommandContext): Outcome {
  const { lu } = ctx;
  if (lu.persistentReservations.active) return RESERVATION_CONFLICT;
  const holder = lu.reservationHolder;
  if (holder !== undefined && holder !== ctx.session.nexus.key) return RESERVATION_CONFLICT;
  lu.reservationHolder = ctx.session.nexus.key;
  return GOOD;
}

/** RELEASE(6) / RELEASE(10) (SPC-2 7.17, 7.18): releasing someone else's reservation does nothing. */
export function release(ctx: CommandContext): Outcome {
  const { lu } = ctx;
  if (lu.persistentReservations.active) return RESERVATION_CONFLICT;
  if (lu.reservationHolder === ctx.session.nexus.key) lu.reservationHolder = undefined;
  return GOOD;
}
