import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from './log.js';
import type { BlockDevice } from './block-device.js';
import type { ServerConfig, TargetConfig, FileLunConfig } from './config/config.js';
import { deriveIdentity } from './identity.js';
import { FileBlockDevice } from './storage/file-device.js';
import { IscsiServer } from './iscsi/server.js';
import { ScsiTarget } from './iscsi/scsi/target.js';
import { MountManager, mountNameFrom, type LunHost } from './mounts/manager.js';
import { ControlServer } from './control/server.js';
import { writeFileAtomic } from './backup/repository.js';

interface RunningTarget {
  readonly iqn: string;
  readonly alias?: string;
  readonly initiators?: readonly string[];
  readonly chap?: TargetConfig['chap'];
  readonly scsi: ScsiTarget;
  readonly devices: Map<number, BlockDevice>;
  /** Created for a mount (removed when its last LUN goes), not declared in the config. */
  readonly dynamic: boolean;
}

/** Where a running server announces itself: `<deltaDir>/server.json`. */
export interface ServerStateFile {
  readonly pid: number;
  readonly control: string;
  readonly portals: ReadonlyArray<{ host: string; port: number }>;
  readonly config: string;
}

export const STATE_FILE = 'server.json';

/**
 * One running bootrestore server: the iSCSI portals, the config's targets and LUNs (raw files and
 * mounted restore points), runtime mounts, and the local control API.
 */
export class BootrestoreService implements LunHost {
  private readonly targets = new Map<string, RunningTarget>();
  private server: IscsiServer | undefined;
  private control: ControlServer | undefined;
  readonly mounts: MountManager | undefined;
  portals: Array<{ host: string; port: number }> = [];
  controlUrl: string | undefined;

  constructor(
    readonly config: ServerConfig,
    private readonly logger: Logger,
  ) {
    if (config.repository) {
      this.mounts = new MountManager(config.repository, config.deltaDir, config.cache, this, logger.child({ component: 'mounts' }));
    }
  }

  async start(): Promise<void> {
    try {
      for (const target of this.config.targets) {
        const running = this.createTarget(target.iqn, false, target.alias, target.initiators, target.chap);
        for (const lun of target.luns) {
          if (lun.kind === 'file') {
            const device = await openFileLun(target, lun);
            running.devices.set(lun.lun, device);
            running.scsi.addLun(lun.lun, device);
            this.logLun(target.iqn, lun.lun, device);
          } else {
            await this.mounts!.mount(
              { vm: lun.vm, point: lun.point, name: lun.mount ?? configMountName(target.iqn, lun.lun), iqn: target.iqn, lun: lun.lun, readOnly: lun.readOnly },
              true,
            );
          }
        }
      }
      this.server = new IscsiServer({
        portals: this.config.listen.map((p) => (p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`)),
        targets: [...this.targets.values()].map((t) => targetDefinition(t)),
        logger: this.logger,
        nopInIntervalMs: this.config.nopInIntervalSeconds * 1000,
        nopInTimeoutMs: this.config.nopInTimeoutSeconds * 1000,
      });
      this.portals = await this.server.start();
      await this.mounts?.resumePersisted();
      if (this.config.cache.preallocate) this.mounts?.startCachePreallocation();
      const controlPortal = this.config.control ?? { host: '127.0.0.1', port: 0 };
      this.control = new ControlServer(this.mounts, () => this.status(), this.logger.child({ component: 'control' }));
      const bound = await this.control.start(controlPortal.host, controlPortal.port);
      this.controlUrl = `http://${bound.host.includes(':') ? `[${bound.host}]` : bound.host}:${bound.port}`;
      if (this.config.deltaDir) {
        const state: ServerStateFile = { pid: process.pid, control: this.controlUrl, portals: this.portals, config: this.config.source };
        await writeFileAtomic(join(this.config.deltaDir, STATE_FILE), Buffer.from(JSON.stringify(state, null, 2) + '\n'));
      }
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  status(): { pid: number; portals: Array<{ host: string; port: number }>; targets: Array<{ iqn: string; luns: number[] }> } {
    return {
      pid: process.pid,
      portals: this.portals,
      targets: [...this.targets.values()].map((t) => ({ iqn: t.iqn, luns: t.scsi.lunNumbers() })),
    };
  }

  /** LunHost: present a mounted device as `iqn`/`lun` (creating the target when it is new). */
  async attach(iqn: string, lun: number, device: BlockDevice, initiators?: readonly string[]): Promise<void> {
    let target = this.targets.get(iqn);
    if (!target) {
      target = this.createTarget(iqn, true, undefined, initiators);
      try {
        this.server?.addTarget(targetDefinition(target));
      } catch (err) {
        this.targets.delete(iqn);
        throw err;
      }
    }
    if (target.devices.has(lun)) throw new Error(`target ${iqn} already has LUN ${lun}`);
    target.devices.set(lun, device);
    target.scsi.addLun(lun, device);
    this.logLun(iqn, lun, device);
  }

  /** LunHost: flush and remove a LUN (closing its device); a mount's own target goes with its last LUN. */
  async detach(iqn: string, lun: number): Promise<void> {
    const target = this.targets.get(iqn);
    const device = target?.devices.get(lun);
    if (!target || !device) return;
    if (target.dynamic && target.devices.size === 1) {
      this.targets.delete(iqn);
      await this.server?.removeTarget(iqn);
    }
    target.devices.delete(lun);
    await this.flushAndRemove(target, lun, device);
  }

  /**
   * Flush, then remove (and close) a LUN. A failed flush (a full or failing disk) does not keep the
   * LUN open: closing loses nothing that is not lost anyway (a mount's delta keeps its journal, which
   * the next open recovers), and the caller's unmount or stop must go through. Both are logged.
   */
  private async flushAndRemove(target: RunningTarget, lun: number, device: BlockDevice): Promise<void> {
    if (!device.readOnly) {
      await device.flush().catch((err: unknown) => {
        this.logger.error({ target: target.iqn, lun, err }, 'flush before closing the LUN failed');
      });
    }
    await target.scsi.removeLun(lun).catch((err: unknown) => {
      this.logger.error({ target: target.iqn, lun, err }, 'closing LUN failed');
    });
  }

  /** Stop accepting, let in-flight commands finish, close sockets, then flush and close every LUN. */
  async stop(): Promise<void> {
    await this.control?.stop();
    this.control = undefined;
    if (this.server) await this.server.stop();
    this.server = undefined;
    for (const t of this.targets.values()) {
      for (const [lun, device] of t.devices) await this.flushAndRemove(t, lun, device);
      t.devices.clear();
    }
    await this.mounts?.closeAll();
    if (this.config.deltaDir && this.controlUrl) await rm(join(this.config.deltaDir, STATE_FILE), { force: true });
  }

  private createTarget(iqn: string, dynamic: boolean, alias?: string, initiators?: readonly string[], chap?: TargetConfig['chap']): RunningTarget {
    const running: RunningTarget = {
      iqn,
      scsi: new ScsiTarget({ logger: this.logger.child({ target: iqn }) }),
      devices: new Map(),
      dynamic,
      ...(alias ? { alias } : {}),
      ...(initiators ? { initiators } : {}),
      ...(chap ? { chap } : {}),
    };
    this.targets.set(iqn, running);
    return running;
  }

  private logLun(iqn: string, lun: number, device: BlockDevice): void {
    this.logger.info(
      { target: iqn, lun, blocks: device.blockCount, readOnly: device.readOnly, serial: device.identity.serial },
      'LUN ready',
    );
  }
}

function targetDefinition(t: RunningTarget): import('./iscsi/server.js').TargetDefinition {
  return {
    iqn: t.iqn,
    port: t.scsi,
    ...(t.alias ? { alias: t.alias } : {}),
    ...(t.initiators ? { allowedInitiators: t.initiators } : {}),
    ...(t.chap
      ? { chap: { initiator: { username: t.chap.username, secret: t.chap.secret }, ...(t.chap.mutual ? { target: t.chap.mutual } : {}) } }
      : {}),
  };
}

function openFileLun(target: TargetConfig, lun: FileLunConfig): Promise<FileBlockDevice> {
  return FileBlockDevice.open({
    path: lun.file,
    readOnly: lun.readOnly,
    identity: deriveIdentity(lun.serial ?? `file\0${target.iqn}\0${lun.lun}\0${lun.file}`),
  });
}

/** Default mount name of a backup LUN declared in the config. */
export function configMountName(iqn: string, lun: number): string {
  return mountNameFrom(`${iqn.slice(iqn.lastIndexOf(':') + 1) || 'target'}-lun${lun}`);
}
