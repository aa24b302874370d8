import { describe, expect, it } from 'vitest';
import {
  decodeScsiCommand,
  encodeDataOut,
  encodeNopOut,
  encodeScsiCommand,
  type Pdu,
} from '../../../../src/iscsi/pdu/bhs.js';
import { RESERVED_TAG } from '../../../../src/iscsi/pdu/opcodes.js';
import { FramingError, PduReader } from '../../../../src/iscsi/pdu/reader.js';
import { COPY_MAX_BYTES, PduWriter, type PduSink } from '../../../../src/iscsi/pdu/writer.js';

/** Deterministic PRNG (mulberry32) so a failing split pattern can be reproduced. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class CaptureSink implements PduSink {
  readonly chunks: Buffer[] = [];
  corks = 0;
  uncorks = 0;
  destroyed = false;
  write(chunk: Buffer): boolean {
    this.chunks.push(chunk);
    return true;
  }
  cork(): void {
    this.corks++;
  }
  uncork(): void {
    this.uncorks++;
  }
  bytes(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

interface Original {
  bhs: Buffer;
  ahs: Buffer;
  data: Buffer;
}

/** A mixed stream: SCSI commands with an Extended CDB AHS, Data-Out of odd lengths, NOP-Outs. */
function buildStream(digests: boolean): { wire: Buffer; originals: Original[]; sink: CaptureSink } {
  const sink = new CaptureSink();
  const writer = new PduWriter(sink);
  writer.headerDigest = digests;
  writer.dataDigest = digests;
  const originals: Original[] = [];
  const lengths = [0, 1, 2, 3, 4, 5, 7, 8, 47, 48, 49, 511, 512, 513, 4095, 8192];
  let itt = 1;
  for (const len of lengths) {
    const data = Buffer.alloc(len);
    for (let i = 0; i < len; i++) data[i] = (i * 31 + len) & 0xff;
    const cdb = Buffer.alloc(32);
    for (let i = 0; i < 32; i++) cdb[i] = 0x80 + i;
    const cmd = encodeScsiCommand({
      immediate: false,
      final: true,
      read: false,
      write: true,
      taskAttribute: 1,
      lun: 3,
      itt: itt++,
      expectedDataLength: len,
      cmdSN: itt,
      expStatSN: 0,
      cdb,
    });
    writer.send(cmd.bhs, data, cmd.ahs);
    originals.push({ bhs: Buffer.from(cmd.bhs), ahs: Buffer.from(cmd.ahs!), data });
    const out = encodeDataOut({ final: true, lun: 3, itt, ttt: 7, expStatSN: 0, dataSN: 0, bufferOffset: 0 });
    writer.send(out, [data.subarray(0, len >> 1), data.subarray(len >> 1)]);
    originals.push({ bhs: Buffer.from(out), ahs: Buffer.alloc(0), data });
    const nop = encodeNopOut({ immediate: true, lun: 0, itt: RESERVED_TAG, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 });
    writer.send(nop);
    originals.push({ bhs: Buffer.from(nop), ahs: Buffer.alloc(0), data: Buffer.alloc(0) });
  }
  writer.flushNow(); // staged PDUs to the sink now (the writer would at the end of the turn)
  return { wire: sink.bytes(), originals, sink };
}

function collect(digests: boolean, maxData = 65536) {
  const pdus: Pdu[] = [];
  const digestErrors: Pdu[] = [];
  const framingErrors: FramingError[] = [];
  const reader = new PduReader(
    {
      onPdu: (p) => pdus.push(p),
      onDataDigestError: (p) => digestErrors.push(p),
      onFramingError: (e) => framingErrors.push(e),
    },
    { headerDigest: digests, dataDigest: digests, maxDataSegmentLength: maxData },
  );
  return { reader, pdus, digestErrors, framingErrors };
}

describe('PDU reader framing', () => {
  for (const digests of [false, true]) {
    it(`reassembles every PDU across arbitrary chunk splits (digests ${digests ? 'on' : 'off'})`, () => {
      const { wire, originals } = buildStream(digests);
      for (let seed = 1; seed <= 40; seed++) {
        const rand = prng(seed);
        const { reader, pdus, digestErrors, framingErrors } = collect(digests);
        let off = 0;
        while (off < wire.length) {
          // Mix of tiny (1-byte), mid and large chunks.
          const r = rand();
          const size = r < 0.3 ? 1 + Math.floor(rand() * 3) : r < 0.8 ? 1 + Math.floor(rand() * 100) : 1 + Math.floor(rand() * 20000);
          // Each chunk is a fresh buffer, as the socket delivers them.
          reader.push(Buffer.from(wire.subarray(off, Math.min(wire.length, off + size))));
          off += size;
        }
        expect(framingErrors).toEqual([]);
        expect(digestErrors).toEqual([]);
        expect(pdus.length).toBe(originals.length);
        pdus.forEach((p, i) => {
          expect(p.bhs.equals(originals[i]!.bhs)).toBe(true);
          expect(p.ahs.equals(originals[i]!.ahs)).toBe(true);
          expect(p.data.equals(originals[i]!.data)).toBe(true);
        });
        expect(reader.bufferedBytes).toBe(0);
      }
    });
  }

  it('decodes the Extended CDB AHS into a 32-byte CDB', () => {
    const { wire } = buildStream(true);
    const { reader, pdus } = collect(true);
    reader.push(wire);
    const cmd = decodeScsiCommand(pdus[0]!);
    expect(cmd.cdb.length).toBe(32);
    expect([...cmd.cdb]).toEqual(Array.from({ length: 32 }, (_, i) => 0x80 + i));
    expect(cmd.lun).toBe(3);
  });

  it('never rewrites buffers it handed out (data stays valid after later chunks)', () => {
    const { wire, originals } = buildStream(false);
    const { reader, pdus } = collect(false);
    for (let off = 0; off < wire.length; off += 37) reader.push(Buffer.from(wire.subarray(off, off + 37)));
    pdus.forEach((p, i) => expect(p.data.equals(originals[i]!.data)).toBe(true));
  });

  it('reports a data digest error, discards that PDU and keeps framing', () => {
    const { wire, originals } = buildStream(true);
    const corrupted = Buffer.from(wire);
    // First PDU: BHS 48 + AHS 20 + header digest 4 = 72, then data (length 0) → second PDU (Data-Out len 0),
    // third NOP; the 4th PDU (SCSI command with 1 data byte) starts after three PDUs; find it by parsing.
    const { reader: probe, pdus: probePdus } = collect(true);
    probe.push(wire);
    const target = probePdus[3]!; // SCSI command with 1 byte of immediate data
    expect(target.data.length).toBe(1);
    const dataOffset = target.data.byteOffset - wire.byteOffset;
    corrupted[dataOffset] = corrupted[dataOffset]! ^ 0xff;
    const { reader, pdus, digestErrors, framingErrors } = collect(true);
    reader.push(corrupted);
    expect(framingErrors).toEqual([]);
    expect(digestErrors.length).toBe(1);
    expect(digestErrors[0]!.bhs.equals(originals[3]!.bhs)).toBe(true);
    expect(pdus.length).toBe(originals.length - 1);
  });

  it('stops with a header-digest framing error when a header is corrupted', () => {
    const { wire } = buildStream(true);
    const corrupted = Buffer.from(wire);
    corrupted[20] = corrupted[20]! ^ 1;
    const { reader, pdus, framingErrors } = collect(true);
    reader.push(corrupted);
    expect(pdus.length).toBe(0);
    expect(framingErrors.map((e) => e.kind)).toEqual(['header-digest']);
    expect(reader.isStopped).toBe(true);
  });

  it('refuses a data segment longer than our MaxRecvDataSegmentLength before buffering it', () => {
    const { wire } = buildStream(false);
    const { reader, pdus, framingErrors } = collect(false, 4096);
    // Only the header of the oversized PDU arrives: the error must come without waiting for data.
    reader.push(wire.subarray(0, 200_000));
    expect(framingErrors.length).toBe(1);
    expect(framingErrors[0]!.kind).toBe('data-segment-too-long');
    expect(framingErrors[0]!.bhs.length).toBe(48);
    expect(pdus.length).toBeGreaterThan(0);
    expect(pdus.every((p) => p.data.length <= 4096)).toBe(true);
  });
});

/** Split a byte stream into PDUs with the reader (every PDU must be complete). */
function splitPdus(wire: Buffer, digests: boolean): Pdu[] {
  const { reader, pdus, digestErrors, framingErrors } = collect(digests, 1 << 24);
  reader.push(wire);
  expect(framingErrors).toEqual([]);
  expect(digestErrors).toEqual([]);
  expect(reader.bufferedBytes).toBe(0);
  return pdus;
}

describe('PDU writer', () => {
  it('corks once per event-loop turn and passes large payload slices through without copying', async () => {
    const sink = new CaptureSink();
    const writer = new PduWriter(sink);
    const slice = COPY_MAX_BYTES + 500;
    const payload = Buffer.alloc(4 * slice, 0x5a);
    writer.burst(() => {
      for (let i = 0; i < 4; i++) {
        writer.send(encodeNopOut({ immediate: true, lun: 0, itt: i, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }), payload.subarray(i * slice, (i + 1) * slice));
      }
    });
    writer.send(encodeNopOut({ immediate: true, lun: 0, itt: 9, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }));
    expect(sink.corks).toBe(1);
    expect(sink.uncorks).toBe(0); // still collecting this turn's PDUs
    await new Promise((resolve) => setImmediate(resolve));
    expect(sink.uncorks).toBe(1);
    const shared = sink.chunks.filter((c) => c.buffer === payload.buffer);
    expect(shared.length).toBe(4);
    expect(shared.map((c) => c.byteOffset - payload.byteOffset)).toEqual([0, slice, 2 * slice, 3 * slice]);
    // Headers and the data-less PDU are staged: header, slice, header, slice, ..., last header.
    expect(sink.chunks.length).toBe(9);
    const pdus = splitPdus(sink.bytes(), false);
    expect(pdus.map((p) => p.bhs.readUInt32BE(16))).toEqual([0, 1, 2, 3, 9]);
  });

  it('stages small PDUs of one turn into a single chunk, and a reused BHS buffer does not alter sent PDUs', async () => {
    const sink = new CaptureSink();
    const writer = new PduWriter(sink);
    const bhs = Buffer.alloc(48);
    for (let i = 0; i < 40; i++) {
      encodeNopOut({ immediate: true, lun: 0, itt: i, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }).copy(bhs);
      writer.send(bhs, Buffer.alloc(4096 + (i % 4), i)); // data ≤ COPY_MAX_BYTES: copied
    }
    expect(sink.chunks.length).toBe(0); // nothing handed over before the turn ends
    await new Promise((resolve) => setImmediate(resolve));
    expect(sink.chunks.length).toBe(1); // 40 PDUs of ~4 KiB fit one 256 KiB slab
    const pdus = splitPdus(sink.bytes(), false);
    expect(pdus.length).toBe(40);
    pdus.forEach((p, i) => {
      expect(p.bhs.readUInt32BE(16)).toBe(i);
      expect(p.data.length).toBe(4096 + (i % 4));
      expect(p.data.every((b) => b === i)).toBe(true);
    });
  });

  it('never rewrites a staged chunk the socket has not written, and reuses a slab once it has', async () => {
    const pending: Array<() => void> = [];
    const handed: Array<{ chunk: Buffer; copy: Buffer }> = [];
    const sink: PduSink = {
      destroyed: false,
      cork: () => undefined,
      uncork: () => undefined,
      write(chunk: Buffer, done?: (err?: Error | null) => void): boolean {
        handed.push({ chunk, copy: Buffer.from(chunk) });
        if (done) pending.push(done);
        return true;
      },
    };
    const writer = new PduWriter(sink);
    const sendTurn = async (tag: number): Promise<void> => {
      for (let i = 0; i < 40; i++) {
        writer.send(encodeNopOut({ immediate: true, lun: 0, itt: tag * 100 + i, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }), Buffer.alloc(4096, (tag + i) & 0xff));
      }
      await new Promise((resolve) => setImmediate(resolve));
    };
    // Six turns of ~166 KiB without any write completing: slabs fill up and must not be rewritten.
    for (let turn = 0; turn < 6; turn++) await sendTurn(turn);
    expect(handed.every((h) => h.chunk.equals(h.copy))).toBe(true);
    const slabsWhilePending = new Set(handed.map((h) => h.chunk.buffer)).size;
    expect(slabsWhilePending).toBeGreaterThanOrEqual(4);
    // The socket catches up: from now on the writer alternates between two slabs.
    for (const done of pending.splice(0)) done();
    const before = handed.length;
    for (let turn = 6; turn < 12; turn++) {
      await sendTurn(turn);
      for (const done of pending.splice(0)) done();
    }
    const later = handed.slice(before);
    expect(new Set(later.map((h) => h.chunk.buffer)).size).toBeLessThanOrEqual(3);
    // Every PDU arrived intact and in order.
    const pdus = splitPdus(Buffer.concat(handed.map((h) => h.copy)), false);
    expect(pdus.length).toBe(12 * 40);
    pdus.forEach((p, n) => {
      const turn = Math.floor(n / 40);
      const i = n % 40;
      expect(p.bhs.readUInt32BE(16)).toBe(turn * 100 + i);
      expect(p.data.every((b) => b === ((turn + i) & 0xff))).toBe(true);
    });
  });

  it('large zero-copy segments keep padding and digests in order (header and data digests on)', async () => {
    const sink = new CaptureSink();
    const writer = new PduWriter(sink);
    writer.headerDigest = true;
    writer.dataDigest = true;
    const sizes = [COPY_MAX_BYTES + 1, COPY_MAX_BYTES + 2, 100, COPY_MAX_BYTES + 3, 3 * COPY_MAX_BYTES];
    const payloads = sizes.map((n, k) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 13 + k) & 0xff)));
    payloads.forEach((data, k) => {
      const half = data.length >> 1;
      const body = k % 2 === 0 ? data : [data.subarray(0, half), data.subarray(half)];
      writer.send(encodeNopOut({ immediate: true, lun: 0, itt: k, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }), body);
    });
    await new Promise((resolve) => setImmediate(resolve));
    const pdus = splitPdus(sink.bytes(), true); // fails on any digest or framing error
    expect(pdus.map((p) => p.bhs.readUInt32BE(16))).toEqual([0, 1, 2, 3, 4]);
    pdus.forEach((p, k) => expect(p.data.equals(payloads[k]!)).toBe(true));
  });

  it('pads data segments to 4 bytes and sets DataSegmentLength to the unpadded length', async () => {
    const sink = new CaptureSink();
    const writer = new PduWriter(sink);
    writer.send(encodeNopOut({ immediate: true, lun: 0, itt: 1, ttt: RESERVED_TAG, cmdSN: 0, expStatSN: 0 }), Buffer.from('abcde'));
    await new Promise((resolve) => setImmediate(resolve));
    const bytes = sink.bytes();
    expect(bytes.length).toBe(48 + 8);
    expect(bytes.readUIntBE(5, 3)).toBe(5);
    expect(bytes.subarray(48).toString('latin1')).toBe('abcde\0\0\0');
  });
});
