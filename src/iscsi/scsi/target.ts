/**
 * The SCSI side of one iSCSI target: LUN registry, per-nexus unit attentions, reservations and the
 * command dispatcher (opcode table → generic CDB check → reservation / write-protect checks →
 * handler → sense). Implements the transport contract in ../scsi-port.ts.
 */

import { isStorageError, type BlockDevice, type StorageErrorKind } from '../../block-device.js';
import type { Logger } from '../../log.js';
import {
  ScsiStatus,
  type Nexus,
  type ScsiCommand,
  type ScsiResult,
  type ScsiTargetPort,
} from '../scsi-port.js';
import { CommandFlag, checkCdbMask, type CommandTable } from './command-table.js';
import { COMMANDS } from './commands.js';
import {
  LogicalUnit,
  itNexusIdOf,
  type CommandContext,
  type NexusState,
  type TargetServices,
} from './logical-unit.js';
import { fail, invalidCdbField, type Outcome } from './outcome.js';
import { Opcode, inquiry, reportLuns, requestSense } from './spc.js';
import { SenseReason, buildSense, senseCodeOf } from './sense.js';

export interface ScsiTargetOptions {
  readonly logger: Logger;
}

/** Highest LUN we address (SAM-5 flat space addressing: 14 bits). */
export const MAX_LUN = 0x3fff;

/** Pending unit attentions kept per I_T_L nexus; older ones are dropped beyond this. */
const MAX_PENDING_UNIT_ATTENTIONS = 16;

const STORAGE_ERROR_REASONS: Record<StorageErrorKind, SenseReason> = {
  'medium-error': SenseReason.UnrecoveredReadError,
  'write-error': SenseReason.WriteError,
  'space-exhausted': SenseReason.SpaceAllocationFailedWriteProtect,
  'write-protected': SenseReason.WriteProtected,
};

const GOOD_RESULT: ScsiResult = Object.freeze({ status: ScsiStatus.Good });

/** Resets and power-on (ASC 29h) supersede every other pending unit attention (SAM-5 5.14). */
function isResetClass(reason: SenseReason): boolean {
  return (
    reason === SenseReason.PowerOnReset ||
    reason === SenseReason.ScsiBusResetOccurred ||
    reason === SenseReason.LogicalUnitResetOccurred
  );
}

export class ScsiTarget implements ScsiTargetPort, TargetServices {
  readonly commands: CommandTable = COMMANDS;
  private readonly logger: Logger;
  private readonly units = new Map<number, LogicalUnit>();
  private readonly sessions = new Map<string, NexusState>();
  private sortedLuns: number[] = [];

  constructor(options: ScsiTargetOptions) {
    this.logger = options.logger;
  }

  /** Present `device` as `lun`. Other nexuses get REPORTED LUNS DATA HAS CHANGED (SPC-4 6.33). */
  addLun(lun: number, device: BlockDevice): void {
    if (!Number.isInteger(lun) || lun < 0 || lun > MAX_LUN) throw new RangeError(`LUN ${lun} is not in 0..${MAX_LUN}`);
    if (this.units.has(lun)) throw new Error(`LUN ${lun} is already present`);
    if (!Number.isInteger(device.blockSize) || device.blockSize < 512 || device.blockSize % 512 !== 0) {
      throw new RangeError(`LUN ${lun}: block size ${device.blockSize} is not a multiple of 512`);
    }
    if (!Number.isSafeInteger(device.blockCount) || device.blockCount < 1) {
      throw new RangeError(`LUN ${lun}: block count ${device.blockCount} is invalid`);
    }
    this.units.set(lun, new LogicalUnit(lun, device));
    this.sortedLuns = [...this.units.keys()].sort((a, b) => a - b);
    for (const session of this.sessions.values()) {
      this.pushUnitAttention(session, lun, SenseReason.PowerOnReset);
      for (const other of this.units.keys()) {
        if (other !== lun) this.pushUnitAttention(session, other, SenseReason.ReportedLunsDataChanged);
      }
    }
    this.logger.info({ lun, blocks: device.blockCount, blockSize: device.blockSize }, 'LUN added');
  }

  /** Remove a LUN and close its device; every nexus gets REPORTED LUNS DATA HAS CHANGED. */
  async removeLun(lun: number): Promise<void> {
    const unit = this.units.get(lun);
    if (unit === undefined) throw new Error(`LUN ${lun} is not present`);
    this.units.delete(lun);
    this.sortedLuns = [...this.units.keys()].sort((a, b) => a - b);
    for (const session of this.sessions.values()) {
      session.unitAttentions.delete(lun);
      for (const other of this.units.keys()) this.pushUnitAttention(session, other, SenseReason.ReportedLunsDataChanged);
    }
    this.logger.info({ lun }, 'LUN removed');
    // Commands already running finish on the device before it is closed.
    await unit.idle();
    await unit.device.close();
  }

  lunNumbers(): number[] {
    return [...this.sortedLuns];
  }

  logicalUnits(): Iterable<LogicalUnit> {
    return this.units.values();
  }

  /** The capacity of `lun` changed: every nexus gets CAPACITY DATA HAS CHANGED (SBC-3 4.10). */
  notifyCapacityChanged(lun: number): void {
    this.establishUnitAttention(lun, SenseReason.CapacityDataChanged, () => true);
  }

  nexusAdded(nexus: Nexus): void {
    this.sessions.set(nexus.key, this.newSession(nexus));
  }

  nexusLost(nexus: Nexus): void {
    this.sessions.delete(nexus.key);
    // SPC-2 reservations and medium-removal prevention end with the I_T nexus; PR registrations stay.
    for (const unit of this.units.values()) {
      if (unit.reservationHolder === nexus.key) unit.reservationHolder = undefined;
      unit.preventingNexuses.delete(nexus.key);
    }
  }

  reset(kind: 'lun' | 'target', lun: number | undefined, from: Nexus): void {
    const units = kind === 'lun' ? [lun === undefined ? undefined : this.units.get(lun)] : [...this.units.values()];
    const reason = kind === 'lun' ? SenseReason.LogicalUnitResetOccurred : SenseReason.ScsiBusResetOccurred;
    for (const unit of units) {
      if (unit === undefined) continue;
      // SPC-2 reservations are released by a reset; persistent reservations are not (SPC-4 5.13.1).
      unit.reservationHolder = undefined;
      unit.preventingNexuses.clear();
      // SAM-5 6.3.3 / 6.3.4: the UA goes to every I_T nexus, the one that asked for the reset included
      // (libiscsi's MultipathIO.Reset checks each path).
      this.establishUnitAttention(unit.lun, reason, () => true);
    }
    this.logger.info({ kind, lun, from: from.key }, 'reset');
  }

  establishUnitAttention(lun: number, reason: SenseReason, which: (state: NexusState) => boolean): void {
    for (const session of this.sessions.values()) {
      if (which(session)) this.pushUnitAttention(session, lun, reason);
    }
  }

  /**
   * One promise per command at most: checks run synchronously, only the handler may be async, and
   * its completion is chained once (no async/await layers on the READ/WRITE path).
   */
  execute(cmd: ScsiCommand): Promise<ScsiResult> {
    try {
      const result = this.dispatch(cmd);
      return result instanceof Promise ? result : Promise.resolve(result);
    } catch (err) {
      return Promise.resolve(this.failureResult(cmd, err));
    }
  }

  /** A handler threw or rejected: storage errors map to their sense reason, anything else to a target failure. */
  private failureResult(cmd: ScsiCommand, err: unknown): ScsiResult {
    const unit = this.units.get(cmd.lun);
    if (isStorageError(err)) {
      this.logger.warn({ err, lun: cmd.lun, opcode: cmd.cdb[0] }, 'storage error');
      return this.toResult(fail(STORAGE_ERROR_REASONS[err.kind]), unit);
    }
    this.logger.error({ err, lun: cmd.lun, opcode: cmd.cdb[0] }, 'command failed unexpectedly');
    return this.toResult(fail(SenseReason.InternalTargetFailure), unit);
  }

  private dispatch(cmd: ScsiCommand): ScsiResult | Promise<ScsiResult> {
    const cdb = cmd.cdb;
    if (cdb.length < 6) return this.toResult(fail(SenseReason.InvalidOpcode), undefined);
    const opcode = cdb[0]!;
    const session = this.sessions.get(cmd.nexus.key) ?? this.adoptSession(cmd.nexus);
    const unit = this.units.get(cmd.lun);
    if (unit === undefined) return this.absentLun(cmd);

    // Unit attention (SAM-5 5.14, SPC-4 5.12): INQUIRY and REPORT LUNS do not report it,
    // REQUEST SENSE returns it as parameter data, everything else ends in CHECK CONDITION.
    const pending = session.unitAttentions.get(cmd.lun);
    if (pending !== undefined && pending.length > 0 && opcode !== Opcode.Inquiry) {
      if (opcode === Opcode.ReportLuns) {
        const at = pending.indexOf(SenseReason.ReportedLunsDataChanged);
        if (at >= 0) pending.splice(at, 1);
      } else {
        const reason = pending.shift()!;
        if (opcode === Opcode.RequestSense) return this.toResult(requestSense(cdb, reason), unit);
        return this.toResult(fail(reason), unit);
      }
    }

    const found = this.commands.lookup(cdb);
    if (found.kind === 'invalid-opcode') return this.toResult(fail(SenseReason.InvalidOpcode), unit);
    if (found.kind === 'invalid-service-action') return this.toResult(invalidCdbField(1, 4), unit);
    const spec = found.spec;
    if ((spec.flags & CommandFlag.RequiresUnmap) !== 0 && !unit.device.supportsUnmap) {
      return this.toResult(fail(SenseReason.InvalidOpcode), unit);
    }
    const badField = checkCdbMask(spec, cdb);
    if (badField !== undefined) return this.toResult(badField, unit);

    // SPC-2 reservation held by another nexus (SPC-2 5.5.1).
    const holder = unit.reservationHolder;
    if (holder !== undefined && holder !== cmd.nexus.key && (spec.flags & CommandFlag.AllowedUnderSpc2Reservation) === 0) {
      return this.toResult(fail(SenseReason.ReservationConflict), unit);
    }
    // Persistent reservation (SPC-4 5.13.1 table 52).
    const pr = unit.persistentReservations;
    if (pr.reservation !== undefined && !pr.allows(session.itNexusId, spec.reservationAccess)) {
      return this.toResult(fail(SenseReason.ReservationConflict), unit);
    }
    if ((spec.flags & CommandFlag.Writes) !== 0) {
      const protection = unit.writeProtection();
      if (protection !== undefined) return this.toResult(fail(protection), unit);
    }
    // No abort check here: nothing above waits, so a task aborted later is seen by the handlers
    // that run long (they poll cmd.signal), and the transport never executes an aborted task.
    // Reading cmd.signal would make the transport create an AbortController for every command.

    const ctx: CommandContext = { cmd, cdb, lu: unit, session, target: this, logger: this.logger };
    unit.commandStarted();
    let outcome: Outcome | Promise<Outcome>;
    try {
      outcome = spec.handler(ctx);
    } catch (err) {
      unit.commandFinished();
      return this.failureResult(cmd, err);
    }
    if (!(outcome instanceof Promise)) {
      unit.commandFinished();
      return this.toResult(outcome, unit);
    }
    return outcome.then(
      (done) => {
        unit.commandFinished();
        return this.toResult(done, unit);
      },
      (err: unknown) => {
        unit.commandFinished();
        return this.failureResult(cmd, err);
      },
    );
  }

  /** A LUN that is not present (SPC-4 6.6.2, 6.33, 6.39; SAM-5 5.9.4). */
  private absentLun(cmd: ScsiCommand): ScsiResult {
    const cdb = cmd.cdb;
    const opcode = cdb[0]!;
    const spec = this.commands.find(opcode);
    if (opcode === Opcode.Inquiry || opcode === Opcode.ReportLuns || opcode === Opcode.RequestSense) {
      const badField = checkCdbMask(spec!, cdb);
      if (badField !== undefined) return this.toResult(badField, undefined);
    }
    switch (opcode) {
      case Opcode.Inquiry:
        return this.toResult(inquiry(cdb, undefined), undefined);
      case Opcode.ReportLuns:
        return this.toResult(reportLuns(cdb, this.sortedLuns), undefined);
      case Opcode.RequestSense:
        return this.toResult(requestSense(cdb, SenseReason.LunNotSupported), undefined);
      default:
        return this.toResult(fail(SenseReason.LunNotSupported), undefined);
    }
  }

  private toResult(outcome: Outcome, unit: LogicalUnit | undefined): ScsiResult {
    if (outcome.failure === undefined) {
      if (outcome.dataInSegments !== undefined) return { status: ScsiStatus.Good, dataInSegments: outcome.dataInSegments };
      if (outcome.dataIn === undefined && outcome.dataOutLength === undefined && outcome.conditionMet !== true) {
        return GOOD_RESULT;
      }
      const status = outcome.conditionMet === true ? ScsiStatus.ConditionMet : ScsiStatus.Good;
      if (outcome.dataOutLength === undefined) return { status, dataIn: outcome.dataIn! };
      if (outcome.dataIn === undefined) return { status, dataOutLength: outcome.dataOutLength };
      return { status, dataIn: outcome.dataIn, dataOutLength: outcome.dataOutLength };
    }
    const code = senseCodeOf(outcome.failure);
    if (code.status !== ScsiStatus.CheckCondition) {
      return outcome.dataOutLength === undefined
        ? { status: code.status }
        : { status: code.status, dataOutLength: outcome.dataOutLength };
    }
    const details = {
      ...(outcome.information !== undefined ? { information: outcome.information } : {}),
      ...(outcome.field !== undefined ? { field: outcome.field } : {}),
    };
    const sense = buildSense(outcome.failure, details, unit?.mode.descriptorSense ?? false);
    return outcome.dataOutLength === undefined
      ? { status: ScsiStatus.CheckCondition, sense }
      : { status: ScsiStatus.CheckCondition, sense, dataOutLength: outcome.dataOutLength };
  }

  private newSession(nexus: Nexus): NexusState {
    const session: NexusState = {
      nexus,
      itNexusId: itNexusIdOf(nexus),
      unitAttentions: new Map(),
      copyResults: new Map(),
    };
    for (const lun of this.units.keys()) session.unitAttentions.set(lun, [SenseReason.PowerOnReset]);
    return session;
  }

  /** A command from a nexus the transport never announced: treat it as newly logged in. */
  private adoptSession(nexus: Nexus): NexusState {
    const session = this.newSession(nexus);
    this.sessions.set(nexus.key, session);
    return session;
  }

  private pushUnitAttention(session: NexusState, lun: number, reason: SenseReason): void {
    let queue = session.unitAttentions.get(lun);
    if (queue === undefined) session.unitAttentions.set(lun, (queue = []));
    if (isResetClass(reason)) {
      queue.length = 0;
      queue.push(reason);
      return;
    }
    if (queue.includes(reason)) return;
    if (queue.length >= MAX_PENDING_UNIT_ATTENTIONS) queue.shift();
    queue.push(reason);
  }
}
