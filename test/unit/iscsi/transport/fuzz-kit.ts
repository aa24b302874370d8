/**
 * Helpers shared by the seeded fuzz tests of the iSCSI target (fuzz.test.ts, fuzz-more.test.ts):
 * the seed taken from BOOTRESTORE_FUZZ_SEED, the seeded PRNG, process-level crash detection, and
 * which target PDUs advance StatSN.
 */
import { afterAll, beforeAll } from 'vitest';
import { pseudoRandomBytes, xorshift32 } from '../../../helpers/prng.js';
import { Opcode, RESERVED_TAG } from '../../../../src/iscsi/pdu/opcodes.js';

/**
 * Whether a target PDU with this opcode, ITT and flags byte (BHS byte 1) takes a StatSN of its own
 * (RFC 7143 §3.2.2.2): responses, Reject, Async Message, a NOP-In answering a ping, the Data-In
 * with status. R2T and a target-initiated NOP-In carry the next StatSN without advancing it.
 */
export function advancesStatSN(op: number, itt: number, flags: number): boolean {
  return (
    op === Opcode.ScsiResponse ||
    op === Opcode.TaskManagementResponse ||
    op === Opcode.TextResponse ||
    op === Opcode.LogoutResponse ||
    op === Opcode.Reject ||
    op === Opcode.AsyncMessage ||
    (op === Opcode.NopIn && itt !== RESERVED_TAG) ||
    (op === Opcode.DataIn && (flags & 0x01) !== 0)
  );
}

/**
 * Records uncaught exceptions and unhandled rejections while the calling test file runs (the target
 * runs in-process: one of these is a crash it would otherwise hide), and prints the seed to replay.
 * Returns the list the file asserts empty.
 */
export function watchProcessFaults(label: string, seed: number): readonly string[] {
  const faults: string[] = [];
  const describe = (err: unknown): string => (err instanceof Error ? (err.stack ?? err.message) : String(err));
  const onUncaught = (err: unknown): void => void faults.push(`uncaughtException: ${describe(err)}`);
  const onUnhandled = (reason: unknown): void => void faults.push(`unhandledRejection: ${describe(reason)}`);
  beforeAll(() => {
    process.on('uncaughtException', onUncaught);
    process.on('unhandledRejection', onUnhandled);
    console.log(`[${label}] seed ${seed} (0x${seed.toString(16)}); replay with BOOTRESTORE_FUZZ_SEED=${seed}`);
  });
  afterAll(() => {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUnhandled);
  });
  return faults;
}

/** BOOTRESTORE_FUZZ_SEED (decimal or 0x-hex) when set, else `defaultSeed`. */
export function seedFromEnv(defaultSeed: number): number {
  const raw = process.env.BOOTRESTORE_FUZZ_SEED;
  if (raw === undefined || raw.trim() === '') return defaultSeed;
  const text = raw.trim();
  const n = /^0x[0-9a-f]+$/i.test(text) ? parseInt(text.slice(2), 16) : Number(text);
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new Error(`BOOTRESTORE_FUZZ_SEED must be an integer in 0..2^32-1 (decimal or 0x-hex), got "${raw}"`);
  }
  return n >>> 0;
}

// ---------------------------------------------------------------------------------------------
// PRNG (xorshift32 from test/helpers/prng.ts, seeded through a mixer so nearby seeds diverge).

export class Rng {
  private readonly next: () => number;
  constructor(seed: number) {
    let h = (seed ^ 0x9e3779b9) >>> 0;
    h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
    this.next = xorshift32((h ^ (h >>> 16)) >>> 0 || 1);
    for (let i = 0; i < 8; i++) this.next();
  }
  u32(): number {
    return this.next();
  }
  /** 0 ≤ n < bound. */
  int(bound: number): number {
    return bound <= 1 ? 0 : Math.floor((this.next() / 0x1_0000_0000) * bound);
  }
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.next() / 0x1_0000_0000 < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }
  weighted<T>(entries: ReadonlyArray<readonly [number, T]>): T {
    let total = 0;
    for (const [w] of entries) total += w;
    let x = this.next() % total;
    for (const [w, v] of entries) {
      if (x < w) return v;
      x -= w;
    }
    return entries[entries.length - 1]![1];
  }
  bytes(n: number): Buffer {
    return pseudoRandomBytes(n, this.next());
  }
  fork(): Rng {
    return new Rng(this.next());
  }
}

