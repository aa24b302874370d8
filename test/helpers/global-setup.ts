/**
 * Vitest global setup: every test run records mount holds (src/backup/holds.ts) in its own
 * directory, never in the machine's /var/lib/bootrestore/holds. Spawned servers and CLIs inherit it.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export default function setup(): () => void {
  const dir = mkdtempSync(join(tmpdir(), 'bootrestore-test-holds-'));
  process.env.BOOTRESTORE_HOLDS_DIR = dir;
  return () => rmSync(dir, { recursive: true, force: true });
}
