/**
 * Seeded, deterministic randomized robustness test ("fuzz") of the iSCSI target, in-process over
 * real TCP on 127.0.0.1, driven by the raw initiator of raw-initiator.ts.
 *
 * Project rule under test: a malformed PDU gets a Reject or a CHECK CONDITION with the right sense,
 * never a crash; and nothing a refused command carried reaches the disk.
 *
 * The seed is printed; BOOTRESTORE_FUZZ_SEED=<n> (decimal or 0x-hex) replays a run. Failures name
 * the seed, the connection and the step, and list the last PDUs exchanged.
 *
 * The target runs in this process: an uncaught exception / unhandled rejection listener, and a
 * logger that records error-level lines (the target logs "error handling PDU", "command failed
 * unexpectedly", … when it catches one of its own exceptions), catch crashes the target would hide.
 *
 * Every PDU the target sends is parsed and checked (target opcode, no AHS, data segment within what
 * we declared, StatSN / ExpCmdSN / MaxCmdSN sequencing, per-opcode fields). Every command or request
 * must end in its answer, a Reject, or the connection closing, within HANG_MS, except when silence
 * is what RFC 7143 prescribes:
 *   - a non-immediate PDU whose CmdSN is outside [ExpCmdSN, MaxCmdSN], or a duplicate, is silently
 *     ignored (§3.2.2.1 / §4.2.2.1);
 *   - a non-immediate PDU ahead of ExpCmdSN inside the window waits until the gap is filled
 *     (§3.2.2.1: commands are delivered in CmdSN order); once delivered it must be answered;
 *   - a NOP-Out with ITT 0xffffffff gets no NOP-In (§11.18);
 *   - Data-Out for a task the target does not know (never accepted, or aborted) is discarded;
 *   - a write whose Data-Out this test chose to withhold waits for it (the initiator owes data);
 *   - a task ended by ABORT TASK / ABORT TASK SET / CLEAR TASK SET / LU or target reset gets no
 *     response of its own (the TMF response answers for it, SAM-5 task management);
 *   - a PDU cut short (DataSegmentLength larger than what was sent) waits for the rest of its bytes.
 * A rejected command PDU is discarded and its CmdSN is not taken as received (RFC 7143 §7.3, "Usage
 * of Reject PDU in Recovery"); a command answered with status always consumes its CmdSN.
 * Hangs are detected by deadlines on awaited answers, never by sleeping.
 *
 * After every fuzzed connection a well-behaved connection logs in, reads the capacity, writes and
 * reads back; LUN 0's bytes must equal a shadow copy built only from acknowledged (GOOD) commands
 * (checked in-process after every step too), and read-only LUN 1 must never change.
 *
 * The last describe block holds minimal deterministic reproductions of the defects the fuzz found.
 */
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { IscsiServer } from '../../../../src/iscsi/server.js';
import { ScsiTarget } from '../../../../src/iscsi/scsi/target.js';
import { COMMANDS } from '../../../../src/iscsi/scsi/commands.js';
import { CommandFlag, DataDirection, checkCdbMask } from '../../../../src/iscsi/scsi/command-table.js';
import { parseSense, senseCodeOf, type DecodedSense, type SenseReason } from '../../../../src/iscsi/scsi/sense.js';
import {
  decodeDataIn,
  decodeLoginResponse,
  decodeLun,
  decodeReadyToTransfer,
  decodeReject,
  decodeScsiResponse,
  decodeSequence,
  decodeTaskManagementRequest,
  decodeTextResponse,
  encodeDataOut,
  encodeLoginRequest,
  encodeLogoutRequest,
  encodeNopOut,
  encodeScsiCommand,
  encodeSnack,
  encodeTaskManagementRequest,
  encodeTextRequest,
  padLength,
  type LoginRequestFields,
  type Pdu,
} from '../../../../src/iscsi/pdu/bhs.js';
import { BHS_LENGTH, Opcode, RejectReason, RESERVED_TAG } from '../../../../src/iscsi/pdu/opcodes.js';
import { crc32c, writeDigest } from '../../../../src/iscsi/pdu/crc32c.js';
import { encodeText, parseText } from '../../../../src/iscsi/login/text.js';
import { serialDiff } from '../../../../src/iscsi/session/command-window.js';
import { MemoryDevice } from '../../../helpers/memory-device.js';
import { pseudoRandomBytes } from '../../../helpers/prng.js';
import { RawInitiator, read10, write10 } from './raw-initiator.js';
import { advancesStatSN, Rng, seedFromEnv, watchProcessFaults } from './fuzz-kit.js';

// ---------------------------------------------------------------------------------------------
// Knobs. Tuned for < ~25 s on a 2-vCPU machine (see the report printed at the end of each test).

const DEFAULT_SEED = 0x1c5b_2026;
const LOGIN_CONNECTIONS = 600;
const FFP_CONNECTIONS = 300;
const FFP_STEPS_PER_CONNECTION = 40;
/** Deadline for any answer the target owes (it runs in-process: answers take milliseconds). */
const HANG_MS = 2000;
/** Largest Data-Out the fuzzer sends for one command; bigger writes are left waiting for data. */
const DATA_CAP = 192 * 1024;

const IQN = 'iqn.2026-12.test:fuzz';
const INITIATOR = 'iqn.2026-12.test:fuzzer';
/** One I_T nexus for every fuzzed and every well-behaved session (reservations never get in the way). */
const ISID = '400001370000';
const BLOCK = 512;
const RW_BLOCKS = 256;
const RO_BLOCKS = 64;
/** What this target declares it receives (login.ts / keys.ts DEFAULT_TARGET_POLICY). */
const LOGIN_MAX_DATA_SEGMENT = 8192;

const SEED = seedFromEnv(DEFAULT_SEED);

// ---------------------------------------------------------------------------------------------
// Process-level crash detection.

const processFaults = watchProcessFaults('fuzz', SEED);

// ---------------------------------------------------------------------------------------------
// The target under test: ScsiTarget (the real SCSI layer) with LUN 0 writable (UNMAP capable) and
// LUN 1 read-only, both MemoryDevices; a logger that keeps error-level lines.

interface Fixture {
  readonly server: IscsiServer;
  readonly port: number;
  readonly target: ScsiTarget;
  readonly rw: MemoryDevice;
  readonly ro: MemoryDevice;
  /** LUN 0 as acknowledged commands left it. */
  readonly shadow: Buffer;
  readonly roImage: Buffer;
  readonly errorLogs: string[];
  readonly stats: Map<string, number>;
}

async function startFixture(seed: number): Promise<Fixture> {
  const errorLogs: string[] = [];
  const logger = pino({ level: 'error' }, { write: (line: string) => void errorLogs.push(line) });
  const target = new ScsiTarget({ logger });
  const rw = new MemoryDevice({ blockCount: RW_BLOCKS, supportsUnmap: true });
  const ro = new MemoryDevice({ blockCount: RO_BLOCKS, readOnly: true });
  pseudoRandomBytes(rw.data.length, seed ^ 0x5a5a).copy(rw.data);
  pseudoRandomBytes(ro.data.length, seed ^ 0xa5a5).copy(ro.data);
  target.addLun(0, rw);
  target.addLun(1, ro);
  const server = new IscsiServer({
    portals: ['127.0.0.1:0'],
    targets: [{ iqn: IQN, port: target }],
    logger,
    nopInIntervalMs: 0,
    nopInTimeoutMs: 0,
    stopTimeoutMs: 1000,
  });
  const bound = await server.start();
  return {
    server,
    port: bound[0]!.port,
    target,
    rw,
    ro,
    shadow: Buffer.from(rw.data),
    roImage: Buffer.from(ro.data),
    errorLogs,
    stats: new Map(),
  };
}

function count(fx: Fixture, what: string, n = 1): void {
  fx.stats.set(what, (fx.stats.get(what) ?? 0) + n);
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
// Reference data for the checks.

const TARGET_OPCODES = new Set<number>([
  Opcode.NopIn,
  Opcode.ScsiResponse,
  Opcode.TaskManagementResponse,
  Opcode.LoginResponse,
  Opcode.TextResponse,
  Opcode.DataIn,
  Opcode.LogoutResponse,
  Opcode.ReadyToTransfer,
  Opcode.AsyncMessage,
  Opcode.Reject,
]);

const REJECT_REASONS = new Set<number>([0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0c]);

const senseKey = (key: number, asc: number, ascq: number): string =>
  `${key.toString(16).padStart(2, '0')}/${asc.toString(16).padStart(2, '0')}/${ascq.toString(16).padStart(2, '0')}`;

/** Every (key, ASC, ASCQ) the SCSI layer can report (sense.ts), plus the transport's DATA PHASE ERROR. */
const KNOWN_SENSE = ((): Set<string> => {
  const known = new Set<string>();
  for (let reason = 0; reason < 256; reason++) {
    let code;
    try {
      code = senseCodeOf(reason as SenseReason);
    } catch {
      break;
    }
    if (code.status === 0x02) known.add(senseKey(code.key, code.asc, code.ascq));
  }
  known.add(senseKey(0x0b, 0x4b, 0x00));
  return known;
})();
/** HARDWARE ERROR / INTERNAL TARGET FAILURE: what the target reports when one of its handlers threw. */
const INTERNAL_TARGET_FAILURE = senseKey(0x04, 0x44, 0x00);

const TABLE_OPCODES = [...new Set(COMMANDS.all.map((s) => s.opcode))];
const SERVICE_ACTIONS = new Map<number, number[]>();
for (const s of COMMANDS.all) {
  if (s.serviceAction !== undefined) SERVICE_ACTIONS.set(s.opcode, [...(SERVICE_ACTIONS.get(s.opcode) ?? []), s.serviceAction]);
}
const INTERESTING_OPCODES = [0x00, 0x03, 0x12, 0x25, 0x28, 0x2a, 0x88, 0x8a, 0x9e, 0xa0, 0x41, 0x93, 0x42, 0x89, 0x8b, 0x83, 0x5f, 0x15, 0x55, 0x7f, 0xff, 0xc0];

const READ_OPS = new Set([0x08, 0x28, 0xa8, 0x88]);
const WRITE_OPS = new Set([0x0a, 0x2a, 0x2e, 0xaa, 0xae, 0x8a, 0x8e]);

/** Where the READ/WRITE-family CDBs keep their LBA and block count (SBC-3 4.2.1: 6, 10, 12, 16 bytes). */
type LbaLayout = 'cdb6' | 'cdb10' | 'cdb12' | 'cdb16';
const LBA_LAYOUTS = new Map<number, LbaLayout>([
  ...[0x08, 0x0a].map((op) => [op, 'cdb6'] as const),
  ...[0x28, 0x2a, 0x2e, 0x2f, 0x34, 0x35, 0x41].map((op) => [op, 'cdb10'] as const),
  ...[0xa8, 0xaa, 0xae, 0xaf].map((op) => [op, 'cdb12'] as const),
  ...[0x88, 0x8a, 0x8b, 0x8e, 0x8f, 0x90, 0x91, 0x93].map((op) => [op, 'cdb16'] as const),
]);

/** LBA and block count of the READ/WRITE-family CDB layouts. */
function lbaAndBlocks(cdb: Buffer): { lba: number; blocks: number } | undefined {
  switch (LBA_LAYOUTS.get(cdb[0]!)) {
    case 'cdb6':
      return { lba: ((cdb[1]! & 0x1f) << 16) | cdb.readUInt16BE(2), blocks: cdb[4]! || 256 };
    case 'cdb10':
      return { lba: cdb.readUInt32BE(2), blocks: cdb.readUInt16BE(7) };
    case 'cdb12':
      return { lba: cdb.readUInt32BE(2), blocks: cdb.readUInt32BE(6) };
    case 'cdb16':
      return { lba: cdb.readUInt32BE(2) * 2 ** 32 + cdb.readUInt32BE(6), blocks: cdb.readUInt32BE(10) };
    default:
      return undefined;
  }
}

/**
 * What a GOOD (or CONDITION MET) command did to LUN 0, applied to `shadow`. `dataOut` is the
 * Data-Out the target received (the W bit and EDTL bytes). Returns 'unknown' for EXTENDED COPY,
 * whose effect depends on the whole target (the caller then takes the device's bytes).
 */
function applyGood(shadow: Buffer, cdb: Buffer, dataOut: Buffer | undefined): 'none' | 'applied' | 'unknown' {
  const op = cdb[0]!;
  const fit = (lba: number, blocks: number): boolean => lba + blocks <= RW_BLOCKS;
  if (WRITE_OPS.has(op)) {
    const { lba, blocks } = lbaAndBlocks(cdb)!;
    const arrived = dataOut === undefined ? 0 : Math.min(blocks, Math.floor(dataOut.length / BLOCK));
    if (arrived === 0 || !fit(lba, arrived)) return 'none';
    dataOut!.copy(shadow, lba * BLOCK, 0, arrived * BLOCK);
    return 'applied';
  }
  if (op === 0x41 || op === 0x93) {
    const { lba, blocks: requested } = lbaAndBlocks(cdb)!;
    const blocks = requested === 0 ? RW_BLOCKS - lba : requested;
    if (blocks <= 0 || !fit(lba, blocks)) return 'none';
    const unmap = (cdb[1]! & 0x08) !== 0;
    const ndob = op === 0x93 && (cdb[1]! & 0x01) !== 0;
    const block = unmap || ndob ? Buffer.alloc(BLOCK) : dataOut!.subarray(0, BLOCK);
    for (let b = lba; b < lba + blocks; b++) block.copy(shadow, b * BLOCK);
    return 'applied';
  }
  if (op === 0x8b) {
    const { lba, blocks } = lbaAndBlocks(cdb)!;
    const arrived = dataOut === undefined ? 0 : Math.min(blocks, Math.floor(dataOut.length / BLOCK));
    for (let i = 0; i < arrived * BLOCK; i++) shadow[lba * BLOCK + i] = shadow[lba * BLOCK + i]! | dataOut![i]!;
    return arrived > 0 ? 'applied' : 'none';
  }
  if (op === 0x89) {
    const lba = cdb.readUInt32BE(2) * 2 ** 32 + cdb.readUInt32BE(6);
    const blocks = cdb[13]!;
    if (blocks === 0) return 'none';
    dataOut!.copy(shadow, lba * BLOCK, blocks * BLOCK, 2 * blocks * BLOCK);
    return 'applied';
  }
  if (op === 0x42) {
    const pll = cdb.readUInt16BE(7);
    if (pll < 8 || dataOut === undefined) return 'none';
    const params = dataOut.subarray(0, pll);
    const n = Math.floor(Math.min(params.readUInt16BE(2), pll - 8) / 16);
    for (let i = 0; i < n; i++) {
      const at = 8 + 16 * i;
      const lba = params.readUInt32BE(at) * 2 ** 32 + params.readUInt32BE(at + 4);
      const blocks = params.readUInt32BE(at + 8);
      shadow.fill(0, lba * BLOCK, (lba + blocks) * BLOCK);
    }
    return n > 0 ? 'applied' : 'none';
  }
  // EXTENDED COPY: unknown only when the list can hold a CSCD (32 bytes) and a block→block segment (28).
  if (op === 0x83 && (cdb[1]! & 0x1f) === 0 && dataOut !== undefined && cdb.readUInt32BE(10) >= 16 + 32 + 28) return 'unknown';
  return 'none';
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/**
 * Parse an AHS the way RFC 7143 §11.2.2 defines it: AHSLength (excluding the length and type
 * bytes), AHSType 1 = Extended CDB (AHSLength = CDB length - 15), 2 = Bidirectional Read Data Length
 * (AHSLength 5); each padded to 4 bytes; together exactly TotalAHSLength. undefined: malformed.
 */
function parseAhs(bhs: Buffer, ahs: Buffer): { cdb: Buffer; bidi: number | undefined } | undefined {
  let cdb = Buffer.from(bhs.subarray(32, 48));
  let bidi: number | undefined;
  let off = 0;
  while (off < ahs.length) {
    if (off + 4 > ahs.length) return undefined;
    const len = ahs.readUInt16BE(off);
    const type = ahs[off + 2]!;
    const end = off + 3 + len;
    if (len === 0 || end > ahs.length) return undefined;
    if (type === 1) cdb = Buffer.concat([bhs.subarray(32, 48), ahs.subarray(off + 4, end)]);
    else if (type === 2 && len === 5) bidi = ahs.readUInt32BE(off + 4);
    else return undefined;
    off = end + padLength(3 + len);
  }
  return { cdb, bidi };
}

function frame(bhs: Buffer, ahs: Buffer, data: Buffer): Buffer {
  return Buffer.concat([bhs, ahs, data, Buffer.alloc(padLength(data.length))]);
}

function describePdu(p: Pdu): string {
  const op = p.bhs[0]! & 0x3f;
  const itt = p.bhs.readUInt32BE(16).toString(16);
  const extra =
    op === Opcode.Reject
      ? ` reason=0x${p.bhs[2]!.toString(16)} of op 0x${(p.data[0]! & 0x3f).toString(16)} itt=${p.data.length >= 20 ? p.data.readUInt32BE(16).toString(16) : '?'}`
      : op === Opcode.ScsiResponse
        ? ` status=0x${p.bhs[3]!.toString(16)} resp=${p.bhs[2]}`
        : op === Opcode.DataIn
          ? ` S=${p.bhs[1]! & 1} off=${p.bhs.readUInt32BE(40)}`
          : op === Opcode.TaskManagementResponse || op === Opcode.LogoutResponse
            ? ` response=${p.bhs[2]}`
            : op === Opcode.LoginResponse
              ? ` status=${p.bhs[36]}/${p.bhs[37]}`
              : '';
  return `<- op=0x${op.toString(16)} itt=${itt} statSN=${p.bhs.readUInt32BE(24)} dsl=${p.data.length}${extra}`;
}

/** Where a failure happened, with the last events, for the failure message. */
class Trace {
  readonly lines: string[] = [];
  constructor(readonly where: string) {}
  add(line: string): void {
    this.lines.push(line);
    if (this.lines.length > 40) this.lines.shift();
  }
  fail(message: string): never {
    throw new Error(`seed=${SEED} ${this.where}: ${message}\n  recent:\n    ${this.lines.join('\n    ')}`);
  }
}

async function waitClosed(c: RawInitiator, trace: Trace, why: string): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), HANG_MS)));
  const closed = await Promise.race([c.closed.then(() => false), timedOut]);
  clearTimeout(timer);
  if (closed) trace.fail(`the target did not close the connection (${why}) within ${HANG_MS} ms`);
}

/** End our side and wait for the target to close its side, checking whatever still arrives. */
async function endAndWait(c: RawInitiator, trace: Trace, onPdu: (p: Pdu) => void): Promise<void> {
  c.writer.flushNow();
  c.socket.end();
  const deadline = Date.now() + HANG_MS;
  for (;;) {
    const p = await c.next(Math.max(1, deadline - Date.now()));
    if (p) {
      onPdu(p);
      continue;
    }
    if (c.isClosed) return;
    trace.fail(`the target kept the connection open ${HANG_MS} ms after we ended ours`);
  }
}

// ---------------------------------------------------------------------------------------------
// The well-behaved connection run after every fuzzed one.

interface ScsiOutcome {
  status: number;
  sense: DecodedSense | undefined;
  data: Buffer;
}

/** One SCSI command as a correct initiator sends it (immediate data, R2T answers), UA retried. */
async function wellFormed(
  c: RawInitiator,
  trace: Trace,
  cdb: Buffer,
  opts: { lun: number; read?: number; write?: Buffer; immediateMax?: number },
): Promise<ScsiOutcome> {
  for (let attempt = 0; attempt < 6; attempt++) {
    const write = opts.write;
    const immediate = write ? write.subarray(0, Math.min(write.length, opts.immediateMax ?? 0)) : undefined;
    const itt = c.scsi(cdb, {
      lun: opts.lun,
      ...(opts.read !== undefined ? { read: opts.read } : {}),
      ...(write ? { write: write.length } : {}),
      ...(immediate && immediate.length > 0 ? { data: immediate } : {}),
    });
    const chunks: Buffer[] = [];
    let outcome: ScsiOutcome | undefined;
    while (!outcome) {
      const p = await c.next(HANG_MS);
      if (!p) trace.fail(`well-behaved command 0x${cdb[0]!.toString(16)} on LUN ${opts.lun}: no answer`);
      trace.add(describePdu(p));
      const op = p.bhs[0]! & 0x3f;
      if (p.bhs.readUInt32BE(16) !== itt) trace.fail(`well-behaved connection got an unexpected PDU`);
      if (op === Opcode.DataIn) {
        const f = decodeDataIn(p.bhs);
        chunks.push(p.data);
        if (f.hasStatus) {
          c.expStatSN = (f.statSN + 1) >>> 0;
          outcome = { status: f.status, sense: undefined, data: Buffer.concat(chunks) };
        }
      } else if (op === Opcode.ReadyToTransfer) {
        const r = decodeReadyToTransfer(p.bhs);
        c.send(
          encodeDataOut({ final: true, lun: opts.lun, itt, ttt: r.ttt, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: r.bufferOffset }),
          write!.subarray(r.bufferOffset, r.bufferOffset + r.desiredLength),
        );
      } else if (op === Opcode.ScsiResponse) {
        const f = decodeScsiResponse(p.bhs);
        c.expStatSN = (f.statSN + 1) >>> 0;
        const sense = p.data.length >= 2 ? parseSense(p.data.subarray(2, 2 + p.data.readUInt16BE(0))) : undefined;
        outcome = { status: f.status, sense, data: Buffer.concat(chunks) };
      } else {
        trace.fail(`well-behaved connection got opcode 0x${op.toString(16)}`);
      }
    }
    // Unit attentions (a new nexus, resets and mode changes by fuzzed sessions) are reported once each.
    if (outcome.status === 0x02 && outcome.sense?.key === 0x06) continue;
    return outcome;
  }
  trace.fail('unit attentions never stopped');
}

async function healthCheck(fx: Fixture, rng: Rng, where: string): Promise<void> {
  assertNoFaults(fx, where);
  const trace: Trace = new Trace(`${where} / well-behaved connection`);
  const c = await RawInitiator.connect(fx.port);
  try {
    const login = await c.login({ initiatorName: INITIATOR, target: IQN, isid: ISID });
    if (login.statusClass !== 0) trace.fail(`login refused with ${login.statusClass}/${login.statusDetail}`);
    for (const [lun, blocks] of [
      [0, RW_BLOCKS],
      [1, RO_BLOCKS],
    ] as const) {
      const cap = await wellFormed(c, trace, Buffer.from([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), { lun, read: 8 });
      if (cap.status !== 0) trace.fail(`READ CAPACITY(10) on LUN ${lun} → status 0x${cap.status.toString(16)}`);
      if (cap.data.length !== 8 || cap.data.readUInt32BE(0) !== blocks - 1 || cap.data.readUInt32BE(4) !== BLOCK) {
        trace.fail(`READ CAPACITY(10) on LUN ${lun} returned ${cap.data.toString('hex')}`);
      }
    }
    // A well-formed write (immediate data + R2T), recorded in the shadow when acknowledged.
    const blocks = rng.range(1, 16);
    const lba = rng.int(RW_BLOCKS - blocks + 1);
    const payload = rng.bytes(blocks * BLOCK);
    const swp = [...fx.target.logicalUnits()].find((u) => u.lun === 0)!.mode.softwareWriteProtect;
    const w = await wellFormed(c, trace, write10(lba, blocks), { lun: 0, write: payload, immediateMax: rng.pick([0, 512, 4096]) });
    if (swp) {
      // A fuzzed MODE SELECT may legitimately have set SWP: then DATA PROTECT / SOFTWARE WRITE PROTECTED.
      if (w.status !== 0x02 || w.sense === undefined || senseKey(w.sense.key, w.sense.asc, w.sense.ascq) !== '07/27/02') {
        trace.fail(`write with SWP set → status 0x${w.status.toString(16)}`);
      }
      count(fx, 'health: SWP set by a fuzzed MODE SELECT');
    } else {
      if (w.status !== 0) trace.fail(`well-formed WRITE(10) → status 0x${w.status.toString(16)} sense ${JSON.stringify(w.sense)}`);
      payload.copy(fx.shadow, lba * BLOCK);
    }
    // Whole LUNs read back over the wire and compared with what acknowledged commands put there.
    for (const [lun, blocksOf, image] of [
      [0, RW_BLOCKS, fx.shadow],
      [1, RO_BLOCKS, fx.roImage],
    ] as const) {
      const r = await wellFormed(c, trace, read10(0, blocksOf), { lun, read: blocksOf * BLOCK });
      if (r.status !== 0) trace.fail(`READ(10) of LUN ${lun} → status 0x${r.status.toString(16)}`);
      const at = firstDifference(r.data, image);
      if (at >= 0) trace.fail(`LUN ${lun} differs from what acknowledged commands wrote, first at byte ${at} (block ${Math.floor(at / BLOCK)})`);
    }
    if (!fx.rw.data.equals(fx.shadow)) trace.fail(`LUN 0 device bytes differ from the shadow at byte ${firstDifference(fx.rw.data, fx.shadow)}`);
    if (!fx.ro.data.equals(fx.roImage)) trace.fail('read-only LUN 1 changed');
    c.send(encodeLogoutRequest({ immediate: true, reason: 0, itt: 0x7777, cid: 0, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
    const lo = await c.next(HANG_MS);
    if (!lo || (lo.bhs[0]! & 0x3f) !== Opcode.LogoutResponse || lo.bhs[2] !== 0) trace.fail('logout not answered with success');
    await waitClosed(c, trace, 'after logout');
  } finally {
    c.close();
  }
  count(fx, 'health checks passed');
  assertNoFaults(fx, where);
}

// ---------------------------------------------------------------------------------------------
// Part 1: before and during login.

/** Text pairs with deliberate flaws; what the target must conclude about them. */
interface FuzzText {
  readonly bytes: Buffer;
  /** Broken text (missing '=', bad key name, duplicate key, value > 8192 bytes): §6.1 / §6.2 say refuse. */
  readonly structuralFlaw: boolean;
  /** Keys no RFC defines: each must be answered NotUnderstood (§6.2). */
  readonly unknownKeys: string[];
  /** Known keys with values outside their domain: each must be answered Reject (§6.2). */
  readonly badValueKeys: string[];
  readonly keys: Set<string>;
}

const BAD_VALUES: ReadonlyArray<readonly [string, string]> = [
  ['MaxBurstLength', 'lots'],
  ['FirstBurstLength', '-1'],
  ['MaxOutstandingR2T', '0'],
  ['HeaderDigest', 'MD5'],
  ['DataDigest', ','],
  ['InitialR2T', 'Maybe'],
  ['ImmediateData', ''],
  ['DefaultTime2Wait', '99999'],
  ['ErrorRecoveryLevel', '7'],
  ['MaxRecvDataSegmentLength', '511'],
  ['TargetPortalGroupTag', '7'], // declared by targets only
];
/** Keys the target declares itself: its declaration may stand in for the answer (one key per PDU, §6.2). */
const TARGET_DECLARED_KEYS = new Set(['MaxRecvDataSegmentLength', 'TargetPortalGroupTag']);

function fuzzText(rng: Rng, base: ReadonlyArray<readonly [string, string]>, opts: { allowHuge: boolean }): FuzzText {
  const parts: Buffer[] = [];
  const keys = new Set<string>();
  const unknownKeys: string[] = [];
  const badValueKeys: string[] = [];
  let structuralFlaw = false;
  const add = (key: string | Buffer, value: string | Buffer): void => {
    parts.push(Buffer.concat([Buffer.from(key), Buffer.from('='), Buffer.from(value), Buffer.from([0])]));
  };
  for (const [k] of base) keys.add(k);
  const entries: Array<() => void> = base.map(([k, v]) => () => add(k, v));
  const extras = rng.int(6);
  for (let i = 0; i < extras; i++) {
    const kind = rng.weighted<string>([
      [20, 'unknown'],
      [10, 'x-key'],
      [12, 'bad-value'],
      [8, 'duplicate'],
      [6, 'no-equals'],
      [6, 'bad-key'],
      [6, 'utf8-value'],
      [4, 'utf8-key'],
      [6, 'long-value'],
      [3, 'huge-value'],
      [6, 'empty-entries'],
    ]);
    entries.push(() => {
      switch (kind) {
        case 'unknown': {
          const k = `Zfz${rng.u32().toString(36)}`;
          if (keys.has(k)) return;
          keys.add(k);
          unknownKeys.push(k);
          add(k, rng.bytes(rng.int(20)).toString('hex'));
          return;
        }
        case 'x-key': {
          const k = `X-org.fuzz.${rng.u32().toString(36)}`;
          keys.add(k);
          unknownKeys.push(k);
          add(k, 'on');
          return;
        }
        case 'bad-value': {
          const [k, v] = rng.pick(BAD_VALUES);
          if (keys.has(k)) return;
          keys.add(k);
          badValueKeys.push(k);
          add(k, v);
          return;
        }
        case 'duplicate': {
          const existing = [...keys];
          if (existing.length === 0) return;
          structuralFlaw = true;
          add(rng.pick(existing), 'again');
          return;
        }
        case 'no-equals':
          structuralFlaw = true;
          parts.push(Buffer.concat([Buffer.from(`NoEquals${rng.int(100)}`), Buffer.from([0])]));
          return;
        case 'bad-key':
          structuralFlaw = true;
          add(rng.pick(['Bad Key', '', 'a'.repeat(64), 'semi;colon', 'tab\tkey']), 'v');
          return;
        case 'utf8-value': {
          const k = `Zutf${rng.u32().toString(36)}`;
          keys.add(k);
          unknownKeys.push(k);
          add(k, Buffer.from([0xff, 0xfe, 0xc3, 0x28, 0xe2, 0x82]));
          return;
        }
        case 'utf8-key':
          structuralFlaw = true;
          add(Buffer.from([0x4b, 0xc3, 0xa9, 0xff]), 'v');
          return;
        case 'long-value': {
          const k = `Zlong${rng.u32().toString(36)}`;
          keys.add(k);
          unknownKeys.push(k);
          add(k, 'v'.repeat(rng.range(256, 2048)));
          return;
        }
        case 'huge-value':
          if (!opts.allowHuge) return;
          structuralFlaw = true; // longer than any key allows (§6.1: at most 8192 bytes)
          add(`Zhuge${rng.int(100)}`, 'h'.repeat(8193 + rng.int(200)));
          return;
        default:
          parts.push(Buffer.alloc(rng.range(1, 3)));
      }
    });
  }
  // Shuffle (the leading keys need not come first).
  for (let i = entries.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [entries[i], entries[j]] = [entries[j]!, entries[i]!];
  }
  for (const e of entries) e();
  let bytes = Buffer.concat(parts);
  if (bytes.length > 0 && rng.chance(0.1)) bytes = bytes.subarray(0, bytes.length - 1); // no final NUL: tolerated
  return { bytes, structuralFlaw, unknownKeys, badValueKeys, keys };
}

/** Validates Login Responses and keeps their StatSN sequence. */
class LoginWatcher {
  private nextStatSN: number | undefined;
  constructor(
    private readonly c: RawInitiator,
    private readonly trace: Trace,
  ) {}

  check(p: Pdu, itt: number | undefined): void {
    const t = this.trace;
    t.add(describePdu(p));
    const op = p.bhs[0]! & 0x3f;
    if (op !== Opcode.LoginResponse) t.fail(`opcode 0x${op.toString(16)} during login (only Login Responses are valid)`);
    if ((p.bhs[0]! & 0xc0) !== 0) t.fail('target PDU with bits 6-7 of byte 0 set');
    if (p.ahs.length !== 0) t.fail('Login Response with an AHS');
    if (p.data.length > LOGIN_MAX_DATA_SEGMENT) t.fail(`Login Response data of ${p.data.length} bytes > 8192 (§13.12 default)`);
    const f = decodeLoginResponse(p.bhs);
    if (itt !== undefined && f.itt !== itt) t.fail(`Login Response ITT ${f.itt} for request ITT ${itt}`);
    if (this.nextStatSN !== undefined && f.statSN !== this.nextStatSN) t.fail(`Login Response StatSN ${f.statSN}, expected ${this.nextStatSN}`);
    this.nextStatSN = (f.statSN + 1) >>> 0;
    if (f.statusClass > 3) t.fail(`status class ${f.statusClass}`);
    if (f.statusClass !== 0 && (f.transit || p.data.length > 0)) t.fail('a failed login response with T=1 or with text');
    if (f.versionMax !== 0 || f.versionActive !== 0) t.fail('version other than 0');
    if (p.data.length > 0 && !parseText(p.data).ok) t.fail(`Login Response text does not parse: ${p.data.toString('latin1').slice(0, 80)}`);
  }

  async response(itt: number): Promise<{ cls: number; detail: number; transit: boolean; nsg: number; keys: Map<string, string> } | undefined> {
    const p = await this.c.next(HANG_MS);
    if (!p) {
      if (this.c.isClosed) return undefined;
      this.trace.fail(`no Login Response within ${HANG_MS} ms`);
    }
    this.check(p, itt);
    const f = decodeLoginResponse(p.bhs);
    const parsed = parseText(p.data);
    const keys = new Map(parsed.ok ? parsed.pairs.map((x) => [x.key, x.value] as const) : []);
    return { cls: f.statusClass, detail: f.statusDetail, transit: f.transit, nsg: f.nsg, keys };
  }
}

type LoginOverrides = { -readonly [K in keyof LoginRequestFields]?: LoginRequestFields[K] };

function loginFields(rng: Rng, over: LoginOverrides = {}): LoginRequestFields {
  return {
    transit: true,
    continue: false,
    csg: 1,
    nsg: 3,
    versionMax: 0,
    versionMin: 0,
    isid: ISID,
    tsih: 0,
    itt: rng.u32() & 0x7fffffff,
    cid: 0,
    cmdSN: rng.u32(),
    expStatSN: rng.u32(),
    ...over,
  };
}

const LEADING: ReadonlyArray<readonly [string, string]> = [
  ['InitiatorName', INITIATOR],
  ['SessionType', 'Normal'],
  ['TargetName', IQN],
];

async function fuzzLoginConnection(fx: Fixture, rng: Rng, where: string): Promise<void> {
  const trace: Trace = new Trace(where);
  const c = await RawInitiator.connect(fx.port);
  const watch = new LoginWatcher(c, trace);
  const rawWrite = (buf: Buffer): void => {
    c.writer.flushNow();
    c.socket.write(buf);
  };
  const expectStatus = async (itt: number, cls: number, detail: number | undefined, what: string): Promise<void> => {
    const r = await watch.response(itt);
    if (!r) trace.fail(`${what}: connection closed without a Login Response`);
    if (r.cls !== cls || (detail !== undefined && r.detail !== detail)) {
      trace.fail(`${what}: Login Response ${r.cls}/${r.detail}, expected ${cls}/${detail ?? 'any'}`);
    }
    if (cls !== 0) await waitClosed(c, trace, `after login status ${cls}/${r.detail}`);
  };
  /** After a successful move to full feature phase: one ping must be answered. */
  const pingInFullFeature = async (keys: Map<string, string>): Promise<void> => {
    const hd = keys.get('HeaderDigest') === 'CRC32C';
    const dd = keys.get('DataDigest') === 'CRC32C';
    c.writer.headerDigest = c.reader.limits.headerDigest = hd;
    c.writer.dataDigest = c.reader.limits.dataDigest = dd;
    c.send(encodeNopOut({ immediate: true, lun: 0, itt: 0x1234, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }), Buffer.from('ok'));
    const p = await c.next(HANG_MS);
    if (!p || (p.bhs[0]! & 0x3f) !== Opcode.NopIn || p.bhs.readUInt32BE(16) !== 0x1234) trace.fail('no NOP-In after the login completed');
    trace.add(describePdu(p));
    count(fx, 'login: reached full feature phase');
  };
  const scenario = rng.weighted<string>([
    [28, 'random-bhs'],
    [30, 'garbage-text'],
    [18, 'header-fields'],
    [16, 'sequence'],
    [3, 'too-many-continuations'],
    [5, 'discovery'],
  ]);
  trace.add(`scenario ${scenario}`);
  count(fx, `login scenario: ${scenario}`);
  try {
    switch (scenario) {
      case 'random-bhs': {
        // Random bytes where the first Login Request belongs: reserved opcodes, random flags and lengths.
        const bhs = rng.bytes(BHS_LENGTH);
        const opcode = rng.chance(0.35) ? Opcode.LoginRequest : rng.int(64);
        bhs[0] = (rng.chance(0.5) ? 0x40 : 0) | (rng.chance(0.1) ? 0x80 : 0) | opcode;
        const ahsWords = rng.chance(0.8) ? 0 : rng.chance(0.8) ? rng.int(4) : rng.int(256);
        const shape = rng.weighted<'consistent' | 'oversize' | 'truncated'>([
          [80, 'consistent'],
          [10, 'oversize'],
          [10, 'truncated'],
        ]);
        let dsl = shape === 'oversize' ? rng.range(LOGIN_MAX_DATA_SEGMENT + 1, 0xffffff) : rng.chance(0.7) ? rng.int(300) : rng.int(LOGIN_MAX_DATA_SEGMENT + 1);
        if (shape === 'truncated') dsl = Math.max(dsl, 1);
        bhs[4] = ahsWords;
        bhs[5] = (dsl >>> 16) & 0xff;
        bhs[6] = (dsl >>> 8) & 0xff;
        bhs[7] = dsl & 0xff;
        const data = shape === 'oversize' ? Buffer.alloc(0) : rng.chance(0.5) ? rng.bytes(dsl) : Buffer.from('InitiatorName=x\0'.repeat(dsl).slice(0, dsl));
        const whole = frame(bhs, rng.bytes(ahsWords * 4), data);
        trace.add(`-> random BHS op=0x${opcode.toString(16)} ahsWords=${ahsWords} dsl=${dsl} ${shape}`);
        if (shape === 'oversize') {
          // Longer than the 8192 bytes allowed during login (§13.12): the target drops the connection.
          rawWrite(bhs);
          const p = await c.next(HANG_MS);
          if (p) watch.check(p, undefined);
          await waitClosed(c, trace, 'oversized login PDU');
          break;
        }
        if (shape === 'truncated') {
          // Cut short, then our side ends: the target waits for the rest (it cannot know), then closes.
          rawWrite(whole.subarray(0, rng.int(whole.length)));
          await endAndWait(c, trace, (p) => watch.check(p, undefined));
          break;
        }
        rawWrite(whole);
        const itt = bhs.readUInt32BE(16);
        if (opcode !== Opcode.LoginRequest) {
          // §6.3 / §11.13.5: anything but a Login Request before full feature phase: 02/0b, then close.
          await expectStatus(itt, 2, 0x0b, `opcode 0x${opcode.toString(16)} as first PDU`);
        } else {
          const r = await watch.response(itt);
          if (!r) trace.fail('random Login Request: closed without a Login Response');
          if (r.cls !== 0) await waitClosed(c, trace, 'after a refused random login');
        }
        break;
      }
      case 'garbage-text': {
        const base = LEADING.filter(() => rng.chance(0.93));
        const text = fuzzText(rng, base, { allowHuge: true });
        const parts: Buffer[] = [];
        if (text.bytes.length > LOGIN_MAX_DATA_SEGMENT || rng.chance(0.25)) {
          // Continued over several PDUs with the C bit (§11.12.2), each within 8192 bytes.
          let rest = text.bytes;
          const smallest = Math.ceil(text.bytes.length / 60);
          while (rest.length > 0) {
            const n = Math.min(rest.length, rng.range(Math.max(1, smallest), LOGIN_MAX_DATA_SEGMENT));
            parts.push(rest.subarray(0, n));
            rest = rest.subarray(n);
          }
        } else parts.push(text.bytes);
        const transit = rng.chance(0.8);
        const itt = rng.u32() & 0x7fffffff;
        trace.add(`-> login text in ${parts.length} PDU(s): ${text.bytes.toString('latin1').replace(/\0/g, '|').slice(0, 160)}`);
        for (let i = 0; i < parts.length - 1; i++) {
          c.send(encodeLoginRequest(loginFields(rng, { itt, transit: false, continue: true, cmdSN: 1, expStatSN: 0 })), parts[i]!);
          // §11.12.2: each continued PDU gets an empty response.
          const r = await watch.response(itt);
          if (!r || r.cls !== 0) trace.fail('a continued Login Request was not answered with an empty success response');
        }
        c.send(encodeLoginRequest(loginFields(rng, { itt, transit, cmdSN: 1, expStatSN: 0 })), parts[parts.length - 1]!);
        const keys = new Map<string, string>(base.map(([k, v]) => [k, v]));
        let expected: [number, number] = [0, 0];
        if (text.structuralFlaw) expected = [2, 0x00];
        else if (!keys.has('InitiatorName')) expected = [2, 0x07];
        else if (!keys.has('TargetName')) expected = [2, 0x07];
        const r = await watch.response(itt);
        if (!r) trace.fail('garbage login text: closed without a Login Response');
        if (r.cls !== expected[0] || r.detail !== expected[1]) {
          trace.fail(`garbage login text (flaw=${text.structuralFlaw}): ${r.cls}/${r.detail}, expected ${expected[0]}/${expected[1]}`);
        }
        if (r.cls !== 0) {
          await waitClosed(c, trace, 'after refused login text');
          break;
        }
        for (const k of text.unknownKeys) {
          if (r.keys.get(k) !== 'NotUnderstood') trace.fail(`unknown key ${k} answered ${String(r.keys.get(k))}, expected NotUnderstood`);
        }
        for (const k of text.badValueKeys) {
          const a = r.keys.get(k);
          const ok = a === 'Reject' || (TARGET_DECLARED_KEYS.has(k) && (a === undefined || a === 'Irrelevant' || /^\d+$/.test(a)));
          if (!ok) trace.fail(`bad value of ${k} answered ${String(a)}, expected Reject`);
        }
        if (transit) {
          if (!r.transit || r.nsg !== 3) trace.fail('login with T=1 NSG=3 and acceptable keys did not reach full feature phase');
          await pingInFullFeature(r.keys);
        }
        break;
      }
      case 'header-fields': {
        // One flawed header field in an otherwise good leading Login Request.
        const flaw = rng.pick(['version', 'csg', 'transit-continue', 'nsg', 'tsih', 'random-ok'] as const);
        const over: LoginOverrides = {};
        let expected: [number, number | undefined] = [0, 0];
        switch (flaw) {
          case 'version':
            over.versionMin = rng.range(1, 255); // §11.12.4: only version 0 exists
            over.versionMax = Math.max(over.versionMin, rng.int(256));
            expected = [2, 0x05];
            break;
          case 'csg':
            over.csg = rng.pick([2, 3]); // §11.12.3: 2 is reserved, 3 is not a negotiation stage
            expected = [2, 0x00];
            break;
          case 'transit-continue':
            over.continue = true; // §11.12.2: T and C together are a protocol error
            expected = [2, 0x00];
            break;
          case 'nsg':
            over.csg = 1;
            over.nsg = rng.pick([0, 1, 2]); // §11.12.3: NSG 2 is reserved; NSG must advance
            expected = [2, 0x00];
            break;
          case 'tsih':
            over.tsih = rng.range(0x8000, 0xffff); // a session this target never had
            expected = [2, 0x0a];
            break;
          default:
            over.isid = rng.bytes(6).toString('hex');
            over.cid = rng.int(65536);
            expected = [0, 0];
        }
        const f = loginFields(rng, over);
        trace.add(`-> login with ${flaw}: ${JSON.stringify(over)}`);
        c.send(encodeLoginRequest(f), encodeText(LEADING.map(([key, value]) => ({ key, value }))));
        await expectStatus(f.itt, expected[0], expected[1], `login header ${flaw}`);
        if (expected[0] === 0) {
          const keys = new Map<string, string>();
          await pingInFullFeature(keys);
        }
        break;
      }
      case 'sequence': {
        // A good first step in the operational stage (T=0), then a second PDU that breaks the rules.
        const itt = rng.u32() & 0x7fffffff;
        const first = loginFields(rng, { itt, transit: false, nsg: 0 });
        c.send(encodeLoginRequest(first), encodeText(LEADING.map(([key, value]) => ({ key, value }))));
        const r1 = await watch.response(itt);
        if (!r1 || r1.cls !== 0 || r1.transit) trace.fail('first login step (T=0) not answered with success, T=0');
        const next = rng.pick(['isid', 'tsih', 'non-login', 'back-to-security', 'finish'] as const);
        trace.add(`-> second login PDU: ${next}`);
        if (next === 'non-login') {
          const op = rng.pick([Opcode.NopOut, Opcode.ScsiCommand, Opcode.TextRequest, Opcode.LogoutRequest, 0x1c, Opcode.Snack]);
          const bhs = rng.bytes(BHS_LENGTH);
          bhs[0] = 0x40 | op;
          bhs[4] = 0;
          bhs.fill(0, 5, 8);
          rawWrite(bhs);
          await expectStatus(bhs.readUInt32BE(16), 2, 0x0b, 'non-login PDU in the middle of login');
          break;
        }
        const over: LoginOverrides = { itt, cmdSN: first.cmdSN, expStatSN: (first.expStatSN + 1) >>> 0 };
        let expected: [number, number] = [2, 0x00];
        if (next === 'isid') over.isid = '400001379999'; // §11.12.5: ISID and TSIH stay the same during login
        else if (next === 'tsih') over.tsih = rng.range(1, 0xffff);
        else if (next === 'back-to-security') {
          over.csg = 0;
          over.nsg = 1;
        } else expected = [0, 0];
        c.send(encodeLoginRequest(loginFields(rng, over)), Buffer.alloc(0));
        await expectStatus(itt, expected[0], expected[1], `second login PDU (${next})`);
        if (expected[0] === 0) await pingInFullFeature(new Map());
        break;
      }
      case 'too-many-continuations': {
        // Endless C-bit text: the target bounds what it buffers (login.ts: 64 PDUs) → 03/02.
        const itt = rng.u32() & 0x7fffffff;
        for (let i = 0; i < 65; i++) {
          c.send(encodeLoginRequest(loginFields(rng, { itt, transit: false, continue: true, cmdSN: 1, expStatSN: i })), Buffer.from('Zpad=xxxx'));
          const r = await watch.response(itt);
          if (!r) trace.fail(`closed after ${i} continued login PDUs`);
          if (i < 64 && r.cls !== 0) trace.fail(`continued PDU ${i} refused with ${r.cls}/${r.detail}`);
          if (i === 64) {
            if (r.cls !== 3 || r.detail !== 2) trace.fail(`65th continued PDU: ${r.cls}/${r.detail}, expected 3/2 (out of resources)`);
            await waitClosed(c, trace, 'after too many continued login PDUs');
          }
        }
        break;
      }
      default: {
        // Discovery session: garbage text requests, and SCSI / TMF / Data-Out which it does not allow.
        c.send(
          encodeLoginRequest(loginFields(rng, { itt: 1, cmdSN: 10, expStatSN: 0 })),
          encodeText([
            { key: 'InitiatorName', value: INITIATOR },
            { key: 'SessionType', value: 'Discovery' },
          ]),
        );
        const r = await watch.response(1);
        if (!r || r.cls !== 0) trace.fail('discovery login refused');
        let nextStatSN = 1;
        let cmdSN = 10;
        for (let i = 0; i < 4; i++) {
          const kind = rng.pick(['text', 'scsi', 'tmf', 'data-out', 'nop'] as const);
          const itt = 100 + i;
          let expectReject: number | undefined;
          if (kind === 'text') {
            const text = fuzzText(rng, rng.chance(0.7) ? [['SendTargets', 'All']] : [], { allowHuge: false });
            c.send(encodeTextRequest({ immediate: true, final: true, continue: false, lun: 0, itt, ttt: RESERVED_TAG, cmdSN, expStatSN: nextStatSN }), text.bytes);
            if (text.structuralFlaw) expectReject = RejectReason.ProtocolError;
          } else if (kind === 'scsi') {
            const enc = encodeScsiCommand({ immediate: false, final: true, read: true, write: false, taskAttribute: 1, lun: 0, itt, expectedDataLength: 512, cmdSN, expStatSN: nextStatSN, cdb: read10(0, 1) });
            c.send(enc.bhs);
            expectReject = RejectReason.ProtocolError; // §13.22 (SessionType): no SCSI in discovery sessions
          } else if (kind === 'tmf') {
            c.send(encodeTaskManagementRequest({ immediate: true, function: 5, lun: 0, itt, referencedTaskTag: RESERVED_TAG, cmdSN, expStatSN: nextStatSN, refCmdSN: 0, expDataSN: 0 }));
            expectReject = RejectReason.ProtocolError;
          } else if (kind === 'data-out') {
            c.send(encodeDataOut({ final: true, lun: 0, itt, ttt: 5, expStatSN: nextStatSN, dataSN: 0, bufferOffset: 0 }), rng.bytes(rng.range(1, 100)));
            expectReject = RejectReason.ProtocolError;
          } else {
            c.send(encodeNopOut({ immediate: true, lun: 0, itt, ttt: RESERVED_TAG, cmdSN, expStatSN: nextStatSN }));
          }
          trace.add(`-> discovery ${kind} itt=${itt}`);
          const p = await c.next(HANG_MS);
          if (!p) trace.fail(`discovery ${kind}: no answer`);
          trace.add(describePdu(p));
          const op = p.bhs[0]! & 0x3f;
          if (p.bhs.readUInt32BE(24) !== nextStatSN) trace.fail(`discovery StatSN ${p.bhs.readUInt32BE(24)}, expected ${nextStatSN}`);
          nextStatSN++;
          if (expectReject !== undefined) {
            if (op !== Opcode.Reject || decodeReject(p.bhs).reason !== expectReject) trace.fail(`discovery ${kind}: expected Reject 0x${expectReject.toString(16)}`);
          } else if (kind === 'text') {
            if (op !== Opcode.TextResponse || p.bhs.readUInt32BE(16) !== itt || !parseText(p.data, true).ok) trace.fail('discovery text: bad Text Response');
          } else if (op !== Opcode.NopIn || p.bhs.readUInt32BE(16) !== itt) trace.fail('discovery NOP-Out: no NOP-In');
        }
        count(fx, 'login: discovery sessions');
        break;
      }
    }
  } finally {
    if (!c.isClosed) await endAndWait(c, trace, (p) => trace.add(describePdu(p)));
    c.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Part 2: full feature phase.

type TaskState = 'ignored' | 'held' | 'delivered' | 'done' | 'aborted' | 'rejected';

interface FuzzTask {
  readonly itt: number;
  readonly lunBytes: Buffer;
  readonly lun: number;
  readonly cdb: Buffer;
  readonly read: boolean;
  readonly write: boolean;
  readonly immediate: boolean;
  readonly cmdSN: number;
  readonly edtl: number;
  readonly bidiReadLength: number | undefined;
  /** Every Data-Out byte this test means to send; undefined when it will not send them all. */
  readonly payload: Buffer | undefined;
  /** Non-empty: the command breaks an RFC 7143 rule and must be rejected with one of these reasons. */
  readonly flaws: RejectReason[];
  readonly step: number;
  state: TaskState;
  /** The test stopped sending Data-Out: the target legitimately waits. */
  withheld: boolean;
  /** A deliberately broken Data-Out was sent: GOOD is wrong; a CHECK CONDITION or a Reject of it is right. */
  poison: string | undefined;
  poisonRejected: boolean;
  /** Bytes sent without R2T (immediate + unsolicited), i.e. where R2Ts must start. */
  unsolicitedBytes: number;
  r2tSN: number;
  r2tRanges: Array<[number, number]>;
  dataInSN: number;
  dataInBytes: number;
  dataInSinceF: number;
  dataIn: Buffer[];
}

type RequestKind = 'barrier' | 'nop' | 'tmf' | 'text' | 'logout' | 'other';

interface FuzzRequest {
  readonly kind: RequestKind;
  readonly itt: number;
  readonly bhs: Buffer;
  readonly immediate: boolean;
  readonly cmdSN: number;
  /** In-order requests (NOP with a reply, TMF, Text, Logout) ride the command window. */
  readonly ordered: boolean;
  /** Reject reasons that are right for this PDU; 'any' for random PDUs; [] = must not be rejected. */
  readonly rejects: RejectReason[] | 'any';
  /** Must a reply (of the kind's type) come once delivered? */
  readonly replyExpected: boolean;
  state: 'ignored' | 'held' | 'delivered' | 'done' | 'rejected';
  onReply?: (p: Pdu) => void;
}

/** Other PDUs we sent (Data-Out, SNACK, …): only to match Rejects against. */
interface SentPdu {
  readonly bhs: Buffer;
  readonly rejects: RejectReason[] | 'any';
  /** Broken whatever the window says: a Reject must come (before the next barrier's NOP-In). */
  readonly mustReject: boolean;
  readonly task?: FuzzTask;
  readonly poison?: boolean;
  rejected: boolean;
}

interface IoPlan {
  readonly cdb: Buffer;
  readonly lun: 0 | 1;
  readonly read: boolean;
  readonly write: boolean;
  readonly edtl: number;
  readonly payload: Buffer | undefined;
}

interface Negotiated {
  initialR2T: boolean;
  immediateData: boolean;
  firstBurst: number;
  maxBurst: number;
  /** What we accept (our declaration). */
  ourMrdsl: number;
  /** What the target accepts (its declaration). */
  targetMrdsl: number;
  digests: boolean;
}

class FfpFuzzer {
  private nextStatSN = 0;
  private exp = 0;
  private max = 0;
  private nextItt = 1;
  private step = 0;
  private readonly tasks = new Map<number, FuzzTask>();
  private readonly requests = new Map<number, FuzzRequest>();
  private readonly sent: SentPdu[] = [];
  /** CmdSNs the target holds (ahead of ExpCmdSN) or took as received (ABORT TASK of a lost command). */
  private readonly heldSlots = new Map<number, FuzzTask | FuzzRequest | 'placeholder'>();
  private readonly trace: Trace;
  private ended = false;

  constructor(
    private readonly fx: Fixture,
    private readonly c: RawInitiator,
    private readonly rng: Rng,
    private readonly p: Negotiated,
    where: string,
    firstStatSN: number,
  ) {
    this.trace = new Trace(where);
    this.nextStatSN = firstStatSN;
  }

  static async open(fx: Fixture, rng: Rng, where: string): Promise<FfpFuzzer> {
    const c = await RawInitiator.connect(fx.port);
    const keys: Record<string, string> = {};
    const ourMrdsl = rng.pick([512, 1024, 4096, 8192, 65536, rng.range(512, 100_000)]);
    keys.MaxRecvDataSegmentLength = String(ourMrdsl);
    const initialR2T = rng.chance(0.5);
    if (!initialR2T || rng.chance(0.5)) keys.InitialR2T = initialR2T ? 'Yes' : 'No';
    if (rng.chance(0.6)) keys.ImmediateData = rng.chance(0.75) ? 'Yes' : 'No';
    const maxBurst = rng.pick([512, 4096, 65536, 262144, rng.range(512, 1 << 20)]);
    if (rng.chance(0.7)) keys.MaxBurstLength = String(maxBurst);
    const firstBurst = rng.pick([512, 4096, 65536, rng.range(512, 262144)]);
    if (rng.chance(0.7)) keys.FirstBurstLength = String(firstBurst);
    if (rng.chance(0.5)) keys.MaxOutstandingR2T = String(rng.range(1, 4));
    const digests = rng.chance(0.2);
    if (digests) {
      keys.HeaderDigest = 'CRC32C';
      keys.DataDigest = 'CRC32C';
    }
    const r = await c.login({ initiatorName: INITIATOR, target: IQN, isid: ISID, keys });
    const trace: Trace = new Trace(where);
    if (r.statusClass !== 0) trace.fail(`login refused: ${r.statusClass}/${r.statusDetail} with ${JSON.stringify(keys)}`);
    const num = (k: string, dflt: number): number => (r.keys[k] !== undefined && /^\d+$/.test(r.keys[k]!) ? Number(r.keys[k]) : dflt);
    const mb = num('MaxBurstLength', 262144);
    const p: Negotiated = {
      initialR2T: r.keys.InitialR2T !== undefined ? r.keys.InitialR2T === 'Yes' : true,
      immediateData: r.keys.ImmediateData !== undefined ? r.keys.ImmediateData === 'Yes' : true,
      maxBurst: mb,
      firstBurst: Math.min(keys.FirstBurstLength !== undefined ? Math.min(Number(keys.FirstBurstLength), 262144) : 65536, mb),
      ourMrdsl,
      targetMrdsl: num('MaxRecvDataSegmentLength', 8192),
      digests: r.keys.HeaderDigest === 'CRC32C',
    };
    const fz = new FfpFuzzer(fx, c, rng, p, where, c.expStatSN);
    fz.trace.add(`login ${JSON.stringify(keys)} → ${JSON.stringify(p)}`);
    // Learn the window: a first barrier.
    fz.exp = c.cmdSN;
    fz.max = c.cmdSN;
    await fz.settle();
    return fz;
  }

  get closed(): boolean {
    return this.c.isClosed || this.ended;
  }

  private fail(message: string): never {
    return this.trace.fail(`step ${this.step}: ${message}`);
  }

  private freshItt(): number {
    let itt = this.nextItt++;
    if (this.rng.chance(0.05)) itt = (this.rng.u32() | 0x40000000) >>> 0;
    while (itt === RESERVED_TAG || this.tasks.has(itt) || this.requests.has(itt)) itt = (itt + 1) >>> 0;
    return itt;
  }

  private openTasks(): FuzzTask[] {
    return [...this.tasks.values()].filter((t) => t.state === 'held' || t.state === 'delivered');
  }

  /** CmdSN for a non-immediate PDU: mostly ExpCmdSN; sometimes out of the window, a gap, or a duplicate. */
  private chooseCmdSN(allowGap: boolean): number {
    const depth = serialDiff(this.max, this.exp) + 1;
    const kind = this.rng.weighted<string>([
      [86, 'next'],
      [7, 'outside'],
      [allowGap && this.heldSlots.size < 3 ? 5 : 0, 'gap'],
      [this.heldSlots.size > 0 ? 2 : 0, 'duplicate'],
    ]);
    if (kind === 'outside') {
      return this.rng.chance(0.5) ? (this.exp - 1 - this.rng.int(1000)) >>> 0 : (this.exp + depth + this.rng.int(1 << 20)) >>> 0;
    }
    if (kind === 'gap') return (this.exp + this.rng.range(1, Math.min(4, depth - 1))) >>> 0;
    if (kind === 'duplicate') return this.rng.pick([...this.heldSlots.keys()]);
    return this.exp;
  }

  /** Where a non-immediate PDU with `cmdSN` lands (§3.2.2.1). */
  private classify(cmdSN: number): 'delivered' | 'held' | 'ignored' {
    const d = serialDiff(cmdSN, this.exp);
    const depth = serialDiff(this.max, this.exp) + 1;
    if (d < 0 || d >= depth || this.heldSlots.has(cmdSN)) return 'ignored';
    return d === 0 ? 'delivered' : 'held';
  }

  private lunField(): Buffer {
    const rng = this.rng;
    const lun = Buffer.alloc(8);
    const kind = rng.weighted<string>([
      [50, 'lun0'],
      [30, 'lun1'],
      [7, 'absent'],
      [5, 'flat'],
      [8, 'random'],
    ]);
    if (kind === 'lun1') lun[1] = 1;
    else if (kind === 'absent') lun[1] = rng.range(2, 255);
    else if (kind === 'flat') {
      lun[0] = 0x40;
      lun[1] = rng.int(2);
    } else if (kind === 'random') rng.bytes(8).copy(lun);
    return lun;
  }

  // -------------------------------------------------------------------------------- sending

  private record(bhs: Buffer, rejects: RejectReason[] | 'any', extra: { task?: FuzzTask; poison?: boolean; mustReject?: boolean } = {}): void {
    this.sent.push({ bhs: Buffer.from(bhs), rejects, rejected: false, mustReject: extra.mustReject ?? (rejects !== 'any' && rejects.length > 0), ...extra });
  }

  private sendRaw(buf: Buffer): void {
    this.c.writer.flushNow();
    this.c.socket.write(buf);
  }

  private sendRequest(
    kind: RequestKind,
    bhs: Buffer,
    data: Buffer | undefined,
    opts: { rejects: RejectReason[] | 'any'; replyExpected: boolean; ordered: boolean; onReply?: (p: Pdu) => void },
  ): FuzzRequest {
    const immediate = (bhs[0]! & 0x40) !== 0;
    const cmdSN = bhs.readUInt32BE(24);
    const itt = bhs.readUInt32BE(16);
    this.c.send(bhs, data);
    let state: FuzzRequest['state'] = 'delivered';
    if (opts.ordered && !immediate) state = this.classify(cmdSN);
    const req: FuzzRequest = {
      kind,
      itt,
      bhs: Buffer.from(bhs),
      immediate,
      cmdSN,
      ordered: opts.ordered,
      rejects: opts.rejects,
      replyExpected: opts.replyExpected,
      state,
      ...(opts.onReply ? { onReply: opts.onReply } : {}),
    };
    if (itt !== RESERVED_TAG) this.requests.set(itt, req);
    if (state === 'held') this.heldSlots.set(cmdSN, req);
    if (opts.ordered && !immediate && state === 'delivered') this.advanceLocal();
    this.trace.add(`-> ${kind} itt=${itt.toString(16)} I=${immediate ? 1 : 0} cmdSN=${cmdSN} (${state}) dsl=${data?.length ?? 0}`);
    return req;
  }

  /**
   * A plausible I/O command on LUN 0 or 1 (READ / WRITE / WRITE AND VERIFY 6-16, WRITE SAME,
   * COMPARE AND WRITE, ORWRITE, UNMAP, VERIFY with BYTCHK), so the data path, R2T and unsolicited
   * data get real traffic; lengths and flags are still sometimes off.
   */
  private ioPlan(): IoPlan {
    const rng = this.rng;
    const lun = rng.chance(0.8) ? 0 : 1;
    const blocksOf = lun === 0 ? RW_BLOCKS : RO_BLOCKS;
    const image = lun === 0 ? this.fx.shadow : this.fx.roImage;
    const kind = rng.weighted<string>([
      [28, 'read'],
      [34, 'write'],
      [8, 'write-same'],
      [6, 'caw'],
      [5, 'orwrite'],
      [6, 'unmap'],
      [5, 'verify'],
    ]);
    const blocks = rng.chance(0.9) ? rng.range(1, Math.min(64, blocksOf)) : rng.range(0, 300);
    const lba = rng.chance(0.92) ? rng.int(Math.max(1, blocksOf - Math.min(blocks, blocksOf) + 1)) : rng.range(blocksOf - 2, blocksOf + 10);
    const sized = (bytes: number): number =>
      rng.weighted<number>([
        [86, bytes],
        [7, Math.max(0, bytes - rng.range(1, 1024))],
        [7, bytes + rng.range(1, 2048)],
      ]);
    const lba64 = (cdb: Buffer): void => {
      cdb.writeUInt32BE(0, 2);
      cdb.writeUInt32BE(lba, 6);
    };
    switch (kind) {
      case 'read':
      case 'write': {
        const read = kind === 'read';
        const size = rng.pick([6, 10, 12, 16]);
        const op = read ? { 6: 0x08, 10: 0x28, 12: 0xa8, 16: 0x88 }[size]! : rng.chance(0.2) ? { 6: 0x0a, 10: 0x2e, 12: 0xae, 16: 0x8e }[size]! : { 6: 0x0a, 10: 0x2a, 12: 0xaa, 16: 0x8a }[size]!;
        const cdb = Buffer.alloc(16);
        cdb[0] = op;
        const n = size === 6 ? Math.min(blocks, 256) : blocks;
        if (size === 6) {
          cdb[1] = (lba >>> 16) & 0x1f;
          cdb.writeUInt16BE(lba & 0xffff, 2);
          cdb[4] = n & 0xff;
        } else if (size === 10) {
          cdb[1] = rng.chance(0.2) && (op === 0x28 || op === 0x2a) ? 0x08 : 0;
          cdb.writeUInt32BE(lba, 2);
          cdb.writeUInt16BE(n, 7);
        } else if (size === 12) {
          cdb.writeUInt32BE(lba, 2);
          cdb.writeUInt32BE(n, 6);
        } else {
          lba64(cdb);
          cdb.writeUInt32BE(n, 10);
        }
        const bytes = (size === 6 && n === 0 ? 256 : n) * BLOCK;
        const edtl = sized(bytes);
        return { cdb, lun, read, write: !read, edtl, payload: read ? undefined : rng.bytes(edtl) };
      }
      case 'write-same': {
        const cdb = Buffer.alloc(16);
        const sixteen = rng.chance(0.5);
        cdb[0] = sixteen ? 0x93 : 0x41;
        cdb[1] = rng.weighted<number>([
          [70, 0],
          [15, 0x08],
          [sixteen ? 10 : 0, 0x01],
          [5, 0x10],
        ]);
        const n = rng.chance(0.1) ? 0 : blocks;
        if (sixteen) {
          lba64(cdb);
          cdb.writeUInt32BE(n, 10);
        } else {
          cdb.writeUInt32BE(lba, 2);
          cdb.writeUInt16BE(n, 7);
        }
        const edtl = (cdb[1]! & 0x01) !== 0 ? 0 : sized(BLOCK);
        return { cdb, lun, read: false, write: edtl > 0, edtl, payload: rng.chance(0.3) ? Buffer.alloc(edtl) : rng.bytes(edtl) };
      }
      case 'caw': {
        const n = Math.min(blocks, rng.chance(0.9) ? 4 : 255);
        const cdb = Buffer.alloc(16);
        cdb[0] = 0x89;
        lba64(cdb);
        cdb[13] = n;
        const verify = rng.chance(0.75) && lba + n <= blocksOf ? Buffer.from(image.subarray(lba * BLOCK, (lba + n) * BLOCK)) : rng.bytes(n * BLOCK);
        const payload = Buffer.concat([verify, rng.bytes(n * BLOCK)]);
        const edtl = rng.chance(0.9) ? payload.length : sized(payload.length);
        return { cdb, lun, read: false, write: true, edtl, payload: edtl === payload.length ? payload : Buffer.concat([payload, Buffer.alloc(Math.max(0, edtl - payload.length))]).subarray(0, edtl) };
      }
      case 'orwrite': {
        const cdb = Buffer.alloc(16);
        cdb[0] = 0x8b;
        lba64(cdb);
        cdb.writeUInt32BE(blocks, 10);
        const edtl = sized(blocks * BLOCK);
        return { cdb, lun, read: false, write: true, edtl, payload: rng.bytes(edtl) };
      }
      case 'unmap': {
        const count = rng.range(0, 4);
        const params = Buffer.alloc(8 + 16 * count);
        params.writeUInt16BE(6 + 16 * count, 0);
        params.writeUInt16BE(16 * count, 2);
        for (let i = 0; i < count; i++) {
          const n = rng.range(0, 8);
          params.writeUInt32BE(rng.chance(0.95) ? rng.int(blocksOf - n + 1) : blocksOf, 8 + 16 * i + 4);
          params.writeUInt32BE(n, 8 + 16 * i + 8);
        }
        const cdb = Buffer.alloc(16);
        cdb[0] = 0x42;
        cdb.writeUInt16BE(params.length, 7);
        const edtl = rng.chance(0.9) ? params.length : sized(params.length);
        return { cdb, lun, read: false, write: true, edtl, payload: Buffer.concat([params, Buffer.alloc(Math.max(0, edtl - params.length))]).subarray(0, edtl) };
      }
      default: {
        // VERIFY(16) with BYTCHK=1: compares Data-Out with the medium (MISCOMPARE when different).
        const cdb = Buffer.alloc(16);
        cdb[0] = 0x8f;
        cdb[1] = 0x02;
        lba64(cdb);
        cdb.writeUInt32BE(blocks, 10);
        const same = rng.chance(0.7) && lba + blocks <= blocksOf;
        const payload = same ? Buffer.from(image.subarray(lba * BLOCK, (lba + blocks) * BLOCK)) : rng.bytes(blocks * BLOCK);
        return { cdb, lun, read: false, write: true, edtl: payload.length, payload };
      }
    }
  }

  /** A SCSI Command with random CDB, flags, LUN, lengths, AHS and immediate data (or an I/O plan). */
  private scsiCommand(io?: IoPlan): void {
    const rng = this.rng;
    const p = this.p;
    const cdbIn = io?.cdb ?? randomCdb(rng);
    const spec = COMMANDS.lookup(cdbIn);
    const direction = spec.kind === 'found' ? spec.spec.direction : rng.pick([DataDirection.None, DataDirection.In, DataDirection.Out]);
    let read = io ? io.read : direction === DataDirection.In;
    let write = io ? io.write : direction === DataDirection.Out;
    if (rng.chance(io ? 0.02 : 0.12)) {
      read = rng.chance(0.5);
      write = rng.chance(0.5);
    }
    const want = expectedTransfer(cdbIn);
    let edtl =
      io?.edtl ??
      rng.weighted<number>([
        [50, want ?? rng.int(1024)],
        [14, Math.max(0, (want ?? 512) - rng.range(1, 1024))],
        [14, (want ?? 0) + rng.range(1, 4096)],
        [10, 0],
        [8, rng.int(65536)],
        [4, rng.u32()],
      ]);
    edtl >>>= 0;
    const flaws: RejectReason[] = [];
    const payload = write && edtl <= DATA_CAP ? (io?.payload !== undefined && io.payload.length === edtl ? io.payload : rng.bytes(edtl)) : undefined;
    // Immediate data (§13.11) within FirstBurstLength (§13.14).
    const maxImmediate = Math.min(edtl, p.firstBurst, p.targetMrdsl);
    let immediateLength = 0;
    if (write && p.immediateData && maxImmediate > 0) {
      immediateLength = rng.weighted<number>([
        [30, 0],
        [40, maxImmediate],
        [30, rng.int(maxImmediate + 1)],
      ]);
    }
    if (rng.chance(io ? 0.01 : 0.04)) {
      const extra = rng.range(1, 600);
      const flawed = (write && p.immediateData ? maxImmediate : 0) + extra;
      if (flawed <= p.targetMrdsl) {
        immediateLength = flawed; // more than allowed, or data without W / ImmediateData=No
        flaws.push(RejectReason.ProtocolError);
      }
    }
    const immediateData = immediateLength === 0 ? undefined : payload && immediateLength <= payload.length ? payload.subarray(0, immediateLength) : rng.bytes(immediateLength);
    // F=0: unsolicited Data-Out follows (§13.10 InitialR2T=No), up to FirstBurstLength.
    let final = true;
    const unsolicitedEnd = Math.min(edtl, p.firstBurst);
    if (write && !p.initialR2T && payload && immediateLength < unsolicitedEnd && flaws.length === 0 && rng.chance(0.4)) final = false;
    if (rng.chance(io ? 0.01 : 0.03) && (!write || p.initialR2T)) {
      final = false;
      flaws.push(RejectReason.ProtocolError);
    }
    // ITT: fresh, or reserved (§11.2.1.8), or one still in use (Reject "task in progress").
    let itt = this.freshItt();
    const open = this.openTasks();
    if (rng.chance(io ? 0.005 : 0.02)) {
      itt = RESERVED_TAG;
      flaws.push(RejectReason.InvalidPduField);
    } else if (open.length > 0 && rng.chance(io ? 0.01 : 0.04)) {
      itt = rng.pick(open).itt;
      flaws.push(RejectReason.TaskInProgress);
    }
    const immediate = rng.chance(0.1);
    const cmdSN = immediate ? this.exp : this.chooseCmdSN(true);
    const lunBytes = io ? Buffer.from([0, io.lun, 0, 0, 0, 0, 0, 0]) : this.lunField();
    const bidiRequested = read && write && rng.chance(0.7) ? rng.int(4096) : undefined;
    const enc = encodeScsiCommand({
      immediate,
      final,
      read,
      write,
      taskAttribute: rng.chance(0.9) ? 1 : rng.int(8),
      lun: 0,
      itt,
      expectedDataLength: edtl,
      cmdSN,
      expStatSN: this.nextStatSN,
      cdb: cdbIn,
      ...(bidiRequested !== undefined ? { bidiReadLength: bidiRequested } : {}),
    });
    lunBytes.copy(enc.bhs, 8);
    let ahs = enc.ahs;
    if (rng.chance(io ? 0.005 : 0.05)) {
      // A hand-made AHS: random words, or plausible ones with wrong lengths / types.
      ahs = rng.chance(0.5) ? rng.bytes(4 * rng.range(1, 8)) : randomAhs(rng);
    }
    const parsed = parseAhs(enc.bhs, ahs ?? Buffer.alloc(0));
    if (!parsed) flaws.push(RejectReason.InvalidPduField); // §11.2.2
    const cdb = parsed?.cdb ?? cdbIn;
    this.c.send(enc.bhs, immediateData, ahs);
    const bhs = Buffer.from(enc.bhs);
    let state: TaskState;
    if (flaws.length > 0) state = 'rejected';
    else if (immediate) state = 'delivered';
    else state = this.classify(cmdSN);
    const task: FuzzTask = {
      itt,
      lunBytes,
      lun: decodeLun(bhs),
      cdb,
      read,
      write,
      immediate,
      cmdSN,
      edtl,
      bidiReadLength: parsed?.bidi,
      payload,
      flaws,
      step: this.step,
      state,
      withheld: write && edtl > 0 && payload === undefined,
      poison: undefined,
      poisonRejected: false,
      unsolicitedBytes: immediateLength,
      r2tSN: 0,
      r2tRanges: [],
      dataInSN: 0,
      dataInBytes: 0,
      dataInSinceF: 0,
      dataIn: [],
    };
    this.record(bhs, flaws.length > 0 ? flaws : [], { task });
    if (flaws.length === 0) this.tasks.set(itt, task);
    if (state === 'held') this.heldSlots.set(cmdSN, task);
    if (state === 'delivered' && !immediate) this.advanceLocal();
    count(this.fx, `scsi: ${state}`);
    this.trace.add(
      `-> SCSI itt=${itt.toString(16)} I=${immediate ? 1 : 0} F=${final ? 1 : 0} R=${read ? 1 : 0} W=${write ? 1 : 0} lun=${task.lun} cdb=${cdb.toString('hex').slice(0, 40)} edtl=${edtl} imm=${immediateLength} cmdSN=${cmdSN} (${state}) flaws=${flaws.join(',')}`,
    );
    if (!final && flaws.length === 0 && state !== 'rejected') this.sendUnsolicited(task, unsolicitedEnd);
  }

  /** Unsolicited Data-Out (§13.10) from the end of the immediate data to min(EDTL, FirstBurstLength). */
  private sendUnsolicited(task: FuzzTask, end: number): void {
    const rng = this.rng;
    let offset = task.unsolicitedBytes;
    let dataSN = 0;
    while (offset < end) {
      const n = Math.min(end - offset, rng.range(1, Math.min(this.p.targetMrdsl, 65536)));
      const last = offset + n === end;
      if (rng.chance(0.04)) {
        task.withheld = true; // stop without F: the target waits for the rest
        this.trace.add(`   unsolicited data withheld at ${offset}`);
        return;
      }
      if (rng.chance(0.1)) {
        this.poisonDataOut(task, RESERVED_TAG, dataSN, offset, n, last, task.unsolicitedBytes, end, true);
        return;
      }
      this.sendDataOut(task, RESERVED_TAG, dataSN, offset, n, last);
      dataSN++;
      offset += n;
    }
    task.unsolicitedBytes = end;
  }

  private sendDataOut(task: FuzzTask, ttt: number, dataSN: number, offset: number, length: number, final: boolean): void {
    const bhs = encodeDataOut({ final, lun: 0, itt: task.itt, ttt, expStatSN: this.nextStatSN, dataSN, bufferOffset: offset });
    task.lunBytes.copy(bhs, 8);
    this.c.send(bhs, task.payload!.subarray(offset, offset + length));
    this.record(bhs, [], { task });
  }

  /**
   * One deliberately broken Data-Out in a sequence (`seqStart`..`seqEnd` = the R2T's range or the
   * unsolicited burst), after which the test sends nothing more for the task. ERL 0 cannot repair a
   * data sequence (§7.1.4.1 and §11.7.5 with DataPDUInOrder=Yes, §13.18): the target must reject the PDU or
   * end the task with CHECK CONDITION; completing the write with GOOD is wrong.
   */
  private poisonDataOut(
    task: FuzzTask,
    ttt: number,
    dataSN: number,
    offset: number,
    length: number,
    last: boolean,
    seqStart: number,
    seqEnd: number,
    unsolicited = false,
  ): void {
    const rng = this.rng;
    // An unsolicited burst may end early with F (the target then asks for the rest with R2Ts).
    const kind = rng.pick(unsolicited ? (['data-sn', 'overlap', 'gap', 'beyond', 'ttt'] as const) : (['data-sn', 'overlap', 'gap', 'early-final', 'beyond', 'ttt'] as const));
    let f = { dataSN, offset, length, final: last, ttt };
    switch (kind) {
      case 'data-sn':
        f.dataSN = (dataSN + rng.range(1, 5)) >>> 0;
        break;
      case 'overlap': {
        // The rest of the sequence, but starting a few bytes early: overlaps what was sent (or the
        // sequence start), leaves the end unsent while the byte count matches.
        if (offset === seqStart) {
          f = { ...f, offset: seqStart, length: seqEnd - seqStart, final: true };
          f.dataSN = (dataSN + 1) >>> 0; // still broken: skips a DataSN
        } else {
          const back = rng.range(1, offset - seqStart);
          f = { ...f, offset: offset - back, length: seqEnd - offset, final: true };
        }
        break;
      }
      case 'gap': {
        const skip = rng.range(1, Math.max(1, seqEnd - offset - 1));
        f = { ...f, offset: offset + skip, length: Math.max(0, seqEnd - offset - skip), final: true };
        if (f.length === 0) f.dataSN = (dataSN + 1) >>> 0;
        break;
      }
      case 'early-final':
        // F set before the sequence is complete (§11.7.1: F marks the last PDU of the sequence).
        f = { ...f, length: Math.max(0, Math.min(length, seqEnd - offset - 1)), final: true };
        break;
      case 'beyond':
        f = { ...f, length: seqEnd - offset + rng.range(1, 512) };
        break;
      default:
        f.ttt = (rng.u32() & 0x7fffffff) >>> 0;
    }
    const bhs = encodeDataOut({ final: f.final, lun: 0, itt: task.itt, ttt: f.ttt, expStatSN: this.nextStatSN, dataSN: f.dataSN, bufferOffset: f.offset });
    task.lunBytes.copy(bhs, 8);
    const data = Buffer.alloc(f.length);
    if (task.payload) task.payload.copy(data, 0, Math.min(f.offset, task.payload.length), Math.min(f.offset + f.length, task.payload.length));
    this.c.send(bhs, data.length > 0 ? data : undefined);
    this.record(bhs, 'any', { task, poison: true });
    task.poison = `${kind} (ttt=${ttt.toString(16)} dataSN=${f.dataSN} offset=${f.offset} len=${f.length} F=${f.final ? 1 : 0}; sequence ${seqStart}..${seqEnd})`;
    count(this.fx, `data-out poison: ${kind}`);
    this.trace.add(`   poisoned Data-Out: ${task.poison}`);
  }

  /** Answer an R2T like an initiator (§11.8): Data-Out PDUs in order, F on the last; sometimes not. */
  private answerR2T(task: FuzzTask, ttt: number, offset: number, length: number): void {
    const rng = this.rng;
    if (task.poison !== undefined || task.withheld || task.payload === undefined) {
      task.withheld ||= task.poison === undefined;
      return;
    }
    if (rng.chance(0.04)) {
      task.withheld = true;
      this.trace.add(`   R2T ttt=${ttt.toString(16)} left unanswered`);
      return;
    }
    const poisonAt = rng.chance(0.1) ? rng.int(4) : -1;
    let at = offset;
    let dataSN = 0;
    const end = offset + length;
    while (at < end) {
      const n = Math.min(end - at, rng.range(1, Math.min(this.p.targetMrdsl, 65536)));
      const last = at + n === end;
      if (dataSN === poisonAt || (last && poisonAt > dataSN)) {
        this.poisonDataOut(task, ttt, dataSN, at, n, last, offset, end);
        return;
      }
      this.sendDataOut(task, ttt, dataSN, at, n, last);
      at += n;
      dataSN++;
    }
  }

  // -------------------------------------------------------------------------------- receiving

  private handle(p: Pdu): void {
    const { bhs } = p;
    const op = bhs[0]! & 0x3f;
    this.trace.add(describePdu(p));
    if (!TARGET_OPCODES.has(op)) this.fail(`the target sent opcode 0x${op.toString(16)}, not a target opcode`);
    if ((bhs[0]! & 0xc0) !== 0) this.fail('target PDU with bits 6-7 of byte 0 set');
    if (p.ahs.length !== 0) this.fail(`target PDU (0x${op.toString(16)}) with an AHS`);
    if (p.data.length > this.p.ourMrdsl) this.fail(`data segment of ${p.data.length} bytes > our MaxRecvDataSegmentLength ${this.p.ourMrdsl} (§13.12)`);
    if (this.c.framingErrors.length > 0) this.fail(`framing error in what the target sent: ${this.c.framingErrors.join(',')}`);
    const itt = bhs.readUInt32BE(16);
    const seq = decodeSequence(bhs);
    // ExpCmdSN never goes back; MaxCmdSN ≥ ExpCmdSN - 1 (§3.2.2.1).
    if (this.lastTargetExp !== undefined && serialDiff(seq.expCmdSN, this.lastTargetExp) < 0) {
      this.fail(`ExpCmdSN went back from ${this.lastTargetExp} to ${seq.expCmdSN}`);
    }
    if (serialDiff(seq.maxCmdSN, seq.expCmdSN) < -1) this.fail(`MaxCmdSN ${seq.maxCmdSN} < ExpCmdSN ${seq.expCmdSN} - 1`);
    this.lastTargetExp = seq.expCmdSN;
    this.max = seq.maxCmdSN;
    // StatSN: advanced by each status-bearing PDU; R2T and unsolicited NOP-In carry the next one.
    if (advancesStatSN(op, itt, bhs[1]!)) {
      if (seq.statSN !== this.nextStatSN) this.fail(`StatSN ${seq.statSN}, expected ${this.nextStatSN}`);
      this.nextStatSN = (this.nextStatSN + 1) >>> 0;
    } else if ((op === Opcode.ReadyToTransfer || op === Opcode.NopIn) && seq.statSN !== this.nextStatSN) {
      this.fail(`R2T / NOP-In StatSN ${seq.statSN}, expected the next StatSN ${this.nextStatSN}`);
    }
    // Held PDUs this answer shows as delivered.
    this.promote(seq.expCmdSN);
    switch (op) {
      case Opcode.Reject:
        return this.onReject(p);
      case Opcode.ScsiResponse:
        return this.onScsiResponse(p);
      case Opcode.DataIn:
        return this.onDataIn(p);
      case Opcode.ReadyToTransfer:
        return this.onR2T(p);
      case Opcode.NopIn:
      case Opcode.TaskManagementResponse:
      case Opcode.TextResponse:
      case Opcode.LogoutResponse:
        return this.onReply(p, op);
      case Opcode.AsyncMessage:
        return;
      default:
        this.fail(`opcode 0x${op.toString(16)} in full feature phase`);
    }
  }

  private lastTargetExp: number | undefined;

  /** We sent the PDU for ExpCmdSN: it and every held PDU right behind it are delivered (§3.2.2.1). */
  private advanceLocal(): void {
    this.exp = (this.exp + 1) >>> 0;
    this.promote(this.exp);
    for (let held = this.heldSlots.get(this.exp); held !== undefined; held = this.heldSlots.get(this.exp)) {
      this.exp = (this.exp + 1) >>> 0;
      this.promote(this.exp);
    }
  }

  private promote(expCmdSN: number): void {
    for (const [cmdSN, held] of this.heldSlots) {
      if (serialDiff(cmdSN, expCmdSN) >= 0) continue;
      this.heldSlots.delete(cmdSN);
      if (held === 'placeholder') continue;
      if (held.state === 'held') held.state = 'delivered';
    }
    if (serialDiff(expCmdSN, this.exp) > 0) this.exp = expCmdSN;
  }

  private onReject(p: Pdu): void {
    const f = decodeReject(p.bhs);
    if (!REJECT_REASONS.has(f.reason)) this.fail(`Reject reason 0x${f.reason.toString(16)} is not defined (§11.17.1)`);
    if (p.bhs.readUInt32BE(16) !== RESERVED_TAG) this.fail('Reject with an ITT other than 0xffffffff (§11.17)');
    if ((p.bhs[1]! & 0x80) === 0) this.fail('Reject without F');
    if (p.data.length !== BHS_LENGTH) this.fail(`Reject data of ${p.data.length} bytes; it must be the rejected BHS (§11.17)`);
    const bhs = p.data;
    const itt = bhs.readUInt32BE(16);
    const op = bhs[0]! & 0x3f;
    const sent = this.sent.find((s) => !s.rejected && s.bhs.equals(bhs));
    const req = op !== Opcode.ScsiCommand && op !== Opcode.DataOut ? this.requests.get(itt) : undefined;
    const rejects = sent?.rejects ?? (req && req.bhs.equals(bhs) ? req.rejects : undefined);
    if (rejects === undefined) this.fail(`Reject (0x${f.reason.toString(16)}) of a PDU we did not send or that was already rejected: ${bhs.toString('hex')}`);
    if (rejects !== 'any' && !rejects.includes(f.reason)) {
      this.fail(
        rejects.length === 0
          ? `a valid PDU (op 0x${op.toString(16)} itt ${itt.toString(16)}) was rejected with reason 0x${f.reason.toString(16)}`
          : `Reject reason 0x${f.reason.toString(16)}, expected one of ${rejects.map((r) => `0x${r.toString(16)}`).join(',')}`,
      );
    }
    if (sent) {
      sent.rejected = true;
      if (sent.poison && sent.task) sent.task.poisonRejected = true;
      if (sent.task && op === Opcode.ScsiCommand) sent.task.state = 'rejected';
      count(this.fx, `reject 0x${f.reason.toString(16)}`);
      return;
    }
    req!.state = 'rejected';
    if (this.heldSlots.get(req!.cmdSN) === req) this.heldSlots.delete(req!.cmdSN);
    count(this.fx, `reject 0x${f.reason.toString(16)}`);
  }

  private taskFor(itt: number, what: string): FuzzTask {
    const t = this.tasks.get(itt);
    if (!t) this.fail(`${what} for ITT ${itt.toString(16)}, which names no command of ours`);
    if (t.state === 'ignored') this.fail(`${what} for a command whose CmdSN ${t.cmdSN} was outside the window (it must be ignored, §3.2.2.1)`);
    // The transport may end a held command whose Data-Out sequence broke (DATA PHASE ERROR) before
    // its turn: its CmdSN stays taken (command-window.ts cancelHeld), so no gap is left behind.
    if (t.state === 'held' && !(t.poison !== undefined && what === 'SCSI Response')) {
      this.fail(`${what} for a command still waiting for CmdSN ${t.cmdSN} (ExpCmdSN ${this.exp})`);
    }
    if (t.state === 'aborted') this.fail(`${what} for a command aborted by task management`);
    if (t.state === 'done') this.fail(`${what} for a command that already has its status`);
    if (t.state === 'rejected') this.fail(`${what} for a rejected command`);
    return t;
  }

  private onR2T(p: Pdu): void {
    const r = decodeReadyToTransfer(p.bhs);
    const t = this.taskFor(r.itt, 'R2T');
    if (!t.write) this.fail('R2T for a command without the W bit');
    if (r.ttt === RESERVED_TAG) this.fail('R2T with the reserved TTT');
    if (r.desiredLength === 0 || r.desiredLength > this.p.maxBurst) this.fail(`R2T desired length ${r.desiredLength} (MaxBurstLength ${this.p.maxBurst}, §13.13)`);
    if (r.bufferOffset + r.desiredLength > t.edtl) this.fail(`R2T for ${r.bufferOffset}+${r.desiredLength} beyond EDTL ${t.edtl}`);
    if (r.bufferOffset < t.unsolicitedBytes && t.poison === undefined) this.fail(`R2T at ${r.bufferOffset} asks for data already sent unsolicited (${t.unsolicitedBytes})`);
    for (const [a, b] of t.r2tRanges) {
      if (r.bufferOffset < b && r.bufferOffset + r.desiredLength > a) this.fail(`R2T ${r.bufferOffset}+${r.desiredLength} overlaps an earlier one (${a}..${b})`);
    }
    if (r.r2tSN !== t.r2tSN) this.fail(`R2TSN ${r.r2tSN}, expected ${t.r2tSN}`);
    t.r2tSN++;
    t.r2tRanges.push([r.bufferOffset, r.bufferOffset + r.desiredLength]);
    count(this.fx, 'r2t');
    this.answerR2T(t, r.ttt, r.bufferOffset, r.desiredLength);
  }

  private onDataIn(p: Pdu): void {
    const f = decodeDataIn(p.bhs);
    const t = this.taskFor(f.itt, 'Data-In');
    if (!t.read) this.fail('Data-In for a command without the R bit');
    if (f.dataSN !== t.dataInSN) this.fail(`Data-In DataSN ${f.dataSN}, expected ${t.dataInSN}`);
    if (f.bufferOffset !== t.dataInBytes) this.fail(`Data-In at offset ${f.bufferOffset}, expected ${t.dataInBytes} (DataPDUInOrder)`);
    if (p.data.length === 0) this.fail('empty Data-In');
    const limit = t.write ? (t.bidiReadLength ?? 0) : t.edtl;
    if (f.bufferOffset + p.data.length > limit) this.fail(`Data-In up to ${f.bufferOffset + p.data.length} > the ${limit} bytes the initiator expects`);
    if (p.bhs.readUInt32BE(20) !== RESERVED_TAG) this.fail('Data-In with a TTT (A bit is not negotiated at ERL 0)');
    t.dataInSN++;
    t.dataInBytes += p.data.length;
    t.dataInSinceF += p.data.length;
    t.dataIn.push(p.data);
    if (t.dataInSinceF > Math.max(this.p.maxBurst, this.p.ourMrdsl)) this.fail(`Data-In sequence longer than MaxBurstLength ${this.p.maxBurst} without F (§11.7.1)`);
    if (f.final) t.dataInSinceF = 0;
    if (f.hasStatus) {
      if (!f.final) this.fail('Data-In with S but without F (§11.7.1)');
      if (f.status !== 0x00 && f.status !== 0x04) this.fail(`status 0x${f.status.toString(16)} in Data-In (only GOOD / CONDITION MET may be phase-collapsed)`);
      this.finish(t, { status: f.status, response: 0, sense: undefined, overflow: f.overflow, underflow: f.underflow, residual: f.residualCount });
    }
  }

  private onScsiResponse(p: Pdu): void {
    const f = decodeScsiResponse(p.bhs);
    const t = this.taskFor(f.itt, 'SCSI Response');
    if ((p.bhs[1]! & 0x80) === 0) this.fail('SCSI Response without F');
    let sense: Buffer | undefined;
    if (p.data.length > 0) {
      if (p.data.length < 2) this.fail('SCSI Response data shorter than SenseLength');
      const senseLength = p.data.readUInt16BE(0);
      if (2 + senseLength > p.data.length) this.fail(`SenseLength ${senseLength} beyond the data segment (${p.data.length})`);
      sense = p.data.subarray(2, 2 + senseLength);
    }
    if (f.bidiOverflow && f.bidiUnderflow) this.fail('bidirectional overflow and underflow together');
    this.finish(t, { status: f.status, response: f.response, sense, overflow: f.overflow, underflow: f.underflow, residual: f.residualCount });
  }

  private finish(
    t: FuzzTask,
    r: { status: number; response: number; sense: Buffer | undefined; overflow: boolean; underflow: boolean; residual: number },
  ): void {
    const what = `command itt=${t.itt.toString(16)} cdb=${t.cdb.subarray(0, 16).toString('hex')} lun=${t.lun}`;
    t.state = 'done';
    if (r.response !== 0) this.fail(`${what}: SCSI Response "target failure" (0x${r.response.toString(16)}): the SCSI layer broke its contract`);
    if (![0x00, 0x02, 0x04, 0x18].includes(r.status)) this.fail(`${what}: status 0x${r.status.toString(16)}`);
    // Residuals (§11.4.5): never both; zero when neither flag is set.
    if (r.overflow && r.underflow) this.fail(`${what}: overflow and underflow together`);
    if (!r.overflow && !r.underflow && r.residual !== 0) this.fail(`${what}: residual ${r.residual} without O/U`);
    if (t.read && !t.write) {
      const accounted = r.underflow ? t.dataInBytes + r.residual : t.dataInBytes;
      if (accounted !== t.edtl) this.fail(`${what}: ${t.dataInBytes} Data-In bytes, U=${r.underflow} residual ${r.residual} do not add up to EDTL ${t.edtl}`);
    }
    let decoded: DecodedSense | undefined;
    if (r.status === 0x02) {
      if (!r.sense || r.sense.length === 0) this.fail(`${what}: CHECK CONDITION without sense data`);
      decoded = parseSense(r.sense);
      if (!decoded) this.fail(`${what}: sense data is neither fixed nor descriptor format: ${r.sense.toString('hex')}`);
      const triple = senseKey(decoded.key, decoded.asc, decoded.ascq);
      if (triple === INTERNAL_TARGET_FAILURE) this.fail(`${what}: HARDWARE ERROR / INTERNAL TARGET FAILURE: a handler threw`);
      if (!KNOWN_SENSE.has(triple)) this.fail(`${what}: sense ${triple} is not one this target defines`);
      count(this.fx, `sense ${triple}`);
    } else count(this.fx, `status 0x${r.status.toString(16)}`);
    if (t.poison !== undefined && (r.status === 0x00 || r.status === 0x04)) {
      this.fail(`${what}: GOOD after a broken Data-Out sequence (${t.poison}): the target accepted data out of order`);
    }
    this.checkOracle(t, r.status, decoded, what);
    const good = r.status === 0x00 || r.status === 0x04;
    if (good && READ_OPS.has(t.cdb[0]!) && t.read && !t.write && (t.lun === 0 || t.lun === 1)) {
      const { lba } = lbaAndBlocks(t.cdb)!;
      const image = t.lun === 0 ? this.fx.shadow : this.fx.roImage;
      const got = Buffer.concat(t.dataIn);
      const want = image.subarray(lba * BLOCK, lba * BLOCK + got.length);
      if (!got.equals(want)) this.fail(`${what}: READ returned bytes that differ from the LUN at byte ${firstDifference(got, want)}`);
      count(this.fx, 'reads verified');
    }
    if (good && t.lun === 0) {
      const effect = applyGood(this.fx.shadow, t.cdb, t.write && t.edtl > 0 ? t.payload : undefined);
      if (effect === 'unknown') {
        this.fx.rw.data.copy(this.fx.shadow);
        count(this.fx, 'EXTENDED COPY succeeded (shadow retaken)');
      } else if (effect === 'applied') count(this.fx, 'writes applied');
    }
  }

  /** Outcomes the SCSI layer must produce whatever the rest of the CDB holds (SPC-4, SAM-5). */
  private checkOracle(t: FuzzTask, status: number, sense: DecodedSense | undefined, what: string): void {
    const cdb = t.cdb;
    const op = cdb[0]!;
    const triple = sense ? senseKey(sense.key, sense.asc, sense.ascq) : `status 0x${status.toString(16)}`;
    const ua = sense?.key === 0x06;
    // The transport refuses a write it would have to buffer beyond 128 MiB (connection.ts
    // MAX_WRITE_BUFFER) with INVALID FIELD IN CDB before the SCSI layer sees it.
    if (t.write && t.edtl > 128 * 1024 * 1024 && triple === '05/24/00') return;
    // A broken Data-Out sequence ends the task in the transport (0B/4B/00) before the SCSI layer.
    if (t.poison !== undefined && triple === '0b/4b/00') return;
    if (t.lun !== 0 && t.lun !== 1) {
      // SPC-4 6.6.2 / 6.33 / 6.39: only INQUIRY, REPORT LUNS and REQUEST SENSE work without a LU.
      if (op !== 0x12 && op !== 0xa0 && op !== 0x03 && triple !== '05/25/00') this.fail(`${what}: absent LUN answered ${triple}, expected 05/25/00`);
      return;
    }
    const found = COMMANDS.lookup(cdb);
    if (found.kind === 'invalid-opcode' && !ua && triple !== '05/20/00') this.fail(`${what}: unsupported opcode answered ${triple}, expected 05/20/00`);
    if (found.kind === 'invalid-service-action' && !ua && triple !== '05/24/00') this.fail(`${what}: unsupported service action answered ${triple}, expected 05/24/00`);
    if (found.kind !== 'found') return;
    const spec = found.spec;
    if (t.lun === 1 && (spec.flags & CommandFlag.Writes) !== 0 && (spec.flags & CommandFlag.RequiresUnmap) === 0 && checkCdbMask(spec, cdb) === undefined) {
      if (!ua && triple !== '07/27/00' && status !== 0x18) this.fail(`${what}: write to the read-only LUN answered ${triple}, expected 07/27/00`);
    }
  }

  private onReply(p: Pdu, op: number): void {
    const itt = p.bhs.readUInt32BE(16);
    if (op === Opcode.NopIn && itt === RESERVED_TAG) {
      if (p.bhs.readUInt32BE(20) === RESERVED_TAG) this.fail('unsolicited NOP-In with the reserved TTT');
      return; // a target ping (none configured, but legal)
    }
    const req = this.requests.get(itt);
    const expectedKind: Record<number, RequestKind[]> = {
      [Opcode.NopIn]: ['nop', 'barrier', 'other'],
      [Opcode.TaskManagementResponse]: ['tmf', 'other'],
      [Opcode.TextResponse]: ['text', 'other'],
      [Opcode.LogoutResponse]: ['logout', 'other'],
    };
    if (!req || !expectedKind[op]!.includes(req.kind)) this.fail(`reply opcode 0x${op.toString(16)} for ITT ${itt.toString(16)}, which is no such request of ours`);
    if (req.state === 'ignored') this.fail(`reply to a ${req.kind} whose CmdSN ${req.cmdSN} was outside the window (it must be ignored, §3.2.2.1)`);
    if (req.state === 'held') this.fail(`reply to a ${req.kind} still waiting for CmdSN ${req.cmdSN}`);
    if (req.state === 'rejected') this.fail(`reply to a rejected ${req.kind}`);
    if (req.state === 'done' && req.kind !== 'text') this.fail(`second reply to ${req.kind} ITT ${itt.toString(16)}`);
    if ((p.bhs[1]! & 0x80) === 0 && op !== Opcode.TextResponse) this.fail('reply without F');
    req.state = 'done';
    req.onReply?.(p);
  }

  // -------------------------------------------------------------------------------- waiting

  /** Process PDUs until `done()`; 'closed' if the connection ends first; 'timeout' after `ms`. */
  private async pump(done: () => boolean, ms: number): Promise<'ok' | 'closed' | 'timeout'> {
    const deadline = Date.now() + ms;
    while (!done()) {
      const p = await this.c.next(Math.max(1, deadline - Date.now()));
      if (p) {
        this.handle(p);
        continue;
      }
      if (this.c.isClosed) return 'closed';
      return 'timeout';
    }
    return 'ok';
  }

  private mustAnswer(): string[] {
    const owed: string[] = [];
    for (const t of this.tasks.values()) {
      if (t.state !== 'delivered') continue;
      if (t.poison !== undefined ? !t.poisonRejected : !t.withheld) {
        owed.push(`command itt=${t.itt.toString(16)} (step ${t.step}${t.poison !== undefined ? `, poisoned: ${t.poison}` : ''}) cdb=${t.cdb.subarray(0, 16).toString('hex')}`);
      }
    }
    return owed;
  }

  /**
   * Wait until everything owed is answered: an immediate NOP-Out barrier first (the target answers
   * PDUs in order, so every synchronous reply to earlier PDUs comes before the barrier's NOP-In),
   * then every delivered command whose data was all sent.
   */
  async settle(): Promise<void> {
    if (this.closed) return;
    const itt = this.freshItt();
    const barrier = this.sendRequest('barrier', encodeNopOut({ immediate: true, lun: 0, itt, ttt: RESERVED_TAG, cmdSN: this.exp, expStatSN: this.nextStatSN }), undefined, {
      rejects: [],
      replyExpected: true,
      ordered: false,
    });
    const r = await this.pump(() => barrier.state === 'done', HANG_MS);
    if (r === 'closed') return this.onClosed();
    if (r === 'timeout') this.fail(`no NOP-In for an immediate NOP-Out within ${HANG_MS} ms: the target stopped answering`);
    for (const req of this.requests.values()) {
      if (req.state !== 'delivered') continue;
      if (req.replyExpected) this.fail(`${req.kind} ITT ${req.itt.toString(16)} (CmdSN ${req.cmdSN}) delivered but not answered`);
      if (req.rejects !== 'any' && req.rejects.length > 0) {
        this.fail(`${req.kind} ITT ${req.itt.toString(16)} should have been rejected (${req.rejects.map((x) => `0x${x.toString(16)}`).join(' or ')})`);
      }
    }
    for (const s of this.sent) {
      if (s.mustReject && !s.rejected) {
        this.fail(`op 0x${(s.bhs[0]! & 0x3f).toString(16)} itt ${s.bhs.readUInt32BE(16).toString(16)} should have been rejected (${s.rejects === 'any' ? 'any' : s.rejects.map((x) => `0x${x.toString(16)}`).join(' or ')})`);
      }
    }
    const r2 = await this.pump(() => this.mustAnswer().length === 0, HANG_MS);
    if (r2 === 'closed') return this.onClosed();
    if (r2 === 'timeout') this.fail(`hang: no answer within ${HANG_MS} ms for\n    ${this.mustAnswer().join('\n    ')}`);
    this.checkDevices('after the step');
  }

  private checkDevices(when: string): void {
    const fx = this.fx;
    if (!fx.ro.data.equals(fx.roImage)) this.fail(`read-only LUN 1 changed (${when})`);
    if (!fx.rw.data.equals(fx.shadow)) {
      const at = firstDifference(fx.rw.data, fx.shadow);
      this.fail(`LUN 0 differs from what acknowledged commands wrote (${when}), first at byte ${at} (block ${Math.floor(at / BLOCK)})`);
    }
  }

  /**
   * The connection ended. A command it was executing may have reached the disk without its status
   * reaching us (SAM: its outcome is unknown); accept the disk with or without each such write.
   */
  private onClosed(): void {
    this.ended = true;
    for (const t of this.tasks.values()) {
      if (t.state !== 'delivered' || t.lun !== 0 || t.withheld || t.poison !== undefined) continue;
      if (this.fx.rw.data.equals(this.fx.shadow)) break;
      const candidate = Buffer.from(this.fx.shadow);
      if (applyGood(candidate, t.cdb, t.write && t.edtl > 0 ? t.payload : undefined) === 'applied' && candidate.equals(this.fx.rw.data)) {
        candidate.copy(this.fx.shadow);
        count(this.fx, 'unacknowledged write found on disk after close');
      }
    }
    this.checkDevices('after the connection closed');
  }

  // -------------------------------------------------------------------------------- steps

  async runStep(step: number): Promise<void> {
    this.step = step;
    const rng = this.rng;
    const kind = rng.weighted<string>([
      [26, 'scsi'],
      [30, 'io'],
      [5, 'nop'],
      [7, 'tmf'],
      [6, 'text'],
      [2, 'logout'],
      [3, 'stray-data-out'],
      [2, 'snack'],
      [2, 'login'],
      [3, 'unsupported-opcode'],
      [8, 'random-bhs'],
      [1, 'oversize'],
      [1, 'truncated'],
      [1, 'short-dsl'],
      [this.p.digests ? 2 : 0, 'bad-data-digest'],
      [this.p.digests ? 1 : 0, 'bad-header-digest'],
    ]);
    count(this.fx, `step: ${kind}`);
    switch (kind) {
      case 'scsi':
        this.scsiCommand();
        break;
      case 'io':
        this.scsiCommand(this.ioPlan());
        break;
      case 'nop':
        this.nop();
        break;
      case 'tmf':
        this.tmf();
        break;
      case 'text':
        await this.text();
        break;
      case 'logout':
        this.logout();
        break;
      case 'stray-data-out': {
        // Data-Out for a task the target does not know: discarded.
        const itt = this.freshItt();
        const bhs = encodeDataOut({ final: rng.chance(0.5), lun: 0, itt, ttt: rng.chance(0.5) ? RESERVED_TAG : rng.u32(), expStatSN: this.nextStatSN, dataSN: rng.int(4), bufferOffset: rng.int(8192) });
        this.c.send(bhs, rng.bytes(rng.int(700)));
        this.record(bhs, 'any');
        this.trace.add(`-> stray Data-Out itt=${itt.toString(16)}`);
        break;
      }
      case 'snack': {
        // §11.16: SNACK needs ErrorRecoveryLevel > 0; at ERL 0 it is a protocol error.
        const bhs = encodeSnack({ type: rng.int(16), lun: 0, itt: rng.u32(), ttt: rng.u32(), expStatSN: this.nextStatSN, begRun: rng.u32(), runLength: rng.u32() });
        this.c.send(bhs);
        this.record(bhs, [RejectReason.ProtocolError]);
        this.trace.add('-> SNACK');
        break;
      }
      case 'login': {
        // A Login Request in full feature phase (§6.3): protocol error.
        const bhs = encodeLoginRequest(loginFields(rng, { itt: this.freshItt() }));
        this.c.send(bhs, encodeText(LEADING.map(([key, value]) => ({ key, value }))));
        this.record(bhs, [RejectReason.ProtocolError]);
        this.trace.add('-> Login Request in full feature phase');
        break;
      }
      case 'unsupported-opcode': {
        // Reserved initiator opcodes, vendor-specific ones and target opcodes: Command not supported.
        const op = rng.pick([0x07, 0x08, 0x0f, 0x11, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f, ...TARGET_OPCODES]);
        const bhs = rng.bytes(BHS_LENGTH);
        bhs[0] = (rng.chance(0.5) ? 0x40 : 0) | op;
        this.c.send(bhs, rng.chance(0.3) ? rng.bytes(rng.int(200)) : undefined);
        this.record(bhs, [RejectReason.CommandNotSupported]);
        this.trace.add(`-> opcode 0x${op.toString(16)}`);
        break;
      }
      case 'random-bhs':
        this.randomBhs();
        break;
      case 'oversize': {
        // DataSegmentLength beyond what the target declared (§13.12): Reject (protocol error), close.
        if (this.p.digests) break;
        const bhs = encodeNopOut({ immediate: true, lun: 0, itt: this.freshItt(), ttt: RESERVED_TAG, cmdSN: this.exp, expStatSN: this.nextStatSN });
        const dsl = rng.range(this.p.targetMrdsl + 1, 0xffffff);
        bhs[5] = (dsl >>> 16) & 0xff;
        bhs[6] = (dsl >>> 8) & 0xff;
        bhs[7] = dsl & 0xff;
        this.sendRaw(bhs);
        this.record(bhs, [RejectReason.ProtocolError]);
        this.trace.add(`-> NOP-Out claiming ${dsl} data bytes`);
        await this.expectClose();
        break;
      }
      case 'truncated': {
        // A PDU cut short: the target waits for the rest; we end the stream.
        if (this.p.digests) break;
        const enc = encodeScsiCommand({ immediate: true, final: true, read: true, write: false, taskAttribute: 1, lun: 0, itt: this.freshItt(), expectedDataLength: 512, cmdSN: this.exp, expStatSN: this.nextStatSN, cdb: read10(0, 1) });
        const dsl = rng.range(1, 4096);
        enc.bhs[5] = (dsl >>> 16) & 0xff;
        enc.bhs[6] = (dsl >>> 8) & 0xff;
        enc.bhs[7] = dsl & 0xff;
        const whole = frame(enc.bhs, Buffer.alloc(0), rng.bytes(dsl));
        this.sendRaw(whole.subarray(0, rng.int(whole.length)));
        this.trace.add(`-> truncated PDU (${dsl} data bytes announced), then FIN`);
        this.ended = true;
        await endAndWait(this.c, this.trace, (p) => this.handle(p));
        this.onClosed();
        break;
      }
      case 'short-dsl': {
        // DataSegmentLength smaller than what follows: the rest is parsed as the next BHS.
        if (this.p.digests) break;
        const itt = this.freshItt();
        const bhs = encodeNopOut({ immediate: true, lun: 0, itt, ttt: RESERVED_TAG, cmdSN: this.exp, expStatSN: this.nextStatSN });
        const k = rng.range(0, 16) * 4;
        bhs[7] = k;
        const next = this.randomBhsBytes();
        this.sendRaw(Buffer.concat([bhs, rng.bytes(k), next.bhs]));
        this.requests.set(itt, { kind: 'nop', itt, bhs: Buffer.from(bhs), immediate: true, cmdSN: this.exp, ordered: false, rejects: [], replyExpected: true, state: 'delivered' });
        this.afterRandomBhs(next);
        this.trace.add(`-> NOP-Out with ${k} data bytes followed by a ${next.desc}`);
        break;
      }
      case 'bad-data-digest': {
        // §7.8 / §11.17.1: a data digest error is rejected (reason 0x02) and the PDU discarded.
        const itt = this.freshItt();
        const bhs = encodeNopOut({ immediate: true, lun: 0, itt, ttt: RESERVED_TAG, cmdSN: this.exp, expStatSN: this.nextStatSN });
        const data = rng.bytes(rng.range(1, 300));
        bhs[5] = 0;
        bhs[6] = (data.length >>> 8) & 0xff;
        bhs[7] = data.length & 0xff;
        this.sendRaw(digestFrame(bhs, data, false, true));
        this.record(bhs, [RejectReason.DataDigestError]);
        this.trace.add(`-> NOP-Out with a wrong data digest`);
        break;
      }
      case 'bad-header-digest': {
        // A header digest error loses framing: the target must close (§7.8).
        const bhs = encodeNopOut({ immediate: true, lun: 0, itt: this.freshItt(), ttt: RESERVED_TAG, cmdSN: this.exp, expStatSN: this.nextStatSN });
        this.sendRaw(digestFrame(bhs, Buffer.alloc(0), true, false));
        this.record(bhs, 'any');
        this.trace.add('-> NOP-Out with a wrong header digest');
        await this.expectClose();
        break;
      }
      default:
        break;
    }
    if (!this.closed) await this.settle();
  }

  private async expectClose(): Promise<void> {
    const r = await this.pump(() => false, HANG_MS);
    if (r !== 'closed') this.fail('the target did not close the connection after a fatal framing error');
    this.onClosed();
  }

  private nop(): void {
    const rng = this.rng;
    const replyWanted = rng.chance(0.85);
    const itt = replyWanted ? this.freshItt() : RESERVED_TAG;
    const immediate = !replyWanted || rng.chance(0.5);
    const cmdSN = immediate ? this.exp : this.chooseCmdSN(true);
    const data = rng.chance(0.5) ? rng.bytes(rng.int(Math.min(4096, this.p.targetMrdsl))) : undefined;
    const bhs = encodeNopOut({ immediate, lun: rng.int(3), itt, ttt: RESERVED_TAG, cmdSN, expStatSN: this.nextStatSN });
    this.sendRequest('nop', bhs, data, {
      rejects: [],
      replyExpected: replyWanted,
      ordered: replyWanted,
      onReply: (p) => {
        // §11.19: the ping data comes back (cut to what we receive).
        const echo = (data ?? Buffer.alloc(0)).subarray(0, this.p.ourMrdsl);
        if (!p.data.equals(echo)) this.fail('NOP-In did not echo the ping data');
        if (p.bhs.readUInt32BE(20) !== RESERVED_TAG) this.fail('NOP-In answering a ping with a TTT');
      },
    });
  }

  private tmf(): void {
    const rng = this.rng;
    const open = this.openTasks();
    const fn = rng.weighted<number>([
      [35, 1],
      [8, 2],
      [8, 4],
      [10, 5],
      [6, 6],
      [4, 3],
      [4, 7],
      [4, 8],
      [6, rng.int(128)],
    ]);
    const victim = open.length > 0 && rng.chance(0.7) ? rng.pick(open) : undefined;
    const lunBytes = victim && rng.chance(0.85) ? victim.lunBytes : this.lunField();
    const immediate = rng.chance(0.8);
    const cmdSN = immediate ? this.exp : this.chooseCmdSN(false);
    const bhs = encodeTaskManagementRequest({
      immediate,
      function: fn,
      lun: 0,
      itt: this.freshItt(),
      referencedTaskTag: victim ? victim.itt : rng.u32(),
      cmdSN,
      expStatSN: this.nextStatSN,
      refCmdSN: victim && rng.chance(0.8) ? victim.cmdSN : rng.u32(),
      expDataSN: 0,
    });
    lunBytes.copy(bhs, 8);
    this.sendRequest('tmf', bhs, undefined, { rejects: [], replyExpected: true, ordered: true, onReply: (p) => this.onTmfResponse(bhs, p) });
  }

  /** RFC 7143 §11.5.1 / §11.6.1: what each function must answer, and the tasks it ends. */
  private onTmfResponse(request: Buffer, p: Pdu): void {
    const f = decodeTaskManagementRequest(request);
    const response = p.bhs[2]!;
    const open = this.openTasks();
    const lunPresent = f.lun === 0 || f.lun === 1;
    let allowed: number[];
    let ended: FuzzTask[] = [];
    switch (f.function) {
      case 1: {
        const t = this.tasks.get(f.referencedTaskTag);
        const isOpen = t !== undefined && (t.state === 'held' || t.state === 'delivered');
        if (isOpen && t.lun === f.lun) {
          allowed = [0];
          ended = [t];
        } else allowed = isOpen ? [1] : [0, 1];
        if (!isOpen && response === 0) {
          // §11.5.1: a command never received is taken as received (its CmdSN no longer awaited).
          const d = serialDiff(f.refCmdSN, this.exp);
          if (d >= 0 && !this.heldSlots.has(f.refCmdSN)) this.heldSlots.set(f.refCmdSN, 'placeholder');
        }
        break;
      }
      case 2:
      case 4:
      case 5:
        allowed = lunPresent ? [0] : [2];
        ended = lunPresent ? open.filter((t) => t.lun === f.lun) : [];
        break;
      case 6:
        allowed = [0];
        ended = open;
        break;
      case 8:
        allowed = [4]; // task reassignment needs ERL 2
        break;
      default:
        allowed = [5]; // CLEAR ACA, TARGET COLD RESET, reserved functions: not supported
    }
    if (!allowed.includes(response)) this.fail(`TMF function ${f.function} (lun ${f.lun}, rtt ${f.referencedTaskTag.toString(16)}) answered ${response}, expected ${allowed.join(' or ')}`);
    count(this.fx, `tmf ${f.function} → ${response}`);
    if (response !== 0) return;
    for (const t of ended) {
      t.state = 'aborted';
      if (this.heldSlots.get(t.cmdSN) === t) this.heldSlots.set(t.cmdSN, 'placeholder');
    }
  }

  /** A Text Request (§11.10) with random keys, sometimes continued over PDUs with the C bit. */
  private async text(): Promise<void> {
    const rng = this.rng;
    const base: Array<readonly [string, string]> = [];
    if (rng.chance(0.4)) base.push(['SendTargets', rng.pick(['All', '', IQN, 'iqn.2026-12.test:nope'])]);
    let newMrdsl: number | undefined;
    if (rng.chance(0.2)) {
      newMrdsl = rng.range(512, 65536);
      base.push(['MaxRecvDataSegmentLength', String(newMrdsl)]);
    }
    const text = fuzzText(rng, base, { allowHuge: false });
    const flawItt = rng.chance(0.03);
    const flawTtt = !flawItt && rng.chance(0.03);
    const itt = flawItt ? RESERVED_TAG : this.freshItt();
    const pieces: Buffer[] = [];
    if (rng.chance(0.25) && text.bytes.length > 1) {
      const cut = rng.range(1, text.bytes.length - 1);
      pieces.push(text.bytes.subarray(0, cut), text.bytes.subarray(cut));
    } else pieces.push(text.bytes);
    let ttt = flawTtt ? (rng.u32() & 0x7fffffff) >>> 0 : RESERVED_TAG;
    for (let i = 0; i < pieces.length; i++) {
      const last = i === pieces.length - 1;
      const immediate = rng.chance(0.5);
      const cmdSN = immediate ? this.exp : i === 0 ? this.chooseCmdSN(false) : this.exp;
      const bhs = encodeTextRequest({ immediate, final: last, continue: !last, lun: 0, itt, ttt, cmdSN, expStatSN: this.nextStatSN });
      let reply: Pdu | undefined;
      const rejects: RejectReason[] = flawItt || flawTtt ? [RejectReason.InvalidPduField] : last && text.structuralFlaw ? [RejectReason.ProtocolError] : [];
      const req = this.sendRequest('text', bhs, pieces[i], { rejects, replyExpected: rejects.length === 0, ordered: itt !== RESERVED_TAG, onReply: (p) => (reply = p) });
      if (flawItt) this.record(bhs, [RejectReason.InvalidPduField]);
      if (req.state !== 'delivered' || rejects.length > 0) return;
      const r = await this.pump(() => req.state !== 'delivered', HANG_MS);
      if (r === 'closed') return this.onClosed();
      if (r === 'timeout') this.fail('Text Request not answered');
      if ((req.state as FuzzRequest['state']) === 'rejected') return;
      const f = decodeTextResponse(reply!.bhs);
      if (f.final && f.continue) this.fail('Text Response with both F and C (§11.11.2)');
      if (!last) {
        // §11.11.4: more to do for this ITT → F=0 and a TTT, which the next request copies (§11.10.4).
        if (f.final || f.ttt === RESERVED_TAG) this.fail('a continued Text Request was answered with F=1 or without a TTT');
        if (f.continue) this.fail('the empty answer to a continued Text Request has C=1 (§11.11.2: C=1 means the response text continues)');
        if (reply!.data.length !== 0) this.fail('text in the answer to a continued Text Request');
        ttt = f.ttt;
        continue;
      }
      // The last piece: the answers, possibly over several responses (C bit, TTT copied back).
      let body = reply!.data;
      let more = reply!;
      while (!decodeTextResponse(more.bhs).final) {
        const mf = decodeTextResponse(more.bhs);
        if (mf.ttt === RESERVED_TAG) this.fail('Text Response with F=0 and no TTT');
        let next: Pdu | undefined;
        const cont = encodeTextRequest({ immediate: true, final: true, continue: false, lun: 0, itt, ttt: mf.ttt, cmdSN: this.exp, expStatSN: this.nextStatSN });
        const q = this.sendRequest('text', cont, undefined, { rejects: [], replyExpected: true, ordered: true, onReply: (p) => (next = p) });
        const r3 = await this.pump(() => q.state !== 'delivered', HANG_MS);
        if (r3 !== 'ok' || q.state !== 'done') this.fail('continuation of a long Text Response not answered');
        body = Buffer.concat([body, next!.data]);
        more = next!;
      }
      const parsed = parseText(body, true);
      if (!parsed.ok) this.fail(`Text Response does not parse: ${parsed.reason}`);
      const answers = new Map<string, string[]>();
      for (const { key, value } of parsed.pairs) answers.set(key, [...(answers.get(key) ?? []), value]);
      for (const k of text.unknownKeys) {
        if (answers.get(k)?.[0] !== 'NotUnderstood') this.fail(`Text: unknown key ${k} answered ${String(answers.get(k))}, expected NotUnderstood (§6.2)`);
      }
      for (const k of text.badValueKeys) {
        const a = answers.get(k)?.[0];
        if (a !== 'Reject' && a !== 'NotUnderstood' && a !== 'Irrelevant') this.fail(`Text: ${k} with a bad value answered ${String(a)}`);
      }
      if (newMrdsl !== undefined && !text.structuralFlaw) this.p.ourMrdsl = newMrdsl; // declarative, in force now (§13.12)
      count(this.fx, `text answered (${pieces.length} piece(s))`);
    }
  }

  private logout(): void {
    const rng = this.rng;
    const reason = rng.weighted<number>([
      [40, 0],
      [20, 1],
      [15, 2],
      [25, rng.range(3, 127)],
    ]);
    const cid = reason === 1 && rng.chance(0.5) ? rng.range(1, 65535) : 0;
    const immediate = rng.chance(0.6);
    const cmdSN = immediate ? this.exp : this.chooseCmdSN(false);
    const bhs = encodeLogoutRequest({ immediate, reason, itt: this.freshItt(), cid, cmdSN, expStatSN: this.nextStatSN });
    // §11.14 / §11.15.1: close session / connection → 0 and close; unknown CID → 1; recovery → 2
    // (ERL 0); reserved reasons → Reject (invalid PDU field).
    const expected = reason === 0 || (reason === 1 && cid === 0) ? 0 : reason === 1 ? 1 : reason === 2 ? 2 : undefined;
    this.sendRequest('logout', bhs, undefined, {
      rejects: expected === undefined ? [RejectReason.InvalidPduField] : [],
      replyExpected: expected !== undefined,
      ordered: true,
      onReply: (p) => {
        if (p.bhs[2] !== expected) this.fail(`Logout reason ${reason} cid ${cid} answered ${p.bhs[2]}, expected ${String(expected)}`);
        if (expected === 0) {
          for (const t of this.openTasks()) t.state = 'aborted';
        }
      },
    });
  }

  private randomBhsBytes(): { bhs: Buffer; desc: string; op: number } {
    const rng = this.rng;
    const bhs = rng.bytes(BHS_LENGTH);
    // Every initiator opcode but SCSI Command (whose random variants are the 'scsi' steps).
    const op = rng.pick([Opcode.NopOut, Opcode.TaskManagementRequest, Opcode.LoginRequest, Opcode.TextRequest, Opcode.DataOut, Opcode.LogoutRequest, Opcode.Snack, 0x0a, 0x1c]);
    bhs[0] = (rng.chance(0.5) ? 0x40 : 0) | (rng.chance(0.1) ? 0x80 : 0) | op;
    bhs[4] = 0;
    bhs.fill(0, 5, 8);
    let itt = rng.u32();
    while (itt === RESERVED_TAG || this.tasks.has(itt) || this.requests.has(itt)) itt = (itt + 1) >>> 0;
    bhs.writeUInt32BE(itt, 16);
    if ((bhs[0]! & 0x40) === 0) bhs.writeUInt32BE(rng.chance(0.8) ? this.exp : (this.exp + 1000 + rng.int(1 << 20)) >>> 0, 24);
    return { bhs, desc: `random BHS op=0x${op.toString(16)} I=${(bhs[0]! >> 6) & 1} flags=0x${bhs[1]!.toString(16)}`, op };
  }

  /** Register what a random BHS may legitimately cause. */
  private afterRandomBhs(x: { bhs: Buffer; op: number }): void {
    const { bhs, op } = x;
    const itt = bhs.readUInt32BE(16);
    const immediate = (bhs[0]! & 0x40) !== 0;
    const cmdSN = bhs.readUInt32BE(24);
    const add = (kind: RequestKind, ordered: boolean, rejects: RejectReason[] | 'any', replyExpected: boolean, onReply?: (p: Pdu) => void): void => {
      let state: FuzzRequest['state'] = ordered && !immediate ? this.classify(cmdSN) : 'delivered';
      if (state === 'held') state = 'ignored'; // randomBhsBytes never makes gaps
      if (ordered && !immediate && state === 'delivered') this.advanceLocal();
      this.requests.set(itt, { kind, itt, bhs: Buffer.from(bhs), immediate, cmdSN, ordered, rejects, replyExpected: replyExpected && state === 'delivered', state, ...(onReply ? { onReply } : {}) });
    };
    switch (op) {
      case Opcode.NopOut:
        add('other', true, 'any', false);
        break;
      case Opcode.TaskManagementRequest:
        add('other', true, 'any', true, (p) => this.onTmfResponse(bhs, p));
        break;
      case Opcode.TextRequest:
        add('other', true, 'any', false);
        break;
      case Opcode.LogoutRequest:
        add('other', true, 'any', false, (p) => {
          if (p.bhs[2] === 0) for (const t of this.openTasks()) t.state = 'aborted';
        });
        break;
      case Opcode.LoginRequest:
      case Opcode.Snack:
        this.record(bhs, [RejectReason.ProtocolError]);
        break;
      case Opcode.DataOut:
        this.record(bhs, 'any');
        break;
      default:
        this.record(bhs, [RejectReason.CommandNotSupported]);
    }
  }

  private randomBhs(): void {
    const x = this.randomBhsBytes();
    this.c.send(x.bhs);
    this.trace.add(`-> ${x.desc}`);
    this.afterRandomBhs(x);
  }

  /** End the connection (logout or abrupt) and check the devices. */
  async close(): Promise<void> {
    if (!this.closed) {
      if (this.rng.chance(0.5)) {
        const bhs = encodeLogoutRequest({ immediate: true, reason: 0, itt: this.freshItt(), cid: 0, cmdSN: this.exp, expStatSN: this.nextStatSN });
        this.sendRequest('logout', bhs, undefined, { rejects: [], replyExpected: true, ordered: false });
        const r = await this.pump(() => false, HANG_MS);
        if (r !== 'closed') this.fail('no close after a logout');
      } else {
        this.c.close();
        await this.c.closed;
      }
      this.onClosed();
    }
    this.c.close();
  }
}

function digestFrame(bhs: Buffer, data: Buffer, corruptHeader: boolean, corruptData: boolean): Buffer {
  const hd = Buffer.alloc(4);
  writeDigest(hd, 0, (crc32c(bhs) ^ (corruptHeader ? 0x1 : 0)) >>> 0);
  if (data.length === 0) return Buffer.concat([bhs, hd]);
  const padded = Buffer.concat([data, Buffer.alloc(padLength(data.length))]);
  const dd = Buffer.alloc(4);
  writeDigest(dd, 0, (crc32c(padded) ^ (corruptData ? 0x80 : 0)) >>> 0);
  return Buffer.concat([bhs, hd, padded, dd]);
}

/** Bytes the CDB asks to move, for structured CDBs (else undefined). */
function expectedTransfer(cdb: Buffer): number | undefined {
  const op = cdb[0]!;
  const lb = lbaAndBlocks(cdb);
  if (lb && (READ_OPS.has(op) || WRITE_OPS.has(op) || op === 0x8b)) return lb.blocks * BLOCK;
  if (op === 0x41 || op === 0x93) return BLOCK;
  if (op === 0x89) return 2 * cdb[13]! * BLOCK;
  if (op === 0x12) return cdb.readUInt16BE(3);
  if (op === 0x1a || op === 0x03 || op === 0x15) return cdb[4]!;
  if (op === 0x5a || op === 0x55 || op === 0x42 || op === 0x5e) return cdb.readUInt16BE(7);
  if (op === 0xa0) return cdb.readUInt32BE(6);
  if (op === 0x9e || op === 0x83 || op === 0x84) return cdb.readUInt32BE(10);
  if (op === 0x5f) return cdb.readUInt32BE(5);
  return undefined;
}

/** A random CDB: table opcodes with plausible fields, random opcodes, random bytes, extended lengths. */
function randomCdb(rng: Rng): Buffer {
  const length = rng.chance(0.9) ? 16 : rng.range(17, 64);
  const cdb = rng.chance(0.3) ? rng.bytes(length) : Buffer.alloc(length);
  const op = rng.weighted<number>([
    [55, rng.pick(TABLE_OPCODES)],
    [25, rng.int(256)],
    [20, rng.pick(INTERESTING_OPCODES)],
  ]);
  cdb[0] = op;
  const sas = SERVICE_ACTIONS.get(op);
  if (sas) cdb[1] = (cdb[1]! & 0xe0) | (rng.chance(0.8) ? rng.pick(sas) : rng.int(32));
  if (!rng.chance(0.65)) return cdb;
  // Plausible fields: small LBAs around the end of the LUNs, short lengths, few flag bits.
  if (!sas) cdb[1] = rng.chance(0.7) ? 0 : rng.pick([0x08, 0x02, 0x10, 0x01, 0x04]);
  for (let i = 2; i < Math.min(16, length); i++) if (rng.chance(0.7)) cdb[i] = 0;
  const lba = rng.chance(0.85) ? rng.int(RW_BLOCKS + 8) : rng.u32();
  const blocks = rng.chance(0.85) ? rng.int(17) : rng.u32() & 0xffff;
  switch (LBA_LAYOUTS.get(op)) {
    case 'cdb6':
      cdb[1] = (lba >>> 16) & 0x1f;
      cdb.writeUInt16BE(lba & 0xffff, 2);
      cdb[4] = blocks & 0xff;
      return cdb;
    case 'cdb10':
      cdb.writeUInt32BE(lba >>> 0, 2);
      cdb.writeUInt16BE(blocks & 0xffff, 7);
      return cdb;
    case 'cdb12':
      cdb.writeUInt32BE(lba >>> 0, 2);
      cdb.writeUInt32BE(blocks >>> 0, 6);
      return cdb;
    case 'cdb16':
      cdb.writeUInt32BE(0, 2);
      cdb.writeUInt32BE(lba >>> 0, 6);
      cdb.writeUInt32BE(blocks >>> 0, 10);
      return cdb;
  }
  switch (op) {
    case 0x89:
      cdb.writeUInt32BE(0, 2);
      cdb.writeUInt32BE(lba >>> 0, 6);
      cdb[13] = rng.chance(0.8) ? rng.int(5) : rng.int(256);
      break;
    case 0x12:
      cdb[1] = rng.int(2);
      cdb[2] = cdb[1] ? rng.pick([0x00, 0x80, 0x83, 0x86, 0xb0, 0xb1, 0xb2, 0x8f, rng.int(256)]) : 0;
      cdb.writeUInt16BE(rng.pick([36, 96, 255, 4096, rng.int(65536)]), 3);
      break;
    case 0x9e:
      cdb.writeUInt32BE(rng.pick([32, 8, 4096, rng.int(65536)]), 10);
      break;
    case 0xa0:
      cdb.writeUInt32BE(rng.pick([16, 4096, rng.int(65536)]), 6);
      break;
    case 0x42:
      cdb.writeUInt16BE(rng.pick([0, 8, 24, 40, rng.int(600)]), 7);
      break;
    case 0x5f:
      cdb.writeUInt32BE(rng.pick([24, 0, rng.int(64)]), 5);
      break;
    case 0x83:
      cdb.writeUInt32BE(rng.pick([0, 16, 64, rng.int(1024)]), 10);
      break;
    case 0x15:
    case 0x1a:
    case 0x03:
      cdb[4] = rng.int(256);
      if (op === 0x15) cdb[1] = rng.pick([0x10, 0x00, 0x11]);
      break;
    case 0x55:
    case 0x5a:
      cdb.writeUInt16BE(rng.int(300), 7);
      if (op === 0x55) cdb[1] = rng.pick([0x10, 0x00]);
      break;
    default:
      break;
  }
  return cdb;
}

/** An AHS with plausible headers but lengths or types that may be wrong. */
function randomAhs(rng: Rng): Buffer {
  const words = rng.range(1, 6);
  const ahs = Buffer.alloc(words * 4);
  const len = rng.pick([0, 1, 5, words * 4 - 3, words * 4 - 2, words * 4, 0xffff, rng.int(40)]);
  ahs.writeUInt16BE(len & 0xffff, 0);
  ahs[2] = rng.pick([1, 2, 0, 3, 0x40, 0xff]);
  rng.bytes(ahs.length - 4).copy(ahs, 4);
  return ahs;
}

// ---------------------------------------------------------------------------------------------
// The tests.

describe(`seeded fuzz of the iSCSI target (seed ${SEED}; BOOTRESTORE_FUZZ_SEED overrides)`, () => {
  it('before and during login: random BHS bytes, bad lengths, garbage text keys → login status or close, never a crash', async () => {
    const rng = new Rng(SEED ^ 0x1091);
    const fx = await startFixture(SEED);
    const t0 = Date.now();
    try {
      for (let i = 0; i < LOGIN_CONNECTIONS; i++) {
        const where = `login connection ${i}`;
        await fuzzLoginConnection(fx, rng.fork(), where);
        await healthCheck(fx, rng.fork(), where);
      }
    } finally {
      await fx.server.stop();
    }
    console.log(`[fuzz] login phase: ${LOGIN_CONNECTIONS} connections in ${Date.now() - t0} ms`, Object.fromEntries([...fx.stats].sort()));
    expect(fx.stats.get('health checks passed')).toBe(LOGIN_CONNECTIONS);
    expect(processFaults).toEqual([]);
    expect(fx.errorLogs).toEqual([]);
  }, 60_000);

  it('full feature phase: random PDUs of every opcode, random CDBs / flags / lengths / AHS / LUNs → Reject or right sense, no hang, no corruption', async () => {
    const rng = new Rng(SEED ^ 0xffe0);
    const fx = await startFixture(SEED ^ 1);
    const t0 = Date.now();
    let steps = 0;
    try {
      for (let i = 0; i < FFP_CONNECTIONS; i++) {
        const where = `full-feature connection ${i}`;
        const fz = await FfpFuzzer.open(fx, rng.fork(), where);
        for (let s = 0; s < FFP_STEPS_PER_CONNECTION && !fz.closed; s++) {
          await fz.runStep(s);
          steps++;
        }
        await fz.close();
        await healthCheck(fx, rng.fork(), where);
      }
    } finally {
      await fx.server.stop();
    }
    console.log(`[fuzz] full feature phase: ${FFP_CONNECTIONS} connections, ${steps} steps in ${Date.now() - t0} ms`, Object.fromEntries([...fx.stats].sort()));
    expect(fx.stats.get('health checks passed')).toBe(FFP_CONNECTIONS);
    expect(fx.stats.get('writes applied') ?? 0).toBeGreaterThan(0);
    expect(processFaults).toEqual([]);
    expect(fx.errorLogs).toEqual([]);
  }, 60_000);
});

// ---------------------------------------------------------------------------------------------
// Minimal deterministic reproductions of defects the fuzz found (each fixed in src/iscsi).

describe('defects found by the fuzz', () => {
  it('a Login Response never carries a key twice, even when the initiator sends a key the target declares (RFC 7143 §6.2)', async () => {
    const fx = await startFixture(5);
    try {
      for (const extra of [{ MaxRecvDataSegmentLength: '511' }, { TargetPortalGroupTag: '7' }]) {
        const c = await RawInitiator.connect(fx.port);
        c.send(
          encodeLoginRequest(loginFields(new Rng(5), { itt: 1, cmdSN: 1, expStatSN: 0 })),
          encodeText([...LEADING, ...Object.entries(extra)].map(([key, value]) => ({ key, value }))),
        );
        const p = await c.expectPdu(Opcode.LoginResponse);
        expect(decodeLoginResponse(p.bhs).statusClass).toBe(0);
        const parsed = parseText(p.data); // the target's own parser: a repeated key is malformed text
        expect(parsed.ok, `${JSON.stringify(extra)} → ${p.data.toString('latin1').replace(/\0/g, ' ')}`).toBe(true);
        const keys = parsed.ok ? Object.fromEntries(parsed.pairs.map((x) => [x.key, x.value])) : {};
        // The target's own declarations are what the initiator needs (§13.9, §13.12).
        expect(keys.TargetPortalGroupTag).toBe('1');
        expect(keys.MaxRecvDataSegmentLength).toBe('262144');
        c.close();
        await c.closed;
      }
    } finally {
      await fx.server.stop();
    }
  });

  /** An immediate Text Request; `more` sets C and clears F (§11.10.2). */
  function sendText(c: RawInitiator, itt: number, ttt: number, more: boolean, data: Buffer): void {
    c.send(encodeTextRequest({ immediate: true, final: !more, continue: more, lun: 0, itt, ttt, cmdSN: c.cmdSN, expStatSN: c.expStatSN }), data);
  }

  /** A new one-PDU Text Request on `itt` is answered (an unknown X- key: NotUnderstood). */
  async function expectFreshTextAnswered(c: RawInitiator, itt: number): Promise<void> {
    sendText(c, itt, RESERVED_TAG, false, Buffer.from('X-fresh=1\0'));
    const fresh = parseText((await c.expectPdu(Opcode.TextResponse)).data);
    expect(fresh.ok && fresh.pairs).toEqual([{ key: 'X-fresh', value: 'NotUnderstood' }]);
  }

  /** A fixture seeded with `seed` and a logged-in connection to it, both closed after `body`. */
  async function withSession(seed: number, keys: Record<string, string>, body: (c: RawInitiator, fx: Fixture) => Promise<void>): Promise<void> {
    const fx = await startFixture(seed);
    const c = await loggedIn(fx, keys);
    try {
      await body(c, fx);
    } finally {
      c.close();
      await fx.server.stop();
    }
  }

  async function loggedIn(fx: Fixture, keys: Record<string, string> = {}): Promise<RawInitiator> {
    const c = await RawInitiator.connect(fx.port);
    const r = await c.login({ initiatorName: INITIATOR, target: IQN, isid: ISID, keys });
    expect(r.statusClass).toBe(0);
    c.scsi(Buffer.alloc(6)); // TEST UNIT READY: takes the new nexus's POWER ON unit attention
    expect(decodeScsiResponse((await c.expectPdu(Opcode.ScsiResponse)).bhs).status).toBe(0x02);
    return c;
  }

  it('a Text Request continued with the C bit: the next part copies the TTT and is answered; a reserved TTT starts over (RFC 7143 §11.10.4)', async () => {
    await withSession(1, {}, async (c) => {
      const textRequest = (itt: number, ttt: number, more: boolean, text: string): void => sendText(c, itt, ttt, more, Buffer.from(text));
      // "SendTargets=All" split over two PDUs.
      textRequest(10, RESERVED_TAG, true, 'SendTarg');
      const ack = decodeTextResponse((await c.expectPdu(Opcode.TextResponse)).bhs);
      // An empty answer with F=0 and a TTT to copy (§11.11.4); C=0: no text of the target follows (§11.11.2).
      expect({ final: ack.final, continue: ack.continue }).toEqual({ final: false, continue: false });
      expect(ack.ttt).not.toBe(RESERVED_TAG);
      textRequest(10, ack.ttt, false, 'ets=All\0');
      const answer = await c.next(HANG_MS);
      expect(answer && answer.bhs[0]! & 0x3f).toBe(Opcode.TextResponse);
      const parsed = parseText(answer!.data, true);
      expect(parsed.ok && parsed.pairs[0]).toEqual({ key: 'TargetName', value: IQN });
      // A reserved TTT is a new request: the target forgets the unfinished text of that ITT.
      textRequest(11, RESERVED_TAG, true, 'X-stale');
      await c.expectPdu(Opcode.TextResponse);
      await expectFreshTextAnswered(c, 11);
    });
  });

  it('a continued Text Request buffers at most 1 MiB: beyond it the PDU is rejected (0x0a), the exchange dropped, the connection goes on', async () => {
    await withSession(3, {}, async (c) => {
      const part = Buffer.alloc(128 * 1024, 'a'.charCodeAt(0)); // one long value, 128 KiB per PDU
      let ttt = RESERVED_TAG;
      let rejected: number | undefined;
      for (let i = 0; i < 12 && rejected === undefined; i++) {
        sendText(c, 20, ttt, true, i === 0 ? Buffer.concat([Buffer.from('X-long='), part]) : part);
        const reply = await c.next(HANG_MS);
        expect(reply).toBeDefined();
        if ((reply!.bhs[0]! & 0x3f) === Opcode.Reject) rejected = i;
        else ttt = decodeTextResponse(reply!.bhs).ttt;
      }
      // 8 parts (1 MiB + 7 bytes) are one byte too many: the 8th is rejected as beyond our resources.
      expect(rejected).toBe(7);
      // Continuing the dropped exchange is no longer possible; a new request is answered.
      sendText(c, 20, ttt, false, Buffer.from('X-more=1\0'));
      expect(decodeReject((await c.expectPdu(Opcode.Reject)).bhs).reason).toBe(0x09);
      await expectFreshTextAnswered(c, 21);
    });
  });

  it('a write too large to buffer, sent with immediate data, is refused in CmdSN order: its CmdSN is consumed and later commands run (RFC 7143 §3.2.2.1)', async () => {
    await withSession(2, { ImmediateData: 'Yes' }, async (c, fx) => {
      const huge = 128 * 1024 * 1024 + 512; // above what the transport assembles for one command
      // Out of the window first: silently ignored, no CHECK CONDITION (the barrier's NOP-In comes first).
      c.scsi(write10(0, 8), { write: huge, data: Buffer.alloc(512, 1), cmdSN: c.cmdSN + 5000 });
      c.send(encodeNopOut({ immediate: true, lun: 0, itt: 0x5000, ttt: RESERVED_TAG, cmdSN: c.cmdSN, expStatSN: c.expStatSN }));
      expect(decodeSequence((await c.expectPdu(Opcode.NopIn)).bhs).expCmdSN).toBe(c.cmdSN);
      // In the window: refused with INVALID FIELD IN CDB, and its CmdSN counts as received.
      const cmdSN = c.cmdSN;
      c.scsi(write10(0, 8), { write: huge, data: Buffer.alloc(512, 1) });
      const refused = await c.expectPdu(Opcode.ScsiResponse);
      expect(decodeScsiResponse(refused.bhs).status).toBe(0x02);
      expect(parseSense(refused.data.subarray(2))).toMatchObject({ key: 0x05, asc: 0x24, ascq: 0x00 });
      expect(decodeScsiResponse(refused.bhs).expCmdSN).toBe(cmdSN + 1);
      // The next command (CmdSN + 1) is not held behind a CmdSN that never comes.
      c.scsi(Buffer.alloc(6)); // TEST UNIT READY
      const tur = await c.next(HANG_MS);
      expect(tur && tur.bhs[0]! & 0x3f).toBe(Opcode.ScsiResponse);
      expect(fx.rw.data.equals(fx.shadow)).toBe(true);
    });
  });

  /** WRITE(10) of `blocks` blocks at LBA 0 without immediate data; resolves with its R2T. */
  async function writeAwaitingR2T(c: RawInitiator, blocks: number): Promise<{ itt: number; ttt: number; offset: number; length: number }> {
    const itt = c.scsi(write10(0, blocks), { write: blocks * BLOCK });
    const r = decodeReadyToTransfer((await c.expectPdu(Opcode.ReadyToTransfer)).bhs);
    expect(r.itt).toBe(itt);
    return { itt, ttt: r.ttt, offset: r.bufferOffset, length: r.desiredLength };
  }

  async function expectDataPhaseError(c: RawInitiator): Promise<void> {
    const p = await c.next(HANG_MS);
    expect(p, 'the write must end, not wait for data nobody will send').toBeDefined();
    expect(p!.bhs[0]! & 0x3f).toBe(Opcode.ScsiResponse);
    expect(decodeScsiResponse(p!.bhs).status).toBe(0x02);
    // ABORTED COMMAND / DATA PHASE ERROR, as for a DataSN out of sequence (connection.ts).
    expect(parseSense(p!.data.subarray(2))).toMatchObject({ key: 0x0b, asc: 0x4b, ascq: 0x00 });
  }

  it('a Data-Out sequence ended early by the F bit ends the write with CHECK CONDITION instead of leaving it waiting forever (RFC 7143 §11.7.1)', async () => {
    await withSession(3, { InitialR2T: 'Yes' }, async (c, fx) => {
      const r2t = await writeAwaitingR2T(c, 2);
      expect(r2t).toMatchObject({ offset: 0, length: 1024 });
      // F=1 on the first half: the sequence claims to be complete, 512 bytes are missing.
      c.send(encodeDataOut({ final: true, lun: 0, itt: r2t.itt, ttt: r2t.ttt, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0 }), Buffer.alloc(512, 7));
      await expectDataPhaseError(c);
      expect(fx.rw.data.equals(fx.shadow)).toBe(true);
    });
  });

  it('Data-Out at the wrong offset (overlap or gap) ends the write with CHECK CONDITION, never writes unsent bytes (RFC 7143 §13.18 DataPDUInOrder)', async () => {
    await withSession(4, { InitialR2T: 'No', ImmediateData: 'Yes' }, async (c, fx) => {
      const data = Buffer.alloc(1024, 0xab);
      // Answering an R2T for 1024 bytes: 0..512, then 0..512 again with F: 1024 bytes counted, 512..1024 never sent.
      const r2t = await writeAwaitingR2T(c, 2);
      c.send(encodeDataOut({ final: false, lun: 0, itt: r2t.itt, ttt: r2t.ttt, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 0 }), data.subarray(0, 512));
      c.send(encodeDataOut({ final: true, lun: 0, itt: r2t.itt, ttt: r2t.ttt, expStatSN: c.expStatSN, dataSN: 1, bufferOffset: 0 }), data.subarray(0, 512));
      await expectDataPhaseError(c);
      expect(fx.rw.data.equals(fx.shadow)).toBe(true);
      // Unsolicited data (F=0 on the command) starting at 512 instead of 0: a gap before it.
      const itt = c.scsi(write10(0, 2), { write: 1024, final: false });
      c.send(encodeDataOut({ final: true, lun: 0, itt, ttt: RESERVED_TAG, expStatSN: c.expStatSN, dataSN: 0, bufferOffset: 512 }), data.subarray(512));
      await expectDataPhaseError(c);
      expect(fx.rw.data.equals(fx.shadow)).toBe(true);
    });
  });
});
