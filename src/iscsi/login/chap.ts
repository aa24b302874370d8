/**
 * CHAP authentication for the login security stage (RFC 7143 §12.1.3, RFC 1994): the target
 * challenges, the initiator answers CHAP_N / CHAP_R = H(CHAP_I ‖ secret ‖ CHAP_C); optionally the
 * initiator challenges back (mutual CHAP) and the target answers with its own credentials.
 * Algorithms (CHAP_A): 5 MD5, 6 SHA-1, 7 SHA-256, 8 SHA3-256 (IANA PPP authentication algorithms).
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { TextPair } from './text.js';

export interface ChapCredentials {
  readonly username: string;
  readonly secret: string;
}

/** CHAP configured on a target: what initiators must present, and optionally what we present. */
export interface TargetChapConfig {
  readonly initiator: ChapCredentials;
  /** Mutual CHAP: the target's own name and secret, used when the initiator challenges us. */
  readonly target?: ChapCredentials;
}

const HASHES: ReadonlyMap<number, string> = new Map([
  [7, 'sha256'],
  [8, 'sha3-256'],
  [6, 'sha1'],
  [5, 'md5'],
]);

/** First algorithm of the initiator's CHAP_A list we implement (list negotiation, §6.2.1). */
export function chooseChapAlgorithm(offer: string): number | undefined {
  for (const item of offer.split(',')) {
    const n = Number(item);
    if (Number.isInteger(n) && HASHES.has(n)) return n;
  }
  return undefined;
}

/** CHAP response: H(identifier ‖ secret ‖ challenge) (RFC 1994 §4.1). */
export function chapResponse(algorithm: number, identifier: number, secret: string, challenge: Buffer): Buffer {
  const hash = HASHES.get(algorithm);
  if (!hash) throw new Error(`CHAP algorithm ${algorithm} not supported`);
  return createHash(hash).update(Buffer.from([identifier & 0xff])).update(secret, 'utf8').update(challenge).digest();
}

/** Binary values (§6.1 "binary-value"): `0x` hex or `0b` base64. */
export function decodeChapBinary(value: string): Buffer | undefined {
  if (/^0[xX]([0-9a-fA-F]{2})+$/.test(value)) return Buffer.from(value.slice(2), 'hex');
  if (/^0[xX][0-9a-fA-F]+$/.test(value)) return Buffer.from(`0${value.slice(2)}`, 'hex');
  if (/^0[bB][A-Za-z0-9+/]+={0,2}$/.test(value)) return Buffer.from(value.slice(2), 'base64');
  return undefined;
}

export function encodeChapBinary(buf: Buffer): string {
  return `0x${buf.toString('hex')}`;
}

export type ChapStep = 'continue' | 'done' | 'failed';

/** The target side of one CHAP exchange. */
export class ChapAuthenticator {
  private state: 'await-algorithm' | 'await-response' | 'done' | 'failed' = 'await-algorithm';
  private algorithm = 5;
  private identifier = 0;
  private challenge: Buffer = Buffer.alloc(0);
  /** Why it failed, for the log (never sent to the initiator). */
  failure = '';

  constructor(private readonly config: TargetChapConfig) {}

  get finished(): boolean {
    return this.state === 'done';
  }

  /** Consume the CHAP_* keys of one login request, appending our keys to `replies`. */
  step(keys: ReadonlyMap<string, string>, replies: TextPair[]): ChapStep {
    const fail = (why: string): ChapStep => {
      this.state = 'failed';
      this.failure = why;
      return 'failed';
    };
    if (this.state === 'await-algorithm') {
      const offer = keys.get('CHAP_A');
      if (offer === undefined) return fail('CHAP_A missing');
      const algorithm = chooseChapAlgorithm(offer);
      if (algorithm === undefined) {
        replies.push({ key: 'CHAP_A', value: 'Reject' });
        return fail(`no supported CHAP_A in ${offer}`);
      }
      this.algorithm = algorithm;
      this.identifier = randomBytes(1)[0]!;
      this.challenge = randomBytes(32);
      this.state = 'await-response';
      replies.push(
        { key: 'CHAP_A', value: String(algorithm) },
        { key: 'CHAP_I', value: String(this.identifier) },
        { key: 'CHAP_C', value: encodeChapBinary(this.challenge) },
      );
      return 'continue';
    }
    if (this.state !== 'await-response') return fail('CHAP keys after the exchange ended');
    const name = keys.get('CHAP_N');
    const responseText = keys.get('CHAP_R');
    if (name === undefined || responseText === undefined) return fail('CHAP_N or CHAP_R missing');
    const response = decodeChapBinary(responseText);
    if (!response) return fail('CHAP_R is not a binary value');
    const expected = chapResponse(this.algorithm, this.identifier, this.config.initiator.secret, this.challenge);
    if (name !== this.config.initiator.username) return fail(`unknown CHAP name ${name}`);
    if (response.length !== expected.length || !timingSafeEqual(response, expected)) return fail('CHAP response mismatch');
    // Mutual CHAP: the initiator challenges the target (§12.1.3).
    const theirId = keys.get('CHAP_I');
    const theirChallengeText = keys.get('CHAP_C');
    if (theirId !== undefined || theirChallengeText !== undefined) {
      const mutual = this.config.target;
      if (!mutual) return fail('initiator asked for mutual CHAP; none configured');
      const id = Number(theirId);
      const theirChallenge = theirChallengeText !== undefined ? decodeChapBinary(theirChallengeText) : undefined;
      if (!Number.isInteger(id) || id < 0 || id > 255 || !theirChallenge || theirChallenge.length === 0) {
        return fail('malformed mutual CHAP challenge');
      }
      // A reflected challenge would let an attacker use us as an oracle (§12.1.3).
      if (theirChallenge.equals(this.challenge)) return fail('initiator reflected our challenge');
      replies.push(
        { key: 'CHAP_N', value: mutual.username },
        { key: 'CHAP_R', value: encodeChapBinary(chapResponse(this.algorithm, id, mutual.secret, theirChallenge)) },
      );
    }
    this.state = 'done';
    return 'done';
  }
}
