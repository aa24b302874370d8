/**
 * DeltaStore on-disk behaviour: recovery from a torn journal tail, from writes whose data never
 * reached the data file (simulated power loss: journal record present, data absent), clear errors
 * for damaged or mismatched files.
 */
import { cp, mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeltaStore, RECORD_SIZE, UNIT_BASE, UNIT_PRESENT, UNIT_ZERO } from '../../../src/cache/delta-store.js';
import { silentLogger } from '../../../src/log.js';
import type { StorageError } from '../../../src/block-device.js';
import { patternBytes } from '../../helpers/fake-restore-point.js';

const SIZE = 1024 * 1024;
const base = patternBytes(SIZE, 123);
const readBase = async (offset: number, length: number): Promise<Buffer> => base.subarray(offset, offset + length);
const logger = silentLogger();

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-delta-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/** An errno error as node:fs raises it. */
function errnoError(code: string, message: string): Error {
  return Object.assign(new Error(`${code}: ${message}`), { code });
}

/** Make `file`'s writes throw what `failure()` returns (nothing: the write goes through). */
function injectWriteFailures(file: FileHandle, failure: () => Error | undefined): void {
  const write = file.write.bind(file) as (...args: unknown[]) => Promise<unknown>;
  (file as unknown as { write: (...args: unknown[]) => Promise<unknown> }).write = async (...args: unknown[]) => {
    const err = failure();
    if (err !== undefined) throw err;
    return write(...args);
  };
}

/** What a reader of base + delta sees for [offset, offset+length). */
async function view(store: DeltaStore, offset: number, length: number): Promise<Buffer> {
  const out = Buffer.alloc(length);
  for (let at = offset; at < offset + length; at += store.unitSize) {
    const state = store.state(at / store.unitSize);
    if (state === UNIT_PRESENT) await store.readInto(out, at - offset, store.unitSize, at);
    else if (state === UNIT_BASE) base.copy(out, at - offset, at, at + store.unitSize);
  }
  return out;
}

describe('DeltaStore', () => {
  it('replays the journal after a crash without close, and stops at a torn tail record', async () => {
    const dir = join(scratch, 'torn');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(0, Buffer.alloc(4096, 1), false, readBase);
    await store.write(8192, Buffer.alloc(512, 2), false, readBase); // RMW of unit 2
    await store.deallocate(16384, 8192, readBase);
    await store.flush();
    // "Crash": copy the files as they are now (no close, no checkpoint), plus half a record of garbage.
    const crashed = join(scratch, 'torn-copy');
    await cp(dir, crashed, { recursive: true });
    await store.close();
    const journal = join(crashed, 'journal');
    const before = (await stat(journal)).size;
    // 2 write records (each a whole 4 KiB unit: 8 sector CRCs), 1 zero record, 1 barrier.
    expect(before).toBe(4 * RECORD_SIZE + 2 * 8 * 4);
    await writeFile(journal, Buffer.concat([await readFile(journal), Buffer.from('BRJ1 torn record')]));
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      expect(reopened.stats().recoveredRecords).toBe(3);
      expect(reopened.stats().discardedUnits).toBe(0);
      expect(reopened.state(0)).toBe(UNIT_PRESENT);
      expect(reopened.state(1)).toBe(UNIT_BASE);
      expect(reopened.state(2)).toBe(UNIT_PRESENT);
      expect(reopened.state(4)).toBe(UNIT_ZERO);
      expect(reopened.state(5)).toBe(UNIT_ZERO);
      const expected = Buffer.from(base.subarray(0, 6 * 4096));
      expected.fill(1, 0, 4096);
      expected.fill(2, 8192, 8192 + 512);
      expected.fill(0, 16384, 24576);
      expect((await view(reopened, 0, 6 * 4096)).equals(expected)).toBe(true);
      // Recovery checkpointed: the journal is empty again.
      expect((await stat(journal)).size).toBe(0);
    } finally {
      await reopened.close();
    }
  });

  it('keeps unflushed writes overwritten by later unflushed writes (kill -9: page cache intact)', async () => {
    const dir = join(scratch, 'overlap');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(2 * 4096 + 512, Buffer.alloc(1024, 0xb1), false, readBase); // RMW: unit 2 enters the delta
    await store.write(2 * 4096 + 1024, Buffer.alloc(2048, 0xb2), false, readBase); // overwrites part of it
    await store.write(0, Buffer.alloc(3 * 4096, 0xb3), false, readBase); // covers units 0..2 whole
    await store.write(3 * 4096 + 1024, Buffer.alloc(512, 0xb4), false, readBase); // RMW of unit 3
    const crashed = join(scratch, 'overlap-copy');
    await cp(dir, crashed, { recursive: true });
    await store.close();
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      expect(reopened.stats().discardedUnits).toBe(0);
      const expected = Buffer.from(base.subarray(0, 4 * 4096));
      expected.fill(0xb3, 0, 3 * 4096);
      expected.fill(0xb4, 3 * 4096 + 1024, 3 * 4096 + 1536);
      expect((await view(reopened, 0, 4 * 4096)).equals(expected)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('a kill before or after any file write of a write keeps every acknowledged write and tears nothing', async () => {
    const dir = join(scratch, 'steps');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    // Snapshot the files before and after every write to the data file or the journal: each copy is
    // what a kill -9 at that moment leaves (the page cache keeps what was written).
    const files = store as unknown as { dataFile: FileHandle; journalFile: FileHandle };
    const snapshots: Array<{ dir: string; acked: number }> = [];
    let acked = 0;
    const snapshot = async (): Promise<void> => {
      const copy = join(scratch, `steps-${snapshots.length}`);
      await cp(dir, copy, { recursive: true });
      snapshots.push({ dir: copy, acked });
    };
    for (const fh of [files.dataFile, files.journalFile]) {
      const write = fh.write.bind(fh) as (...args: unknown[]) => Promise<unknown>;
      (fh as unknown as { write: (...args: unknown[]) => Promise<unknown> }).write = async (...args: unknown[]) => {
        await snapshot();
        const result = await write(...args);
        await snapshot();
        return result;
      };
    }
    const ops: Array<[number, Buffer]> = [
      [2 * 4096 + 512, Buffer.alloc(1024, 0xc1)], // unit 2 enters the delta (read-modify-write), not flushed
      [2 * 4096 + 2048, Buffer.alloc(512, 0xc2)], // partial overwrite of the unflushed unit 2
      [2 * 4096 + 3584, Buffer.alloc(1024, 0xc3)], // end of unit 2 and the start of unit 3 (RMW)
    ];
    const states = [Buffer.from(base.subarray(0, 4 * 4096))];
    for (const [offset, data] of ops) {
      await store.write(offset, data, false, readBase);
      acked++;
      const next = Buffer.from(states[states.length - 1]!);
      data.copy(next, offset);
      states.push(next);
    }
    await store.close();
    expect(snapshots.length).toBeGreaterThanOrEqual(4 * ops.length);
    for (const snap of snapshots) {
      const reopened = await DeltaStore.open({ dir: snap.dir, sizeBytes: SIZE, logger });
      try {
        const seen = await view(reopened, 0, 4 * 4096);
        const acknowledged = states[snap.acked]!;
        const running = states[Math.min(snap.acked + 1, ops.length)]!;
        for (let at = 0; at < seen.length; at += 512) {
          const block = seen.subarray(at, at + 512);
          const ok = block.equals(acknowledged.subarray(at, at + 512)) || block.equals(running.subarray(at, at + 512));
          if (!ok) throw new Error(`kill after ${snap.acked} acknowledged writes (${snap.dir}): block ${at / 512} is neither acknowledged nor running content`);
        }
      } finally {
        await reopened.close();
      }
    }
  });

  it('a write whose data write failed is never covered by a later flush (no hole after a crash)', async () => {
    const dir = join(scratch, 'failed-data');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger, checkpointJournalBytes: 1 << 30 });
    let failNext = true;
    injectWriteFailures((store as unknown as { dataFile: FileHandle }).dataFile, () => {
      if (!failNext) return undefined;
      failNext = false;
      return errnoError('EIO', 'simulated');
    });
    // The crash copy is taken right after the flush's barrier reached the journal (before the
    // checkpoint that a flush after a failed data write runs).
    const crashed = join(scratch, 'failed-data-copy');
    const journalFile = (store as unknown as { journalFile: FileHandle }).journalFile;
    const datasync = journalFile.datasync.bind(journalFile);
    let copied = false;
    journalFile.datasync = async () => {
      await datasync();
      if (!copied) {
        copied = true;
        await cp(dir, crashed, { recursive: true });
      }
    };
    await expect(store.write(6 * 4096 + 512, Buffer.alloc(512, 0xd6), false, readBase)).rejects.toThrow(/EIO/);
    await store.write(7 * 4096, Buffer.alloc(4096, 0xd7), false, readBase);
    await store.flush();
    expect(copied).toBe(true);
    await store.close();
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      expect(reopened.state(6)).toBe(UNIT_BASE);
      expect((await view(reopened, 6 * 4096, 4096)).equals(base.subarray(6 * 4096, 7 * 4096))).toBe(true);
      expect(reopened.state(7)).toBe(UNIT_PRESENT);
      expect((await view(reopened, 7 * 4096, 4096)).every((b) => b === 0xd7)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('a data write that finds no space fails as space-exhausted; once there is space the mount goes on', async () => {
    const dir = join(scratch, 'enospc');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    let full = true;
    injectWriteFailures((store as unknown as { dataFile: FileHandle }).dataFile, () => (full ? errnoError('ENOSPC', 'no space left on device, write') : undefined));
    expect(store.stats().refusingWrites).toBeUndefined();
    await store.write(2 * 4096, Buffer.alloc(4096, 0xa2), true, readBase).then(
      () => expect.unreachable('the write must fail'),
      (err: unknown) => expect((err as StorageError).kind).toBe('space-exhausted'),
    );
    expect(store.stats().refusingWrites).toBeUndefined(); // a failed data write does not stop the mount
    full = false;
    await store.write(3 * 4096, Buffer.alloc(4096, 0xa3), false, readBase);
    await store.flush();
    expect(store.state(2)).toBe(UNIT_BASE);
    expect((await view(store, 3 * 4096, 4096)).every((b) => b === 0xa3)).toBe(true);
    await store.close();
  });

  it('after a journal write finds no space, writes fail until a checkpoint succeeds, then go on; nothing acknowledged is lost', async () => {
    const dir = join(scratch, 'journal-enospc');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(1 * 4096, Buffer.alloc(4096, 0xc1), false, readBase); // acknowledged, not flushed
    const journalFile = (store as unknown as { journalFile: FileHandle }).journalFile;
    let full = true;
    injectWriteFailures(journalFile, () => (full ? errnoError('ENOSPC', 'no space left on device, write') : undefined));
    const failed = await store.write(2 * 4096, Buffer.alloc(4096, 0xc2), false, readBase).then(() => null, (e: unknown) => e as StorageError);
    expect(failed?.kind).toBe('space-exhausted');
    expect(store.stats().refusingWrites).toMatch(/journal write failed/);
    // Still no room for the checkpoint (its journal truncation fails here): writes keep failing.
    const truncate = journalFile.truncate.bind(journalFile);
    journalFile.truncate = async () => {
      throw errnoError('ENOSPC', 'no space left on device');
    };
    full = false;
    await expect(store.write(3 * 4096, Buffer.alloc(4096, 0xc3), false, readBase)).rejects.toThrow(/journal write failed/);
    await expect(store.flush()).rejects.toThrow(/journal write failed/); // within a second of the last try
    // Room again: the next try (a second later) checkpoints, and writes and flushes work.
    journalFile.truncate = truncate;
    (store as unknown as { lastHealAttempt: number }).lastHealAttempt = -Infinity;
    const checkpoints = store.stats().checkpoints;
    await store.write(3 * 4096, Buffer.alloc(4096, 0xc3), false, readBase);
    await store.flush();
    expect(store.stats().checkpoints).toBe(checkpoints + 1);
    expect(store.stats().refusingWrites).toBeUndefined();
    const crashed = join(scratch, 'journal-enospc-copy');
    await cp(dir, crashed, { recursive: true }); // as after kill -9 right now
    await store.close();
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      expect((await view(reopened, 1 * 4096, 4096)).every((b) => b === 0xc1)).toBe(true);
      expect(reopened.state(2)).toBe(UNIT_BASE);
      expect((await view(reopened, 3 * 4096, 4096)).every((b) => b === 0xc3)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('after a failed fdatasync every later flush and write fails (a later sync proves nothing); reads go on', async () => {
    const dir = join(scratch, 'sync-fails');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(4 * 4096, Buffer.alloc(4096, 0xb4), false, readBase);
    const dataFile = (store as unknown as { dataFile: FileHandle }).dataFile;
    const datasync = dataFile.datasync.bind(dataFile);
    let failures = 1;
    dataFile.datasync = async () => {
      if (failures-- > 0) throw errnoError('ENOSPC', 'no space left on device, fdatasync');
      return datasync();
    };
    const failed = await store.flush().then(() => null, (err: unknown) => err as StorageError);
    expect(failed?.kind).toBe('write-error'); // not "out of space": that would invite a retry
    expect(store.stats().refusingWrites).toMatch(/delta data sync failed/);
    await expect(store.flush()).rejects.toThrow(/refuses writes until it is mounted again/);
    await expect(store.write(5 * 4096, Buffer.alloc(4096, 0xb5), false, readBase)).rejects.toThrow(/refuses writes/);
    expect((await view(store, 4 * 4096, 4096)).every((b) => b === 0xb4)).toBe(true);
    await store.close();
  });

  it('discards unflushed records whose data never reached the data file: old content, never a hole', async () => {
    const dir = join(scratch, 'lost');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    const flushed = patternBytes(4096, 1);
    await store.write(0, flushed, false, readBase); // unit 0, flushed
    await store.flush();
    await store.write(5 * 4096 + 512, Buffer.alloc(512, 0xa1), false, readBase); // unit 5: RMW record (whole unit)
    await store.write(5 * 4096 + 1536, Buffer.alloc(512, 0xa2), false, readBase); // unit 5: partial record
    await store.write(7 * 4096, Buffer.alloc(4096, 0xa3), false, readBase); // unit 7: whole unit, data kept
    await store.write(9 * 4096, Buffer.alloc(4096, 0xa4), false, readBase); // unit 9: whole unit, data lost
    const crashed = join(scratch, 'lost-copy');
    await cp(dir, crashed, { recursive: true });
    await store.close();
    // Simulated power loss: unit 5's data reached the disk only for the second (partial) write; unit 9's never.
    const fh = await open(join(crashed, 'data'), 'r+');
    const unit5 = Buffer.alloc(4096);
    Buffer.alloc(512, 0xa2).copy(unit5, 1536);
    await fh.write(unit5, 0, 4096, 5 * 4096);
    await fh.write(Buffer.alloc(4096), 0, 4096, 9 * 4096);
    await fh.close();
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      const s = reopened.stats();
      expect(s.discardedUnits).toBe(3); // unit 5 (for both records) and unit 9
      expect(reopened.state(0)).toBe(UNIT_PRESENT);
      expect(reopened.state(5)).toBe(UNIT_BASE);
      expect(reopened.state(7)).toBe(UNIT_PRESENT);
      expect(reopened.state(9)).toBe(UNIT_BASE);
      expect((await view(reopened, 0, 4096)).equals(flushed)).toBe(true);
      expect((await view(reopened, 5 * 4096, 4096)).equals(base.subarray(5 * 4096, 6 * 4096))).toBe(true);
      expect((await view(reopened, 7 * 4096, 4096)).every((b) => b === 0xa3)).toBe(true);
      expect((await view(reopened, 9 * 4096, 4096)).equals(base.subarray(9 * 4096, 10 * 4096))).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('a FUA write survives a crash without a later flush', async () => {
    const dir = join(scratch, 'fua');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(3 * 4096, Buffer.alloc(4096, 0x77), true, readBase);
    const crashed = join(scratch, 'fua-copy');
    await cp(dir, crashed, { recursive: true });
    await store.close();
    const reopened = await DeltaStore.open({ dir: crashed, sizeBytes: SIZE, logger });
    try {
      expect(reopened.stats().recoveredRecords).toBe(1);
      expect((await view(reopened, 3 * 4096, 4096)).every((b) => b === 0x77)).toBe(true);
    } finally {
      await reopened.close();
    }
  });

  it('refuses a damaged map or a size mismatch with a clear error and leaves the files alone', async () => {
    const dir = join(scratch, 'damaged');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    await store.write(0, Buffer.alloc(4096, 9), false, readBase);
    await store.close();
    await expect(DeltaStore.open({ dir, sizeBytes: 2 * SIZE, logger })).rejects.toThrow(/is for a 1048576-byte LUN, not 2097152/);
    const mapFile = join(dir, 'map');
    const good = await readFile(mapFile);
    const bad = Buffer.from(good);
    bad[70]! ^= 1; // a bitmap byte
    await writeFile(mapFile, bad);
    await expect(DeltaStore.open({ dir, sizeBytes: SIZE, logger })).rejects.toThrow(/delta map .* is damaged: bitmap CRC mismatch/);
    expect((await readFile(mapFile)).equals(bad)).toBe(true);
    await writeFile(mapFile, good);
    const reopened = await DeltaStore.open({ dir, sizeBytes: SIZE, logger });
    expect(reopened.state(0)).toBe(UNIT_PRESENT);
    await reopened.close();
    await expect(DeltaStore.open({ dir, sizeBytes: 1000, logger })).rejects.toThrow(RangeError);
  });

  it('checkpoints when the journal passes its threshold and keeps working after it', async () => {
    const dir = join(scratch, 'checkpoint');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger, checkpointJournalBytes: 10 * (RECORD_SIZE + 32) });
    try {
      for (let i = 0; i < 30; i++) {
        await store.write(i * 4096, Buffer.alloc(4096, i + 1), false, readBase);
        if (i % 5 === 4) await store.flush();
      }
      expect(store.stats().checkpoints).toBeGreaterThanOrEqual(2);
      expect(store.stats().presentUnits).toBe(30);
      for (let i = 0; i < 30; i++) expect((await view(store, i * 4096, 4096)).every((b) => b === i + 1)).toBe(true);
    } finally {
      await store.close();
    }
  });

  it('keeps the journal bounded when the initiator never flushes (background checkpoints)', async () => {
    const dir = join(scratch, 'noflush');
    const store = await DeltaStore.open({ dir, sizeBytes: SIZE, logger, checkpointJournalBytes: 8 * (RECORD_SIZE + 32) });
    try {
      let maxJournal = 0;
      for (let i = 0; i < 100; i++) {
        await store.write((i % 200) * 4096, Buffer.alloc(4096, (i % 250) + 1), false, readBase);
        maxJournal = Math.max(maxJournal, store.stats().journalBytes);
      }
      await store.checkpoint(); // wait for any background checkpoint to settle
      expect(store.stats().checkpoints).toBeGreaterThanOrEqual(5);
      // A checkpoint starts at 16 records; a few writes may land while it waits for running ones.
      expect(maxJournal).toBeLessThanOrEqual(20 * (RECORD_SIZE + 32));
      for (let i = 0; i < 100; i++) expect((await view(store, i * 4096, 4096)).every((b) => b === (i % 250) + 1)).toBe(true);
    } finally {
      await store.close();
    }
  });
});
