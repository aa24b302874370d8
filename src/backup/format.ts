/**
 * On-disk formats of the repository: chunk files and restore-point index files.
 * Layouts are documented in docs/repository-format.md; all integers are little-endian.
 */
import { createHash } from 'node:crypto';
import { ChunkDecodeFailure, chunkWorkers, type ChunkChecks, type DecodeRequest } from './chunk-workers.js';
import { CorruptChunkError, RepositoryError } from './errors.js';
import type { RestorePointInfo } from './types.js';

// ---------------------------------------------------------------------------------------------
// Chunk files
// ---------------------------------------------------------------------------------------------

/** "BRCK": bootrestore chunk. */
export const CHUNK_MAGIC = 0x4b435242;
export const CHUNK_FORMAT_VERSION = 1;
export const CHUNK_HEADER_SIZE = 24;

export const enum ChunkCompression {
  None = 0,
  /** Raw DEFLATE (RFC 1951). Encoded and decoded on the chunk workers (src/backup/chunk-workers.ts). */
  Deflate = 1,
  /** Brotli (RFC 7932). Encoded and decoded on the chunk workers (src/backup/chunk-workers.ts). */
  Brotli = 2,
}

/** Codecs a backup can compress new chunks with; every reader decodes all of them. */
export type ChunkCodec = 'brotli' | 'deflate';
export const CHUNK_CODECS: readonly ChunkCodec[] = ['brotli', 'deflate'];
/** Default codec and levels (docs/repository-format.md, "Codec choice"). */
export const DEFAULT_CODEC: ChunkCodec = 'brotli';
export const DEFAULT_CODEC_LEVEL: Readonly<Record<ChunkCodec, number>> = { brotli: 2, deflate: 1 };
/** Valid levels: deflate 1–9, brotli quality 0–11. */
export const CODEC_LEVELS: Readonly<Record<ChunkCodec, readonly [number, number]>> = { brotli: [0, 11], deflate: [1, 9] };

/** Why a codec/level pair is invalid, or undefined when it is valid. */
export function codecLevelProblem(codec: string, level: number | undefined): string | undefined {
  if (!(CHUNK_CODECS as readonly string[]).includes(codec)) return `unknown compression "${codec}": use ${CHUNK_CODECS.join(', ')} or none`;
  if (level === undefined) return undefined;
  const [min, max] = CODEC_LEVELS[codec as ChunkCodec];
  if (!Number.isInteger(level) || level < min || level > max) return `${codec} level ${level} is invalid: use ${min} to ${max}`;
  return undefined;
}

/** Largest chunk we accept (also guards inflate against decompression bombs). */
export const MAX_CHUNK_SIZE = 16 * 1024 * 1024;

export const DIGEST_LENGTH = 32;
/** The index stores 32 zero bytes for a chunk whose content is all zero (no chunk file). */
export const ZERO_DIGEST = Buffer.alloc(DIGEST_LENGTH);

export function sha256(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

export function isZeroDigest(digest: Buffer): boolean {
  return digest.equals(ZERO_DIGEST);
}

export { isAllZero } from '../zero-bytes.js';

export interface EncodedChunk {
  /** Header + payload, ready to be written to the chunk file. */
  readonly file: Buffer;
  readonly compression: ChunkCompression;
  readonly storedLength: number;
}

export interface EncodedChunkParts {
  /** The 24-byte chunk header. */
  readonly header: Buffer;
  /** The stored payload (the content itself, or its deflated form): the file is header + payload. */
  readonly payload: Buffer;
  readonly compression: ChunkCompression;
  readonly storedLength: number;
}

export interface EncodeOptions {
  /** Try to compress (default true). */
  readonly compress?: boolean;
  /** Codec for compressible chunks (default DEFAULT_CODEC). */
  readonly codec?: ChunkCodec;
  /** Codec level (default DEFAULT_CODEC_LEVEL[codec]); the level is not recorded: decoding does not need it. */
  readonly level?: number;
}

/**
 * Build a chunk file: 24-byte header (magic, version, compression, uncompressed length, stored
 * length, CRC32 of the stored payload) followed by the payload. Compression runs on the chunk
 * workers (src/backup/chunk-workers.ts), off the event loop.
 */
export async function encodeChunk(data: Buffer, options: EncodeOptions = {}): Promise<EncodedChunk> {
  const parts = await encodeChunkParts(data, options);
  const file = Buffer.allocUnsafe(CHUNK_HEADER_SIZE + parts.payload.length);
  parts.header.copy(file, 0);
  parts.payload.copy(file, CHUNK_HEADER_SIZE);
  return { file, compression: parts.compression, storedLength: parts.storedLength };
}

/**
 * Like `encodeChunk`, but returns header and payload separately so that the writer can write them
 * with one writev instead of copying the payload into a new buffer.
 */
export async function encodeChunkParts(data: Buffer, options: EncodeOptions = {}): Promise<EncodedChunkParts> {
  const codec = options.codec ?? DEFAULT_CODEC;
  const encoded = await chunkWorkers().encode(data, {
    compress: options.compress ?? true,
    codec,
    level: options.level ?? DEFAULT_CODEC_LEVEL[codec],
  });
  const payload = encoded.compressed ?? data;
  const compression =
    encoded.codec === null ? ChunkCompression.None : encoded.codec === 'brotli' ? ChunkCompression.Brotli : ChunkCompression.Deflate;
  const header = Buffer.allocUnsafe(CHUNK_HEADER_SIZE);
  header.writeUInt32LE(CHUNK_MAGIC, 0);
  header.writeUInt8(CHUNK_FORMAT_VERSION, 4);
  header.writeUInt8(compression, 5);
  header.writeUInt16LE(0, 6);
  header.writeUInt32LE(data.length, 8);
  header.writeUInt32LE(payload.length, 12);
  header.writeUInt32LE(encoded.crc, 16);
  header.writeUInt32LE(0, 20);
  return { header, payload, compression, storedLength: payload.length };
}

/**
 * Parse and verify a chunk file held in memory: header, CRC32 of the payload and SHA-256 of the
 * content against `digest` (`checks` says which of the two; default both), decompression and
 * lengths, on a chunk worker (src/backup/chunk-workers.ts, the one decoder; readers use
 * `decodeStoredChunk` to let the worker read the file too). Any mismatch throws CorruptChunkError:
 * never wrong data — except that 'crc32' alone cannot tell a valid chunk stored under another
 * digest (docs/repository-format.md, "Chunk file").
 */
export async function decodeChunk(
  file: Buffer,
  digest: Buffer,
  expectedLength: number,
  path?: string,
  checks: ChunkChecks = 'crc32+sha256',
): Promise<Buffer> {
  return decodeStoredChunk({ from: { kind: 'bytes', bytes: file }, digest, expectedLength, checks }, path);
}

/** Decode a chunk from memory, a chunk file or a pack record; a failure is a CorruptChunkError naming `path`. */
export async function decodeStoredChunk(request: DecodeRequest, path?: string): Promise<Buffer> {
  try {
    return await chunkWorkers().decode(request);
  } catch (err) {
    if (err instanceof ChunkDecodeFailure) throw new CorruptChunkError(request.digest.toString('hex'), err.reason, path);
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// Index files
// ---------------------------------------------------------------------------------------------

/** 8 ASCII bytes "BRINDEX1": bootrestore index. */
export const INDEX_MAGIC = Buffer.from('BRINDEX1', 'latin1');
export const INDEX_FORMAT_VERSION = 1;
const INDEX_FIXED_HEADER = 16; // magic (8) + version u32 + metadata length u32

/** Metadata of a restore point, stored as JSON in its index: its summary without the zero-chunk count (derived from the digests). */
export type IndexMetadata = Omit<RestorePointInfo, 'zeroChunks'>;

export interface RestorePointIndex {
  readonly meta: IndexMetadata;
  /** chunkCount × 32 bytes: SHA-256 per chunk, 32 zero bytes for an all-zero chunk. */
  readonly digests: Buffer;
}

export function chunkCountFor(imageSize: number, chunkSize: number): number {
  return Math.ceil(imageSize / chunkSize);
}

/**
 * Index layout: "BRINDEX1", u32 version, u32 metadata length, metadata (UTF-8 JSON),
 * chunkCount × 32-byte digests, then SHA-256 of all preceding bytes.
 */
export function encodeIndex(index: RestorePointIndex): Buffer {
  const meta = Buffer.from(JSON.stringify(index.meta), 'utf8');
  if (index.digests.length !== index.meta.chunkCount * DIGEST_LENGTH) {
    throw new RepositoryError(`index of ${index.meta.vm}/${index.meta.id}: digest table does not match chunk count`);
  }
  const head = Buffer.alloc(INDEX_FIXED_HEADER);
  INDEX_MAGIC.copy(head, 0);
  head.writeUInt32LE(INDEX_FORMAT_VERSION, 8);
  head.writeUInt32LE(meta.length, 12);
  const body = Buffer.concat([head, meta, index.digests]);
  return Buffer.concat([body, sha256(body)]);
}

/** Parse and verify an index file; throws RepositoryError naming `path` and the reason. */
export function decodeIndex(file: Buffer, path: string): RestorePointIndex {
  const bad = (reason: string): RepositoryError => new RepositoryError(`bad index ${path}: ${reason}`);
  if (file.length < INDEX_FIXED_HEADER + DIGEST_LENGTH) throw bad(`file is only ${file.length} bytes`);
  if (!file.subarray(0, 8).equals(INDEX_MAGIC)) throw bad('bad magic');
  const body = file.subarray(0, file.length - DIGEST_LENGTH);
  if (!sha256(body).equals(file.subarray(file.length - DIGEST_LENGTH))) throw bad('checksum mismatch');
  const version = file.readUInt32LE(8);
  if (version !== INDEX_FORMAT_VERSION) throw bad(`unsupported index format version ${version}`);
  const metaLength = file.readUInt32LE(12);
  if (INDEX_FIXED_HEADER + metaLength > body.length) throw bad('metadata length beyond end of file');
  let parsed: unknown;
  try {
    parsed = JSON.parse(file.subarray(INDEX_FIXED_HEADER, INDEX_FIXED_HEADER + metaLength).toString('utf8'));
  } catch {
    throw bad('metadata is not valid JSON');
  }
  const meta = validateMetadata(parsed, bad);
  const digests = Buffer.from(body.subarray(INDEX_FIXED_HEADER + metaLength));
  if (digests.length !== meta.chunkCount * DIGEST_LENGTH) {
    throw bad(`digest table holds ${digests.length / DIGEST_LENGTH} entries, metadata says ${meta.chunkCount}`);
  }
  return { meta, digests };
}

function validateMetadata(value: unknown, bad: (reason: string) => RepositoryError): IndexMetadata {
  if (typeof value !== 'object' || value === null) throw bad('metadata is not an object');
  const m = value as Record<string, unknown>;
  const str = (k: string): string => {
    const v = m[k];
    if (typeof v !== 'string') throw bad(`metadata field "${k}" is not a string`);
    return v;
  };
  const int = (k: string): number => {
    const v = m[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw bad(`metadata field "${k}" is not a non-negative integer`);
    return v;
  };
  const parent = m.parent;
  if (parent !== null && typeof parent !== 'string') throw bad('metadata field "parent" is neither null nor a string');
  const meta: IndexMetadata = {
    vm: str('vm'),
    id: str('id'),
    parent,
    createdAt: str('createdAt'),
    imageSize: int('imageSize'),
    chunkSize: int('chunkSize'),
    chunkCount: int('chunkCount'),
    source: str('source'),
  };
  if (meta.chunkSize < 4096 || meta.chunkSize > MAX_CHUNK_SIZE) throw bad(`chunk size ${meta.chunkSize} out of range`);
  if (meta.chunkCount !== chunkCountFor(meta.imageSize, meta.chunkSize)) {
    throw bad(`chunk count ${meta.chunkCount} does not fit image size ${meta.imageSize} / chunk size ${meta.chunkSize}`);
  }
  return meta;
}
