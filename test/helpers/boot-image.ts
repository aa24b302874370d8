/**
 * The bootable test image (scripts/build-boot-image.sh, layout in docs/boot-image.md) and the
 * host-side expectations a guest's report is checked against.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, open, readFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { runChecked } from './exec.js';

export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

interface ByteRange {
  startBytes: number;
  endBytes: number;
}

export interface BootImageManifest {
  key: string;
  kernelDeb: string;
  kernelRelease: string;
  modules: string[];
  iscsistart: boolean;
  diskBytes: number;
  partition: ByteRange;
  pattern: ByteRange;
  hashRegion: ByteRange & { sha256: string };
  scratch: ByteRange;
  buildMs: number;
}

export interface BootImage {
  /** The cache directory holding the files below: treat them as read-only (copy boot.img before writing). */
  dir: string;
  image: string;
  kernel: string;
  initrd: string;
  manifest: BootImageManifest;
  /** How long ensureBootImage took in this process (build or cache hit). */
  ensureMs: number;
}

let pending: Promise<BootImage> | undefined;

/** Builds the image (or finds it in the cache) once per process. */
export function ensureBootImage(): Promise<BootImage> {
  pending ??= buildBootImage();
  return pending;
}

async function buildBootImage(): Promise<BootImage> {
  const started = performance.now();
  const result = await runChecked('bash', [join(repoRoot, 'scripts', 'build-boot-image.sh')], { timeoutMs: 600_000 });
  const dir = result.stdout.trim().split('\n').at(-1) ?? '';
  const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as BootImageManifest;
  return {
    dir,
    image: join(dir, 'boot.img'),
    kernel: join(dir, 'vmlinuz'),
    initrd: join(dir, 'initrd.gz'),
    manifest,
    ensureMs: performance.now() - started,
  };
}

/** sha256 (hex) of bytes [start, end) of a file. */
export async function sha256OfRange(file: string, start: number, end: number): Promise<string> {
  const hash = createHash('sha256');
  if (end > start) {
    for await (const chunk of createReadStream(file, { start, end: end - 1, highWaterMark: 1 << 20 })) {
      hash.update(chunk as Buffer);
    }
  }
  return hash.digest('hex');
}

/** The hash the guest must print for a disk whose content equals `file` (the hash region of the layout). */
export async function expectedGuestHash(file: string, manifest: BootImageManifest): Promise<string> {
  return await sha256OfRange(file, manifest.hashRegion.startBytes, manifest.hashRegion.endBytes);
}

/**
 * What the guest writes to the scratch area: the 64-byte record "BOOTRESTORE-SCRATCH <nonce>"
 * padded with spaces to 63 bytes plus "\n", repeated to fill the area (init.sh does the same).
 */
export function scratchPattern(nonce: string, bytes: number): Buffer {
  const record = `BOOTRESTORE-SCRATCH ${nonce}`.padEnd(63, ' ') + '\n';
  if (record.length !== 64) throw new Error(`scratch nonce too long: ${nonce}`);
  return Buffer.alloc(bytes, record, 'ascii');
}

/** Reads the scratch area of a disk image (e.g. after a guest wrote to it). */
export async function readScratch(file: string, manifest: BootImageManifest): Promise<Buffer> {
  const handle = await open(file, 'r');
  try {
    const length = manifest.scratch.endBytes - manifest.scratch.startBytes;
    const buffer = Buffer.alloc(length);
    const { bytesRead } = await handle.read(buffer, 0, length, manifest.scratch.startBytes);
    return buffer.subarray(0, bytesRead);
  } finally {
    await handle.close();
  }
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A writable copy of the cached boot image for one boot (the cached image stays untouched). */
export async function copyBootImage(image: BootImage, dir: string, name: string): Promise<string> {
  const path = join(dir, name);
  await copyFile(image.image, path);
  return path;
}
