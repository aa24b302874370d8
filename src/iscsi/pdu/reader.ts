/**
 * Incremental PDU framing (RFC 7143 §11.1): BHS → AHS → header digest → data (+pad) → data digest.
 *
 * Socket chunks are parsed in place with offsets. A PDU wholly inside one chunk is handed out as
 * views into that chunk (no copy). Only a PDU that straddles chunks is copied, once, into a buffer
 * of exactly its size (allocated when its BHS is complete, so its length is known). Buffers handed
 * out are never written again, so a consumer may keep a data segment (e.g. immediate data) across
 * awaits.
 */
import { crc32c, readDigest } from './crc32c.js';
import { padLength, type Pdu } from './bhs.js';
import { BHS_LENGTH } from './opcodes.js';

export type FramingErrorKind =
  /** Header digest mismatch: framing is lost, the connection must close (§7.8). */
  | 'header-digest'
  /** Data segment longer than our MaxRecvDataSegmentLength (§13.12): protocol error. */
  | 'data-segment-too-long';

export class FramingError extends Error {
  constructor(
    message: string,
    readonly kind: FramingErrorKind,
    /** Copy of the offending BHS (for a Reject's data segment). */
    readonly bhs: Buffer,
  ) {
    super(message);
    this.name = 'FramingError';
  }
}

export interface PduReaderHandlers {
  /** A complete PDU with valid digests. */
  onPdu(pdu: Pdu): void;
  /** A complete PDU whose data digest does not match (it must be rejected and discarded, §7.8). */
  onDataDigestError(pdu: Pdu): void;
  /** Fatal framing error: the reader has stopped; the connection should close. */
  onFramingError(err: FramingError): void;
}

export interface PduReaderLimits {
  headerDigest: boolean;
  dataDigest: boolean;
  /** Largest data segment we accept (our declared MaxRecvDataSegmentLength; 8192 during login). */
  maxDataSegmentLength: number;
}

export class PduReader {
  /** Buffer of the PDU (or, while `lengthKnown` is false, of the BHS) being assembled. */
  private partial: Buffer | undefined;
  private partialFilled = 0;
  private lengthKnown = false;
  private stopped = false;

  constructor(
    private readonly handlers: PduReaderHandlers,
    readonly limits: PduReaderLimits,
  ) {}

  /** Stop delivering PDUs (connection closing). */
  stop(): void {
    this.stopped = true;
    this.partial = undefined;
  }

  get isStopped(): boolean {
    return this.stopped;
  }

  /** Bytes of an incomplete PDU held between chunks. */
  get bufferedBytes(): number {
    return this.partial ? this.partialFilled : 0;
  }

  push(chunk: Buffer): void {
    let off = 0;
    const len = chunk.length;
    while (off < len && !this.stopped) {
      const partial = this.partial;
      if (partial) {
        const take = Math.min(partial.length - this.partialFilled, len - off);
        chunk.copy(partial, this.partialFilled, off, off + take);
        this.partialFilled += take;
        off += take;
        if (this.partialFilled < partial.length) return;
        if (!this.lengthKnown) {
          const total = this.frameLength(partial, 0);
          if (total < 0) return;
          if (total > BHS_LENGTH) {
            const whole = Buffer.allocUnsafe(total);
            partial.copy(whole, 0, 0, BHS_LENGTH);
            this.partial = whole;
            this.lengthKnown = true;
            continue;
          }
        }
        this.partial = undefined;
        this.lengthKnown = false;
        this.partialFilled = 0;
        this.deliver(partial, 0, partial.length);
        continue;
      }
      const available = len - off;
      if (available < BHS_LENGTH) {
        const header = Buffer.allocUnsafe(BHS_LENGTH);
        chunk.copy(header, 0, off, len);
        this.partial = header;
        this.partialFilled = available;
        this.lengthKnown = false;
        return;
      }
      const total = this.frameLength(chunk, off);
      if (total < 0) return;
      if (available >= total) {
        this.deliver(chunk, off, total);
        off += total;
      } else {
        const whole = Buffer.allocUnsafe(total);
        chunk.copy(whole, 0, off, len);
        this.partial = whole;
        this.partialFilled = available;
        this.lengthKnown = true;
        return;
      }
    }
  }

  /** Total wire length of the PDU whose BHS starts at `off`, or -1 after a fatal error. */
  private frameLength(buf: Buffer, off: number): number {
    const ahsBytes = buf[off + 4]! * 4;
    const dsl = (buf[off + 5]! << 16) | (buf[off + 6]! << 8) | buf[off + 7]!;
    if (dsl > this.limits.maxDataSegmentLength) {
      this.fail(
        new FramingError(
          `data segment of ${dsl} bytes exceeds MaxRecvDataSegmentLength ${this.limits.maxDataSegmentLength}`,
          'data-segment-too-long',
          Buffer.from(buf.subarray(off, off + BHS_LENGTH)),
        ),
      );
      return -1;
    }
    let total = BHS_LENGTH + ahsBytes;
    if (this.limits.headerDigest) total += 4;
    if (dsl > 0) {
      total += dsl + padLength(dsl);
      if (this.limits.dataDigest) total += 4;
    }
    return total;
  }

  private deliver(buf: Buffer, off: number, _total: number): void {
    const ahsBytes = buf[off + 4]! * 4;
    const dsl = (buf[off + 5]! << 16) | (buf[off + 6]! << 8) | buf[off + 7]!;
    const headerEnd = off + BHS_LENGTH + ahsBytes;
    let dataStart = headerEnd;
    if (this.limits.headerDigest) {
      const expected = crc32c(buf, off, headerEnd);
      if (readDigest(buf, headerEnd) !== expected) {
        this.fail(
          new FramingError('header digest mismatch', 'header-digest', Buffer.from(buf.subarray(off, off + BHS_LENGTH))),
        );
        return;
      }
      dataStart += 4;
    }
    const pdu: Pdu = {
      bhs: buf.subarray(off, off + BHS_LENGTH),
      ahs: buf.subarray(off + BHS_LENGTH, headerEnd),
      data: buf.subarray(dataStart, dataStart + dsl),
    };
    if (dsl > 0 && this.limits.dataDigest) {
      const paddedEnd = dataStart + dsl + padLength(dsl);
      if (readDigest(buf, paddedEnd) !== crc32c(buf, dataStart, paddedEnd)) {
        this.handlers.onDataDigestError(pdu);
        return;
      }
    }
    this.handlers.onPdu(pdu);
  }

  private fail(err: FramingError): void {
    this.stopped = true;
    this.partial = undefined;
    this.handlers.onFramingError(err);
  }
}
