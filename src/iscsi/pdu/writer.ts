/**
 * PDU output (RFC 7143 §11.1): BHS [+AHS] [+header digest] [+data +pad] [+data digest].
 * Every PDU is written as a handful of socket.write calls while the socket is corked; the cork is
 * released once per event-loop turn, so Node sends everything of that turn in one writev.
 * Payload buffers (e.g. the SCSI layer's read data) are written as slices, never copied.
 */
import { crc32cUpdate, writeDigest } from './crc32c.js';
import { padLength, setDataSegmentLength } from './bhs.js';
import { BHS_LENGTH } from './opcodes.js';

/** The part of net.Socket the writer uses (a test can pass any Writable). */
export interface PduSink {
  write(chunk: Buffer): boolean;
  cork(): void;
  uncork(): void;
  readonly destroyed: boolean;
  readonly writableEnded?: boolean;
}

const ZERO_PAD = Buffer.alloc(4);

export class PduWriter {
  headerDigest = false;
  dataDigest = false;
  private flushScheduled = false;
  /** Bytes handed to the socket (for statistics). */
  bytesWritten = 0;

  constructor(private readonly sink: PduSink) {}

  get closed(): boolean {
    return this.sink.destroyed || this.sink.writableEnded === true;
  }

  /**
   * Run `fn` with the socket corked. The cork is released once per event-loop turn
   * (setImmediate), so every PDU sent in this turn — all responses of commands that completed
   * together — leaves in a single writev.
   */
  burst(fn: () => void): void {
    this.cork();
    fn();
  }

  private cork(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    this.sink.cork();
    setImmediate(this.flush);
  }

  private readonly flush = (): void => {
    this.flushScheduled = false;
    this.sink.uncork();
  };

  /**
   * Send one PDU. `bhs` is a 48-byte BHS (its TotalAHSLength and DataSegmentLength are set here);
   * `data` may be a list of slices sent back to back as one data segment.
   */
  send(bhs: Buffer, data?: Buffer | readonly Buffer[], ahs?: Buffer): void {
    if (this.closed) return;
    const parts: readonly Buffer[] = data === undefined ? [] : Buffer.isBuffer(data) ? [data] : data;
    let dataLength = 0;
    for (const p of parts) dataLength += p.length;
    bhs[4] = ahs ? ahs.length >>> 2 : 0;
    setDataSegmentLength(bhs, dataLength);
    this.cork();
    if (this.headerDigest) {
      // Header digest over BHS and AHS (§11.2.3).
      let crc = crc32cUpdate(0xffffffff, bhs, 0, BHS_LENGTH);
      if (ahs) crc = crc32cUpdate(crc, ahs);
      const digest = Buffer.allocUnsafe(4);
      writeDigest(digest, 0, ~crc >>> 0);
      this.write(bhs);
      if (ahs) this.write(ahs);
      this.write(digest);
    } else {
      this.write(bhs);
      if (ahs) this.write(ahs);
    }
    if (dataLength === 0) return;
    for (const p of parts) if (p.length > 0) this.write(p);
    const pad = padLength(dataLength);
    if (pad > 0) this.write(ZERO_PAD.subarray(0, pad));
    if (this.dataDigest) {
      let crc = 0xffffffff;
      for (const p of parts) crc = crc32cUpdate(crc, p);
      if (pad > 0) crc = crc32cUpdate(crc, ZERO_PAD, 0, pad);
      const digest = Buffer.allocUnsafe(4);
      writeDigest(digest, 0, ~crc >>> 0);
      this.write(digest);
    }
  }

  private write(buf: Buffer): void {
    this.bytesWritten += buf.length;
    this.sink.write(buf);
  }
}
