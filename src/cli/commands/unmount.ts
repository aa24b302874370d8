import { parseArgs, requireValue, UsageError } from '../args.js';
import { requireServer } from '../control-client.js';

const HELP = `usage: bootrestore unmount --config FILE MOUNT (--keep | --discard)

Removes MOUNT's LUN from the server running FILE (its sessions are closed). --keep leaves the
delta on disk (mount the same name again to resume it, or commit it later); --discard deletes it.
One of the two must be given: nothing the VM wrote is thrown away by default.
`;

export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv.map((a) => (a === '-h' ? '--help' : a)), { values: ['config'], booleans: ['keep', 'discard', 'help'] });
  if (args.booleans.has('help')) {
    process.stdout.write(HELP);
    return 0;
  }
  const [name, extra] = args.positionals;
  if (name === undefined) throw new UsageError('name the mount to remove (see "bootrestore mounts")');
  if (extra !== undefined) throw new UsageError(`unexpected argument "${extra}"`);
  const keep = args.booleans.has('keep');
  const discard = args.booleans.has('discard');
  if (keep === discard) throw new UsageError('give exactly one of --keep (leave the delta on disk) or --discard (delete it)');
  const client = await requireServer(requireValue(args, 'config'));
  const result = await client.request<{ warning?: string }>('DELETE', `/v1/mounts/${encodeURIComponent(name)}?delta=${keep ? 'keep' : 'discard'}`);
  process.stdout.write(`unmounted ${name} (delta ${keep ? 'kept' : 'discarded'})\n`);
  if (result.warning !== undefined) process.stderr.write(`warning: ${result.warning}\n`);
  return 0;
}
