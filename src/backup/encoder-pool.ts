/**
 * Chunk encoding (compressibility probe, deflate or brotli, CRC32) on worker threads.
 *
 * Measured here (1 GiB bench image, 2 vCPUs): node:zlib's async API runs each chunk on the libuv
 * pool with a fresh compressor, whose ~0.3–4 MiB of state the pool threads' malloc arenas hand back
 * to the kernel after every chunk (page faults ~7 µs apiece on this guest): brotli quality 1 took
 * 3.1 s of the pool for the image's compressible chunks, the same work on two worker threads with
 * the synchronous API 1.3 s. A worker also takes several chunks per message, where the pool costs
 * a round trip (futex wake-ups, expensive on this paravirtual guest) per chunk.
 *
 * The pool is shared by the whole process and started on first use; its idle workers do not keep
 * the process alive (`unref`). Workers run plain JavaScript given as source text (`eval`), so the
 * same code serves the bundled CLI, the tests and the benches.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import type { ChunkCodec } from './format.js';

/** Compression is kept only if it saves at least this fraction of the chunk. */
export const MIN_SAVING = 0.1;

/** Result of encoding one chunk: the payload to store and the CRC32 of that payload. */
export interface EncodedPayload {
  /** The compressed payload, or null: store the content as it is. */
  readonly compressed: Buffer | null;
  readonly codec: ChunkCodec | null;
  readonly crc: number;
}

export interface EncodeRequest {
  readonly compress: boolean;
  readonly codec: ChunkCodec;
  readonly level: number;
}

/**
 * The worker: probe, compress, CRC32. Deflating incompressible data (encrypted, already compressed)
 * costs ~5x more CPU than hashing it and saves nothing, so two 4 KiB samples (start and middle) are
 * deflated first with a 4 KiB window; if neither saves MIN_SAVING the chunk is stored as it is.
 * Chunks under 64 KiB are always tried.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const zlib = require('node:zlib');
const C = zlib.constants;
const MIN_SAVING = workerData.minSaving;
const SAMPLE = 4096;
const PROBE = { level: 1, windowBits: 12, memLevel: 6 };
function looksCompressible(data) {
  if (data.length < 16 * SAMPLE) return true;
  const mid = Math.floor(data.length / 2 / SAMPLE) * SAMPLE;
  for (const at of [0, mid]) {
    if (zlib.deflateRawSync(data.subarray(at, at + SAMPLE), PROBE).length <= SAMPLE * (1 - MIN_SAVING)) return true;
  }
  return false;
}
function compress(data, codec, level) {
  if (codec === 'brotli') {
    // A window just larger than the chunk: references never reach further back anyway, and the
    // reader's decoder then needs a ring buffer of the chunk's size, not the default 4 MiB.
    const lgwin = Math.min(24, Math.max(10, Math.ceil(Math.log2(data.length + 16))));
    return zlib.brotliCompressSync(data, {
      params: { [C.BROTLI_PARAM_QUALITY]: level, [C.BROTLI_PARAM_SIZE_HINT]: data.length, [C.BROTLI_PARAM_LGWIN]: lgwin },
    });
  }
  return zlib.deflateRawSync(data, { level });
}
parentPort.on('message', ({ batch, jobs }) => {
  const results = [];
  const transfer = [];
  for (const job of jobs) {
    const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
    let compressed = null;
    try {
      if (job.compress && data.length > 0 && looksCompressible(data)) {
        const out = compress(data, job.codec, job.level);
        if (out.length <= data.length * (1 - MIN_SAVING)) {
          // An exact-size copy: transferring a view would move (or copy) its whole pool buffer.
          compressed = new Uint8Array(out.length);
          compressed.set(out);
          transfer.push(compressed.buffer);
        }
      }
      results.push({ compressed, crc: zlib.crc32(compressed ?? data) });
    } catch (err) {
      results.push({ error: String(err && err.message ? err.message : err) });
    }
  }
  parentPort.postMessage({ batch, results }, transfer);
});
`;

interface Job {
  readonly data: Uint8Array;
  readonly request: EncodeRequest;
  readonly resolve: (r: EncodedPayload) => void;
  readonly reject: (e: Error) => void;
}

type WorkerResult = { compressed: Uint8Array | null; crc: number } | { error: string };

interface PoolWorker {
  readonly worker: Worker;
  /** Jobs of the batch the worker is working on (null: idle). */
  running: Job[] | null;
}

/** Jobs sent to a worker in one message at most. */
const MAX_BATCH = 16;

export class ChunkEncoderPool {
  private readonly workers: PoolWorker[] = [];
  private readonly queue: Job[] = [];
  private batches = 0;
  private dispatchScheduled = false;

  constructor(private readonly threads = defaultEncoderThreads()) {}

  /** Encode one chunk; `data` is copied (the caller keeps its buffer). */
  encode(data: Buffer, request: EncodeRequest): Promise<EncodedPayload> {
    return new Promise((resolve, reject) => {
      // A copy the worker can own (its own memory, not zero-filled first): transferring it costs
      // nothing, while structured cloning a view of a larger buffer would copy all of that buffer.
      const copy = Buffer.allocUnsafeSlow(data.length);
      data.copy(copy);
      this.queue.push({ data: copy, request, resolve, reject });
      // Jobs queued in the same turn of the event loop (the chunks of one source read) go to the
      // workers together: each message costs a cross-thread wake-up, expensive on this guest.
      if (!this.dispatchScheduled) {
        this.dispatchScheduled = true;
        setImmediate(() => {
          this.dispatchScheduled = false;
          this.dispatch();
        });
      }
    });
  }

  /** Stop the workers (pending jobs fail). */
  async close(): Promise<void> {
    const workers = this.workers.splice(0);
    await Promise.all(workers.map((w) => w.worker.terminate()));
  }

  private dispatch(): void {
    while (this.queue.length > 0) {
      let idle = this.workers.find((w) => w.running === null);
      if (idle === undefined && this.workers.length < this.threads) idle = this.startWorker();
      if (idle === undefined) return;
      // Spread the queue over the idle workers rather than giving one worker everything.
      const idleCount = this.workers.filter((w) => w.running === null).length + (this.threads - this.workers.length);
      const take = Math.min(MAX_BATCH, Math.max(1, Math.ceil(this.queue.length / idleCount)));
      const jobs = this.queue.splice(0, take);
      idle.running = jobs;
      idle.worker.ref();
      idle.worker.postMessage(
        {
          batch: this.batches++,
          jobs: jobs.map((j) => ({ data: j.data, compress: j.request.compress, codec: j.request.codec, level: j.request.level })),
        },
        jobs.map((j) => j.data.buffer as ArrayBuffer),
      );
    }
  }

  private startWorker(): PoolWorker {
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { minSaving: MIN_SAVING } });
    const entry: PoolWorker = { worker, running: null };
    worker.on('message', (message: { results: WorkerResult[] }) => {
      const jobs = entry.running ?? [];
      entry.running = null;
      worker.unref();
      jobs.forEach((job, k) => {
        const result = message.results[k];
        if (result === undefined || 'error' in result) {
          job.reject(new Error(`chunk encoder: ${result === undefined ? 'no result' : result.error}`));
          return;
        }
        const compressed = result.compressed === null ? null : Buffer.from(result.compressed.buffer, result.compressed.byteOffset, result.compressed.byteLength);
        job.resolve({ compressed, codec: compressed === null ? null : job.request.codec, crc: result.crc });
      });
      this.dispatch();
    });
    const fail = (err: Error): void => {
      const index = this.workers.indexOf(entry);
      if (index >= 0) this.workers.splice(index, 1);
      for (const job of entry.running ?? []) job.reject(new Error(`chunk encoder worker failed: ${err.message}`));
      entry.running = null;
      this.dispatch();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => {
      if (entry.running !== null) fail(new Error(`exited with code ${code}`));
    });
    worker.unref();
    this.workers.push(entry);
    return entry;
  }
}

/** One worker per CPU, at most 4: the main thread hashes, reads and writes beside them. */
export function defaultEncoderThreads(): number {
  return Math.max(1, Math.min(4, availableParallelism()));
}

let shared: ChunkEncoderPool | null = null;

/** The process's shared encoder pool. */
export function chunkEncoderPool(): ChunkEncoderPool {
  shared ??= new ChunkEncoderPool();
  return shared;
}
