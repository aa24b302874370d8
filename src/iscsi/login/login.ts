/**
 * The login phase of one connection (RFC 7143 §6.3, §11.12-11.13): stages SecurityNegotiation →
 * LoginOperationalNegotiation → FullFeaturePhase, CSG/NSG with the T bit, text continued over
 * several PDUs with the C bit, status classes for failures. Pure logic: the connection sends the
 * PDUs and fills in sequence numbers.
 */
import { LoginStage, type LoginRequestFields } from '../pdu/bhs.js';
import {
  DEFAULT_TARGET_POLICY,
  defaultSessionParameters,
  finishNegotiation,
  KeyReply,
  negotiateKey,
  type SessionParameters,
  type TargetKeyPolicy,
} from './keys.js';
import { encodeText, parseText, type TextPair } from './text.js';
import { ChapAuthenticator, type TargetChapConfig } from './chap.js';

/** Login status class / detail (§11.13.5). */
export const LoginStatus = {
  Success: [0x00, 0x00],
  InitiatorError: [0x02, 0x00],
  AuthenticationFailure: [0x02, 0x01],
  AuthorizationFailure: [0x02, 0x02],
  NotFound: [0x02, 0x03],
  TargetRemoved: [0x02, 0x04],
  UnsupportedVersion: [0x02, 0x05],
  TooManyConnections: [0x02, 0x06],
  MissingParameter: [0x02, 0x07],
  CannotIncludeInSession: [0x02, 0x08],
  SessionTypeNotSupported: [0x02, 0x09],
  SessionDoesNotExist: [0x02, 0x0a],
  InvalidDuringLogin: [0x02, 0x0b],
  TargetError: [0x03, 0x00],
  ServiceUnavailable: [0x03, 0x01],
  OutOfResources: [0x03, 0x02],
} as const satisfies Record<string, readonly [number, number]>;

export type LoginStatusCode = (typeof LoginStatus)[keyof typeof LoginStatus];

export interface LoginTargetInfo {
  readonly iqn: string;
  readonly alias?: string | undefined;
  readonly allowedInitiators?: readonly string[] | undefined;
  /** When set, normal sessions must authenticate with CHAP (§12.1.3). */
  readonly chap?: TargetChapConfig | undefined;
}

/** What the login needs from the server around it. */
export interface LoginEnvironment {
  findTarget(iqn: string): LoginTargetInfo | undefined;
  readonly targetPortalGroupTag: number;
  readonly policy?: TargetKeyPolicy;
}

/** What a completed login established. */
export interface LoginResult {
  readonly sessionType: 'Normal' | 'Discovery';
  readonly initiatorName: string;
  readonly initiatorAlias: string | undefined;
  readonly target: LoginTargetInfo | undefined;
  readonly isid: string;
  /** TSIH the initiator sent (0: new session). */
  readonly requestedTsih: number;
  readonly cid: number;
  readonly params: SessionParameters;
}

/** One Login Response to send (sequence numbers and TSIH are filled in by the connection). */
export interface LoginReply {
  readonly transit: boolean;
  readonly continue: boolean;
  readonly csg: number;
  readonly nsg: number;
  readonly status: LoginStatusCode;
  readonly data: Buffer;
  /** Set when this reply moves the connection to full feature phase. */
  readonly complete?: LoginResult;
  /** Set when the login failed: send the reply, then close the connection. */
  readonly failed?: boolean;
}

const enum Phase {
  AwaitFirst,
  Security,
  Operational,
  Done,
}

export class LoginNegotiation {
  private phase = Phase.AwaitFirst;
  private readonly params: SessionParameters = defaultSessionParameters();
  private readonly policy: TargetKeyPolicy;
  private sessionType: 'Normal' | 'Discovery' = 'Normal';
  private initiatorName = '';
  private initiatorAlias: string | undefined;
  private target: LoginTargetInfo | undefined;
  private isid = '';
  private tsih = 0;
  private cid = 0;
  /** Text continued with the C bit (§11.12.2), not yet complete. */
  private pendingText: Buffer[] = [];
  private sentTargetDeclarations = false;
  private sentOwnMaxRecv = false;
  /** Set when CHAP was chosen; authentication is complete once it reports `finished`. */
  private chap: ChapAuthenticator | undefined;

  constructor(private readonly env: LoginEnvironment) {
    this.policy = env.policy ?? DEFAULT_TARGET_POLICY;
    this.params.targetMaxRecvDataSegmentLength = this.policy.maxRecvDataSegmentLength;
  }

  get parameters(): Readonly<SessionParameters> {
    return this.params;
  }

  /** Why the last login failed, for the log (never sent to the initiator). */
  failureReason = '';

  private chapRequired(): boolean {
    return this.sessionType === 'Normal' && this.target?.chap !== undefined;
  }

  /** Process one Login Request and produce the Login Response. Never throws on bad input. */
  handle(req: LoginRequestFields, data: Buffer): LoginReply {
    const fail = (status: LoginStatusCode): LoginReply => {
      this.phase = Phase.Done;
      return { transit: false, continue: false, csg: req.csg, nsg: 0, status, data: Buffer.alloc(0), failed: true };
    };
    if (this.phase === Phase.Done) return fail(LoginStatus.InvalidDuringLogin);

    if (this.phase === Phase.AwaitFirst) {
      // §11.12.4: we implement version 0x00 only.
      if (req.versionMin > 0) return fail(LoginStatus.UnsupportedVersion);
      this.isid = req.isid;
      this.tsih = req.tsih;
      this.cid = req.cid;
    } else if (req.isid !== this.isid || req.tsih !== this.tsih) {
      return fail(LoginStatus.InitiatorError); // §11.12.5: ISID/TSIH constant during login
    }
    // CSG 2 is reserved, 3 (full feature) is not a stage one negotiates in (§11.12.3).
    if (req.csg !== LoginStage.Security && req.csg !== LoginStage.Operational) return fail(LoginStatus.InitiatorError);
    if (req.transit && (req.nsg === 2 || req.nsg <= req.csg)) return fail(LoginStatus.InitiatorError);
    if (req.transit && req.continue) return fail(LoginStatus.InitiatorError); // §11.12.2
    if (this.phase === Phase.Operational && req.csg === LoginStage.Security) return fail(LoginStatus.InitiatorError);

    if (req.continue) {
      // §11.12.2: answer each continued PDU with an empty response until the text is complete.
      this.pendingText.push(Buffer.from(data));
      if (this.pendingText.length > 64) return fail(LoginStatus.OutOfResources);
      return { transit: false, continue: false, csg: req.csg, nsg: 0, status: LoginStatus.Success, data: Buffer.alloc(0) };
    }
    const text = this.pendingText.length > 0 ? Buffer.concat([...this.pendingText, data]) : data;
    this.pendingText = [];
    const parsed = parseText(text);
    if (!parsed.ok) return fail(LoginStatus.InitiatorError);
    const offered = new Map(parsed.pairs.map((p) => [p.key, p.value]));

    const replies: TextPair[] = [];
    if (this.phase === Phase.AwaitFirst) {
      // §13.4, §13.5, §13.21: the leading login carries InitiatorName, SessionType and TargetName.
      const initiatorName = offered.get('InitiatorName');
      if (initiatorName === undefined || initiatorName.length === 0) return fail(LoginStatus.MissingParameter);
      this.initiatorName = initiatorName;
      this.initiatorAlias = offered.get('InitiatorAlias');
      const sessionType = offered.get('SessionType') ?? 'Normal';
      if (sessionType !== 'Normal' && sessionType !== 'Discovery') return fail(LoginStatus.SessionTypeNotSupported);
      this.sessionType = sessionType;
      if (sessionType === 'Normal') {
        const targetName = offered.get('TargetName');
        if (targetName === undefined || targetName.length === 0) return fail(LoginStatus.MissingParameter);
        const target = this.env.findTarget(targetName);
        if (!target) return fail(LoginStatus.NotFound);
        if (target.allowedInitiators && !target.allowedInitiators.includes(initiatorName)) {
          return fail(LoginStatus.AuthorizationFailure);
        }
        this.target = target;
      }
      this.phase = req.csg === LoginStage.Security ? Phase.Security : Phase.Operational;
    } else if (req.csg === LoginStage.Operational) {
      this.phase = Phase.Operational;
    }

    const ctx = { policy: this.policy, discovery: this.sessionType === 'Discovery', params: this.params };
    let firstBurstReplyIndex = -1;
    for (const { key, value } of parsed.pairs) {
      switch (key) {
        case 'InitiatorName':
        case 'TargetName':
        case 'SessionType':
          // Declarations handled above; only valid in the leading login request.
          continue;
        case 'AuthMethod': {
          if (req.csg !== LoginStage.Security) {
            replies.push({ key, value: KeyReply.Irrelevant });
            continue;
          }
          // §12.1: list negotiation; CHAP when the target requires it, else None.
          const offers = value.split(',');
          const wanted = this.chapRequired() ? 'CHAP' : 'None';
          const choice = offers.includes(wanted) ? wanted : KeyReply.Reject;
          replies.push({ key, value: choice });
          if (choice === KeyReply.Reject) return { ...fail(LoginStatus.AuthenticationFailure), data: encodeText(replies) };
          if (choice === 'CHAP' && !this.chap) this.chap = new ChapAuthenticator(this.target!.chap!);
          continue;
        }
        default: {
          if (key.startsWith('CHAP_')) continue; // handled below, all CHAP keys of this PDU together
          if (key.startsWith('X-') || key.startsWith('X#')) {
            replies.push({ key, value: KeyReply.NotUnderstood });
            continue;
          }
          const outcome = negotiateKey(key, value, ctx);
          if (key === 'FirstBurstLength') firstBurstReplyIndex = replies.length;
          if (outcome.reply !== undefined) replies.push({ key, value: outcome.reply });
        }
      }
    }
    const chapKeys = new Map([...offered].filter(([k]) => k.startsWith('CHAP_')));
    if (chapKeys.size > 0) {
      if (!this.chap || req.csg !== LoginStage.Security) return fail(LoginStatus.InitiatorError);
      if (this.chap.step(chapKeys, replies) === 'failed') {
        this.failureReason = this.chap.failure;
        return fail(LoginStatus.AuthenticationFailure);
      }
    }
    // The security stage cannot end before a required authentication has succeeded.
    const authenticated = !this.chapRequired() || this.chap?.finished === true;
    if (!authenticated && (req.csg !== LoginStage.Security || (req.transit && req.nsg !== LoginStage.Security))) {
      if (!this.chap || req.csg !== LoginStage.Security) {
        this.failureReason = 'authentication required';
        return fail(LoginStatus.AuthenticationFailure);
      }
    }
    // §13.14: FirstBurstLength is irrelevant with InitialR2T=Yes and ImmediateData=No.
    if (firstBurstReplyIndex >= 0 && this.params.initialR2T && !this.params.immediateData && !ctx.discovery) {
      replies[firstBurstReplyIndex] = { key: 'FirstBurstLength', value: KeyReply.Irrelevant };
    }

    // §6.2: a key appears once per response; a declaration of ours replaces any answer to the same
    // key (the initiator sent a target-declared key, or an invalid MaxRecvDataSegmentLength).
    const declare = (key: string, value: string): void => {
      const at = replies.findIndex((r) => r.key === key);
      if (at >= 0) replies[at] = { key, value };
      else replies.push({ key, value });
    };
    // §13.9: TargetPortalGroupTag in the first response of a normal session; alias with it.
    if (!this.sentTargetDeclarations) {
      this.sentTargetDeclarations = true;
      if (this.sessionType === 'Normal') {
        if (this.target?.alias) declare('TargetAlias', this.target.alias);
        declare('TargetPortalGroupTag', String(this.env.targetPortalGroupTag));
      }
    }
    // §13.12: declare what we receive once operational keys are being exchanged.
    // (In the operational stage, or when the initiator goes from security straight to full feature.)
    const skippingOperational = req.transit && req.nsg === LoginStage.FullFeature;
    if (!this.sentOwnMaxRecv && (req.csg === LoginStage.Operational || skippingOperational)) {
      this.sentOwnMaxRecv = true;
      declare('MaxRecvDataSegmentLength', String(this.policy.maxRecvDataSegmentLength));
    }

    const body = encodeText(replies);
    // While CHAP is still running the target holds the initiator in the security stage (T=0, §6.3).
    if (!req.transit || !authenticated) {
      return { transit: false, continue: false, csg: req.csg, nsg: 0, status: LoginStatus.Success, data: body };
    }
    if (req.nsg === LoginStage.FullFeature) {
      finishNegotiation(this.params);
      this.phase = Phase.Done;
      return {
        transit: true,
        continue: false,
        csg: req.csg,
        nsg: LoginStage.FullFeature,
        status: LoginStatus.Success,
        data: body,
        complete: {
          sessionType: this.sessionType,
          initiatorName: this.initiatorName,
          initiatorAlias: this.initiatorAlias,
          target: this.target,
          isid: this.isid,
          requestedTsih: this.tsih,
          cid: this.cid,
          params: this.params,
        },
      };
    }
    this.phase = Phase.Operational;
    return { transit: true, continue: false, csg: req.csg, nsg: req.nsg, status: LoginStatus.Success, data: body };
  }
}
