import { LRUCache } from 'lru-cache';

/**
 * A byte-bounded LRU of buffers keyed by number (file offset), with single-flight loading:
 * concurrent requests for the same key share one load. Used for qcow2 L2 tables, VMDK grain
 * tables and decompressed clusters/grains.
 */
export class BufferCache {
  private readonly lru: LRUCache<number, Buffer>;
  private readonly loading = new Map<number, Promise<Buffer>>();

  constructor(maxBytes: number) {
    this.lru = new LRUCache<number, Buffer>({ maxSize: maxBytes, sizeCalculation: (value) => Math.max(1, value.length) });
  }

  /** The cached value, if any (synchronous: lets hot loops skip an await). */
  peek(key: number): Buffer | undefined {
    return this.lru.get(key);
  }

  get(key: number, load: () => Promise<Buffer>): Promise<Buffer> {
    const cached = this.lru.get(key);
    if (cached !== undefined) return Promise.resolve(cached);
    const pending = this.loading.get(key);
    if (pending !== undefined) return pending;
    const promise = load().then(
      (value) => {
        this.loading.delete(key);
        this.lru.set(key, value);
        return value;
      },
      (err: unknown) => {
        this.loading.delete(key);
        throw err;
      },
    );
    this.loading.set(key, promise);
    return promise;
  }

  clear(): void {
    this.lru.clear();
  }
}
