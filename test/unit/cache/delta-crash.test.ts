/**
 * Crash recovery of the delta: a child process runs writes / unmaps / flushes against a
 * BackupBlockDevice and is killed with SIGKILL at varying points (also during checkpoints: the
 * journal threshold is tiny). The delta is then reopened (journal replay) and every block of the
 * written area must hold a content it may legally hold: its content as of the last durable
 * operation touching it (flush or FUA), or the content of a later operation that was issued — never
 * anything else. Blocks without later operations must read back exactly (flushed data survives).
 * Rounds continue on the same delta, so recovery of a recovered delta is covered as well.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { build } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackupBlockDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { DEFAULT_UNIT_SIZE, DeltaStore } from '../../../src/cache/delta-store.js';
import { silentLogger } from '../../../src/log.js';
import { CRASH_HOT_BLOCKS, CRASH_IMAGE_SIZE, blockContent, crashBasePoint, crashOps, type CrashOp } from '../../helpers/delta-crash-model.js';
import { seededRandom } from '../../helpers/fake-restore-point.js';

const ROUNDS = 6;
const BLOCKS_PER_UNIT = DEFAULT_UNIT_SIZE / 512;
let scratch: string;
let childScript: string;
const children = new Set<import('node:child_process').ChildProcess>();

beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-crash-'));
  childScript = join(scratch, 'child.cjs');
  await build({
    entryPoints: [resolve(import.meta.dirname, '../../helpers/delta-crash-child.ts')],
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    outfile: childScript,
    logLevel: 'error',
  });
});

afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(scratch, { recursive: true, force: true });
});

interface ChildRun {
  lastAck: number;
  lastFlush: number;
  done: boolean;
}

/** Run round `round`; SIGKILL it once it has acknowledged `killAfter` operations. */
function runChild(deltaDir: string, round: number, killAfter: number): Promise<ChildRun> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, [childScript, deltaDir, String(round), '16384'], { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    const run: ChildRun = { lastAck: -1, lastFlush: -1, done: false };
    let pending = '';
    let stderr = '';
    let killed = false;
    child.stdout!.setEncoding('utf8');
    child.stdout!.on('data', (text: string) => {
      pending += text;
      let nl: number;
      while ((nl = pending.indexOf('\n')) >= 0) {
        const line = pending.slice(0, nl);
        pending = pending.slice(nl + 1);
        const [tag, value] = line.split(' ');
        if (tag === 'A') run.lastAck = Number(value);
        else if (tag === 'F') run.lastFlush = Number(value);
        else if (tag === 'DONE') run.done = true;
        if (!killed && run.lastAck >= killAfter) {
          killed = true;
          child.kill('SIGKILL');
        }
      }
    });
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      children.delete(child);
      if (signal === 'SIGKILL' || code === 0) resolvePromise(run);
      else reject(new Error(`child exited with ${code}: ${stderr}`));
    });
  });
}

function touches(op: CrashOp, lba: number): op is Extract<CrashOp, { lba: number }> {
  return op.kind !== 'flush' && lba >= op.lba && lba < op.lba + op.blocks;
}

describe('delta crash recovery (SIGKILL)', () => {
  it(`after ${ROUNDS} kills at varying points every block holds its old or new content, flushed blocks read back`, async () => {
    const deltaDir = join(scratch, 'delta');
    const point = await crashBasePoint();
    const logger = silentLogger();
    let snapshot = await point.read(0, CRASH_IMAGE_SIZE); // content before the round
    const rnd = seededRandom(99);
    let strictBlocks = 0;
    let newestBlocks = 0;
    let checkedBlocks = 0;
    let discarded = 0;
    const killPoints: number[] = [];
    const roundTimes: string[] = [];
    for (let round = 1; round <= ROUNDS; round++) {
      const killAfter = 20 + Math.floor(rnd() * 500);
      const t0 = Date.now();
      const run = await runChild(deltaDir, round, killAfter);
      const t1 = Date.now();
      expect(run.done).toBe(false);
      expect(run.lastAck).toBeGreaterThanOrEqual(killAfter);
      killPoints.push(run.lastAck);
      const ops = crashOps(round, run.lastAck + 2); // op lastAck+1 may have been running
      const durable = (j: number): boolean => {
        const op = ops[j]!;
        return j < run.lastFlush || (op.kind === 'write' && op.fua && j <= run.lastAck);
      };

      const delta = await DeltaStore.open({ dir: deltaDir, sizeBytes: CRASH_IMAGE_SIZE, logger });
      // The write running at the kill may have its record in the journal without (all of) its data:
      // recovery leaves the units it would have brought in as they were. Nothing else may be discarded.
      const roundDiscarded = delta.stats().discardedUnits;
      discarded += roundDiscarded;
      const running = ops[run.lastAck + 1];
      const runningUnits = running === undefined || running.kind === 'flush' ? 0 : Math.ceil((running.lba + running.blocks) / BLOCKS_PER_UNIT) - Math.floor(running.lba / BLOCKS_PER_UNIT);
      if (roundDiscarded > runningUnits) throw new Error(`round ${round}: ${roundDiscarded} units discarded, but the write running at the kill touches only ${runningUnits}`);
      const device = new BackupBlockDevice({
        reader: point,
        cache: new ChunkCache({ maxBytes: 8 * 1024 * 1024, logger }),
        delta,
        mountId: `verify-${round}`,
        identity: { serial: 'CRASH', naa: Buffer.alloc(8, 1), vendor: 'BOOTREST', product: 'crash' },
        logger,
      });
      try {
        const content = await device.read(0, CRASH_IMAGE_SIZE / 512);
        // Blocks outside the written area are untouched.
        expect(content.subarray(CRASH_HOT_BLOCKS * 512).equals(snapshot.subarray(CRASH_HOT_BLOCKS * 512))).toBe(true);
        const zero = Buffer.alloc(512);
        for (let lba = 0; lba < CRASH_HOT_BLOCKS; lba++) {
          let lastDurable = -1;
          const touching: number[] = [];
          for (let j = 0; j < ops.length; j++) {
            if (!touches(ops[j]!, lba)) continue;
            touching.push(j);
            if (durable(j)) lastDurable = j;
          }
          const contentOf = (j: number): Buffer => (j < 0 ? snapshot.subarray(lba * 512, lba * 512 + 512) : ops[j]!.kind === 'unmap' ? zero : blockContent(ops[j]!.id, lba));
          const allowed = [lastDurable, ...touching.filter((j) => j > lastDurable)];
          const actual = content.subarray(lba * 512, lba * 512 + 512);
          const match = allowed.find((j) => contentOf(j).equals(actual));
          if (match === undefined) {
            throw new Error(
              `round ${round} block ${lba}: content matches none of ${allowed.length} allowed versions ` +
                `(ops ${allowed.join(',')}; lastAck ${run.lastAck}, lastFlush ${run.lastFlush}; tag ${actual.readUInt32LE(4)})`,
            );
          }
          checkedBlocks++;
          if (allowed.length === 1) strictBlocks++;
          // kill -9 keeps the page cache: every acknowledged write should survive, so the block holds
          // the newest acknowledged write touching it, or the write that was running at the kill.
          const newestAcked = [lastDurable, ...touching].filter((j) => j <= run.lastAck).pop()!;
          const inFlight = ops[run.lastAck + 1];
          if (contentOf(newestAcked).equals(actual) || (inFlight !== undefined && touches(inFlight, lba) && contentOf(run.lastAck + 1).equals(actual))) newestBlocks++;
          else if (process.env.CRASH_DEBUG) console.log(`round ${round} lba ${lba}: match ${match} (${match >= 0 ? ops[match]!.kind : 'old'}), newest acked ${newestAcked} (${ops[newestAcked]?.kind}), lastAck ${run.lastAck} lastFlush ${run.lastFlush} allowed ${allowed.join(',')}`);
        }
        snapshot = Buffer.from(content);
        roundTimes.push(`${t1 - t0}+${Date.now() - t1}`);
      } finally {
        await device.close();
      }
    }
    // Figures for the report (ms per round: child run + verification).
    console.log(
      `crash round times (ms): ${roundTimes.join(' ')}`,
    );
    console.log(
      `crash rounds: kill after ops ${killPoints.join(',')}; ${checkedBlocks} block checks, ${strictBlocks} had to equal the flushed content, ` +
        `${newestBlocks} hold the newest acknowledged (or the in-flight) write; ${discarded} units of the write running at the kill left out (record without its data)`,
    );
    expect(strictBlocks).toBeGreaterThan(0);
    expect(newestBlocks).toBe(checkedBlocks);
    expect(checkedBlocks).toBe(ROUNDS * CRASH_HOT_BLOCKS);
  });
});
