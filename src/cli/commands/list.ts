/** `bootrestore list --repo DIR [--vm NAME] [--json]` */
import { parseArgs, requireValue, UsageError } from '../args.js';
import { listRestorePointsDetailed } from '../../backup/reader.js';
import { formatBytes, printJson, usageRequested } from '../../backup/cli-support.js';

const USAGE = `usage: bootrestore list --repo DIR [--vm NAME] [--json]

List restore points (oldest first per VM). Unreadable indexes are reported and make the exit code 1.`;

export async function run(argv: string[]): Promise<number> {
  if (usageRequested(argv)) {
    process.stdout.write(USAGE + '\n');
    return 0;
  }
  const args = parseArgs(argv, { values: ['repo', 'vm'], booleans: ['json'] });
  if (args.positionals.length > 0) throw new UsageError(`list takes no positional arguments (got "${args.positionals[0]}")`);
  const { points, broken } = await listRestorePointsDetailed(requireValue(args, 'repo'), args.values.get('vm'));
  if (args.booleans.has('json')) {
    printJson({ points, broken });
  } else {
    const rows = [['VM', 'ID', 'SIZE', 'CHUNK', 'CHUNKS', 'ZERO', 'PARENT', 'SOURCE']];
    for (const p of points) {
      rows.push([p.vm, p.id, formatBytes(p.imageSize), formatBytes(p.chunkSize), String(p.chunkCount), String(p.zeroChunks), p.parent ?? '-', p.source]);
    }
    const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
    for (const r of rows) process.stdout.write(r.map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!))).join('  ') + '\n');
    for (const b of broken) process.stdout.write(`BROKEN ${b.vm}/${b.id}: ${b.reason}\n`);
  }
  return broken.length > 0 ? 1 : 0;
}
