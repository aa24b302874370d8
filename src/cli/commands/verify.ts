/** `bootrestore verify --repo DIR [--vm NAME] [--json]`: exit 1 if any chunk or index is bad. */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { createRootLogger } from '../../log.js';
import { verifyRepository } from '../../backup/verify.js';
import { ProgressBar, formatBytes, printJson, usageRequested, useLargerThreadPool } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore verify --repo DIR [--vm NAME] [--json]

Re-read every chunk referenced by the restore points (of one VM or all), check CRC32 and SHA-256,
and report each corrupt or missing chunk with the restore points it breaks. Exit code 1 if any.`;

export async function run(argv: string[]): Promise<number> {
  useLargerThreadPool();
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm'], booleans: ['json'] });
  if (args.positionals.length > 0) throw new UsageError(`verify takes no positional arguments (got "${args.positionals[0]}")`);
  const logger = createRootLogger(process.env.BOOTRESTORE_LOG_LEVEL ?? 'error').child({ command: 'verify' });
  const bar = new ProgressBar('verify');
  let report;
  try {
    report = await verifyRepository(requireValue(args, 'repo'), {
      vm: args.values.get('vm'),
      logger,
      onProgress: (done, total) => bar.update(done, total),
    });
  } finally {
    bar.finish();
  }
  const ok = report.problems.length === 0 && report.brokenIndexes.length === 0 && report.unreadablePacks.length === 0;
  if (args.booleans.has('json')) {
    printJson({ ok, ...report });
  } else {
    for (const b of report.brokenIndexes) process.stdout.write(`BAD INDEX ${b.vm}/${b.id}: ${b.reason}\n`);
    for (const p of report.unreadablePacks) process.stdout.write(`BAD PACK ${p.path}: ${p.reason}\n`);
    for (const p of report.problems) {
      process.stdout.write(`BAD CHUNK ${p.digest} (${p.path}): ${p.reason}; breaks ${p.points.join(', ')}\n`);
    }
    if (report.brokenPoints.length > 0) process.stdout.write(`broken restore points: ${report.brokenPoints.join(', ')}\n`);
    process.stdout.write(
      `verify: ${report.pointsChecked} restore points, ${report.chunksChecked} chunks (${formatBytes(report.bytesChecked)} ok) in ` +
        `${report.seconds.toFixed(1)} s: ${ok ? 'OK' : `${report.problems.length} bad chunks, ${report.brokenIndexes.length} bad indexes, ${report.unreadablePacks.length} bad packs`}\n`,
    );
  }
  return ok ? 0 : 1;
}
