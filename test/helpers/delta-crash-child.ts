/**
 * Child process of test/unit/cache/delta-crash.test.ts (bundled with esbuild, run by node, killed with
 * SIGKILL). Runs the seeded operation sequence of one round against a BackupBlockDevice and reports
 * on stdout: "A <k>" after op k was acknowledged, "F <k>" after the flush that was op k completed.
 * Pipes are written synchronously on Linux, so a reported line is never lost by the kill.
 */
import { BackupBlockDevice } from '../../src/cache/backup-device.js';
import { ChunkCache } from '../../src/cache/chunk-cache.js';
import { DeltaStore } from '../../src/cache/delta-store.js';
import { silentLogger } from '../../src/log.js';
import { CRASH_IMAGE_SIZE, crashBasePoint, crashOps, writeData } from './delta-crash-model.js';

async function main(): Promise<void> {
  const [deltaDir, roundText, checkpointText] = process.argv.slice(2);
  if (deltaDir === undefined || roundText === undefined) throw new Error('usage: child DELTA_DIR ROUND [CHECKPOINT_BYTES]');
  const round = Number(roundText);
  const logger = silentLogger();
  const point = await crashBasePoint();
  const delta = await DeltaStore.open({
    dir: deltaDir,
    sizeBytes: CRASH_IMAGE_SIZE,
    logger,
    checkpointJournalBytes: Number(checkpointText ?? 16384),
  });
  const device = new BackupBlockDevice({
    reader: point,
    cache: new ChunkCache({ maxBytes: 2 * 1024 * 1024, logger }),
    delta,
    mountId: `crash-${round}`,
    identity: { serial: 'CRASH', naa: Buffer.alloc(8, 1), vendor: 'BOOTREST', product: 'crash' },
    logger,
  });
  process.stdout.write('R\n');
  const ops = crashOps(round, 100_000);
  for (let k = 0; k < ops.length; k++) {
    const op = ops[k]!;
    if (op.kind === 'write') await device.write(op.lba, writeData(op), { fua: op.fua });
    else if (op.kind === 'unmap') await device.unmap([{ lba: op.lba, blocks: op.blocks }]);
    else {
      await device.flush();
      process.stdout.write(`F ${k}\n`);
    }
    process.stdout.write(`A ${k}\n`);
  }
  await device.close();
  process.stdout.write('DONE\n');
}

main().catch((err: unknown) => {
  process.stderr.write(`child failed: ${err instanceof Error ? err.stack : String(err)}\n`);
  process.exit(1);
});
