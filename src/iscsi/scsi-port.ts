/**
 * The contract between the iSCSI transport (src/iscsi/pdu, login, session) and the SCSI layer
 * (src/iscsi/scsi). The transport turns SCSI Command PDUs (+ their Data-Out) into `ScsiCommand`s and
 * turns `ScsiResult`s into Data-In / SCSI Response PDUs. It never looks inside a CDB except for
 * what RFC 7143 requires; the SCSI layer never sees PDUs.
 */
import type { SegmentedRead } from '../block-device.js';

/** SAM-5 status codes. */
export const enum ScsiStatus {
  Good = 0x00,
  CheckCondition = 0x02,
  ConditionMet = 0x04,
  Busy = 0x08,
  ReservationConflict = 0x18,
  TaskSetFull = 0x28,
  TaskAborted = 0x40,
}

/** The I_T nexus a command arrives on: identifies the initiator port for reservations and UAs. */
export interface Nexus {
  /** Initiator name (iqn...) from the login. */
  readonly initiatorName: string;
  /** ISID as 12 hex digits: initiator port = name + ",i,0x" + isid (RFC 7143 §4.2.7.2). */
  readonly isid: string;
  /** Target portal group tag the session logged in through. */
  readonly targetPortalGroupTag: number;
  /** A key unique per I_T nexus within the process (stable for the life of the session). */
  readonly key: string;
}

export const enum TaskAttribute {
  Untagged = 0,
  Simple = 1,
  Ordered = 2,
  HeadOfQueue = 3,
  Aca = 4,
}

export interface ScsiCommand {
  readonly nexus: Nexus;
  /** LUN as the 8-byte SAM LUN field decoded to a flat number (peripheral/flat addressing). */
  readonly lun: number;
  /** The CDB: the 16 bytes of the BHS, extended by an Extended CDB AHS if present. */
  readonly cdb: Buffer;
  readonly taskAttribute: TaskAttribute;
  /** Expected Data Transfer Length from the BHS (bytes the initiator is prepared to move). */
  readonly expectedDataLength: number;
  /** Data-Out (W bit): all data the initiator sent, exactly `expectedDataLength` bytes. */
  readonly dataOut?: Buffer;
  /** Signalled when the task is aborted by task management; handlers may stop early. */
  readonly signal?: AbortSignal;
}

export interface ScsiResult {
  readonly status: ScsiStatus;
  /** Fixed- or descriptor-format sense data (SPC-4 4.5), only with CHECK CONDITION. */
  readonly sense?: Buffer;
  /**
   * Data-In: exactly what the command produces (already cut to the CDB's allocation length).
   * The transport sends min(length, expectedDataLength) and reports the residual (RFC 7143 §11.4.5).
   */
  readonly dataIn?: Buffer;
  /**
   * Data-In as read-only slices instead of `dataIn`. The transport calls `release()` exactly once,
   * when it no longer needs them (written to the socket, or dropped with the task or connection).
   */
  readonly dataInSegments?: SegmentedRead;
  /**
   * For commands with Data-Out: the number of bytes the CDB asked for. The transport reports the
   * difference to expectedDataLength as residual over/underflow. Omit when the command moves no data.
   */
  readonly dataOutLength?: number;
}

/** Task management functions (RFC 7143 §11.5.1) the SCSI layer must act on. */
export const enum TaskManagementFunction {
  AbortTask = 1,
  AbortTaskSet = 2,
  ClearAca = 3,
  ClearTaskSet = 4,
  LogicalUnitReset = 5,
  TargetWarmReset = 6,
  TargetColdReset = 7,
  TaskReassign = 8,
}

/**
 * What the transport needs from the SCSI side of one iSCSI target (one IQN, its LUNs).
 * One instance per configured target, shared by every session logged in to that target.
 */
export interface ScsiTargetPort {
  /** Execute one command. Never rejects: failures come back as CHECK CONDITION results. */
  execute(cmd: ScsiCommand): Promise<ScsiResult>;
  /** LUNs currently present (for REPORT LUNS and for TMF LUN validation). */
  lunNumbers(): number[];
  /**
   * A logical unit reset (LUN given) or target reset (lun undefined) happened: clear reservations
   * held per SPC-4 rules, establish unit attentions 29/xx for every nexus (SAM-5; libiscsi
   * MultipathIO.Reset checks every path, the resetting one included). The transport
   * itself aborts the affected tasks before calling this.
   */
  reset(kind: 'lun' | 'target', lun: number | undefined, from: Nexus): void;
  /** A nexus is gone (session closed): drop its per-nexus state (pending UAs, sense). */
  nexusLost(nexus: Nexus): void;
  /** A new nexus logged in: it gets a POWER ON/RESET unit attention on its first command. */
  nexusAdded(nexus: Nexus): void;
}
