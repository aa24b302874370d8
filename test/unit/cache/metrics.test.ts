import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openBackupDevice } from '../../../src/cache/backup-device.js';
import { ChunkCache } from '../../../src/cache/chunk-cache.js';
import { DeviceMetrics, LATENCY_BUCKETS_SECONDS, renderPrometheus } from '../../../src/cache/metrics.js';
import { silentLogger } from '../../../src/log.js';
import { FakeRestorePoint, patternBytes } from '../../helpers/fake-restore-point.js';

let scratch: string;
beforeAll(async () => {
  scratch = await mkdtemp(join(tmpdir(), 'bootrestore-metrics-'));
});
afterAll(async () => {
  await rm(scratch, { recursive: true, force: true });
});

/** Parse exposition text into sample name+labels → value (fails on malformed sample lines). */
function parseSamples(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('# HELP ') || line.startsWith('# TYPE ')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})?) (\S+)$/.exec(line);
    if (m === null) throw new Error(`malformed sample line: ${line}`);
    samples.set(m[1]!, Number(m[2]));
  }
  return samples;
}

describe('metrics', () => {
  it('counts a device\'s I/O and renders valid Prometheus text with cumulative histograms', async () => {
    const point = await FakeRestorePoint.create({ imageSize: 1024 * 1024, chunkSize: 256 * 1024, content: (i, len) => (i === 1 ? null : patternBytes(len, i)) });
    const cache = new ChunkCache({ maxBytes: 4 * 1024 * 1024, logger: silentLogger() });
    const metrics = new DeviceMetrics();
    const dev = await openBackupDevice({
      reader: point,
      cache,
      deltaDir: join(scratch, 'd'),
      mountId: 'm1',
      identity: { serial: 'M1', naa: Buffer.alloc(8, 2), vendor: 'BOOTREST', product: 'metrics' },
      logger: silentLogger(),
      metrics,
      readAheadChunks: 0,
    });
    try {
      await dev.read(0, 8); // miss, loads chunk 0
      await dev.read(8, 8); // hit
      await dev.read(512, 8); // zero chunk: no lookup
      await dev.write(16, Buffer.alloc(1024, 1), { fua: true });
      await dev.flush();
      await dev.unmap([{ lba: 1024, blocks: 8 }]);
      const text = renderPrometheus(
        [{ labels: { target: 'iqn.2026-12.test:t1', lun: '0', note: 'a "quoted"\\ value' }, metrics, deltaBytes: dev.stats().delta!.deltaBytes }],
        cache.stats(),
      );
      const s = parseSamples(text);
      const l = '{target="iqn.2026-12.test:t1",lun="0",note="a \\"quoted\\"\\\\ value"}';
      expect(s.get(`bootrestore_lun_reads_total${l}`)).toBe(3);
      expect(s.get(`bootrestore_lun_writes_total${l}`)).toBe(1);
      expect(s.get(`bootrestore_lun_read_bytes_total${l}`)).toBe(3 * 4096);
      expect(s.get(`bootrestore_lun_written_bytes_total${l}`)).toBe(1024);
      // Miss: the first read of chunk 0. Hits: the second read, and the base fill of the 1 KiB write's unit.
      expect(s.get(`bootrestore_lun_cache_hits_total${l}`)).toBe(2);
      expect(s.get(`bootrestore_lun_cache_misses_total${l}`)).toBe(1);
      expect(s.get(`bootrestore_lun_chunks_loaded_total${l}`)).toBe(1);
      expect(s.get(`bootrestore_lun_decompressed_bytes_total${l}`)).toBe(256 * 1024);
      // One 4 KiB unit holds data (the write, filled to a whole unit); the unmapped unit holds none.
      expect(s.get(`bootrestore_lun_delta_bytes${l}`)).toBe(4096);
      expect(s.get(`bootrestore_lun_delta_refusing_writes${l}`)).toBe(0);
      const refusing = parseSamples(renderPrometheus([{ labels: { lun: '1' }, metrics: new DeviceMetrics(), refusingWrites: true }]));
      expect(refusing.get('bootrestore_lun_delta_refusing_writes{lun="1"}')).toBe(1);
      expect(s.get(`bootrestore_lun_flushes_total${l}`)).toBe(1);
      expect(s.get(`bootrestore_lun_requests_in_flight${l.slice(0, -1)},op="read"}`)).toBe(0);
      expect(s.get(`bootrestore_lun_requests_in_flight${l.slice(0, -1)},op="write"}`)).toBe(0);
      expect(s.get(`bootrestore_lun_unmaps_total${l}`)).toBe(1);
      // Histogram: cumulative, +Inf equals count.
      let previous = 0;
      for (const le of LATENCY_BUCKETS_SECONDS) {
        const v = s.get(`bootrestore_lun_read_latency_seconds_bucket${l.slice(0, -1)},le="${le}"}`)!;
        expect(v).toBeGreaterThanOrEqual(previous);
        previous = v;
      }
      expect(s.get(`bootrestore_lun_read_latency_seconds_bucket${l.slice(0, -1)},le="+Inf"}`)).toBe(3);
      expect(s.get(`bootrestore_lun_read_latency_seconds_count${l}`)).toBe(3);
      expect(s.get(`bootrestore_lun_write_latency_seconds_count${l}`)).toBe(1);
      expect(s.get('bootrestore_cache_loads_total')).toBe(1);
      expect(s.get('bootrestore_cache_bytes')).toBe(256 * 1024);
      expect(text).toContain('# TYPE bootrestore_lun_read_latency_seconds histogram');
    } finally {
      await dev.close();
    }
  });
});
