/**
 * One iSCSI connection (RFC 7143 §7.1 connection state machine, reduced to what a target at
 * ERL 0 needs): login phase, then full feature phase with SCSI commands (immediate data,
 * unsolicited Data-Out, R2T), Data-In, NOP, Text (SendTargets), Logout, Task Management and
 * Reject. MaxConnections is 1: losing the connection ends the session (§6.3.4 at ERL 0).
 */
import type { Socket } from 'node:net';
import type { Logger } from '../../log.js';
import {
  AhsError,
  decodeDataOut,
  decodeLoginRequest,
  decodeLogoutRequest,
  decodeNopOut,
  decodeScsiCommand,
  decodeTaskManagementRequest,
  decodeTextRequest,
  encodeDataInInto,
  encodeLoginResponse,
  encodeLogoutResponse,
  encodeNopIn,
  encodeReadyToTransfer,
  encodeReject,
  encodeScsiResponse,
  encodeTaskManagementResponse,
  encodeTextResponse,
  initiatorTaskTag,
  isImmediate,
  opcodeOf,
  type Pdu,
  type ScsiCommandFields,
} from '../pdu/bhs.js';
import {
  BHS_LENGTH,
  LogoutReason,
  LogoutResponseCode,
  Opcode,
  RejectReason,
  RESERVED_TAG,
  TaskManagementResponseCode,
} from '../pdu/opcodes.js';
import { FramingError, PduReader } from '../pdu/reader.js';
import { PduWriter } from '../pdu/writer.js';
import { LoginNegotiation, LoginStatus, type LoginResult, type LoginStatusCode, type LoginTargetInfo } from '../login/login.js';
import { negotiateKey, type TargetKeyPolicy } from '../login/keys.js';
import { encodeText, parseText, type TextPair } from '../login/text.js';
import {
  ScsiStatus,
  TaskManagementFunction,
  type Nexus,
  type ScsiCommand,
  type ScsiResult,
  type ScsiTargetPort,
  type TaskAttribute,
} from '../scsi-port.js';
import { serialDiff } from './command-window.js';
import { Session } from './session.js';

/** What a connection needs from the server that owns it. */
export interface ConnectionHost {
  readonly policy: TargetKeyPolicy;
  readonly targetPortalGroupTag: number;
  readonly nopInIntervalMs: number;
  readonly nopInTimeoutMs: number;
  findTarget(iqn: string): (LoginTargetInfo & { readonly port: ScsiTargetPort }) | undefined;
  /** Create or reinstate the session for a completed login, or refuse it. */
  attachSession(result: LoginResult, conn: Connection, firstCmdSN: number): Session | LoginStatusCode;
  /** The connection is gone (its session with it). */
  connectionClosed(conn: Connection): void;
  /** SendTargets answer (§13.3, appendix C) for `value` as seen from this connection. */
  sendTargets(session: Session, value: string, localAddress: string): TextPair[];
  /**
   * Abort tasks of other connections on the same target (LU / target reset, CLEAR TASK SET);
   * returns the ends of those that were already executing (see `abortTasksFor`).
   */
  abortOtherTasks(targetIqn: string, lun: number | undefined, except: Connection): Array<Promise<void>>;
}

interface OutstandingR2T {
  readonly offset: number;
  readonly length: number;
  received: number;
  /** DataSN the next Data-Out of this sequence must carry (§11.7.5: 0, 1, 2, … per R2T). */
  nextDataSN: number;
}

interface ScsiTask {
  readonly itt: number;
  readonly cmdSN: number;
  readonly immediate: boolean;
  readonly fields: ScsiCommandFields;
  /** Bytes of Data-Out expected (EDTL for a write, 0 otherwise). */
  readonly writeLength: number;
  /** Immediate data when it alone is the whole Data-Out (kept as a view, no copy). */
  immediateData: Buffer | undefined;
  /** Assembly buffer when data arrives in several PDUs. */
  assembled: Buffer | undefined;
  received: number;
  unsolicitedDone: boolean;
  /** DataSN the next unsolicited Data-Out must carry. */
  unsolicitedDataSN: number;
  delivered: boolean;
  executing: boolean;
  aborted: boolean;
  nextR2TOffset: number;
  r2tSN: number;
  /** Outstanding R2Ts by TTT; created at the first R2T (most commands never need one). */
  r2ts: Map<number, OutstandingR2T> | undefined;
  /** Created only when the SCSI layer looks at the command's signal (saves work per command). */
  abortController: AbortController | undefined;
  /** A Data-Out of this task failed its data digest: it ends in CHECK CONDITION, never executes. */
  digestError?: boolean;
  /** Settles when the SCSI layer has finished the command (set once it executes). */
  finished?: Promise<void>;
}

/** Response bytes queued in the socket beyond which we stop reading new commands. */
const MAX_QUEUED_RESPONSE_BYTES = 16 * 1024 * 1024;
/** Placeholder that keeps no response data alive in `singleSlice` between commands. */
const EMPTY_SLICE = Buffer.alloc(0);

/** Largest Data-Out buffer we assemble for one command (bounded memory per command). */
const MAX_WRITE_BUFFER = 128 * 1024 * 1024;
/** Most text a continued (C bit) Text Request may buffer on one connection, all ITTs together. */
const MAX_TEXT_REQUEST_BYTES = 1024 * 1024;
const LOGIN_TIMEOUT_MS = 30_000;
const LOGIN_MAX_DATA_SEGMENT = 8192; // §13.12: the default before anything is declared

const enum ConnectionState {
  Login,
  FullFeature,
  LoggedOut,
  Closed,
}

let connectionCounter = 0;

export class Connection {
  readonly id = ++connectionCounter;
  readonly remoteAddress: string;
  readonly localAddress: string;
  private readonly reader: PduReader;
  private readonly writer: PduWriter;
  private state = ConnectionState.Login;
  private login: LoginNegotiation | undefined;
  private statSN = 0;
  private firstLoginSeen = false;
  private loginTimer: NodeJS.Timeout | undefined;
  private nopTimer: NodeJS.Timeout | undefined;
  private lastReceiveAt = Date.now();
  private pingSentAt = 0;
  private nextTargetTransferTag = 1;
  private readonly tasks = new Map<number, ScsiTask>();
  /** Text responses too long for one PDU, continued on the initiator's next Text Request. */
  private readonly textContinuations = new Map<number, { ttt: number; rest: Buffer }>();
  /** Text requests arriving in several PDUs (C bit), by ITT, with the TTT their next part must copy. */
  private readonly textParts = new Map<number, { ttt: number; parts: Buffer[] }>();
  private inFlight = 0;
  private idleWaiters: Array<() => void> = [];
  private draining = false;
  private readPaused = false;
  /** Scratch BHS for Data-In (the writer copies headers, so it is reused for every PDU). */
  private readonly dataInHeader = Buffer.alloc(BHS_LENGTH);
  /** One-slice list for a plain Data-In buffer (sendDataIn does not keep the list: reused). */
  private readonly singleSlice: Buffer[] = [EMPTY_SLICE];
  session: Session | undefined;
  cid = 0;
  logger: Logger;

  constructor(
    private readonly socket: Socket,
    private readonly host: ConnectionHost,
    logger: Logger,
  ) {
    this.remoteAddress = `${socket.remoteAddress ?? '?'}:${socket.remotePort ?? 0}`;
    this.localAddress = socket.localAddress ?? '127.0.0.1';
    this.logger = logger.child({ conn: this.id, remote: this.remoteAddress });
    this.writer = new PduWriter(socket);
    this.reader = new PduReader(
      {
        onPdu: (pdu) => this.onPdu(pdu),
        onDataDigestError: (pdu) => this.onDataDigestError(pdu),
        onFramingError: (err) => this.onFramingError(err),
      },
      { headerDigest: false, dataDigest: false, maxDataSegmentLength: LOGIN_MAX_DATA_SEGMENT },
    );
    socket.setNoDelay(true);
    socket.on('data', (chunk: Buffer) => {
      this.lastReceiveAt = Date.now();
      this.reader.push(chunk);
    });
    socket.on('error', (err) => this.logger.debug({ err }, 'socket error'));
    socket.on('close', () => this.onClosed());
    this.loginTimer = setTimeout(() => {
      this.logger.warn('login not completed in time; closing');
      this.destroy();
    }, LOGIN_TIMEOUT_MS);
    this.loginTimer.unref();
  }

  get isFullFeature(): boolean {
    return this.state === ConnectionState.FullFeature;
  }

  get outstandingTasks(): number {
    return this.tasks.size;
  }

  /** Close now, without waiting for anything. */
  destroy(): void {
    this.reader.stop();
    this.socket.destroy();
  }

  /**
   * Stop reading new PDUs, let running commands finish (up to `timeoutMs`), then close.
   * Nothing new is started after this call.
   */
  async shutdown(timeoutMs: number): Promise<void> {
    this.draining = true;
    this.reader.stop();
    if (this.inFlight > 0) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, timeoutMs);
        timer.unref();
        this.idleWaiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
    if (this.state !== ConnectionState.Closed) {
      await new Promise<void>((resolve) => {
        this.socket.once('close', () => resolve());
        this.writer.flushNow(); // staged responses go before the FIN
        this.socket.end();
        setTimeout(() => this.socket.destroy(), 1000).unref();
      });
    }
  }

  /**
   * Abort (silently, ERL 0) this connection's tasks on `lun` (all LUNs if undefined). Returns the
   * ends of the ones already executing on the device: a task management response must not go out
   * while an aborted command can still change the medium (SAM-5 7.1, RFC 7143 §4.2.3.3).
   */
  abortTasksFor(lun: number | undefined): Array<Promise<void>> {
    const executing: Array<Promise<void>> = [];
    for (const task of [...this.tasks.values()]) {
      if (lun === undefined || task.fields.lun === lun) {
        const finished = this.abortTask(task);
        if (finished !== undefined) executing.push(finished);
      }
    }
    return executing;
  }

  // ---------------------------------------------------------------- receive dispatch

  private onPdu(pdu: Pdu): void {
    try {
      if (this.state === ConnectionState.Login) this.onLoginPhasePdu(pdu);
      else if (this.state === ConnectionState.FullFeature) this.onFullFeaturePdu(pdu);
      // LoggedOut / Closed: ignore whatever still arrives.
    } catch (err) {
      // Never let a malformed PDU take the process down: log, reject, drop the connection.
      this.logger.error({ err, opcode: opcodeOf(pdu.bhs) }, 'error handling PDU; closing connection');
      this.sendReject(RejectReason.ProtocolError, pdu.bhs);
      this.closeAfterFlush();
    }
  }

  private onDataDigestError(pdu: Pdu): void {
    // §7.8: reject with Data Digest Error and discard the PDU.
    this.logger.warn({ opcode: opcodeOf(pdu.bhs) }, 'data digest error');
    this.sendReject(RejectReason.DataDigestError, pdu.bhs);
    // §7.8: for a discarded Data-Out the target must request retransmission (recovery R2T, ERL >= 1)
    // or terminate the task with CHECK CONDITION "protocol service CRC error" (§11.4.7.2) once all
    // its data has arrived. ERL 0 has no recovery R2T: account for the PDU (its header digest was
    // good) without keeping its data, so the task ends instead of waiting for bytes nobody resends.
    if (this.state === ConnectionState.FullFeature && opcodeOf(pdu.bhs) === Opcode.DataOut) {
      const task = this.tasks.get(initiatorTaskTag(pdu.bhs));
      if (task && !task.aborted) {
        task.digestError = true;
        this.onDataOut(pdu);
      }
    }
  }

  private onFramingError(err: FramingError): void {
    this.logger.warn({ kind: err.kind }, err.message);
    if (err.kind === 'data-segment-too-long' && this.state === ConnectionState.FullFeature) {
      this.sendReject(RejectReason.ProtocolError, err.bhs);
    }
    this.closeAfterFlush();
  }

  private onLoginPhasePdu(pdu: Pdu): void {
    const { bhs } = pdu;
    if (opcodeOf(bhs) !== Opcode.LoginRequest) {
      // Only Login Requests are valid before full feature phase (§6.3).
      this.logger.warn({ opcode: opcodeOf(bhs) }, 'non-login PDU during login');
      this.sendLoginFailure(bhs, LoginStatus.InvalidDuringLogin);
      return;
    }
    const req = decodeLoginRequest(bhs);
    if (!this.firstLoginSeen) {
      this.firstLoginSeen = true;
      this.statSN = req.expStatSN;
      this.cid = req.cid;
      this.login = new LoginNegotiation({
        findTarget: (iqn) => this.host.findTarget(iqn),
        targetPortalGroupTag: this.host.targetPortalGroupTag,
        policy: this.host.policy,
      });
      this.logger = this.logger.child({ isid: req.isid });
    }
    const login = this.login!;
    if (this.logger.isLevelEnabled('debug')) {
      this.logger.debug({ csg: req.csg, nsg: req.nsg, transit: req.transit, keys: pdu.data.toString('latin1').split('\0').filter(Boolean) }, 'login request');
    }
    const reply = login.handle(req, pdu.data);
    let tsih = req.tsih;
    let status: LoginStatusCode = reply.status;
    let session: Session | undefined;
    if (reply.complete) {
      const attached = this.host.attachSession(reply.complete, this, req.cmdSN);
      if (attached instanceof Session) {
        session = attached;
        tsih = session.tsih;
      } else status = attached;
    }
    const failed = reply.failed === true || status[0] !== 0;
    const response = encodeLoginResponse({
      transit: failed ? false : reply.transit,
      continue: false,
      csg: reply.csg,
      nsg: failed ? 0 : reply.nsg,
      versionMax: 0,
      versionActive: 0,
      isid: req.isid,
      tsih: failed ? req.tsih : tsih,
      itt: req.itt,
      statSN: this.statSN++,
      expCmdSN: session ? session.window.expCmdSN : req.cmdSN,
      maxCmdSN: session ? session.window.maxCmdSN : req.cmdSN,
      statusClass: status[0],
      statusDetail: status[1],
    });
    this.writer.send(response, failed ? undefined : reply.data);
    if (failed) {
      this.logger.info(
        { statusClass: status[0], statusDetail: status[1], reason: login.failureReason || undefined },
        'login refused',
      );
      this.closeAfterFlush();
      return;
    }
    if (session) this.enterFullFeature(session);
  }

  private enterFullFeature(session: Session): void {
    this.session = session;
    this.state = ConnectionState.FullFeature;
    this.login = undefined;
    if (this.loginTimer) clearTimeout(this.loginTimer);
    const p = session.params;
    // Digests apply from the first PDU after the final Login Response (§13.1).
    this.writer.headerDigest = p.headerDigest;
    this.writer.dataDigest = p.dataDigest;
    this.reader.limits.headerDigest = p.headerDigest;
    this.reader.limits.dataDigest = p.dataDigest;
    this.reader.limits.maxDataSegmentLength = p.targetMaxRecvDataSegmentLength;
    this.logger.info(
      {
        type: session.type,
        target: session.target?.iqn,
        headerDigest: p.headerDigest,
        dataDigest: p.dataDigest,
        maxRecvDataSegmentLength: p.initiatorMaxRecvDataSegmentLength,
        maxBurstLength: p.maxBurstLength,
        firstBurstLength: p.firstBurstLength,
        immediateData: p.immediateData,
        initialR2T: p.initialR2T,
      },
      'login complete',
    );
    this.startNopTimer();
  }

  private onFullFeaturePdu(pdu: Pdu): void {
    const { bhs } = pdu;
    const session = this.session!;
    const opcode = opcodeOf(bhs);
    const discovery = session.type === 'Discovery';
    switch (opcode) {
      case Opcode.NopOut:
        this.onNopOut(pdu);
        return;
      case Opcode.ScsiCommand:
        if (discovery) break;
        this.onScsiCommand(pdu);
        return;
      case Opcode.DataOut:
        if (discovery) break;
        this.onDataOut(pdu);
        return;
      case Opcode.TaskManagementRequest:
        if (discovery) break;
        this.inOrder(bhs, () => this.onTaskManagement(pdu.bhs));
        return;
      case Opcode.TextRequest:
        this.onTextRequest(pdu);
        return;
      case Opcode.LogoutRequest:
        this.inOrder(bhs, () => this.onLogout(pdu.bhs));
        return;
      case Opcode.Snack:
        // §11.16: SNACK needs ERL > 0; at ERL 0 it is a protocol error.
        this.sendReject(RejectReason.ProtocolError, bhs);
        return;
      case Opcode.LoginRequest:
        // A login request on a connection in full feature phase (§6.3).
        this.sendReject(RejectReason.ProtocolError, bhs);
        return;
      default:
        this.sendReject(RejectReason.CommandNotSupported, bhs);
        return;
    }
    // SCSI / Data-Out / TMF in a discovery session (§13.22).
    this.sendReject(RejectReason.ProtocolError, bhs);
  }

  /** Run an immediate request now, a non-immediate one in CmdSN order (§3.2.2.1). */
  private inOrder(bhs: Buffer, run: () => void): void {
    if (isImmediate(bhs)) {
      run();
      return;
    }
    const cmdSN = bhs.readUInt32BE(24);
    // The BHS is a view into the receive buffer, which is never rewritten: safe to keep.
    const outcome = this.session!.window.submit(cmdSN, run);
    if (outcome === 'ignored') this.logger.debug({ cmdSN, opcode: opcodeOf(bhs) }, 'CmdSN outside window: ignored');
  }

  // ---------------------------------------------------------------- NOP (§11.18, §11.19)

  private onNopOut(pdu: Pdu): void {
    const f = decodeNopOut(pdu.bhs);
    if (f.itt === RESERVED_TAG) {
      // Answer to our NOP-In (TTT echoed) or a no-reply ping: nothing to send.
      if (f.ttt !== RESERVED_TAG) this.pingSentAt = 0;
      return;
    }
    const data = pdu.data.length > 0 ? Buffer.from(pdu.data) : undefined;
    this.inOrder(pdu.bhs, () => {
      const session = this.session!;
      const reply = encodeNopIn({
        lun: f.lun === 0xffffffff ? 0 : f.lun,
        itt: f.itt,
        ttt: RESERVED_TAG,
        statSN: this.statSN++,
        expCmdSN: session.window.expCmdSN,
        maxCmdSN: session.window.maxCmdSN,
      });
      // Ping data is echoed, cut to what the initiator can receive (§11.19).
      const echo = data?.subarray(0, session.params.initiatorMaxRecvDataSegmentLength);
      this.writer.send(reply, echo);
    });
  }

  private startNopTimer(): void {
    const interval = this.host.nopInIntervalMs;
    if (interval <= 0) return;
    const timeout = this.host.nopInTimeoutMs;
    const tick = Math.max(50, Math.min(interval, timeout > 0 ? timeout : interval) / 2);
    this.nopTimer = setInterval(() => this.nopTick(interval, timeout), tick);
    this.nopTimer.unref();
  }

  private nopTick(interval: number, timeout: number): void {
    if (this.state !== ConnectionState.FullFeature || this.draining) return;
    const now = Date.now();
    if (this.pingSentAt > 0) {
      if (this.lastReceiveAt >= this.pingSentAt) this.pingSentAt = 0;
      else if (timeout > 0 && now - this.pingSentAt >= timeout) {
        this.logger.warn({ waitedMs: now - this.pingSentAt }, 'NOP-In ping unanswered; dropping connection');
        this.destroy();
        return;
      }
    }
    if (this.pingSentAt === 0 && now - this.lastReceiveAt >= interval) {
      const session = this.session!;
      // Target-initiated ping (§11.19): ITT reserved, a TTT for the answer, StatSN not advanced.
      this.pingSentAt = now;
      this.writer.send(
        encodeNopIn({
          lun: 0,
          itt: RESERVED_TAG,
          ttt: this.newTargetTransferTag(),
          statSN: this.statSN,
          expCmdSN: session.window.expCmdSN,
          maxCmdSN: session.window.maxCmdSN,
        }),
      );
    }
  }

  private newTargetTransferTag(): number {
    const ttt = this.nextTargetTransferTag;
    this.nextTargetTransferTag = (this.nextTargetTransferTag + 1) >>> 0;
    if (this.nextTargetTransferTag === RESERVED_TAG) this.nextTargetTransferTag = 1;
    return ttt;
  }

  // ---------------------------------------------------------------- SCSI commands (§11.3)

  private onScsiCommand(pdu: Pdu): void {
    const session = this.session!;
    const params = session.params;
    let fields: ScsiCommandFields;
    try {
      fields = decodeScsiCommand(pdu);
    } catch (err) {
      if (err instanceof AhsError) {
        this.logger.warn({ err: err.message }, 'malformed AHS');
        this.sendReject(RejectReason.InvalidPduField, pdu.bhs);
        return;
      }
      throw err;
    }
    const immediateLength = pdu.data.length;
    const writeLength = fields.write ? fields.expectedDataLength : 0;
    let reason: RejectReason | undefined;
    if (fields.itt === RESERVED_TAG) reason = RejectReason.InvalidPduField;
    else if (this.tasks.has(fields.itt)) reason = RejectReason.TaskInProgress;
    else if (immediateLength > 0 && !fields.write) reason = RejectReason.ProtocolError;
    else if (immediateLength > 0 && !params.immediateData) reason = RejectReason.ProtocolError; // §13.11
    else if (immediateLength > writeLength || immediateLength > params.firstBurstLength) reason = RejectReason.ProtocolError;
    else if (!fields.final && (!fields.write || params.initialR2T)) reason = RejectReason.ProtocolError; // §13.10
    if (reason !== undefined) {
      this.logger.warn({ itt: fields.itt, reason }, 'SCSI Command rejected');
      this.sendReject(reason, pdu.bhs);
      return;
    }
    const task: ScsiTask = {
      itt: fields.itt,
      cmdSN: fields.cmdSN,
      immediate: fields.immediate,
      fields,
      writeLength,
      immediateData: undefined,
      assembled: undefined,
      received: 0,
      unsolicitedDone: fields.final,
      unsolicitedDataSN: 0,
      delivered: false,
      executing: false,
      aborted: false,
      nextR2TOffset: 0,
      r2tSN: 0,
      r2ts: undefined,
      abortController: undefined,
    };
    if (immediateLength > 0) {
      if (immediateLength === writeLength) task.immediateData = pdu.data;
      // A write too large to buffer is refused when its turn comes (deliverTask), not here: an
      // answered command's CmdSN must be consumed in order, or later commands wait for it forever,
      // and an out-of-window one must get no answer at all (§3.2.2.1).
      else if (writeLength <= MAX_WRITE_BUFFER) this.placeData(task, 0, pdu.data);
      task.received = immediateLength;
    }
    this.tasks.set(task.itt, task);
    if (fields.immediate) this.deliverTask(task);
    else {
      const outcome = session.window.submit(fields.cmdSN, () => this.deliverTask(task));
      if (outcome === 'ignored') {
        // Outside the window or a duplicate: silently ignored (§3.2.2.1).
        this.tasks.delete(task.itt);
        this.logger.debug({ cmdSN: fields.cmdSN, expCmdSN: session.window.expCmdSN }, 'CmdSN outside window: ignored');
      }
    }
  }

  /** Copy data into the task's assembly buffer. false (and a response sent) when it cannot. */
  private placeData(task: ScsiTask, offset: number, data: Buffer): boolean {
    if (!task.assembled) {
      if (task.writeLength > MAX_WRITE_BUFFER) {
        this.tasks.delete(task.itt);
        task.aborted = true;
        this.sendCheckCondition(task, INVALID_FIELD_IN_CDB);
        return false;
      }
      task.assembled = Buffer.allocUnsafe(task.writeLength);
    }
    data.copy(task.assembled, offset);
    return true;
  }

  private deliverTask(task: ScsiTask): void {
    task.delivered = true;
    if (task.aborted || this.draining) return;
    if (task.writeLength > MAX_WRITE_BUFFER) {
      // More than we assemble for one command: refused in CmdSN order, before any R2T.
      this.tasks.delete(task.itt);
      task.aborted = true;
      this.sendCheckCondition(task, INVALID_FIELD_IN_CDB);
      return;
    }
    this.advanceWrite(task);
  }

  /** Issue R2Ts for data still missing, or execute once everything is here (§11.8). */
  private advanceWrite(task: ScsiTask): void {
    if (!task.delivered || task.executing || task.aborted) return;
    if (task.received >= task.writeLength) {
      if (task.r2ts !== undefined && task.r2ts.size > 0) return;
      if (task.digestError) {
        // §7.8 b: all data is in, part of it failed its digest: nothing is written.
        this.abortTask(task);
        this.sendCheckCondition(task, PROTOCOL_SERVICE_CRC_ERROR);
        return;
      }
      this.execute(task);
      return;
    }
    if (!task.unsolicitedDone) return; // unsolicited Data-Out still coming (F bit not seen)
    const session = this.session!;
    const p = session.params;
    const r2ts = (task.r2ts ??= new Map());
    if (task.nextR2TOffset < task.received && r2ts.size === 0) task.nextR2TOffset = task.received;
    this.writer.burst(() => {
      while (r2ts.size < p.maxOutstandingR2T && task.nextR2TOffset < task.writeLength) {
        const offset = task.nextR2TOffset;
        const length = Math.min(p.maxBurstLength, task.writeLength - offset);
        const ttt = this.newTargetTransferTag();
        r2ts.set(ttt, { offset, length, received: 0, nextDataSN: 0 });
        task.nextR2TOffset += length;
        this.writer.send(
          encodeReadyToTransfer({
            lun: task.fields.lun,
            itt: task.itt,
            ttt,
            statSN: this.statSN,
            expCmdSN: session.window.expCmdSN,
            maxCmdSN: session.window.maxCmdSN,
            r2tSN: task.r2tSN++,
            bufferOffset: offset,
            desiredLength: length,
          }),
        );
      }
    });
  }

  private onDataOut(pdu: Pdu): void {
    const f = decodeDataOut(pdu.bhs);
    const task = this.tasks.get(f.itt);
    if (!task) {
      // Data for a task that was aborted or never accepted: discard (§4.2.3.3 stragglers).
      this.logger.debug({ itt: f.itt }, 'Data-Out for unknown task discarded');
      return;
    }
    const len = pdu.data.length;
    const end = f.bufferOffset + len;
    if (end > task.writeLength) {
      this.sendReject(RejectReason.ProtocolError, pdu.bhs);
      return;
    }
    if (f.ttt === RESERVED_TAG) {
      // Unsolicited data (§13.10, §13.14): only with InitialR2T=No, within FirstBurstLength.
      const p = this.session!.params;
      if (p.initialR2T || task.unsolicitedDone || end > p.firstBurstLength) {
        this.sendReject(RejectReason.ProtocolError, pdu.bhs);
        return;
      }
      if (f.dataSN !== task.unsolicitedDataSN) {
        this.dataSequenceError(task, task.unsolicitedDataSN, f.dataSN);
        return;
      }
      if (f.bufferOffset !== task.received) {
        // §13.18 DataPDUInOrder=Yes (the only value we accept): no gap, no overlap. Counting bytes
        // alone would let a misplaced PDU "complete" the buffer with bytes never sent.
        this.dataSequenceError(task, task.unsolicitedDataSN, f.dataSN);
        return;
      }
      task.unsolicitedDataSN++;
      if (len > 0 && !this.placeData(task, f.bufferOffset, pdu.data)) return;
      task.received += len;
      if (f.final) task.unsolicitedDone = true;
      if (task.unsolicitedDone || task.received >= task.writeLength) this.advanceWrite(task);
      return;
    }
    const r2t = task.r2ts?.get(f.ttt);
    if (!r2t || f.bufferOffset < r2t.offset || end > r2t.offset + r2t.length) {
      this.sendReject(RejectReason.InvalidPduField, pdu.bhs);
      return;
    }
    if (f.dataSN !== r2t.nextDataSN) {
      this.dataSequenceError(task, r2t.nextDataSN, f.dataSN);
      return;
    }
    if (f.bufferOffset !== r2t.offset + r2t.received || (f.final && r2t.received + len < r2t.length)) {
      // §13.18 DataPDUInOrder=Yes: each PDU starts where the previous one ended (no gap, no overlap).
      // §11.7.1: F marks the last Data-Out answering the R2T; ending it short leaves bytes nobody
      // will send (ERL 0 asks for no retransmission): terminate the task like a DataSN error.
      this.dataSequenceError(task, r2t.nextDataSN, f.dataSN);
      return;
    }
    r2t.nextDataSN++;
    if (len > 0 && !this.placeData(task, f.bufferOffset, pdu.data)) return;
    r2t.received += len;
    task.received += len;
    if (r2t.received >= r2t.length || f.final) {
      task.r2ts!.delete(f.ttt);
      this.advanceWrite(task);
    }
  }

  /**
   * A Data-Out out of sequence: wrong DataSN (lost, repeated or reordered PDU, §11.7.5), wrong
   * buffer offset, or a sequence ended early. ERL 0 cannot
   * recover it by SNACK (§7.1.4.1): the task ends with CHECK CONDITION, ABORTED COMMAND /
   * DATA PHASE ERROR (SPC-4: 0B/4B/00); later Data-Out for it is discarded. The connection stays.
   */
  private dataSequenceError(task: ScsiTask, expected: number, got: number): void {
    this.logger.warn({ itt: task.itt, expectedDataSN: expected, dataSN: got }, 'Data-Out out of sequence; task terminated');
    this.abortTask(task);
    this.sendCheckCondition(task, DATA_PHASE_ERROR);
  }

  private execute(task: ScsiTask): void {
    const session = this.session!;
    const target = session.target!;
    task.executing = true;
    let dataOut: Buffer | undefined;
    if (task.writeLength > 0) dataOut = task.immediateData ?? task.assembled;
    const cmd = new TaskCommand(task, session.nexus, dataOut);
    this.inFlight++;
    let running: Promise<ScsiResult>;
    try {
      running = target.port.execute(cmd);
    } catch (err) {
      running = Promise.reject(err);
    }
    // One reaction per command: completion, contract breach and send errors all end here.
    task.finished = running.then(
      (result) => this.finishCommand(task, result),
      (err: unknown) => {
        this.logger.error({ err, itt: task.itt }, 'SCSI layer failed a command');
        this.finishCommand(task, undefined);
      },
    );
  }

  private finishCommand(task: ScsiTask, result: ScsiResult | undefined): void {
    try {
      this.complete(task, result);
    } catch (err) {
      this.logger.error({ err, itt: task.itt }, 'error sending a command response; closing');
      this.destroy();
    }
    if (--this.inFlight === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  /** Send Data-In and status for a finished command (§11.4, §11.7). */
  private complete(task: ScsiTask, result: ScsiResult | undefined): void {
    if (this.tasks.get(task.itt) === task) this.tasks.delete(task.itt);
    if (task.aborted || this.state !== ConnectionState.FullFeature || this.writer.closed) {
      result?.dataInSegments?.release();
      return;
    }
    this.sendCompletion(task, result);
    this.applyBackpressure();
  }

  /**
   * Flow control: when the initiator reads responses more slowly than we produce them, stop
   * reading new PDUs until the socket drains, so queued response data stays bounded. The bound is
   * far above one turn's corked burst (a QD32 burst of 4 KiB reads is ~130 KiB, over the socket's
   * 16 KiB highWaterMark), so a healthy initiator never pays a pause/resume per turn.
   */
  private applyBackpressure(): void {
    const socket = this.socket;
    if (this.readPaused || socket.writableLength < MAX_QUEUED_RESPONSE_BYTES || !socket.writableNeedDrain) return;
    this.readPaused = true;
    socket.pause();
    socket.once('drain', () => {
      this.readPaused = false;
      if (this.state !== ConnectionState.Closed) socket.resume();
    });
  }

  private sendCompletion(task: ScsiTask, result: ScsiResult | undefined): void {
    const session = this.session!;
    const f = task.fields;
    if (!result) {
      // The SCSI layer broke its contract: report a target failure (§11.4.3 Response 0x01).
      this.writer.send(
        encodeScsiResponse({
          response: 0x01,
          status: 0,
          itt: task.itt,
          statSN: this.statSN++,
          expCmdSN: session.window.expCmdSN,
          maxCmdSN: session.window.maxCmdSN,
          expDataSN: 0,
          overflow: false,
          underflow: false,
          residualCount: 0,
        }),
      );
      return;
    }
    const edtl = f.expectedDataLength;
    const segmented = result.dataInSegments;
    const produced = segmented !== undefined ? segmented.length : (result.dataIn?.length ?? 0);
    // §11.4.5: residuals compare what the command moves with what the initiator expected.
    let expected: number;
    let actual: number;
    let bidiExpected = 0;
    const bidi = f.read && f.write;
    if (f.write) {
      expected = edtl;
      actual = result.dataOutLength ?? 0;
      if (bidi) bidiExpected = f.bidiReadLength ?? 0;
    } else if (f.read) {
      expected = edtl;
      actual = produced;
    } else if (produced > 0) {
      expected = 0;
      actual = produced;
    } else {
      expected = edtl;
      actual = 0;
    }
    const readCapacity = bidi ? bidiExpected : f.read ? edtl : 0;
    const sendLength = Math.min(produced, readCapacity);
    const overflow = actual > expected;
    const underflow = actual < expected;
    const residualCount = overflow ? actual - expected : expected - actual;
    const bidiOverflow = bidi && produced > bidiExpected;
    const bidiUnderflow = bidi && produced < bidiExpected;
    const bidiResidual = bidiOverflow ? produced - bidiExpected : bidiUnderflow ? bidiExpected - produced : 0;

    const collapse =
      sendLength > 0 && !result.sense && !bidi && (result.status === ScsiStatus.Good || result.status === ScsiStatus.ConditionMet);
    this.writer.burst(() => {
      let dataSN = 0;
      if (segmented !== undefined) {
        dataSN = this.sendDataIn(task, segmented.segments, sendLength, collapse, result.status, overflow, underflow, residualCount, segmented.release);
      } else if (sendLength > 0) {
        const slices = this.singleSlice;
        slices[0] = result.dataIn!;
        dataSN = this.sendDataIn(task, slices, sendLength, collapse, result.status, overflow, underflow, residualCount);
        slices[0] = EMPTY_SLICE;
      }
      if (collapse) return;
      let senseSegment: Buffer | undefined;
      if (result.sense && result.sense.length > 0) {
        // §11.4.7: SenseLength (2 bytes) followed by the sense data.
        senseSegment = Buffer.allocUnsafe(2 + result.sense.length);
        senseSegment.writeUInt16BE(result.sense.length, 0);
        result.sense.copy(senseSegment, 2);
      }
      this.writer.send(
        encodeScsiResponse({
          response: 0x00,
          status: result.status,
          itt: task.itt,
          statSN: this.statSN++,
          expCmdSN: session.window.expCmdSN,
          maxCmdSN: session.window.maxCmdSN,
          expDataSN: dataSN + task.r2tSN,
          overflow,
          underflow,
          residualCount,
          bidiOverflow,
          bidiUnderflow,
          bidiReadResidualCount: bidiResidual,
        }),
        senseSegment,
      );
    });
  }

  /**
   * Data-In PDUs of at most the initiator's MaxRecvDataSegmentLength, F at the end of every
   * MaxBurstLength sequence (§11.7.1), status in the last one when collapsed (S bit).
   * `data` is the SCSI layer's Data-In as consecutive slices; each PDU's payload goes to the socket as
   * slices of them, uncopied. `release` (of a SegmentedRead) runs once every PDU's payload has been
   * written. Returns the PDU count.
   */
  private sendDataIn(
    task: ScsiTask,
    data: readonly Buffer[],
    length: number,
    collapse: boolean,
    status: number,
    overflow: boolean,
    underflow: boolean,
    residualCount: number,
    release?: () => void,
  ): number {
    const session = this.session!;
    const p = session.params;
    const segment = Math.max(512, p.initiatorMaxRecvDataSegmentLength);
    const burst = Math.max(segment, p.maxBurstLength);
    // The writer copies each BHS as it is sent, so one scratch header serves every Data-In PDU.
    const bhs = this.dataInHeader;
    let pduCount = 0;
    let offset = 0;
    let usedInBurst = 0;
    // Cursor into `data`: slice index and offset in it.
    let part = 0;
    let partOffset = 0;
    let unwritten = 1; // one extra count, dropped after the loop, so release waits for every PDU
    const written =
      release === undefined
        ? undefined
        : (): void => {
            if (--unwritten === 0) release();
          };
    while (offset < length) {
      const n = Math.min(segment, length - offset, burst - usedInBurst);
      const last = offset + n === length;
      usedInBurst += n;
      const endOfSequence = last || usedInBurst === burst;
      if (usedInBurst === burst) usedInBurst = 0;
      const withStatus = last && collapse;
      encodeDataInInto(bhs, {
        final: endOfSequence,
        hasStatus: withStatus,
        status,
        lun: task.fields.lun,
        itt: task.itt,
        statSN: withStatus ? this.statSN++ : 0,
        expCmdSN: session.window.expCmdSN,
        maxCmdSN: session.window.maxCmdSN,
        dataSN: pduCount,
        bufferOffset: offset,
        overflow,
        underflow,
        residualCount,
      });
      // This PDU's payload: n bytes from the cursor, as one slice (no list) or several.
      let payload: Buffer | Buffer[] | undefined;
      for (let need = n; need > 0; ) {
        const slice = data[part]!;
        const take = Math.min(need, slice.length - partOffset);
        const piece = partOffset === 0 && take === slice.length ? slice : slice.subarray(partOffset, partOffset + take);
        if (payload === undefined) payload = piece;
        else if (Buffer.isBuffer(payload)) payload = [payload, piece];
        else payload.push(piece);
        need -= take;
        partOffset += take;
        if (partOffset === slice.length) {
          part++;
          partOffset = 0;
        }
      }
      if (written !== undefined) unwritten++;
      this.writer.send(bhs, payload, undefined, written);
      offset += n;
      pduCount++;
    }
    written?.();
    return pduCount;
  }

  private sendCheckCondition(task: ScsiTask, sense: Buffer): void {
    const session = this.session!;
    const segment = Buffer.allocUnsafe(2 + sense.length);
    segment.writeUInt16BE(sense.length, 0);
    sense.copy(segment, 2);
    this.writer.send(
      encodeScsiResponse({
        response: 0,
        status: ScsiStatus.CheckCondition,
        itt: task.itt,
        statSN: this.statSN++,
        expCmdSN: session.window.expCmdSN,
        maxCmdSN: session.window.maxCmdSN,
        expDataSN: 0,
        // The command moved no data: all of the expected length is residual (§11.4.5).
        overflow: false,
        underflow: task.fields.expectedDataLength > 0,
        residualCount: task.fields.expectedDataLength,
      }),
      segment,
    );
  }

  /**
   * Send a response that must not go out while aborted commands still run on the device (task
   * management, logout): now if none is executing, else once all of `executing` have ended.
   */
  private whenFinished(executing: ReadonlyArray<Promise<void>>, respond: () => void): void {
    if (executing.length === 0) respond();
    else void Promise.all(executing).then(respond);
  }

  /** Abort `task`; if the device is already executing it, the promise of its end. */
  private abortTask(task: ScsiTask): Promise<void> | undefined {
    task.aborted = true;
    task.abortController?.abort();
    if (this.tasks.get(task.itt) === task) this.tasks.delete(task.itt);
    if (!task.delivered && !task.immediate) this.session?.window.cancelHeld(task.cmdSN);
    return task.executing ? task.finished : undefined;
  }

  // ---------------------------------------------------------------- Task management (§11.5)

  private onTaskManagement(bhs: Buffer): void {
    const session = this.session!;
    const target = session.target!;
    const f = decodeTaskManagementRequest(bhs);
    let response: TaskManagementResponseCode;
    // Aborted commands still running on the device: the response waits for them (abortTasksFor).
    const executing: Array<Promise<void>> = [];
    const lunPresent = (): boolean => target.port.lunNumbers().includes(f.lun);
    switch (f.function) {
      case TaskManagementFunction.AbortTask: {
        const task = this.tasks.get(f.referencedTaskTag);
        if (task && task.fields.lun === f.lun) {
          const finished = this.abortTask(task);
          if (finished !== undefined) executing.push(finished);
          response = TaskManagementResponseCode.FunctionComplete;
        } else if (
          !task &&
          session.window.inWindow(f.refCmdSN) &&
          serialDiff(f.refCmdSN, f.cmdSN) < 0 &&
          serialDiff(f.refCmdSN, session.window.expCmdSN) >= 0
        ) {
          // §11.5.1 b: a command never received: consider its CmdSN received.
          session.window.markReceived(f.refCmdSN);
          response = TaskManagementResponseCode.FunctionComplete;
        } else {
          // Already completed (or never existed): "task does not exist" (§11.5.1 c).
          response = TaskManagementResponseCode.TaskDoesNotExist;
        }
        break;
      }
      case TaskManagementFunction.AbortTaskSet:
        if (!lunPresent()) response = TaskManagementResponseCode.LunDoesNotExist;
        else {
          executing.push(...this.abortTasksFor(f.lun));
          response = TaskManagementResponseCode.FunctionComplete;
        }
        break;
      case TaskManagementFunction.ClearTaskSet:
        if (!lunPresent()) response = TaskManagementResponseCode.LunDoesNotExist;
        else {
          executing.push(...this.abortTasksFor(f.lun), ...this.host.abortOtherTasks(target.iqn, f.lun, this));
          response = TaskManagementResponseCode.FunctionComplete;
        }
        break;
      case TaskManagementFunction.LogicalUnitReset:
        if (!lunPresent()) response = TaskManagementResponseCode.LunDoesNotExist;
        else {
          executing.push(...this.abortTasksFor(f.lun), ...this.host.abortOtherTasks(target.iqn, f.lun, this));
          target.port.reset('lun', f.lun, session.nexus);
          response = TaskManagementResponseCode.FunctionComplete;
        }
        break;
      case TaskManagementFunction.TargetWarmReset:
        executing.push(...this.abortTasksFor(undefined), ...this.host.abortOtherTasks(target.iqn, undefined, this));
        target.port.reset('target', undefined, session.nexus);
        response = TaskManagementResponseCode.FunctionComplete;
        break;
      case TaskManagementFunction.TaskReassign:
        // §11.5.1: allegiance reassignment needs ERL 2.
        response = TaskManagementResponseCode.TaskAllegianceReassignmentNotSupported;
        break;
      default:
        response = TaskManagementResponseCode.FunctionNotSupported;
    }
    this.logger.info({ function: f.function, lun: f.lun, rtt: f.referencedTaskTag, response }, 'task management');
    const respond = (): void => {
      if (this.state !== ConnectionState.FullFeature || this.writer.closed) return;
      this.writer.send(
        encodeTaskManagementResponse({
          response,
          itt: f.itt,
          statSN: this.statSN++,
          expCmdSN: session.window.expCmdSN,
          maxCmdSN: session.window.maxCmdSN,
        }),
      );
    };
    this.whenFinished(executing, respond);
  }

  // ---------------------------------------------------------------- Text (§11.10, §11.11)

  private onTextRequest(pdu: Pdu): void {
    const f = decodeTextRequest(pdu.bhs);
    if (f.itt === RESERVED_TAG) {
      this.sendReject(RejectReason.InvalidPduField, pdu.bhs);
      return;
    }
    const data = Buffer.from(pdu.data);
    this.inOrder(pdu.bhs, () => this.answerText(f.itt, f.ttt, f.continue, data, pdu.bhs));
  }

  private answerText(itt: number, ttt: number, continued: boolean, data: Buffer, bhs: Buffer): void {
    const session = this.session!;
    let earlier: Buffer[] | undefined;
    if (ttt === RESERVED_TAG) {
      // §11.10.4: a reserved TTT is a new request: forget what was pending for this ITT.
      this.textContinuations.delete(itt);
      this.textParts.delete(itt);
    } else {
      // §11.10.4: the TTT of our last response, copied, continues that exchange: the next part of
      // a long response of ours, or more of the initiator's text (C bit, §11.10.2).
      const pending = this.textContinuations.get(itt);
      const partial = this.textParts.get(itt);
      if (pending !== undefined && pending.ttt === ttt) {
        this.textContinuations.delete(itt);
        this.sendTextResponse(itt, pending.rest);
        return;
      }
      if (partial === undefined || partial.ttt !== ttt) {
        this.sendReject(RejectReason.InvalidPduField, bhs);
        return;
      }
      this.textParts.delete(itt);
      earlier = partial.parts;
    }
    if (continued) {
      const parts = earlier ? [...earlier, data] : [data];
      let buffered = 0;
      for (const pendingText of this.textParts.values()) for (const part of pendingText.parts) buffered += part.length;
      for (const part of parts) buffered += part.length;
      if (buffered > MAX_TEXT_REQUEST_BYTES) {
        // Bounded like a login's text (which stops at 64 parts): the exchange is dropped and the
        // PDU rejected as beyond our resources (§11.17.1, reason 0x0a).
        this.logger.warn({ itt, buffered }, 'continued text request too long; rejected');
        this.sendReject(RejectReason.LongOperationReject, bhs);
        return;
      }
      const next = this.newTargetTransferTag();
      this.textParts.set(itt, { ttt: next, parts });
      // Empty, F=0 with a TTT to copy (§11.11.4); C=0: no text of ours is being continued (§11.11.2).
      this.sendTextPart(itt, Buffer.alloc(0), true, next, false);
      return;
    }
    const text = earlier ? Buffer.concat([...earlier, data]) : data;
    const parsed = parseText(text);
    if (!parsed.ok) {
      this.logger.warn({ reason: parsed.reason }, 'malformed text request');
      this.sendReject(RejectReason.ProtocolError, bhs);
      return;
    }
    const replies: TextPair[] = [];
    for (const { key, value } of parsed.pairs) {
      if (key === 'SendTargets') {
        replies.push(...this.host.sendTargets(session, value, this.localAddress));
      } else if (key === 'MaxRecvDataSegmentLength') {
        // Declarative and allowed in full feature phase (§13.12): takes effect now.
        const outcome = negotiateKey(key, value, { policy: this.host.policy, discovery: false, params: session.params });
        replies.push({ key, value: outcome.reply ?? String(session.params.targetMaxRecvDataSegmentLength) });
      } else if (key.startsWith('X-') || key.startsWith('X#')) {
        replies.push({ key, value: 'NotUnderstood' });
      } else {
        const probe = negotiateKey(key, value, { policy: this.host.policy, discovery: false, params: { ...session.params } });
        // Known keys other than the above are leading-only / initialize-only: not renegotiable here.
        replies.push({ key, value: probe.reply === 'NotUnderstood' ? 'NotUnderstood' : 'Reject' });
      }
    }
    this.sendTextResponse(itt, encodeText(replies));
  }

  private sendTextResponse(itt: number, body: Buffer): void {
    const max = this.session!.params.initiatorMaxRecvDataSegmentLength;
    if (body.length <= max) {
      this.sendTextPart(itt, body, false, RESERVED_TAG);
      return;
    }
    const ttt = this.newTargetTransferTag();
    this.textContinuations.set(itt, { ttt, rest: body.subarray(max) });
    this.sendTextPart(itt, body.subarray(0, max), true, ttt);
  }

  private sendTextPart(itt: number, body: Buffer, more: boolean, ttt: number, textContinues = more): void {
    const session = this.session!;
    this.writer.send(
      encodeTextResponse({
        final: !more,
        continue: textContinues,
        lun: 0,
        itt,
        ttt,
        statSN: this.statSN++,
        expCmdSN: session.window.expCmdSN,
        maxCmdSN: session.window.maxCmdSN,
      }),
      body,
    );
  }

  // ---------------------------------------------------------------- Logout (§11.14, §11.15)

  private onLogout(bhs: Buffer): void {
    const session = this.session!;
    const f = decodeLogoutRequest(bhs);
    let response = LogoutResponseCode.Success;
    if (f.reason === LogoutReason.RemoveConnectionForRecovery) response = LogoutResponseCode.RecoveryNotSupported;
    else if (f.reason === LogoutReason.CloseConnection && f.cid !== this.cid) response = LogoutResponseCode.CidNotFound;
    else if (f.reason !== LogoutReason.CloseSession && f.reason !== LogoutReason.CloseConnection) {
      this.sendReject(RejectReason.InvalidPduField, bhs);
      return;
    }
    const closing = response === LogoutResponseCode.Success;
    // The connection's tasks end with it; like a task management response, the Logout Response
    // waits for those already executing, so nothing changes the medium after it (§11.14).
    const executing = closing ? this.abortTasksFor(undefined) : [];
    if (closing) this.state = ConnectionState.LoggedOut;
    const respond = (): void => {
      if (this.writer.closed) return;
      this.writer.send(
        encodeLogoutResponse({
          response,
          itt: f.itt,
          statSN: this.statSN++,
          expCmdSN: session.window.expCmdSN,
          maxCmdSN: session.window.maxCmdSN,
          // ERL 0: nothing is retained, reconnect after Time2Wait (§11.15.2-3).
          time2Wait: closing ? session.params.defaultTime2Wait : 0,
          time2Retain: 0,
        }),
      );
      this.logger.info({ reason: f.reason, response }, 'logout');
      if (closing) this.closeAfterFlush();
    };
    this.whenFinished(executing, respond);
  }

  // ---------------------------------------------------------------- Reject, login failure, close

  private sendReject(reason: RejectReason, rejectedBhs: Buffer): void {
    const session = this.session;
    const header = encodeReject({
      reason,
      statSN: this.statSN++,
      expCmdSN: session ? session.window.expCmdSN : 0,
      maxCmdSN: session ? session.window.maxCmdSN : 0,
      dataSNOrR2TSN: 0,
    });
    // §11.17: the data segment is the complete header of the rejected PDU.
    this.writer.send(header, Buffer.from(rejectedBhs.subarray(0, BHS_LENGTH)));
  }

  private sendLoginFailure(bhs: Buffer, status: LoginStatusCode): void {
    this.writer.send(
      encodeLoginResponse({
        transit: false,
        continue: false,
        csg: 0,
        nsg: 0,
        versionMax: 0,
        versionActive: 0,
        isid: '000000000000',
        tsih: 0,
        itt: initiatorTaskTag(bhs),
        statSN: this.statSN++,
        expCmdSN: 0,
        maxCmdSN: 0,
        statusClass: status[0],
        statusDetail: status[1],
      }),
    );
    this.closeAfterFlush();
  }

  private closeAfterFlush(): void {
    this.reader.stop();
    if (this.state !== ConnectionState.Closed) this.state = ConnectionState.LoggedOut;
    this.writer.flushNow(); // staged responses (Reject, Logout Response) go before the FIN
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 2000).unref();
  }

  private onClosed(): void {
    if (this.state === ConnectionState.Closed) return;
    this.state = ConnectionState.Closed;
    this.reader.stop();
    if (this.loginTimer) clearTimeout(this.loginTimer);
    if (this.nopTimer) clearInterval(this.nopTimer);
    for (const task of this.tasks.values()) {
      task.aborted = true;
      task.abortController?.abort();
    }
    this.tasks.clear();
    this.textContinuations.clear();
    this.textParts.clear();
    this.logger.debug('connection closed');
    this.host.connectionClosed(this);
  }
}

/**
 * The SCSI layer's view of a task (scsi-port.ts). A class rather than a literal with a getter: one
 * hidden class for every command, and the AbortController exists only if a handler asks for it.
 */
class TaskCommand implements ScsiCommand {
  readonly lun: number;
  readonly cdb: Buffer;
  readonly taskAttribute: TaskAttribute;
  readonly expectedDataLength: number;

  constructor(
    private readonly task: ScsiTask,
    readonly nexus: Nexus,
    readonly dataOut: Buffer | undefined,
  ) {
    const f = task.fields;
    this.lun = f.lun;
    this.cdb = f.cdb;
    this.taskAttribute = f.taskAttribute as TaskAttribute;
    this.expectedDataLength = f.expectedDataLength;
  }

  get signal(): AbortSignal {
    const task = this.task;
    if (!task.abortController) {
      task.abortController = new AbortController();
      if (task.aborted) task.abortController.abort();
    }
    return task.abortController.signal;
  }
}

/** Fixed-format sense data (SPC-4 4.5.3) for the two conditions the transport itself detects. */
function fixedSense(key: number, asc: number, ascq: number): Buffer {
  return Buffer.from([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0]);
}
/** ILLEGAL REQUEST / INVALID FIELD IN CDB (05/24/00): a write larger than we buffer. */
const INVALID_FIELD_IN_CDB = fixedSense(0x05, 0x24, 0x00);
/** ABORTED COMMAND / DATA PHASE ERROR (0B/4B/00): Data-Out out of sequence. */
const DATA_PHASE_ERROR = fixedSense(0x0b, 0x4b, 0x00);
/** ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR (0B/47/05): a Data-Out failed its data digest (RFC 7143 §11.4.7.2). */
const PROTOCOL_SERVICE_CRC_ERROR = fixedSense(0x0b, 0x47, 0x05);
