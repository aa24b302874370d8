/**
 * Protocol behaviour of the target over a real TCP socket on 127.0.0.1, driven by a hand-written
 * initiator that can send malformed and unusual PDU sequences real clients never produce.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../../../src/log.js';
import { IscsiServer } from '../../../../src/iscsi/server.js';
import {
  decodeDataIn,
  decodeLogoutResponse,
  decodeReadyToTransfer,
  decodeReject,
  decodeScsiResponse,
  decodeTaskManagementResponse,
  encodeDataOut,
  encodeLogoutRequest,
  encodeNopOut,
  encodeSnack,
  encodeTaskManagementRequest,
  encodeTextRequest,
  opcodeOf,
} from '../../../../src/iscsi/pdu/bhs.js';
import { Opcode, RejectReason, RESERVED_TAG, TaskManagementResponseCode } from '../../../../src/iscsi/pdu/opcodes.js';
import { encodeText, parseText } from '../../../../src/iscsi/login/text.js';
import { TaskManagementFunction } from '../../../../src/iscsi/scsi-port.js';
import { MemoryScsiPort } from './memory-scsi-port.js';
import { RawInitiator, read10, TEST_UNIT_READY, write10 } from './raw-initiator.js';

const IQN = 'iqn.2026-12.test:unit';
const INITIATOR = 'iqn.2026-12.test:initiator';

let server: IscsiServer | undefined;
const clients: RawInitiator[] = [];

afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  await server?.stop();
  server = undefined;
});

async function start(
  opts: { nopInIntervalMs?: number; nopInTimeoutMs?: number; portals?: string[]; allowed?: string[]; stopTimeoutMs?: number } = {},
) {
  const port = new MemoryScsiPort();
  port.addLun(0, 1024 * 1024, (b) => {
    for (let i = 0; i < b.length; i++) b[i] = (i * 13) & 0xff;
  });
  server = new IscsiServer({
    portals: opts.portals ?? ['127.0.0.1:0'],
    targets: [{ iqn: IQN, port, ...(opts.allowed ? { allowedInitiators: opts.allowed } : {}) }],
    logger: silentLogger(),
    nopInIntervalMs: opts.nopInIntervalMs ?? 0,
    nopInTimeoutMs: opts.nopInTimeoutMs ?? 0,
    ...(opts.stopTimeoutMs !== undefined ? { stopTimeoutMs: opts.stopTimeoutMs } : {}),
  });
  const bound = await server.start();
  return { port, tcpPort: bound[0]!.port, bound };
}

/** ABORT TASK (RFC 7143 §11.5.1) for the task `referencedTaskTag`, as an immediate request tagged `itt`. */
function sendAbortTask(c: RawInitiator, itt: number, referencedTaskTag: number): void {
  c.send(
    encodeTaskManagementRequest({
      immediate: true,
      function: TaskManagementFunction.AbortTask,
      lun: 0,
      itt,
      referencedTaskTag,
      cmdSN: c.cmdSN,
      expStatSN: c.expStatSN,
      refCmdSN: c.cmdSN - 1,
      expDataSN: 0,
    }),
  );
}

/** Read PDUs until `count` reads have completed (status in their last Data-In); fails after 5 s of silence. */
async function awaitReadStatuses(c: RawInitiator, count: number): Promise<void> {
  for (let statusSeen = 0; statusSeen < count; ) {
    const p = await c.next(5000);
    if (!p) throw new Error(`only ${statusSeen} of ${count} commands answered`);
    if (opcodeOf(p.bhs) === Opcode.DataIn && decodeDataIn(p.bhs).hasStatus) statusSeen++;
  }
}

async function connect(tcpPort: number): Promise<RawInitiator> {
  const c = await RawInitiator.connect(tcpPort);
  clients.push(c);
  return c;
}

async function loggedIn(tcpPort: number, keys: Record<string, string> = {}, isid?: string): Promise<RawInitiator> {
  const c = await connect(tcpPort);
  const r = await c.login({ initiatorName: INITIATOR, target: IQN, keys, ...(isid ? { isid } : {}) });
  expect(r.statusClass).toBe(0);
  return c;
}

describe('malformed and unsupported PDUs → Reject, never a crash', () => {
  it('unknown opcode, SNACK at ERL 0, bad AHS each get the right Reject; the session keeps working', async () => {
    const { tcpPort } = await start();
    const c = await loggedIn(tcpPort);

    const unknown = Buffer.alloc(48);
    unknown[0] = 0x1e;
    unknown[1] = 0x80;
    unknown.writeUInt32BE(77, 16);
    c.send(unknown);
    const r1 = await c.expectPdu(Opcode.Reject);
    expect(decodeReject(r1.bhs).reason).toBe(RejectReason.CommandNotSupported);
    expect(r1.data.equals(unknown)).toBe(true);

    c.send(encodeSnack({ type: 0, lun: 0, itt: 5, ttt: RESERVED_TAG, expStatSN: c.expStatSN, begRun: 0, runLength: 0 }));
    const r2 = await c.expectPdu(Opcode.Reject);
    expect(decodeReject(r2.bhs).reason).toBe(RejectReason.ProtocolError);

    // SCSI Command whose TotalAHSLength holds an AHS claiming more bytes than exist.
    const cmd = Buffer.alloc(48);
    cmd[0] = Opcode.ScsiCommand;
    cmd[1] = 0x80;
    cmd.writeUInt32BE(9, 16);
    cmd.writeUInt32BE(c.cmdSN, 24);
    const badAhs = Buffer.from([0x00, 0x40, 0x01, 0x00, 0, 0, 0, 0]);
    c.send(cmd, undefined, badAhs);
    const r3 = await c.expectPdu(Opcode.Reject);
    expect(decodeReject(r3.bhs).reason).toBe(RejectReason.InvalidPduField);

    // Still alive: a ping with data is echoed.
    c.send(encodeNopOut({ immediate: true, lun: 0, itt: 1234, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN }), Buffer.from('ping!'));
    const nop = await c.expectPdu(Opcode.NopIn);
    expect(nop.bhs.readUInt32BE(16)).toBe(1234);
    expect(nop.data.toString()).toBe('ping!');
  });

  it('a data segment larger than our MaxRecvDataSegmentLength → Reject (protocol error) and the connection closes', async () => {
    const { tcpPort } = await start();
    const c = await loggedIn(tcpPort);
    const big = Buffer.alloc(300_000, 1);
    c.send(encodeNopOut({ immediate: true, lun: 0, itt: 1, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN }), big);
    const r = await c.expectPdu(Opcode.Reject);
    expect(decodeReject(r.bhs).reason).toBe(RejectReason.ProtocolError);
    await c.closed;
    // The server still serves new connections.
    const again = await loggedIn(tcpPort);
    again.scsi(TEST_UNIT_READY);
    expect(decodeScsiResponse((await again.expectPdu(Opcode.ScsiResponse)).bhs).status).toBe(0);
  });

  it('garbage instead of a login: login response "invalid during login", closed, server unaffected', async () => {
    const { tcpPort } = await start();
    const c = await connect(tcpPort);
    const junk = Buffer.alloc(48, 0x3a);
    junk[4] = 0;
    junk[5] = junk[6] = junk[7] = 0;
    c.socket.write(junk);
    const resp = await c.expectPdu(Opcode.LoginResponse);
    expect([resp.bhs[36], resp.bhs[37]]).toEqual([0x02, 0x0b]);
    await c.closed;
    await loggedIn(tcpPort);
  });
});

describe('login over the wire', () => {
  it('refuses unknown targets (02/03), missing names (02/07) and initiators outside the ACL (02/02)', async () => {
    const { tcpPort } = await start({ allowed: [INITIATOR] });
    const a = await connect(tcpPort);
    expect(await a.login({ initiatorName: INITIATOR, target: 'iqn.2026-12.test:nope' })).toMatchObject({ statusClass: 2, statusDetail: 3 });
    const b = await connect(tcpPort);
    expect(await b.login({ target: IQN })).toMatchObject({ statusClass: 2, statusDetail: 7 });
    const d = await connect(tcpPort);
    expect(await d.login({ initiatorName: 'iqn.2026-12.test:stranger', target: IQN })).toMatchObject({ statusClass: 2, statusDetail: 2 });
    await Promise.all([a.closed, b.closed, d.closed]);
  });

  it('assigns distinct non-zero TSIHs and reinstates a session logging in again with the same ISID', async () => {
    const { tcpPort } = await start();
    const a = await connect(tcpPort);
    const ra = await a.login({ initiatorName: INITIATOR, target: IQN });
    const b = await connect(tcpPort);
    const rb = await b.login({ initiatorName: INITIATOR, target: IQN, isid: '400001370001' });
    expect(ra.tsih).not.toBe(0);
    expect(rb.tsih).not.toBe(ra.tsih);
    expect(server!.sessions.length).toBe(2);
    const a2 = await connect(tcpPort);
    await a2.login({ initiatorName: INITIATOR, target: IQN });
    await a.closed; // the old session with the same ISID was closed
    expect(server!.sessions.length).toBe(2);
  });
});

describe('command window (RFC 7143 §3.2.2.1)', () => {
  it('holds a command that arrives ahead of a gap and ignores CmdSNs outside the window', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    const base = c.cmdSN;
    const ittLate = c.scsi(read10(1, 1), { read: 512, cmdSN: base + 1 });
    expect(await c.next(200)).toBeUndefined(); // held: CmdSN base not yet received
    c.scsi(read10(0, 1), { read: 512, cmdSN: base + 500 }); // far outside [ExpCmdSN, MaxCmdSN]
    const ittFirst = c.scsi(read10(0, 1), { read: 512, cmdSN: base });
    const first = await c.expectPdu(Opcode.DataIn);
    const second = await c.expectPdu(Opcode.DataIn);
    expect(decodeDataIn(first.bhs).itt).toBe(ittFirst);
    expect(decodeDataIn(second.bhs).itt).toBe(ittLate);
    expect(decodeDataIn(second.bhs).expCmdSN).toBe(base + 2);
    expect(await c.next(300)).toBeUndefined(); // the out-of-window command never ran
    expect(port.executed.filter((x) => x.cdb[0] === 0x28).length).toBe(2);
  });
});

describe('Data-In and residuals (RFC 7143 §11.7, §11.4.5)', () => {
  it('splits by the initiator MaxRecvDataSegmentLength, F per MaxBurstLength, status in the last PDU, underflow counted', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort, { MaxRecvDataSegmentLength: '512', MaxBurstLength: '1024' });
    c.scsi(read10(8, 8), { read: 8192 });
    const disk = port.luns.get(0)!;
    const received = Buffer.alloc(4096);
    for (let i = 0; i < 8; i++) {
      const p = await c.expectPdu(Opcode.DataIn);
      const f = decodeDataIn(p.bhs);
      expect(f.dataSN).toBe(i);
      expect(f.bufferOffset).toBe(i * 512);
      expect(p.data.length).toBe(512);
      expect(f.final).toBe(i % 2 === 1);
      expect(f.hasStatus).toBe(i === 7);
      p.data.copy(received, f.bufferOffset);
      if (i === 7) {
        expect(f.status).toBe(0);
        expect(f.underflow).toBe(true);
        expect(f.overflow).toBe(false);
        expect(f.residualCount).toBe(4096);
      }
    }
    expect(received.equals(disk.subarray(8 * 512, 16 * 512))).toBe(true);
  });

  it('reports overflow and sends only what the initiator expected', async () => {
    const { tcpPort } = await start();
    const c = await loggedIn(tcpPort);
    c.scsi(read10(0, 8), { read: 2048 });
    const p = await c.expectPdu(Opcode.DataIn);
    const f = decodeDataIn(p.bhs);
    expect(p.data.length).toBe(2048);
    expect(f.hasStatus).toBe(true);
    expect(f.overflow).toBe(true);
    expect(f.residualCount).toBe(2048);
  });

  it('sends a segmented read (slices split across PDUs, copied or not) and releases it once, after the socket wrote it', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort, { MaxRecvDataSegmentLength: '65536', MaxBurstLength: '262144' });
    const disk = port.luns.get(0)!;
    disk.forEach((_, i) => (disk[i] = (i * 7 + (i >> 9)) & 0xff));
    // Small PDUs are copied into the staging slab, big ones go to the socket as slices.
    for (const [segmentBytes, blocks, expectedPdus] of [
      [700, 8, 1],
      [40_000, 512, 4],
    ] as const) {
      port.readSegmentBytes = segmentBytes;
      const before = port.segmentReleases;
      c.scsi(read10(16, blocks), { read: blocks * 512 });
      const received = Buffer.alloc(blocks * 512);
      for (let i = 0; i < expectedPdus; i++) {
        const p = await c.expectPdu(Opcode.DataIn);
        const f = decodeDataIn(p.bhs);
        expect(f.dataSN).toBe(i);
        expect(f.hasStatus).toBe(i === expectedPdus - 1);
        p.data.copy(received, f.bufferOffset);
      }
      expect(received.equals(disk.subarray(16 * 512, (16 + blocks) * 512))).toBe(true);
      expect(port.segmentReleases).toBe(before + 1);
    }
    // An initiator expecting less gets less (overflow) and the read is still released.
    port.readSegmentBytes = 1000;
    const before = port.segmentReleases;
    c.scsi(read10(0, 8), { read: 2048 });
    const p = await c.expectPdu(Opcode.DataIn);
    expect(p.data.equals(disk.subarray(0, 2048))).toBe(true);
    expect(decodeDataIn(p.bhs).overflow).toBe(true);
    expect(port.segmentReleases).toBe(before + 1);
    expect(port.segmentReleases).toBe(port.segmentedReads);
  });

  it('CHECK CONDITION comes in a SCSI Response with SenseLength-prefixed sense data', async () => {
    const { tcpPort } = await start();
    const c = await loggedIn(tcpPort);
    c.scsi(read10(1_000_000, 1), { read: 512 });
    const p = await c.expectPdu(Opcode.ScsiResponse);
    const f = decodeScsiResponse(p.bhs);
    expect(f.status).toBe(0x02);
    expect(p.data.readUInt16BE(0)).toBe(18);
    expect(p.data[2 + 2]! & 0x0f).toBe(0x05);
    expect(p.data[2 + 12]).toBe(0x21);
    expect(f.underflow).toBe(true);
    expect(f.residualCount).toBe(512);
  });
});

describe('writes: immediate data, unsolicited Data-Out, R2T (RFC 7143 §11.8, §13.10-13.17)', () => {
  it('asks for the rest with R2Ts within MaxBurstLength and MaxOutstandingR2T, and the data lands', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort, {
      InitialR2T: 'No',
      ImmediateData: 'Yes',
      FirstBurstLength: '1024',
      MaxBurstLength: '4096',
      MaxOutstandingR2T: '2',
    });
    const total = 16384;
    const payload = Buffer.alloc(total);
    for (let i = 0; i < total; i++) payload[i] = (i * 7 + 1) & 0xff;
    const itt = c.scsi(write10(100, total / 512), { write: total, data: payload.subarray(0, 512), final: false });
    // Unsolicited Data-Out completes the first burst (1024 bytes).
    c.send(encodeDataOut({ final: true, lun: 0, itt, ttt: RESERVED_TAG, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 512 }), payload.subarray(512, 1024));
    const seen: Array<{ offset: number; length: number }> = [];
    let outstanding: Array<{ ttt: number; offset: number; length: number }> = [];
    for (;;) {
      const p = await c.next();
      if (!p) throw new Error('target went silent');
      if (opcodeOf(p.bhs) === Opcode.ScsiResponse) {
        const f = decodeScsiResponse(p.bhs);
        expect(f.status).toBe(0);
        expect(f.residualCount).toBe(0);
        break;
      }
      expect(opcodeOf(p.bhs)).toBe(Opcode.ReadyToTransfer);
      const r = decodeReadyToTransfer(p.bhs);
      expect(r.desiredLength).toBeLessThanOrEqual(4096);
      outstanding.push({ ttt: r.ttt, offset: r.bufferOffset, length: r.desiredLength });
      expect(outstanding.length).toBeLessThanOrEqual(2);
      seen.push({ offset: r.bufferOffset, length: r.desiredLength });
      // Answer the oldest R2T once two are outstanding (or when it is the last one).
      if (outstanding.length === 2 || r.bufferOffset + r.desiredLength === total) {
        const next = outstanding.shift()!;
        for (let off = 0; off < next.length; off += 2048) {
          const n = Math.min(2048, next.length - off);
          c.send(
            encodeDataOut({ final: off + n === next.length, lun: 0, itt, ttt: next.ttt, expStatSN: c.expStatSN, dataSN: off / 2048, bufferOffset: next.offset + off }),
            payload.subarray(next.offset + off, next.offset + off + n),
          );
        }
        if (outstanding.length > 0 && r.bufferOffset + r.desiredLength === total) {
          for (const o of outstanding) {
            c.send(encodeDataOut({ final: true, lun: 0, itt, ttt: o.ttt, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: o.offset }), payload.subarray(o.offset, o.offset + o.length));
          }
          outstanding = [];
        }
      }
    }
    expect(seen).toEqual([
      { offset: 1024, length: 4096 },
      { offset: 5120, length: 4096 },
      { offset: 9216, length: 4096 },
      { offset: 13312, length: 3072 },
    ]);
    expect(port.luns.get(0)!.subarray(100 * 512, 100 * 512 + total).equals(payload)).toBe(true);
  });

  it('a write wholly in immediate data is executed at once', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort, { ImmediateData: 'Yes', InitialR2T: 'Yes' });
    const data = Buffer.alloc(4096, 0x42);
    c.scsi(write10(10, 8), { write: 4096, data });
    const f = decodeScsiResponse((await c.expectPdu(Opcode.ScsiResponse)).bhs);
    expect(f.status).toBe(0);
    expect(port.luns.get(0)!.subarray(5120, 5120 + 4096).equals(data)).toBe(true);
  });
});

describe('task management (RFC 7143 §11.5)', () => {
  it('ABORT TASK on a running task: function complete and its response is never sent', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    port.holdOpcode = 0x28;
    const itt = c.scsi(read10(0, 1), { read: 512 });
    while (port.heldCount === 0) await new Promise((r) => setTimeout(r, 5));
    sendAbortTask(c, 900, itt);
    const tmf = decodeTaskManagementResponse((await c.expectPdu(Opcode.TaskManagementResponse)).bhs);
    expect(tmf.response).toBe(TaskManagementResponseCode.FunctionComplete);
    expect(tmf.itt).toBe(900);
    port.releaseHeld();
    expect(await c.next(300)).toBeUndefined();
    port.holdOpcode = undefined;
    // ABORT TASK for a task that already completed: "task does not exist".
    const done = c.scsi(TEST_UNIT_READY);
    await c.expectPdu(Opcode.ScsiResponse);
    sendAbortTask(c, 901, done);
    expect(decodeTaskManagementResponse((await c.expectPdu(Opcode.TaskManagementResponse)).bhs).response).toBe(
      TaskManagementResponseCode.TaskDoesNotExist,
    );
  });

  it('a segmented read that completes after its task was aborted is released, not sent', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    port.holdOpcode = 0x28;
    port.answerAborted = true;
    port.readSegmentBytes = 512;
    const itt = c.scsi(read10(0, 4), { read: 2048 });
    while (port.heldCount === 0) await new Promise((r) => setTimeout(r, 5));
    sendAbortTask(c, 902, itt);
    expect(decodeTaskManagementResponse((await c.expectPdu(Opcode.TaskManagementResponse)).bhs).response).toBe(
      TaskManagementResponseCode.FunctionComplete,
    );
    port.releaseHeld();
    expect(await c.next(300)).toBeUndefined();
    expect(port.segmentedReads).toBe(1);
    expect(port.segmentReleases).toBe(1);
  });

  it('LU reset calls the SCSI layer; unknown LUN and unsupported functions are answered properly', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    const tmf = async (fn: number, lun: number): Promise<number> => {
      c.send(
        encodeTaskManagementRequest({ immediate: true, function: fn, lun, itt: c.nextItt++, referencedTaskTag: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN, refCmdSN: 0, expDataSN: 0 }),
      );
      return decodeTaskManagementResponse((await c.expectPdu(Opcode.TaskManagementResponse)).bhs).response;
    };
    expect(await tmf(TaskManagementFunction.LogicalUnitReset, 0)).toBe(TaskManagementResponseCode.FunctionComplete);
    expect(port.resets).toEqual([{ kind: 'lun', lun: 0 }]);
    expect(await tmf(TaskManagementFunction.LogicalUnitReset, 7)).toBe(TaskManagementResponseCode.LunDoesNotExist);
    expect(await tmf(TaskManagementFunction.TargetWarmReset, 0)).toBe(TaskManagementResponseCode.FunctionComplete);
    expect(port.resets[1]).toEqual({ kind: 'target', lun: undefined });
    expect(await tmf(TaskManagementFunction.ClearAca, 0)).toBe(TaskManagementResponseCode.FunctionNotSupported);
    expect(await tmf(TaskManagementFunction.TargetColdReset, 0)).toBe(TaskManagementResponseCode.FunctionNotSupported);
  });
});

describe('NOP-In pings (RFC 7143 §11.19)', () => {
  it('drops a connection whose pings go unanswered and keeps one that answers', async () => {
    const { tcpPort } = await start({ nopInIntervalMs: 100, nopInTimeoutMs: 300 });
    const silent = await loggedIn(tcpPort);
    const polite = await loggedIn(tcpPort, {}, '400001370002');
    polite.answerPings = true;
    const ping = await silent.expectPdu(Opcode.NopIn, 1000);
    expect(ping.bhs.readUInt32BE(16)).toBe(RESERVED_TAG);
    expect(ping.bhs.readUInt32BE(20)).not.toBe(RESERVED_TAG);
    const t0 = Date.now();
    await silent.closed;
    expect(Date.now() - t0).toBeLessThan(2000);
    await new Promise((r) => setTimeout(r, 600));
    expect(polite.isClosed).toBe(false);
  });
});

describe('SendTargets and logout', () => {
  it('discovery lists every portal with the TPGT; the ACL hides the target from others', async () => {
    const { bound } = await start({ portals: ['127.0.0.1:0', '127.0.0.1:0'], allowed: [INITIATOR] });
    const c = await connect(bound[0]!.port);
    expect((await c.login({ initiatorName: INITIATOR, discovery: true })).statusClass).toBe(0);
    c.send(encodeTextRequest({ immediate: true, final: true, continue: false, lun: 0, itt: 50, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN }), encodeText([{ key: 'SendTargets', value: 'All' }]));
    const resp = await c.expectPdu(Opcode.TextResponse);
    const parsed = parseText(resp.data, true);
    expect(parsed.ok && parsed.pairs).toEqual([
      { key: 'TargetName', value: IQN },
      { key: 'TargetAddress', value: `127.0.0.1:${bound[0]!.port},1` },
      { key: 'TargetAddress', value: `127.0.0.1:${bound[1]!.port},1` },
    ]);
    const other = await connect(bound[1]!.port);
    await other.login({ initiatorName: 'iqn.2026-12.test:other', discovery: true });
    other.send(encodeTextRequest({ immediate: true, final: true, continue: false, lun: 0, itt: 51, ttt: RESERVED_TAG, cmdSN: other.cmdSN, expStatSN: other.expStatSN }), encodeText([{ key: 'SendTargets', value: 'All' }]));
    expect((await other.expectPdu(Opcode.TextResponse)).data.length).toBe(0);
    // SCSI commands are not allowed in a discovery session.
    c.scsi(TEST_UNIT_READY);
    expect(decodeReject((await c.expectPdu(Opcode.Reject)).bhs).reason).toBe(RejectReason.ProtocolError);
  });

  it('logout answers, closes the connection and tells the SCSI layer the nexus is gone', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    expect(port.nexuses.size).toBe(1);
    c.send(encodeLogoutRequest({ immediate: true, reason: 0, itt: 77, cid: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
    const r = decodeLogoutResponse((await c.expectPdu(Opcode.LogoutResponse)).bhs);
    expect(r.response).toBe(0);
    expect(r.itt).toBe(77);
    await c.closed;
    await new Promise((res) => setTimeout(res, 20));
    expect(port.nexuses.size).toBe(0);
    expect(server!.sessions.length).toBe(0);
  });
});

describe('digests on the wire', () => {
  it('negotiated header and data digests protect every PDU after login', async () => {
    const { tcpPort, port } = await start();
    // 64 KiB PDUs: Data-In payloads above the writer's copy limit go out as slices, digested as such.
    const c = await loggedIn(tcpPort, { HeaderDigest: 'CRC32C', DataDigest: 'CRC32C', MaxRecvDataSegmentLength: '65536' });
    expect(c.writer.headerDigest && c.writer.dataDigest).toBe(true);
    const data = Buffer.alloc(1536, 0x77);
    c.scsi(write10(3, 3), { write: 1536, data });
    expect(decodeScsiResponse((await c.expectPdu(Opcode.ScsiResponse)).bhs).status).toBe(0);
    c.scsi(read10(3, 3), { read: 1536 });
    const din = await c.expectPdu(Opcode.DataIn);
    expect(din.data.equals(data)).toBe(true);
    expect(port.luns.get(0)!.subarray(1536, 3072).equals(data)).toBe(true);
    // Segmented Data-In (slices crossing PDU boundaries, copied and uncopied): the digest covers every slice.
    port.readSegmentBytes = 7000;
    const disk = port.luns.get(0)!;
    c.scsi(read10(0, 512), { read: 256 * 1024 });
    const got = Buffer.alloc(256 * 1024);
    for (let seen = 0; seen < got.length; ) {
      const p = await c.expectPdu(Opcode.DataIn);
      p.data.copy(got, decodeDataIn(p.bhs).bufferOffset);
      seen += p.data.length;
    }
    expect(got.equals(disk.subarray(0, 256 * 1024))).toBe(true);
    port.readSegmentBytes = undefined;
    expect(c.framingErrors).toEqual([]);
    // A corrupted data digest is rejected with reason 0x02 and the PDU discarded.
    const nop = encodeNopOut({ immediate: true, lun: 0, itt: 99, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN });
    c.writer.dataDigest = false; // send a wrong digest by hand
    c.send(nop, Buffer.concat([Buffer.from('abcd'), Buffer.from([1, 2, 3, 4])]).subarray(0, 4));
    c.writer.flushNow(); // the writer stages until the end of the turn; the bad digest must follow the PDU
    c.socket.write(Buffer.from([0xde, 0xad, 0xbe, 0xef]));
    c.writer.dataDigest = true;
    expect(decodeReject((await c.expectPdu(Opcode.Reject)).bhs).reason).toBe(RejectReason.DataDigestError);
  });
});

describe('server stop', () => {
  it('lets a running command finish and answers it, starts nothing new, then closes', async () => {
    const { tcpPort, port } = await start({ stopTimeoutMs: 5000 });
    const c = await loggedIn(tcpPort);
    port.holdOpcode = 0x28;
    const itt = c.scsi(read10(0, 1), { read: 512 });
    while (port.heldCount === 0) await new Promise((r) => setTimeout(r, 5));
    const stopping = server!.stop();
    c.scsi(TEST_UNIT_READY); // arrives after stop began: must not run
    setTimeout(() => port.releaseHeld(), 100);
    const din = await c.expectPdu(Opcode.DataIn);
    expect(decodeDataIn(din.bhs).itt).toBe(itt);
    await stopping;
    await c.closed;
    expect(port.executed.map((x) => x.cdb[0])).toEqual([0x28]);
    server = undefined;
  });

  it('gives up on a command that never finishes after the bounded wait', async () => {
    const { tcpPort, port } = await start({ stopTimeoutMs: 300 });
    const c = await loggedIn(tcpPort);
    port.holdOpcode = 0x28;
    c.scsi(read10(0, 1), { read: 512 });
    while (port.heldCount === 0) await new Promise((r) => setTimeout(r, 5));
    const t0 = Date.now();
    await server!.stop();
    expect(Date.now() - t0).toBeLessThan(3000);
    await c.closed;
    server = undefined;
  });
});

describe('flow control', () => {
  it('keeps segmented reads unreleased while their data waits in the socket, releases each once it is written', async () => {
    const { tcpPort, port } = await start();
    // PDUs above the writer's copy limit: the slices themselves are queued on the socket.
    const c = await loggedIn(tcpPort, { MaxRecvDataSegmentLength: '262144', MaxBurstLength: '1048576' });
    port.readSegmentBytes = 100_000; // every PDU spans several slices
    c.socket.pause();
    const count = 40;
    for (let i = 0; i < count; i++) c.scsi(read10(0, 2048), { read: 1024 * 1024 });
    await new Promise((r) => setTimeout(r, 300));
    expect(port.segmentedReads).toBeGreaterThan(0);
    expect(port.segmentReleases).toBeLessThan(port.segmentedReads);
    c.socket.resume();
    await awaitReadStatuses(c, count);
    expect(port.segmentedReads).toBe(count);
    expect(port.segmentReleases).toBe(count);
  }, 30_000);

  it('stops reading new commands while the initiator does not read responses, and catches up after', async () => {
    const { tcpPort, port } = await start();
    const c = await loggedIn(tcpPort);
    c.socket.pause(); // the initiator stops reading: responses pile up in socket buffers
    const count = 100;
    for (let i = 0; i < count; i++) {
      c.scsi(read10(0, 2048), { read: 1024 * 1024 }); // 1 MiB each
      await new Promise((r) => setTimeout(r, 3));
    }
    await new Promise((r) => setTimeout(r, 300));
    const executedWhilePaused = port.executed.length;
    expect(executedWhilePaused).toBeLessThan(count);
    c.socket.resume();
    await awaitReadStatuses(c, count);
    expect(port.executed.length).toBe(count);
  }, 30_000);
});
