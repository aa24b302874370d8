/**
 * The write delta of one mount, on local disk. The backup is never written: every write, UNMAP and
 * WRITE SAME lands here. On-disk format and crash rules: docs/delta-format.md.
 *
 *   <dir>/data     sparse file, the size of the LUN; a unit's data sits at its own LUN offset
 *   <dir>/map      checkpoint of the unit map (two bitmaps) + the last journal sequence it covers
 *   <dir>/journal  append-only records (extent, state, per-sector CRCs of written data) with CRC,
 *                  written before a write is acknowledged; replayed over the checkpoint on open
 *
 * Ordering: a write's journal record (with the CRC of every sector it writes) reaches the journal file
 * before its data reaches the data file, so no data lands in the data file without a record that
 * recovery can check it against. FLUSH (SYNCHRONIZE CACHE, SBC-3 5.22) = fdatasync(data) then a
 * barrier record covering the records whose data was written, then fdatasync(journal). A FUA write
 * (SBC-3 5.41, FUA bit) fdatasyncs data and journal before it is acknowledged. A unit that an
 * unflushed record brought into the delta is only replayed if its sectors hold data of that or a later
 * write (sector CRCs), so after a crash each block reads its old or its new content, never a hole where
 * a read-modify-write fill was lost.
 */
import { constants as fsConstants, promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { crc32 } from 'node:zlib';
import { StorageError, writeFailure } from '../block-device.js';
import type { Logger } from '../log.js';
import { RangeLock } from './range-lock.js';
import { UNIT_BASE, UNIT_PRESENT, UNIT_ZERO, UnitMap, type UnitState } from './unit-map.js';

/** The journal and data file address 512-byte sectors. */
export const SECTOR = 512;
export const DEFAULT_UNIT_SIZE = 4096;

const MAP_MAGIC = Buffer.from('BRDM', 'latin1');
const MAP_VERSION = 1;
const MAP_HEADER_SIZE = 64;
const RECORD_MAGIC = Buffer.from('BRJ1', 'latin1');
/** Size of a record header; a present record is followed by 4 bytes per sector (docs/delta-format.md). */
export const RECORD_SIZE = 32;
const RECORD_PRESENT = 1;
const RECORD_ZERO = 2;
const RECORD_BARRIER = 3;
/**
 * Record flag of older versions: the record's data was fdatasync'ed before the record was written
 * (FUA write). Not written any more; such records in a journal are still trusted on recovery.
 */
const FLAG_DATA_DURABLE = 1;
/** A present record carries one CRC per sector; more sectors than this in one record means garbage. */
const MAX_PRESENT_RECORD_SECTORS = 1 << 20;
/** blockCount is a u32; large UNMAPs are split. */
const MAX_RECORD_BLOCKS = 0x8000_0000;

/**
 * Reads the base (backup) content of a byte range for read-modify-write of a partly written unit.
 * The returned buffer is only read.
 */
export type BaseReader = (offset: number, length: number) => Promise<Buffer>;

export interface DeltaStoreOptions {
  readonly dir: string;
  /** LUN size in bytes (a multiple of 512). */
  readonly sizeBytes: number;
  /** Map granularity in bytes: a power of two, 512..65536. Default 4096. Fixed when the delta is created. */
  readonly unitSize?: number;
  /** Checkpoint the map (and empty the journal) after a flush once the journal exceeds this. Default 4 MiB. */
  readonly checkpointJournalBytes?: number;
  readonly logger: Logger;
}

export interface DeltaStoreStats {
  readonly unitSize: number;
  readonly unitCount: number;
  readonly presentUnits: number;
  readonly zeroUnits: number;
  /** Bytes of LUN held in the delta (present units × unit size). */
  readonly deltaBytes: number;
  readonly bytesWritten: number;
  readonly writes: number;
  readonly flushes: number;
  readonly checkpoints: number;
  readonly journalBytes: number;
  /** Records replayed when this delta was opened (crash recovery). */
  readonly recoveredRecords: number;
  /**
   * Units an unflushed record would have brought into the delta but whose data could not be verified
   * in the data file on recovery: they kept their previous content.
   */
  readonly discardedUnits: number;
  /** Why this delta refuses writes (a failed journal append: until a checkpoint succeeds; a failed sync: until it is opened again); absent while it takes them. */
  readonly refusingWrites?: string;
}

interface JournalRecord {
  readonly type: number;
  readonly flags: number;
  readonly seq: number;
  /** First sector (RECORD_BARRIER: the last sequence number whose data the barrier covers). */
  readonly first: number;
  readonly blocks: number;
  /** RECORD_PRESENT: CRC-32 of each written sector, in order (`blocks` entries). */
  readonly sectorCrcs?: Uint32Array;
}

interface PendingAppend {
  readonly record: Buffer;
  readonly resolve: () => void;
  readonly reject: (err: unknown) => void;
}

export class DeltaStore {
  readonly dir: string;
  readonly sizeBytes: number;
  readonly unitSize: number;
  readonly unitCount: number;
  readonly map: UnitMap;

  private readonly logger: Logger;
  private readonly checkpointJournalBytes: number;
  private readonly locks = new RangeLock();
  private nextSeq: number;
  /**
   * Present records whose data write has not completed (or failed): a barrier only covers records
   * below the smallest of them. Failed ones stay until the next checkpoint, which supersedes them.
   */
  private readonly dataNotWritten = new Set<number>();
  private dataWriteFailed = false;
  private journalEnd = 0;
  private pendingAppends: PendingAppend[] = [];
  private appending = false;
  /**
   * Set when a journal write or a sync failed: the delta refuses further writes. After a failed
   * journal write (`healable`) a checkpoint can put it right (heal()); after a failed sync nothing can.
   */
  private broken: Error | null = null;
  private healable = false;
  private healing: Promise<void> | null = null;
  private lastHealAttempt = -Infinity;
  private closed = false;
  private activeOps = 0;
  private drained: (() => void) | null = null;
  private exclusive: Promise<void> | null = null;
  private counters = { bytesWritten: 0, writes: 0, flushes: 0, checkpoints: 0, recoveredRecords: 0, discardedUnits: 0 };

  private constructor(
    options: DeltaStoreOptions,
    unitSize: number,
    map: UnitMap,
    lastSeq: number,
    private readonly dataFile: FileHandle,
    private readonly journalFile: FileHandle,
  ) {
    this.dir = options.dir;
    this.sizeBytes = options.sizeBytes;
    this.unitSize = unitSize;
    this.unitCount = map.unitCount;
    this.map = map;
    this.logger = options.logger;
    this.checkpointJournalBytes = options.checkpointJournalBytes ?? 4 * 1024 * 1024;
    this.nextSeq = lastSeq + 1;
  }

  /** Open the delta in `dir`, creating it if absent, and recover it after a crash if needed. */
  static async open(options: DeltaStoreOptions): Promise<DeltaStore> {
    const { dir, sizeBytes, logger } = options;
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR !== 0) {
      throw new RangeError(`delta size must be a positive multiple of ${SECTOR} (got ${sizeBytes})`);
    }
    const requestedUnit = options.unitSize ?? DEFAULT_UNIT_SIZE;
    if (!isValidUnitSize(requestedUnit)) throw new RangeError(`delta unit size must be a power of two in 512..65536 (got ${requestedUnit})`);
    await fsp.mkdir(dir, { recursive: true });
    const mapPath = path.join(dir, 'map');
    const dataPath = path.join(dir, 'data');
    const journalPath = path.join(dir, 'journal');

    let mapBuf: Buffer | null = null;
    try {
      mapBuf = await fsp.readFile(mapPath);
    } catch (err) {
      if (!isErrno(err, 'ENOENT')) throw err;
    }
    if (mapBuf === null) {
      // New delta (or a crash before the first map was renamed into place: nothing was acknowledged yet).
      const unitCount = Math.ceil(sizeBytes / requestedUnit);
      const map = new UnitMap(unitCount);
      const data = await fsp.open(dataPath, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
      const journal = await fsp.open(journalPath, fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
      try {
        await data.truncate(sizeBytes);
        await data.sync();
        await journal.sync();
        await writeMapFile(dir, encodeMap(map, requestedUnit, sizeBytes, 0));
      } catch (err) {
        await data.close();
        await journal.close();
        throw err;
      }
      logger.info({ dir, sizeBytes, unitSize: requestedUnit }, 'delta created');
      return new DeltaStore(options, requestedUnit, map, 0, data, journal);
    }

    const checkpoint = decodeMap(mapBuf, mapPath);
    if (checkpoint.sizeBytes !== sizeBytes) {
      throw new StorageError(`delta ${dir} is for a ${checkpoint.sizeBytes}-byte LUN, not ${sizeBytes}`, 'medium-error');
    }
    let data: FileHandle;
    try {
      data = await fsp.open(dataPath, fsConstants.O_RDWR);
    } catch (err) {
      throw new StorageError(`delta ${dir} is incomplete: cannot open its data file (${errorText(err)})`, 'medium-error', { cause: err });
    }
    let journal: FileHandle;
    try {
      journal = await fsp.open(journalPath, fsConstants.O_RDWR | fsConstants.O_CREAT, 0o600);
    } catch (err) {
      await data.close();
      throw err;
    }
    try {
      const st = await data.stat();
      if (st.size < sizeBytes) await data.truncate(sizeBytes);
      const store = new DeltaStore(options, checkpoint.unitSize, checkpoint.map, checkpoint.lastSeq, data, journal);
      await store.recover();
      return store;
    } catch (err) {
      await data.close();
      await journal.close();
      throw err;
    }
  }

  state(unit: number): UnitState {
    return this.map.state(unit);
  }

  /** Read `length` bytes of the data file at LUN offset `position` into `target[targetOffset..]`. */
  async readInto(target: Buffer, targetOffset: number, length: number, position: number): Promise<void> {
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.dataFile.read(target, targetOffset + done, length - done, position + done);
        if (bytesRead === 0) {
          // Beyond the end of a data file that was truncated under us: a hole reads as zeroes.
          target.fill(0, targetOffset + done, targetOffset + length);
          return;
        }
        done += bytesRead;
      }
    } catch (err) {
      throw new StorageError(`delta read at ${position}+${length} failed: ${errorText(err)}`, 'medium-error', { cause: err });
    }
  }

  /**
   * Write `data` (a multiple of 512 bytes) at LUN byte `offset`. Parts of a map unit that is not yet in
   * the delta are filled from the base (`readBase`) or with zeroes (deallocated unit) first, under a lock
   * on the units, so concurrent writes to one unit cannot lose each other's data.
   */
  async write(offset: number, data: Buffer, fua: boolean, readBase: BaseReader): Promise<void> {
    this.checkExtent(offset, data.length);
    if (data.length === 0) return;
    await this.enter();
    try {
      await this.writeLocked(offset, data, fua, readBase);
    } finally {
      this.leave();
    }
    this.maybeCheckpointInBackground();
  }

  /**
   * Deallocate [offset, offset+length): whole units become UNIT_ZERO; the parts of partly covered units
   * are written with zeroes (so they read as zeroes too, SBC-3 4.7.3.4 LBPRZ).
   */
  async deallocate(offset: number, length: number, readBase: BaseReader): Promise<void> {
    this.checkExtent(offset, length);
    if (length === 0) return;
    await this.enter();
    try {
      const end = offset + length;
      const u = this.unitSize;
      const firstFull = Math.ceil(offset / u);
      let endFull = Math.floor(end / u);
      if (end === this.sizeBytes) endFull = this.unitCount; // a short last unit counts as whole
      const partials: Array<[number, number]> = [];
      if (endFull > firstFull) {
        if (offset < firstFull * u) partials.push([offset, firstFull * u]);
        if (endFull * u < end && endFull < this.unitCount) partials.push([endFull * u, end]);
      } else {
        partials.push([offset, end]);
      }
      for (const [from, to] of partials) {
        const firstUnit = Math.floor(from / u);
        const endUnit = Math.ceil(to / u);
        let alreadyZero = true;
        for (let unit = firstUnit; unit < endUnit && alreadyZero; unit++) alreadyZero = this.map.state(unit) === UNIT_ZERO;
        if (!alreadyZero) await this.writeLocked(from, Buffer.alloc(to - from), false, readBase);
      }
      if (endFull > firstFull) {
        const release = await this.locks.acquire(firstFull, endFull);
        try {
          const firstSector = (firstFull * u) / SECTOR;
          const endSector = Math.min(endFull * u, this.sizeBytes) / SECTOR;
          for (let s = firstSector; s < endSector; s += MAX_RECORD_BLOCKS) {
            await this.appendRecord(RECORD_ZERO, 0, s, Math.min(MAX_RECORD_BLOCKS, endSector - s));
          }
          this.map.setRange(firstFull, endFull, UNIT_ZERO);
        } finally {
          release();
        }
      }
    } finally {
      this.leave();
    }
    this.maybeCheckpointInBackground();
  }

  /** Make every write acknowledged so far durable: fdatasync(data), barrier record, fdatasync(journal). */
  async flush(): Promise<void> {
    await this.enter();
    let checkpointDue = false;
    try {
      const coversSeq = this.lastSeqWithData();
      await this.syncData();
      await this.appendRecord(RECORD_BARRIER, 0, coversSeq, 0);
      await this.syncJournal();
      this.counters.flushes++;
      // A failed data write keeps later records out of every barrier until a checkpoint supersedes it.
      checkpointDue = this.journalEnd >= this.checkpointJournalBytes || this.dataWriteFailed;
    } finally {
      this.leave();
    }
    if (checkpointDue) await this.checkpoint();
  }

  /**
   * Write the map checkpoint and empty the journal. Waits for running operations and holds new ones.
   * Called after a flush when the journal is large, on open (after recovery) and on close.
   */
  async checkpoint(): Promise<void> {
    await this.whileExclusive(async () => {
      this.checkUsable();
      await this.writeCheckpoint();
    });
  }

  /** Run `body` with no other operation running or starting (waits for running ones to finish). */
  private async whileExclusive(body: () => Promise<void>): Promise<void> {
    while (this.exclusive !== null) await this.exclusive;
    let done!: () => void;
    this.exclusive = new Promise<void>((resolve) => {
      done = resolve;
    });
    try {
      if (this.activeOps > 0) {
        await new Promise<void>((resolve) => {
          this.drained = resolve;
        });
      }
      await body();
    } finally {
      this.exclusive = null;
      done();
    }
  }

  /** The checkpoint itself; the caller holds the store exclusively. */
  private async writeCheckpoint(): Promise<void> {
    await this.syncData();
    await writeMapFile(this.dir, encodeMap(this.map, this.unitSize, this.sizeBytes, this.nextSeq - 1));
    // No write is running: what is left are records of failed data writes, which the map leaves out.
    this.dataNotWritten.clear();
    this.dataWriteFailed = false;
    // A crash before this truncate leaves records ≤ lastSeq in the journal: replay skips them.
    await this.journalFile.truncate(0);
    try {
      await this.journalFile.sync();
    } catch (err) {
      throw this.breakOnSyncFailure('journal', err);
    }
    this.journalEnd = 0;
    this.counters.checkpoints++;
  }

  /**
   * After a failed journal append (typically: no space), a checkpoint puts the delta right again: the
   * map records every write that completed, `lastSeq` covers the sequence numbers of the records that
   * failed, and the journal starts empty. Tried by the next write, flush or deallocation (at most once
   * a second); until one succeeds they fail with the append's error. Never after a failed sync.
   */
  private heal(): Promise<void> {
    this.healing ??= this.whileExclusive(async () => {
      const reason = this.broken;
      if (reason === null || !this.healable || this.closed) return;
      this.lastHealAttempt = performance.now();
      this.broken = null;
      try {
        await this.writeCheckpoint();
        this.healable = false;
        this.logger.warn({ dir: this.dir }, 'delta takes writes again (a checkpoint after the failed journal write succeeded)');
      } catch (err) {
        // A failed sync has set `broken` for good; anything else (no room for the map yet) keeps the old reason.
        this.broken ??= reason;
        this.logger.debug({ err, dir: this.dir }, 'delta still cannot checkpoint');
      }
    }).finally(() => {
      this.healing = null;
    });
    return this.healing;
  }

  /** Checkpoint and close the files. Further calls fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.healing !== null) await this.healing; // it clears `broken` while it runs
    try {
      if (this.broken === null) await this.checkpoint();
    } finally {
      this.closed = true;
      await this.dataFile.close();
      await this.journalFile.close();
    }
  }

  stats(): DeltaStoreStats {
    const { present, zero } = this.map.counts();
    return {
      unitSize: this.unitSize,
      unitCount: this.unitCount,
      presentUnits: present,
      zeroUnits: zero,
      deltaBytes: present * this.unitSize,
      journalBytes: this.journalEnd,
      ...this.counters,
      ...(this.broken !== null ? { refusingWrites: this.broken.message } : {}),
    };
  }

  // ---- internals -------------------------------------------------------------------------------

  /**
   * An initiator that never flushes would grow the journal without bound: past twice the threshold,
   * checkpoint (which syncs the data file first) without waiting for a flush.
   */
  private maybeCheckpointInBackground(): void {
    if (this.journalEnd < 2 * this.checkpointJournalBytes || this.exclusive !== null || this.closed || this.broken !== null) return;
    this.checkpoint().catch((err: unknown) => {
      this.logger.error({ err, dir: this.dir }, 'delta checkpoint failed');
    });
  }

  private async writeLocked(offset: number, data: Buffer, fua: boolean, readBase: BaseReader): Promise<void> {
    const u = this.unitSize;
    const end = offset + data.length;
    const firstUnit = Math.floor(offset / u);
    const endUnit = Math.ceil(end / u);
    const release = await this.locks.acquire(firstUnit, endUnit);
    try {
      this.checkUsable();
      // Read-modify-write: a unit entering the delta must hold complete content.
      const headFill = offset % u !== 0 && this.map.state(firstUnit) !== UNIT_PRESENT;
      const lastUnitEnd = Math.min(endUnit * u, this.sizeBytes);
      const tailFill = end < lastUnitEnd && this.map.state(endUnit - 1) !== UNIT_PRESENT;
      let extentStart = offset;
      let extent = data;
      if (headFill || tailFill) {
        extentStart = headFill ? firstUnit * u : offset;
        const extentEnd = tailFill ? lastUnitEnd : end;
        extent = Buffer.allocUnsafe(extentEnd - extentStart);
        if (headFill) await this.fillFromOld(extent, 0, extentStart, offset - extentStart, firstUnit, readBase);
        data.copy(extent, offset - extentStart);
        if (tailFill) await this.fillFromOld(extent, end - extentStart, end, extentEnd - end, endUnit - 1, readBase);
      }
      // The record first: data in the data file always has a record that recovery checks it against.
      const seq = this.nextSeq++;
      this.dataNotWritten.add(seq);
      await this.appendRecord(RECORD_PRESENT, 0, extentStart / SECTOR, extent.length / SECTOR, sectorCrcsOf(extent), seq);
      try {
        await this.pwriteData(extent, extentStart);
      } catch (err) {
        this.dataWriteFailed = true; // seq stays in dataNotWritten: no barrier may cover it
        throw err;
      }
      this.dataNotWritten.delete(seq);
      if (fua) await Promise.all([this.syncData(), this.syncJournal()]);
      this.map.setRange(firstUnit, endUnit, UNIT_PRESENT);
      this.counters.writes++;
      this.counters.bytesWritten += data.length;
    } finally {
      release();
    }
  }

  /** Fill target[at..at+length) with the current (pre-write) content of a unit not in the delta. */
  private async fillFromOld(target: Buffer, at: number, offset: number, length: number, unit: number, readBase: BaseReader): Promise<void> {
    if (this.map.state(unit) === UNIT_ZERO) {
      target.fill(0, at, at + length);
      return;
    }
    const base = await readBase(offset, length);
    if (base.length !== length) throw new StorageError(`base read returned ${base.length} bytes, expected ${length}`, 'medium-error');
    base.copy(target, at);
  }

  private async pwriteData(buf: Buffer, position: number): Promise<void> {
    let done = 0;
    try {
      while (done < buf.length) {
        const { bytesWritten } = await this.dataFile.write(buf, done, buf.length - done, position + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw writeFailure(`delta write at ${position}+${buf.length} failed: ${errorText(err)}`, err);
    }
  }

  private async syncData(): Promise<void> {
    try {
      await this.dataFile.datasync();
    } catch (err) {
      throw this.breakOnSyncFailure('data', err);
    }
  }

  private async syncJournal(): Promise<void> {
    try {
      await this.journalFile.datasync();
    } catch (err) {
      throw this.breakOnSyncFailure('journal', err);
    }
  }

  /**
   * A failed fdatasync is final: the kernel may have dropped the dirty pages it could not write and
   * marked them clean, so a later sync that succeeds would not mean they are on disk, and a later
   * barrier would cover lost writes. The store refuses writes and flushes from then on (reads go on)
   * with a WRITE ERROR — never "out of space", which makes initiators retry — until it is opened
   * again; recovery then checks every unflushed record against the data file.
   */
  private breakOnSyncFailure(file: 'data' | 'journal', err: unknown): Error {
    const replacesHealable = this.healable;
    this.healable = false;
    if (this.broken === null || replacesHealable) {
      this.broken = new StorageError(`delta ${file} sync failed: ${errorText(err)}; this mount refuses writes until it is mounted again`, 'write-error', {
        cause: err,
      });
      this.logger.error({ err, dir: this.dir }, `delta ${file} sync failed: refusing further writes to this mount`);
    }
    return this.broken;
  }

  /** The highest seq such that every present record up to it has its data in the data file. */
  private lastSeqWithData(): number {
    let covered = this.nextSeq - 1;
    for (const seq of this.dataNotWritten) if (seq <= covered) covered = seq - 1;
    return covered;
  }

  /**
   * Append one record; records reach the file in sequence order (batched into one write when queued).
   * `seq` defaults to the next one; a caller that takes it itself must append without awaiting anything
   * in between, so the queue stays in sequence order.
   */
  private appendRecord(type: number, flags: number, first: number, blocks: number, sectorCrcs?: Uint32Array, seq = this.nextSeq++): Promise<void> {
    const record = encodeRecord({ type, flags, seq, first, blocks, ...(sectorCrcs !== undefined ? { sectorCrcs } : {}) });
    return new Promise<void>((resolve, reject) => {
      this.pendingAppends.push({ record, resolve, reject });
      if (!this.appending) void this.pumpAppends();
    });
  }

  private async pumpAppends(): Promise<void> {
    this.appending = true;
    while (this.pendingAppends.length > 0) {
      const batch = this.pendingAppends;
      this.pendingAppends = [];
      try {
        if (this.broken !== null) throw this.broken;
        const buf = batch.length === 1 ? batch[0]!.record : Buffer.concat(batch.map((p) => p.record));
        let done = 0;
        while (done < buf.length) {
          const { bytesWritten } = await this.journalFile.write(buf, done, buf.length - done, this.journalEnd + done);
          done += bytesWritten;
        }
        this.journalEnd += buf.length;
        for (const p of batch) p.resolve();
      } catch (err) {
        if (this.broken === null) {
          this.broken = writeFailure(`delta journal write failed: ${errorText(err)}; writes fail until a checkpoint succeeds (tried once a second)`, err);
          this.healable = true;
          this.logger.error({ err, dir: this.dir }, 'delta journal write failed: writes fail until a checkpoint succeeds');
        }
        for (const p of batch) p.reject(this.broken);
      }
    }
    this.appending = false;
  }

  private checkExtent(offset: number, length: number): void {
    if (offset % SECTOR !== 0 || length % SECTOR !== 0 || offset < 0 || offset + length > this.sizeBytes) {
      throw new RangeError(`delta extent ${offset}+${length} is not sector-aligned inside 0..${this.sizeBytes}`);
    }
  }

  private checkUsable(): void {
    if (this.closed) throw new StorageError(`delta ${this.dir} is closed`, 'write-error');
    if (this.broken !== null) throw this.broken;
  }

  private async enter(): Promise<void> {
    while (this.exclusive !== null) await this.exclusive;
    if (this.broken !== null && this.healable && !this.closed && performance.now() - this.lastHealAttempt >= 1000) {
      await this.heal();
      while (this.exclusive !== null) await this.exclusive;
    }
    this.checkUsable();
    this.activeOps++;
  }

  private leave(): void {
    this.activeOps--;
    if (this.activeOps === 0 && this.drained !== null) {
      const wake = this.drained;
      this.drained = null;
      wake();
    }
  }

  /** Replay the journal over the checkpoint, then checkpoint the result (empties the journal). */
  private async recover(): Promise<void> {
    const journal = await this.journalFile.readFile();
    const lastCheckpointSeq = this.nextSeq - 1;
    const records: JournalRecord[] = [];
    let expected = lastCheckpointSeq + 1;
    for (let at = 0; at + RECORD_SIZE <= journal.length; ) {
      const decoded = decodeRecord(journal, at);
      if (decoded === null) break; // torn or never written: the end of the journal
      at = decoded.next;
      const rec = decoded.record;
      if (rec.seq <= lastCheckpointSeq) continue; // already in the checkpoint
      if (rec.seq !== expected) break;
      records.push(rec);
      expected++;
    }
    let trustedSeq = 0;
    for (const rec of records) if (rec.type === RECORD_BARRIER) trustedSeq = Math.max(trustedSeq, rec.first);
    const isTrusted = (rec: JournalRecord): boolean => rec.seq <= trustedSeq || (rec.flags & FLAG_DATA_DURABLE) !== 0;

    // For each sector written by an unflushed present record: the CRC of what the data file holds now,
    // and the CRCs it may legitimately hold (those of every present record that wrote it; a unit is
    // checked against the ones of its record's seq or later, trusted records included).
    const onDisk = new Map<number, number>();
    for (const rec of records) {
      if (rec.type !== RECORD_PRESENT || isTrusted(rec) || !this.extentInside(rec)) continue;
      const content = Buffer.allocUnsafe(rec.blocks * SECTOR);
      await this.readInto(content, 0, content.length, rec.first * SECTOR);
      const actual = sectorCrcsOf(content);
      for (let i = 0; i < rec.blocks; i++) onDisk.set(rec.first + i, actual[i]!);
    }
    const candidates = new Map<number, Array<{ seq: number; crc: number }>>();
    for (const rec of records) {
      if (rec.type !== RECORD_PRESENT || !this.extentInside(rec)) continue;
      for (let i = 0; i < rec.blocks; i++) {
        const sector = rec.first + i;
        if (!onDisk.has(sector)) continue;
        let list = candidates.get(sector);
        if (list === undefined) candidates.set(sector, (list = []));
        list.push({ seq: rec.seq, crc: rec.sectorCrcs![i]! });
      }
    }

    const u = this.unitSize;
    const sectorsPerUnit = u / SECTOR;
    let replayed = 0;
    let discardedUnits = 0;
    for (const rec of records) {
      if (rec.type === RECORD_BARRIER) continue;
      if (!this.extentInside(rec)) continue;
      const start = rec.first * SECTOR;
      const end = start + rec.blocks * SECTOR;
      const firstUnit = Math.floor(start / u);
      const endUnit = Math.ceil(end / u);
      replayed++;
      if (rec.type === RECORD_ZERO) {
        this.map.setRange(firstUnit, endUnit, UNIT_ZERO);
        continue;
      }
      if (isTrusted(rec)) {
        this.map.setRange(firstUnit, endUnit, UNIT_PRESENT);
        continue;
      }
      // Unflushed: a unit already in the delta stays there; a unit this record brought in (whole, with
      // its read-modify-write fill) only if every sector of it holds data of this or a later write.
      for (let unit = firstUnit; unit < endUnit; unit++) {
        if (this.map.state(unit) === UNIT_PRESENT) continue;
        const unitFirst = unit * sectorsPerUnit;
        const unitEnd = Math.min(unitFirst + sectorsPerUnit, this.sizeBytes / SECTOR);
        let verified = unitFirst >= rec.first && unitEnd <= rec.first + rec.blocks;
        for (let sector = unitFirst; verified && sector < unitEnd; sector++) {
          const crc = onDisk.get(sector);
          verified = crc !== undefined && (candidates.get(sector) ?? []).some((c) => c.seq >= rec.seq && c.crc === crc);
        }
        if (verified) this.map.setRange(unit, unit + 1, UNIT_PRESENT);
        else discardedUnits++;
      }
    }
    this.nextSeq = Math.max(this.nextSeq, expected);
    this.counters.recoveredRecords = replayed;
    this.counters.discardedUnits = discardedUnits;
    if (records.length > 0 || journal.length > 0) {
      this.logger.info({ dir: this.dir, replayed, discardedUnits, journalBytes: journal.length }, 'delta journal replayed');
    }
    await this.checkpoint();
  }

  private extentInside(rec: JournalRecord): boolean {
    return rec.blocks > 0 && (rec.first + rec.blocks) * SECTOR <= this.sizeBytes;
  }
}

function isValidUnitSize(n: number): boolean {
  return Number.isInteger(n) && n >= SECTOR && n <= 65536 && (n & (n - 1)) === 0;
}

/** CRC-32 of each 512-byte sector of `data`. */
function sectorCrcsOf(data: Buffer): Uint32Array {
  const crcs = new Uint32Array(data.length / SECTOR);
  for (let i = 0; i < crcs.length; i++) crcs[i] = crc32(data.subarray(i * SECTOR, (i + 1) * SECTOR));
  return crcs;
}

function encodeRecord(rec: JournalRecord): Buffer {
  const payloadBytes = rec.sectorCrcs === undefined ? 0 : rec.sectorCrcs.length * 4;
  const b = Buffer.alloc(RECORD_SIZE + payloadBytes);
  RECORD_MAGIC.copy(b, 0);
  b.writeUInt8(rec.type, 4);
  b.writeUInt8(rec.flags, 5);
  b.writeUIntLE(rec.seq, 6, 6);
  b.writeUIntLE(rec.first, 12, 6);
  b.writeUInt32LE(rec.blocks, 20);
  if (rec.sectorCrcs !== undefined) {
    for (let i = 0; i < rec.sectorCrcs.length; i++) b.writeUInt32LE(rec.sectorCrcs[i]!, RECORD_SIZE + 4 * i);
    b.writeUInt32LE(crc32(b.subarray(RECORD_SIZE)), 24);
  }
  b.writeUInt32LE(crc32(b.subarray(0, 28)), 28);
  return b;
}

/** The record at `at` and the offset after it, or null if it is torn, zeroed or not a record. */
function decodeRecord(buf: Buffer, at: number): { record: JournalRecord; next: number } | null {
  if (buf.compare(RECORD_MAGIC, 0, 4, at, at + 4) !== 0) return null;
  if (crc32(buf.subarray(at, at + 28)) !== buf.readUInt32LE(at + 28)) return null;
  const type = buf.readUInt8(at + 4);
  if (type !== RECORD_PRESENT && type !== RECORD_ZERO && type !== RECORD_BARRIER) return null;
  const header = {
    type,
    flags: buf.readUInt8(at + 5),
    seq: buf.readUIntLE(at + 6, 6),
    first: buf.readUIntLE(at + 12, 6),
    blocks: buf.readUInt32LE(at + 20),
  };
  if (type !== RECORD_PRESENT) return { record: header, next: at + RECORD_SIZE };
  if (header.blocks > MAX_PRESENT_RECORD_SECTORS) return null;
  const payloadEnd = at + RECORD_SIZE + 4 * header.blocks;
  if (payloadEnd > buf.length) return null; // torn: the sector CRCs did not all reach the file
  const payload = buf.subarray(at + RECORD_SIZE, payloadEnd);
  if (crc32(payload) !== buf.readUInt32LE(at + 24)) return null;
  const sectorCrcs = new Uint32Array(header.blocks);
  for (let i = 0; i < header.blocks; i++) sectorCrcs[i] = payload.readUInt32LE(4 * i);
  return { record: { ...header, sectorCrcs }, next: payloadEnd };
}

function encodeMap(map: UnitMap, unitSize: number, sizeBytes: number, lastSeq: number): Buffer {
  const bitmapBytes = map.present.length;
  const b = Buffer.alloc(MAP_HEADER_SIZE + 2 * bitmapBytes);
  MAP_MAGIC.copy(b, 0);
  b.writeUInt32LE(MAP_VERSION, 4);
  b.writeUInt32LE(unitSize, 8);
  b.writeUIntLE(sizeBytes, 16, 6);
  b.writeUIntLE(map.unitCount, 24, 6);
  b.writeUIntLE(lastSeq, 32, 6);
  b.writeUInt32LE(bitmapBytes, 40);
  b.set(map.present, MAP_HEADER_SIZE);
  b.set(map.zero, MAP_HEADER_SIZE + bitmapBytes);
  b.writeUInt32LE(crc32(b.subarray(MAP_HEADER_SIZE)), 44);
  b.writeUInt32LE(crc32(b.subarray(0, 60)), 60);
  return b;
}

function decodeMap(b: Buffer, file: string): { map: UnitMap; unitSize: number; sizeBytes: number; lastSeq: number } {
  const bad = (why: string): StorageError => new StorageError(`delta map ${file} is damaged: ${why}`, 'medium-error');
  if (b.length < MAP_HEADER_SIZE || b.compare(MAP_MAGIC, 0, 4, 0, 4) !== 0) throw bad('not a delta map');
  if (crc32(b.subarray(0, 60)) !== b.readUInt32LE(60)) throw bad('header CRC mismatch');
  const version = b.readUInt32LE(4);
  if (version !== MAP_VERSION) throw bad(`unsupported version ${version}`);
  const unitSize = b.readUInt32LE(8);
  const sizeBytes = b.readUIntLE(16, 6);
  const unitCount = b.readUIntLE(24, 6);
  const lastSeq = b.readUIntLE(32, 6);
  const bitmapBytes = b.readUInt32LE(40);
  if (!isValidUnitSize(unitSize) || unitCount !== Math.ceil(sizeBytes / unitSize) || bitmapBytes !== Math.ceil(unitCount / 8)) {
    throw bad('inconsistent sizes');
  }
  if (b.length !== MAP_HEADER_SIZE + 2 * bitmapBytes) throw bad(`length ${b.length}, expected ${MAP_HEADER_SIZE + 2 * bitmapBytes}`);
  if (crc32(b.subarray(MAP_HEADER_SIZE)) !== b.readUInt32LE(44)) throw bad('bitmap CRC mismatch');
  const present = new Uint8Array(bitmapBytes);
  const zero = new Uint8Array(bitmapBytes);
  present.set(b.subarray(MAP_HEADER_SIZE, MAP_HEADER_SIZE + bitmapBytes));
  zero.set(b.subarray(MAP_HEADER_SIZE + bitmapBytes));
  return { map: new UnitMap(unitCount, present, zero), unitSize, sizeBytes, lastSeq };
}

/** Atomically replace <dir>/map: write map.tmp, fsync, rename, fsync the directory. */
async function writeMapFile(dir: string, content: Buffer): Promise<void> {
  const tmp = path.join(dir, 'map.tmp');
  const fh = await fsp.open(tmp, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_TRUNC, 0o600);
  try {
    await fh.writeFile(content);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fsp.rename(tmp, path.join(dir, 'map'));
  const dh = await fsp.open(dir, fsConstants.O_RDONLY);
  try {
    await dh.sync();
  } finally {
    await dh.close();
  }
}

function isErrno(err: unknown, code: string): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === code;
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

export { UNIT_BASE, UNIT_PRESENT, UNIT_ZERO };
