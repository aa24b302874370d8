import { parseArgs, requireValue, UsageError } from '../args.js';
import { requireServer } from '../control-client.js';
import type { MountInfo } from '../../mounts/manager.js';
import type { ChunkCacheStats } from '../../cache/chunk-cache.js';
import type { ChunkVerification } from '../../backup/types.js';

/** GET /v1/mounts/cache: the cache's statistics and how loads into it are checked (`cache.verify`). */
type CacheReport = ChunkCacheStats & { readonly verify?: ChunkVerification };

const HELP = `usage: bootrestore mounts --config FILE [--json] [--metrics]

Lists the mounts of the server running FILE with their delta size and cache statistics.
--metrics prints the Prometheus metrics of the control endpoint instead.
`;

function mib(n: number): string {
  return `${(n / 1048576).toFixed(1)} MiB`;
}

export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv.map((a) => (a === '-h' ? '--help' : a)), { values: ['config'], booleans: ['json', 'metrics', 'help'] });
  if (args.booleans.has('help')) {
    process.stdout.write(HELP);
    return 0;
  }
  if (args.positionals.length > 0) throw new UsageError(`unexpected argument "${args.positionals[0]}"`);
  const client = await requireServer(requireValue(args, 'config'));
  if (args.booleans.has('metrics')) {
    process.stdout.write(await client.request<string>('GET', '/metrics'));
    return 0;
  }
  const mounts = await client.request<MountInfo[]>('GET', '/v1/mounts');
  if (args.booleans.has('json')) {
    const cache = await client.request<CacheReport>('GET', '/v1/mounts/cache');
    process.stdout.write(JSON.stringify({ mounts, cache }, null, 2) + '\n');
    return 0;
  }
  if (mounts.length === 0) {
    process.stdout.write('no mounts\n');
    return 0;
  }
  const rows = [['NAME', 'RESTORE POINT', 'TARGET/LUN', 'MODE', 'DELTA', 'CACHE HITS', 'MISSES', 'READS', 'WRITES']];
  for (const m of mounts) {
    rows.push([
      m.name,
      `${m.vm}@${m.point}`,
      `${m.iqn}/${m.lun}`,
      m.readOnly ? 'ro' : 'rw',
      mib(m.deltaBytes),
      String(m.cache.hits),
      String(m.cache.misses),
      String(m.reads),
      String(m.writes),
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  for (const r of rows) process.stdout.write(r.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd() + '\n');
  for (const m of mounts) {
    if (m.refusingWrites !== undefined) process.stdout.write(`! ${m.name} refuses writes: ${m.refusingWrites}\n`);
  }
  const cache = await client.request<CacheReport>('GET', '/v1/mounts/cache');
  process.stdout.write(
    `cache: ${mib(cache.bytes)} of ${mib(cache.maxBytes)} in ${cache.entries} chunks; ${cache.hits} hits, ${cache.misses} misses, ` +
      `${cache.sharedEntries} chunks shared by several mounts` +
      // `verify` is missing from servers older than cache.verify (they checked SHA-256).
      (cache.verify === undefined ? '' : `; chunks checked by ${cache.verify === 'sha256' ? 'SHA-256' : 'CRC32'}`) +
      (cache.preallocatedBytes > 0 || cache.preallocating
        ? `; ${mib(cache.preallocatedBytes)} preallocated${cache.preallocating ? ' so far' : ''}`
        : '') +
      '\n',
  );
  return 0;
}
