/**
 * Serialises commands that modify overlapping LBA ranges of one logical unit, so COMPARE AND
 * WRITE (SBC-3 5.2) and ORWRITE are atomic with respect to every other write. Non-overlapping
 * requests never wait; overlapping ones are granted in arrival order.
 */

interface Waiter {
  readonly start: number;
  readonly end: number;
  readonly grant: () => void;
}

interface Held {
  readonly start: number;
  readonly end: number;
}

export type ReleaseLock = () => void;

const overlaps = (a: Held, start: number, end: number): boolean => a.start < end && start < a.end;

export class LbaRangeLock {
  private readonly held: Held[] = [];
  private readonly waiting: Waiter[] = [];

  /** Number of ranges currently held (for tests and metrics). */
  get heldCount(): number {
    return this.held.length;
  }

  /** True when acquire(lba, blocks) would have to wait for an overlapping holder or waiter. */
  wouldWait(lba: number, blocks: number): boolean {
    return !this.canGrant(lba, lba + Math.max(blocks, 1), this.waiting.length);
  }

  /** Resolve with a release function once [lba, lba + blocks) can be modified exclusively. */
  acquire(lba: number, blocks: number): Promise<ReleaseLock> {
    const start = lba;
    const end = lba + Math.max(blocks, 1);
    if (this.canGrant(start, end, this.waiting.length)) return Promise.resolve(this.take(start, end));
    return new Promise<ReleaseLock>((resolve) => {
      this.waiting.push({ start, end, grant: () => resolve(this.take(start, end)) });
    });
  }

  private canGrant(start: number, end: number, waitersBefore: number): boolean {
    for (const h of this.held) if (overlaps(h, start, end)) return false;
    for (let i = 0; i < waitersBefore; i++) if (overlaps(this.waiting[i]!, start, end)) return false;
    return true;
  }

  private take(start: number, end: number): ReleaseLock {
    const entry: Held = { start, end };
    this.held.push(entry);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const at = this.held.indexOf(entry);
      if (at >= 0) this.held.splice(at, 1);
      this.wakeWaiters();
    };
  }

  private wakeWaiters(): void {
    for (let i = 0; i < this.waiting.length; ) {
      const w = this.waiting[i]!;
      if (this.canGrant(w.start, w.end, i)) {
        this.waiting.splice(i, 1);
        w.grant(); // take() runs synchronously: later waiters see this range as held
      } else {
        i++;
      }
    }
  }
}
