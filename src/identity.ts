import { createHash } from 'node:crypto';
import type { BlockDeviceIdentity } from './block-device.js';

export const VENDOR_ID = 'BOOTREST';

/**
 * IEEE company identifier used in our NAA designators. 0x0AB007 lies in the CID range (the "X" bit of
 * the first octet set); it is provisional until the project registers an OUI of its own.
 */
export const NAA_COMPANY_ID = 0x0ab007;

/**
 * Derive a LUN identity from a stable seed (config content, never a random number at start), so
 * VPD 0x80 / 0x83 stay the same across restarts: ESXi's RDM mappings depend on it.
 *
 * NAA designator: IEEE Registered Extended format (SPC-4 7.8.6.6.5, NAA 6h, 16 bytes): NAA + 24-bit
 * company id + 100 bits taken from SHA-256(seed). Linux builds its persistent "naa." device name
 * only from NAA types 2, 5 and 6 (type 3 falls back to a "t10." name), and ESXi names devices
 * "naa.<hex>" from it too. The serial number is 24 hex digits of the same hash.
 */
export function deriveIdentity(seed: string, product = 'bootrestore LUN'): BlockDeviceIdentity {
  const hash = createHash('sha256').update('bootrestore-lun-identity\0').update(seed).digest();
  const naa = Buffer.from(hash.subarray(0, 16));
  // Byte 0: NAA (6h) | company id bits 23..20; bytes 1-2: company id bits 19..4; byte 3 high nibble: bits 3..0.
  naa[0] = 0x60 | ((NAA_COMPANY_ID >> 20) & 0x0f);
  naa[1] = (NAA_COMPANY_ID >> 12) & 0xff;
  naa[2] = (NAA_COMPANY_ID >> 4) & 0xff;
  naa[3] = ((NAA_COMPANY_ID & 0x0f) << 4) | (naa[3]! & 0x0f);
  return {
    serial: hash.subarray(8, 20).toString('hex'),
    naa,
    vendor: VENDOR_ID,
    product: product.slice(0, 16),
    revision: '0001',
  };
}
