import type { Logger } from './log.js';
import type { BlockDevice } from './block-device.js';
import type { ServerConfig, TargetConfig, LunConfig } from './config/config.js';
import { deriveIdentity } from './identity.js';
import { FileBlockDevice } from './storage/file-device.js';
import { IscsiServer } from './iscsi/server.js';
import { ScsiTarget } from './iscsi/scsi/target.js';

/** Opens the block device behind a backup LUN (set by the mount layer; absent → backup LUNs refused). */
export type BackupLunOpener = (target: TargetConfig, lun: Extract<LunConfig, { kind: 'backup' }>) => Promise<BlockDevice>;

interface RunningTarget {
  readonly config: TargetConfig;
  readonly scsi: ScsiTarget;
  readonly devices: Map<number, BlockDevice>;
}

/**
 * One running bootrestore server: the iSCSI portals, the targets of the config and their LUNs.
 * `serve` creates one; tests may create one in-process.
 */
export class BootrestoreService {
  private readonly targets = new Map<string, RunningTarget>();
  private server: IscsiServer | undefined;
  portals: Array<{ host: string; port: number }> = [];

  constructor(
    readonly config: ServerConfig,
    private readonly logger: Logger,
    private readonly openBackupLun?: BackupLunOpener,
  ) {}

  async start(): Promise<void> {
    try {
      for (const target of this.config.targets) {
        const scsi = new ScsiTarget({ logger: this.logger.child({ target: target.iqn }) });
        const running: RunningTarget = { config: target, scsi, devices: new Map() };
        this.targets.set(target.iqn, running);
        for (const lun of target.luns) {
          const device = await this.openLun(target, lun);
          running.devices.set(lun.lun, device);
          scsi.addLun(lun.lun, device);
          this.logger.info(
            { target: target.iqn, lun: lun.lun, blocks: device.blockCount, readOnly: device.readOnly, serial: device.identity.serial },
            'LUN ready',
          );
        }
      }
      this.server = new IscsiServer({
        portals: this.config.listen.map((p) => (p.host.includes(':') ? `[${p.host}]:${p.port}` : `${p.host}:${p.port}`)),
        targets: [...this.targets.values()].map((t) => ({
          iqn: t.config.iqn,
          ...(t.config.alias ? { alias: t.config.alias } : {}),
          ...(t.config.initiators ? { allowedInitiators: t.config.initiators } : {}),
          ...(t.config.chap ? { chap: t.config.chap } : {}),
          port: t.scsi,
        })),
        logger: this.logger,
        nopInIntervalMs: this.config.nopInIntervalSeconds * 1000,
        nopInTimeoutMs: this.config.nopInTimeoutSeconds * 1000,
      });
      this.portals = await this.server.start();
    } catch (err) {
      await this.closeDevices();
      throw err;
    }
  }

  private async openLun(target: TargetConfig, lun: LunConfig): Promise<BlockDevice> {
    if (lun.kind === 'file') {
      return FileBlockDevice.open({
        path: lun.file,
        readOnly: lun.readOnly,
        identity: deriveIdentity(lun.serial ?? `file\0${target.iqn}\0${lun.lun}\0${lun.file}`),
      });
    }
    if (!this.openBackupLun) throw new Error(`target ${target.iqn} LUN ${lun.lun}: backup LUNs need a repository`);
    return this.openBackupLun(target, lun);
  }

  /** Stop accepting, let in-flight commands finish, close sockets, then flush and close every LUN. */
  async stop(): Promise<void> {
    if (this.server) await this.server.stop();
    this.server = undefined;
    await this.closeDevices();
  }

  private async closeDevices(): Promise<void> {
    for (const t of this.targets.values()) {
      for (const [lun, device] of t.devices) {
        try {
          if (!device.readOnly) await device.flush();
          await device.close();
        } catch (err) {
          this.logger.error({ target: t.config.iqn, lun, err }, 'closing LUN failed');
        }
      }
      t.devices.clear();
    }
  }
}
