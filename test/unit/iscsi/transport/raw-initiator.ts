/**
 * A minimal hand-driven iSCSI initiator for protocol tests: sends exactly the PDUs a test builds
 * (including malformed ones) and exposes every PDU the target sends back.
 */
import net from 'node:net';
import {
  encodeLoginRequest,
  encodeNopOut,
  encodeScsiCommand,
  LoginStage,
  decodeLoginResponse,
  opcodeOf,
  type Pdu,
} from '../../../../src/iscsi/pdu/bhs.js';
import { Opcode, RESERVED_TAG } from '../../../../src/iscsi/pdu/opcodes.js';
import { PduReader } from '../../../../src/iscsi/pdu/reader.js';
import { PduWriter } from '../../../../src/iscsi/pdu/writer.js';
import { encodeText, parseText } from '../../../../src/iscsi/login/text.js';

export class RawInitiator {
  private readonly queue: Pdu[] = [];
  private waiter: ((p: Pdu | undefined) => void) | undefined;
  readonly reader: PduReader;
  readonly writer: PduWriter;
  readonly closed: Promise<void>;
  isClosed = false;
  cmdSN = 1;
  expStatSN = 0;
  nextItt = 1;
  /** Answer target NOP-In pings automatically. */
  answerPings = false;
  readonly framingErrors: string[] = [];

  private constructor(readonly socket: net.Socket) {
    this.writer = new PduWriter(socket);
    this.reader = new PduReader(
      {
        onPdu: (p) => this.onPdu(p),
        onDataDigestError: () => this.framingErrors.push('data-digest'),
        onFramingError: (e) => this.framingErrors.push(e.kind),
      },
      { headerDigest: false, dataDigest: false, maxDataSegmentLength: 16 * 1024 * 1024 },
    );
    socket.on('data', (c: Buffer) => this.reader.push(c));
    socket.on('error', () => undefined);
    this.closed = new Promise((resolve) =>
      socket.on('close', () => {
        this.isClosed = true;
        this.waiter?.(undefined);
        resolve();
      }),
    );
  }

  static connect(port: number): Promise<RawInitiator> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1', () => resolve(new RawInitiator(s)));
      s.once('error', reject);
    });
  }

  private onPdu(p: Pdu): void {
    const copy: Pdu = { bhs: Buffer.from(p.bhs), ahs: Buffer.from(p.ahs), data: Buffer.from(p.data) };
    if (this.answerPings && opcodeOf(copy.bhs) === Opcode.NopIn && copy.bhs.readUInt32BE(16) === RESERVED_TAG) {
      this.send(
        encodeNopOut({ immediate: true, lun: 0, itt: RESERVED_TAG, ttt: copy.bhs.readUInt32BE(20), cmdSN: this.cmdSN, expStatSN: this.expStatSN }),
      );
      return;
    }
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w(copy);
    } else this.queue.push(copy);
  }

  send(bhs: Buffer, data?: Buffer, ahs?: Buffer): void {
    this.writer.send(bhs, data, ahs);
  }

  /** Next PDU from the target, or undefined if the connection closed or nothing came in time. */
  next(timeoutMs = 2000): Promise<Pdu | undefined> {
    const queued = this.queue.shift();
    if (queued) return Promise.resolve(queued);
    if (this.isClosed) return Promise.resolve(undefined);
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        resolve(undefined);
      }, timeoutMs);
      this.waiter = (p) => {
        clearTimeout(timer);
        resolve(p);
      };
    });
  }

  async expectPdu(opcode: number, timeoutMs = 2000): Promise<Pdu> {
    const p = await this.next(timeoutMs);
    if (!p) throw new Error(`expected opcode 0x${opcode.toString(16)}, got nothing`);
    if (opcodeOf(p.bhs) !== opcode) throw new Error(`expected opcode 0x${opcode.toString(16)}, got 0x${opcodeOf(p.bhs).toString(16)}`);
    if ([Opcode.ScsiResponse, Opcode.NopIn, Opcode.TaskManagementResponse, Opcode.TextResponse, Opcode.LogoutResponse, Opcode.Reject].includes(opcode)) {
      this.expStatSN = (p.bhs.readUInt32BE(24) + 1) >>> 0;
    }
    return p;
  }

  /** One-PDU login straight from operational stage to full feature phase. */
  async login(opts: {
    initiatorName?: string;
    target?: string;
    discovery?: boolean;
    keys?: Record<string, string>;
    isid?: string;
  }): Promise<{ statusClass: number; statusDetail: number; keys: Record<string, string>; tsih: number }> {
    const pairs: Record<string, string> = {};
    if (opts.initiatorName !== undefined) pairs.InitiatorName = opts.initiatorName;
    pairs.SessionType = opts.discovery ? 'Discovery' : 'Normal';
    if (opts.target) pairs.TargetName = opts.target;
    Object.assign(pairs, opts.keys ?? {});
    const bhs = encodeLoginRequest({
      transit: true,
      continue: false,
      csg: LoginStage.Operational,
      nsg: LoginStage.FullFeature,
      versionMax: 0,
      versionMin: 0,
      isid: opts.isid ?? '400001370000',
      tsih: 0,
      itt: this.nextItt++,
      cid: 0,
      cmdSN: this.cmdSN,
      expStatSN: 0,
    });
    this.send(bhs, encodeText(Object.entries(pairs).map(([key, value]) => ({ key, value }))));
    const resp = await this.expectPdu(Opcode.LoginResponse);
    const f = decodeLoginResponse(resp.bhs);
    this.expStatSN = (f.statSN + 1) >>> 0;
    const parsed = parseText(resp.data);
    const keys = parsed.ok ? Object.fromEntries(parsed.pairs.map((p) => [p.key, p.value])) : {};
    if (f.statusClass === 0 && f.transit && f.nsg === LoginStage.FullFeature) this.enableDigests(keys);
    return { statusClass: f.statusClass, statusDetail: f.statusDetail, keys, tsih: f.tsih };
  }

  /** Switch to the digests the target's final Login Response agreed to (`keys`: its text). */
  enableDigests(keys: Record<string, string>): void {
    const header = keys.HeaderDigest === 'CRC32C';
    const data = keys.DataDigest === 'CRC32C';
    this.writer.headerDigest = header;
    this.writer.dataDigest = data;
    this.reader.limits.headerDigest = header;
    this.reader.limits.dataDigest = data;
  }

  /** Send a SCSI command (non-immediate, next CmdSN unless given). Returns its ITT. */
  scsi(cdb: Buffer, opts: { lun?: number; read?: number; write?: number; data?: Buffer; final?: boolean; cmdSN?: number; itt?: number } = {}): number {
    const itt = opts.itt ?? this.nextItt++;
    const cmdSN = opts.cmdSN ?? this.cmdSN++;
    const write = opts.write !== undefined;
    const cmd = encodeScsiCommand({
      immediate: false,
      final: opts.final ?? true,
      read: opts.read !== undefined,
      write,
      taskAttribute: 1,
      lun: opts.lun ?? 0,
      itt,
      expectedDataLength: opts.read ?? opts.write ?? 0,
      cmdSN,
      expStatSN: this.expStatSN,
      cdb,
    });
    this.send(cmd.bhs, opts.data, cmd.ahs);
    return itt;
  }

  close(): void {
    this.socket.destroy();
  }
}

export function read10(lba: number, blocks: number): Buffer {
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x28;
  cdb.writeUInt32BE(lba, 2);
  cdb.writeUInt16BE(blocks, 7);
  return cdb;
}

export function write10(lba: number, blocks: number): Buffer {
  const cdb = Buffer.alloc(10);
  cdb[0] = 0x2a;
  cdb.writeUInt32BE(lba, 2);
  cdb.writeUInt16BE(blocks, 7);
  return cdb;
}

export const TEST_UNIT_READY = Buffer.alloc(6);
