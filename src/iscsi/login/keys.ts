/**
 * Login / text key negotiation (RFC 7143 §6.2, §13). The target is always the responder here:
 * for every key the initiator offers we compute the reply by that key's rule
 *   - list (§6.2.1): first value in the offer that we accept, else `Reject`;
 *   - numerical min / max (§6.2.2): the smaller / larger of offer and our value;
 *   - boolean OR / AND (§6.2.2);
 *   - declarative (§6.2): recorded, not answered;
 * unknown keys get `NotUnderstood` (§6.2), keys that do not apply get `Irrelevant`, invalid values `Reject`.
 */

/** Operational parameters in force for a session after login (defaults: RFC 7143 §13). */
export interface SessionParameters {
  headerDigest: boolean;
  dataDigest: boolean;
  maxConnections: number;
  initialR2T: boolean;
  immediateData: boolean;
  maxBurstLength: number;
  firstBurstLength: number;
  defaultTime2Wait: number;
  defaultTime2Retain: number;
  maxOutstandingR2T: number;
  dataPduInOrder: boolean;
  dataSequenceInOrder: boolean;
  errorRecoveryLevel: number;
  /** Largest data segment the initiator accepts (its declaration; default 8192, §13.12). */
  initiatorMaxRecvDataSegmentLength: number;
  /** Largest data segment we accept (our declaration). */
  targetMaxRecvDataSegmentLength: number;
}

export function defaultSessionParameters(): SessionParameters {
  return {
    headerDigest: false,
    dataDigest: false,
    maxConnections: 1,
    initialR2T: true,
    immediateData: true,
    maxBurstLength: 262144,
    firstBurstLength: 65536,
    defaultTime2Wait: 2,
    defaultTime2Retain: 20,
    maxOutstandingR2T: 1,
    dataPduInOrder: true,
    dataSequenceInOrder: true,
    errorRecoveryLevel: 0,
    initiatorMaxRecvDataSegmentLength: 8192,
    targetMaxRecvDataSegmentLength: 8192,
  };
}

/** What this target accepts / prefers. */
export interface TargetKeyPolicy {
  readonly headerDigests: readonly ('CRC32C' | 'None')[];
  readonly dataDigests: readonly ('CRC32C' | 'None')[];
  readonly maxRecvDataSegmentLength: number;
  readonly maxBurstLength: number;
  readonly firstBurstLength: number;
  readonly maxOutstandingR2T: number;
  /** false: we accept unsolicited data (InitialR2T is OR: the initiator may still insist on Yes). */
  readonly initialR2T: boolean;
  readonly immediateData: boolean;
  readonly defaultTime2Wait: number;
  readonly defaultTime2Retain: number;
}

export const DEFAULT_TARGET_POLICY: TargetKeyPolicy = {
  headerDigests: ['CRC32C', 'None'],
  dataDigests: ['CRC32C', 'None'],
  maxRecvDataSegmentLength: 262144,
  maxBurstLength: 16776192,
  firstBurstLength: 262144,
  maxOutstandingR2T: 8,
  initialR2T: false,
  immediateData: true,
  defaultTime2Wait: 2,
  defaultTime2Retain: 20,
};

export const enum KeyReply {
  NotUnderstood = 'NotUnderstood',
  Irrelevant = 'Irrelevant',
  Reject = 'Reject',
}

/** Result of negotiating one offered key. */
export interface KeyOutcome {
  /** Value to send back, or undefined for declarative keys that need no answer. */
  readonly reply: string | undefined;
}

/** Parse a numerical value: decimal, or hex `0x…` (§6.1 "numerical-value"). */
export function parseNumber(value: string): number | undefined {
  if (/^[0-9]{1,10}$/.test(value)) return Number(value);
  if (/^0[xX][0-9a-fA-F]{1,8}$/.test(value)) return parseInt(value.slice(2), 16);
  return undefined;
}

function parseBoolean(value: string): boolean | undefined {
  if (value === 'Yes') return true;
  if (value === 'No') return false;
  return undefined;
}

const yesNo = (b: boolean): string => (b ? 'Yes' : 'No');

type NumericRule = { kind: 'min' | 'max'; lo: number; hi: number; ours: (p: TargetKeyPolicy) => number; set: (s: SessionParameters, v: number) => void };
type BooleanRule = { kind: 'or' | 'and'; ours: (p: TargetKeyPolicy) => boolean; set?: (s: SessionParameters, v: boolean) => void };

const NUMERIC_KEYS: Readonly<Record<string, NumericRule>> = {
  // §13.2: we support one connection per session.
  MaxConnections: { kind: 'min', lo: 1, hi: 65535, ours: () => 1, set: (s, v) => (s.maxConnections = v) },
  // §13.13, §13.14
  MaxBurstLength: { kind: 'min', lo: 512, hi: 16777215, ours: (p) => p.maxBurstLength, set: (s, v) => (s.maxBurstLength = v) },
  FirstBurstLength: { kind: 'min', lo: 512, hi: 16777215, ours: (p) => p.firstBurstLength, set: (s, v) => (s.firstBurstLength = v) },
  // §13.15 (max), §13.16 (min)
  DefaultTime2Wait: { kind: 'max', lo: 0, hi: 3600, ours: (p) => p.defaultTime2Wait, set: (s, v) => (s.defaultTime2Wait = v) },
  DefaultTime2Retain: { kind: 'min', lo: 0, hi: 3600, ours: (p) => p.defaultTime2Retain, set: (s, v) => (s.defaultTime2Retain = v) },
  // §13.17
  MaxOutstandingR2T: { kind: 'min', lo: 1, hi: 65535, ours: (p) => p.maxOutstandingR2T, set: (s, v) => (s.maxOutstandingR2T = v) },
  // §13.20: ERL 0 only.
  ErrorRecoveryLevel: { kind: 'min', lo: 0, hi: 2, ours: () => 0, set: (s, v) => (s.errorRecoveryLevel = v) },
};

const BOOLEAN_KEYS: Readonly<Record<string, BooleanRule>> = {
  InitialR2T: { kind: 'or', ours: (p) => p.initialR2T, set: (s, v) => (s.initialR2T = v) }, // §13.10
  ImmediateData: { kind: 'and', ours: (p) => p.immediateData, set: (s, v) => (s.immediateData = v) }, // §13.11
  DataPDUInOrder: { kind: 'or', ours: () => true, set: (s, v) => (s.dataPduInOrder = v) }, // §13.18
  DataSequenceInOrder: { kind: 'or', ours: () => true, set: (s, v) => (s.dataSequenceInOrder = v) }, // §13.19
  // Markers are obsolete in RFC 7143 (§13.26 of RFC 7143 obsoletes them); answering No is allowed.
  IFMarker: { kind: 'and', ours: () => false },
  OFMarker: { kind: 'and', ours: () => false },
  // RFC 7145 §6.3: not an iSER connection.
  RDMAExtensions: { kind: 'and', ours: () => false },
};

/**
 * Keys whose definition says "Irrelevant when: SessionType=Discovery" (§13.2, §13.10, §13.11,
 * §13.13, §13.14, §13.17-13.19). DefaultTime2Wait/Retain stay relevant.
 */
const IRRELEVANT_IN_DISCOVERY = new Set([
  'MaxConnections',
  'InitialR2T',
  'ImmediateData',
  'MaxBurstLength',
  'FirstBurstLength',
  'MaxOutstandingR2T',
  'DataPDUInOrder',
  'DataSequenceInOrder',
]);

/** Keys only the target declares: an initiator sending them is out of order. */
const TARGET_DECLARED = new Set(['TargetAlias', 'TargetAddress', 'TargetPortalGroupTag']);

export interface NegotiationContext {
  readonly policy: TargetKeyPolicy;
  readonly discovery: boolean;
  readonly params: SessionParameters;
}

/**
 * Negotiate one operational key. Keys handled by the login state machine itself (InitiatorName,
 * TargetName, SessionType, AuthMethod, CHAP_*) must not be passed here.
 */
export function negotiateKey(key: string, value: string, ctx: NegotiationContext): KeyOutcome {
  const { policy, params } = ctx;
  if (key === 'HeaderDigest' || key === 'DataDigest') {
    // §13.1: list negotiation over {CRC32C, None}.
    const accepted = key === 'HeaderDigest' ? policy.headerDigests : policy.dataDigests;
    const offered = value.split(',');
    if (offered.some((v) => v.length === 0)) return { reply: KeyReply.Reject };
    const choice = offered.find((v): v is 'CRC32C' | 'None' => (v === 'CRC32C' || v === 'None') && accepted.includes(v));
    if (choice === undefined) return { reply: KeyReply.Reject };
    if (key === 'HeaderDigest') params.headerDigest = choice === 'CRC32C';
    else params.dataDigest = choice === 'CRC32C';
    return { reply: choice };
  }
  if (key === 'MaxRecvDataSegmentLength') {
    // §13.12: declarative, per direction; the initiator tells us what it can receive.
    const n = parseNumber(value);
    if (n === undefined || n < 512 || n > 16777215) return { reply: KeyReply.Reject };
    params.initiatorMaxRecvDataSegmentLength = n;
    return { reply: undefined };
  }
  const numeric = NUMERIC_KEYS[key];
  if (numeric) {
    if (ctx.discovery && IRRELEVANT_IN_DISCOVERY.has(key)) return { reply: KeyReply.Irrelevant };
    const n = parseNumber(value);
    if (n === undefined || n < numeric.lo || n > numeric.hi) return { reply: KeyReply.Reject };
    const ours = numeric.ours(policy);
    const result = numeric.kind === 'min' ? Math.min(n, ours) : Math.max(n, ours);
    numeric.set(params, result);
    return { reply: String(result) };
  }
  const bool = BOOLEAN_KEYS[key];
  if (bool) {
    if (ctx.discovery && IRRELEVANT_IN_DISCOVERY.has(key)) return { reply: KeyReply.Irrelevant };
    const b = parseBoolean(value);
    if (b === undefined) return { reply: KeyReply.Reject };
    const ours = bool.ours(policy);
    const result = bool.kind === 'or' ? b || ours : b && ours;
    bool.set?.(params, result);
    return { reply: yesNo(result) };
  }
  switch (key) {
    case 'IFMarkInt':
    case 'OFMarkInt':
      // Obsolete marker intervals: the constant Reject (RFC 7143 obsoleted-keys section).
      return { reply: KeyReply.Reject };
    case 'InitiatorAlias':
      return { reply: undefined }; // §13.7: declarative, informational
    case 'SendTargets':
      return { reply: KeyReply.Irrelevant }; // §13.3: only in Text Requests
    case 'TargetRecvDataSegmentLength':
    case 'InitiatorRecvDataSegmentLength':
      return { reply: KeyReply.Irrelevant }; // RFC 7145 §6.5-6.6: only with RDMAExtensions=Yes
    case 'TaskReporting':
      // RFC 7144 §7.1: list; we implement only RFC 3720 semantics.
      return { reply: value.split(',').includes('RFC3720') ? 'RFC3720' : KeyReply.Reject };
    default:
      if (TARGET_DECLARED.has(key)) return { reply: KeyReply.Irrelevant };
      return { reply: KeyReply.NotUnderstood };
  }
}

/**
 * After all keys of a login are negotiated: results that depend on several keys.
 * FirstBurstLength ≤ MaxBurstLength (§13.14).
 */
export function finishNegotiation(params: SessionParameters): void {
  if (params.firstBurstLength > params.maxBurstLength) params.firstBurstLength = params.maxBurstLength;
}
