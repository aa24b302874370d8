import { createHash } from 'node:crypto';
import type { BlockDeviceIdentity } from './block-device.js';

export const VENDOR_ID = 'BOOTREST';

/**
 * Derive a LUN identity from a stable seed (config content, never a random number at start), so
 * VPD 0x80 / 0x83 stay the same across restarts: ESXi's RDM mappings depend on it.
 *
 * NAA designator: "locally assigned" format (SPC-4 7.8.6.6.x, NAA field 3h): 4-bit NAA + 60 bits
 * taken from SHA-256(seed). The serial number is 24 hex digits of the same hash.
 */
export function deriveIdentity(seed: string, product = 'bootrestore LUN'): BlockDeviceIdentity {
  const hash = createHash('sha256').update('bootrestore-lun-identity\0').update(seed).digest();
  const naa = Buffer.from(hash.subarray(0, 8));
  naa[0] = 0x30 | (naa[0]! & 0x0f);
  return {
    serial: hash.subarray(8, 20).toString('hex'),
    naa,
    vendor: VENDOR_ID,
    product: product.slice(0, 16),
    revision: '0001',
  };
}
