/**
 * Chunk encoding (compressibility probe, deflate or brotli, CRC32) and decoding (read from a chunk
 * file or a pack, header checks, CRC32 and/or SHA-256, decompression) on worker threads.
 *
 * Measured here (1 GiB bench image, 2 vCPUs): node:zlib's async API runs each chunk on the libuv
 * pool with a fresh compressor, whose ~0.3–4 MiB of state the pool threads' malloc arenas hand back
 * to the kernel after every chunk (page faults ~7 µs apiece on this guest): brotli quality 1 took
 * 3.1 s of the pool for the image's compressible chunks, the same work on two worker threads with
 * the synchronous API 1.3 s. A worker also takes several chunks per message, where the pool costs
 * a round trip (futex wake-ups, expensive on this paravirtual guest) per chunk.
 *
 * Decoding there takes the cold-read work (read, inflate, CRC32 or SHA-256: ~1.5–2.5 s of CPU per GiB here) off
 * the event loop, which then only serves the initiators, and spreads it over the CPUs. A decoded chunk
 * is written straight into the caller's buffer when that is shared memory (the chunk cache allocates
 * SharedArrayBuffers), else it comes back as a transferred buffer. This file holds the only decoder:
 * `decodeChunk` (format.ts) and the readers all come here.
 *
 * The pool is shared by the whole process and started on first use; its idle workers do not keep
 * the process alive (`unref`). Workers run plain JavaScript given as source text (`eval`), so the
 * same code serves the bundled CLI, the tests and the benches.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { CHUNK_FORMAT_VERSION, CHUNK_HEADER_SIZE, CHUNK_MAGIC, type ChunkCodec } from './format.js';

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

/** Where the stored form of a chunk (header + payload) is. */
export type ChunkBytes =
  /** In memory. */
  | { readonly kind: 'bytes'; readonly bytes: Buffer }
  /** A chunk file: the whole file (a file longer than a chunk of the expected length can be is corrupt). */
  | { readonly kind: 'file'; readonly path: string }
  /** A record in a pack file. */
  | { readonly kind: 'record'; readonly path: string; readonly offset: number; readonly length: number };

/**
 * What a decode checks besides the header and lengths: the CRC32 of the stored payload, written
 * at backup time (catches bit rot, torn and truncated records: ~5.5 GB/s here), and/or the SHA-256
 * of the content against the digest it is stored under (also catches a valid chunk stored or
 * mapped under the wrong digest: ~1.6 GB/s here, a quarter of a cold read's CPU).
 */
export type ChunkChecks = 'crc32' | 'sha256' | 'crc32+sha256';

export interface DecodeRequest {
  readonly from: ChunkBytes;
  readonly digest: Buffer;
  readonly expectedLength: number;
  readonly checks: ChunkChecks;
  /** Where to put the content if possible (the result is then a view of it). */
  readonly into?: Buffer;
}

/** A chunk that cannot be decoded: `reason` as CorruptChunkError reports it; `code` an errno code of a failed read. */
export class ChunkDecodeFailure extends Error {
  constructor(
    readonly reason: string,
    readonly code?: string,
  ) {
    super(reason);
    this.name = 'ChunkDecodeFailure';
  }
}

/**
 * The worker. Encoding: deflating incompressible data (encrypted, already compressed) costs ~5x
 * more CPU than hashing it and saves nothing, so two 4 KiB samples (start and middle) are deflated
 * first with a 4 KiB window; if neither saves MIN_SAVING the chunk is stored as it is (chunks under
 * 64 KiB are always tried). Decoding checks, in order: header size, magic, version, uncompressed
 * length = the expected one, payload length, CRC32 (unless `checks` is 'sha256'), decompression
 * bounded to the expected length, SHA-256 = the digest (unless `checks` is 'crc32')
 * (docs/repository-format.md, "Chunk file").
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const zlib = require('node:zlib');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const C = zlib.constants;
const { minSaving: MIN_SAVING, headerSize: HEADER, magic: MAGIC, version: VERSION } = workerData;
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

function exactCopy(buf) {
  const copy = new Uint8Array(buf.length);
  copy.set(buf);
  return copy;
}

function encode(job, transfer) {
  const data = Buffer.from(job.data.buffer, job.data.byteOffset, job.data.byteLength);
  let compressed = null;
  if (job.compress && data.length > 0 && looksCompressible(data)) {
    const out = compress(data, job.codec, job.level);
    if (out.length <= data.length * (1 - MIN_SAVING)) {
      // An exact-size copy: transferring a view would move (or copy) its whole pool buffer.
      compressed = exactCopy(out);
      transfer.push(compressed.buffer);
    }
  }
  return { compressed, crc: zlib.crc32(compressed ?? data) };
}

// Read handles of pack files, least recently used first (a deleted pack stays readable through its handle).
const packFds = new Map();
function packFd(path) {
  let fd = packFds.get(path);
  if (fd !== undefined) {
    packFds.delete(path);
  } else {
    fd = fs.openSync(path, 'r');
    if (packFds.size >= 64) {
      const [oldPath, oldFd] = packFds.entries().next().value;
      packFds.delete(oldPath);
      fs.closeSync(oldFd);
    }
  }
  packFds.set(path, fd);
  return fd;
}

let scratch = Buffer.allocUnsafe(0);
function scratchOf(n) {
  if (scratch.length < n) scratch = Buffer.allocUnsafe(Math.max(n, 2 * scratch.length));
  return scratch.subarray(0, n);
}

function readAt(fd, buf, position) {
  let filled = 0;
  while (filled < buf.length) {
    const n = fs.readSync(fd, buf, filled, buf.length - filled, position + filled);
    if (n === 0) break;
    filled += n;
  }
  return filled;
}

class Corrupt extends Error {
  constructor(reason, code) { super(reason); this.reason = reason; this.code = code; }
}

function readStored(from, expected) {
  if (from.kind === 'bytes') return Buffer.from(from.bytes.buffer, from.bytes.byteOffset, from.bytes.byteLength);
  try {
    if (from.kind === 'record') {
      const buf = scratchOf(from.length);
      const n = readAt(packFd(from.path), buf, from.offset);
      if (n < from.length) throw new Corrupt('pack file ends inside the record');
      return buf;
    }
    // One read into header + expected + 1 bytes: a longer file cannot be a valid chunk.
    const fd = fs.openSync(from.path, 'r');
    try {
      const buf = scratchOf(HEADER + expected + 1);
      const n = readAt(fd, buf, 0);
      if (n === buf.length) throw new Corrupt('file is longer than a chunk of ' + expected + ' bytes can be');
      return buf.subarray(0, n);
    } finally {
      fs.closeSync(fd);
    }
  } catch (err) {
    if (err instanceof Corrupt) throw err;
    const code = err && err.code;
    if (code === 'ENOENT') throw new Corrupt(from.kind === 'record' ? 'pack file is missing' : 'chunk file is missing', code);
    throw new Corrupt('cannot read: ' + (err && err.message ? err.message : String(err)), code);
  }
}

// An uncompressed record read straight into shared memory: header into a small buffer, payload
// into the caller's buffer, one readv and no copy. Returns null when that does not apply.
const headerBuf = Buffer.allocUnsafe(HEADER);
function readUncompressedInto(job) {
  const from = job.from;
  if (from.kind !== 'record' || job.into === null || from.length !== HEADER + job.expected || job.into.byteLength < job.expected) return null;
  const target = Buffer.from(job.into.buffer, job.into.byteOffset, job.expected);
  let n;
  try {
    n = fs.readvSync(packFd(from.path), [headerBuf, target], from.offset);
  } catch (err) {
    return null; // the general path reads again and reports the error
  }
  if (n !== from.length || headerBuf.readUInt8(5) !== 0) return null;
  return target;
}

// Header checks, in order: magic, version, uncompressed length = the expected one, stored length =
// the payload's. Returns the fields the caller needs.
function checkHeader(h, payloadLength, expected) {
  if (h.readUInt32LE(0) !== MAGIC) throw new Corrupt('bad magic');
  const version = h.readUInt8(4);
  if (version !== VERSION) throw new Corrupt('unsupported chunk format version ' + version);
  const uncompressedLength = h.readUInt32LE(8);
  const storedLength = h.readUInt32LE(12);
  if (uncompressedLength !== expected) throw new Corrupt('header says ' + uncompressedLength + ' bytes, the index expects ' + expected);
  if (storedLength !== payloadLength) throw new Corrupt('payload is ' + payloadLength + ' bytes, header says ' + storedLength);
  return { compression: h.readUInt8(5), uncompressedLength, storedLength, storedCrc: h.readUInt32LE(16) };
}

function checkCrc(job, payload, storedCrc) {
  if (job.checks !== 'sha256' && zlib.crc32(payload) !== storedCrc) throw new Corrupt('CRC32 mismatch');
}

function checkDigest(job, data) {
  if (job.checks === 'crc32') return;
  const digest = createHash('sha256').update(data).digest();
  if (!digest.equals(Buffer.from(job.digest.buffer, job.digest.byteOffset, job.digest.byteLength))) {
    throw new Corrupt('SHA-256 of the content does not match its name');
  }
}

function decode(job, transfer) {
  const expected = job.expected;
  const direct = readUncompressedInto(job);
  if (direct !== null) {
    // The header is in headerBuf, the (uncompressed) payload already in the caller's memory.
    const header = checkHeader(headerBuf, direct.length, expected);
    checkCrc(job, direct, header.storedCrc);
    checkDigest(job, direct);
    return { shared: true };
  }
  const file = readStored(job.from, expected);
  if (file.length < HEADER) throw new Corrupt('file is ' + file.length + ' bytes, shorter than the header');
  const { compression, uncompressedLength, storedLength, storedCrc } = checkHeader(file, file.length - HEADER, expected);
  const payload = file.subarray(HEADER);
  checkCrc(job, payload, storedCrc);
  let data;
  if (compression === 0) {
    if (storedLength !== uncompressedLength) throw new Corrupt('stored length differs from length of an uncompressed chunk');
    data = payload;
  } else if (compression === 1 || compression === 2) {
    const brotli = compression === 2;
    // One output buffer of the chunk's size (chunkSize): the default 16 KiB pieces would be
    // allocated one by one and then concatenated, a second copy of the whole chunk.
    const limits = { maxOutputLength: Math.max(1, uncompressedLength), chunkSize: Math.max(64, uncompressedLength) };
    try {
      data = brotli ? zlib.brotliDecompressSync(payload, limits) : zlib.inflateRawSync(payload, limits);
    } catch (err) {
      throw new Corrupt((brotli ? 'brotli decompression' : 'inflate') + ' failed: ' + (err && err.message ? err.message : String(err)));
    }
    if (data.length !== uncompressedLength) throw new Corrupt('decompressed to ' + data.length + ' bytes, expected ' + uncompressedLength);
  } else {
    throw new Corrupt('unknown compression kind ' + compression);
  }
  checkDigest(job, data);
  if (job.into !== null && job.into.byteLength >= data.length) {
    job.into.set(data);
    return { shared: true };
  }
  const out = exactCopy(data);
  transfer.push(out.buffer);
  return { data: out };
}

parentPort.on('message', ({ jobs }) => {
  const results = [];
  const transfer = [];
  for (const job of jobs) {
    try {
      results.push(job.op === 'encode' ? encode(job, transfer) : decode(job, transfer));
    } catch (err) {
      results.push(err instanceof Corrupt ? { reason: err.reason, code: err.code } : { reason: 'chunk worker: ' + String(err && err.stack ? err.stack : err) });
    }
  }
  parentPort.postMessage({ results }, transfer);
});
`;

type EncodeMessage = { op: 'encode'; data: Uint8Array; compress: boolean; codec: ChunkCodec; level: number };
type DecodeMessage = {
  op: 'decode';
  from: { kind: 'bytes'; bytes: Uint8Array } | { kind: 'file'; path: string } | { kind: 'record'; path: string; offset: number; length: number };
  digest: Uint8Array;
  expected: number;
  checks: ChunkChecks;
  into: Uint8Array | null;
};
type WorkerResult =
  | { compressed: Uint8Array | null; crc: number }
  | { shared: true }
  | { data: Uint8Array }
  | { reason: string; code?: string };

interface Job {
  readonly message: EncodeMessage | DecodeMessage;
  readonly transfer: ArrayBuffer[];
  readonly settle: (result: WorkerResult) => void;
  readonly reject: (e: Error) => void;
}

interface PoolWorker {
  readonly worker: Worker;
  /** Settles when the thread runs JavaScript (or has failed to start: its jobs fail then). */
  readonly online: Promise<void>;
  /** Jobs of the batch the worker is working on (null: idle). */
  running: Job[] | null;
}

/** Jobs sent to a worker in one message at most. */
const MAX_BATCH = 16;

export class ChunkWorkerPool {
  private readonly workers: PoolWorker[] = [];
  private readonly queue: Job[] = [];
  private dispatchScheduled = false;

  constructor(private readonly threads = defaultChunkWorkerThreads()) {}

  /**
   * Start every worker now instead of on first use (they stay unref'd while idle); resolves once
   * each runs JavaScript, so their start-up (~tens of ms of CPU each) is over before the caller
   * reports ready rather than competing with its first reads.
   */
  async start(): Promise<void> {
    while (this.workers.length < this.threads) this.startWorker();
    // Referenced while starting: a caller awaiting this keeps the process alive.
    for (const w of this.workers) w.worker.ref();
    try {
      await Promise.all(this.workers.map((w) => w.online));
    } finally {
      for (const w of this.workers) if (w.running === null) w.worker.unref();
    }
  }

  /** Encode one chunk; `data` is copied (the caller keeps its buffer). */
  async encode(data: Buffer, request: EncodeRequest): Promise<EncodedPayload> {
    // A copy the worker can own (its own memory, not zero-filled first): transferring it costs
    // nothing, while structured cloning a view of a larger buffer would copy all of that buffer.
    const copy = Buffer.allocUnsafeSlow(data.length);
    data.copy(copy);
    const result = await this.submit(
      { op: 'encode', data: copy, compress: request.compress, codec: request.codec, level: request.level },
      [copy.buffer as ArrayBuffer],
    );
    if (!('crc' in result)) throw new Error(`chunk encoder: ${'reason' in result ? result.reason : 'unexpected result'}`);
    const compressed = result.compressed === null ? null : Buffer.from(result.compressed.buffer, result.compressed.byteOffset, result.compressed.byteLength);
    return { compressed, codec: compressed === null ? null : request.codec, crc: result.crc };
  }

  /** Decode and verify one chunk; throws ChunkDecodeFailure with the reason. */
  async decode(request: DecodeRequest): Promise<Buffer> {
    const { from, into } = request;
    const shared = into !== undefined && into.buffer instanceof SharedArrayBuffer && into.length >= request.expectedLength ? into : null;
    let wireFrom: DecodeMessage['from'];
    const transfer: ArrayBuffer[] = [];
    if (from.kind === 'bytes') {
      const copy = Buffer.allocUnsafeSlow(from.bytes.length);
      from.bytes.copy(copy);
      transfer.push(copy.buffer as ArrayBuffer);
      wireFrom = { kind: 'bytes', bytes: copy };
    } else {
      wireFrom = from;
    }
    const result = await this.submit(
      { op: 'decode', from: wireFrom, digest: new Uint8Array(request.digest), expected: request.expectedLength, checks: request.checks, into: shared },
      transfer,
    );
    if ('reason' in result) throw new ChunkDecodeFailure(result.reason, result.code);
    if ('shared' in result) return shared!.subarray(0, request.expectedLength);
    if (!('data' in result)) throw new ChunkDecodeFailure('chunk worker: unexpected result');
    const data = Buffer.from(result.data.buffer, result.data.byteOffset, result.data.byteLength);
    if (into !== undefined && into.length >= data.length) {
      data.copy(into);
      return into.subarray(0, data.length);
    }
    return data;
  }

  private submit(message: EncodeMessage | DecodeMessage, transfer: ArrayBuffer[]): Promise<WorkerResult> {
    return new Promise((settle, reject) => {
      this.queue.push({ message, transfer, settle, reject });
      // Jobs queued in the same turn of the event loop (the chunks of one source read, the chunks
      // of one read-ahead) go to the workers together: each message costs a cross-thread wake-up,
      // expensive on this paravirtual guest.
      if (!this.dispatchScheduled) {
        this.dispatchScheduled = true;
        setImmediate(() => {
          this.dispatchScheduled = false;
          this.dispatch();
        });
      }
    });
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
      idle.worker.postMessage({ jobs: jobs.map((j) => j.message) }, jobs.flatMap((j) => j.transfer));
    }
  }

  private startWorker(): PoolWorker {
    const worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: { minSaving: MIN_SAVING, headerSize: CHUNK_HEADER_SIZE, magic: CHUNK_MAGIC, version: CHUNK_FORMAT_VERSION },
    });
    const online = new Promise<void>((resolve) => {
      worker.once('online', resolve);
      worker.once('error', () => resolve());
      worker.once('exit', () => resolve());
    });
    const entry: PoolWorker = { worker, online, running: null };
    worker.on('message', (message: { results: WorkerResult[] }) => {
      const jobs = entry.running ?? [];
      entry.running = null;
      worker.unref();
      jobs.forEach((job, k) => {
        const result = message.results[k];
        if (result === undefined) job.reject(new Error('chunk worker: no result'));
        else job.settle(result);
      });
      this.dispatch();
    });
    const fail = (err: Error): void => {
      const index = this.workers.indexOf(entry);
      if (index >= 0) this.workers.splice(index, 1);
      for (const job of entry.running ?? []) job.reject(new Error(`chunk worker failed: ${err.message}`));
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

/** One worker per CPU, at most 4: the main thread hashes, reads, writes and serves beside them. */
export function defaultChunkWorkerThreads(): number {
  return Math.max(1, Math.min(4, availableParallelism()));
}

let shared: ChunkWorkerPool | null = null;

/** The process's shared chunk worker pool. */
export function chunkWorkers(): ChunkWorkerPool {
  shared ??= new ChunkWorkerPool();
  return shared;
}
