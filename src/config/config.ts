import { readFile } from 'node:fs/promises';
import { isAbsolute, resolve, dirname } from 'node:path';
import type { ChunkVerification } from '../backup/types.js';

/**
 * The bootrestore configuration file (JSON). Schema: docs/config.schema.json. Every key is checked;
 * unknown keys and bad values are refused with the file, the key path and the reason.
 */

export interface FileLunConfig {
  readonly kind: 'file';
  readonly lun: number;
  /** Absolute path (relative paths in the file are resolved against the config file's folder). */
  readonly file: string;
  readonly readOnly: boolean;
  /** Optional explicit identity seed / serial; default derives from target IQN + LUN + file. */
  readonly serial?: string;
}

export interface BackupLunConfig {
  readonly kind: 'backup';
  readonly lun: number;
  readonly vm: string;
  /** Restore point id or "latest" (see `mount`). */
  readonly point: string;
  readonly readOnly: boolean;
  /**
   * Mount name: names the delta and seeds the LUN identity (default: the text after the IQN's
   * last ':' + "-lun<N>"). "latest" is resolved when the delta is first created; later starts
   * keep that restore point (the delta belongs to it).
   */
  readonly mount?: string;
}

export type LunConfig = FileLunConfig | BackupLunConfig;

export interface ChapConfig {
  /** What initiators must present (CHAP_N / secret). */
  readonly username: string;
  readonly secret: string;
  /** Mutual CHAP: the target's own name and secret, answered when the initiator challenges. */
  readonly mutual?: { readonly username: string; readonly secret: string };
}

export interface TargetConfig {
  readonly iqn: string;
  readonly alias?: string;
  readonly luns: readonly LunConfig[];
  /** Allowed initiator IQNs; absent = any initiator. */
  readonly initiators?: readonly string[];
  readonly chap?: ChapConfig;
}

export interface Portal {
  readonly host: string;
  readonly port: number;
}

export interface ServerConfig {
  /** The file the config came from (for messages). */
  readonly source: string;
  readonly listen: readonly Portal[];
  readonly targets: readonly TargetConfig[];
  readonly repository?: string;
  /**
   * The chunk cache: its size; whether the server reserves (faults in) that memory at start so the
   * first restore after a start reads as fast as later ones (default false: it grows as it fills);
   * how each chunk loaded into it from the repository is checked (default 'crc32', see README).
   */
  readonly cache: { readonly maxBytes: number; readonly preallocate: boolean; readonly verify: ChunkVerification };
  readonly deltaDir?: string;
  /** Local control API (HTTP on loopback). */
  readonly control?: Portal;
  readonly logLevel: string;
  /** Seconds between target-initiated NOP-In pings on idle connections (0 = off). */
  readonly nopInIntervalSeconds: number;
  /** Seconds to wait for a NOP-Out answer before dropping the connection. */
  readonly nopInTimeoutSeconds: number;
}

export class ConfigError extends Error {
  constructor(
    readonly file: string,
    readonly key: string,
    readonly reason: string,
  ) {
    super(`${file}: ${key === '' ? '(top level)' : key}: ${reason}`);
    this.name = 'ConfigError';
  }
}

const DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024;
const MIN_CACHE_BYTES = 1024 * 1024;
export const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
/** RFC 7143 §4.2.7.1 / RFC 3721: iqn. names, eui. names, naa. names. */
const ISCSI_NAME = /^(iqn\.\d{4}-\d{2}\.[a-z0-9][a-z0-9.-]*(:[\x21-\x7e]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)$/;
const SIZE = /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|K|M|G|T|KB|MB|GB|TB)?$/i;

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
type JsonObject = { [key: string]: Json };

class Checker {
  constructor(readonly file: string) {}

  fail(key: string, reason: string): never {
    throw new ConfigError(this.file, key, reason);
  }

  object(value: Json | undefined, key: string, allowed: readonly string[]): JsonObject {
    if (value === null || typeof value !== 'object' || Array.isArray(value)) this.fail(key, 'must be an object');
    for (const k of Object.keys(value)) {
      if (!allowed.includes(k)) this.fail(join(key, k), `unknown key (allowed: ${allowed.join(', ')})`);
    }
    return value;
  }

  array(value: Json | undefined, key: string): Json[] {
    if (!Array.isArray(value)) this.fail(key, 'must be an array');
    return value;
  }

  string(value: Json | undefined, key: string): string {
    if (typeof value !== 'string' || value.length === 0) this.fail(key, 'must be a non-empty string');
    return value;
  }

  boolean(value: Json | undefined, key: string, fallback: boolean): boolean {
    if (value === undefined) return fallback;
    if (typeof value !== 'boolean') this.fail(key, 'must be true or false');
    return value;
  }

  integer(value: Json | undefined, key: string, min: number, max: number): number {
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
      this.fail(key, `must be an integer from ${min} to ${max}`);
    }
    return value;
  }

  size(value: Json | undefined, key: string): number {
    if (typeof value === 'number') {
      if (!Number.isSafeInteger(value) || value < 0) this.fail(key, 'must be a non-negative whole number of bytes');
      return value;
    }
    if (typeof value !== 'string') this.fail(key, 'must be a number of bytes or a string like "512MiB" or "1GiB"');
    const bytes = parseSize(value);
    if (bytes === undefined) this.fail(key, `cannot read size "${value}" (use e.g. 1048576, "64MiB", "1GiB")`);
    return bytes;
  }

  portal(value: Json | undefined, key: string): Portal {
    const text = this.string(value, key);
    const portal = parsePortal(text);
    if (!portal) this.fail(key, `"${text}" is not host:port (port 0–65535; IPv6 as [addr]:port)`);
    return portal;
  }

  iscsiName(value: Json | undefined, key: string): string {
    const name = this.string(value, key);
    if (name.length > 223) this.fail(key, 'iSCSI names are at most 223 bytes (RFC 7143 §4.2.7.1)');
    if (!ISCSI_NAME.test(name)) this.fail(key, `"${name}" is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui. or naa.)`);
    return name;
  }
}

function join(parent: string, child: string | number): string {
  if (typeof child === 'number') return `${parent}[${child}]`;
  return parent === '' ? child : `${parent}.${child}`;
}

export function parseSize(text: string): number | undefined {
  const m = SIZE.exec(text.trim());
  if (!m) return undefined;
  const unit = (m[2] ?? 'B').toUpperCase();
  const power = { B: 0, K: 1, KIB: 1, KB: 1, M: 2, MIB: 2, MB: 2, G: 3, GIB: 3, GB: 3, T: 4, TIB: 4, TB: 4 }[unit];
  if (power === undefined) return undefined;
  const bytes = Math.round(Number(m[1]) * 1024 ** power);
  return Number.isSafeInteger(bytes) ? bytes : undefined;
}

export function parsePortal(text: string): Portal | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s]+)):(\d{1,5})$/.exec(text);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { host: (m[1] ?? m[2])!, port };
}

/** Validate parsed JSON; `file` names the source in errors, `baseDir` resolves relative paths. */
export function validateConfig(raw: unknown, file: string, baseDir: string): ServerConfig {
  const c = new Checker(file);
  const top = c.object(raw as Json, '', [
    '$schema',
    'listen',
    'targets',
    'repository',
    'cache',
    'deltaDir',
    'control',
    'logLevel',
    'nopInIntervalSeconds',
    'nopInTimeoutSeconds',
  ]);
  const path = (v: Json | undefined, key: string): string => {
    const p = c.string(v, key);
    return isAbsolute(p) ? p : resolve(baseDir, p);
  };

  const listen = c.array(top.listen, 'listen').map((v, i) => c.portal(v, join('listen', i)));
  if (listen.length === 0) c.fail('listen', 'needs at least one portal, e.g. "127.0.0.1:3260"');

  const repository = top.repository === undefined ? undefined : path(top.repository, 'repository');
  const deltaDir = top.deltaDir === undefined ? undefined : path(top.deltaDir, 'deltaDir');
  let cacheBytes = DEFAULT_CACHE_BYTES;
  let preallocate = false;
  let verify: ChunkVerification = 'crc32';
  if (top.cache !== undefined) {
    const cache = c.object(top.cache, 'cache', ['maxBytes', 'preallocate', 'verify']);
    if (cache.maxBytes !== undefined) cacheBytes = c.size(cache.maxBytes, 'cache.maxBytes');
    if (cacheBytes < MIN_CACHE_BYTES) c.fail('cache.maxBytes', 'must be at least 1MiB (one chunk must fit)');
    preallocate = c.boolean(cache.preallocate, 'cache.preallocate', false);
    if (cache.verify !== undefined) {
      const v = c.string(cache.verify, 'cache.verify');
      verify = v === 'crc32' || v === 'sha256' ? v : c.fail('cache.verify', `must be "crc32" or "sha256", not ${JSON.stringify(v)}`);
    }
  }
  let control: Portal | undefined;
  if (top.control !== undefined) {
    const ctl = c.object(top.control, 'control', ['listen']);
    control = c.portal(ctl.listen, 'control.listen');
    if (!isLoopback(control.host)) c.fail('control.listen', 'the control API listens on loopback only (127.0.0.0/8, ::1 or localhost)');
  }
  let logLevel = 'info';
  if (top.logLevel !== undefined) {
    logLevel = c.string(top.logLevel, 'logLevel');
    if (!LOG_LEVELS.includes(logLevel)) c.fail('logLevel', `must be one of ${LOG_LEVELS.join(', ')}`);
  }
  const nopInIntervalSeconds =
    top.nopInIntervalSeconds === undefined ? 15 : c.integer(top.nopInIntervalSeconds, 'nopInIntervalSeconds', 0, 3600);
  const nopInTimeoutSeconds =
    top.nopInTimeoutSeconds === undefined ? 30 : c.integer(top.nopInTimeoutSeconds, 'nopInTimeoutSeconds', 1, 3600);

  const targets = c.array(top.targets, 'targets').map((tv, ti): TargetConfig => {
    const tk = join('targets', ti);
    const t = c.object(tv, tk, ['iqn', 'alias', 'luns', 'initiators', 'chap']);
    const iqn = c.iscsiName(t.iqn, join(tk, 'iqn'));
    const alias = t.alias === undefined ? undefined : c.string(t.alias, join(tk, 'alias'));
    const initiators =
      t.initiators === undefined
        ? undefined
        : c.array(t.initiators, join(tk, 'initiators')).map((v, i) => c.iscsiName(v, join(join(tk, 'initiators'), i)));
    let chap: ChapConfig | undefined;
    if (t.chap !== undefined) {
      const ck = join(tk, 'chap');
      const credentials = (v: Json | undefined, key: string): { username: string; secret: string } => {
        const o = c.object(v, key, key === ck ? ['username', 'secret', 'mutual'] : ['username', 'secret']);
        const secret = c.string(o.secret, join(key, 'secret'));
        // RFC 7143 §12.1.3: secrets should be at least 96 bits; common initiators cap them at 16 bytes.
        if (secret.length < 12 || secret.length > 16) c.fail(join(key, 'secret'), 'must be 12 to 16 characters (RFC 7143 §12.1.3; initiators cap at 16)');
        return { username: c.string(o.username, join(key, 'username')), secret };
      };
      const own = credentials(t.chap, ck);
      const mutualValue = (t.chap as JsonObject).mutual;
      const mutual = mutualValue === undefined ? undefined : credentials(mutualValue, join(ck, 'mutual'));
      if (mutual && mutual.secret === own.secret) c.fail(join(join(ck, 'mutual'), 'secret'), 'must differ from the initiator secret (RFC 7143 §12.1.3)');
      chap = { ...own, ...(mutual ? { mutual } : {}) };
    }
    const seen = new Set<number>();
    const luns = c.array(t.luns, join(tk, 'luns')).map((lv, li): LunConfig => {
      const lk = join(join(tk, 'luns'), li);
      const l = c.object(lv, lk, ['lun', 'file', 'readOnly', 'serial', 'backup']);
      const lun = c.integer(l.lun, join(lk, 'lun'), 0, 16383);
      if (seen.has(lun)) c.fail(join(lk, 'lun'), `LUN ${lun} appears twice in target ${iqn}`);
      seen.add(lun);
      const readOnly = c.boolean(l.readOnly, join(lk, 'readOnly'), false);
      if ((l.file === undefined) === (l.backup === undefined)) {
        c.fail(lk, 'needs exactly one of "file" (a raw image) or "backup" ({ "vm": NAME, "point": ID | "latest" })');
      }
      if (l.file !== undefined) {
        const serial = l.serial === undefined ? undefined : c.string(l.serial, join(lk, 'serial'));
        return { kind: 'file', lun, file: path(l.file, join(lk, 'file')), readOnly, ...(serial ? { serial } : {}) };
      }
      if (l.serial !== undefined) c.fail(join(lk, 'serial'), 'only file LUNs take a serial; a backup LUN is named by its mount');
      const bk = join(lk, 'backup');
      const b = c.object(l.backup, bk, ['vm', 'point', 'mount']);
      const vm = c.string(b.vm, join(bk, 'vm'));
      const point = b.point === undefined ? 'latest' : c.string(b.point, join(bk, 'point'));
      const mount = b.mount === undefined ? undefined : c.string(b.mount, join(bk, 'mount'));
      if (repository === undefined) c.fail(bk, 'a backup LUN needs the top-level "repository" key');
      if (!readOnly && deltaDir === undefined) c.fail(bk, 'a writable backup LUN needs the top-level "deltaDir" key');
      return { kind: 'backup', lun, vm, point, readOnly, ...(mount ? { mount } : {}) };
    });
    return { iqn, luns, ...(alias ? { alias } : {}), ...(initiators ? { initiators } : {}), ...(chap ? { chap } : {}) };
  });
  const iqns = new Set<string>();
  targets.forEach((t, i) => {
    if (iqns.has(t.iqn)) c.fail(join(join('targets', i), 'iqn'), `target ${t.iqn} appears twice`);
    iqns.add(t.iqn);
  });

  return {
    source: file,
    listen,
    targets,
    ...(repository ? { repository } : {}),
    ...(deltaDir ? { deltaDir } : {}),
    ...(control ? { control } : {}),
    cache: { maxBytes: cacheBytes, preallocate, verify },
    logLevel,
    nopInIntervalSeconds,
    nopInTimeoutSeconds,
  };
}

export async function loadConfig(file: string): Promise<ServerConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, '', `cannot read: ${(err as NodeJS.ErrnoException).message}`);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw new ConfigError(file, '', `not valid JSON: ${(err as Error).message}`);
  }
  return validateConfig(raw, file, dirname(resolve(file)));
}

export function isIscsiName(name: string): boolean {
  return name.length <= 223 && ISCSI_NAME.test(name);
}

export function isLoopback(host: string): boolean {
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host) || host === '::1' || host === 'localhost';
}
