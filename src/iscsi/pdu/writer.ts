/**
 * PDU output (RFC 7143 §11.1): BHS [+AHS] [+header digest] [+data +pad] [+data digest].
 *
 * Everything sent in one event-loop turn leaves in one corked burst (the cork is released by a
 * setImmediate), so Node hands the kernel a single writev per turn. To keep that writev short and
 * the stream bookkeeping per PDU small, headers, digests, padding and small data segments are
 * copied into a staging slab and handed to the socket as one chunk; data segments larger than
 * COPY_MAX_BYTES (Data-In of big reads) are written as slices of the caller's buffer, never copied.
 * Staged bytes are never rewritten while the socket may still read them: two slabs alternate, and
 * a slab is filled again only once every chunk handed out of it has been written (its pages stay
 * mapped: no page fault per response); otherwise a fresh slab replaces it. A caller may reuse its BHS buffer as soon as
 * send() returns.
 */
import { crc32cUpdate, writeDigest } from './crc32c.js';
import { padLength, setDataSegmentLength } from './bhs.js';
import { BHS_LENGTH } from './opcodes.js';

/** The part of net.Socket the writer uses (a test can pass any Writable). */
export interface PduSink {
  /** `done` runs once the chunk has been handed to the kernel (or the write failed). */
  write(chunk: Buffer, done?: (err?: Error | null) => void): boolean;
  cork(): void;
  uncork(): void;
  readonly destroyed: boolean;
  readonly writableEnded?: boolean;
}

/** Data segments up to this size are copied into the staging slab (a 4 KiB read costs one memcpy). */
export const COPY_MAX_BYTES = 8192;
/** Size of one staging slab: room for a few dozen small responses per turn. */
const STAGE_BYTES = 256 * 1024;

export class PduWriter {
  headerDigest = false;
  dataDigest = false;
  private flushScheduled = false;
  /** Bytes handed to the socket (for statistics). */
  bytesWritten = 0;
  private stage = new StageSlab(STAGE_BYTES);
  /** The previous slab: taken back once the socket has written all of it (double buffering). */
  private spare: StageSlab | undefined;
  /** Start of the staged bytes not yet handed to the socket. */
  private stageStart = 0;
  /** End of the staged bytes. */
  private stageEnd = 0;

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
    if (!this.flushScheduled) return; // flushNow() came first
    this.flushNow();
  };

  /**
   * Hand everything staged to the socket and release the cork now (before socket.end(), or for a
   * caller that needs the bytes on the sink synchronously). The end of the turn does this itself.
   */
  flushNow(): void {
    if (!this.closed) this.handOverStage();
    else this.stageStart = this.stageEnd;
    if (this.flushScheduled) {
      this.flushScheduled = false;
      this.sink.uncork();
    }
  }

  /**
   * Send one PDU. `bhs` is a 48-byte BHS (its TotalAHSLength and DataSegmentLength are set here);
   * `data` may be a list of slices sent back to back as one data segment. `dataReleased`, if given,
   * runs once the writer no longer needs `data`: at once when it was copied (or the socket is
   * closed), else when the socket has written it (or failed).
   */
  send(bhs: Buffer, data?: Buffer | readonly Buffer[], ahs?: Buffer, dataReleased?: () => void): void {
    if (this.closed) {
      dataReleased?.();
      return;
    }
    let dataLength = 0;
    let parts: readonly Buffer[] | undefined;
    if (data !== undefined) {
      if (Buffer.isBuffer(data)) dataLength = data.length;
      else {
        parts = data;
        for (const p of data) dataLength += p.length;
      }
    }
    const ahsLength = ahs ? ahs.length : 0;
    bhs[4] = ahsLength >>> 2;
    setDataSegmentLength(bhs, dataLength);
    this.cork();
    const pad = padLength(dataLength);
    const copyData = dataLength <= COPY_MAX_BYTES;
    const headerBytes = BHS_LENGTH + ahsLength + (this.headerDigest ? 4 : 0);
    const trailerBytes = dataLength === 0 ? 0 : pad + (this.dataDigest ? 4 : 0);
    let at = this.reserve(headerBytes + (copyData ? dataLength + trailerBytes : 0));
    const stage = this.stage.bytes;
    bhs.copy(stage, at, 0, BHS_LENGTH);
    at += BHS_LENGTH;
    if (ahs) at += ahs.copy(stage, at);
    if (this.headerDigest) {
      // Header digest over BHS and AHS (§11.2.3).
      writeDigest(stage, at, ~crc32cUpdate(0xffffffff, stage, at - BHS_LENGTH - ahsLength, at) >>> 0);
      at += 4;
    }
    this.stageEnd = at;
    if (dataLength === 0) {
      dataReleased?.();
      return;
    }
    let copied = false;
    if (copyData) {
      if (parts) for (const p of parts) at += p.copy(stage, at);
      else at += (data as Buffer).copy(stage, at);
      copied = true;
    } else {
      this.handOverStage();
      if (parts) {
        // Socket writes complete in order: the last slice's callback covers all of them.
        let lastNonEmpty = parts.length - 1;
        while (parts[lastNonEmpty]!.length === 0) lastNonEmpty--;
        for (let i = 0; i <= lastNonEmpty; i++) {
          const p = parts[i]!;
          if (p.length > 0) this.write(p, i === lastNonEmpty ? dataReleased : undefined);
        }
      } else this.write(data as Buffer, dataReleased);
      at = this.reserve(trailerBytes);
    }
    if (pad > 0) {
      stage.fill(0, at, at + pad);
      at += pad;
    }
    if (this.dataDigest) {
      let crc = 0xffffffff;
      if (parts) for (const p of parts) crc = crc32cUpdate(crc, p);
      else crc = crc32cUpdate(crc, data as Buffer);
      if (pad > 0) crc = crc32cUpdate(crc, stage, at - pad, at);
      writeDigest(stage, at, ~crc >>> 0);
      at += 4;
    }
    this.stageEnd = at;
    if (copied) dataReleased?.();
  }

  /** Make room for `bytes` contiguous staged bytes; returns where they start. */
  private reserve(bytes: number): number {
    if (this.stageEnd + bytes > this.stage.bytes.length) {
      this.handOverStage();
      // Chunks still queued in the socket own their bytes: a slab is reused only when none is left.
      const full = this.stage;
      const spare = this.spare;
      this.stage =
        spare !== undefined && spare.unwritten === 0 && spare.bytes.length >= bytes
          ? spare
          : new StageSlab(Math.max(STAGE_BYTES, bytes));
      this.spare = full;
      this.stageStart = 0;
      this.stageEnd = 0;
    }
    return this.stageEnd;
  }

  /** Give the staged bytes to the socket (in order, before any slice written after them). */
  private handOverStage(): void {
    if (this.stageEnd === this.stageStart) return;
    const slab = this.stage;
    const chunk = slab.bytes.subarray(this.stageStart, this.stageEnd);
    this.stageStart = this.stageEnd;
    this.bytesWritten += chunk.length;
    slab.unwritten++;
    this.sink.write(chunk, slab.written);
  }

  private write(buf: Buffer, written?: () => void): void {
    this.bytesWritten += buf.length;
    if (written === undefined) this.sink.write(buf);
    else this.sink.write(buf, () => written());
  }
}

/** A staging buffer and the number of its chunks the socket has not written yet. */
class StageSlab {
  readonly bytes: Buffer;
  unwritten = 0;

  constructor(size: number) {
    this.bytes = Buffer.allocUnsafeSlow(size);
  }

  readonly written = (): void => {
    this.unwritten--;
  };
}
