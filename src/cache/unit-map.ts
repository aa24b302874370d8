/**
 * In-memory block map of a delta: one state per map unit (4 KiB by default), kept as two bitmaps
 * (present-in-delta, deallocated). A unit with neither bit reads from the base (the backup).
 * The bitmaps are the exact bytes written to the checkpoint file (docs/delta-format.md).
 */

/** Unit reads from the backup. */
export const UNIT_BASE = 0;
/** Unit reads from the delta data file. */
export const UNIT_PRESENT = 1;
/** Unit was deallocated (UNMAP / WRITE SAME with UNMAP): reads as zeroes. */
export const UNIT_ZERO = 2;
export type UnitState = typeof UNIT_BASE | typeof UNIT_PRESENT | typeof UNIT_ZERO;

export class UnitMap {
  readonly unitCount: number;
  /** Bit u set: unit u is in the delta data file. */
  readonly present: Uint8Array;
  /** Bit u set: unit u is deallocated. Never set together with the present bit. */
  readonly zero: Uint8Array;

  constructor(unitCount: number, present?: Uint8Array, zero?: Uint8Array) {
    this.unitCount = unitCount;
    const bytes = Math.ceil(unitCount / 8);
    this.present = present ?? new Uint8Array(bytes);
    this.zero = zero ?? new Uint8Array(bytes);
    if (this.present.length !== bytes || this.zero.length !== bytes) {
      throw new RangeError(`unit map bitmaps must be ${bytes} bytes for ${unitCount} units`);
    }
  }

  state(unit: number): UnitState {
    const byte = unit >>> 3;
    const bit = 1 << (unit & 7);
    if ((this.present[byte]! & bit) !== 0) return UNIT_PRESENT;
    if ((this.zero[byte]! & bit) !== 0) return UNIT_ZERO;
    return UNIT_BASE;
  }

  /** Set units [first, end) to `state`. */
  setRange(first: number, end: number, state: UnitState): void {
    if (first < 0 || end > this.unitCount || first > end) {
      throw new RangeError(`unit range [${first}, ${end}) outside 0..${this.unitCount}`);
    }
    const setPresent = state === UNIT_PRESENT;
    const setZero = state === UNIT_ZERO;
    let u = first;
    // Leading bits up to a byte boundary.
    while (u < end && (u & 7) !== 0) {
      this.setOne(u, setPresent, setZero);
      u++;
    }
    // Whole bytes.
    const wholeEnd = end & ~7;
    if (u < wholeEnd) {
      this.present.fill(setPresent ? 0xff : 0, u >>> 3, wholeEnd >>> 3);
      this.zero.fill(setZero ? 0xff : 0, u >>> 3, wholeEnd >>> 3);
      u = wholeEnd;
    }
    while (u < end) {
      this.setOne(u, setPresent, setZero);
      u++;
    }
  }

  /**
   * The first unit in (unit, limit) whose state differs from `state(unit)`, or `limit` if none.
   * Skips whole bitmap bytes where possible.
   */
  runEnd(unit: number, limit: number): number {
    const s = this.state(unit);
    const presentByte = s === UNIT_PRESENT ? 0xff : 0;
    const zeroByte = s === UNIT_ZERO ? 0xff : 0;
    let u = unit + 1;
    while (u < limit) {
      if ((u & 7) === 0 && u + 8 <= limit) {
        const b = u >>> 3;
        if (this.present[b] === presentByte && this.zero[b] === zeroByte) {
          u += 8;
          continue;
        }
      }
      if (this.state(u) !== s) return u;
      u++;
    }
    return limit;
  }

  /** true if any unit in [first, end) is not UNIT_BASE. */
  anyNonBase(first: number, end: number): boolean {
    let u = first;
    while (u < end) {
      if ((u & 7) === 0 && u + 8 <= end) {
        const b = u >>> 3;
        if ((this.present[b]! | this.zero[b]!) !== 0) return true;
        u += 8;
        continue;
      }
      const byte = u >>> 3;
      const bit = 1 << (u & 7);
      if (((this.present[byte]! | this.zero[byte]!) & bit) !== 0) return true;
      u++;
    }
    return false;
  }

  /** Number of units in each state. */
  counts(): { present: number; zero: number } {
    return { present: popcount(this.present), zero: popcount(this.zero) };
  }

  private setOne(u: number, setPresent: boolean, setZero: boolean): void {
    const byte = u >>> 3;
    const bit = 1 << (u & 7);
    this.present[byte] = setPresent ? this.present[byte]! | bit : this.present[byte]! & ~bit;
    this.zero[byte] = setZero ? this.zero[byte]! | bit : this.zero[byte]! & ~bit;
  }
}

function popcount(bits: Uint8Array): number {
  let n = 0;
  for (let i = 0; i < bits.length; i++) {
    let v = bits[i]!;
    if (v === 0) continue;
    v = v - ((v >> 1) & 0x55);
    v = (v & 0x33) + ((v >> 2) & 0x33);
    n += (v + (v >> 4)) & 0x0f;
  }
  return n;
}
