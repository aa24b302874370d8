import { describe, expect, it } from 'vitest';
import { crc32c, crc32cOfParts, crc32cUpdate, writeDigest } from '../../../../src/iscsi/pdu/crc32c.js';

/** Bit-at-a-time reference (no tables) to cross-check the slicing-by-8 code. */
function crc32cBitwise(buf: Uint8Array): number {
  let c = 0xffffffff;
  for (const byte of buf) {
    c ^= byte;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return ~c >>> 0;
}

function wireBytes(buf: Buffer): string {
  const d = Buffer.alloc(4);
  writeDigest(d, 0, crc32c(buf));
  return d.toString('hex');
}

describe('CRC32C (RFC 3720 appendix B.4 vectors)', () => {
  it('32 bytes of zeroes → aa 36 91 8a', () => {
    expect(wireBytes(Buffer.alloc(32, 0))).toBe('aa36918a');
  });
  it('32 bytes of 0xff → 43 ab a8 62', () => {
    expect(wireBytes(Buffer.alloc(32, 0xff))).toBe('43aba862');
  });
  it('32 incrementing bytes 00..1f → 4e 79 dd 46', () => {
    expect(wireBytes(Buffer.from(Array.from({ length: 32 }, (_, i) => i)))).toBe('4e79dd46');
  });
  it('32 decrementing bytes 1f..00 → 5c db 3f 11', () => {
    expect(wireBytes(Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i)))).toBe('5cdb3f11');
  });
  it('an iSCSI SCSI Read (10) command PDU → 56 3a 96 d9', () => {
    const pdu = Buffer.from(
      '01c00000' + '00000000' + '00000000' + '00000000' + '14000000' + '00000400' +
        '00000014' + '00000018' + '28000000' + '00000000' + '02000000' + '00000000',
      'hex',
    );
    expect(pdu.length).toBe(48);
    expect(wireBytes(pdu)).toBe('563a96d9');
  });
  it('the common check value: "123456789" → 0xe3069283', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
  });
  it('matches a bitwise reference for every length 0..300 and over split updates', () => {
    const data = Buffer.alloc(300);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7919 + 13) & 0xff;
    for (let n = 0; n <= 300; n++) {
      const slice = data.subarray(0, n);
      const expected = crc32cBitwise(slice);
      expect(crc32c(slice)).toBe(expected);
      const cut = Math.floor(n / 3);
      expect(crc32cOfParts([slice.subarray(0, cut), slice.subarray(cut)])).toBe(expected);
      expect(~crc32cUpdate(0xffffffff, data, 0, n) >>> 0).toBe(expected);
    }
  });
});
