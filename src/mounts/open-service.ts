import type { Logger } from '../log.js';
import type { ServerConfig } from '../config/config.js';
import { BootrestoreService } from '../service.js';

/**
 * Builds the service for a config. Backup LUNs (restore points mounted through src/cache) are
 * wired here once the mount layer is available.
 */
export async function openServiceForConfig(config: ServerConfig, logger: Logger): Promise<BootrestoreService> {
  return new BootrestoreService(config, logger);
}
