/**
 * The session-wide command window (RFC 7143 §3.2.2.1, §4.2.2.1): non-immediate commands are
 * delivered in CmdSN order; a command that arrives ahead of a gap is held until the gap fills;
 * commands outside [ExpCmdSN, MaxCmdSN] and duplicates are silently ignored. Immediate commands
 * bypass the window. Comparisons use serial number arithmetic (RFC 1982, 32 bits).
 */

/** a - b in 32-bit serial arithmetic: negative when a is "before" b. */
export function serialDiff(a: number, b: number): number {
  return (a - b) | 0;
}

export type SubmitOutcome = 'delivered' | 'held' | 'ignored';

/** A CmdSN taken as received without a command to run (ABORT TASK of a lost or held command). */
const NOTHING_TO_RUN = (): void => undefined;

/**
 * Held commands live in a ring of `depth` slots: the slot of ExpCmdSN is `head`, a CmdSN d ahead
 * of it sits d slots further. Every held CmdSN is inside the window, so slots never collide, and
 * no Map entry is created per command.
 */
export class CommandWindow {
  private readonly slots: Array<(() => void) | undefined>;
  private head = 0;
  private held = 0;
  private draining = false;

  constructor(
    private exp: number,
    /** Queue depth: MaxCmdSN = ExpCmdSN + depth - 1. */
    readonly depth: number,
  ) {
    this.slots = new Array<(() => void) | undefined>(depth).fill(undefined);
  }

  get expCmdSN(): number {
    return this.exp >>> 0;
  }

  get maxCmdSN(): number {
    return (this.exp + this.depth - 1) >>> 0;
  }

  /** Number of commands held back waiting for a gap to fill. */
  get heldCount(): number {
    return this.held;
  }

  inWindow(cmdSN: number): boolean {
    const d = serialDiff(cmdSN, this.exp);
    return d >= 0 && d < this.depth;
  }

  /** Slot of an in-window CmdSN, or -1 outside the window. */
  private slotOf(cmdSN: number): number {
    const d = serialDiff(cmdSN, this.exp);
    if (d < 0 || d >= this.depth) return -1;
    const at = this.head + d;
    return at >= this.depth ? at - this.depth : at;
  }

  /** Offer a non-immediate command; `deliver` runs when it is its turn (maybe right now). */
  submit(cmdSN: number, deliver: () => void): SubmitOutcome {
    const slot = this.slotOf(cmdSN);
    if (slot < 0 || this.slots[slot] !== undefined) return 'ignored';
    this.slots[slot] = deliver;
    this.held++;
    this.drain();
    return this.slots[slot] === deliver && this.slotOf(cmdSN) === slot ? 'held' : 'delivered';
  }

  /** Consider `cmdSN` received without a command (ABORT TASK on a lost command, §11.5.1 b). */
  markReceived(cmdSN: number): void {
    const slot = this.slotOf(cmdSN);
    if (slot < 0 || this.slots[slot] !== undefined) return;
    this.slots[slot] = NOTHING_TO_RUN;
    this.held++;
    this.drain();
  }

  /** Drop a held command (aborted before its turn) while keeping its CmdSN as received. */
  cancelHeld(cmdSN: number): boolean {
    const slot = this.slotOf(cmdSN);
    if (slot < 0 || this.slots[slot] === undefined) return false;
    this.slots[slot] = NOTHING_TO_RUN;
    return true;
  }

  /** Forget everything held (session ending). */
  clear(): void {
    this.slots.fill(undefined);
    this.held = 0;
  }

  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    try {
      for (;;) {
        const next = this.slots[this.head];
        if (next === undefined) break;
        this.slots[this.head] = undefined;
        this.held--;
        this.head = this.head + 1 === this.depth ? 0 : this.head + 1;
        this.exp = (this.exp + 1) >>> 0;
        next();
      }
    } finally {
      this.draining = false;
    }
  }
}
