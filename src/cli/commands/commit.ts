import { parseArgs, requireValue, UsageError } from '../args.js';
import { requireServer } from '../control-client.js';

const HELP = `usage: bootrestore commit --config FILE MOUNT [--json]

Turns MOUNT's restore point + its delta into a new restore point of the same VM (its parent is
the mounted point; only changed chunks are new). Writes to the LUN are held while it runs; the
mount keeps running over its original base and delta afterwards.
`;

export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv.map((a) => (a === '-h' ? '--help' : a)), { values: ['config'], booleans: ['json', 'help'] });
  if (args.booleans.has('help')) {
    process.stdout.write(HELP);
    return 0;
  }
  const [name, extra] = args.positionals;
  if (name === undefined) throw new UsageError('name the mount to commit (see "bootrestore mounts")');
  if (extra !== undefined) throw new UsageError(`unexpected argument "${extra}"`);
  const client = await requireServer(requireValue(args, 'config'));
  const result = await client.request<{ point: string; newChunks: number; newBytesStored: number; chunks: number }>(
    'POST',
    `/v1/mounts/${encodeURIComponent(name)}/commit`,
  );
  if (args.booleans.has('json')) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
  else process.stdout.write(`committed ${name} as restore point ${result.point}: ${result.newChunks} new chunks of ${result.chunks}, ${result.newBytesStored} bytes stored\n`);
  return 0;
}
