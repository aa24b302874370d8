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

export class CommandWindow {
  private readonly held = new Map<number, () => void>();
  private draining = false;

  constructor(
    private exp: number,
    /** Queue depth: MaxCmdSN = ExpCmdSN + depth - 1. */
    readonly depth: number,
  ) {}

  get expCmdSN(): number {
    return this.exp >>> 0;
  }

  get maxCmdSN(): number {
    return (this.exp + this.depth - 1) >>> 0;
  }

  /** Number of commands held back waiting for a gap to fill. */
  get heldCount(): number {
    return this.held.size;
  }

  inWindow(cmdSN: number): boolean {
    const d = serialDiff(cmdSN, this.exp);
    return d >= 0 && d < this.depth;
  }

  /** Offer a non-immediate command; `deliver` runs when it is its turn (maybe right now). */
  submit(cmdSN: number, deliver: () => void): SubmitOutcome {
    const d = serialDiff(cmdSN, this.exp);
    if (d < 0 || d >= this.depth || this.held.has(cmdSN >>> 0)) return 'ignored';
    this.held.set(cmdSN >>> 0, deliver);
    this.drain();
    return this.held.has(cmdSN >>> 0) ? 'held' : 'delivered';
  }

  /** Consider `cmdSN` received without a command (ABORT TASK on a lost command, §11.5.1 b). */
  markReceived(cmdSN: number): void {
    if (!this.inWindow(cmdSN) || this.held.has(cmdSN >>> 0)) return;
    this.held.set(cmdSN >>> 0, () => undefined);
    this.drain();
  }

  /** Drop a held command (aborted before its turn) while keeping its CmdSN as received. */
  cancelHeld(cmdSN: number): boolean {
    if (!this.held.has(cmdSN >>> 0)) return false;
    this.held.set(cmdSN >>> 0, () => undefined);
    return true;
  }

  /** Forget everything held (session ending). */
  clear(): void {
    this.held.clear();
  }

  private drain(): void {
    if (this.draining) return;
    this.draining = true;
    try {
      for (;;) {
        const next = this.held.get(this.exp >>> 0);
        if (!next) break;
        this.held.delete(this.exp >>> 0);
        this.exp = (this.exp + 1) >>> 0;
        next();
      }
    } finally {
      this.draining = false;
    }
  }
}
