import { describe, expect, it } from 'vitest';
import { deriveIdentity, NAA_COMPANY_ID } from '../../../src/identity.js';

describe('LUN identity', () => {
  it('is stable for one seed and different for another', () => {
    const a = deriveIdentity('file\0iqn.2026-12.io.x:a\0' + '0\0/srv/a.img');
    const again = deriveIdentity('file\0iqn.2026-12.io.x:a\0' + '0\0/srv/a.img');
    const b = deriveIdentity('file\0iqn.2026-12.io.x:a\0' + '1\0/srv/a.img');
    expect(again.naa.equals(a.naa)).toBe(true);
    expect(again.serial).toBe(a.serial);
    expect(b.naa.equals(a.naa)).toBe(false);
    expect(b.serial).not.toBe(a.serial);
  });

  it('is an NAA 6 (IEEE Registered Extended) designator carrying the company id', () => {
    const { naa, serial, vendor } = deriveIdentity('seed');
    expect(naa.length).toBe(16);
    expect(naa[0]! >> 4).toBe(6);
    const companyId = ((naa[0]! & 0x0f) << 20) | (naa[1]! << 12) | (naa[2]! << 4) | (naa[3]! >> 4);
    expect(companyId).toBe(NAA_COMPANY_ID);
    expect(serial).toMatch(/^[0-9a-f]{24}$/);
    expect(vendor.length).toBeLessThanOrEqual(8);
  });
});
