import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from '../log.js';
import { MountError, type MountManager, type MountRequest } from '../mounts/manager.js';

/**
 * The local control API: HTTP/1.1 with JSON bodies, on loopback only (see README "Control API").
 *   GET    /v1/status                     server pid, portals, targets
 *   GET    /v1/mounts                     mounts with delta size and cache statistics
 *   GET    /v1/mounts/cache               the shared chunk cache's statistics, and how loads are checked (`verify`)
 *   POST   /v1/mounts                     { vm, point?, name?, iqn?, lun?, readOnly?, initiators? } → 201 mount
 *   DELETE /v1/mounts/NAME?delta=keep|discard
 *   POST   /v1/mounts/NAME/commit         → { point, newChunks, ... }
 *   GET    /metrics                       Prometheus text format
 */
export interface ControlStatus {
  readonly pid: number;
  readonly portals: ReadonlyArray<{ host: string; port: number }>;
  readonly targets: ReadonlyArray<{ iqn: string; luns: number[] }>;
}

export class ControlServer {
  private server: http.Server | undefined;

  constructor(
    private readonly mounts: MountManager | undefined,
    private readonly status: () => ControlStatus,
    private readonly logger: Logger,
  ) {}

  async start(host: string, port: number): Promise<{ host: string; port: number }> {
    const server = http.createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        const status = err instanceof MountError ? err.status : 500;
        if (status === 500) this.logger.error({ err }, 'control request failed');
        send(res, status, { error: err instanceof Error ? err.message : String(err) });
      });
    });
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => resolve());
    });
    const addr = server.address() as AddressInfo;
    this.logger.info({ control: `http://${host}:${addr.port}` }, 'control API listening');
    return { host, port: addr.port };
  }

  async stop(): Promise<void> {
    const s = this.server;
    this.server = undefined;
    if (!s) return;
    s.closeAllConnections();
    await new Promise<void>((resolve) => s.close(() => resolve()));
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const parts = url.pathname.split('/').filter((p) => p !== '').map(decodeURIComponent);
    const method = req.method ?? 'GET';
    if (method === 'GET' && url.pathname === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
      res.end((this.mounts ? this.mounts.prometheus() : '') + processMetrics());
      return;
    }
    if (method === 'GET' && url.pathname === '/v1/status') return send(res, 200, this.status());
    if (parts[0] !== 'v1' || parts[1] !== 'mounts') return send(res, 404, { error: `no such endpoint ${method} ${url.pathname}` });
    const mounts = this.mounts;
    if (!mounts) throw new MountError('this server has no "repository" configured: mounts are not available', 400);
    if (parts.length === 2 && method === 'GET') return send(res, 200, mounts.list());
    if (parts.length === 3 && parts[2] === 'cache' && method === 'GET') return send(res, 200, { ...mounts.cache.stats(), verify: mounts.verification });
    if (parts.length === 2 && method === 'POST') {
      const body = await readJson(req);
      return send(res, 201, await mounts.mount(checkMountRequest(body)));
    }
    if (parts.length === 3 && method === 'DELETE') {
      const delta = url.searchParams.get('delta') ?? 'keep';
      if (delta !== 'keep' && delta !== 'discard') throw new MountError('delta must be "keep" or "discard"', 400);
      const { warning } = await mounts.unmount(parts[2]!, delta);
      return send(res, 200, { unmounted: parts[2], delta, ...(warning !== undefined ? { warning } : {}) });
    }
    if (parts.length === 4 && parts[3] === 'commit' && method === 'POST') return send(res, 200, await mounts.commit(parts[2]!));
    send(res, 404, { error: `no such endpoint ${method} ${url.pathname}` });
  }
}

function send(res: http.ServerResponse, status: number, body: unknown): void {
  if (res.headersSent) return;
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body, null, 2) + '\n');
}

async function readJson(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > 1 << 20) throw new MountError('request body too large', 413);
    chunks.push(c as Buffer);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new MountError('request body is not valid JSON', 400);
  }
}

function checkMountRequest(body: unknown): MountRequest {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) throw new MountError('body must be a JSON object', 400);
  const b = body as Record<string, unknown>;
  const allowed = ['vm', 'point', 'name', 'iqn', 'lun', 'readOnly', 'initiators'];
  for (const k of Object.keys(b)) if (!allowed.includes(k)) throw new MountError(`unknown key "${k}" (allowed: ${allowed.join(', ')})`, 400);
  const str = (k: string): string | undefined => {
    const v = b[k];
    if (v === undefined) return undefined;
    if (typeof v !== 'string' || v === '') throw new MountError(`"${k}" must be a non-empty string`, 400);
    return v;
  };
  const vm = str('vm');
  if (!vm) throw new MountError('"vm" is required', 400);
  const lun = b.lun;
  if (lun !== undefined && (typeof lun !== 'number' || !Number.isInteger(lun) || lun < 0 || lun > 16383)) {
    throw new MountError('"lun" must be an integer 0–16383', 400);
  }
  if (b.readOnly !== undefined && typeof b.readOnly !== 'boolean') throw new MountError('"readOnly" must be true or false', 400);
  const initiators = b.initiators;
  if (initiators !== undefined && (!Array.isArray(initiators) || !initiators.every((i) => typeof i === 'string'))) {
    throw new MountError('"initiators" must be an array of initiator names', 400);
  }
  const point = str('point');
  const name = str('name');
  const iqn = str('iqn');
  return {
    vm,
    ...(point ? { point } : {}),
    ...(name ? { name } : {}),
    ...(iqn ? { iqn } : {}),
    ...(lun !== undefined ? { lun: lun as number } : {}),
    ...(b.readOnly !== undefined ? { readOnly: b.readOnly as boolean } : {}),
    ...(initiators ? { initiators: initiators as string[] } : {}),
  };
}

/** Process memory in Prometheus text format (the RSS bound of a mount is cache size + overhead). */
function processMetrics(): string {
  const m = process.memoryUsage();
  const lines: string[] = [];
  const gauge = (name: string, help: string, value: number): void => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} gauge`, `${name} ${value}`);
  };
  gauge('process_resident_memory_bytes', 'Resident set size.', m.rss);
  gauge('nodejs_heap_used_bytes', 'V8 heap in use.', m.heapUsed);
  gauge('nodejs_external_memory_bytes', 'Memory of Buffers and other objects outside the V8 heap.', m.external);
  gauge('nodejs_array_buffers_bytes', 'Memory of ArrayBuffers (Buffers included).', m.arrayBuffers);
  return lines.join('\n') + '\n';
}
