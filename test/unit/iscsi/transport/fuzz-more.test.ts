/**
 * Seeded randomized robustness tests of the iSCSI target, second part: the areas fuzz.test.ts does
 * not reach. In-process over real TCP on 127.0.0.1, driven by the raw initiator of raw-initiator.ts.
 *
 *   1. CHAP in the security stage: random and malformed AuthMethod / CHAP_A / CHAP_I / CHAP_C /
 *      CHAP_N / CHAP_R (bad hex / base64, wrong lengths, missing keys, wrong order, huge values,
 *      mutual CHAP with bad or reflected challenges, a response replayed from an earlier
 *      connection). Oracle: the login reaches full feature phase only when the right secret was
 *      proven; a refused login answers status class 2 (02/01 for bad credentials) and closes.
 *   2. CRC32C header and data digests: a corrupted header digest closes the connection (RFC 7143
 *      §7.8: framing is lost); a corrupted data digest gets Reject 0x02 and its data never reaches
 *      the disk; a command whose immediate data was rejected can be retried with the same CmdSN.
 *   3. Concurrency: 8–32 commands in flight on one connection, with ABORT TASK (on running and
 *      finished tasks), ABORT TASK SET, CLEAR TASK SET, LU RESET, NOP-Out pings and sometimes a
 *      logout with commands outstanding; a second session reading while the first writes. Every
 *      task ends in its response or is covered by a TMF / logout response; StatSN stays in
 *      sequence; each block of the LUN is the data of the last acknowledged write or, where aborted
 *      or concurrent writes touched it, one of their payloads — never anything else.
 *   4. Target NOP-In pings (small nopInIntervalMs) while the initiator ignores them or answers with
 *      a wrong TTT.
 *
 * The seed is printed; BOOTRESTORE_FUZZ_SEED=<n> (decimal or 0x-hex) replays a run. Hangs are
 * caught by deadlines on awaited answers. Uncaught exceptions, unhandled rejections and the
 * target's error-level log lines fail the test.
 */
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { IscsiServer } from '../../../../src/iscsi/server.js';
import { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import type { TargetChapConfig } from '../../../../src/iscsi/login/chap.js';
import { chapResponse, decodeChapBinary } from '../../../../src/iscsi/login/chap.js';
import {
  decodeLoginResponse,
  decodeReject,
  encodeDataOut,
  encodeLoginRequest,
  encodeLogoutRequest,
  encodeNopOut,
  encodeScsiCommand,
  encodeTaskManagementRequest,
  opcodeOf,
  padLength,
  type Pdu,
} from '../../../../src/iscsi/pdu/bhs.js';
import { Opcode, RESERVED_TAG } from '../../../../src/iscsi/pdu/opcodes.js';
import { crc32c, writeDigest } from '../../../../src/iscsi/pdu/crc32c.js';
import { encodeText, parseText } from '../../../../src/iscsi/login/text.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';
import { pseudoRandomBytes } from '../../../helpers/prng.js';
import { RawInitiator, read10, TEST_UNIT_READY, write10 } from './raw-initiator.js';
import { advancesStatSN, Rng, seedFromEnv, watchProcessFaults } from './fuzz-kit.js';

const DEFAULT_SEED = 0x2b6f_2026;
const SEED = seedFromEnv(DEFAULT_SEED);
const CHAP_CONNECTIONS = 400;
const DIGEST_CONNECTIONS = 40;
const DIGEST_STEPS = 25;
const CONCURRENCY_ROUNDS = 80;
const HANG_MS = 2000;

const IQN = 'iqn.2026-12.test:fuzz-more';
const INITIATOR = 'iqn.2026-12.test:fuzzer-more';
const BLOCK = 512;
const RW_BLOCKS = 128;
const CHAP: TargetChapConfig = {
  initiator: { username: 'alice', secret: 'alice-secret-1234' },
  target: { username: 'tgt', secret: 'target-secret-5678' },
};

// ---------------------------------------------------------------------------------------------
// Crash detection and the fixture.

const processFaults = watchProcessFaults('fuzz-more', SEED);

interface Fixture {
  readonly server: IscsiServer;
  readonly port: number;
  readonly rw: MemoryDevice;
  readonly errorLogs: string[];
}

async function startFixture(opts: { chap?: TargetChapConfig; nopInIntervalMs?: number; nopInTimeoutMs?: number; ioDelayMs?: number } = {}): Promise<Fixture> {
  const errorLogs: string[] = [];
  const logger = pino({ level: 'error' }, { write: (line: string) => void errorLogs.push(line) });
  const target = new ScsiTarget({ logger });
  const rw = new MemoryDevice({ blockCount: RW_BLOCKS, ioDelayMs: opts.ioDelayMs ?? 0 });
  pseudoRandomBytes(rw.data.length, SEED ^ 0x77).copy(rw.data);
  target.addLun(0, rw);
  const server = new IscsiServer({
    portals: ['127.0.0.1:0'],
    targets: [opts.chap ? { iqn: IQN, port: target, chap: opts.chap } : { iqn: IQN, port: target }],
    logger,
    nopInIntervalMs: opts.nopInIntervalMs ?? 0,
    nopInTimeoutMs: opts.nopInTimeoutMs ?? 0,
    stopTimeoutMs: 1000,
  });
  const bound = await server.start();
  return { server, port: bound[0]!.port, rw, errorLogs };
}

function assertNoFaults(fx: Fixture, where: string): void {
  if (processFaults.length > 0 || fx.errorLogs.length > 0) {
    throw new Error(
      `seed=${SEED} ${where}: the target hit an internal error\n` +
        [...processFaults, ...fx.errorLogs.map((l) => `error log: ${l.trim()}`)].slice(0, 5).join('\n'),
    );
  }
}

// ---------------------------------------------------------------------------------------------
// Login over the raw initiator, one PDU at a time.

interface LoginAnswer {
  readonly statusClass: number;
  readonly statusDetail: number;
  readonly transit: boolean;
  readonly nsg: number;
  readonly keys: Record<string, string>;
}

function sendLogin(
  c: RawInitiator,
  f: { csg: number; nsg: number; transit: boolean; isid?: string; tsih?: number },
  pairs: ReadonlyArray<readonly [string, string]>,
): void {
  const bhs = encodeLoginRequest({
    transit: f.transit,
    continue: false,
    csg: f.csg,
    nsg: f.transit ? f.nsg : 0,
    versionMax: 0,
    versionMin: 0,
    isid: f.isid ?? '400001370000',
    tsih: f.tsih ?? 0,
    itt: 0x10,
    cid: 0,
    cmdSN: c.cmdSN,
    expStatSN: c.expStatSN,
  });
  c.send(bhs, encodeText(pairs.map(([key, value]) => ({ key, value }))));
}

async function loginAnswer(c: RawInitiator, where: string): Promise<LoginAnswer | undefined> {
  const p = await c.next(HANG_MS);
  if (!p) {
    if (c.isClosed) return undefined;
    throw new Error(`seed=${SEED} ${where}: no Login Response within ${HANG_MS} ms`);
  }
  if (opcodeOf(p.bhs) !== Opcode.LoginResponse) throw new Error(`seed=${SEED} ${where}: opcode 0x${opcodeOf(p.bhs).toString(16)} during login`);
  const f = decodeLoginResponse(p.bhs);
  c.expStatSN = (f.statSN + 1) >>> 0;
  const parsed = parseText(p.data);
  const keys = parsed.ok ? Object.fromEntries(parsed.pairs.map((x) => [x.key, x.value])) : {};
  return { statusClass: f.statusClass, statusDetail: f.statusDetail, transit: f.transit, nsg: f.nsg, keys };
}

/** A well-behaved login (CHAP when `chap`), operational keys as given. */
async function goodLogin(
  port: number,
  opts: { chap?: boolean; isid?: string; keys?: ReadonlyArray<readonly [string, string]> } = {},
): Promise<RawInitiator> {
  const c = await RawInitiator.connect(port);
  const isid = opts.isid ?? '400001370000';
  const op = opts.keys ?? [];
  if (opts.chap) {
    sendLogin(c, { csg: 0, nsg: 1, transit: false, isid }, [['InitiatorName', INITIATOR], ['SessionType', 'Normal'], ['TargetName', IQN], ['AuthMethod', 'CHAP']]);
    expect((await loginAnswer(c, 'good login 1'))?.statusClass).toBe(0);
    sendLogin(c, { csg: 0, nsg: 1, transit: false, isid }, [['CHAP_A', '5']]);
    const a = (await loginAnswer(c, 'good login 2'))!;
    const r = chapResponse(5, Number(a.keys.CHAP_I), CHAP.initiator.secret, decodeChapBinary(a.keys.CHAP_C!)!);
    sendLogin(c, { csg: 0, nsg: 1, transit: true, isid }, [['CHAP_N', 'alice'], ['CHAP_R', `0x${r.toString('hex')}`]]);
    const b = (await loginAnswer(c, 'good login 3'))!;
    expect([b.statusClass, b.transit]).toEqual([0, true]);
    sendLogin(c, { csg: 1, nsg: 3, transit: true, isid }, op);
  } else {
    sendLogin(c, { csg: 1, nsg: 3, transit: true, isid }, [['InitiatorName', INITIATOR], ['SessionType', 'Normal'], ['TargetName', IQN], ...op]);
  }
  const last = await loginAnswer(c, 'good login final');
  if (!last || last.statusClass !== 0 || !last.transit || last.nsg !== 3) throw new Error(`seed=${SEED}: a well-behaved login failed: ${JSON.stringify(last)}`);
  c.enableDigests(last.keys);
  await expectServiceable(c, 'good login');
  return c;
}

/**
 * TEST UNIT READY must be answered GOOD (after at most two UNIT ATTENTIONs, e.g. power on / reset
 * reported to a new nexus): the connection is in full feature phase and serviceable.
 */
async function expectServiceable(c: RawInitiator, where: string): Promise<void> {
  for (let attempt = 0; attempt < 3; attempt++) {
    const itt = c.scsi(TEST_UNIT_READY);
    for (;;) {
      const p = await c.next(HANG_MS);
      if (!p) throw new Error(`seed=${SEED} ${where}: no answer to TEST UNIT READY`);
      if (opcodeOf(p.bhs) === Opcode.NopIn && p.bhs.readUInt32BE(16) === RESERVED_TAG) continue;
      expect(opcodeOf(p.bhs), where).toBe(Opcode.ScsiResponse);
      expect(p.bhs.readUInt32BE(16)).toBe(itt);
      c.expStatSN = (p.bhs.readUInt32BE(24) + 1) >>> 0;
      if (p.bhs[3] === 0) return;
      expect(sense(p).slice(0, 2), `${where}: TEST UNIT READY status ${p.bhs[3]} ${sense(p)}`).toBe('06');
      break;
    }
  }
  throw new Error(`seed=${SEED} ${where}: UNIT ATTENTION never cleared`);
}

function sense(p: Pdu): string {
  if (p.data.length < 16) return '';
  const s = p.data.subarray(2);
  return [s[2]! & 0x0f, s[12]!, s[13]!].map((x) => x.toString(16).padStart(2, '0')).join('/');
}

// ---------------------------------------------------------------------------------------------
// 1. CHAP.

const HUGE = `0x${'ab'.repeat(3000)}`;

/** The malformed / wrong answer variants for step 3 (the response). `right`: the correct CHAP_R. */
type Step3 = { pairs: Array<[string, string]>; proves: boolean; label: string };

function step3Variant(rng: Rng, right: Buffer, ourChallenge: Buffer, replayed: string | undefined): Step3 {
  const hex = `0x${right.toString('hex')}`;
  const mutualOk = (): Array<[string, string]> => [['CHAP_I', String(rng.int(256))], ['CHAP_C', `0x${rng.bytes(rng.range(1, 64)).toString('hex')}`]];
  const variants: Array<() => Step3> = [
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex]], proves: true, label: 'right' }),
    () => ({ pairs: [['CHAP_R', hex], ['CHAP_N', 'alice']], proves: true, label: 'right, R before N' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0b${right.toString('base64')}`]], proves: true, label: 'right, base64' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0X${right.toString('hex').toUpperCase()}`]], proves: true, label: 'right, upper hex' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ...mutualOk()], proves: true, label: 'right + mutual' }),
    () => ({ pairs: [['CHAP_N', 'mallory'], ['CHAP_R', hex]], proves: false, label: 'wrong name' }),
    () => ({ pairs: [['CHAP_N', 'ALICE'], ['CHAP_R', hex]], proves: false, label: 'name case' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0x${rng.bytes(right.length).toString('hex')}`]], proves: false, label: 'random response' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex.slice(0, rng.range(2, hex.length - 1))]], proves: false, label: 'truncated' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `${hex}00`]], proves: false, label: 'extended' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0x${right.toString('hex').slice(0, -1)}z`]], proves: false, label: 'bad hex' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0b${right.toString('base64')}!`]], proves: false, label: 'bad base64' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', right.toString('hex')]], proves: false, label: 'no prefix' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', '0x']], proves: false, label: 'empty hex' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', '']], proves: false, label: 'empty' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', HUGE]], proves: false, label: 'huge' }),
    () => ({ pairs: [['CHAP_N', 'alice']], proves: false, label: 'R missing' }),
    () => ({ pairs: [['CHAP_R', hex]], proves: false, label: 'N missing' }),
    () => ({ pairs: [], proves: false, label: 'nothing' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', `0x${ourChallenge.toString('hex')}`]], proves: false, label: 'challenge echoed as response' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', replayed ?? `0x${'00'.repeat(16)}`]], proves: false, label: 'replayed response' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_I', '7'], ['CHAP_C', `0x${ourChallenge.toString('hex')}`]], proves: false, label: 'reflected challenge' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_I', rng.pick(['256', '-1', 'x', '1.5', '0x1ff'])], ['CHAP_C', '0x0102']], proves: false, label: 'bad mutual id' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_I', '3']], proves: false, label: 'mutual C missing' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_C', '0x0102']], proves: false, label: 'mutual I missing' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_I', '3'], ['CHAP_C', rng.pick(['0x', '0xzz', '', 'abc', '0b!!'])]], proves: false, label: 'bad mutual challenge' }),
    () => ({ pairs: [['CHAP_N', 'alice'], ['CHAP_R', hex], ['CHAP_A', '5']], proves: true, label: 'stray CHAP_A with the right answer' }),
  ];
  return rng.pick(variants)();
}

interface ChapStats {
  succeeded: number;
  refused: number;
  labels: Map<string, number>;
}

async function fuzzChapConnection(fx: Fixture, rng: Rng, where: string, replay: { last: string | undefined }, stats: ChapStats): Promise<void> {
  const c = await RawInitiator.connect(fx.port);
  const isid = `4000013700${rng.int(256).toString(16).padStart(2, '0')}`;
  let label = '';
  const refused = async (a: LoginAnswer | undefined, credentialFailure: boolean): Promise<void> => {
    if (a !== undefined && a.statusClass === 0) {
      // Held in the security stage (T=0) is not access either; the probe below checks it.
      expect(a.transit, `${where} ${label}: left the security stage without proving the secret`).toBe(false);
    } else if (a !== undefined) {
      expect(a.statusClass, `${where} ${label}`).toBe(2);
      if (credentialFailure) expect([a.statusClass, a.statusDetail], `${where} ${label}`).toEqual([2, 1]);
      expect(a.transit, `${where} ${label}`).toBe(false);
    }
    // Whatever it tries next, a refused connection never reaches the LUN.
    c.scsi(TEST_UNIT_READY);
    const p = await c.next(HANG_MS);
    if (p) expect(opcodeOf(p.bhs), `${where} ${label}: answer after a refused login`).not.toBe(Opcode.ScsiResponse);
    await c.closed;
    stats.refused++;
    stats.labels.set(label, (stats.labels.get(label) ?? 0) + 1);
  };
  try {
    // Step 1: AuthMethod negotiation (and sometimes an attempt to skip the security stage).
    const auth = rng.weighted<string | undefined>([
      [10, 'CHAP'],
      [3, 'None,CHAP'],
      [3, 'KRB5,CHAP,None'],
      [2, 'None'],
      [1, 'KRB5,SRP'],
      [1, ''],
      [1, 'CHAP,'],
      [1, undefined],
      [1, `${'X'.repeat(200)},CHAP`],
    ]);
    const skip = rng.chance(0.06);
    if (skip) {
      label = 'skip security';
      sendLogin(c, { csg: 1, nsg: 3, transit: true, isid }, [['InitiatorName', INITIATOR], ['TargetName', IQN]]);
      return await refused(await loginAnswer(c, where), true);
    }
    const first: Array<[string, string]> = [['InitiatorName', INITIATOR], ['SessionType', 'Normal'], ['TargetName', IQN]];
    if (auth !== undefined) first.push(['AuthMethod', auth]);
    const earlyChap = rng.chance(0.1);
    if (earlyChap) first.push(['CHAP_A', '5']); // CHAP_A in the same PDU as AuthMethod
    const prematureTransit = rng.chance(0.08);
    sendLogin(c, { csg: 0, nsg: rng.pick([1, 3]), transit: prematureTransit, isid }, first);
    const a1 = await loginAnswer(c, where);
    const offersChap = auth !== undefined && auth.split(',').includes('CHAP');
    if (!offersChap) {
      label = `AuthMethod=${auth ?? '(absent)'}`;
      if (auth === undefined && a1 && a1.statusClass === 0) {
        // No AuthMethod: the target may hold the login in the security stage; it must not go on.
        expect(a1.transit, `${where}: left the security stage without AuthMethod`).toBe(false);
        sendLogin(c, { csg: 0, nsg: 1, transit: true, isid }, []);
        const again = await loginAnswer(c, where);
        if (again && again.statusClass === 0) expect(again.transit, `${where}: authenticated without CHAP`).toBe(false);
        c.close();
        await c.closed;
        stats.refused++;
        return;
      }
      return await refused(a1, auth !== undefined);
    }
    if (!a1 || a1.statusClass !== 0) throw new Error(`${where}: AuthMethod=${auth} refused: ${JSON.stringify(a1)}`);
    expect(a1.keys.AuthMethod).toBe('CHAP');
    expect(a1.transit, `${where}: left the security stage before CHAP`).toBe(false);
    // Step 2: CHAP_A (unless already sent).
    let a2 = a1;
    if (!earlyChap) {
      const algo = rng.weighted<Array<[string, string]>>([
        [12, [['CHAP_A', rng.pick(['5', '7', '6', '8', '5,7', '99,5', '7,5'])]]],
        [1, [['CHAP_A', rng.pick(['99', 'abc', '', '-5', '5.0', '1,2,3,4'])]]],
        [1, [['CHAP_A', Array.from({ length: 400 }, (_, i) => String(100 + i)).join(',')]]],
        [1, [['CHAP_N', 'alice'], ['CHAP_R', '0x00']]], // wrong order: the answer before the challenge
        [1, [['CHAP_A', '5'], ['CHAP_R', '0x00']]],
      ]);
      const supported = algo.length === 1 && algo[0]![0] === 'CHAP_A' && algo[0]![1].split(',').some((x) => ['5', '6', '7', '8'].includes(x));
      sendLogin(c, { csg: 0, nsg: 1, transit: rng.chance(0.2), isid }, algo);
      const got = await loginAnswer(c, where);
      if (!supported && !(algo[0]![0] === 'CHAP_A' && algo[0]![1] === '5')) {
        label = `CHAP_A step ${algo.map((x) => x.join('=')).join(' ').slice(0, 40)}`;
        return await refused(got, true);
      }
      if (!got) throw new Error(`${where}: connection closed after CHAP_A ${JSON.stringify(algo).slice(0, 80)}`);
      a2 = got;
    }
    if (a2.statusClass !== 0) {
      label = 'CHAP_A refused';
      return await refused(a2, true);
    }
    expect(a2.transit, `${where}: left the security stage before the CHAP response`).toBe(false);
    const alg = Number(a2.keys.CHAP_A);
    const id = Number(a2.keys.CHAP_I);
    const challenge = decodeChapBinary(a2.keys.CHAP_C ?? '');
    expect(challenge, where).toBeDefined();
    expect(Number.isInteger(id) && id >= 0 && id <= 255).toBe(true);
    const right = chapResponse(alg, id, CHAP.initiator.secret, challenge!);
    // Step 3: the response.
    const v = step3Variant(rng, right, challenge!, replay.last);
    label = v.label;
    replay.last = `0x${right.toString('hex')}`;
    const transit = rng.chance(0.85);
    sendLogin(c, { csg: 0, nsg: rng.pick([1, 3]), transit, isid }, v.pairs);
    const a3 = await loginAnswer(c, where);
    if (!v.proves) return await refused(a3, v.pairs.length > 0 || true);
    if (!a3 || a3.statusClass !== 0) throw new Error(`${where} ${label}: the right credentials were refused: ${JSON.stringify(a3)}`);
    if (v.pairs.some(([k]) => k === 'CHAP_C')) {
      const theirId = Number(v.pairs.find(([k]) => k === 'CHAP_I')![1]);
      const theirC = decodeChapBinary(v.pairs.find(([k]) => k === 'CHAP_C')![1])!;
      expect(a3.keys.CHAP_N).toBe(CHAP.target!.username);
      expect(a3.keys.CHAP_R).toBe(`0x${chapResponse(alg, theirId, CHAP.target!.secret, theirC).toString('hex')}`);
    }
    if (!transit) {
      expect(a3.transit).toBe(false);
      sendLogin(c, { csg: 0, nsg: 3, transit: true, isid }, []);
    } else if (a3.nsg === 1) {
      sendLogin(c, { csg: 1, nsg: 3, transit: true, isid }, []);
    }
    if (!transit || a3.nsg === 1) {
      const a4 = await loginAnswer(c, where);
      if (!a4 || a4.statusClass !== 0 || !a4.transit || a4.nsg !== 3) throw new Error(`${where} ${label}: login did not complete: ${JSON.stringify(a4)}`);
    } else expect(a3.nsg).toBe(3);
    await expectServiceable(c, `${where} ${label}`);
    stats.succeeded++;
    c.close();
    await c.closed;
  } finally {
    c.close();
  }
}

// ---------------------------------------------------------------------------------------------
// 2. Digests.

/** A PDU framed by hand with CRC32C digests, optionally corrupted. */
function digestFrame(header: Buffer, data: Buffer, hd: boolean, dd: boolean, corruptHeader: boolean, corruptData: boolean): Buffer {
  const bhs = Buffer.from(header);
  bhs.writeUIntBE(data.length, 5, 3); // DataSegmentLength (PduWriter fills it in for sent PDUs)
  const parts: Buffer[] = [bhs];
  if (hd) {
    const d = Buffer.alloc(4);
    writeDigest(d, 0, (crc32c(bhs) ^ (corruptHeader ? 0x10 : 0)) >>> 0);
    parts.push(d);
  }
  if (data.length > 0) {
    const padded = Buffer.concat([data, Buffer.alloc(padLength(data.length))]);
    parts.push(padded);
    if (dd) {
      const d = Buffer.alloc(4);
      writeDigest(d, 0, (crc32c(padded) ^ (corruptData ? 0x80 : 0)) >>> 0);
      parts.push(d);
    }
  }
  return Buffer.concat(parts);
}

function sendRaw(c: RawInitiator, frame: Buffer): void {
  c.writer.flushNow();
  c.socket.write(frame);
}

/** Tracks StatSN on a full feature connection; returns PDUs, skipping target NOP-In pings. */
class Watch {
  readonly seen: string[] = [];
  constructor(
    readonly c: RawInitiator,
    readonly where: string,
  ) {}
  async next(ms = HANG_MS): Promise<Pdu | undefined> {
    for (;;) {
      const p = await this.c.next(ms);
      if (!p) return undefined;
      const op = opcodeOf(p.bhs);
      const statSN = p.bhs.readUInt32BE(24);
      const itt = p.bhs.readUInt32BE(16);
      this.seen.push(`op=0x${op.toString(16)} itt=${itt} statSN=${statSN}`);
      if (this.c.framingErrors.length > 0) throw new Error(`seed=${SEED} ${this.where}: bad digest from the target: ${this.c.framingErrors.join(',')}`);
      if (advancesStatSN(op, itt, p.bhs[1]!)) {
        // The raw initiator's ExpStatSN is the StatSN expected next (login and helpers keep it).
        if (statSN !== this.c.expStatSN) {
          throw new Error(`seed=${SEED} ${this.where}: StatSN ${statSN}, expected ${this.c.expStatSN}\n${this.seen.slice(-8).join('\n')}`);
        }
        this.c.expStatSN = (statSN + 1) >>> 0;
      } else if (op === Opcode.NopIn && statSN !== this.c.expStatSN) {
        throw new Error(`seed=${SEED} ${this.where}: a target ping carries StatSN ${statSN}, expected ${this.c.expStatSN} (not advanced)`);
      }
      if (op === Opcode.NopIn && itt === RESERVED_TAG) continue;
      return p;
    }
  }
  async expect(op: number, what: string): Promise<Pdu> {
    const p = await this.next();
    if (!p) throw new Error(`seed=${SEED} ${this.where}: ${what}: nothing (closed=${this.c.isClosed})\n${this.seen.slice(-8).join('\n')}`);
    if (opcodeOf(p.bhs) !== op) throw new Error(`seed=${SEED} ${this.where}: ${what}: opcode 0x${opcodeOf(p.bhs).toString(16)}, expected 0x${op.toString(16)}`);
    return p;
  }
}

async function fuzzDigestConnection(fx: Fixture, rng: Rng, shadow: Buffer, where: string): Promise<void> {
  const hdOn = rng.chance(0.7);
  const ddOn = !hdOn || rng.chance(0.7);
  const c = await goodLogin(fx.port, {
    keys: [
      ['HeaderDigest', hdOn ? 'CRC32C' : 'None'],
      ['DataDigest', ddOn ? 'CRC32C' : 'None'],
      ['ImmediateData', 'Yes'],
      ['InitialR2T', rng.pick(['Yes', 'No'])],
      ['FirstBurstLength', '65536'],
      ['MaxBurstLength', String(rng.pick([4096, 65536]))],
    ],
  });
  expect(c.writer.headerDigest).toBe(hdOn);
  expect(c.writer.dataDigest).toBe(ddOn);
  const w = new Watch(c, where);
  try {
    for (let step = 0; step < DIGEST_STEPS; step++) {
      const at = `${where} step ${step}`;
      const blocks = rng.range(1, 8);
      const lba = rng.int(RW_BLOCKS - blocks + 1);
      const payload = rng.bytes(blocks * BLOCK);
      const kind = rng.weighted<'read' | 'imm' | 'imm-bad' | 'r2t' | 'r2t-bad' | 'hdr-bad' | 'nop-bad'>([
        [3, 'read'],
        [3, 'imm'],
        [ddOn ? 2 : 0, 'imm-bad'],
        [3, 'r2t'],
        [ddOn ? 2 : 0, 'r2t-bad'],
        [hdOn ? 1 : 0, 'hdr-bad'],
        [ddOn ? 1 : 0, 'nop-bad'],
      ]);
      if (kind === 'read') {
        const itt = c.scsi(read10(lba, blocks), { read: blocks * BLOCK });
        const chunks: Buffer[] = [];
        for (;;) {
          const p = await w.next();
          if (!p) throw new Error(`${at}: read unanswered`);
          expect(p.bhs.readUInt32BE(16)).toBe(itt);
          if (opcodeOf(p.bhs) === Opcode.DataIn) {
            chunks.push(p.data);
            if ((p.bhs[1]! & 0x01) !== 0) break;
          } else {
            expect(opcodeOf(p.bhs)).toBe(Opcode.ScsiResponse);
            break;
          }
        }
        expect(Buffer.concat(chunks).equals(shadow.subarray(lba * BLOCK, (lba + blocks) * BLOCK)), `${at}: read data`).toBe(true);
        continue;
      }
      if (kind === 'imm' || kind === 'imm-bad') {
        const itt = c.nextItt++;
        const cmd = encodeScsiCommand({
          immediate: false, final: true, read: false, write: true, taskAttribute: 1, lun: 0, itt,
          expectedDataLength: payload.length, cmdSN: c.cmdSN, expStatSN: c.expStatSN, cdb: write10(lba, blocks),
        });
        if (kind === 'imm-bad') {
          // A bit flipped on the wire (digest of the sent data), or a bad digest.
          const frame = digestFrame(cmd.bhs, payload, hdOn, ddOn, false, rng.chance(0.3));
          frame[48 + (hdOn ? 4 : 0) + rng.int(payload.length)] ^= 1 << rng.int(8);
          sendRaw(c, frame);
          const rej = await w.expect(Opcode.Reject, `${at}: corrupt immediate data`);
          expect(decodeReject(rej.bhs).reason, at).toBe(0x02);
          // §7.8 / §7.2.1: the command was discarded; the initiator retries it with the same CmdSN.
        }
        c.send(cmd.bhs, payload);
        c.cmdSN++;
        const r = await w.expect(Opcode.ScsiResponse, `${at}: write`);
        expect(r.bhs[3], `${at}: write status ${sense(r)}`).toBe(0);
        payload.copy(shadow, lba * BLOCK);
        continue;
      }
      if (kind === 'r2t' || kind === 'r2t-bad') {
        const itt = c.scsi(write10(lba, blocks), { write: payload.length });
        const bad = kind === 'r2t-bad';
        let corrupted = false;
        let done: Pdu | undefined;
        while (!done) {
          const p = await w.next();
          if (!p) throw new Error(`${at}: write via R2T unanswered (corrupted=${corrupted})\n${w.seen.slice(-6).join('\n')}`);
          if (opcodeOf(p.bhs) === Opcode.ScsiResponse) {
            done = p;
            break;
          }
          if (opcodeOf(p.bhs) === Opcode.Reject) {
            expect(corrupted, `${at}: unexpected Reject`).toBe(true);
            expect(decodeReject(p.bhs).reason).toBe(0x02);
            continue;
          }
          expect(opcodeOf(p.bhs), at).toBe(Opcode.ReadyToTransfer);
          const ttt = p.bhs.readUInt32BE(20);
          const offset = p.bhs.readUInt32BE(40);
          const length = p.bhs.readUInt32BE(44);
          const seg = 4096;
          for (let off = 0, sn = 0; off < length; off += seg, sn++) {
            const n = Math.min(seg, length - off);
            const bhs = encodeDataOut({ final: off + n >= length, lun: 0, itt, ttt, expStatSN: c.expStatSN, dataSN: sn, bufferOffset: offset + off });
            const data = payload.subarray(offset + off, offset + off + n);
            if (bad && !corrupted && rng.chance(0.5)) {
              corrupted = true;
              const frame = digestFrame(bhs, data, hdOn, ddOn, false, rng.chance(0.3));
              frame[48 + (hdOn ? 4 : 0) + rng.int(data.length)] ^= 1 << rng.int(8);
              sendRaw(c, frame);
            } else c.send(bhs, data);
          }
        }
        if (corrupted) {
          // §7.8: the corrupted Data-Out was rejected; at ERL 0 the task ends in CHECK CONDITION.
          expect(done.bhs[3], `${at}: write with a corrupted Data-Out`).toBe(2);
          expect(sense(done)).toBe('0b/47/05');
        } else {
          expect(done.bhs[3], `${at}: write status ${sense(done)}`).toBe(0);
          payload.copy(shadow, lba * BLOCK);
        }
        continue;
      }
      if (kind === 'nop-bad') {
        const bhs = encodeNopOut({ immediate: true, lun: 0, itt: c.nextItt++, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN });
        sendRaw(c, digestFrame(bhs, rng.bytes(rng.range(1, 300)), hdOn, ddOn, false, true));
        const rej = await w.expect(Opcode.Reject, `${at}: corrupt ping data`);
        expect(decodeReject(rej.bhs).reason).toBe(0x02);
        continue;
      }
      // Corrupted header digest: framing is lost; this target closes the connection (§7.8 allows
      // discarding or closing). The write it carried must not happen.
      const cmd = encodeScsiCommand({
        immediate: false, final: true, read: false, write: true, taskAttribute: 1, lun: 0, itt: c.nextItt++,
        expectedDataLength: payload.length, cmdSN: c.cmdSN, expStatSN: c.expStatSN, cdb: write10(lba, blocks),
      });
      sendRaw(c, digestFrame(cmd.bhs, payload, hdOn, ddOn, true, false));
      for (;;) {
        const p = await w.next();
        if (!p) break;
        expect(opcodeOf(p.bhs), `${at}: answer to a PDU with a bad header digest`).toBe(Opcode.Reject);
      }
      expect(c.isClosed, `${at}: connection still open after a header digest error`).toBe(true);
      break;
    }
    expect(fx.rw.data.equals(shadow), `${where}: LUN differs from the shadow`).toBe(true);
  } finally {
    c.close();
    await c.closed;
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency.

interface Task {
  readonly itt: number;
  readonly kind: 'read' | 'write' | 'tur';
  readonly lba: number;
  readonly blocks: number;
  readonly payload: Buffer | undefined;
  status: number | undefined;
  /** Data-In bytes collected for a read. */
  readonly data: Buffer[];
}

/** Per block: contents a block may hold (the last certain one plus all uncertain payloads). */
class BlockModel {
  readonly candidates: Buffer[][];
  /** Every block any write ever carried, for the diagnosis of a mismatch. */
  readonly history = new Map<string, string>();
  describe(block: Buffer): string {
    return this.history.get(block.toString('hex')) ?? 'no write ever sent these bytes';
  }
  constructor(initial: Buffer) {
    this.candidates = Array.from({ length: RW_BLOCKS }, (_, b) => [Buffer.from(initial.subarray(b * BLOCK, (b + 1) * BLOCK))]);
  }
  add(lba: number, payload: Buffer, label = ''): void {
    for (let i = 0; i < payload.length / BLOCK; i++) this.history.set(payload.subarray(i * BLOCK, (i + 1) * BLOCK).toString('hex'), `${label} block ${lba + i}`);
    for (let i = 0; i < payload.length / BLOCK; i++) this.candidates[lba + i]!.push(payload.subarray(i * BLOCK, (i + 1) * BLOCK));
  }
  ok(b: number, block: Buffer): boolean {
    return this.candidates[b]!.some((x) => x.equals(block));
  }
  /** After a batch: check the device, then take its bytes as the new certain state. */
  settle(dev: Buffer, where: string, certain: ReadonlyMap<number, Buffer>): void {
    for (let b = 0; b < RW_BLOCKS; b++) {
      const block = dev.subarray(b * BLOCK, (b + 1) * BLOCK);
      if (!this.ok(b, block)) throw new Error(`seed=${SEED} ${where}: block ${b} holds data no write of this batch sent (${this.describe(block)})`);
      const want = certain.get(b);
      if (want && !want.equals(block)) throw new Error(`seed=${SEED} ${where}: block ${b} lost an acknowledged write`);
      this.candidates[b] = [Buffer.from(block)];
    }
  }
}

type RoundEnding = 'answered' | 'drop' | 'reinstate';

/** One batch on a new session; returns how it ended (`forceEnding`, else chosen at random). */
async function concurrencyRound(fx: Fixture, rng: Rng, model: BlockModel, where: string, forceEnding?: RoundEnding): Promise<RoundEnding> {
  const c = await goodLogin(fx.port, { keys: [['ImmediateData', 'Yes'], ['InitialR2T', 'No'], ['FirstBurstLength', '65536'], ['MaxBurstLength', '65536']] });
  const w = new Watch(c, where);
  // A second session (another ISID) reads while this one writes.
  const reader = rng.chance(0.5) ? await goodLogin(fx.port, { isid: '400001370099' }) : undefined;
  const tasks = new Map<number, Task>();
  /** Blocks written by more than one command of the batch, or by an uncertain one. */
  const touch = new Map<number, number>();
  /** Outstanding TMFs, each with the tasks sent before it (the only ones it can abort). */
  const tmfs = new Map<number, { fn: number; ref: number | undefined; before: readonly number[] }>();
  const covered = new Set<number>();
  let logoutItt: number | undefined;
  let pingItts = new Set<number>();
  const depth = rng.range(8, 32);
  // How the batch ends: answered in full, or cut short when the connection drops or the initiator
  // logs in again with the same ISID (session reinstatement, §6.3.5). A reinstating round cuts at
  // once, with the device slowed down for the old batch only: its writes are still executing when
  // the new session writes the same blocks, and must not land after those.
  const ending = forceEnding ?? rng.weighted<RoundEnding>([[8, 'answered'], [1, 'drop'], [1, 'reinstate']]);
  const cutAfter = ending === 'reinstate' ? 0 : rng.int(depth); // answers to collect before the cut
  const deviceDelayMs = fx.rw.ioDelayMs;
  if (ending === 'reinstate') fx.rw.ioDelayMs = 150;
  const readerTasks: Array<{ itt: number; lba: number; blocks: number }> = [];
  const sent: string[] = [];
  /** The session that reinstates this one, if the round ends that way. */
  let successor: RawInitiator | undefined;
  try {
    for (let i = 0; i < depth; i++) {
      const blocks = rng.range(1, 16);
      const lba = rng.int(RW_BLOCKS - blocks + 1);
      const kind = rng.weighted<Task['kind']>([[5, 'write'], [3, 'read'], [1, 'tur']]);
      let itt: number;
      let payload: Buffer | undefined;
      if (kind === 'write') {
        payload = rng.bytes(blocks * BLOCK);
        itt = c.scsi(write10(lba, blocks), { write: payload.length, data: payload });
        model.add(lba, payload, `${where} write itt ${c.nextItt - 1}`);
        for (let b = lba; b < lba + blocks; b++) touch.set(b, (touch.get(b) ?? 0) + 1);
      } else if (kind === 'read') itt = c.scsi(read10(lba, blocks), { read: blocks * BLOCK });
      else itt = c.scsi(TEST_UNIT_READY);
      tasks.set(itt, { itt, kind, lba, blocks, payload, status: undefined, data: [] });
      sent.push(`${kind} itt=${itt} lba=${lba}+${blocks}`);
      if (reader && rng.chance(0.4)) {
        const rb = rng.range(1, 16);
        const rl = rng.int(RW_BLOCKS - rb + 1);
        readerTasks.push({ itt: reader.scsi(read10(rl, rb), { read: rb * BLOCK }), lba: rl, blocks: rb });
      }
      // Interleave task management, pings, and rarely a logout.
      const extra = rng.weighted<'none' | 'abort' | 'abort-done' | 'set' | 'nop' | 'nop-imm'>([
        [10, 'none'], [3, 'abort'], [1, 'abort-done'], [1, 'set'], [2, 'nop'], [1, 'nop-imm'],
      ]);
      if (extra === 'abort' || extra === 'abort-done') {
        const itts = [...tasks.keys()];
        const ref = extra === 'abort' ? rng.pick(itts) : 0x7fff0000 + i; // unknown / long finished
        const titt = c.nextItt++;
        const t = tasks.get(ref);
        c.send(encodeTaskManagementRequest({ immediate: true, function: 1, lun: 0, itt: titt, referencedTaskTag: ref, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: 0, expDataSN: 0 }));
        tmfs.set(titt, { fn: 1, ref: t ? ref : undefined, before: [...tasks.keys()] });
        sent.push(`ABORT TASK itt=${titt} ref=${ref}`);
      } else if (extra === 'set') {
        const fn = rng.pick([2, 6, 5]); // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET
        const titt = c.nextItt++;
        const immediate = rng.chance(0.5);
        c.send(encodeTaskManagementRequest({ immediate, function: fn, lun: 0, itt: titt, referencedTaskTag: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: 0, expDataSN: 0 }));
        if (!immediate) c.cmdSN++; // a non-immediate request takes a CmdSN (§3.2.2.1)
        tmfs.set(titt, { fn, ref: undefined, before: [...tasks.keys()] });
        sent.push(`TMF ${fn} itt=${titt}`);
      } else if (extra === 'nop' || extra === 'nop-imm') {
        const itt2 = c.nextItt++;
        const imm = extra === 'nop-imm';
        c.send(encodeNopOut({ immediate: imm, lun: 0, itt: itt2, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN }), rng.bytes(rng.range(0, 64)));
        if (!imm) c.cmdSN++;
        pingItts.add(itt2);
      }
    }
    let answers = 0;
    if (ending === 'answered' && rng.chance(0.25)) {
      logoutItt = c.nextItt++;
      const immediate = rng.chance(0.5);
      c.send(encodeLogoutRequest({ immediate, reason: 0, itt: logoutItt, cid: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
      if (!immediate) c.cmdSN++;
    }
    // Collect until every task, TMF and ping is answered (or the logout closed the connection).
    let loggedOut = false;
    const pending = (): number =>
      [...tasks.values()].filter((t) => t.status === undefined && !covered.has(t.itt)).length + tmfs.size + pingItts.size + (logoutItt !== undefined && !loggedOut ? 1 : 0);
    while (pending() > 0 && !(ending !== 'answered' && answers >= cutAfter)) {
      const p = await w.next();
      answers++;
      if (!p) {
        if (loggedOut && c.isClosed) break;
        throw new Error(
          `seed=${SEED} ${where}: hang — ${pending()} unanswered (tasks ${[...tasks.values()].filter((t) => t.status === undefined && !covered.has(t.itt)).map((t) => t.itt).join(',')}, tmfs ${[...tmfs.keys()].join(',')}, pings ${[...pingItts].join(',')})\nsent: ${sent.join('; ')}\n${w.seen.slice(-40).join('\n')}`,
        );
      }
      const op = opcodeOf(p.bhs);
      const itt = p.bhs.readUInt32BE(16);
      if (op === Opcode.DataIn) {
        const t = tasks.get(itt);
        expect(t?.kind, `${where}: Data-In for ${itt}`).toBe('read');
        t!.data.push(p.data);
        if ((p.bhs[1]! & 0x01) !== 0) t!.status = p.bhs[3]!;
      } else if (op === Opcode.ScsiResponse) {
        const t = tasks.get(itt);
        if (!t) throw new Error(`${where}: response for unknown ITT ${itt}`);
        expect(t.status, `${where}: two responses for ${itt}`).toBeUndefined();
        expect(covered.has(itt), `${where}: a response after the TMF that aborted ${itt}`).toBe(false);
        t.status = p.bhs[3]!;
        // Only UNIT ATTENTION (after a LU reset of this batch) may fail a command here.
        if (t.status !== 0) expect(sense(p).slice(0, 2), `${where}: ${t.kind} ${itt} status ${t.status} ${sense(p)}`).toBe('06');
      } else if (op === Opcode.TaskManagementResponse) {
        const tmf = tmfs.get(itt);
        if (!tmf) throw new Error(`${where}: TMF response for unknown ITT ${itt}`);
        tmfs.delete(itt);
        const response = p.bhs[2]!;
        if (tmf.fn === 1) {
          const t = tmf.ref !== undefined ? tasks.get(tmf.ref) : undefined;
          if (!t) expect(response, `${where}: ABORT TASK of an unknown task`).toBe(1); // TASK DOES NOT EXIST
          else if (response === 0) {
            expect(t.status, `${where}: ABORT TASK 'complete' for a task already answered`).toBeUndefined();
            covered.add(t.itt);
          } else expect(response).toBe(1);
        } else {
          expect(response, `${where}: TMF ${tmf.fn}`).toBe(0);
          for (const x of tmf.before) if (tasks.get(x)!.status === undefined) covered.add(x);
        }
      } else if (op === Opcode.NopIn) {
        expect(pingItts.has(itt), `${where}: NOP-In for ${itt}`).toBe(true);
        pingItts = new Set([...pingItts].filter((x) => x !== itt));
      } else if (op === Opcode.LogoutResponse) {
        expect(itt).toBe(logoutItt);
        expect(p.bhs[2], `${where}: logout response`).toBe(0);
        loggedOut = true;
        // Everything still unanswered was aborted by the logout (ERL 0, §11.14).
        for (const t of tasks.values()) if (t.status === undefined) covered.add(t.itt);
        tmfs.clear();
        pingItts.clear();
      } else throw new Error(`${where}: unexpected opcode 0x${op.toString(16)} (${w.seen.slice(-3).join(' | ')})`);
    }
    /** Writes of the reinstating session: certain, they came after every write of the old one. */
    const after = new Map<number, Buffer>();
    if (ending !== 'answered') {
      sent.push(`cut after ${answers} answers: ${ending}`);
      if (ending === 'drop') c.close();
      else {
        // The old session's unanswered commands are aborted; those already executing end on
        // their own. The new session then writes blocks the old batch wrote: its data must win.
        await new Promise((r) => setTimeout(r, 20)); // the old writes reach the device (and stay 150 ms)
        fx.rw.ioDelayMs = deviceDelayMs;
        successor = await goodLogin(fx.port, { keys: [['ImmediateData', 'Yes'], ['InitialR2T', 'No']] });
        const sw = new Watch(successor, `${where} successor`);
        const lbas = [...new Set([...tasks.values()].filter((t) => t.kind === 'write').map((t) => t.lba + rng.int(t.blocks)))].slice(0, 4);
        const itts = new Map<number, number>();
        for (const lba of lbas) {
          const payload = rng.bytes(BLOCK);
          itts.set(successor.scsi(write10(lba, 1), { write: BLOCK, data: payload }), lba);
          model.add(lba, payload, `${where} successor write`);
          after.set(lba, payload);
        }
        for (let k = 0; k < lbas.length; k++) {
          const p = await sw.expect(Opcode.ScsiResponse, 'successor write');
          expect(itts.has(p.bhs.readUInt32BE(16)) && p.bhs[3] === 0, `${where}: successor write status ${p.bhs[3]} ${sense(p)}`).toBe(true);
        }
      }
      await c.closed; // dropped by us, or closed by the target on reinstatement
      await new Promise((r) => setTimeout(r, 100)); // what the old session left executing has ended
    }
    // Acknowledged writes are certain where no other write of the batch touched the block.
    const certain = new Map<number, Buffer>();
    for (const t of tasks.values()) {
      if (t.kind === 'write' && t.status === 0) {
        for (let i = 0; i < t.blocks; i++) {
          if (touch.get(t.lba + i) === 1) certain.set(t.lba + i, t.payload!.subarray(i * BLOCK, (i + 1) * BLOCK));
        }
      }
      if (t.kind === 'read' && t.status === 0) {
        const data = Buffer.concat(t.data);
        expect(data.length).toBe(t.blocks * BLOCK);
        for (let i = 0; i < t.blocks; i++) {
          if (!model.ok(t.lba + i, data.subarray(i * BLOCK, (i + 1) * BLOCK))) throw new Error(`${where}: read ${t.itt} returned unexpected data at block ${t.lba + i} (${model.describe(data.subarray(i * BLOCK, (i + 1) * BLOCK))})\nsent: ${sent.join('; ')}`);
        }
      }
    }
    if (reader) {
      const rw = new Watch(reader, `${where} reader`);
      const left = new Map(readerTasks.map((t) => [t.itt, { ...t, chunks: [] as Buffer[] }]));
      while (left.size > 0) {
        const p = await rw.next();
        if (!p) throw new Error(`${where}: the reading session hung (${left.size} unanswered)`);
        const t = left.get(p.bhs.readUInt32BE(16));
        if (!t) throw new Error(`${where}: reader got unknown ITT`);
        if (opcodeOf(p.bhs) === Opcode.DataIn) t.chunks.push(p.data);
        if (opcodeOf(p.bhs) === Opcode.ScsiResponse || (opcodeOf(p.bhs) === Opcode.DataIn && (p.bhs[1]! & 0x01) !== 0)) {
          left.delete(t.itt);
          if (p.bhs[3] !== 0) {
            expect(sense(p).slice(0, 2), `${where} reader status ${sense(p)}`).toBe('06'); // reset by the other session
            continue;
          }
          const data = Buffer.concat(t.chunks);
          for (let i = 0; i < t.blocks; i++) {
            if (!model.ok(t.lba + i, data.subarray(i * BLOCK, (i + 1) * BLOCK))) throw new Error(`${where}: the other session read unexpected data at block ${t.lba + i} (${model.describe(data.subarray(i * BLOCK, (i + 1) * BLOCK))})`);
          }
          left.delete(t.itt);
        }
      }
      await expectServiceable(reader, `${where} reader after`);
    }
    // Commands still executing when a connection was closed by us may still be finishing on the
    // device (TMF and Logout responses wait for the ones they abort; a dropped connection cannot).
    await new Promise((r) => setTimeout(r, 25));
    for (const [b, payload] of after) certain.set(b, payload);
    model.settle(fx.rw.data, where, certain);
    if (successor) await expectServiceable(successor, `${where} successor after`);
    else if (!loggedOut && ending === 'answered') await expectServiceable(c, `${where} after`);
    assertNoFaults(fx, where);
    return ending;
  } finally {
    fx.rw.ioDelayMs = deviceDelayMs;
    c.close();
    reader?.close();
    successor?.close();
    await c.closed;
    if (reader) await reader.closed;
    if (successor) await successor.closed;
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Target NOP-In pings with a misbehaving initiator.

async function nopScenario(fx: Fixture, rng: Rng, where: string): Promise<'dropped' | 'alive'> {
  const c = await goodLogin(fx.port, { isid: `40000137${rng.int(0xffff).toString(16).padStart(4, '0')}` });
  const w = new Watch(c, where);
  const mode = rng.pick(['ignore', 'wrong-ttt', 'right-ttt', 'itt-set'] as const);
  const until = Date.now() + 900;
  try {
    let pings = 0;
    while (Date.now() < until && !c.isClosed) {
      const p = await c.next(100);
      if (p) {
        const op = opcodeOf(p.bhs);
        if (op === Opcode.NopIn && p.bhs.readUInt32BE(16) === RESERVED_TAG) {
          pings++;
          const ttt = p.bhs.readUInt32BE(20);
          expect(ttt, `${where}: a target ping must carry a TTT`).not.toBe(RESERVED_TAG);
          expect(p.bhs.readUInt32BE(24), `${where}: ping StatSN`).toBe(c.expStatSN);
          if (mode === 'wrong-ttt') c.send(encodeNopOut({ immediate: true, lun: 0, itt: RESERVED_TAG, ttt: (ttt + 1 + rng.int(1000)) >>> 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
          else if (mode === 'right-ttt') c.send(encodeNopOut({ immediate: true, lun: 0, itt: RESERVED_TAG, ttt, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
          else if (mode === 'itt-set') {
            // A reply that is itself a ping (ITT set): the target answers it with a NOP-In or Rejects.
            c.send(encodeNopOut({ immediate: true, lun: 0, itt: c.nextItt++, ttt, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
            const a = await w.next(HANG_MS);
            if (a) expect([Opcode.NopIn, Opcode.Reject]).toContain(opcodeOf(a.bhs));
          }
          continue;
        }
        throw new Error(`${where}: unexpected opcode 0x${op.toString(16)}`);
      }
      if (mode !== 'ignore' && rng.chance(0.3)) await expectServiceable(c, where);
    }
    if (mode === 'ignore') {
      // Unanswered pings: the target drops the connection after nopInTimeoutMs.
      await Promise.race([c.closed, new Promise((r) => setTimeout(r, HANG_MS))]);
      expect(c.isClosed, `${where}: connection kept despite unanswered pings`).toBe(true);
      expect(pings).toBeGreaterThan(0);
      return 'dropped';
    }
    if (!c.isClosed) await expectServiceable(c, `${where} end`);
    return c.isClosed ? 'dropped' : 'alive';
  } finally {
    c.close();
    await c.closed;
  }
}

// ---------------------------------------------------------------------------------------------

describe(`seeded fuzz, part 2 (seed ${SEED}; BOOTRESTORE_FUZZ_SEED overrides)`, () => {
  it('CHAP: random and malformed security-stage keys → login only with the secret, 02/01 otherwise, never a crash', async () => {
    const fx = await startFixture({ chap: CHAP });
    const rng = new Rng(SEED ^ 0x1111);
    const stats: ChapStats = { succeeded: 0, refused: 0, labels: new Map() };
    const replay = { last: undefined as string | undefined };
    try {
      for (let i = 0; i < CHAP_CONNECTIONS; i++) {
        await fuzzChapConnection(fx, rng.fork(), `chap connection ${i}`, replay, stats);
        assertNoFaults(fx, `chap connection ${i}`);
      }
      // Still serviceable for a correct initiator.
      const c = await goodLogin(fx.port, { chap: true });
      await expectServiceable(c, 'after chap fuzz');
      c.close();
      await c.closed;
      console.log(`[fuzz-more] chap: ${stats.succeeded} logins, ${stats.refused} refused`);
      expect(stats.succeeded).toBeGreaterThan(0);
      expect(stats.refused).toBeGreaterThan(0);
    } finally {
      await fx.server.stop();
    }
  });

  it('digests: corrupted header digest closes the connection, corrupted data digest → Reject 0x02, nothing corrupt reaches the disk', async () => {
    const fx = await startFixture();
    const rng = new Rng(SEED ^ 0x2222);
    const shadow = Buffer.from(fx.rw.data);
    try {
      for (let i = 0; i < DIGEST_CONNECTIONS; i++) {
        await fuzzDigestConnection(fx, rng.fork(), shadow, `digest connection ${i}`);
        assertNoFaults(fx, `digest connection ${i}`);
      }
    } finally {
      await fx.server.stop();
    }
  });

  it('concurrency: QD 8–32 with TMFs, pings, logout, dropped connections, session reinstatement and a second session → every task answered or covered, data never garbage, a reinstating session\'s writes win', async () => {
    const fx = await startFixture({ ioDelayMs: 1 });
    const rng = new Rng(SEED ^ 0x3333);
    const model = new BlockModel(fx.rw.data);
    try {
      const endings = new Map<RoundEnding, number>();
      for (let i = 0; i < CONCURRENCY_ROUNDS; i++) {
        // Rounds 1 and 2 always end by a drop and by a reinstatement; the others at random.
        const forced = i === 1 ? 'drop' : i === 2 ? 'reinstate' : undefined;
        const ending = await concurrencyRound(fx, rng.fork(), model, `concurrency round ${i}`, forced);
        endings.set(ending, (endings.get(ending) ?? 0) + 1);
      }
      console.info(`[fuzz-more] concurrency rounds by ending: ${[...endings].map(([k, v]) => `${k} ${v}`).join(', ')}`);
    } finally {
      await fx.server.stop();
    }
  });

  it('target NOP-In pings: ignored pings drop the connection, wrong TTTs never crash it, StatSN is not advanced by pings', async () => {
    const fx = await startFixture({ nopInIntervalMs: 100, nopInTimeoutMs: 300 });
    const rng = new Rng(SEED ^ 0x4444);
    try {
      const runs = await Promise.all(Array.from({ length: 6 }, (_, i) => nopScenario(fx, rng.fork(), `nop scenario ${i}`)));
      expect(runs.length).toBe(6);
      assertNoFaults(fx, 'nop scenarios');
    } finally {
      await fx.server.stop();
    }
  });
});

describe('defects found by fuzz part 2', () => {
  it('a Data-Out whose data digest fails, sent as the last of its sequence, ends the write with CHECK CONDITION 0B/47/05 instead of leaving it waiting forever (RFC 7143 §7.8)', async () => {
    const fx = await startFixture();
    try {
      const before = Buffer.from(fx.rw.data);
      const c = await goodLogin(fx.port, { keys: [['DataDigest', 'CRC32C'], ['InitialR2T', 'Yes'], ['ImmediateData', 'No']] });
      const w = new Watch(c, 'repro');
      const itt = c.scsi(write10(3, 1), { write: BLOCK });
      const r2t = await w.expect(Opcode.ReadyToTransfer, 'R2T');
      const bhs = encodeDataOut({ final: true, lun: 0, itt, ttt: r2t.bhs.readUInt32BE(20), expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0 });
      sendRaw(c, digestFrame(bhs, Buffer.alloc(BLOCK, 0xee), false, true, false, true));
      const rej = await w.expect(Opcode.Reject, 'Reject');
      expect(decodeReject(rej.bhs).reason).toBe(0x02);
      const resp = await w.expect(Opcode.ScsiResponse, 'SCSI Response');
      expect(resp.bhs.readUInt32BE(16)).toBe(itt);
      expect(resp.bhs[3]).toBe(2);
      expect(sense(resp)).toBe('0b/47/05');
      expect(fx.rw.data.equals(before)).toBe(true);
      await expectServiceable(c, 'after');
      c.close();
      await c.closed;
      assertNoFaults(fx, 'repro');
    } finally {
      await fx.server.stop();
    }
  });

  it('a write aborted by ABORT TASK while it waits behind an overlapping write never reaches the medium (SAM-5 5.6, RFC 7143 §11.5.1)', async () => {
    const fx = await startFixture({ ioDelayMs: 60 });
    try {
      const c = await goodLogin(fx.port, { keys: [['ImmediateData', 'Yes'], ['InitialR2T', 'No']] });
      const w = new Watch(c, 'repro');
      const a = Buffer.alloc(BLOCK, 0xaa);
      const b = Buffer.alloc(BLOCK, 0xbb);
      const ittA = c.scsi(write10(5, 1), { write: BLOCK, data: a });
      const ittB = c.scsi(write10(5, 1), { write: BLOCK, data: b }); // queued behind A on the range lock
      await new Promise((r) => setTimeout(r, 10));
      c.send(encodeTaskManagementRequest({ immediate: true, function: 1, lun: 0, itt: 0x900, referencedTaskTag: ittB, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: 0, expDataSN: 0 }));
      // The TMF (immediate) and A's response, in either order.
      const got = new Map<number, Pdu>();
      for (let i = 0; i < 2; i++) {
        const p = await w.next();
        if (!p) throw new Error('repro: missing answer');
        got.set(opcodeOf(p.bhs), p);
      }
      expect(got.get(Opcode.TaskManagementResponse)?.bhs[2]).toBe(0); // FUNCTION COMPLETE: B is aborted
      const ra = got.get(Opcode.ScsiResponse)!;
      expect([ra.bhs.readUInt32BE(16), ra.bhs[3]]).toEqual([ittA, 0]);
      await new Promise((r) => setTimeout(r, 150)); // B would have run by now
      expect(fx.rw.data.subarray(5 * BLOCK, 6 * BLOCK).equals(a), 'the aborted write B reached the medium').toBe(true);
      expect(await w.next(100)).toBeUndefined(); // and B gets no response of its own
      c.close();
      await c.closed;
      assertNoFaults(fx, 'repro');
    } finally {
      await fx.server.stop();
    }
  });

  /**
   * A one-block write to block 9 held 80 ms on the device, then `request` (sent 20 ms in) whose
   * response (`opcode`) must not go out while the write can still change the medium: at the response
   * the block is the old data or the write's, and it stays so. Returns that response.
   */
  async function writeThenRespond(
    fill: number,
    label: string,
    opcode: number,
    request: (c: RawInitiator, writeItt: number) => void,
    after: (c: RawInitiator) => Promise<void>,
  ): Promise<Pdu> {
    const fx = await startFixture({ ioDelayMs: 80 });
    try {
      const before = Buffer.from(fx.rw.data.subarray(9 * BLOCK, 10 * BLOCK));
      const c = await goodLogin(fx.port, { keys: [['ImmediateData', 'Yes'], ['InitialR2T', 'No']] });
      const w = new Watch(c, label);
      const itt = c.scsi(write10(9, 1), { write: BLOCK, data: Buffer.alloc(BLOCK, fill) });
      await new Promise((r) => setTimeout(r, 20));
      request(c, itt);
      const response = await w.expect(opcode, label);
      // The write was already on the device: it may or may not have landed (SAM-5 leaves that
      // open), but nothing may change once the response is out.
      const atResponse = Buffer.from(fx.rw.data.subarray(9 * BLOCK, 10 * BLOCK));
      expect(atResponse.equals(before) || atResponse.equals(Buffer.alloc(BLOCK, fill))).toBe(true);
      await new Promise((r) => setTimeout(r, 150));
      expect(fx.rw.data.subarray(9 * BLOCK, 10 * BLOCK).equals(atResponse)).toBe(true);
      await after(c);
      return response;
    } finally {
      await fx.server.stop();
    }
  }

  // Found as a gap: the SCSI layer cannot stop a device write already under way, and the TMF
  // response went out without waiting for it, so an aborted write could change the medium after
  // FUNCTION COMPLETE. The response now waits for aborted commands already executing (as LIO does).
  it('a write already executing when ABORT TASK arrives: the TMF response waits for it, so the medium never changes after FUNCTION COMPLETE (SAM-5 7.1, RFC 7143 §4.2.3.3)', async () => {
    const tmf = await writeThenRespond(
      0xcc,
      'ABORT TASK',
      Opcode.TaskManagementResponse,
      (c, itt) =>
        c.send(encodeTaskManagementRequest({ immediate: true, function: 1, lun: 0, itt: 0x901, referencedTaskTag: itt, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: 0, expDataSN: 0 })),
      async (c) => {
        c.close();
        await c.closed;
      },
    );
    expect(tmf.bhs[2]).toBe(0); // FUNCTION COMPLETE
  });

  it('a write still executing at logout: the Logout Response waits for it, so the medium never changes after it (RFC 7143 §11.14)', async () => {
    await writeThenRespond(
      0xcd,
      'logout',
      Opcode.LogoutResponse,
      (c) => c.send(encodeLogoutRequest({ immediate: true, reason: 0, itt: 0x902, cid: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN })),
      async (c) => {
        await c.closed;
      },
    );
  });
});

describe('session reinstatement and dropped connections', () => {
  // An initiator whose connection fails logs in again with the same ISID (§6.3.5: the target ends
  // the old session) and retries its outstanding commands on the new session. The old session's
  // commands are aborted, but one already executing on the device ends on its own, possibly after
  // the new session has started. It must not overwrite what the new session writes to the same
  // blocks: the LU's range lock (sbc.ts) makes the new write wait for it, whatever the sessions.
  for (const how of ['reinstated while its connection is up', 'logged in again after its connection dropped'] as const) {
    it(`a write still executing when the session is ${how} lands before, never after, the new session's write`, async () => {
      const fx = await startFixture({ ioDelayMs: 500 });
      const ISID = '400001370abc';
      try {
        const lba = 13;
        const block = (): Buffer => Buffer.from(fx.rw.data.subarray(lba * BLOCK, (lba + 1) * BLOCK));
        const before = block();
        const a = await goodLogin(fx.port, { isid: ISID, keys: [['ImmediateData', 'Yes'], ['InitialR2T', 'No']] });
        a.scsi(write10(lba, 1), { write: BLOCK, data: Buffer.alloc(BLOCK, 0xce) });
        await new Promise((r) => setTimeout(r, 20)); // on the device now, for 500 ms
        fx.rw.ioDelayMs = 0; // later writes are instant: without ordering, the new one would land first
        if (how === 'logged in again after its connection dropped') {
          a.close();
          await a.closed;
        }
        const b = await RawInitiator.connect(fx.port);
        sendLogin(b, { csg: 1, nsg: 3, transit: true, isid: ISID }, [['InitiatorName', INITIATOR], ['SessionType', 'Normal'], ['TargetName', IQN], ['ImmediateData', 'Yes'], ['InitialR2T', 'No']]);
        const answer = await loginAnswer(b, 'login of the new session');
        expect([answer?.statusClass, answer?.transit, answer?.nsg]).toEqual([0, true, 3]);
        await a.closed; // a reinstated session's connection is closed by the target
        await expectServiceable(b, 'new session'); // takes the new nexus's UNIT ATTENTION
        expect(block().equals(before), 'the old write is still executing').toBe(true);
        const newer = Buffer.alloc(BLOCK, 0xdf);
        const w = new Watch(b, 'new session');
        const itt = b.scsi(write10(lba, 1), { write: BLOCK, data: newer });
        const resp = await w.expect(Opcode.ScsiResponse, 'write on the new session');
        expect([resp.bhs.readUInt32BE(16), resp.bhs[3]]).toEqual([itt, 0]);
        await new Promise((r) => setTimeout(r, 100)); // the old write has ended by now (the new one waited for it)
        expect(fx.rw.writes.filter((x) => x.lba === lba)).toHaveLength(2); // both ran on the device
        expect(block().equals(newer), "the old session's write landed after the new session's").toBe(true);
        b.close();
        await b.closed;
        assertNoFaults(fx, how);
      } finally {
        await fx.server.stop();
      }
    });
  }
});
