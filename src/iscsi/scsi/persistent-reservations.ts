/**
 * SPC-4 persistent reservations (5.13, 6.15 PERSISTENT RESERVE IN, 6.16 PERSISTENT RESERVE OUT).
 * Registrations belong to I_T nexuses (initiator port + target port) and survive session loss
 * and logical unit reset (SPC-4 5.13.1); APTPL is not supported (REPORT CAPABILITIES PTPL_C=0).
 */

import type { CommandContext } from './logical-unit.js';
import { initiatorPortName } from './logical-unit.js';
import {
  GOOD,
  PARAMETER_LIST_LENGTH_ERROR,
  RESERVATION_CONFLICT,
  fail,
  invalidCdbField,
  invalidParameterField,
  truncated,
  type Outcome,
} from './outcome.js';
import { SenseReason } from './sense.js';

/** PERSISTENT RESERVATION TYPE (SPC-4 table 175). */
export const enum ReservationType {
  WriteExclusive = 1,
  ExclusiveAccess = 3,
  WriteExclusiveRegistrantsOnly = 5,
  ExclusiveAccessRegistrantsOnly = 6,
  WriteExclusiveAllRegistrants = 7,
  ExclusiveAccessAllRegistrants = 8,
}

const VALID_TYPES: ReadonlySet<number> = new Set([1, 3, 5, 6, 7, 8]);

/** How a command is treated under a persistent reservation held by someone else (SPC-4 table 52). */
export const enum ReservationAccess {
  /** Allowed whatever the reservation (INQUIRY, REPORT LUNS, PR IN/OUT, TUR, READ CAPACITY...). */
  Always = 0,
  /** Reads: allowed under Write Exclusive types, conflict under Exclusive Access types. */
  Read = 1,
  /** Writes: conflict under every type for a nexus without access. */
  Write = 2,
}

interface Registration {
  key: bigint;
  readonly initiatorPort: string;
}

interface Reservation {
  /** I_T nexus id of the holder (meaningless for all-registrants types: every registrant holds it). */
  holder: string;
  type: ReservationType;
}

function isAllRegistrants(type: ReservationType): boolean {
  return type === ReservationType.WriteExclusiveAllRegistrants || type === ReservationType.ExclusiveAccessAllRegistrants;
}

function isRegistrantsOnlyOrAll(type: ReservationType): boolean {
  return type >= ReservationType.WriteExclusiveRegistrantsOnly;
}

function isExclusiveAccess(type: ReservationType): boolean {
  return (
    type === ReservationType.ExclusiveAccess ||
    type === ReservationType.ExclusiveAccessRegistrantsOnly ||
    type === ReservationType.ExclusiveAccessAllRegistrants
  );
}

export class PersistentReservations {
  generation = 0;
  readonly registrations = new Map<string, Registration>();
  reservation: Reservation | undefined;

  /** True when any registration or reservation exists (then SPC-2 RESERVE/RELEASE conflict). */
  get active(): boolean {
    return this.registrations.size > 0 || this.reservation !== undefined;
  }

  isHolder(itNexusId: string): boolean {
    const r = this.reservation;
    if (r === undefined) return false;
    return isAllRegistrants(r.type) ? this.registrations.has(itNexusId) : r.holder === itNexusId;
  }

  /** SPC-4 5.13.1 table 52: may `itNexusId` run a command of this access class? */
  allows(itNexusId: string, access: ReservationAccess): boolean {
    const r = this.reservation;
    if (r === undefined || access === ReservationAccess.Always) return true;
    if (this.isHolder(itNexusId)) return true;
    if (isRegistrantsOnlyOrAll(r.type) && this.registrations.has(itNexusId)) return true;
    if (access === ReservationAccess.Read) return !isExclusiveAccess(r.type);
    return false;
  }
}

/** PERSISTENT RESERVE IN (SPC-4 6.15). */
export function persistentReserveIn(ctx: CommandContext): Outcome {
  const { cdb } = ctx;
  const pr = ctx.lu.persistentReservations;
  const serviceAction = cdb[1]! & 0x1f;
  const allocationLength = cdb.readUInt16BE(7);
  let data: Buffer;
  switch (serviceAction) {
    case 0x00: {
      // READ KEYS (6.15.2)
      const keys = [...pr.registrations.values()];
      data = Buffer.alloc(8 + 8 * keys.length);
      data.writeUInt32BE(pr.generation >>> 0, 0);
      data.writeUInt32BE(8 * keys.length, 4);
      keys.forEach((r, i) => data.writeBigUInt64BE(r.key, 8 + 8 * i));
      break;
    }
    case 0x01: {
      // READ RESERVATION (6.15.3)
      const r = pr.reservation;
      data = Buffer.alloc(r === undefined ? 8 : 24);
      data.writeUInt32BE(pr.generation >>> 0, 0);
      if (r !== undefined) {
        data.writeUInt32BE(16, 4);
        const key = isAllRegistrants(r.type) ? 0n : (pr.registrations.get(r.holder)?.key ?? 0n);
        data.writeBigUInt64BE(key, 8);
        data[21] = r.type & 0x0f; // SCOPE 0 (LU_SCOPE)
      }
      break;
    }
    case 0x02: {
      // REPORT CAPABILITIES (6.15.4): no SIP/ATP/PTPL; TMV=1, all six types supported.
      data = Buffer.alloc(8);
      data.writeUInt16BE(8, 0);
      data[2] = 0x00;
      data[3] = 0x80 | (1 << 4); // TMV, ALLOW COMMANDS = 001b
      data[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02; // WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
      data[5] = 0x01; // EX_AC_AR
      break;
    }
    case 0x03: {
      // READ FULL STATUS (6.15.5) with iSCSI TransportIDs (SPC-4 7.6.4.6, format 01b).
      const parts: Buffer[] = [];
      for (const [id, reg] of pr.registrations) {
        const name = Buffer.from(reg.initiatorPort, 'utf8');
        const idLength = Math.max(20, (4 + name.length + 1 + 3) & ~3);
        const desc = Buffer.alloc(24 + idLength);
        desc.writeBigUInt64BE(reg.key, 0);
        if (pr.isHolder(id)) {
          desc[12] = 0x01; // R_HOLDER
          desc[13] = pr.reservation!.type & 0x0f;
        }
        desc.writeUInt16BE(1, 18); // RELATIVE TARGET PORT IDENTIFIER
        desc.writeUInt32BE(idLength, 20);
        desc[24] = 0x40 | 0x05; // FORMAT CODE 01b, PROTOCOL IDENTIFIER iSCSI
        desc.writeUInt16BE(idLength - 4, 26);
        name.copy(desc, 28);
        parts.push(desc);
      }
      const body = Buffer.concat(parts);
      data = Buffer.alloc(8 + body.length);
      data.writeUInt32BE(pr.generation >>> 0, 0);
      data.writeUInt32BE(body.length, 4);
      body.copy(data, 8);
      break;
    }
    default:
      return invalidCdbField(1, 4);
  }
  return truncated(data, allocationLength);
}

/** PERSISTENT RESERVE OUT (SPC-4 6.16) with the basic parameter list (6.16.3). */
export function persistentReserveOut(ctx: CommandContext): Outcome {
  const { cdb, session } = ctx;
  const pr = ctx.lu.persistentReservations;
  const serviceAction = cdb[1]! & 0x1f;
  const scope = cdb[2]! >> 4;
  const type = cdb[2]! & 0x0f;
  const parameterListLength = cdb.readUInt32BE(5);
  const dataOutLength = parameterListLength;
  const withLength = (o: Outcome): Outcome => ({ ...o, dataOutLength });

  if (serviceAction > 0x06) return withLength(invalidCdbField(1, 4)); // REGISTER AND MOVE and above: unsupported
  if (parameterListLength !== 24) return withLength(PARAMETER_LIST_LENGTH_ERROR);
  const params = ctx.cmd.dataOut;
  if (params === undefined || params.length < 24) return withLength(PARAMETER_LIST_LENGTH_ERROR);

  const reservationKey = params.readBigUInt64BE(0);
  const serviceActionKey = params.readBigUInt64BE(8);
  const flags = params[20]!;
  if ((flags & 0x08) !== 0) return withLength(invalidParameterField(20, 3)); // SPEC_I_PT unsupported
  if ((flags & 0x04) !== 0) return withLength(invalidParameterField(20, 2)); // ALL_TG_PT unsupported
  if ((flags & 0x01) !== 0) return withLength(invalidParameterField(20, 0)); // APTPL unsupported

  const me = session.itNexusId;
  const mine = pr.registrations.get(me);
  const needsTypeAndScope = serviceAction === 0x01 || serviceAction === 0x02 || serviceAction === 0x04 || serviceAction === 0x05;
  if (needsTypeAndScope && scope !== 0) return withLength(invalidCdbField(2, 7));
  if (needsTypeAndScope && !VALID_TYPES.has(type) && !(serviceAction === 0x02 && mine === undefined)) {
    return withLength(invalidCdbField(2, 3));
  }

  const notify = (ids: Iterable<string>, reason: SenseReason): void => {
    const set = new Set(ids);
    if (set.size === 0) return;
    ctx.target.establishUnitAttention(ctx.lu.lun, reason, (s) => set.has(s.itNexusId));
  };

  switch (serviceAction) {
    case 0x00: // REGISTER
    case 0x06: {
      // REGISTER AND IGNORE EXISTING KEY (SPC-4 5.13.5)
      const ignoreKey = serviceAction === 0x06;
      if (mine === undefined) {
        if (!ignoreKey && reservationKey !== 0n) return withLength(RESERVATION_CONFLICT);
        if (serviceActionKey === 0n) return withLength(GOOD);
        pr.registrations.set(me, { key: serviceActionKey, initiatorPort: initiatorPortName(session.nexus) });
        pr.generation++;
        return withLength(GOOD);
      }
      if (!ignoreKey && reservationKey !== mine.key) return withLength(RESERVATION_CONFLICT);
      if (serviceActionKey === 0n) {
        unregister(ctx, me, notify);
      } else {
        mine.key = serviceActionKey;
      }
      pr.generation++;
      return withLength(GOOD);
    }
    case 0x01: {
      // RESERVE (5.13.6)
      if (mine === undefined || mine.key !== reservationKey) return withLength(RESERVATION_CONFLICT);
      const r = pr.reservation;
      if (r !== undefined) {
        if (pr.isHolder(me) && r.type === type) return withLength(GOOD);
        return withLength(RESERVATION_CONFLICT);
      }
      pr.reservation = { holder: me, type: type as ReservationType };
      return withLength(GOOD);
    }
    case 0x02: {
      // RELEASE (5.13.7)
      if (mine === undefined || mine.key !== reservationKey) return withLength(RESERVATION_CONFLICT);
      const r = pr.reservation;
      if (r === undefined || !pr.isHolder(me)) return withLength(GOOD);
      if (r.type !== type) return withLength(fail(SenseReason.InvalidReleaseOfPersistentReservation));
      pr.reservation = undefined;
      if (isRegistrantsOnlyOrAll(r.type)) {
        notify([...pr.registrations.keys()].filter((id) => id !== me), SenseReason.ReservationsReleased);
      }
      return withLength(GOOD);
    }
    case 0x03: {
      // CLEAR (5.13.8)
      if (mine === undefined || mine.key !== reservationKey) return withLength(RESERVATION_CONFLICT);
      const others = [...pr.registrations.keys()].filter((id) => id !== me);
      pr.registrations.clear();
      pr.reservation = undefined;
      pr.generation++;
      notify(others, SenseReason.ReservationsPreempted);
      return withLength(GOOD);
    }
    default: {
      // PREEMPT (0x04) and PREEMPT AND ABORT (0x05) (5.13.11.4). Task abort is the transport's.
      if (mine === undefined || mine.key !== reservationKey) return withLength(RESERVATION_CONFLICT);
      const r = pr.reservation;
      const removeWithKey = (key: bigint): string[] => {
        const removed: string[] = [];
        for (const [id, reg] of pr.registrations) {
          if (reg.key === key && id !== me) removed.push(id);
        }
        for (const id of removed) pr.registrations.delete(id);
        return removed;
      };
      if (r === undefined) {
        if (serviceActionKey === 0n) return withLength(invalidParameterField(8));
        const removed = removeWithKey(serviceActionKey);
        if (removed.length === 0 && ![...pr.registrations.values()].some((reg) => reg.key === serviceActionKey)) {
          return withLength(RESERVATION_CONFLICT);
        }
        pr.generation++;
        notify(removed, SenseReason.RegistrationsPreempted);
        return withLength(GOOD);
      }
      if (isAllRegistrants(r.type)) {
        if (serviceActionKey === 0n) {
          const removed = [...pr.registrations.keys()].filter((id) => id !== me);
          for (const id of removed) pr.registrations.delete(id);
          pr.reservation = { holder: me, type: type as ReservationType };
          pr.generation++;
          notify(removed, SenseReason.RegistrationsPreempted);
          return withLength(GOOD);
        }
        const removed = removeWithKey(serviceActionKey);
        if (removed.length === 0) return withLength(RESERVATION_CONFLICT);
        pr.generation++;
        notify(removed, SenseReason.RegistrationsPreempted);
        return withLength(GOOD);
      }
      const holderKey = pr.registrations.get(r.holder)?.key;
      if (holderKey === serviceActionKey) {
        const removed = removeWithKey(serviceActionKey);
        pr.reservation = { holder: me, type: type as ReservationType };
        pr.generation++;
        notify(removed, SenseReason.RegistrationsPreempted);
        // A changed type is reported to the registrants that keep their registration (5.13.11.4.3).
        if (r.type !== type) {
          notify(
            [...pr.registrations.keys()].filter((id) => id !== me),
            SenseReason.ReservationsReleased,
          );
        }
        return withLength(GOOD);
      }
      if (serviceActionKey === 0n) return withLength(invalidParameterField(8));
      const removed = removeWithKey(serviceActionKey);
      if (removed.length === 0) return withLength(RESERVATION_CONFLICT);
      pr.generation++;
      notify(removed, SenseReason.RegistrationsPreempted);
      return withLength(GOOD);
    }
  }
}

/** Remove `id`'s registration; release the reservation it held (SPC-4 5.13.10). */
function unregister(ctx: CommandContext, id: string, notify: (ids: Iterable<string>, reason: SenseReason) => void): void {
  const pr = ctx.lu.persistentReservations;
  const r = pr.reservation;
  pr.registrations.delete(id);
  if (r === undefined) return;
  if (isAllRegistrants(r.type)) {
    if (pr.registrations.size === 0) pr.reservation = undefined;
    return;
  }
  if (r.holder === id) {
    pr.reservation = undefined;
    if (isRegistrantsOnlyOrAll(r.type)) notify(pr.registrations.keys(), SenseReason.ReservationsReleased);
  }
}
