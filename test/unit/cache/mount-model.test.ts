/**
 * Model-based randomized test of a mounted restore point: a BackupBlockDevice over a real repository
 * (zero, repeated, compressible and random chunks; a full and an incremental restore point), a tiny
 * shared chunk cache (constant eviction and buffer recycling; one variant preallocated) and a delta,
 * driven through the real SCSI command table and compared after every step with a Buffer of the disk
 * plus a per-4 KiB-unit provisioning model (docs/delta-format.md "Block map").
 *
 * Restarts: the LUN is removed (sometimes with writes still running) and the mount opened again from
 * the same repository and delta, or opened from a copy of the delta files taken at an idle moment (what
 * `kill -9` leaves); the whole disk and its GET LBA STATUS map must then equal the model. READ results
 * are sometimes held unreleased for a few steps (Data-In queued on a slow socket) and must keep their
 * bytes. A third test runs two mounts (full and incremental point) at once on one shared tiny cache.
 * At the end every repository file must be byte-identical (the backup is read-only).
 *
 * Seeded: the seed of each test is printed; BOOTRESTORE_MODEL_SEED=<n> runs every test with n, and
 * BOOTRESTORE_MODEL_STEPS=<n> changes the walk's length (default 500).
 *
 * Concurrency model: SCSI SIMPLE tasks have no order among themselves (SAM-5 8.6), so for a batch of
 * commands with overlapping ranges each block may end up with the data of any one of the writers that
 * cover it, and a concurrent READ of a block may return its content before the batch or that of any
 * of them; the test accepts exactly that, per 512-byte block, and then adopts what the device holds.
 * Batches of non-overlapping commands must give exactly the sequential result. Ranges of a
 * non-overlapping batch that involves UNMAP are kept apart by whole 4 KiB units: where UNMAP and a
 * write share a unit, whether that unit ends *zero* or *present* depends on their order (both read
 * the same), and the provisioning model is exact otherwise.
 */
import { createHash } from 'node:crypto';
import { cp, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupSource } from '../../../src/backup/engine.js';
import { chunkFileBufferSize, openRestorePoint } from '../../../src/backup/reader.js';
import type { SegmentedRead } from '../../../src/block-device.js';
import { BackupBlockDevice, lunBytesForImage } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { DeltaStore } from '../../../src/cache/delta-store.js';
import { ScsiStatus, type Nexus, type ScsiResult } from '../../../src/iscsi/scsi-port.js';
import { parseSense } from '../../../src/iscsi/scsi/sense.js';
import { ScsiTarget } from '../../../src/iscsi/scsi/target.js';
import { silentLogger } from '../../../src/log.js';
import { BufferSource, pseudoRandomBytes } from '../../helpers/buffer-source.js';
import { xorshift32 } from '../../helpers/prng.js';
import { be16, be32, be64, cdb, exec, makeNexus } from '../iscsi/scsi/scsi-test-kit.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 512;
const CHUNK = 64 * KiB;
const CHUNK_BLOCKS = CHUNK / BS;
const UNIT_BLOCKS = 4096 / BS; // the delta's default map unit
/** Not a multiple of 512 (padded last block), of 4 KiB (short last unit) or of the chunk size (short last chunk). */
const IMAGE_SIZE = 6 * MiB + 5 * BS + 300;
const BLOCKS = Math.ceil(IMAGE_SIZE / BS);
const UNITS = Math.ceil(BLOCKS / UNIT_BLOCKS);
const CHUNKS = Math.ceil(IMAGE_SIZE / CHUNK);

const identity = { serial: 'BRMODEL001', naa: Buffer.from('6001405a0b0c0d2f', 'hex'), vendor: 'BOOTREST', product: 'model-test' };

// ---- the repository ------------------------------------------------------------------------------

const REPEATED = pseudoRandomBytes(CHUNK, 4242);

function image1(): Buffer {
  const img = Buffer.alloc(IMAGE_SIZE);
  for (let c = 0; c < CHUNKS; c++) {
    const at = c * CHUNK;
    const len = Math.min(CHUNK, IMAGE_SIZE - at);
    const kind = c === CHUNKS - 1 ? 5 : c % 6;
    if (kind === 0) continue; // zero chunk
    if (kind === 1) REPEATED.copy(img, at, 0, len); // one digest at many indexes
    else if (kind === 2) Buffer.from(`compressible text of chunk ${c % 4}; `.repeat(3000)).copy(img, at, 0, len);
    else if (kind === 3) pseudoRandomBytes(len / 2, 100 + c).copy(img, at + len / 2); // half zero
    else pseudoRandomBytes(len, 200 + c).copy(img, at);
  }
  return img;
}

/** The incremental restore point: some chunks new, some zeroed, some zero chunks filled. */
function image2(first: Buffer): Buffer {
  const img = Buffer.from(first);
  for (let c = 0; c < CHUNKS; c++) {
    const at = c * CHUNK;
    const len = Math.min(CHUNK, IMAGE_SIZE - at);
    if (c % 10 === 0) pseudoRandomBytes(len, 900 + c).copy(img, at);
    else if (c % 10 === 7) img.fill(0, at, at + len);
  }
  pseudoRandomBytes(700, 31).copy(img, IMAGE_SIZE - 700);
  return img;
}

async function hashTree(dir: string): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile()) continue;
    const path = join(entry.parentPath, entry.name);
    out.set(path, createHash('sha256').update(await readFile(path)).digest('hex'));
  }
  return out;
}

// ---- the model -----------------------------------------------------------------------------------

const BASE = 0;
const PRESENT = 1;
const ZERO = 2;

class Model {
  readonly data: Buffer;
  readonly units = new Uint8Array(UNITS); // BASE
  constructor(
    image: Buffer,
    /** Per chunk: false for an all-zero chunk (reported deallocated while the mount has not written it). */
    readonly baseMapped: readonly boolean[],
  ) {
    this.data = Buffer.alloc(BLOCKS * BS);
    image.copy(this.data);
  }

  bytes(lba: number, blocks: number): Buffer {
    return this.data.subarray(lba * BS, (lba + blocks) * BS);
  }

  /** A write: every unit it touches is *present* (partial units are filled first). */
  write(lba: number, data: Buffer): void {
    data.copy(this.data, lba * BS);
    this.setUnits(Math.floor(lba / UNIT_BLOCKS), Math.ceil((lba + data.length / BS) / UNIT_BLOCKS), PRESENT);
  }

  /**
   * UNMAP of one range (delta-store.ts deallocate, docs/delta-format.md): whole units become *zero*; the
   * covered part of a partly covered unit is written with zeroes (the unit becomes *present*) unless
   * the units of that part are all *zero* already. A short last unit counts as whole.
   */
  unmap(lba: number, blocks: number): void {
    const end = lba + blocks;
    this.data.fill(0, lba * BS, end * BS);
    const firstFull = Math.ceil(lba / UNIT_BLOCKS);
    let endFull = Math.floor(end / UNIT_BLOCKS);
    if (end === BLOCKS) endFull = UNITS;
    const partials: Array<[number, number]> = [];
    if (endFull > firstFull) {
      if (lba < firstFull * UNIT_BLOCKS) partials.push([lba, firstFull * UNIT_BLOCKS]);
      if (endFull * UNIT_BLOCKS < end && endFull < UNITS) partials.push([endFull * UNIT_BLOCKS, end]);
    } else {
      partials.push([lba, end]);
    }
    for (const [from, to] of partials) {
      const u0 = Math.floor(from / UNIT_BLOCKS);
      const u1 = Math.ceil(to / UNIT_BLOCKS);
      let allZero = true;
      for (let u = u0; u < u1; u++) allZero &&= this.units[u] === ZERO;
      if (!allZero) this.setUnits(u0, u1, PRESENT);
    }
    if (endFull > firstFull) this.setUnits(firstFull, endFull, ZERO);
  }

  setUnits(from: number, to: number, state: number): void {
    this.units.fill(state, from, to);
  }

  mapped(block: number): boolean {
    const state = this.units[Math.floor(block / UNIT_BLOCKS)]!;
    if (state === BASE) return this.baseMapped[Math.floor(block / CHUNK_BLOCKS)]!;
    return state === PRESENT;
  }

  /** Maximal runs of equal provisioning status from `lba` (what GET LBA STATUS reports). */
  runs(lba: number, max: number): Array<{ lba: number; blocks: number; mapped: boolean }> {
    const out: Array<{ lba: number; blocks: number; mapped: boolean }> = [];
    let at = lba;
    while (at < BLOCKS && out.length < max) {
      const mapped = this.mapped(at);
      let end = at + 1;
      while (end < BLOCKS && this.mapped(end) === mapped) end++;
      out.push({ lba: at, blocks: end - at, mapped });
      at = end;
    }
    return out;
  }

  /** LBPRZ (SBC-3 4.7.3.4, READ CAPACITY(16) reports LBPRZ=1): every deallocated block reads as zeroes. */
  checkDeallocatedAreZero(): void {
    for (let b = 0; b < BLOCKS; b++) {
      if (!this.mapped(b) && !isZero(this.bytes(b, 1))) throw new Error(`model: deallocated block ${b} is not zero`);
    }
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

// ---- SCSI plumbing -------------------------------------------------------------------------------

const FUA = 0x08;
const UNMAP_BIT = 0x08;
const NDOB = 0x01;
const BYTCHK = 0x02;

interface Lun {
  target: ScsiTarget;
  nexus: Nexus;
  device: BackupBlockDevice;
}

function run(lun: Lun, c: Buffer, dataOut?: Buffer, expectedDataLength?: number): Promise<ScsiResult> {
  return exec(lun.target, lun.nexus, c, {
    ...(dataOut !== undefined ? { dataOut } : {}),
    ...(expectedDataLength !== undefined ? { expectedDataLength } : {}),
  });
}

function describeResult(r: ScsiResult): string {
  const s = r.sense ? parseSense(r.sense) : undefined;
  return `status ${r.status}${s ? ` sense ${s.key.toString(16)}/${s.asc.toString(16)}/${s.ascq.toString(16)} info ${s.information}` : ''}`;
}

function good(r: ScsiResult, what: string): void {
  if (r.status !== ScsiStatus.Good) throw new Error(`${what}: expected GOOD, got ${describeResult(r)}`);
}

function sense(r: ScsiResult, what: string, key: number, asc: number, ascq: number, information?: number): void {
  const s = r.status === ScsiStatus.CheckCondition && r.sense ? parseSense(r.sense) : undefined;
  const ok = s !== undefined && s.key === key && s.asc === asc && s.ascq === ascq && (information === undefined || s.information === information);
  if (!ok) throw new Error(`${what}: expected ${key.toString(16)}/${asc.toString(16)}/${ascq.toString(16)}${information !== undefined ? ` info ${information}` : ''}, got ${describeResult(r)}`);
}

/** The Data-In of a READ (segments are released, as the transport does once sent). */
function dataIn(r: ScsiResult): Buffer {
  if (r.dataIn !== undefined) return Buffer.from(r.dataIn);
  if (r.dataInSegments !== undefined) {
    const all = Buffer.concat(r.dataInSegments.segments as Buffer[]);
    expect(all.length).toBe(r.dataInSegments.length);
    r.dataInSegments.release();
    return all;
  }
  return Buffer.alloc(0);
}

const read10 = (lba: number, n: number): Buffer => cdb(0x28, 10, [[2, be32(lba)], [7, be16(n)]]);
const read16 = (lba: number, n: number): Buffer => cdb(0x88, 16, [[2, be64(lba)], [10, be32(n)]]);
const write10 = (lba: number, n: number, flags: number): Buffer => cdb(0x2a, 10, [[1, [flags]], [2, be32(lba)], [7, be16(n)]]);
const write16 = (lba: number, n: number, flags: number): Buffer => cdb(0x8a, 16, [[1, [flags]], [2, be64(lba)], [10, be32(n)]]);
const writeSame10 = (lba: number, n: number, flags: number): Buffer => cdb(0x41, 10, [[1, [flags]], [2, be32(lba)], [7, be16(n)]]);
const writeSame16 = (lba: number, n: number, flags: number): Buffer => cdb(0x93, 16, [[1, [flags]], [2, be64(lba)], [10, be32(n)]]);
const verify10 = (lba: number, n: number, flags: number): Buffer => cdb(0x2f, 10, [[1, [flags]], [2, be32(lba)], [7, be16(n)]]);
const verify16 = (lba: number, n: number, flags: number): Buffer => cdb(0x8f, 16, [[1, [flags]], [2, be64(lba)], [10, be32(n)]]);
const sync10 = (lba: number, n: number): Buffer => cdb(0x35, 10, [[2, be32(lba)], [7, be16(n)]]);
const sync16 = (lba: number, n: number): Buffer => cdb(0x91, 16, [[2, be64(lba)], [10, be32(n)]]);
const compareAndWrite = (lba: number, n: number, flags: number): Buffer => cdb(0x89, 16, [[1, [flags]], [2, be64(lba)], [13, [n]]]);
const getLbaStatus = (lba: number, alloc: number): Buffer => cdb(0x9e, 16, [[1, [0x12]], [2, be64(lba)], [10, be32(alloc)]]);

function unmapParams(ranges: ReadonlyArray<{ lba: number; blocks: number }>): Buffer {
  const p = Buffer.alloc(8 + 16 * ranges.length);
  p.writeUInt16BE(p.length - 2, 0);
  p.writeUInt16BE(16 * ranges.length, 2);
  ranges.forEach((r, i) => {
    Buffer.from(be64(r.lba)).copy(p, 8 + 16 * i);
    p.writeUInt32BE(r.blocks, 16 + 16 * i);
  });
  return p;
}
const unmapCdb = (len: number): Buffer => cdb(0x42, 10, [[7, be16(len)]]);

async function readAll(lun: Lun, lba: number, n: number): Promise<Buffer> {
  const r = await run(lun, read16(lba, n), undefined, n * BS);
  good(r, `READ(16) ${lba}+${n}`);
  const d = dataIn(r);
  expect(d.length).toBe(n * BS);
  return d;
}

/** GET LBA STATUS descriptors from `lba` with room for `room` of them. */
async function lbaStatus(lun: Lun, lba: number, room: number): Promise<Array<{ lba: number; blocks: number; mapped: boolean }>> {
  const r = await run(lun, getLbaStatus(lba, 8 + 16 * room), undefined, 8 + 16 * room);
  good(r, `GET LBA STATUS ${lba}`);
  const d = r.dataIn!;
  const count = (d.readUInt32BE(0) - 4) / 16;
  const out: Array<{ lba: number; blocks: number; mapped: boolean }> = [];
  for (let i = 0; i < count && 8 + 16 * i + 16 <= d.length; i++) {
    const at = 8 + 16 * i;
    const status = d[at + 12]! & 0x0f;
    expect(status === 0 || status === 1).toBe(true);
    out.push({ lba: Number(d.readBigUInt64BE(at)), blocks: d.readUInt32BE(at + 8), mapped: status === 0 });
  }
  return out;
}

// ---- the random walk -----------------------------------------------------------------------------

class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    this.next = xorshift32(seed);
  }
  float(): number {
    return this.next() / 2 ** 32;
  }
  int(n: number): number {
    return Math.floor(this.float() * n);
  }
  chance(p: number): boolean {
    return this.float() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
}

/** A random in-range extent: unaligned, crossing chunk boundaries, unit aligned, at the end, large. */
function pickRange(rng: Rng, maxBlocks = 2048): { lba: number; blocks: number } {
  let lba: number;
  let n: number;
  const mode = rng.int(8);
  if (mode === 0) [lba, n] = [rng.int(BLOCKS), 1 + rng.int(16)];
  else if (mode === 1) [lba, n] = [Math.max(0, (1 + rng.int(CHUNKS - 1)) * CHUNK_BLOCKS - 1 - rng.int(20)), 2 + rng.int(60)];
  else if (mode === 2) [lba, n] = [UNIT_BLOCKS * rng.int(UNITS), UNIT_BLOCKS * (1 + rng.int(8))];
  else if (mode === 3) {
    n = 1 + rng.int(24);
    lba = BLOCKS - n - (rng.chance(0.5) ? 0 : rng.int(8));
  } else if (mode === 4) [lba, n] = [CHUNK_BLOCKS * rng.int(CHUNKS), CHUNK_BLOCKS * (1 + rng.int(3))];
  else if (mode === 5) [lba, n] = [rng.int(BLOCKS), 1 + rng.int(3000)];
  else [lba, n] = [rng.int(BLOCKS), 1 + rng.int(300)];
  lba = Math.max(0, Math.min(lba, BLOCKS - 1));
  n = Math.max(1, Math.min(n, BLOCKS - lba, maxBlocks));
  return { lba, blocks: n };
}

/** A range that ends past the last block (LBA OUT OF RANGE), and whether it fits a 10-byte CDB. */
function pickOutOfRange(rng: Rng): { lba: number; blocks: number } {
  const mode = rng.int(4);
  if (mode === 0) {
    const n = 2 + rng.int(40);
    return { lba: BLOCKS - n + 1 + rng.int(n - 1), blocks: n };
  }
  if (mode === 1) return { lba: BLOCKS, blocks: 1 + rng.int(8) };
  if (mode === 2) return { lba: BLOCKS + rng.int(100000), blocks: 1 + rng.int(8) };
  return { lba: 0xffffffff - rng.int(4), blocks: 1 + rng.int(8) };
}

function randomBlocks(rng: Rng, n: number): Buffer {
  const kind = rng.int(5);
  if (kind === 0) return Buffer.alloc(n * BS); // zeroes written (stay *present*)
  if (kind === 1) return Buffer.alloc(n * BS, 1 + rng.int(255));
  return pseudoRandomBytes(n * BS, 1 + rng.int(2 ** 31));
}

type Mutation =
  | { kind: 'write'; lba: number; data: Buffer; sixteen: boolean; fua: boolean }
  | { kind: 'writeSame'; lba: number; blocks: number; block: Buffer; sixteen: boolean; unmap: boolean; ndob: boolean }
  | { kind: 'unmap'; ranges: Array<{ lba: number; blocks: number }> }
  | { kind: 'caw'; lba: number; blocks: number; replacement: Buffer; fua: boolean; match: boolean };

interface Context {
  rng: Rng;
  model: Model;
  lun: Lun;
  log: string[];
  /** Commands issued, by kind (printed at the end: what the walk covered). */
  counts: Map<string, number>;
  /**
   * READ results kept unreleased for a while, as the transport keeps Data-In queued on a slow socket:
   * their slices (views of cached chunks) must keep the bytes they had while the cache evicts and
   * recycles around them and the mount writes over the same blocks.
   */
  held: Array<{ read: SegmentedRead; want: Buffer; what: string }>;
  /** Close the LUN (waiting for running commands) and open the mount again, as a server restart does. */
  reopen: () => Promise<Lun>;
  /**
   * Open the mount again from a copy of its delta files taken now, while no command runs (what `kill -9`
   * leaves: journal not checkpointed, unflushed writes in the page cache), then drop the old LUN.
   */
  crash: () => Promise<Lun>;
}

function note(ctx: Context, line: string): void {
  const kind = (/^(WRITE SAME|COMPARE AND WRITE|GET LBA STATUS|SYNCHRONIZE CACHE|VERIFY BYTCHK|batch\(\w+\)|[A-Z]+)/.exec(line)?.[0] ?? line) + (line.includes('out of range') ? ' (out of range)' : line.includes('mismatching') || line.includes('differing') ? ' (miscompare)' : '');
  ctx.counts.set(kind, (ctx.counts.get(kind) ?? 0) + 1);
  ctx.log.push(line);
  if (ctx.log.length > 40) ctx.log.shift();
}

function randomMutation(ctx: Context, range: { lba: number; blocks: number }, allowUnmap = true, allowCaw = true): Mutation {
  const { rng } = ctx;
  const r = rng.int(allowUnmap ? (allowCaw ? 10 : 9) : 6);
  if (r < 4) {
    const sixteen = rng.chance(0.5);
    return { kind: 'write', lba: range.lba, data: randomBlocks(rng, range.blocks), sixteen, fua: rng.chance(0.3) };
  }
  if (r < 6) {
    const block = rng.chance(0.5) ? Buffer.alloc(BS) : pseudoRandomBytes(BS, 1 + rng.int(2 ** 31));
    return { kind: 'writeSame', lba: range.lba, blocks: range.blocks, block, sixteen: rng.chance(0.5), unmap: false, ndob: false };
  }
  if (r < 8) {
    // WRITE SAME with UNMAP deallocates whatever the block holds (sbc.ts, as LIO and tgt; libiscsi
    // sends 0xFF blocks with UNMAP): with LBPRZ=1 the blocks then read as zeroes.
    const sixteen = rng.chance(0.5);
    const ndob = sixteen && rng.chance(0.5);
    const block = ndob || rng.chance(0.75) ? Buffer.alloc(BS) : pseudoRandomBytes(BS, 1 + rng.int(2 ** 31));
    return { kind: 'writeSame', lba: range.lba, blocks: range.blocks, block, sixteen, unmap: true, ndob };
  }
  if (r < 9) {
    const ranges = [range];
    const extra = rng.int(4);
    for (let i = 0; i < extra; i++) ranges.push(rng.chance(0.2) ? { lba: rng.int(BLOCKS), blocks: 0 } : pickRange(rng, 400));
    return { kind: 'unmap', ranges };
  }
  const n = Math.min(range.blocks, 1 + rng.int(16));
  return { kind: 'caw', lba: range.lba, blocks: n, replacement: randomBlocks(rng, n), fua: rng.chance(0.3), match: rng.chance(0.7) };
}

function mutationExtent(m: Mutation): Array<{ lba: number; blocks: number }> {
  switch (m.kind) {
    case 'write':
      return [{ lba: m.lba, blocks: m.data.length / BS }];
    case 'writeSame':
    case 'caw':
      return [{ lba: m.lba, blocks: m.blocks }];
    case 'unmap':
      return m.ranges.filter((r) => r.blocks > 0);
  }
}

function deallocates(m: Mutation): boolean {
  return m.kind === 'unmap' || (m.kind === 'writeSame' && m.unmap);
}

/** Issue a mutation (built against the model as it is now); returns the check to run on its result. */
function issue(ctx: Context, m: Mutation): { result: Promise<ScsiResult>; apply: (r: ScsiResult) => void; what: string } {
  const { lun, model } = ctx;
  switch (m.kind) {
    case 'write': {
      const n = m.data.length / BS;
      const what = `WRITE(${m.sixteen ? 16 : 10}) ${m.lba}+${n}${m.fua ? ' FUA' : ''}`;
      const c = m.sixteen ? write16(m.lba, n, m.fua ? FUA : 0) : write10(m.lba, n, m.fua ? FUA : 0);
      return { what, result: run(lun, c, m.data), apply: (r) => (good(r, what), model.write(m.lba, m.data)) };
    }
    case 'writeSame': {
      const what = `WRITE SAME(${m.sixteen ? 16 : 10}) ${m.lba}+${m.blocks}${m.unmap ? ' UNMAP' : ''}${m.ndob ? ' NDOB' : ''}`;
      const flags = (m.unmap ? UNMAP_BIT : 0) | (m.ndob ? NDOB : 0);
      // NUMBER OF LOGICAL BLOCKS 0 means "to the last block" (WSNZ=0): use it when the range ends there.
      const count = m.lba + m.blocks === BLOCKS && ctx.rng.chance(0.5) ? 0 : m.blocks;
      const c = m.sixteen ? writeSame16(m.lba, count, flags) : writeSame10(m.lba, count, flags);
      const result = m.ndob ? run(lun, c, undefined, 0) : run(lun, c, m.block, BS);
      return {
        what,
        result,
        apply: (r) => {
          good(r, what);
          if (m.unmap) model.unmap(m.lba, m.blocks);
          else model.write(m.lba, Buffer.alloc(m.blocks * BS).fill(m.block));
        },
      };
    }
    case 'unmap': {
      const what = `UNMAP ${m.ranges.map((r) => `${r.lba}+${r.blocks}`).join(',')}`;
      const params = unmapParams(m.ranges);
      return {
        what,
        result: run(lun, unmapCdb(params.length), params),
        apply: (r) => {
          good(r, what);
          for (const x of m.ranges) if (x.blocks > 0) model.unmap(x.lba, x.blocks);
        },
      };
    }
    case 'caw': {
      const what = `COMPARE AND WRITE ${m.lba}+${m.blocks} ${m.match ? 'matching' : 'mismatching'}`;
      const expected = Buffer.from(model.bytes(m.lba, m.blocks));
      let differsAt = -1;
      if (!m.match) {
        differsAt = ctx.rng.int(expected.length);
        expected[differsAt] = expected[differsAt]! ^ (1 + ctx.rng.int(255));
      }
      const c = compareAndWrite(m.lba, m.blocks, m.fua ? FUA : 0);
      return {
        what,
        result: run(lun, c, Buffer.concat([expected, m.replacement])),
        apply: (r) => {
          if (m.match) {
            good(r, what);
            model.write(m.lba, m.replacement);
          } else {
            // SBC-3 5.2: MISCOMPARE DURING VERIFY OPERATION, INFORMATION = offset of the first difference.
            sense(r, what, 0x0e, 0x1d, 0x00, differsAt);
          }
        },
      };
    }
  }
}

/** Read [lba, lba+n) through READ(10) or READ(16) and compare with the model. */
async function checkRead(ctx: Context, lba: number, n: number, sixteen = ctx.rng.chance(0.5)): Promise<void> {
  const c = sixteen || n > 0xffff ? read16(lba, n) : read10(lba, n);
  const r = await run(ctx.lun, c, undefined, n * BS);
  const what = `READ ${lba}+${n}`;
  good(r, what);
  const want = ctx.model.bytes(lba, n);
  if (r.dataInSegments !== undefined && ctx.rng.chance(0.15)) {
    expectSame(Buffer.concat(r.dataInSegments.segments as Buffer[]), want, what);
    ctx.held.push({ read: r.dataInSegments, want: Buffer.from(want), what });
    ctx.counts.set('READ (held)', (ctx.counts.get('READ (held)') ?? 0) + 1);
    return;
  }
  expectSame(dataIn(r), want, what);
}

/** Check and release held READ results: all of them, or (`some`) the older ones at random. */
function releaseHeld(ctx: Context, some: boolean): void {
  while (ctx.held.length > 0 && (!some || ctx.held.length > 6 || ctx.rng.chance(0.3))) {
    const h = ctx.held.shift()!;
    expectSame(Buffer.concat(h.read.segments as Buffer[]), h.want, `held ${h.what} at release`);
    h.read.release();
  }
}

function expectSame(got: Buffer, want: Buffer, what: string): void {
  if (got.equals(want)) return;
  let i = 0;
  while (i < Math.min(got.length, want.length) && got[i] === want[i]) i++;
  throw new Error(`${what}: data differs from the model at byte ${i} (block +${Math.floor(i / BS)}); lengths ${got.length}/${want.length}`);
}

async function checkStatus(ctx: Context, lba: number, room: number): Promise<void> {
  const got = await lbaStatus(ctx.lun, lba, room);
  const want = ctx.model.runs(lba, Math.min(room, 64));
  if (JSON.stringify(got) !== JSON.stringify(want)) {
    throw new Error(`GET LBA STATUS ${lba} (room ${room}):\n got  ${JSON.stringify(got.slice(0, 8))}\n want ${JSON.stringify(want.slice(0, 8))}`);
  }
}

async function checkWholeDisk(ctx: Context, what: string): Promise<void> {
  ctx.model.checkDeallocatedAreZero();
  expectSame(await readAll(ctx.lun, 0, BLOCKS), ctx.model.data, `${what}: whole disk`);
  let at = 0;
  while (at < BLOCKS) {
    const runs = await lbaStatus(ctx.lun, at, 64);
    const want = ctx.model.runs(at, 64);
    if (JSON.stringify(runs) !== JSON.stringify(want)) throw new Error(`${what}: GET LBA STATUS from ${at} differs: ${JSON.stringify(runs.slice(0, 6))} vs ${JSON.stringify(want.slice(0, 6))}`);
    const last = runs[runs.length - 1]!;
    at = last.lba + last.blocks;
  }
}

/** The affected range ± a unit, read back and compared. */
async function checkAround(ctx: Context, ranges: ReadonlyArray<{ lba: number; blocks: number }>): Promise<void> {
  for (const r of ranges) {
    const from = Math.max(0, r.lba - UNIT_BLOCKS - ctx.rng.int(3));
    const to = Math.min(BLOCKS, r.lba + r.blocks + UNIT_BLOCKS + ctx.rng.int(3));
    await checkRead(ctx, from, to - from, true);
  }
}

async function outOfRange(ctx: Context): Promise<void> {
  const { rng, lun } = ctx;
  const { lba, blocks } = pickOutOfRange(rng);
  const fits10 = lba + blocks <= 0xffffffff + 1 && lba <= 0xffffffff && blocks <= 0xffff;
  const kind = rng.int(9);
  let r: ScsiResult;
  let what: string;
  switch (kind) {
    case 0:
      what = `READ out of range ${lba}+${blocks}`;
      r = await run(lun, fits10 && rng.chance(0.5) ? read10(lba, blocks) : read16(lba, blocks), undefined, blocks * BS);
      break;
    case 1:
      what = `WRITE out of range ${lba}+${blocks}`;
      r = await run(lun, fits10 && rng.chance(0.5) ? write10(lba, blocks, 0) : write16(lba, blocks, FUA), randomBlocks(rng, blocks));
      break;
    case 2:
      what = `WRITE SAME out of range ${lba}+${blocks}`;
      r = await run(lun, fits10 && rng.chance(0.5) ? writeSame10(lba, blocks, rng.chance(0.5) ? UNMAP_BIT : 0) : writeSame16(lba, blocks, UNMAP_BIT), Buffer.alloc(BS), BS);
      break;
    case 3: {
      // One valid descriptor before the bad one: the command must change nothing (SBC-3 5.28.2).
      what = `UNMAP out of range ${lba}+${blocks}`;
      const params = unmapParams([pickRange(rng, 64), { lba, blocks }]);
      r = await run(lun, unmapCdb(params.length), params);
      break;
    }
    case 4: {
      what = `COMPARE AND WRITE out of range ${lba}+${blocks}`;
      const n = Math.min(blocks, 16);
      const oob = lba + n > BLOCKS ? lba : BLOCKS - n + 1;
      r = await run(lun, compareAndWrite(oob, n, 0), Buffer.alloc(2 * n * BS));
      break;
    }
    case 5:
      what = `VERIFY out of range ${lba}+${blocks}`;
      r = await run(lun, fits10 && rng.chance(0.5) ? verify10(lba, blocks, 0) : verify16(lba, blocks, 0), undefined, 0);
      break;
    case 6:
      what = `VERIFY BYTCHK out of range ${lba}+${blocks}`;
      r = await run(lun, verify16(lba, blocks, BYTCHK), Buffer.alloc(blocks * BS));
      break;
    case 7:
      what = `SYNCHRONIZE CACHE out of range ${lba}+${blocks}`;
      r = await run(lun, fits10 && rng.chance(0.5) ? sync10(lba, blocks) : sync16(lba, blocks), undefined, 0);
      break;
    default: {
      const start = BLOCKS + rng.int(3) * rng.int(100000);
      what = `GET LBA STATUS out of range ${start}`;
      r = await run(lun, getLbaStatus(start, 8 + 16 * 4), undefined, 72);
      break;
    }
  }
  note(ctx, what);
  sense(r, what, 0x05, 0x21, 0x00);
  if (lba < BLOCKS) await checkRead(ctx, Math.max(0, lba - 8), BLOCKS - Math.max(0, lba - 8));
}

/**
 * Transfer length 0 (SBC-3 5.8 ff.: "shall not be considered an error"; only an LBA past the end is,
 * LBA OUT OF RANGE) and a short Data-Out (sbc.ts: only the whole blocks that arrived are written, the
 * rest of the range is left untouched).
 */
async function edgeOp(ctx: Context): Promise<void> {
  const { rng, lun, model } = ctx;
  const kind = rng.int(4);
  if (kind === 0) {
    const lba = rng.chance(0.5) ? rng.int(BLOCKS + 1) : BLOCKS + 1 + rng.int(1000);
    const sixteen = rng.chance(0.5);
    const write = rng.chance(0.5);
    const what = `${write ? 'WRITE' : 'READ'} 0 blocks at ${lba}`;
    note(ctx, what);
    const c = write ? (sixteen ? write16(lba, 0, 0) : write10(lba, 0, 0)) : sixteen ? read16(lba, 0) : read10(lba, 0);
    const r = await run(lun, c, undefined, 0);
    if (lba > BLOCKS) sense(r, what, 0x05, 0x21, 0x00);
    else good(r, what);
    return;
  }
  if (kind === 1) {
    note(ctx, 'UNMAP with an empty parameter list');
    good(await run(lun, unmapCdb(0), undefined, 0), 'UNMAP parameter list length 0');
    return;
  }
  const { lba, blocks } = pickRange(rng, 200);
  if (blocks < 2) return;
  const arrived = 1 + rng.int(blocks - 1);
  const data = randomBlocks(rng, arrived);
  const what = `WRITE ${lba}+${blocks} with ${arrived} blocks of Data-Out`;
  note(ctx, what);
  const r = await run(lun, rng.chance(0.5) ? write16(lba, blocks, 0) : write10(lba, blocks, FUA), data);
  good(r, what);
  expect(r.dataOutLength).toBe(blocks * BS);
  model.write(lba, data);
  await checkAround(ctx, [{ lba, blocks }]);
}

async function verifyOp(ctx: Context): Promise<void> {
  const { rng, model } = ctx;
  const { lba, blocks } = pickRange(rng, 512);
  const sixteen = rng.chance(0.5);
  const byteCheck = rng.chance(0.7);
  if (!byteCheck) {
    note(ctx, `VERIFY ${lba}+${blocks}`);
    const r = await run(ctx.lun, sixteen ? verify16(lba, blocks, 0) : verify10(lba, blocks, 0), undefined, 0);
    good(r, `VERIFY ${lba}+${blocks}`);
    return;
  }
  const data = Buffer.from(model.bytes(lba, blocks));
  const match = rng.chance(0.6);
  let at = -1;
  if (!match) {
    at = rng.int(data.length);
    data[at] = data[at]! ^ 0x40;
  }
  const what = `VERIFY BYTCHK ${lba}+${blocks} ${match ? 'matching' : `differing at ${at}`}`;
  note(ctx, what);
  const r = await run(ctx.lun, sixteen ? verify16(lba, blocks, BYTCHK) : verify10(lba, blocks, BYTCHK), data);
  if (match) good(r, what);
  else sense(r, what, 0x0e, 0x1d, 0x00, at);
}

async function syncOp(ctx: Context): Promise<void> {
  const { rng } = ctx;
  const whole = rng.chance(0.5);
  const { lba, blocks } = whole ? { lba: 0, blocks: 0 } : pickRange(rng);
  note(ctx, `SYNCHRONIZE CACHE ${lba}+${blocks}`);
  good(await run(ctx.lun, rng.chance(0.5) ? sync10(lba, blocks) : sync16(lba, blocks), undefined, 0), 'SYNCHRONIZE CACHE');
}

/** Several commands at once on ranges that do not overlap: exactly the sequential result. */
async function disjointBatch(ctx: Context): Promise<void> {
  const { rng, model } = ctx;
  const count = 2 + rng.int(5);
  type Item = { m: Mutation | null; extent: Array<{ lba: number; blocks: number }>; unitWide: boolean };
  const items: Item[] = [];
  const clash = (a: Item, b: Item): boolean => {
    const g = a.unitWide || b.unitWide ? UNIT_BLOCKS : 1;
    for (const x of a.extent) {
      for (const y of b.extent) {
        const x0 = Math.floor(x.lba / g), x1 = Math.ceil((x.lba + x.blocks) / g);
        const y0 = Math.floor(y.lba / g), y1 = Math.ceil((y.lba + y.blocks) / g);
        if (x0 < y1 && y0 < x1) return true;
      }
    }
    return false;
  };
  for (let tries = 0; items.length < count && tries < 50; tries++) {
    const range = pickRange(rng, 256);
    const m = rng.chance(0.3) ? null : randomMutation(ctx, range, true, true);
    const extent = m === null ? [range] : mutationExtent(m);
    if (extent.length === 0) continue;
    // Within one UNMAP its descriptors may overlap each other, not other commands.
    const item: Item = { m, extent, unitWide: m !== null && deallocates(m) };
    if (items.some((o) => clash(o, item))) continue;
    items.push(item);
  }
  note(ctx, `batch(disjoint): ${items.map((i) => (i.m === null ? `READ ${i.extent[0]!.lba}+${i.extent[0]!.blocks}` : `${i.m.kind} ${JSON.stringify(i.extent)}`)).join(' | ')}`);
  // Reads see the model before the batch (their ranges are not written by the batch).
  const issued = items.map((i) => {
    if (i.m === null) {
      const { lba, blocks } = i.extent[0]!;
      const want = Buffer.from(model.bytes(lba, blocks));
      return {
        result: run(ctx.lun, read16(lba, blocks), undefined, blocks * BS),
        apply: (r: ScsiResult) => {
          good(r, `READ ${lba}+${blocks}`);
          expectSame(dataIn(r), want, `batch READ ${lba}+${blocks}`);
        },
      };
    }
    return issue(ctx, i.m);
  });
  const results = await Promise.all(issued.map((x) => x.result));
  results.forEach((r, k) => issued[k]!.apply(r));
  await checkAround(ctx, items.flatMap((i) => i.extent));
}

/**
 * Several writes (WRITE, WRITE SAME, UNMAP) and READs at once on overlapping ranges. SCSI gives no order
 * among SIMPLE tasks: each block may hold any one writer's data, and a READ may see, per block, the
 * data before the batch or any writer's.
 */
async function overlappingBatch(ctx: Context): Promise<void> {
  const { rng, model } = ctx;
  const center = pickRange(rng, 64);
  const region = { lba: Math.max(0, center.lba - 40), end: Math.min(BLOCKS, center.lba + center.blocks + 40) };
  const count = 2 + rng.int(4);
  const before = Buffer.from(model.bytes(region.lba, region.end - region.lba));
  type Cand = { lba: number; blocks: number; bytes: (block: number) => Buffer };
  const candidates: Cand[] = [];
  const touchedUnits = new Set<number>();
  const unitsOf = (lba: number, blocks: number): void => {
    for (let u = Math.floor(lba / UNIT_BLOCKS); u < Math.ceil((lba + blocks) / UNIT_BLOCKS); u++) touchedUnits.add(u);
  };
  const zeroBlock = Buffer.alloc(BS);
  const reads: Array<{ lba: number; blocks: number; result: Promise<ScsiResult> }> = [];
  const writes: Array<{ what: string; result: Promise<ScsiResult> }> = [];
  const log: string[] = [];
  for (let k = 0; k < count; k++) {
    const lba = region.lba + rng.int(region.end - region.lba);
    const blocks = 1 + rng.int(Math.min(region.end - lba, 100));
    const kind = rng.int(5);
    if (kind === 0) {
      reads.push({ lba, blocks, result: run(ctx.lun, read16(lba, blocks), undefined, blocks * BS) });
      log.push(`READ ${lba}+${blocks}`);
      continue;
    }
    unitsOf(lba, blocks);
    if (kind <= 2) {
      const data = randomBlocks(rng, blocks);
      const fua = rng.chance(0.2);
      candidates.push({ lba, blocks, bytes: (b) => data.subarray((b - lba) * BS, (b - lba + 1) * BS) });
      writes.push({ what: `WRITE ${lba}+${blocks}`, result: run(ctx.lun, write16(lba, blocks, fua ? FUA : 0), data) });
    } else if (kind === 3) {
      const block = pseudoRandomBytes(BS, 1 + rng.int(2 ** 31));
      candidates.push({ lba, blocks, bytes: () => block });
      writes.push({ what: `WRITE SAME ${lba}+${blocks}`, result: run(ctx.lun, writeSame10(lba, blocks, 0), block, BS) });
    } else {
      candidates.push({ lba, blocks, bytes: () => zeroBlock });
      const params = unmapParams([{ lba, blocks }]);
      writes.push({ what: `UNMAP ${lba}+${blocks}`, result: run(ctx.lun, unmapCdb(params.length), params) });
    }
    log.push(writes[writes.length - 1]!.what);
  }
  note(ctx, `batch(overlapping): ${log.join(' | ')}`);
  const allowed = (block: number, got: Buffer, includeBefore: boolean): boolean => {
    const covering = candidates.filter((c) => block >= c.lba && block < c.lba + c.blocks);
    if (covering.length === 0 || includeBefore) {
      if (got.equals(before.subarray((block - region.lba) * BS, (block - region.lba + 1) * BS))) return true;
    }
    return covering.some((c) => got.equals(c.bytes(block)));
  };
  for (const w of writes) good(await w.result, w.what);
  for (const r of reads) {
    const res = await r.result;
    good(res, `batch READ ${r.lba}+${r.blocks}`);
    const d = dataIn(res);
    for (let b = 0; b < r.blocks; b++) {
      if (!allowed(r.lba + b, d.subarray(b * BS, (b + 1) * BS), true)) throw new Error(`overlapping batch: READ block ${r.lba + b} holds neither the old data nor any writer's`);
    }
  }
  const after = await readAll(ctx.lun, region.lba, region.end - region.lba);
  for (let b = region.lba; b < region.end; b++) {
    const got = after.subarray((b - region.lba) * BS, (b - region.lba + 1) * BS);
    if (!allowed(b, got, false)) throw new Error(`overlapping batch: block ${b} holds no writer's data`);
  }
  after.copy(model.data, region.lba * BS);
  // Units touched: *present* or *zero* depending on the order; adopt what GET LBA STATUS reports, but a
  // deallocated block must read as zeroes (LBPRZ) and only an UNMAP can leave a unit deallocated.
  const unmapped = new Set<number>();
  for (const c of candidates) if (c.bytes(c.lba) === zeroBlock) for (let u = Math.floor(c.lba / UNIT_BLOCKS); u < Math.ceil((c.lba + c.blocks) / UNIT_BLOCKS); u++) unmapped.add(u);
  for (const u of touchedUnits) {
    const b = u * UNIT_BLOCKS;
    const [first] = await lbaStatus(ctx.lun, b, 1);
    const mapped = first!.mapped;
    if (!mapped && !unmapped.has(u)) throw new Error(`overlapping batch: unit ${u} deallocated though no UNMAP touched it`);
    model.setUnits(u, u + 1, mapped ? PRESENT : ZERO);
  }
  model.checkDeallocatedAreZero();
}

async function step(ctx: Context, k: number): Promise<void> {
  const { rng } = ctx;
  releaseHeld(ctx, true);
  const r = rng.int(100);
  if (r < 22) {
    const { lba, blocks } = pickRange(rng);
    note(ctx, `READ ${lba}+${blocks}`);
    await checkRead(ctx, lba, blocks);
  } else if (r < 62) {
    const m = randomMutation(ctx, pickRange(rng, 1024));
    const x = issue(ctx, m);
    note(ctx, x.what);
    x.apply(await x.result);
    await checkAround(ctx, mutationExtent(m));
    if (deallocates(m) || rng.chance(0.2)) {
      for (const e of mutationExtent(m)) await checkStatus(ctx, Math.max(0, e.lba - rng.int(9)), 1 + rng.int(8));
    }
  } else if (r < 68) {
    const lba = rng.chance(0.2) ? BLOCKS - 1 - rng.int(16) : rng.int(BLOCKS);
    note(ctx, `GET LBA STATUS ${lba}`);
    await checkStatus(ctx, lba, rng.chance(0.3) ? 1 : 1 + rng.int(80));
  } else if (r < 73) {
    await verifyOp(ctx);
  } else if (r < 78) {
    await syncOp(ctx);
  } else if (r < 82) {
    await outOfRange(ctx);
  } else if (r < 84) {
    await edgeOp(ctx);
  } else if (r < 91) {
    await disjointBatch(ctx);
  } else if (r < 97) {
    await overlappingBatch(ctx);
  } else if (rng.chance(0.5)) {
    // A server restart: (usually) SYNCHRONIZE CACHE, then close the LUN and open the mount again; some
    // writes may still be running when the LUN is removed (they finish before the device closes).
    if (rng.chance(0.8)) await syncOp(ctx);
    const inFlight: Array<ReturnType<typeof issue>> = [];
    if (rng.chance(0.4)) {
      let at = rng.int(BLOCKS - 2000);
      for (let i = 0; i < 1 + rng.int(3); i++) {
        const n = 1 + rng.int(100);
        inFlight.push(issue(ctx, { kind: 'write', lba: at, data: randomBlocks(rng, n), sixteen: true, fua: rng.chance(0.5) }));
        at += n + rng.int(20);
      }
    }
    note(ctx, inFlight.length > 0 ? 'restart (writes running)' : 'restart');
    if (inFlight.length > 0) ctx.log.push(`  running: ${inFlight.map((x) => x.what).join(', ')}`);
    releaseHeld(ctx, false);
    ctx.lun = await ctx.reopen();
    for (const x of inFlight) x.apply(await x.result);
    await checkWholeDisk(ctx, `after restart at step ${k}`);
  } else {
    // kill -9 (docs/delta-format.md "Guarantees"): every acknowledged write survives, flushed or not.
    if (rng.chance(0.5)) await syncOp(ctx);
    note(ctx, 'crash');
    releaseHeld(ctx, false);
    ctx.lun = await ctx.crash();
    const delta = ctx.lun.device.stats().delta!;
    expect(delta.discardedUnits).toBe(0);
    await checkWholeDisk(ctx, `after crash at step ${k}`);
  }
  if (k % 40 === 39) await checkWholeDisk(ctx, `step ${k}`);
}

// ---- fixtures ------------------------------------------------------------------------------------

let scratch: string;
let repo: string;
let img1: Buffer;
let img2: Buffer;
const points: string[] = [];
let repoHashes: Map<string, string>;

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-model-'));
  repo = join(scratch, 'repo');
  img1 = image1();
  img2 = image2(img1);
  for (const img of [img1, img2]) {
    const result = await backupSource(repo, new BufferSource(img), { vm: 'vm', chunkSize: CHUNK, logger: silentLogger() });
    points.push(result.info.id);
  }
  repoHashes = await hashTree(repo);
});

afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/**
 * Open the mount as openBackupDevice does, with the delta's checkpoint threshold of the variant (a small
 * one makes checkpoints run after flushes and in the background between writes).
 */
async function openLun(cache: ChunkCache, point: string, deltaDir: string, v: Variant): Promise<Lun> {
  const reader = await openRestorePoint(repo, 'vm', point);
  const delta = await DeltaStore.open({
    dir: deltaDir,
    sizeBytes: lunBytesForImage(reader.imageSize),
    logger: silentLogger(),
    ...(v.checkpointJournalBytes !== undefined ? { checkpointJournalBytes: v.checkpointJournalBytes } : {}),
  });
  const device = new BackupBlockDevice({ reader, cache, delta, mountId: `model-${point}`, identity, logger: silentLogger(), zeroCopyReads: v.zeroCopyReads });
  const target = new ScsiTarget({ logger: silentLogger() });
  target.addLun(0, device);
  const nexus = makeNexus();
  target.nexusAdded(nexus);
  const tur = await run({ target, nexus, device }, cdb(0x00, 6), undefined, 0);
  sense(tur, 'first TEST UNIT READY', 0x06, 0x29, 0x00); // POWER ON, RESET
  return { target, nexus, device };
}

function seedsFor(base: number): number[] {
  const env = process.env.BOOTRESTORE_MODEL_SEED;
  return env !== undefined && env !== '' ? [Number(env) >>> 0] : [base];
}

interface Variant {
  readonly name: string;
  readonly seed: number;
  readonly point: 0 | 1;
  readonly cacheChunks: number;
  readonly maxConcurrentLoads: number;
  readonly preallocate: boolean;
  readonly zeroCopyReads: boolean;
  /** The delta's checkpoint threshold (default 4 MiB: then it checkpoints only when closed or recovered). */
  readonly checkpointJournalBytes?: number;
}

const STEPS = Number(process.env.BOOTRESTORE_MODEL_STEPS ?? 500);

const variants: Variant[] = [
  { name: 'incremental point, 4-chunk cache, zero-copy reads', seed: 0x5eed0001, point: 1, cacheChunks: 4, maxConcurrentLoads: 2, preallocate: false, zeroCopyReads: true, checkpointJournalBytes: 4 * KiB },
  { name: 'full point, preallocated 5-chunk cache', seed: 0x5eed0002, point: 0, cacheChunks: 5, maxConcurrentLoads: 3, preallocate: true, zeroCopyReads: false },
];

function newCache(v: Variant): Promise<ChunkCache> {
  const cache = new ChunkCache({ maxBytes: v.cacheChunks * CHUNK, maxConcurrentLoads: v.maxConcurrentLoads, logger: silentLogger() });
  if (!v.preallocate) return Promise.resolve(cache);
  return cache.preallocate(chunkFileBufferSize(CHUNK)).then(() => {
    expect(cache.stats().preallocatedBytes).toBeGreaterThan(0);
    return cache;
  });
}

/** One mount's random walk of `steps` steps on `cache`; `tag` keeps delta directories apart. */
async function walk(v: Variant, seed: number, cache: ChunkCache, tag: string, steps: number): Promise<void> {
  console.log(`mount-model: ${v.name}: seed ${seed} (BOOTRESTORE_MODEL_SEED=${seed} repeats it), ${steps} steps`);
  const point = points[v.point]!;
  const image = v.point === 0 ? img1 : img2;
  let deltaDir = join(scratch, `delta-${tag}-${v.point}-${seed}`);
  let crashes = 0;
  const lun = await openLun(cache, point, deltaDir, v);
  const baseMapped: boolean[] = [];
  for (let c = 0; c < CHUNKS; c++) baseMapped.push(!isZero(image.subarray(c * CHUNK, Math.min(IMAGE_SIZE, (c + 1) * CHUNK))));
  const ctx: Context = {
    rng: new Rng(seed),
    model: new Model(image, baseMapped),
    lun,
    log: [],
    counts: new Map(),
    held: [],
    reopen: async () => {
      countCheckpoints(ctx);
      await ctx.lun.target.removeLun(0); // waits for running commands, then closes the device (checkpoint)
      return openLun(cache, point, deltaDir, v);
    },
    crash: async () => {
      const copy = `${deltaDir}-crash${++crashes}`;
      countCheckpoints(ctx);
      // A copy file by file is a crash image only while nothing writes the files: wait for a background
      // checkpoint (started by a write once the journal passes twice the threshold) to finish; it
      // empties the journal last.
      const threshold = v.checkpointJournalBytes ?? 4 * MiB;
      for (let waited = 0; ctx.lun.device.stats().delta!.journalBytes >= 2 * threshold; waited++) {
        if (waited > 5000) throw new Error('the background checkpoint did not finish within 5 s');
        await new Promise((r) => setTimeout(r, 1));
      }
      await cp(deltaDir, copy, { recursive: true });
      await ctx.lun.target.removeLun(0);
      deltaDir = copy;
      return openLun(cache, point, deltaDir, v);
    },
  };
  try {
    // READ CAPACITY(16): the geometry, LBPME and LBPRZ (deallocated blocks read as zeroes).
    const cap = await run(ctx.lun, cdb(0x9e, 16, [[1, [0x10]], [10, be32(32)]]), undefined, 32);
    good(cap, 'READ CAPACITY(16)');
    expect(Number(cap.dataIn!.readBigUInt64BE(0))).toBe(BLOCKS - 1);
    expect(cap.dataIn!.readUInt32BE(8)).toBe(BS);
    expect(cap.dataIn![14]! & 0xc0).toBe(0xc0);
    // The backup stores all-zero chunks as zero chunks (no digest): the base's deallocated ranges.
    const reader = await openRestorePoint(repo, 'vm', point);
    for (let c = 0; c < CHUNKS; c++) expect(reader.chunkDigest(c) !== null).toBe(baseMapped[c]);
    await reader.close();
    await checkWholeDisk(ctx, 'fresh mount');
    for (let k = 0; k < steps; k++) await step(ctx, k);
    await syncOp(ctx);
    releaseHeld(ctx, false);
    ctx.lun = await ctx.reopen();
    await checkWholeDisk(ctx, 'final restart');
    console.log(`mount-model: ${tag} seed ${seed}: ${[...ctx.counts].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  } catch (err) {
    console.log(`mount-model: ${tag} seed ${seed} failed; last operations:\n  ${ctx.log.join('\n  ')}`);
    throw err;
  } finally {
    releaseHeld(ctx, false);
    await ctx.lun.target.removeLun(0);
  }
}

/** Delta checkpoints of the open device (its counters start at 0 on every open). */
function countCheckpoints(ctx: Context): void {
  ctx.counts.set('(delta checkpoints)', (ctx.counts.get('(delta checkpoints)') ?? 0) + ctx.lun.device.stats().delta!.checkpoints);
}

function expectCacheChurn(cache: ChunkCache): void {
  const s = cache.stats();
  console.log(`mount-model: cache evictions ${s.evictions}, recycled buffers ${s.recycledBuffers}, cross-mount hits ${s.crossMountHits}`);
  expect(s.evictions).toBeGreaterThan(10);
  expect(s.recycledBuffers).toBeGreaterThan(0);
}

describe('mounted restore point against a model (SCSI layer, small cache, delta, restarts)', () => {
  for (const v of variants) {
    for (const seed of seedsFor(v.seed)) {
      it(`${v.name} (seed ${seed})`, async () => {
        const cache = await newCache(v);
        await walk(v, seed, cache, 'alone', STEPS);
        expectCacheChurn(cache);
        // The backup is read-only: every repository file is byte-identical.
        expect(await hashTree(repo)).toEqual(repoHashes);
      });
    }
  }

  for (const seed of seedsFor(0x5eed0003)) {
    it(`two mounts (full and incremental point) at once on one small shared cache (seed ${seed})`, async () => {
      const cache = await newCache({ ...variants[0]!, cacheChunks: 5 });
      // The two walks interleave at every await: shared chunks (same digest in both points) are loaded,
      // evicted and recycled under one mount while the other reads them.
      await Promise.all([
        walk(variants[0]!, seed, cache, 'shared', Math.ceil(STEPS / 2)),
        walk(variants[1]!, seed ^ 0x9e3779b9, cache, 'shared', Math.ceil(STEPS / 2)),
      ]);
      expectCacheChurn(cache);
      expect(cache.stats().crossMountHits).toBeGreaterThan(0);
      expect(await hashTree(repo)).toEqual(repoHashes);
    });
  }
});
