/**
 * Background jobs that run one at a time, in the order they were started, while the caller goes
 * on (the writers' group fsyncs and pack seals). The first failure sticks: every later job is
 * skipped — its `skipped` clean-up runs instead — and rejects with that failure, so an error of a
 * job nobody awaited reaches the caller at its next back-pressure wait or final flush.
 */
export class SerialJobs {
  /** Tail of the chain; never rejects. */
  private tail: Promise<void> = Promise.resolve();
  private failure: { error: unknown } | null = null;
  /** Jobs started and not yet finished (for back-pressure). */
  inFlight = 0;

  run(job: () => Promise<void>, skipped: () => Promise<void> = async () => undefined): Promise<void> {
    this.inFlight++;
    const run = this.tail.then(async () => {
      try {
        if (this.failure !== null) {
          await skipped();
          throw this.failure.error;
        }
        try {
          await job();
        } catch (error) {
          this.failure ??= { error };
          throw error;
        }
      } finally {
        this.inFlight--;
      }
    });
    // Handled here so that a job nobody awaits is no unhandled rejection.
    this.tail = run.catch(() => undefined);
    return run;
  }

  /** Throws the first failure of any job so far. */
  throwIfFailed(): void {
    if (this.failure !== null) throw this.failure.error;
  }

  /** Resolves when every job started so far has finished (never rejects). */
  settled(): Promise<void> {
    return this.tail;
  }
}
