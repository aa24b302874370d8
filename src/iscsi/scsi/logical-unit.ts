/**
 * Per-logical-unit state of the SCSI layer and the context handlers run in.
 */

import type { BlockDevice } from '../../block-device.js';
import type { Logger } from '../../log.js';
import type { Nexus, ScsiCommand } from '../scsi-port.js';
import { ModePages } from './mode-pages.js';
import { PersistentReservations } from './persistent-reservations.js';
import { LbaRangeLock } from './range-lock.js';
import { SenseReason } from './sense.js';
import type { CommandTable } from './command-table.js';
import type { CopyResult } from './extended-copy.js';

/**
 * Largest READ/WRITE transfer we accept in one command (VPD B0 MAXIMUM TRANSFER LENGTH): 32 MiB.
 * It must cover MAXIMUM WRITE SAME LENGTH's test writes (libiscsi writes 65536 blocks in one WRITE(16)
 * when the WRITE SAME limit allows it) and stays far below what one Node buffer may hold.
 */
export const MAX_TRANSFER_BYTES = 32 * 1024 * 1024;
/** Largest COMPARE AND WRITE (blocks), VPD B0 byte 5. */
export const MAX_COMPARE_AND_WRITE_BLOCKS = 128;
/** UNMAP limits advertised in VPD B0. */
export const MAX_UNMAP_BLOCKS = 0xffffffff; // no limit (SBC-3 6.5.3)
export const MAX_UNMAP_DESCRIPTORS = 256;
/** Largest WRITE SAME (blocks), VPD B0 bytes 36-43. */
export const MAX_WRITE_SAME_BLOCKS = 0x400000;
/** Bytes written per device.write call while expanding WRITE SAME. */
export const WRITE_SAME_BATCH_BYTES = 1024 * 1024;

export class LogicalUnit {
  readonly lock = new LbaRangeLock();
  readonly mode = new ModePages();
  readonly persistentReservations = new PersistentReservations();
  /** I_T nexus key holding an SPC-2 RESERVE(6)/(10) reservation (SPC-2 7.21). */
  reservationHolder: string | undefined;
  /** Nexus keys that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT=1 (SPC-4 6.13). */
  readonly preventingNexuses = new Set<string>();
  /** Largest transfer in blocks for READ/WRITE/VERIFY (VPD B0 MAXIMUM TRANSFER LENGTH). */
  readonly maxTransferBlocks: number;
  private running = 0;
  private idleWaiters: Array<() => void> = [];

  constructor(
    readonly lun: number,
    readonly device: BlockDevice,
  ) {
    this.maxTransferBlocks = Math.max(1, Math.floor(MAX_TRANSFER_BYTES / device.blockSize));
  }

  commandStarted(): void {
    this.running++;
  }

  commandFinished(): void {
    this.running--;
    if (this.running === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const wake of waiters) wake();
    }
  }

  /** Resolves once no command is running on this logical unit. */
  idle(): Promise<void> {
    if (this.running === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** DATA PROTECT reason for writes, or undefined when writes are allowed. */
  writeProtection(): SenseReason.WriteProtected | SenseReason.SoftwareWriteProtected | undefined {
    if (this.device.readOnly) return SenseReason.WriteProtected;
    if (this.mode.softwareWriteProtect) return SenseReason.SoftwareWriteProtected;
    return undefined;
  }
}

/** Per-I_T-nexus state kept by the target. */
export interface NexusState {
  readonly nexus: Nexus;
  /** I_T nexus identity for persistent reservations: initiator port name + target portal group. */
  readonly itNexusId: string;
  /** Pending unit attentions per LUN, oldest first (SAM-5 5.14). */
  readonly unitAttentions: Map<number, SenseReason[]>;
  /** EXTENDED COPY results held for RECEIVE COPY RESULTS, by list identifier (SPC-4 6.18.3). */
  readonly copyResults: Map<number, CopyResult>;
}

/** What handlers may ask of the target as a whole. */
export interface TargetServices {
  lunNumbers(): number[];
  /** Every logical unit of the target (EXTENDED COPY resolves CSCD descriptors among them). */
  logicalUnits(): Iterable<LogicalUnit>;
  readonly commands: CommandTable;
  /** Queue a unit attention on `lun` for every nexus `which` selects. */
  establishUnitAttention(lun: number, reason: SenseReason, which: (state: NexusState) => boolean): void;
}

export interface CommandContext {
  readonly cmd: ScsiCommand;
  readonly cdb: Buffer;
  readonly lu: LogicalUnit;
  readonly session: NexusState;
  readonly target: TargetServices;
  readonly logger: Logger;
}

export function initiatorPortName(nexus: Nexus): string {
  return `${nexus.initiatorName},i,0x${nexus.isid}`;
}

export function itNexusIdOf(nexus: Nexus): string {
  return `${initiatorPortName(nexus).toLowerCase()}|${nexus.targetPortalGroupTag}`;
}
