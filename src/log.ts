import { pino, type Logger } from 'pino';

export type { Logger };

const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/**
 * The process-wide root logger. Library code takes a `Logger` parameter (a child of this one)
 * rather than importing it, so tests can pass a silent logger.
 * Level: BOOTRESTORE_LOG_LEVEL (default "info"); output: stderr as JSON lines.
 */
export function createRootLogger(level = process.env.BOOTRESTORE_LOG_LEVEL ?? 'info'): Logger {
  if (!LEVELS.includes(level)) {
    const from = process.env.BOOTRESTORE_LOG_LEVEL === level ? 'BOOTRESTORE_LOG_LEVEL' : 'log level';
    throw new Error(`${from}: "${level}" must be one of ${LEVELS.join(', ')}`);
  }
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: false }));
}

/** A logger that writes nothing: for tests and library defaults. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
