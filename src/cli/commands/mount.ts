import { parseArgs, requireValue, UsageError } from '../args.js';
import { findServer, startBackgroundServer } from '../control-client.js';
import type { MountInfo } from '../../mounts/manager.js';

const HELP = `usage: bootrestore mount --config FILE --vm NAME [--point ID|latest] [--name MOUNT]
                        [--target IQN] [--lun N] [--initiator IQN]... [--read-only] [--json]

Mounts a restore point as a LUN on the server running FILE, starting that server in the
background when none runs (its log: <deltaDir>/server.log). Writes go to the mount's delta in
<deltaDir>/<MOUNT>/delta/ (its record: <deltaDir>/<MOUNT>/mount.json); the backup is never
written. Without --target the mount gets a target of its own:
iqn.2026-12.io.bootrestore:mount.<MOUNT in lower case>, LUN 0. --initiator (repeatable) limits
who may log in to that target; without it every initiator that reaches the portal may. Mounting a
name whose delta was kept by "unmount --keep" resumes that delta (writable only). MOUNT defaults
to the VM name.
`;

export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv.map((a) => (a === '-h' ? '--help' : a)), { values: ['config', 'vm', 'point', 'name', 'target', 'lun'], booleans: ['read-only', 'json', 'help'], lists: ['initiator'] });
  if (args.booleans.has('help')) {
    process.stdout.write(HELP);
    return 0;
  }
  if (args.positionals.length > 0) throw new UsageError(`unexpected argument "${args.positionals[0]}"`);
  const configFile = requireValue(args, 'config');
  const vm = requireValue(args, 'vm');
  const lunText = args.values.get('lun');
  const lun = lunText === undefined ? undefined : /^\d{1,5}$/.test(lunText) ? Number(lunText) : NaN;
  if (lun !== undefined && (!Number.isInteger(lun) || lun > 16383)) throw new UsageError('--lun must be a decimal integer 0–16383');
  const found = await findServer(configFile, true);
  const client = found?.client ?? (await startBackgroundServer(configFile));
  const body = {
    vm,
    ...(args.values.has('point') ? { point: args.values.get('point') } : {}),
    ...(args.values.has('name') ? { name: args.values.get('name') } : {}),
    ...(args.values.has('target') ? { iqn: args.values.get('target') } : {}),
    ...(lun !== undefined ? { lun } : {}),
    ...(args.booleans.has('read-only') ? { readOnly: true } : {}),
    ...(args.lists.has('initiator') ? { initiators: args.lists.get('initiator') } : {}),
  };
  const mount = await client.request<MountInfo>('POST', '/v1/mounts', body);
  const status = await client.request<{ portals: Array<{ host: string; port: number }> }>('GET', '/v1/status');
  const portal = status.portals[0];
  const url = portal ? `iscsi://${portal.host}:${portal.port}/${mount.iqn}/${mount.lun}` : '';
  if (args.booleans.has('json')) {
    process.stdout.write(JSON.stringify({ ...mount, url }, null, 2) + '\n');
  } else {
    process.stdout.write(
      `mounted ${mount.vm}@${mount.point} as "${mount.name}": ${url} (serial ${mount.serial}, naa.${mount.naa}, ${mount.readOnly ? 'read-only' : 'writable'})\n`,
    );
  }
  return 0;
}
