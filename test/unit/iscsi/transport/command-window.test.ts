import { describe, expect, it } from 'vitest';
import { CommandWindow, serialDiff } from '../../../../src/iscsi/session/command-window.js';
import { decodeLun, encodeLun, UNSUPPORTED_LUN } from '../../../../src/iscsi/pdu/bhs.js';

describe('CmdSN window (RFC 7143 §3.2.2.1, serial arithmetic RFC 1982)', () => {
  it('delivers in order, holds commands ahead of a gap, ignores duplicates and out-of-window CmdSNs', () => {
    const w = new CommandWindow(10, 4);
    const ran: number[] = [];
    expect(w.maxCmdSN).toBe(13);
    expect(w.submit(12, () => ran.push(12))).toBe('held');
    expect(w.submit(12, () => ran.push(-12))).toBe('ignored'); // duplicate
    expect(w.submit(14, () => ran.push(14))).toBe('ignored'); // beyond MaxCmdSN
    expect(w.submit(9, () => ran.push(9))).toBe('ignored'); // already consumed
    expect(w.submit(11, () => ran.push(11))).toBe('held');
    expect(ran).toEqual([]);
    expect(w.submit(10, () => ran.push(10))).toBe('delivered');
    expect(ran).toEqual([10, 11, 12]);
    expect(w.expCmdSN).toBe(13);
    expect(w.maxCmdSN).toBe(16);
    expect(w.heldCount).toBe(0);
  });

  it('wraps around 2^32', () => {
    const w = new CommandWindow(0xfffffffe, 8);
    const ran: number[] = [];
    expect(serialDiff(1, 0xffffffff)).toBe(2);
    expect(w.submit(0, () => ran.push(0))).toBe('held');
    expect(w.submit(0xfffffffe, () => ran.push(0xfffffffe))).toBe('delivered');
    expect(w.submit(0xffffffff, () => ran.push(0xffffffff))).toBe('delivered');
    expect(ran).toEqual([0xfffffffe, 0xffffffff, 0]);
    expect(w.expCmdSN).toBe(1);
    expect(w.maxCmdSN).toBe(8);
  });

  it('a CmdSN marked received (ABORT TASK of a lost command) or a cancelled held one lets later commands through', () => {
    const w = new CommandWindow(1, 16);
    const ran: number[] = [];
    w.submit(3, () => ran.push(3));
    w.submit(2, () => ran.push(2));
    expect(w.cancelHeld(2)).toBe(true);
    w.markReceived(1);
    expect(ran).toEqual([3]);
    expect(w.expCmdSN).toBe(4);
  });
});

describe('LUN fields (SAM-5 4.7)', () => {
  const lunField = (...bytes: number[]): Buffer => {
    const b = Buffer.alloc(48);
    Buffer.from(bytes).copy(b, 8);
    return b;
  };
  it('decodes peripheral and flat space addressing', () => {
    expect(decodeLun(lunField(0x00, 0x05))).toBe(5);
    expect(decodeLun(lunField(0x40, 0x05))).toBe(5);
    expect(decodeLun(lunField(0x41, 0x02))).toBe(258);
    expect(decodeLun(lunField(0x7f, 0xff))).toBe(16383);
  });
  it('maps everything else to a LUN number no LU can have', () => {
    expect(decodeLun(lunField(0x01, 0x05))).toBe(UNSUPPORTED_LUN); // peripheral with bus 1
    expect(decodeLun(lunField(0x00, 0x01, 0x00, 0x02))).toBe(UNSUPPORTED_LUN); // second level
    expect(decodeLun(lunField(0xc0, 0x00))).toBe(UNSUPPORTED_LUN); // extended addressing
    expect(decodeLun(lunField(0x80, 0x01))).toBe(UNSUPPORTED_LUN); // logical unit addressing
  });
  it('encodes numbers back to what it decodes', () => {
    for (const lun of [0, 1, 255, 256, 1000, 16383]) {
      const b = Buffer.alloc(48);
      encodeLun(lun, b);
      expect(decodeLun(b)).toBe(lun);
    }
  });
});
