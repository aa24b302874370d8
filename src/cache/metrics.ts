/**
 * Per-LUN counters and latency histograms, rendered in the Prometheus text exposition format
 * (version 0.0.4). Counters are plain numbers updated on the hot path; rendering happens on scrape.
 */
import type { ChunkCacheStats } from './chunk-cache.js';

/** Upper bounds (seconds) of the latency buckets; +Inf is implicit. */
export const LATENCY_BUCKETS_SECONDS: readonly number[] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
];

export class LatencyHistogram {
  /** counts[i]: observations ≤ LATENCY_BUCKETS_SECONDS[i] and > the previous bound; last slot: +Inf. */
  readonly counts = new Array<number>(LATENCY_BUCKETS_SECONDS.length + 1).fill(0);
  count = 0;
  sumSeconds = 0;

  observe(seconds: number): void {
    let i = 0;
    while (i < LATENCY_BUCKETS_SECONDS.length && seconds > LATENCY_BUCKETS_SECONDS[i]!) i++;
    this.counts[i]!++;
    this.count++;
    this.sumSeconds += seconds;
  }
}

/** Counters of one LUN (one BackupBlockDevice). */
export class DeviceMetrics {
  reads = 0;
  writes = 0;
  flushes = 0;
  unmaps = 0;
  readErrors = 0;
  writeErrors = 0;
  bytesRead = 0;
  bytesWritten = 0;
  cacheHits = 0;
  cacheMisses = 0;
  chunksLoaded = 0;
  bytesDecompressed = 0;
  readAheadChunks = 0;
  /** Reads / writes started and not yet finished (a stuck request shows here). */
  readsInFlight = 0;
  writesInFlight = 0;
  readonly readLatency = new LatencyHistogram();
  readonly writeLatency = new LatencyHistogram();
}

/** What one LUN contributes to a scrape. */
export interface LunMetricsSource {
  /** Labels identifying the LUN, e.g. { target: 'iqn…', lun: '0', mount: 'vm1@2026-…' }. */
  readonly labels: Readonly<Record<string, string>>;
  readonly metrics: DeviceMetrics;
  /** Bytes currently held in the LUN's delta (present units × unit size). */
  readonly deltaBytes?: number;
  /** The LUN's delta refuses writes (docs/delta-format.md "A full file system, a failing disk"). */
  readonly refusingWrites?: boolean;
}

/** Render LUN metrics and (optionally) the process-wide chunk cache statistics. */
export function renderPrometheus(luns: ReadonlyArray<LunMetricsSource>, cache?: ChunkCacheStats): string {
  const out: string[] = [];
  const counter = (name: string, help: string, pick: (m: DeviceMetrics) => number): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} counter`);
    for (const l of luns) out.push(`${name}${labelText(l.labels)} ${formatNumber(pick(l.metrics))}`);
  };
  counter('bootrestore_lun_reads_total', 'READ commands served.', (m) => m.reads);
  counter('bootrestore_lun_writes_total', 'WRITE commands stored in the delta.', (m) => m.writes);
  counter('bootrestore_lun_flushes_total', 'SYNCHRONIZE CACHE commands.', (m) => m.flushes);
  counter('bootrestore_lun_unmaps_total', 'UNMAP / WRITE SAME (unmap) calls.', (m) => m.unmaps);
  counter('bootrestore_lun_read_errors_total', 'Reads that failed (e.g. corrupt chunk).', (m) => m.readErrors);
  counter('bootrestore_lun_write_errors_total', 'Writes that failed.', (m) => m.writeErrors);
  counter('bootrestore_lun_read_bytes_total', 'Bytes read by initiators.', (m) => m.bytesRead);
  counter('bootrestore_lun_written_bytes_total', 'Bytes written by initiators.', (m) => m.bytesWritten);
  counter('bootrestore_lun_cache_hits_total', 'Chunk lookups served from the cache.', (m) => m.cacheHits);
  counter('bootrestore_lun_cache_misses_total', 'Chunk lookups that had to load (or join a load).', (m) => m.cacheMisses);
  counter('bootrestore_lun_chunks_loaded_total', 'Chunks this LUN loaded from the repository.', (m) => m.chunksLoaded);
  counter('bootrestore_lun_decompressed_bytes_total', 'Bytes decompressed for this LUN.', (m) => m.bytesDecompressed);
  counter('bootrestore_lun_readahead_chunks_total', 'Chunks prefetched by sequential read-ahead.', (m) => m.readAheadChunks);

  out.push('# HELP bootrestore_lun_delta_bytes Bytes of the LUN held in its write delta.', '# TYPE bootrestore_lun_delta_bytes gauge');
  for (const l of luns) out.push(`bootrestore_lun_delta_bytes${labelText(l.labels)} ${formatNumber(l.deltaBytes ?? 0)}`);
  out.push(
    '# HELP bootrestore_lun_delta_refusing_writes 1 while the delta refuses writes (after a failed journal write until a checkpoint succeeds, after a failed sync until it is opened again).',
    '# TYPE bootrestore_lun_delta_refusing_writes gauge',
  );
  for (const l of luns) out.push(`bootrestore_lun_delta_refusing_writes${labelText(l.labels)} ${l.refusingWrites ? 1 : 0}`);
  out.push('# HELP bootrestore_lun_requests_in_flight Reads and writes started and not finished.', '# TYPE bootrestore_lun_requests_in_flight gauge');
  for (const l of luns) {
    out.push(`bootrestore_lun_requests_in_flight${labelText(l.labels, ['op', 'read'])} ${l.metrics.readsInFlight}`);
    out.push(`bootrestore_lun_requests_in_flight${labelText(l.labels, ['op', 'write'])} ${l.metrics.writesInFlight}`);
  }

  const histogram = (name: string, help: string, pick: (m: DeviceMetrics) => LatencyHistogram): void => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} histogram`);
    for (const l of luns) {
      const h = pick(l.metrics);
      let cumulative = 0;
      for (let i = 0; i < LATENCY_BUCKETS_SECONDS.length; i++) {
        cumulative += h.counts[i]!;
        out.push(`${name}_bucket${labelText(l.labels, ['le', String(LATENCY_BUCKETS_SECONDS[i])])} ${cumulative}`);
      }
      out.push(`${name}_bucket${labelText(l.labels, ['le', '+Inf'])} ${h.count}`);
      out.push(`${name}_sum${labelText(l.labels)} ${formatNumber(h.sumSeconds)}`);
      out.push(`${name}_count${labelText(l.labels)} ${h.count}`);
    }
  };
  histogram('bootrestore_lun_read_latency_seconds', 'Latency of BlockDevice.read.', (m) => m.readLatency);
  histogram('bootrestore_lun_write_latency_seconds', 'Latency of BlockDevice.write.', (m) => m.writeLatency);

  if (cache !== undefined) {
    const gauge = (name: string, help: string, value: number, type: 'gauge' | 'counter'): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, `${name} ${formatNumber(value)}`);
    };
    gauge('bootrestore_cache_max_bytes', 'Configured chunk cache size.', cache.maxBytes, 'gauge');
    gauge('bootrestore_cache_bytes', 'Bytes of decompressed chunks in the cache.', cache.bytes, 'gauge');
    gauge('bootrestore_cache_entries', 'Chunks in the cache.', cache.entries, 'gauge');
    gauge('bootrestore_cache_shared_entries', 'Cached chunks used by two or more mounts.', cache.sharedEntries, 'gauge');
    gauge('bootrestore_cache_hits_total', 'Cache hits.', cache.hits, 'counter');
    gauge('bootrestore_cache_misses_total', 'Cache misses.', cache.misses, 'counter');
    gauge('bootrestore_cache_loads_total', 'Chunk loads started.', cache.loads, 'counter');
    gauge('bootrestore_cache_load_failures_total', 'Chunk loads that failed.', cache.loadFailures, 'counter');
    gauge('bootrestore_cache_decompressed_bytes_total', 'Bytes decompressed into the cache.', cache.bytesDecompressed, 'counter');
    gauge('bootrestore_cache_evictions_total', 'Entries evicted to stay within the size bound.', cache.evictions, 'counter');
    gauge('bootrestore_cache_prefetch_loads_total', 'Read-ahead loads started.', cache.prefetchLoads, 'counter');
    gauge('bootrestore_cache_prefetch_hits_total', 'Prefetched chunks that were later read.', cache.prefetchHits, 'counter');
    gauge('bootrestore_cache_cross_mount_hits_total', 'Hits on a chunk loaded by another mount.', cache.crossMountHits, 'counter');
    gauge('bootrestore_cache_recycled_buffers_total', 'Chunk loads that read into a recycled or preallocated buffer instead of new memory.', cache.recycledBuffers, 'counter');
    gauge('bootrestore_cache_preallocated_bytes', 'Cache memory reserved and faulted in at start (cache.preallocate).', cache.preallocatedBytes, 'gauge');
  }
  return out.join('\n') + '\n';
}

function labelText(labels: Readonly<Record<string, string>>, extra?: [string, string]): string {
  const parts: string[] = [];
  for (const [k, v] of Object.entries(labels)) parts.push(`${sanitizeLabelName(k)}="${escapeLabelValue(v)}"`);
  if (extra !== undefined) parts.push(`${extra[0]}="${escapeLabelValue(extra[1])}"`);
  return parts.length === 0 ? '' : `{${parts.join(',')}}`;
}

function sanitizeLabelName(name: string): string {
  const cleaned = name.replace(/[^a-zA-Z0-9_]/g, '_');
  return /^[a-zA-Z_]/.test(cleaned) ? cleaned : `_${cleaned}`;
}

/** Label values escape backslash, double quote and newline (exposition format). */
function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function formatNumber(n: number): string {
  if (Number.isNaN(n)) return 'NaN';
  if (n === Infinity) return '+Inf';
  if (n === -Infinity) return '-Inf';
  return String(n);
}
