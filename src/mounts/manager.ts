import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import { freemem, totalmem } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '../log.js';
import { deriveIdentity } from '../identity.js';
import { isIscsiName } from '../config/config.js';
import { chunkFileBufferSize, openRestorePoint } from '../backup/reader.js';
import { DEFAULT_CHUNK_SIZE } from '../backup/engine.js';
import { writeRestorePoint } from '../backup/writer.js';
import { writeFileAtomic } from '../backup/repository.js';
import type { ChunkVerification } from '../backup/types.js';
import { holdPath, holdsDir, placeHold, releaseHold, type HoldRequest } from '../backup/holds.js';
import { processChunkCache, type ChunkCache } from '../cache/chunk-cache.js';
import { openBackupDevice, commitSpecFor, type BackupBlockDevice } from '../cache/backup-device.js';
import { renderPrometheus, type LunMetricsSource } from '../cache/metrics.js';
import { GatedDevice } from './gated-device.js';

/** Prefix of the IQN of a target created for a mount that names no target. */
export const MOUNT_IQN_PREFIX = 'iqn.2026-12.io.bootrestore:mount.';
const MOUNT_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** What is persisted per mount in `<deltaDir>/<name>/mount.json`. */
export interface MountRecord {
  readonly name: string;
  readonly vm: string;
  /** The resolved restore point id (never "latest": the mount keeps serving what it mounted). */
  readonly point: string;
  readonly iqn: string;
  readonly lun: number;
  readonly readOnly: boolean;
  readonly createdAt: string;
  /** Declared in the config file (re-created from there) rather than added at run time. */
  readonly fromConfig: boolean;
  /** Runtime mounts: false after `unmount --keep` (the delta stays; not re-mounted at start). */
  readonly active: boolean;
  readonly initiators?: readonly string[];
}

export interface MountRequest {
  readonly vm: string;
  readonly point?: string;
  readonly name?: string;
  readonly iqn?: string;
  readonly lun?: number;
  readonly readOnly?: boolean;
  readonly initiators?: readonly string[];
}

export interface MountInfo extends MountRecord {
  readonly serial: string;
  readonly naa: string;
  readonly blocks: number;
  readonly deltaBytes: number;
  readonly cache: { hits: number; misses: number; crossMountHits: number };
  readonly reads: number;
  readonly writes: number;
  /** Why the mount's delta refuses writes (docs/delta-format.md "A full file system, a failing disk"); absent while it takes them. */
  readonly refusingWrites?: string;
}

/** How mounts reach the iSCSI side (implemented by BootrestoreService). */
export interface LunHost {
  attach(iqn: string, lun: number, device: GatedDevice, initiators?: readonly string[]): Promise<void>;
  detach(iqn: string, lun: number): Promise<void>;
}

export class MountError extends Error {
  constructor(
    message: string,
    readonly status: number,
  ) {
    super(message);
    this.name = 'MountError';
  }
}

interface ActiveMount {
  record: MountRecord;
  readonly device: BackupBlockDevice;
  readonly gated: GatedDevice;
  /** This mount's hold on its restore point (src/backup/holds.ts). */
  readonly holdFile: string;
}

/** Memory `cache.preallocate` leaves to everything else on the machine. */
const PREALLOCATE_HEADROOM_BYTES = 512 * 1024 * 1024;

/** Memory this process may still take: what the machine has available, less under a cgroup limit. */
function availableMemory(): number {
  let available = freemem();
  const limit = process.constrainedMemory();
  // No limit reads as 0 or as 2^64.
  if (limit > 0 && limit < totalmem()) available = Math.min(available, limit - process.memoryUsage.rss());
  return available;
}

/**
 * Mounted restore points: each is a BackupBlockDevice (restore point + shared chunk cache + its own
 * delta in `<deltaDir>/<name>/delta`) served as a LUN. Records are persisted so a restarted server
 * resumes every mount with its delta.
 */
export class MountManager {
  private readonly mounts = new Map<string, ActiveMount>();
  readonly cache: ChunkCache;
  /** How chunks loaded into the cache are checked (config `cache.verify`). */
  readonly verification: ChunkVerification;
  private busy: Promise<unknown> = Promise.resolve();

  constructor(
    readonly repository: string,
    readonly deltaDir: string | undefined,
    /** Config `cache`: its size, and how chunks loaded into it are checked. */
    cacheConfig: { readonly maxBytes: number; readonly verify: ChunkVerification },
    private readonly host: LunHost,
    private readonly logger: Logger,
  ) {
    const cacheBytes = cacheConfig.maxBytes;
    this.verification = cacheConfig.verify;
    this.cache = processChunkCache({ maxBytes: cacheBytes, logger: logger.child({ component: 'chunk-cache' }) });
    const machineBytes = totalmem();
    if (cacheBytes > machineBytes) {
      logger.warn({ cacheBytes, machineBytes }, 'cache.maxBytes is larger than this machine\'s memory: the server may be killed for lack of memory once the cache fills');
    }
  }

  /**
   * Reserve the cache's memory in the background (config `cache.preallocate`), in buffers for the
   * chunk size of the first mounted restore point, or of the backup default (128 KiB) if nothing is
   * mounted yet. Call after the start-up mounts are open.
   */
  startCachePreallocation(): void {
    // Reserving more than the machine has free would only get the server (or another process) killed.
    const availableBytes = availableMemory();
    if (this.cache.maxBytes > availableBytes - PREALLOCATE_HEADROOM_BYTES) {
      this.logger.warn(
        { cacheBytes: this.cache.maxBytes, availableBytes },
        'cache.preallocate skipped: cache.maxBytes would leave less than 512 MiB of the memory available now; the cache allocates as it fills',
      );
      return;
    }
    const first = this.mounts.values().next().value;
    const bufferBytes = first?.device.cacheBufferBytes ?? chunkFileBufferSize(DEFAULT_CHUNK_SIZE);
    this.cache.preallocate(bufferBytes).catch((err: unknown) => {
      this.logger.warn({ err }, 'cache.preallocate stopped; the cache allocates as it fills');
    });
  }

  /** Serialise mount-table changes (mount/unmount/commit) so two requests cannot interleave. */
  private exclusive<T>(op: () => Promise<T>): Promise<T> {
    const next = this.busy.then(op, op);
    this.busy = next.catch(() => undefined);
    return next;
  }

  /** Re-mount every active runtime mount found in deltaDir (after a restart or crash). */
  async resumePersisted(): Promise<void> {
    if (!this.deltaDir) return;
    let names: string[];
    try {
      names = await readdir(this.deltaDir);
    } catch {
      return;
    }
    for (const name of names.sort()) {
      const record = await this.readRecord(name);
      if (!record) continue;
      // Every delta on disk holds its restore point, mounted or not (also deltas kept before
      // holds existed, or whose holds directory was lost).
      if (this.holdOutlivesServer(record)) {
        await placeHold(this.holdRequest(record)).catch((err: unknown) => {
          this.logger.error({ mount: name, err }, 'could not record that this delta uses its restore point; prune may remove it');
        });
      }
      if (record.fromConfig || !record.active || this.mounts.has(name)) continue;
      this.logger.info({ mount: name, vm: record.vm, point: record.point }, 'resuming mount');
      try {
        await this.exclusive(() => this.open(record, false));
      } catch (err) {
        // One broken mount (e.g. its restore point was pruned) must not keep the others down.
        this.logger.error({ mount: name, err }, 'could not resume mount; its delta is kept on disk');
      }
    }
  }

  mount(req: MountRequest, fromConfig = false): Promise<MountInfo> {
    return this.exclusive(async () => {
      const name = req.name ?? mountNameFrom(req.vm);
      if (!MOUNT_NAME.test(name)) throw new MountError(`mount name "${name}" must be 1–64 of A-Z a-z 0-9 . _ - (starting alphanumeric)`, 400);
      if (this.mounts.has(name)) throw new MountError(`mount "${name}" is already mounted`, 409);
      const readOnly = req.readOnly ?? false;
      if (!readOnly && !this.deltaDir) throw new MountError('a writable mount needs "deltaDir" in the config', 400);
      if (req.iqn !== undefined && !isIscsiName(req.iqn)) {
        throw new MountError(`"${req.iqn}" is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui. or naa.)`, 400);
      }
      const iqn = req.iqn ?? MOUNT_IQN_PREFIX + name.toLowerCase();
      const clash = [...this.mounts.values()].find((m) => m.record.iqn === iqn && m.record.lun === (req.lun ?? 0));
      if (clash) throw new MountError(`${iqn} LUN ${req.lun ?? 0} is already used by mount "${clash.record.name}"`, 409);
      const existing = await this.readRecord(name);
      let record: MountRecord;
      if (existing) {
        // Resume a kept delta: it only makes sense over the same restore point, and writable
        // (a read-only mount would hide what the VM wrote).
        const point = req.point && req.point !== 'latest' ? req.point : existing.point;
        if (existing.vm !== req.vm || existing.point !== point) {
          throw new MountError(
            fromConfig
              ? `mount "${name}" has a delta over ${existing.vm}@${existing.point} in ${join(this.deltaDir!, name)}; set "point" back, ` +
                  `give "backup.mount" a new name, or delete that folder to discard what the VM wrote`
              : `mount "${name}" has a kept delta over ${existing.vm}@${existing.point}; unmount it with --discard or choose another --name`,
            409,
          );
        }
        if (readOnly && !existing.readOnly) {
          throw new MountError(
            `mount "${name}" has a kept delta with the VM's writes; mount it writable to resume it, or unmount it with --discard first`,
            409,
          );
        }
        record = { ...existing, active: true, readOnly, fromConfig, ...(req.iqn ? { iqn: req.iqn } : {}), ...(req.lun !== undefined ? { lun: req.lun } : {}) };
      } else {
        const reader = await openRestorePoint(this.repository, req.vm, req.point ?? 'latest').catch((err: unknown) => {
          throw new MountError((err as Error).message, 404);
        });
        const point = reader.info.id;
        await reader.close();
        record = {
          name,
          vm: req.vm,
          point,
          iqn,
          lun: req.lun ?? 0,
          readOnly,
          createdAt: new Date().toISOString(),
          fromConfig,
          active: true,
          ...(req.initiators ? { initiators: req.initiators } : {}),
        };
      }
      return this.open(record, existing === undefined);
    });
  }

  /**
   * What keeps `prune`/`gc` off this mount's restore point: while its delta's record exists (the
   * delta needs its base even when no server runs), for a read-only mount (no delta) while this
   * server runs.
   */
  private holdRequest(record: Pick<MountRecord, 'name' | 'vm' | 'point' | 'readOnly'>): HoldRequest {
    return {
      repository: this.repository,
      vm: record.vm,
      point: record.point,
      holder: `mount ${record.name}`,
      ...(this.holdOutlivesServer(record) ? { deltaRecord: join(this.deltaDir!, record.name, 'mount.json') } : {}),
    };
  }

  /** A mount with a delta keeps its hold beyond unmount --keep and server stops; others release it. */
  private holdOutlivesServer(record: Pick<MountRecord, 'readOnly'>): boolean {
    return this.deltaDir !== undefined && !record.readOnly;
  }

  /** Open the device and attach it; a new mount that fails leaves nothing behind on disk. */
  private async open(record: MountRecord, isNew: boolean): Promise<MountInfo> {
    // The hold comes first: from here on, prune keeps this restore point and gc its chunks.
    const holdFile = await placeHold(this.holdRequest(record)).catch((err: unknown) => {
      throw new MountError(
        `could not record that mount "${record.name}" uses ${record.vm}@${record.point} in ${holdsDir()} ` +
          `(${(err as Error).message}); set BOOTRESTORE_HOLDS_DIR to a writable directory`,
        500,
      );
    });
    const dropHoldIfNew = async (): Promise<void> => {
      if (isNew) await releaseHold(holdFile).catch(() => undefined);
    };
    let reader;
    try {
      reader = await openRestorePoint(this.repository, record.vm, record.point, { prepare: true, verification: this.verification });
    } catch (err) {
      await dropHoldIfNew();
      throw err;
    }
    let device: BackupBlockDevice;
    try {
      const deltaDir = record.readOnly || !this.deltaDir ? null : join(this.deltaDir, record.name, 'delta');
      if (deltaDir) await mkdir(deltaDir, { recursive: true });
      device = await openBackupDevice({
        reader,
        cache: this.cache,
        deltaDir,
        mountId: record.name,
        // Stable per mount (survives restarts), different for two mounts of one restore point.
        identity: deriveIdentity(`mount\0${record.name}\0${record.createdAt}`, 'bootrestore RP'),
        logger: this.logger.child({ mount: record.name }),
        // Reads inside one chunk are served as views of the cached chunk (BlockDevice.read's
        // contract: callers never modify read results).
        zeroCopyReads: true,
      });
    } catch (err) {
      await reader.close();
      await dropHoldIfNew();
      throw err;
    }
    const gated = new GatedDevice(device);
    let attached = false;
    try {
      await this.host.attach(record.iqn, record.lun, gated, record.initiators);
      attached = true;
      // Persisted only once it works, so a failed mount cannot stop the next start.
      if (this.deltaDir) await this.writeRecord(record);
    } catch (err) {
      if (attached) await this.host.detach(record.iqn, record.lun).catch(() => undefined);
      else await device.close();
      if (isNew && this.deltaDir) await rm(join(this.deltaDir, record.name), { recursive: true, force: true });
      await dropHoldIfNew();
      throw err;
    }
    const active: ActiveMount = { record, device, gated, holdFile };
    this.mounts.set(record.name, active);
    this.logger.info({ mount: record.name, vm: record.vm, point: record.point, iqn: record.iqn, lun: record.lun }, 'mounted');
    return this.describe(active);
  }

  /** Remove a mount. A kept delta whose record cannot be updated (no room) is still unmounted: see `warning`. */
  unmount(name: string, delta: 'keep' | 'discard'): Promise<{ warning?: string }> {
    return this.exclusive(async () => {
      const m = this.mounts.get(name);
      if (!m) {
        const rec = await this.readRecord(name);
        if (rec && delta === 'discard' && this.deltaDir) {
          await rm(join(this.deltaDir, name), { recursive: true, force: true });
          await releaseHold(await holdPath(this.holdRequest(rec)));
          return {};
        }
        throw new MountError(`no mount named "${name}"`, 404);
      }
      this.mounts.delete(name);
      await this.host.detach(m.record.iqn, m.record.lun); // closes the device after flushing
      let warning: string | undefined;
      if (this.deltaDir && delta === 'discard') {
        await rm(join(this.deltaDir, name), { recursive: true, force: true });
      } else if (this.deltaDir) {
        // The LUN is gone and the delta is on disk either way; a record that still says "active"
        // (e.g. its file system is full) only means the next server start mounts it again.
        await this.writeRecord({ ...m.record, active: false }).catch((err: unknown) => {
          warning = `the delta is kept, but its record could not be updated (${(err as Error).message}): the next server start mounts it again`;
          this.logger.warn({ mount: name, err }, 'could not mark the kept mount inactive');
        });
      }
      // A kept delta keeps its hold: it is worthless without its restore point.
      if (delta === 'discard' || !this.holdOutlivesServer(m.record)) await releaseHold(m.holdFile);
      if (!this.deltaDir) return {};
      this.logger.info({ mount: name, delta }, 'unmounted');
      return warning !== undefined ? { warning } : {};
    });
  }

  /** Base + delta → a new restore point of the VM (only changed chunks are new). Writes are held meanwhile. */
  commit(name: string): Promise<{ point: string; newChunks: number; newBytesStored: number; chunks: number }> {
    return this.exclusive(async () => {
      const m = this.mounts.get(name);
      if (!m) throw new MountError(`no mount named "${name}"`, 404);
      const release = await m.gated.quiesce();
      try {
        await m.device.flush();
        const base = await openRestorePoint(this.repository, m.record.vm, m.record.point);
        try {
          const result = await writeRestorePoint(
            this.repository,
            commitSpecFor(m.device, base, { vm: m.record.vm, parent: m.record.point, source: `mount ${name} of ${m.record.vm}@${m.record.point}` }),
            { logger: this.logger.child({ mount: name, op: 'commit' }), command: 'commit' },
          );
          this.logger.info({ mount: name, point: result.info.id, newChunks: result.stats.newChunks }, 'committed');
          return {
            point: result.info.id,
            newChunks: result.stats.newChunks,
            newBytesStored: result.stats.newBytesStored,
            chunks: result.stats.chunks,
          };
        } finally {
          await base.close();
        }
      } finally {
        release();
      }
    });
  }

  list(): MountInfo[] {
    return [...this.mounts.values()].map((m) => this.describe(m));
  }

  prometheus(): string {
    const luns: LunMetricsSource[] = [...this.mounts.values()].map((m) => {
      const s = m.device.stats();
      return {
        labels: { mount: m.record.name, vm: m.record.vm, point: m.record.point, target: m.record.iqn, lun: String(m.record.lun) },
        metrics: s.metrics,
        ...(s.delta ? { deltaBytes: s.delta.deltaBytes, refusingWrites: s.delta.refusingWrites !== undefined } : {}),
      };
    });
    return renderPrometheus(luns, this.cache.stats());
  }

  /**
   * Forget every mount: the service has already flushed and closed their LUNs. Holds stay where a
   * delta keeps them (the mount resumes at the next start); those of read-only mounts go.
   */
  async closeAll(): Promise<void> {
    const holds = [...this.mounts.values()].filter((m) => !this.holdOutlivesServer(m.record)).map((m) => m.holdFile);
    this.mounts.clear();
    await Promise.all(holds.map((file) => releaseHold(file).catch(() => undefined)));
  }

  private describe(m: ActiveMount): MountInfo {
    const s = m.device.stats();
    const cacheStats = this.cache.stats().byMount[m.record.name] ?? { hits: 0, misses: 0, crossMountHits: 0 };
    return {
      ...m.record,
      serial: m.device.identity.serial,
      naa: m.device.identity.naa.toString('hex'),
      blocks: m.device.blockCount,
      deltaBytes: s.delta?.deltaBytes ?? 0,
      ...(s.delta?.refusingWrites !== undefined ? { refusingWrites: s.delta.refusingWrites } : {}),
      cache: cacheStats,
      reads: s.metrics.reads,
      writes: s.metrics.writes,
    };
  }

  private async readRecord(name: string): Promise<MountRecord | undefined> {
    if (!this.deltaDir || !MOUNT_NAME.test(name)) return undefined;
    try {
      return JSON.parse(await readFile(join(this.deltaDir, name, 'mount.json'), 'utf8')) as MountRecord;
    } catch {
      return undefined;
    }
  }

  private async writeRecord(record: MountRecord): Promise<void> {
    const dir = join(this.deltaDir!, record.name);
    await mkdir(dir, { recursive: true });
    await writeFileAtomic(join(dir, 'mount.json'), Buffer.from(JSON.stringify(record, null, 2) + '\n'));
  }
}

/** A valid mount name made from any text (a VM name, an IQN suffix): one rule for every default. */
export function mountNameFrom(text: string, fallback = 'mount'): string {
  return text.replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[^A-Za-z0-9]+/, '').slice(0, 64) || fallback;
}
