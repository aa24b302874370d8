/** `bootrestore export --repo DIR --vm NAME [--point ID] [--force] [--json] OUTPUT` */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { exportRestorePoint } from '../../backup/export.js';
import { ProgressBar, formatBytes, printJson, usageRequested, useLargerThreadPool } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore export --repo DIR --vm NAME [--point ID] [--force] [--json] OUTPUT

Write a restore point (default: the latest) to OUTPUT as a raw image. Zero chunks become holes
(sparse file). OUTPUT must not exist unless --force is given.`;

export async function run(argv: string[]): Promise<number> {
  useLargerThreadPool();
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm', 'point'], booleans: ['json', 'force'] });
  if (args.positionals.length !== 1) throw new UsageError('export needs exactly one OUTPUT path');
  const vm = requireValue(args, 'vm');
  const bar = new ProgressBar(`export ${vm}`);
  let result;
  try {
    result = await exportRestorePoint(requireValue(args, 'repo'), vm, args.values.get('point') ?? 'latest', args.positionals[0]!, {
      force: args.booleans.has('force'),
      onProgress: (done, total) => bar.update(done, total),
    });
  } finally {
    bar.finish();
  }
  if (args.booleans.has('json')) {
    printJson(result);
  } else {
    process.stdout.write(
      `export ${vm}/${result.id}: ${formatBytes(result.imageSize)} image, ${formatBytes(result.bytesWritten)} written, ` +
        `${result.zeroChunksSkipped} zero chunks left as holes, ${result.seconds.toFixed(1)} s\n`,
    );
  }
  return 0;
}
