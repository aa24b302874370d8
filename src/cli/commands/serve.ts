import { parseArgs, requireValue, UsageError } from '../args.js';
import { loadConfig, ConfigError } from '../../config/config.js';
import { createRootLogger } from '../../log.js';
import { BootrestoreService } from '../../service.js';

const HELP = `usage: bootrestore serve --config FILE

Serves the targets and LUNs of FILE (JSON; schema in docs/config.schema.json) over iSCSI until
SIGINT or SIGTERM, then shuts down cleanly: in-flight commands finish, sockets close, LUNs flush.
Logs are JSON lines on stderr (level: the config's "logLevel" or BOOTRESTORE_LOG_LEVEL).
`;

export async function run(argv: string[]): Promise<number> {
  const args = parseArgs(argv.map((a) => (a === '-h' ? '--help' : a)), { values: ['config'], booleans: ['help'] });
  if (args.booleans.has('help')) {
    process.stdout.write(HELP);
    return 0;
  }
  if (args.positionals.length > 0) throw new UsageError(`unexpected argument "${args.positionals[0]}"`);
  const file = requireValue(args, 'config');
  let config;
  try {
    config = await loadConfig(file);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`bootrestore serve: bad config: ${err.message}\n`);
      return 78; // EX_CONFIG
    }
    throw err;
  }
  const logger = createRootLogger(process.env.BOOTRESTORE_LOG_LEVEL ?? config.logLevel);
  const service = new BootrestoreService(config, logger);
  await service.start();

  let stopping: Promise<void> | undefined;
  const stop = (signal: string): Promise<void> => {
    if (!stopping) {
      logger.info({ signal }, 'stopping');
      stopping = service.stop().then(() => logger.info('stopped'));
    }
    return stopping;
  };
  await new Promise<void>((resolveStop) => {
    process.once('SIGINT', () => void stop('SIGINT').then(resolveStop));
    process.once('SIGTERM', () => void stop('SIGTERM').then(resolveStop));
  });
  return 0;
}
