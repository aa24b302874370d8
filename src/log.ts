import { pino, type Logger } from 'pino';

export type { Logger };

/**
 * The process-wide root logger. Library code takes a `Logger` parameter (a child of this one)
 * rather than importing it, so tests can pass a silent logger.
 * Level: BOOTRESTORE_LOG_LEVEL (default "info"); output: stderr as JSON lines.
 */
export function createRootLogger(level = process.env.BOOTRESTORE_LOG_LEVEL ?? 'info'): Logger {
  return pino({ level, base: { pid: process.pid } }, pino.destination({ fd: 2, sync: false }));
}

/** A logger that writes nothing: for tests and library defaults. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
