/**
 * Inspect and damage stored chunks in either chunk store of a repository: "files" (one file per
 * chunk, `chunks/<prefix>/<digest>`) or "packs" (records in `packs/<2 hex>/<32 hex>.pack`, located
 * through each pack's trailer). Reads the disk afresh on every call (no cached pack index).
 */
import { promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { readPackEntries } from '../../src/backup/packs.js';
import { Repository, type ChunkStoreKind } from '../../src/backup/repository.js';

export interface ChunkRecordLocation {
  readonly store: ChunkStoreKind;
  /** The chunk file, or the pack that holds the record. */
  readonly path: string;
  /** Where the record (24-byte chunk header + payload) starts in `path`: 0 for a chunk file. */
  readonly offset: number;
  /** Bytes of the record: the whole file for a chunk file. */
  readonly length: number;
  /** How verify and CorruptChunkError name it: the file, or "<pack>@<offset>". */
  readonly reportedPath: string;
}

const CHUNK_NAME_RE = /^[0-9a-f]{64}$/;
const PACK_NAME_RE = /^[0-9a-f]{32}\.pack$/;

export async function chunkStoreOf(repoDir: string): Promise<ChunkStoreKind> {
  return (await Repository.open(repoDir)).chunkStore;
}

async function listDir(path: string): Promise<string[]> {
  return fsp.readdir(path).catch((err: unknown) => {
    if ((err as { code?: unknown }).code === 'ENOENT') return [];
    throw err;
  });
}

/** The files that hold chunks, sorted: every chunk file ("files") or every pack ("packs"). */
export async function chunkStoreFiles(repoDir: string): Promise<string[]> {
  const store = await chunkStoreOf(repoDir);
  const top = join(repoDir, store === 'packs' ? 'packs' : 'chunks');
  const nameRe = store === 'packs' ? PACK_NAME_RE : CHUNK_NAME_RE;
  const out: string[] = [];
  for (const prefix of await listDir(top)) {
    for (const name of await listDir(join(top, prefix))) if (nameRe.test(name)) out.push(join(top, prefix, name));
  }
  return out.sort();
}

export interface StoredChunkRecord extends ChunkRecordLocation {
  readonly digestHex: string;
}

/** Digests (hex) of every stored chunk record, sorted; a chunk stored twice (two packs) counts twice. */
export async function listStoredChunks(repoDir: string): Promise<string[]> {
  return (await listChunkRecords(repoDir)).map((r) => r.digestHex).sort();
}

/** Every stored chunk record with its digest and location (packs: from their trailers). */
export async function listChunkRecords(repoDir: string): Promise<StoredChunkRecord[]> {
  const store = await chunkStoreOf(repoDir);
  const out: StoredChunkRecord[] = [];
  for (const path of await chunkStoreFiles(repoDir)) {
    if (store === 'files') {
      const { size } = await fsp.stat(path);
      out.push({ store, path, offset: 0, length: size, reportedPath: path, digestHex: path.slice(-64) });
    } else {
      for (const e of await readPackEntries(path)) {
        out.push({ store, path, offset: e.offset, length: e.length, reportedPath: `${path}@${e.offset}`, digestHex: e.digestHex });
      }
    }
  }
  return out;
}

/** Read a stored record (24-byte chunk header + payload). */
export async function readChunkRecord(location: ChunkRecordLocation): Promise<Buffer> {
  const handle = await fsp.open(location.path, 'r');
  try {
    const record = Buffer.alloc(location.length);
    const { bytesRead } = await handle.read(record, 0, location.length, location.offset);
    if (bytesRead !== location.length) throw new Error(`short read of ${location.reportedPath}: ${bytesRead} of ${location.length} bytes`);
    return record;
  } finally {
    await handle.close();
  }
}

/** Where a chunk's record is; throws if no file or pack holds it. */
export async function chunkRecordLocation(repoDir: string, digestHex: string): Promise<ChunkRecordLocation> {
  const found = (await listChunkRecords(repoDir)).find((r) => r.digestHex === digestHex);
  if (found === undefined) throw new Error(`chunk ${digestHex} is not stored in ${repoDir}`);
  return { store: found.store, path: found.path, offset: found.offset, length: found.length, reportedPath: found.reportedPath };
}

export interface CorruptedChunk extends ChunkRecordLocation {
  /** Put the original byte back. */
  restore(): Promise<void>;
}

/**
 * XOR one byte of a chunk's stored record with `mask` in place (default: the record's last byte, in
 * the payload). `byteOffsetWithinRecord` counts from the start of the record (header included).
 */
export async function corruptChunk(repoDir: string, digestHex: string, byteOffsetWithinRecord?: number, mask = 0x04): Promise<CorruptedChunk> {
  const location = await chunkRecordLocation(repoDir, digestHex);
  const within = byteOffsetWithinRecord ?? location.length - 1;
  if (!Number.isInteger(within) || within < 0 || within >= location.length) {
    throw new RangeError(`byte ${within} is outside the ${location.length}-byte record of chunk ${digestHex}`);
  }
  if ((mask & 0xff) === 0) throw new RangeError('mask must change the byte');
  const at = location.offset + within;
  const xorAt = async (): Promise<void> => {
    const handle = await fsp.open(location.path, 'r+');
    try {
      const b = Buffer.alloc(1);
      await handle.read(b, 0, 1, at);
      b[0]! ^= mask;
      await handle.write(b, 0, 1, at);
    } finally {
      await handle.close();
    }
  };
  await xorAt();
  return { ...location, restore: xorAt };
}
