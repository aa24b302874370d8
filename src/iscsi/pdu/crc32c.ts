/**
 * CRC32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78) for iSCSI header and data
 * digests (RFC 7143 §13.1, RFC 3720 appendix B.4). Node's zlib.crc32 uses the IEEE polynomial and
 * cannot be used. Slicing-by-8 tables: 8 KiB, built once.
 */

const REFLECTED_POLY = 0x82f63b78;

function buildTables(): Uint32Array[] {
  const tables: Uint32Array[] = [];
  for (let t = 0; t < 8; t++) tables.push(new Uint32Array(256));
  const t0 = tables[0]!;
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ REFLECTED_POLY : c >>> 1;
    t0[n] = c >>> 0;
  }
  for (let n = 0; n < 256; n++) {
    let c = t0[n]!;
    for (let t = 1; t < 8; t++) {
      c = (t0[c & 0xff]! ^ (c >>> 8)) >>> 0;
      tables[t]![n] = c;
    }
  }
  return tables;
}

const TABLES = buildTables();
const T0 = TABLES[0]!;
const T1 = TABLES[1]!;
const T2 = TABLES[2]!;
const T3 = TABLES[3]!;
const T4 = TABLES[4]!;
const T5 = TABLES[5]!;
const T6 = TABLES[6]!;
const T7 = TABLES[7]!;

/**
 * Continue a CRC32C over `buf[start, end)`. `crc` is the running value *before* final inversion:
 * start with 0xFFFFFFFF, finish with `~crc >>> 0` (see `crc32c`).
 */
export function crc32cUpdate(crc: number, buf: Uint8Array, start = 0, end = buf.length): number {
  let c = crc >>> 0;
  let i = start;
  const end8 = end - ((end - i) & 7);
  while (i < end8) {
    const lo = (c ^ (buf[i]! | (buf[i + 1]! << 8) | (buf[i + 2]! << 16) | (buf[i + 3]! << 24))) >>> 0;
    c =
      T7[lo & 0xff]! ^
      T6[(lo >>> 8) & 0xff]! ^
      T5[(lo >>> 16) & 0xff]! ^
      T4[lo >>> 24]! ^
      T3[buf[i + 4]!]! ^
      T2[buf[i + 5]!]! ^
      T1[buf[i + 6]!]! ^
      T0[buf[i + 7]!]!;
    i += 8;
  }
  while (i < end) {
    c = T0[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
    i++;
  }
  return c >>> 0;
}

/** CRC32C of one buffer (or a range of it). */
export function crc32c(buf: Uint8Array, start = 0, end = buf.length): number {
  return ~crc32cUpdate(0xffffffff, buf, start, end) >>> 0;
}

/** CRC32C over several buffers in order, as if concatenated. */
export function crc32cOfParts(parts: readonly Uint8Array[]): number {
  let c = 0xffffffff;
  for (const p of parts) c = crc32cUpdate(c, p);
  return ~c >>> 0;
}

/**
 * iSCSI digests go on the wire as the CRC's 32-bit value in little-endian byte order
 * (RFC 7143 §13.1 / RFC 3720 B.4: the bytes of the "CRC register" least significant first).
 */
export function writeDigest(target: Buffer, offset: number, digest: number): void {
  target.writeUInt32LE(digest >>> 0, offset);
}

export function readDigest(source: Buffer, offset: number): number {
  return source.readUInt32LE(offset);
}
