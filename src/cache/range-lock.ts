/**
 * Serialises operations on overlapping ranges of map units; non-overlapping operations run concurrently.
 * Used by the delta store so a read-modify-write of a partly written unit cannot interleave with another
 * write to that unit.
 */
interface HeldRange {
  readonly first: number;
  readonly end: number;
  readonly released: Promise<void>;
}

export class RangeLock {
  private readonly held = new Set<HeldRange>();

  /** Wait until no held range overlaps [first, end), then hold it. Returns the release function. */
  async acquire(first: number, end: number): Promise<() => void> {
    for (;;) {
      let blocker: HeldRange | undefined;
      for (const h of this.held) {
        if (h.first < end && first < h.end) {
          blocker = h;
          break;
        }
      }
      if (blocker === undefined) break;
      await blocker.released;
    }
    let release!: () => void;
    const released = new Promise<void>((resolve) => {
      release = resolve;
    });
    const range: HeldRange = { first, end, released };
    this.held.add(range);
    return () => {
      this.held.delete(range);
      release();
    };
  }

  get heldCount(): number {
    return this.held.size;
  }
}
