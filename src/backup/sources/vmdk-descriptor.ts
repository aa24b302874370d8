import { SourceError } from '../errors.js';

/*
 * VMDK text descriptor (VMware "Virtual Disk Format 1.1", section "The Descriptor File"):
 * "# Disk DescriptorFile", then key=value lines (version, CID, parentCID, createType,
 * parentFileNameHint), extent lines, and the disk database (ddb.* keys).
 */

export type VmdkExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';
export type VmdkExtentType = 'FLAT' | 'SPARSE' | 'ZERO' | 'VMFS' | 'VMFSSPARSE' | 'VMFSRDM' | 'VMFSRAW' | 'SESPARSE';

export interface VmdkExtentLine {
  readonly access: VmdkExtentAccess;
  /** Extent size in 512-byte sectors. */
  readonly sectors: number;
  readonly type: VmdkExtentType;
  /** File name as written (relative to the descriptor's directory unless absolute); absent for ZERO. */
  readonly fileName: string | undefined;
  /** Start of the extent's data inside a FLAT/VMFS file, in sectors (0 if absent). */
  readonly offsetSectors: number;
}

export interface VmdkDescriptor {
  readonly version: number | undefined;
  readonly createType: string;
  /** parentCID; "ffffffff" means no parent. */
  readonly parentCid: string | undefined;
  readonly parentFileNameHint: string | undefined;
  readonly extents: ReadonlyArray<VmdkExtentLine>;
  /** Every key = value line (including ddb.*), quotes removed. */
  readonly keys: ReadonlyMap<string, string>;
}

const EXTENT_TYPES: ReadonlySet<string> = new Set(['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'VMFSRDM', 'VMFSRAW', 'SESPARSE']);
const ACCESS_MODES: ReadonlySet<string> = new Set(['RW', 'RDONLY', 'NOACCESS']);

/**
 * Parse descriptor text. `file` names the file in errors. Throws SourceError on lines that are
 * neither comments, key=value pairs nor valid extent lines.
 */
export function parseVmdkDescriptor(text: string, file: string): VmdkDescriptor {
  const keys = new Map<string, string>();
  const extents: VmdkExtentLine[] = [];
  const lines = text.split(/\r?\n/);
  let sawHeader = false;
  for (let index = 0; index < lines.length; index++) {
    const line = lines[index]!.replace(/\0.*$/s, '').trim();
    if (line === '') continue;
    if (line.startsWith('#')) {
      if (/^#\s*Disk DescriptorFile/i.test(line)) sawHeader = true;
      continue;
    }
    const firstWord = line.split(/\s+/, 1)[0]!;
    if (ACCESS_MODES.has(firstWord.toUpperCase())) {
      extents.push(parseExtentLine(line, file, index + 1));
      continue;
    }
    const equals = line.indexOf('=');
    if (equals <= 0) {
      throw new SourceError(file, `VMDK descriptor line ${index + 1} is not understood: "${truncate(line)}"`);
    }
    const key = line.slice(0, equals).trim();
    const value = unquote(line.slice(equals + 1).trim());
    keys.set(key, value);
  }
  if (!sawHeader && keys.size === 0 && extents.length === 0) {
    throw new SourceError(file, 'not a VMDK descriptor (no "# Disk DescriptorFile" line, keys or extents)');
  }
  const createType = keys.get('createType');
  if (createType === undefined || createType === '') {
    throw new SourceError(file, 'VMDK descriptor has no createType');
  }
  if (extents.length === 0) throw new SourceError(file, 'VMDK descriptor lists no extents');
  const versionText = keys.get('version');
  const version = versionText !== undefined && /^\d+$/.test(versionText) ? Number(versionText) : undefined;
  return {
    version,
    createType,
    parentCid: keys.get('parentCID'),
    parentFileNameHint: keys.get('parentFileNameHint'),
    extents,
    keys,
  };
}

/** `ACCESS SIZE TYPE ["FILE" [OFFSET]]` (VMDK 1.1, "Extent Descriptions"). */
function parseExtentLine(line: string, file: string, lineNumber: number): VmdkExtentLine {
  const match = /^(\S+)\s+(\d+)\s+(\S+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/.exec(line);
  if (match === null) {
    throw new SourceError(file, `VMDK descriptor line ${lineNumber}: malformed extent line "${truncate(line)}"`);
  }
  const access = match[1]!.toUpperCase();
  const type = match[3]!.toUpperCase();
  if (!ACCESS_MODES.has(access)) throw new SourceError(file, `VMDK descriptor line ${lineNumber}: unknown access "${match[1]}"`);
  if (!EXTENT_TYPES.has(type)) throw new SourceError(file, `VMDK descriptor line ${lineNumber}: unknown extent type "${match[3]}"`);
  const sectors = Number(match[2]);
  const offsetSectors = match[5] === undefined ? 0 : Number(match[5]);
  if (!Number.isSafeInteger(sectors * 512) || !Number.isSafeInteger(offsetSectors * 512)) {
    throw new SourceError(file, `VMDK descriptor line ${lineNumber}: extent size or offset out of range`);
  }
  const fileName = match[4];
  if (type !== 'ZERO' && (fileName === undefined || fileName === '')) {
    throw new SourceError(file, `VMDK descriptor line ${lineNumber}: ${type} extent without a file name`);
  }
  return {
    access: access as VmdkExtentAccess,
    sectors,
    type: type as VmdkExtentType,
    fileName: type === 'ZERO' ? undefined : fileName,
    offsetSectors,
  };
}

function unquote(value: string): string {
  return value.length >= 2 && value.startsWith('"') && value.endsWith('"') ? value.slice(1, -1) : value;
}

function truncate(line: string): string {
  return line.length > 80 ? `${line.slice(0, 77)}...` : line;
}
