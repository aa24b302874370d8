/** `bootrestore backup SOURCE --repo DIR --vm NAME [--chunk-size N] [--changed-blocks FILE] [--compression C] [--compression-level N] [--chunk-store S] [--json]` */
import { readFile } from 'node:fs/promises';
import { parseArgs, requireValue, UsageError } from '../args.js';
import { createRootLogger } from '../../log.js';
import { openSource } from '../../backup/sources/open.js';
import { backupSource, parseChangedBlocks, type ByteRange } from '../../backup/engine.js';
import { CHUNK_STORE_KINDS, type ChunkStoreKind } from '../../backup/repository.js';
import { codecLevelProblem, DEFAULT_CODEC, DEFAULT_CODEC_LEVEL, type ChunkCodec } from '../../backup/format.js';
import { ProgressBar, formatBytes, parseSize, printJson, usageRequested, useLargerThreadPool } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore backup SOURCE --repo DIR --vm NAME [--chunk-size N] [--changed-blocks FILE]
                          [--compression brotli|deflate|none] [--compression-level N]
                          [--chunk-store packs|files] [--json]

Back up a disk image (raw, qcow2, VMDK) as a new restore point of VM NAME. The repository is
created if DIR does not exist or is empty. The first backup of a VM is full and fixes its chunk
size (--chunk-size, default 128K; 64K..16M, a power of two); later backups store only chunks
whose content changed.
  --changed-blocks FILE  read only these byte ranges and take every other chunk from the previous
                         restore point. FILE: JSON [{"offset":N,"length":N},...] or lines
                         "offset length" (decimal or 0x hex; '#' starts a comment).
  --compression C        codec of new chunks: brotli (default, level ${DEFAULT_CODEC_LEVEL.brotli}; 0..11), deflate
                         (level ${DEFAULT_CODEC_LEVEL.deflate}; 1..9: ~3 % larger repositories and, measured at
                         128K, no faster to read or write) or none. Chunks that do not shrink by 10 % are
                         stored as they are.
                         Every reader reads every codec; dedup does not depend on it.
  --compression-level N  the codec's level (higher: smaller and slower to write)
  --chunk-store S        only when this backup creates the repository: packs (default; new chunks
                         go into ~16 MiB pack files) or files (one file per chunk, the first layout)
  --json                 print the result as JSON on stdout`;

export async function run(argv: string[]): Promise<number> {
  useLargerThreadPool();
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm', 'chunk-size', 'changed-blocks', 'compression', 'compression-level', 'chunk-store'], booleans: ['json'] });
  if (args.positionals.length !== 1) throw new UsageError('backup needs exactly one SOURCE image');
  const sourcePath = args.positionals[0]!;
  const repoDir = requireValue(args, 'repo');
  const vm = requireValue(args, 'vm');
  const chunkSizeText = args.values.get('chunk-size');
  const chunkSize = chunkSizeText === undefined ? undefined : parseSize(chunkSizeText, '--chunk-size');
  const changedFile = args.values.get('changed-blocks');
  let changedBlocks: ByteRange[] | undefined;
  if (changedFile !== undefined) changedBlocks = parseChangedBlocks(await readFile(changedFile, 'utf8'), changedFile);
  const compression = args.values.get('compression') ?? DEFAULT_CODEC;
  const levelText = args.values.get('compression-level');
  const compressionLevel = levelText === undefined ? undefined : Number(levelText);
  if (compression === 'none') {
    if (levelText !== undefined) throw new UsageError('--compression-level needs a codec (--compression brotli or deflate)');
  } else {
    const problem = codecLevelProblem(compression, compressionLevel);
    if (problem !== undefined) throw new UsageError(`--compression/--compression-level: ${problem}`);
  }
  const chunkStore = args.values.get('chunk-store');
  if (chunkStore !== undefined && !(CHUNK_STORE_KINDS as readonly string[]).includes(chunkStore)) {
    throw new UsageError(`--chunk-store must be ${CHUNK_STORE_KINDS.join(' or ')} (got "${chunkStore}")`);
  }
  const json = args.booleans.has('json');
  const logger = createRootLogger(process.env.BOOTRESTORE_LOG_LEVEL ?? 'warn').child({ command: 'backup', vm });

  const source = await openSource(sourcePath, { logger });
  const bar = new ProgressBar(`backup ${vm}`);
  let result;
  try {
    result = await backupSource(repoDir, source, {
      vm,
      chunkSize,
      changedBlocks,
      logger,
      ...(chunkStore !== undefined ? { chunkStore: chunkStore as ChunkStoreKind } : {}),
      compress: compression !== 'none',
      ...(compression !== 'none' ? { codec: compression as ChunkCodec } : {}),
      ...(compressionLevel !== undefined ? { compressionLevel } : {}),
      onProgress: (p) => bar.update(p.chunksDone, p.chunkCount, p.bytesDone),
    });
  } finally {
    bar.finish();
    await source.close();
  }
  const s = result.stats;
  const mbPerSecond = s.seconds > 0 ? s.bytesRead / s.seconds / 1e6 : 0;
  const dedupRatio = s.newBytesUncompressed > 0 ? s.nonZeroBytesRead / s.newBytesUncompressed : null;
  if (json) {
    printJson({
      vm,
      id: result.info.id,
      parent: result.info.parent,
      mode: result.mode,
      repositoryCreated: result.repositoryCreated,
      imageSize: result.info.imageSize,
      chunkSize: result.info.chunkSize,
      ...s,
      mbPerSecond,
      dedupRatio,
    });
  } else {
    process.stdout.write(
      `${result.repositoryCreated ? `created repository ${repoDir}\n` : ''}` +
        `backup ${vm} ${result.info.id} (${result.mode}): read ${formatBytes(s.bytesRead)} in ${s.seconds.toFixed(1)} s ` +
        `(${mbPerSecond.toFixed(0)} MB/s); ${s.chunks} chunks of ${formatBytes(result.info.chunkSize)}: ${s.newChunks} new, ` +
        `${s.dedupChunks} dedup, ${s.unchangedChunks + s.parentChunks} unchanged, ${s.zeroChunks} zero; ` +
        `stored ${formatBytes(s.newBytesStored)}; dedup ratio ${dedupRatio === null ? 'n/a (nothing new)' : dedupRatio.toFixed(2)}\n`,
    );
  }
  return 0;
}

