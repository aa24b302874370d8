/**
 * The one pseudo-random generator of tests and benches: xorshift32 (Marsaglia 2003). Deterministic,
 * so failures reproduce and bench images are the same in every run.
 */

/** A stream of 32-bit unsigned integers from `seed` (taken mod 2^32; 0 becomes 1, xorshift's fixed point). */
export function xorshift32(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

/** `length` pseudo-random bytes from `seed`: the stream's words, little-endian. */
export function pseudoRandomBytes(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  const next = xorshift32(seed);
  for (let i = 0; i < length; i += 4) {
    const x = next();
    if (i + 4 <= length) out.writeUInt32LE(x, i);
    else for (let k = 0; i + k < length; k++) out[i + k] = (x >>> (8 * k)) & 0xff;
  }
  return out;
}
