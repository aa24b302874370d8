/**
 * Export a restore point to a raw image file. Zero chunks are not written: the file is sized with
 * ftruncate first, so they stay holes (sparse output).
 */
import { promises as fsp, constants as fsConstants } from 'node:fs';
import { RepositoryError } from './errors.js';
import { openRestorePoint } from './reader.js';
import { errnoCode } from './repository.js';
import { runBounded } from './writer.js';

export interface ExportResult {
  readonly vm: string;
  readonly id: string;
  readonly imageSize: number;
  readonly bytesWritten: number;
  readonly zeroChunksSkipped: number;
  readonly seconds: number;
}

export interface ExportOptions {
  /** Replace an existing output file. */
  readonly force?: boolean;
  readonly concurrency?: number;
  readonly onProgress?: (done: number, total: number) => void;
}

export async function exportRestorePoint(
  repoDir: string,
  vm: string,
  pointId: string,
  outputPath: string,
  options: ExportOptions = {},
): Promise<ExportResult> {
  const started = performance.now();
  const reader = await openRestorePoint(repoDir, vm, pointId);
  const flags = fsConstants.O_WRONLY | fsConstants.O_CREAT | (options.force ? fsConstants.O_TRUNC : fsConstants.O_EXCL);
  let out;
  try {
    out = await fsp.open(outputPath, flags, 0o644);
  } catch (err) {
    await reader.close();
    if (errnoCode(err) === 'EEXIST') throw new RepositoryError(`${outputPath} already exists (use --force to replace it)`);
    throw err;
  }
  let bytesWritten = 0;
  let zeroChunksSkipped = 0;
  let done = 0;
  try {
    await out.truncate(reader.imageSize);
    await runBounded(reader.chunkCount, options.concurrency ?? 8, async (i) => {
      if (reader.chunkDigest(i) === null) {
        zeroChunksSkipped++;
      } else {
        const data = await reader.loadChunk(i);
        let written = 0;
        while (written < data.length) {
          const { bytesWritten: n } = await out.write(data, written, data.length - written, i * reader.chunkSize + written);
          written += n;
        }
        bytesWritten += data.length;
      }
      options.onProgress?.(++done, reader.chunkCount);
    });
    await out.sync();
  } catch (err) {
    // Leave no half-written image behind that could be mistaken for a good export.
    await out.close().catch(() => undefined);
    await fsp.rm(outputPath, { force: true }).catch(() => undefined);
    await reader.close();
    throw err;
  }
  await out.close();
  await reader.close();
  return {
    vm,
    id: reader.info.id,
    imageSize: reader.imageSize,
    bytesWritten,
    zeroChunksSkipped,
    seconds: (performance.now() - started) / 1000,
  };
}
