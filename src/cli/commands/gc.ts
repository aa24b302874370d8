/** `bootrestore gc --repo DIR [--grace-seconds N] [--dry-run] [--json]` */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { createRootLogger } from '../../log.js';
import { collectGarbage } from '../../backup/maintenance.js';
import { formatBytes, parseCount, printJson, usageRequested } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore gc --repo DIR [--grace-seconds N] [--dry-run] [--json]

Mark every chunk referenced by an index, then delete unreferenced chunks older than
min(gc start, oldest running backup's start) minus a grace period (default 300 s). Safe beside
running backups and commits; refuses to run while any index is unreadable, or while a mount uses
a restore point whose index is gone (see "bootrestore prune --help" on holds).`;

export async function run(argv: string[]): Promise<number> {
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'grace-seconds'], booleans: ['json', 'dry-run'] });
  if (args.positionals.length > 0) throw new UsageError(`gc takes no positional arguments (got "${args.positionals[0]}")`);
  const graceText = args.values.get('grace-seconds');
  const graceMs = graceText === undefined ? undefined : parseCount(graceText, '--grace-seconds') * 1000;
  const dryRun = args.booleans.has('dry-run');
  const logger = createRootLogger(process.env.BOOTRESTORE_LOG_LEVEL ?? 'warn').child({ command: 'gc' });
  const result = await collectGarbage(requireValue(args, 'repo'), { graceMs, dryRun, logger });
  if (args.booleans.has('json')) {
    printJson({ dryRun, ...result });
  } else {
    const p = result.packs;
    const packs =
      p === undefined
        ? ''
        : `; ${p.packs} packs: ${p.removedPacks} ${dryRun ? 'to delete' : 'deleted'}, ${p.repackedPacks} ${dryRun ? 'to rewrite' : 'rewritten'}, ` +
          `${p.keptUnreferenced} unreferenced chunks left in mostly referenced packs` +
          (p.unreadablePacks > 0 ? `, ${p.unreadablePacks} unreadable packs left alone (see verify)` : '');
    process.stdout.write(
      `gc: ${result.indexes} indexes reference ${result.referencedChunks} chunks; ${result.chunkFiles} chunks stored; ` +
        `${dryRun ? 'would remove' : 'removed'} ${result.removedChunks} (${formatBytes(result.removedBytes)}), kept ${result.keptRecent} recent ` +
        `unreferenced (cutoff ${result.cutoff}), ${result.removedTempFiles} temporary files${packs} in ${result.seconds.toFixed(1)} s\n`,
    );
  }
  return 0;
}
