/**
 * Faults in new memory on a worker thread: it writes one byte of every 4 KiB page of each
 * SharedArrayBuffer it is given, so the kernel maps (and zeroes) the pages there and then, and not
 * when a chunk load first writes them. Used by `ChunkCache.preallocate` to reserve the cache's memory
 * while the server is idle. The buffers must be new (all zeroes, not yet handed out): the worker
 * writes zeroes.
 */
import { Worker } from 'node:worker_threads';

const PAGE = 4096;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
parentPort.on('message', (batch) => {
  for (const sab of batch.buffers) {
    const view = new Uint8Array(sab);
    for (let offset = 0; offset < view.length; offset += ${PAGE}) view[offset] = 0;
  }
  parentPort.postMessage(batch.id);
});
`;

export class PageToucher {
  private readonly worker: Worker;
  private nextId = 0;
  private readonly waiting = new Map<number, { resolve: () => void; reject: (err: Error) => void }>();
  private failure: Error | undefined;

  constructor() {
    this.worker = new Worker(WORKER_SOURCE, { eval: true });
    // Never keeps the process alive: a server that stops mid-way just drops the rest.
    this.worker.unref();
    this.worker.on('message', (id: number) => {
      const waiter = this.waiting.get(id);
      this.waiting.delete(id);
      waiter?.resolve();
    });
    const fail = (err: Error): void => {
      this.failure ??= err;
      for (const waiter of this.waiting.values()) waiter.reject(err);
      this.waiting.clear();
    };
    this.worker.on('error', fail);
    this.worker.on('exit', (code) => fail(new Error(`page-touch worker exited (code ${code})`)));
  }

  /** Resolves once every page of `buffers` has been written on the worker thread. */
  touch(buffers: readonly SharedArrayBuffer[]): Promise<void> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const id = this.nextId++;
    return new Promise<void>((resolve, reject) => {
      this.waiting.set(id, { resolve, reject });
      this.worker.postMessage({ id, buffers });
    });
  }

  async close(): Promise<void> {
    await this.worker.terminate();
  }
}
