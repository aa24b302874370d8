import type { DiskSource } from '../types.js';
import { SourceError } from '../errors.js';
import type { Logger } from '../../log.js';
import { ImageFile } from './image-file.js';
import { RawSource } from './raw.js';
import { Qcow2Source } from './qcow2.js';
import { VmdkSource } from './vmdk.js';

/** qcow2 header magic "QFI\xfb" (qcow2 spec, header bytes 0-3). */
const QCOW2_MAGIC = 0x514649fb;
/** VMDK hosted sparse extent magic "KDMV" (VMDK spec, SparseExtentHeader.magicNumber, little-endian). */
const VMDK_SPARSE_MAGIC = 0x564d444b;

export type SourceFormatName = 'raw' | 'qcow2' | 'vmdk';

export interface OpenSourceOptions {
  /** Parent logger; parsers log at debug level only. */
  readonly logger?: Logger;
  /** Skip detection and open as this format (e.g. a qcow2 "backing format" header extension). */
  readonly format?: SourceFormatName;
}

/** Detect the format of an already opened image file from its first bytes. */
export async function detectFormat(file: ImageFile): Promise<SourceFormatName> {
  const head = await file.readClamped(0, 512, 'header');
  if (head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC) return 'qcow2';
  if (head.length >= 4 && head.readUInt32LE(0) === VMDK_SPARSE_MAGIC) return 'vmdk';
  if (isVmdkDescriptorText(head)) return 'vmdk';
  return 'raw';
}

/** A VMDK descriptor file starts with "# Disk DescriptorFile" (possibly after blank lines). */
export function isVmdkDescriptorText(head: Buffer): boolean {
  const text = head.toString('latin1').replace(/^\uFEFF/, '').trimStart();
  return text.startsWith('# Disk DescriptorFile');
}

/**
 * Open a disk image for reading, detecting its format by magic: qcow2 ("QFI\xfb"), VMDK sparse
 * ("KDMV"), VMDK descriptor text ("# Disk DescriptorFile"), else raw.
 */
export async function openSource(path: string, options: OpenSourceOptions = {}): Promise<DiskSource> {
  return openAtDepth(path, options.format, options.logger, 0);
}

async function openAtDepth(
  path: string,
  formatHint: SourceFormatName | undefined,
  logger: Logger | undefined,
  depth: number,
): Promise<DiskSource> {
  const file = await ImageFile.open(path);
  try {
    const detected = await detectFormat(file);
    // A format hint (a qcow2 backing format) must agree with the content, except "raw": any
    // content may be read as raw when the parent says so (as qemu does).
    if (formatHint !== undefined && formatHint !== detected && !(formatHint === 'raw' && detected !== 'raw')) {
      throw new SourceError(path, `expected a ${formatHint} image, found ${detected}`);
    }
    const format = formatHint ?? detected;
    const openBacking = (backingPath: string, backingFormat: string | undefined, backingDepth: number): Promise<DiskSource> =>
      openAtDepth(backingPath, backingFormat as SourceFormatName | undefined, logger, backingDepth);
    switch (format) {
      case 'raw':
        return RawSource.fromFile(file);
      case 'qcow2':
        return await Qcow2Source.fromFile(file, { openBacking, depth, ...(logger ? { logger } : {}) });
      case 'vmdk':
        return await VmdkSource.fromFile(file, {
          depth,
          openParent: (parentPath, parentDepth) => openAtDepth(parentPath, 'vmdk', logger, parentDepth),
          ...(logger ? { logger } : {}),
        });
    }
  } catch (err) {
    await file.close().catch(() => undefined);
    throw err;
  }
}
