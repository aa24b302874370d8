/**
 * The command table (FreeBSD CTL style): one entry per opcode (and service action) with its
 * handler, CDB length, data direction, CDB usage mask and flags. The dispatcher's generic check
 * rejects any CDB bit outside the mask with INVALID FIELD IN CDB + field pointer (SPC-4 4.5.2.4.2),
 * and REPORT SUPPORTED OPERATION CODES (SPC-4 6.35) answers straight from the same masks.
 */

import type { CommandContext } from './logical-unit.js';
import type { ReservationAccess } from './persistent-reservations.js';
import { invalidCdbField, truncated, type Failed, type Outcome } from './outcome.js';

export type CommandHandler = (ctx: CommandContext) => Outcome | Promise<Outcome>;

export const enum DataDirection {
  None = 0,
  In = 1,
  Out = 2,
}

export const enum CommandFlag {
  None = 0,
  /** Runs while another nexus holds an SPC-2 reservation (SPC-2 5.5.1 table 10). */
  AllowedUnderSpc2Reservation = 1 << 0,
  /** Modifies the medium: DATA PROTECT on a read-only or software-write-protected LUN. */
  Writes = 1 << 1,
  /** Exists only on logical units whose device supports unmap (LBPU / LBPWS). */
  RequiresUnmap = 1 << 2,
}

export interface CommandSpec {
  readonly name: string;
  readonly opcode: number;
  /** Service action (byte 1 bits 4..0) for opcodes that have them. */
  readonly serviceAction?: number;
  readonly direction: DataDirection;
  /** CDB usage data (SPC-4 6.35.3): byte 0 = opcode, then the bits an initiator may set. Its length is the CDB length. */
  readonly usage: readonly number[];
  readonly flags: number;
  readonly reservationAccess: ReservationAccess;
  readonly handler: CommandHandler;
}

export type Lookup =
  | { readonly kind: 'found'; readonly spec: CommandSpec }
  | { readonly kind: 'invalid-opcode' }
  | { readonly kind: 'invalid-service-action' };

export class CommandTable {
  private readonly plain: Array<CommandSpec | undefined> = new Array<CommandSpec | undefined>(256).fill(undefined);
  private readonly withServiceAction = new Map<number, Map<number, CommandSpec>>();
  readonly all: readonly CommandSpec[];

  constructor(specs: readonly CommandSpec[]) {
    for (const spec of specs) {
      if (spec.usage[0] !== spec.opcode) throw new Error(`${spec.name}: usage[0] must be the opcode`);
      if (spec.serviceAction === undefined) {
        if (this.plain[spec.opcode] !== undefined || this.withServiceAction.has(spec.opcode)) {
          throw new Error(`${spec.name}: opcode 0x${spec.opcode.toString(16)} defined twice`);
        }
        this.plain[spec.opcode] = spec;
      } else {
        if (this.plain[spec.opcode] !== undefined) throw new Error(`${spec.name}: opcode also defined without SA`);
        let actions = this.withServiceAction.get(spec.opcode);
        if (actions === undefined) this.withServiceAction.set(spec.opcode, (actions = new Map()));
        if (actions.has(spec.serviceAction)) throw new Error(`${spec.name}: service action defined twice`);
        actions.set(spec.serviceAction, spec);
      }
    }
    this.all = specs;
  }

  hasServiceActions(opcode: number): boolean {
    return this.withServiceAction.has(opcode);
  }

  lookup(cdb: Buffer): Lookup {
    const opcode = cdb[0]!;
    const spec = this.plain[opcode];
    if (spec !== undefined) return { kind: 'found', spec };
    const actions = this.withServiceAction.get(opcode);
    if (actions === undefined) return { kind: 'invalid-opcode' };
    const sa = actions.get(cdb[1]! & 0x1f);
    return sa === undefined ? { kind: 'invalid-service-action' } : { kind: 'found', spec: sa };
  }

  find(opcode: number, serviceAction?: number): CommandSpec | undefined {
    if (serviceAction === undefined) return this.plain[opcode];
    return this.withServiceAction.get(opcode)?.get(serviceAction);
  }
}

/**
 * The generic CDB check: any bit set outside the usage mask → INVALID FIELD IN CDB pointing at
 * the first offending byte and its highest offending bit.
 */
export function checkCdbMask(spec: CommandSpec, cdb: Buffer): Failed | undefined {
  const usage = spec.usage;
  if (cdb.length < usage.length) return invalidCdbField(cdb.length);
  for (let i = 1; i < usage.length; i++) {
    const bad = cdb[i]! & ~usage[i]!;
    if (bad !== 0) return invalidCdbField(i, 31 - Math.clz32(bad));
  }
  return undefined;
}

/** Recommended timeout reported with RCTD (SPC-4 6.35.4), seconds. */
const RECOMMENDED_TIMEOUT_SECONDS = 60;

function timeoutsDescriptor(): Buffer {
  const d = Buffer.alloc(12);
  d.writeUInt16BE(0x0a, 0);
  d.writeUInt32BE(0, 4); // NOMINAL COMMAND PROCESSING TIMEOUT: not specified
  d.writeUInt32BE(RECOMMENDED_TIMEOUT_SECONDS, 8);
  return d;
}

function specAvailable(ctx: CommandContext, spec: CommandSpec): boolean {
  return (spec.flags & CommandFlag.RequiresUnmap) === 0 || ctx.lu.device.supportsUnmap;
}

/** REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), MAINTENANCE IN service action 0x0C. */
export function reportSupportedOperationCodes(ctx: CommandContext): Outcome {
  const { cdb } = ctx;
  const table = ctx.target.commands;
  const rctd = (cdb[2]! & 0x80) !== 0;
  const options = cdb[2]! & 0x07;
  const requestedOpcode = cdb[3]!;
  const requestedSa = cdb.readUInt16BE(4);
  const allocationLength = cdb.readUInt32BE(6);

  if (options === 0) {
    const descriptors: Buffer[] = [];
    for (const spec of table.all) {
      if (!specAvailable(ctx, spec)) continue;
      const d = Buffer.alloc(8);
      d[0] = spec.opcode;
      if (spec.serviceAction !== undefined) {
        d.writeUInt16BE(spec.serviceAction, 2);
        d[5] |= 0x01; // SERVACTV
      }
      if (rctd) d[5] |= 0x02; // CTDP
      d.writeUInt16BE(spec.usage.length, 6);
      descriptors.push(d);
      if (rctd) descriptors.push(timeoutsDescriptor());
    }
    const body = Buffer.concat(descriptors);
    const data = Buffer.alloc(4 + body.length);
    data.writeUInt32BE(body.length, 0);
    body.copy(data, 4);
    return truncated(data, allocationLength);
  }

  let spec: CommandSpec | undefined;
  if (options === 1) {
    if (table.hasServiceActions(requestedOpcode)) return invalidCdbField(2, 2);
    spec = table.find(requestedOpcode);
  } else if (options === 2) {
    if (!table.hasServiceActions(requestedOpcode)) return invalidCdbField(2, 2);
    spec = table.find(requestedOpcode, requestedSa);
  } else if (options === 3) {
    spec = table.hasServiceActions(requestedOpcode)
      ? table.find(requestedOpcode, requestedSa)
      : requestedSa === 0
        ? table.find(requestedOpcode)
        : undefined;
  } else {
    return invalidCdbField(2, 2);
  }
  if (spec !== undefined && !specAvailable(ctx, spec)) spec = undefined;

  if (spec === undefined) {
    const data = Buffer.alloc(4);
    data[1] = 0x01; // SUPPORT 001b: not supported
    return truncated(data, allocationLength);
  }
  const usage = Buffer.from(spec.usage);
  const data = Buffer.alloc(4 + usage.length + (rctd ? 12 : 0));
  data[1] = (rctd ? 0x80 : 0) | 0x03; // CTDP, SUPPORT 011b: supported as the standard says
  data.writeUInt16BE(usage.length, 2);
  usage.copy(data, 4);
  if (rctd) timeoutsDescriptor().copy(data, 4 + usage.length);
  return truncated(data, allocationLength);
}
