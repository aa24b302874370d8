/**
 * The iSCSI target server: portals (TCP listeners), the registry of targets (IQN → SCSI port),
 * sessions by TSIH and by (initiator, ISID, target) for session reinstatement (RFC 7143 §6.3.5).
 * All portals form one target portal group (TPGT 1).
 */
import net from 'node:net';
import type { Logger } from '../log.js';
import type { ScsiTargetPort } from './scsi-port.js';
import { DEFAULT_TARGET_POLICY, type TargetKeyPolicy } from './login/keys.js';
import { LoginStatus, type LoginResult, type LoginStatusCode } from './login/login.js';
import type { TextPair } from './login/text.js';
import type { TargetChapConfig } from './login/chap.js';
import { Connection, type ConnectionHost } from './session/connection.js';
import { Session } from './session/session.js';

export interface TargetDefinition {
  iqn: string;
  alias?: string;
  /** Initiator names allowed to log in; undefined admits everyone. */
  allowedInitiators?: readonly string[];
  /** Require CHAP (optionally mutual) for normal sessions to this target. */
  chap?: TargetChapConfig;
  port: ScsiTargetPort;
}

export interface IscsiServerOptions {
  /** "host:port" (IPv6 as "[::1]:3260"); port 0 picks an ephemeral port. */
  portals: readonly string[];
  targets: readonly TargetDefinition[];
  logger: Logger;
  /** Idle time before the target pings with a NOP-In (0 disables). Default 10 s. */
  nopInIntervalMs?: number;
  /** Drop a connection whose ping is unanswered this long (0: never). Default 30 s. */
  nopInTimeoutMs?: number;
  /** Key negotiation policy (digests offered, burst sizes). */
  keyPolicy?: TargetKeyPolicy;
  /** How long stop() waits for running commands. Default 5 s. */
  stopTimeoutMs?: number;
}

export interface SessionStatus {
  readonly tsih: number;
  readonly type: 'Normal' | 'Discovery';
  readonly initiatorName: string;
  readonly initiatorAlias: string | undefined;
  readonly isid: string;
  readonly target: string | undefined;
  readonly createdAt: Date;
  readonly connections: ReadonlyArray<{ readonly cid: number; readonly remote: string; readonly outstandingTasks: number }>;
}

const TARGET_PORTAL_GROUP_TAG = 1;

interface Portal {
  readonly host: string;
  port: number;
  readonly server: net.Server;
}

function parsePortal(spec: string): { host: string; port: number } {
  const m = /^\[([^\]]+)\]:(\d+)$/.exec(spec) ?? /^([^:]+):(\d+)$/.exec(spec);
  if (!m) throw new Error(`invalid portal "${spec}": expected host:port or [v6]:port`);
  const port = Number(m[2]);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`invalid port in portal "${spec}"`);
  return { host: m[1]!, port };
}

function formatAddress(host: string, port: number): string {
  return host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
}

export class IscsiServer {
  private readonly logger: Logger;
  private readonly targets = new Map<string, TargetDefinition>();
  private readonly portals: Portal[] = [];
  private readonly connections = new Set<Connection>();
  private readonly sessionsByTsih = new Map<number, Session>();
  private readonly connectionBySession = new Map<Session, Connection>();
  private nextTsih = 1;
  private started = false;
  private stopping = false;
  private readonly host: ConnectionHost;
  private readonly stopTimeoutMs: number;

  constructor(opts: IscsiServerOptions) {
    this.logger = opts.logger;
    this.stopTimeoutMs = opts.stopTimeoutMs ?? 5000;
    for (const t of opts.targets) this.addTarget(t);
    for (const spec of opts.portals) {
      const { host, port } = parsePortal(spec);
      const server = net.createServer((socket) => this.accept(socket));
      this.portals.push({ host, port, server });
    }
    this.host = {
      policy: opts.keyPolicy ?? DEFAULT_TARGET_POLICY,
      targetPortalGroupTag: TARGET_PORTAL_GROUP_TAG,
      nopInIntervalMs: opts.nopInIntervalMs ?? 10_000,
      nopInTimeoutMs: opts.nopInTimeoutMs ?? 30_000,
      findTarget: (iqn) => this.targets.get(iqn),
      attachSession: (result, conn, firstCmdSN) => this.attachSession(result, conn, firstCmdSN),
      connectionClosed: (conn) => this.connectionClosed(conn),
      sendTargets: (session, value, localAddress) => this.sendTargets(session, value, localAddress),
      abortOtherTasks: (iqn, lun, except) => {
        const executing: Array<Promise<void>> = [];
        for (const [session, conn] of this.connectionBySession) {
          if (conn !== except && session.target?.iqn === iqn) executing.push(...conn.abortTasksFor(lun));
        }
        return executing;
      },
    };
  }

  /** Listen on every portal. Resolves with the bound addresses (ephemeral ports resolved). */
  async start(): Promise<Array<{ host: string; port: number }>> {
    if (this.started) throw new Error('IscsiServer already started');
    this.started = true;
    const bound: Array<{ host: string; port: number }> = [];
    for (const portal of this.portals) {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error): void => reject(err);
        portal.server.once('error', onError);
        portal.server.listen(portal.port, portal.host, () => {
          portal.server.off('error', onError);
          resolve();
        });
      });
      portal.server.on('error', (err) => this.logger.error({ err }, 'portal error'));
      const addr = portal.server.address();
      if (addr && typeof addr === 'object') portal.port = addr.port;
      bound.push({ host: portal.host, port: portal.port });
      this.logger.info({ portal: formatAddress(portal.host, portal.port) }, 'listening');
    }
    return bound;
  }

  addTarget(def: TargetDefinition): void {
    if (!/^(iqn\.|eui\.|naa\.)\S+$/.test(def.iqn)) throw new Error(`invalid iSCSI name "${def.iqn}"`);
    if (this.targets.has(def.iqn)) throw new Error(`target ${def.iqn} already exists`);
    this.targets.set(def.iqn, def);
    this.logger.info({ target: def.iqn }, 'target added');
  }

  /** Remove a target and close its sessions. */
  async removeTarget(iqn: string): Promise<void> {
    if (!this.targets.delete(iqn)) return;
    const closing: Promise<void>[] = [];
    for (const [session, conn] of this.connectionBySession) {
      if (session.target?.iqn === iqn) closing.push(conn.shutdown(this.stopTimeoutMs));
    }
    await Promise.all(closing);
    this.logger.info({ target: iqn }, 'target removed');
  }

  /** Stop accepting, let running commands finish (bounded), then close every connection. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    const closingServers = this.portals.map(
      (p) => new Promise<void>((resolve) => (p.server.listening ? p.server.close(() => resolve()) : resolve())),
    );
    await Promise.all([...this.connections].map((c) => c.shutdown(this.stopTimeoutMs)));
    await Promise.all(closingServers);
    this.logger.info('stopped');
  }

  get sessions(): readonly SessionStatus[] {
    const list: SessionStatus[] = [];
    for (const session of this.sessionsByTsih.values()) {
      const conn = this.connectionBySession.get(session);
      list.push({
        tsih: session.tsih,
        type: session.type,
        initiatorName: session.initiatorName,
        initiatorAlias: session.initiatorAlias,
        isid: session.isid,
        target: session.target?.iqn,
        createdAt: session.createdAt,
        connections: conn ? [{ cid: conn.cid, remote: conn.remoteAddress, outstandingTasks: conn.outstandingTasks }] : [],
      });
    }
    return list;
  }

  // ----------------------------------------------------------------

  private accept(socket: net.Socket): void {
    if (this.stopping) {
      socket.destroy();
      return;
    }
    const conn = new Connection(socket, this.host, this.logger);
    this.connections.add(conn);
    conn.logger.debug('connection accepted');
  }

  private attachSession(result: LoginResult, conn: Connection, firstCmdSN: number): Session | LoginStatusCode {
    if (this.stopping) return LoginStatus.ServiceUnavailable;
    const target = result.target ? this.targets.get(result.target.iqn) : undefined;
    if (result.sessionType === 'Normal' && !target) return LoginStatus.TargetRemoved;
    if (result.requestedTsih !== 0) {
      // Adding a connection / reinstating one (§6.3.4): MaxConnections=1 and ERL 0 do not allow it.
      const existing = this.sessionsByTsih.get(result.requestedTsih);
      if (!existing || existing.initiatorName !== result.initiatorName || existing.isid !== result.isid) {
        return LoginStatus.SessionDoesNotExist;
      }
      return LoginStatus.TooManyConnections;
    }
    // Session reinstatement (§6.3.5): same initiator, ISID and target → the old session ends.
    for (const [old, oldConn] of this.connectionBySession) {
      if (
        old.initiatorName === result.initiatorName &&
        old.isid === result.isid &&
        old.type === result.sessionType &&
        old.target?.iqn === result.target?.iqn
      ) {
        oldConn.logger.info('session reinstated by a new login; closing the old one');
        this.endSession(old);
        oldConn.destroy();
      }
    }
    const tsih = this.allocateTsih();
    const logger = conn.logger.child({ initiator: result.initiatorName, tsih });
    conn.logger = logger;
    const session = new Session(
      tsih,
      result.sessionType,
      result.initiatorName,
      result.initiatorAlias,
      result.isid,
      target ? { iqn: target.iqn, port: target.port } : undefined,
      result.params,
      TARGET_PORTAL_GROUP_TAG,
      firstCmdSN,
      logger,
    );
    this.sessionsByTsih.set(tsih, session);
    this.connectionBySession.set(session, conn);
    if (target) target.port.nexusAdded(session.nexus);
    return session;
  }

  private allocateTsih(): number {
    for (;;) {
      const tsih = this.nextTsih;
      this.nextTsih = this.nextTsih >= 0xffff ? 1 : this.nextTsih + 1; // TSIH 0 is reserved (§11.12.6)
      if (!this.sessionsByTsih.has(tsih)) return tsih;
    }
  }

  private endSession(session: Session): void {
    if (session.closed) return;
    session.closed = true;
    session.window.clear();
    this.sessionsByTsih.delete(session.tsih);
    this.connectionBySession.delete(session);
    const target = session.target && this.targets.get(session.target.iqn);
    try {
      if (target) target.port.nexusLost(session.nexus);
      else session.target?.port.nexusLost(session.nexus);
    } catch (err) {
      this.logger.error({ err }, 'nexusLost failed');
    }
    session.logger.info('session closed');
  }

  private connectionClosed(conn: Connection): void {
    this.connections.delete(conn);
    // MaxConnections=1 at ERL 0: the session ends with its connection.
    if (conn.session && this.connectionBySession.get(conn.session) === conn) this.endSession(conn.session);
  }

  /** §13.3 / appendix C: TargetName then one TargetAddress per portal ("addr:port,tpgt"). */
  private sendTargets(session: Session, value: string, localAddress: string): TextPair[] {
    let names: string[];
    if (value === 'All') {
      if (session.type === 'Discovery') {
        names = [...this.targets.values()]
          .filter((t) => !t.allowedInitiators || t.allowedInitiators.includes(session.initiatorName))
          .map((t) => t.iqn);
      } else names = session.target ? [session.target.iqn] : [];
    } else if (value === '') {
      names = session.target ? [session.target.iqn] : [];
    } else {
      const t = this.targets.get(value);
      names = t && (!t.allowedInitiators || t.allowedInitiators.includes(session.initiatorName)) ? [t.iqn] : [];
    }
    const pairs: TextPair[] = [];
    for (const iqn of names) {
      pairs.push({ key: 'TargetName', value: iqn });
      for (const portal of this.portals) {
        const wildcard = portal.host === '0.0.0.0' || portal.host === '::';
        let host = wildcard ? localAddress : portal.host;
        if (host.startsWith('::ffff:')) host = host.slice(7);
        pairs.push({ key: 'TargetAddress', value: `${formatAddress(host, portal.port)},${TARGET_PORTAL_GROUP_TAG}` });
      }
    }
    return pairs;
  }
}
