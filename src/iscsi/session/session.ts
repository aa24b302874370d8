/**
 * One iSCSI session (RFC 7143 §3.4): identity (initiator name + ISID + target, TSIH), the
 * negotiated parameters, the command window and the I_T nexus the SCSI layer sees.
 * MaxConnections is 1, so a session has at most one connection at a time.
 */
import type { Logger } from '../../log.js';
import type { Nexus, ScsiTargetPort } from '../scsi-port.js';
import type { SessionParameters } from '../login/keys.js';
import { CommandWindow } from './command-window.js';

/** Commands the initiator may have outstanding (MaxCmdSN - ExpCmdSN + 1). */
export const COMMAND_WINDOW_DEPTH = 128;

export interface SessionTarget {
  readonly iqn: string;
  readonly port: ScsiTargetPort;
}

export class Session {
  readonly window: CommandWindow;
  readonly nexus: Nexus;
  readonly createdAt = new Date();
  closed = false;

  constructor(
    readonly tsih: number,
    readonly type: 'Normal' | 'Discovery',
    readonly initiatorName: string,
    readonly initiatorAlias: string | undefined,
    readonly isid: string,
    readonly target: SessionTarget | undefined,
    readonly params: SessionParameters,
    readonly targetPortalGroupTag: number,
    firstCmdSN: number,
    readonly logger: Logger,
  ) {
    this.window = new CommandWindow(firstCmdSN, COMMAND_WINDOW_DEPTH);
    this.nexus = {
      initiatorName,
      isid,
      targetPortalGroupTag,
      key: `${initiatorName},i,0x${isid},t,${target?.iqn ?? 'discovery'},0x${targetPortalGroupTag.toString(16)}`,
    };
  }
}
