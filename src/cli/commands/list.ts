/** `bootrestore list --repo DIR [--vm NAME] [--json]` */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { listRestorePointsDetailed } from '../../backup/reader.js';
import { formatBytes, printJson, usageRequested } from '../../backup/cli-support.js';
import { liveHolds } from '../../backup/holds.js';

const USAGE = `usage: bootrestore list --repo DIR [--vm NAME] [--json]

List restore points (oldest first per VM). Unreadable indexes are reported and make the exit code 1.
USED BY names the mounts (running, or kept deltas) that use a restore point: prune keeps those.`;

export async function run(argv: string[]): Promise<number> {
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm'], booleans: ['json'] });
  if (args.positionals.length > 0) throw new UsageError(`list takes no positional arguments (got "${args.positionals[0]}")`);
  const repo = requireValue(args, 'repo');
  const { points, broken } = await listRestorePointsDetailed(repo, args.values.get('vm'));
  const usedBy = new Map<string, string[]>();
  try {
    for (const hold of await liveHolds(repo)) {
      const key = `${hold.vm}/${hold.point}`;
      usedBy.set(key, [...(usedBy.get(key) ?? []), hold.holder]);
    }
  } catch (err) {
    process.stderr.write(`warning: cannot tell which restore points mounts use: ${err instanceof Error ? err.message : String(err)}\n`);
  }
  const holdersOf = (p: { vm: string; id: string }): string[] => usedBy.get(`${p.vm}/${p.id}`) ?? [];
  if (args.booleans.has('json')) {
    printJson({ points: points.map((p) => ({ ...p, usedBy: holdersOf(p) })), broken });
  } else {
    const rows = [['VM', 'ID', 'SIZE', 'CHUNK', 'CHUNKS', 'ZERO', 'PARENT', 'USED BY', 'SOURCE']];
    for (const p of points) {
      const holders = holdersOf(p);
      rows.push([
        p.vm,
        p.id,
        formatBytes(p.imageSize),
        formatBytes(p.chunkSize),
        String(p.chunkCount),
        String(p.zeroChunks),
        p.parent ?? '-',
        holders.length > 0 ? holders.join(',') : '-',
        p.source,
      ]);
    }
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
    for (const r of rows) process.stdout.write(r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ') + '\n');
    for (const b of broken) process.stdout.write(`BROKEN ${b.vm}/${b.id}: ${b.reason}\n`);
  }
  return broken.length > 0 ? 1 : 0;
}
