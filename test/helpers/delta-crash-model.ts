/**
 * Shared by the delta crash test and its child process: the base image, the operation sequence
 * (from a seed) and the content each write puts in each block, so both sides agree without talking.
 */
import { FakeRestorePoint, patternBytes, seededRandom } from './fake-restore-point.js';

export const CRASH_IMAGE_SIZE = 4 * 1024 * 1024;
export const CRASH_CHUNK_SIZE = 256 * 1024;
/** Writes land in the first 1 MiB (2048 blocks) so they overlap a lot. */
export const CRASH_HOT_BLOCKS = 2048;

export type CrashOp =
  | { readonly kind: 'write'; readonly id: number; readonly lba: number; readonly blocks: number; readonly fua: boolean }
  | { readonly kind: 'unmap'; readonly id: number; readonly lba: number; readonly blocks: number }
  | { readonly kind: 'flush'; readonly id: number };

export function crashBasePoint(): Promise<FakeRestorePoint> {
  return FakeRestorePoint.create({
    imageSize: CRASH_IMAGE_SIZE,
    chunkSize: CRASH_CHUNK_SIZE,
    content: (i, len) => (i === 2 ? null : patternBytes(len, 31337 + i)),
  });
}

/** Operation `k` of round `round` (ids are unique across rounds). */
export function crashOps(round: number, count: number): CrashOp[] {
  const rnd = seededRandom(1000 + round);
  const ops: CrashOp[] = [];
  for (let k = 0; k < count; k++) {
    const id = round * 1_000_000 + k;
    const r = rnd();
    const lba = Math.floor(rnd() * CRASH_HOT_BLOCKS);
    const maxBlocks = rnd() < 0.85 ? 12 : 200;
    const blocks = Math.max(1, Math.min(CRASH_HOT_BLOCKS - lba, 1 + Math.floor(rnd() * maxBlocks)));
    if (r < 0.8) ops.push({ kind: 'write', id, lba, blocks, fua: rnd() < 0.05 });
    else if (r < 0.9) ops.push({ kind: 'unmap', id, lba, blocks });
    else ops.push({ kind: 'flush', id });
  }
  return ops;
}

/** The 512 bytes a write with this id puts at this LBA: tagged so a reader can tell who wrote it. */
export function blockContent(id: number, lba: number): Buffer {
  const b = patternBytes(512, (id * 7919 + lba * 104729) >>> 0);
  b.writeUInt32LE(0x57524954, 0); // "TIRW"
  b.writeUInt32LE(id, 4);
  b.writeUInt32LE(lba, 8);
  return b;
}

export function writeData(op: { id: number; lba: number; blocks: number }): Buffer {
  const out = Buffer.allocUnsafe(op.blocks * 512);
  for (let i = 0; i < op.blocks; i++) blockContent(op.id, op.lba + i).copy(out, i * 512);
  return out;
}
