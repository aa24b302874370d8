import { describe, expect, it } from 'vitest';
import {
  DEFAULT_TARGET_POLICY,
  defaultSessionParameters,
  negotiateKey,
  type TargetKeyPolicy,
} from '../../../../src/iscsi/login/keys.js';
import { LoginNegotiation, LoginStatus, type LoginReply } from '../../../../src/iscsi/login/login.js';
import { encodeText, parseText } from '../../../../src/iscsi/login/text.js';
import { LoginStage, type LoginRequestFields } from '../../../../src/iscsi/pdu/bhs.js';

function negotiate(key: string, value: string, opts: { discovery?: boolean; policy?: TargetKeyPolicy } = {}) {
  const params = defaultSessionParameters();
  const outcome = negotiateKey(key, value, {
    policy: opts.policy ?? DEFAULT_TARGET_POLICY,
    discovery: opts.discovery ?? false,
    params,
  });
  return { reply: outcome.reply, params };
}

describe('key negotiation rules (RFC 7143 §6.2, §13)', () => {
  it('list keys: first value of the offer we accept', () => {
    expect(negotiate('HeaderDigest', 'None,CRC32C').reply).toBe('None');
    const crc = negotiate('HeaderDigest', 'CRC32C,None');
    expect(crc.reply).toBe('CRC32C');
    expect(crc.params.headerDigest).toBe(true);
    expect(negotiate('DataDigest', 'MD5,CRC32C').reply).toBe('CRC32C');
    // A target that requires digests answers CRC32C to "None,CRC32C", Reject to "None".
    const strict: TargetKeyPolicy = { ...DEFAULT_TARGET_POLICY, headerDigests: ['CRC32C'] };
    expect(negotiate('HeaderDigest', 'None,CRC32C', { policy: strict }).reply).toBe('CRC32C');
    expect(negotiate('HeaderDigest', 'None', { policy: strict }).reply).toBe('Reject');
    expect(negotiate('HeaderDigest', 'None,,CRC32C').reply).toBe('Reject');
  });

  it('numerical min/max keys: smaller / larger of offer and ours; out of range or junk → Reject', () => {
    const mbl = negotiate('MaxBurstLength', '65536');
    expect(mbl.reply).toBe('65536');
    expect(mbl.params.maxBurstLength).toBe(65536);
    expect(negotiate('MaxBurstLength', '16777215').reply).toBe(String(DEFAULT_TARGET_POLICY.maxBurstLength));
    expect(negotiate('MaxBurstLength', '511').reply).toBe('Reject');
    expect(negotiate('MaxBurstLength', '16777216').reply).toBe('Reject');
    expect(negotiate('MaxBurstLength', 'lots').reply).toBe('Reject');
    expect(negotiate('FirstBurstLength', '0x1000').reply).toBe('4096');
    expect(negotiate('MaxConnections', '8').reply).toBe('1');
    expect(negotiate('ErrorRecoveryLevel', '2').reply).toBe('0');
    expect(negotiate('ErrorRecoveryLevel', '3').reply).toBe('Reject');
    expect(negotiate('MaxOutstandingR2T', '1').reply).toBe('1');
    expect(negotiate('MaxOutstandingR2T', '64').reply).toBe(String(DEFAULT_TARGET_POLICY.maxOutstandingR2T));
    // DefaultTime2Wait is "max": ours is 2.
    expect(negotiate('DefaultTime2Wait', '0').reply).toBe('2');
    expect(negotiate('DefaultTime2Wait', '7').reply).toBe('7');
    // DefaultTime2Retain is "min".
    expect(negotiate('DefaultTime2Retain', '0').reply).toBe('0');
    expect(negotiate('DefaultTime2Retain', '3601').reply).toBe('Reject');
  });

  it('boolean OR / AND keys', () => {
    // InitialR2T is OR; this target says No, so the initiator decides.
    expect(negotiate('InitialR2T', 'No').reply).toBe('No');
    expect(negotiate('InitialR2T', 'Yes').reply).toBe('Yes');
    expect(negotiate('InitialR2T', 'No').params.initialR2T).toBe(false);
    // ImmediateData is AND.
    expect(negotiate('ImmediateData', 'No').reply).toBe('No');
    expect(negotiate('ImmediateData', 'Yes').reply).toBe('Yes');
    // DataPDUInOrder is OR and we say Yes: always Yes.
    expect(negotiate('DataPDUInOrder', 'No').reply).toBe('Yes');
    expect(negotiate('ImmediateData', 'yes').reply).toBe('Reject');
  });

  it('markers, iSER keys, unknown keys', () => {
    expect(negotiate('IFMarker', 'Yes').reply).toBe('No');
    expect(negotiate('OFMarker', 'No').reply).toBe('No');
    expect(negotiate('IFMarkInt', '2048~8192').reply).toBe('Reject');
    expect(negotiate('RDMAExtensions', 'Yes').reply).toBe('No');
    expect(negotiate('InitiatorRecvDataSegmentLength', '262144').reply).toBe('Irrelevant');
    expect(negotiate('FancyNewKey', '1').reply).toBe('NotUnderstood');
    expect(negotiate('SendTargets', 'All').reply).toBe('Irrelevant');
  });

  it('MaxRecvDataSegmentLength is declarative: recorded, not answered', () => {
    const r = negotiate('MaxRecvDataSegmentLength', '65536');
    expect(r.reply).toBeUndefined();
    expect(r.params.initiatorMaxRecvDataSegmentLength).toBe(65536);
    expect(negotiate('MaxRecvDataSegmentLength', '100').reply).toBe('Reject');
  });

  it('operational keys of normal sessions are Irrelevant in discovery sessions', () => {
    expect(negotiate('MaxBurstLength', '65536', { discovery: true }).reply).toBe('Irrelevant');
    expect(negotiate('ImmediateData', 'Yes', { discovery: true }).reply).toBe('Irrelevant');
    expect(negotiate('HeaderDigest', 'None', { discovery: true }).reply).toBe('None');
    expect(negotiate('DefaultTime2Wait', '2', { discovery: true }).reply).toBe('2');
    expect(negotiate('MaxConnections', '1', { discovery: true }).reply).toBe('Irrelevant');
  });
});

describe('text parsing', () => {
  it('round-trips key=value pairs and rejects malformed text', () => {
    const buf = encodeText([
      { key: 'InitiatorName', value: 'iqn.x' },
      { key: 'SendTargets', value: '' },
    ]);
    const parsed = parseText(buf);
    expect(parsed.ok && parsed.pairs).toEqual([
      { key: 'InitiatorName', value: 'iqn.x' },
      { key: 'SendTargets', value: '' },
    ]);
    expect(parseText(Buffer.from('NoEquals\0')).ok).toBe(false);
    expect(parseText(Buffer.from('A=1\0A=2\0')).ok).toBe(false);
    expect(parseText(Buffer.from('bad key=1\0')).ok).toBe(false);
    expect(parseText(Buffer.from(`K=${'x'.repeat(9000)}\0`)).ok).toBe(false);
  });
});

const TARGET = 'iqn.2026-12.test:t1';

function request(over: Partial<LoginRequestFields>): LoginRequestFields {
  return {
    transit: true,
    continue: false,
    csg: LoginStage.Security,
    nsg: LoginStage.Operational,
    versionMax: 0,
    versionMin: 0,
    isid: '400001370000',
    tsih: 0,
    itt: 1,
    cid: 0,
    cmdSN: 1,
    expStatSN: 0,
    ...over,
  };
}

function text(pairs: Record<string, string>): Buffer {
  return encodeText(Object.entries(pairs).map(([key, value]) => ({ key, value })));
}

function replyPairs(r: LoginReply): Record<string, string> {
  const parsed = parseText(r.data);
  if (!parsed.ok) throw new Error(parsed.reason);
  return Object.fromEntries(parsed.pairs.map((p) => [p.key, p.value]));
}

function newLogin(allowed?: string[]) {
  return new LoginNegotiation({
    findTarget: (iqn) => (iqn === TARGET ? { iqn, alias: 'disk one', allowedInitiators: allowed } : undefined),
    targetPortalGroupTag: 1,
  });
}

describe('login phases and status classes (RFC 7143 §6.3, §11.13)', () => {
  it('security → operational → full feature, with TPGT first and our MaxRecvDataSegmentLength', () => {
    const login = newLogin();
    const r1 = login.handle(
      request({}),
      text({ InitiatorName: 'iqn.i', TargetName: TARGET, SessionType: 'Normal', AuthMethod: 'CHAP,None' }),
    );
    expect(r1.status).toEqual(LoginStatus.Success);
    expect(r1.transit).toBe(true);
    expect(r1.nsg).toBe(LoginStage.Operational);
    const p1 = replyPairs(r1);
    expect(p1.AuthMethod).toBe('None');
    expect(p1.TargetPortalGroupTag).toBe('1');
    expect(p1.TargetAlias).toBe('disk one');
    const r2 = login.handle(
      request({ csg: LoginStage.Operational, nsg: LoginStage.FullFeature }),
      text({ HeaderDigest: 'CRC32C,None', MaxRecvDataSegmentLength: '65536', ImmediateData: 'Yes', 'X-com.example.foo': '1' }),
    );
    expect(r2.status).toEqual(LoginStatus.Success);
    expect(r2.nsg).toBe(LoginStage.FullFeature);
    const p2 = replyPairs(r2);
    expect(p2.HeaderDigest).toBe('CRC32C');
    expect(p2.ImmediateData).toBe('Yes');
    expect(p2['X-com.example.foo']).toBe('NotUnderstood');
    expect(p2.MaxRecvDataSegmentLength).toBe(String(DEFAULT_TARGET_POLICY.maxRecvDataSegmentLength));
    expect(p2.TargetPortalGroupTag).toBeUndefined();
    expect(r2.complete?.params.headerDigest).toBe(true);
    expect(r2.complete?.params.initiatorMaxRecvDataSegmentLength).toBe(65536);
    expect(r2.complete?.target?.iqn).toBe(TARGET);
  });

  it('stays in a stage when the initiator does not set T', () => {
    const login = newLogin();
    const r = login.handle(request({ transit: false }), text({ InitiatorName: 'iqn.i', TargetName: TARGET, AuthMethod: 'None' }));
    expect(r.transit).toBe(false);
    expect(r.complete).toBeUndefined();
    expect(r.status).toEqual(LoginStatus.Success);
  });

  it('missing InitiatorName → 02/07', () => {
    expect(newLogin().handle(request({}), text({ TargetName: TARGET })).status).toEqual(LoginStatus.MissingParameter);
  });
  it('normal session without TargetName → 02/07; unknown target → 02/03', () => {
    expect(newLogin().handle(request({}), text({ InitiatorName: 'iqn.i' })).status).toEqual(LoginStatus.MissingParameter);
    const r = newLogin().handle(request({}), text({ InitiatorName: 'iqn.i', TargetName: 'iqn.nope:x' }));
    expect(r.status).toEqual(LoginStatus.NotFound);
    expect(r.failed).toBe(true);
  });
  it('initiator not in the ACL → 02/02; listed initiator admitted', () => {
    const acl = ['iqn.allowed'];
    expect(newLogin(acl).handle(request({}), text({ InitiatorName: 'iqn.other', TargetName: TARGET })).status).toEqual(
      LoginStatus.AuthorizationFailure,
    );
    expect(newLogin(acl).handle(request({}), text({ InitiatorName: 'iqn.allowed', TargetName: TARGET })).status).toEqual(
      LoginStatus.Success,
    );
  });
  it('discovery session needs no TargetName and gets no TPGT', () => {
    const r = newLogin().handle(
      request({ csg: LoginStage.Operational, nsg: LoginStage.FullFeature }),
      text({ InitiatorName: 'iqn.i', SessionType: 'Discovery', MaxBurstLength: '4096' }),
    );
    expect(r.status).toEqual(LoginStatus.Success);
    expect(r.complete?.sessionType).toBe('Discovery');
    const pairs = replyPairs(r);
    expect(pairs.TargetPortalGroupTag).toBeUndefined();
    expect(pairs.MaxBurstLength).toBe('Irrelevant');
  });
  it('unsupported version, bad stage transitions, bad SessionType', () => {
    expect(newLogin().handle(request({ versionMin: 1 }), text({ InitiatorName: 'i' })).status).toEqual(LoginStatus.UnsupportedVersion);
    expect(
      newLogin().handle(request({ csg: LoginStage.Operational, nsg: LoginStage.Security }), text({ InitiatorName: 'i', TargetName: TARGET })).status,
    ).toEqual(LoginStatus.InitiatorError);
    expect(newLogin().handle(request({ nsg: 2 }), text({ InitiatorName: 'i', TargetName: TARGET })).status).toEqual(
      LoginStatus.InitiatorError,
    );
    expect(newLogin().handle(request({}), text({ InitiatorName: 'i', SessionType: 'Weird' })).status).toEqual(
      LoginStatus.SessionTypeNotSupported,
    );
    expect(newLogin().handle(request({}), Buffer.from('garbage-without-equals\0')).status).toEqual(LoginStatus.InitiatorError);
  });
  it('AuthMethod without None → Reject and 02/01', () => {
    const r = newLogin().handle(request({}), text({ InitiatorName: 'i', TargetName: TARGET, AuthMethod: 'CHAP' }));
    expect(r.status).toEqual(LoginStatus.AuthenticationFailure);
    expect(replyPairs(r).AuthMethod).toBe('Reject');
  });
  it('text continued over two PDUs with the C bit', () => {
    const login = newLogin();
    const whole = text({ InitiatorName: 'iqn.i', TargetName: TARGET, AuthMethod: 'None' });
    const r1 = login.handle(request({ transit: false, continue: true }), whole.subarray(0, 10));
    expect(r1.status).toEqual(LoginStatus.Success);
    expect(r1.data.length).toBe(0);
    const r2 = login.handle(request({}), whole.subarray(10));
    expect(r2.status).toEqual(LoginStatus.Success);
    expect(replyPairs(r2).AuthMethod).toBe('None');
  });
  it('FirstBurstLength is Irrelevant with InitialR2T=Yes and ImmediateData=No', () => {
    const r = newLogin().handle(
      request({ csg: LoginStage.Operational, nsg: LoginStage.FullFeature }),
      text({ InitiatorName: 'i', TargetName: TARGET, InitialR2T: 'Yes', ImmediateData: 'No', FirstBurstLength: '4096' }),
    );
    expect(replyPairs(r).FirstBurstLength).toBe('Irrelevant');
  });
});

describe('CHAP (RFC 7143 §12.1.3)', () => {
  const chapTarget = {
    iqn: TARGET,
    chap: { initiator: { username: 'alice', secret: 'alice-secret-12' }, target: { username: 'tgt', secret: 'target-secret-34' } },
  };
  const chapLogin = () => new LoginNegotiation({ findTarget: (iqn) => (iqn === TARGET ? chapTarget : undefined), targetPortalGroupTag: 1 });

  async function exchange(secret: string, mutual: boolean) {
    const { chapResponse, decodeChapBinary } = await import('../../../../src/iscsi/login/chap.js');
    const login = chapLogin();
    const r1 = login.handle(request({}), text({ InitiatorName: 'iqn.i', TargetName: TARGET, AuthMethod: 'CHAP,None' }));
    expect(replyPairs(r1).AuthMethod).toBe('CHAP');
    expect(r1.transit).toBe(false); // held in the security stage until authenticated
    const r2 = login.handle(request({}), text({ CHAP_A: '5' }));
    const p2 = replyPairs(r2);
    expect(p2.CHAP_A).toBe('5');
    expect(r2.transit).toBe(false);
    const id = Number(p2.CHAP_I);
    const challenge = decodeChapBinary(p2.CHAP_C!)!;
    expect(challenge.length).toBeGreaterThanOrEqual(16);
    const answer: Record<string, string> = {
      CHAP_N: 'alice',
      CHAP_R: `0x${chapResponse(5, id, secret, challenge).toString('hex')}`,
    };
    const myChallenge = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    if (mutual) Object.assign(answer, { CHAP_I: '7', CHAP_C: `0x${myChallenge.toString('hex')}` });
    const r3 = login.handle(request({}), text(answer));
    return { r3, expectedMutual: chapResponse(5, 7, 'target-secret-34', myChallenge) };
  }

  it('the right secret passes, and the target answers a mutual challenge correctly', async () => {
    const { r3, expectedMutual } = await exchange('alice-secret-12', true);
    expect(r3.status).toEqual(LoginStatus.Success);
    expect(r3.transit).toBe(true);
    const p = replyPairs(r3);
    expect(p.CHAP_N).toBe('tgt');
    expect(p.CHAP_R).toBe(`0x${expectedMutual.toString('hex')}`);
  });
  it('a wrong secret → 02/01', async () => {
    const { r3 } = await exchange('wrong-secret', false);
    expect(r3.status).toEqual(LoginStatus.AuthenticationFailure);
  });
  it('skipping authentication when the target requires CHAP → 02/01', () => {
    const r = chapLogin().handle(
      request({ csg: LoginStage.Operational, nsg: LoginStage.FullFeature }),
      text({ InitiatorName: 'iqn.i', TargetName: TARGET }),
    );
    expect(r.status).toEqual(LoginStatus.AuthenticationFailure);
    const none = chapLogin().handle(request({}), text({ InitiatorName: 'iqn.i', TargetName: TARGET, AuthMethod: 'None' }));
    expect(none.status).toEqual(LoginStatus.AuthenticationFailure);
  });
});
