/** `bootrestore prune --repo DIR --vm NAME --keep-last N [--dry-run] [--json]` */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { pruneVm } from '../../backup/maintenance.js';
import { parseCount, printJson, usageRequested } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore prune --repo DIR --vm NAME --keep-last N [--dry-run] [--json]

Delete all but the newest N restore points of VM NAME. Every index is complete, so the remaining
points stay readable; run "bootrestore gc" afterwards to free the chunks no point references.
Restore points a mount uses (a running mount, or a kept delta) are kept whatever their age; mounts
record that in the holds directory ($BOOTRESTORE_HOLDS_DIR, else /var/lib/bootrestore/holds as root,
else $XDG_STATE_HOME/bootrestore/holds or ~/.local/state/bootrestore/holds), so run prune as the
server's user or with the same setting. Stale holds found there are removed (also by --dry-run).`;

export async function run(argv: string[]): Promise<number> {
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm', 'keep-last'], booleans: ['json', 'dry-run'] });
  if (args.positionals.length > 0) throw new UsageError(`prune takes no positional arguments (got "${args.positionals[0]}")`);
  const vm = requireValue(args, 'vm');
  const keepLast = parseCount(requireValue(args, 'keep-last'), '--keep-last');
  const dryRun = args.booleans.has('dry-run');
  const result = await pruneVm(requireValue(args, 'repo'), vm, keepLast, { dryRun });
  if (args.booleans.has('json')) {
    printJson({ vm, dryRun, ...result });
  } else {
    for (const id of result.removed) process.stdout.write(`${dryRun ? 'would remove' : 'removed'} ${vm}/${id}\n`);
    for (const { id, by } of result.held) process.stdout.write(`kept ${vm}/${id}: used by ${by}\n`);
    const held = result.held.length > 0 ? ` (${result.held.length} of them used by mounts)` : '';
    process.stdout.write(`prune ${vm}: ${result.removed.length} removed, ${result.kept.length} kept${held}${dryRun ? ' (dry run)' : ''}\n`);
  }
  return 0;
}
