/**
 * Holds: "this restore point is in use by a mount" records, kept OUTSIDE the repository.
 *
 * A mount reads its restore point's chunks for as long as it lives, and a kept delta is worthless
 * without its base restore point. The repository itself is never written by a mount (it may be on
 * read-only storage, and its files must stay byte-identical), so the server records each mount in a
 * host-local holds directory instead; `prune` keeps held restore points and `gc` refuses to run while
 * a held restore point's index is missing (it could not know which chunks the mount still reads).
 *
 *   <holdsDir>/<24 hex>.json   { version, repository (real path), vm, point, holder, pid, host,
 *                                bootId?, deltaRecord?, createdAt }
 *
 * A hold is live while its delta's mount record (deltaRecord, `<deltaDir>/<mount>/mount.json`) still
 * names the same restore point, or while the process that placed it runs (same boot). Holds of
 * another host are always treated as live (their process cannot be checked). Stale holds are
 * removed (moved aside and re-checked, so a hold placed meanwhile survives) by whoever reads them,
 * `list` and `prune --dry-run` included: the holds directory is not part of the repository.
 * holdsDir: $BOOTRESTORE_HOLDS_DIR, else /var/lib/bootrestore/holds for root, else
 * $XDG_STATE_HOME/bootrestore/holds (~/.local/state): servers and prune/gc must agree on it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp, readFileSync } from 'node:fs';
import { homedir, hostname } from 'node:os';
import { join } from 'node:path';
import { RepositoryError } from './errors.js';
import { errnoCode, fsyncDir, isProcessAlive, readdirIfPresent, writeFileAtomic } from './repository.js';

export interface Hold {
  readonly version: 1;
  /** Real path of the repository directory. */
  readonly repository: string;
  readonly vm: string;
  readonly point: string;
  /** Who holds it, for messages: "mount NAME". */
  readonly holder: string;
  readonly pid: number;
  readonly host: string;
  /** The kernel's boot id when the hold was placed: after a reboot its pid means nothing. */
  readonly bootId?: string;
  /** Mount record whose presence keeps the hold live after the server exits (kept delta). */
  readonly deltaRecord?: string;
  readonly createdAt: string;
}

export interface HoldFile extends Hold {
  readonly file: string;
}

export function holdsDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.BOOTRESTORE_HOLDS_DIR) return env.BOOTRESTORE_HOLDS_DIR;
  if (process.getuid?.() === 0) return '/var/lib/bootrestore/holds';
  return join(env.XDG_STATE_HOME || join(homedir(), '.local', 'state'), 'bootrestore', 'holds');
}

export interface HoldRequest {
  readonly repository: string;
  readonly vm: string;
  readonly point: string;
  readonly holder: string;
  readonly deltaRecord?: string;
}

/** Where the hold of `request` lives: one file per (repository, restore point, holder). */
export async function holdPath(request: HoldRequest, dir = holdsDir()): Promise<string> {
  return holdFileOf(await fsp.realpath(request.repository), request, dir);
}

function holdFileOf(realRepository: string, request: HoldRequest, dir: string): string {
  const key = [realRepository, request.vm, request.point, request.deltaRecord ?? `${hostname()}:${process.pid}:${request.holder}`].join('\0');
  return join(dir, createHash('sha256').update(key).digest('hex').slice(0, 24) + '.json');
}

/** Record (durably) that `request.holder` uses the restore point; returns the hold file's path. */
export async function placeHold(request: HoldRequest, dir = holdsDir()): Promise<string> {
  const repository = await fsp.realpath(request.repository);
  const file = holdFileOf(repository, request, dir);
  const boot = currentBootId();
  const hold: Hold = {
    version: 1,
    repository,
    vm: request.vm,
    point: request.point,
    holder: request.holder,
    pid: process.pid,
    host: hostname(),
    ...(boot !== null ? { bootId: boot } : {}),
    ...(request.deltaRecord ? { deltaRecord: request.deltaRecord } : {}),
    createdAt: new Date().toISOString(),
  };
  await fsp.mkdir(dir, { recursive: true });
  await writeFileAtomic(file, Buffer.from(JSON.stringify(hold, null, 2) + '\n'));
  await fsyncDir(dir);
  return file;
}

export async function releaseHold(file: string): Promise<void> {
  await fsp.rm(file, { force: true });
}

/** Live holds on restore points of `repoDir`; stale holds (of any repository) found on the way are removed. */
export async function liveHolds(repoDir: string, dir = holdsDir()): Promise<HoldFile[]> {
  const repository = await fsp.realpath(repoDir);
  const live: HoldFile[] = [];
  for (const name of (await readdirIfPresent(dir)).sort()) {
    if (!/^[0-9a-f]{24}\.json$/.test(name)) continue;
    const file = join(dir, name);
    const hold = await readHold(file);
    if (hold === undefined) continue; // released meanwhile
    // Stale holds of every repository go (those of deleted test or bench repositories too).
    if (!(await isHoldLive(hold))) await removeStaleHold(file, hold);
    else if (hold.repository === repository) live.push({ ...hold, file });
  }
  return live;
}

/** A hold file's content; undefined if it is gone. Unreadable or malformed: an error (it may protect anything). */
async function readHold(file: string): Promise<Hold | undefined> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return undefined;
    throw new RepositoryError(`hold file ${file} is unreadable (${(err as Error).message}); remove it if no mount uses it`);
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    throw new RepositoryError(`hold file ${file} is not JSON (${(err as Error).message}); remove it if no mount uses it`);
  }
  const v = value as Partial<Record<keyof Hold, unknown>> | null;
  const fieldsOk =
    v !== null &&
    typeof v === 'object' &&
    (['repository', 'vm', 'point', 'holder', 'host'] as const).every((k) => typeof v[k] === 'string') &&
    typeof v.pid === 'number' &&
    (v.deltaRecord === undefined || typeof v.deltaRecord === 'string');
  if (!fieldsOk) throw new RepositoryError(`hold file ${file} is not a hold (fields missing or of the wrong type); remove it if no mount uses it`);
  return value as Hold;
}

/**
 * Remove a hold judged stale. A mount may have just placed a new hold under the same name (same
 * repository, point and record): move the file aside first and look again; what is not the stale
 * hold goes back. A hold that cannot be removed (e.g. no write access) just stays.
 */
async function removeStaleHold(file: string, stale: Hold): Promise<void> {
  const aside = `${file}.stale-${process.pid}-${randomBytes(4).toString('hex')}`;
  try {
    await fsp.rename(file, aside);
  } catch {
    return;
  }
  const moved = await readHold(aside).catch(() => undefined);
  if (moved !== undefined && (moved.createdAt !== stale.createdAt || moved.pid !== stale.pid)) {
    await fsp.rename(aside, file).catch(() => undefined);
    return;
  }
  await fsp.rm(aside, { force: true }).catch(() => undefined);
}

let bootId: string | null | undefined;
function currentBootId(): string | null {
  if (bootId === undefined) {
    try {
      bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim() || null;
    } catch {
      bootId = null;
    }
  }
  return bootId;
}

async function isHoldLive(hold: Hold): Promise<boolean> {
  if (hold.host !== hostname()) return true;
  if (hold.deltaRecord) {
    try {
      const record = JSON.parse(await fsp.readFile(hold.deltaRecord, 'utf8')) as { vm?: unknown; point?: unknown };
      if (record.vm === hold.vm && record.point === hold.point) return true;
    } catch {
      // No (readable) record: the delta was discarded; only the process can keep the hold.
    }
  }
  // A pid from before the last reboot may belong to any process now.
  if (hold.bootId !== undefined && currentBootId() !== null && hold.bootId !== currentBootId()) return false;
  return isProcessAlive(hold.pid);
}

/** "mount NAME (server pid N on HOST, delta DIR)" for messages. */
export function describeHold(hold: Hold): string {
  const where = hold.deltaRecord ? `, delta ${join(hold.deltaRecord, '..')}` : '';
  return `${hold.holder} (server pid ${hold.pid} on ${hold.host}${where})`;
}
