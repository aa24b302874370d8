/**
 * Text key=value data (RFC 7143 §6.1): UTF-8 `key=value` pairs, each terminated by one NUL byte.
 * Keys: letters, digits, `.` `-` `+` `@` `_`, at most 63 bytes (§6.1). Values: at most 255 bytes
 * unless a key allows more (8192 for some, §6.1). Parsing never throws: malformed text is reported.
 */

export interface TextPair {
  readonly key: string;
  readonly value: string;
}

export type TextParseResult =
  | { readonly ok: true; readonly pairs: readonly TextPair[] }
  | { readonly ok: false; readonly reason: string };

const KEY_PATTERN = /^[A-Za-z0-9.\-+@_]{1,63}$/;
/** Values longer than this are a protocol error for every key (§6.1 allows 8192 for a few keys). */
const MAX_VALUE_BYTES = 8192;

/**
 * `allowRepeatedKeys`: SendTargets responses repeat TargetAddress (§13.3); negotiation text must not
 * repeat a key (§6.2).
 */
export function parseText(data: Buffer, allowRepeatedKeys = false): TextParseResult {
  const pairs: TextPair[] = [];
  const seen = new Set<string>();
  let start = 0;
  // Trailing padding NULs may follow the last pair; empty entries are skipped.
  while (start < data.length) {
    let end = data.indexOf(0, start);
    if (end < 0) end = data.length; // tolerate a missing final NUL
    if (end > start) {
      const eq = data.indexOf(0x3d, start); // '='
      if (eq < 0 || eq >= end) return { ok: false, reason: `key without '=': ${data.toString('latin1', start, Math.min(end, start + 64))}` };
      const key = data.toString('utf8', start, eq);
      if (!KEY_PATTERN.test(key)) return { ok: false, reason: `invalid key name: ${key.slice(0, 64)}` };
      if (end - eq - 1 > MAX_VALUE_BYTES) return { ok: false, reason: `value of ${key} too long` };
      if (!allowRepeatedKeys && seen.has(key)) return { ok: false, reason: `key ${key} sent twice` };
      seen.add(key);
      pairs.push({ key, value: data.toString('utf8', eq + 1, end) });
    }
    start = end + 1;
  }
  return { ok: true, pairs };
}

export function encodeText(pairs: readonly TextPair[]): Buffer {
  if (pairs.length === 0) return Buffer.alloc(0);
  return Buffer.from(pairs.map((p) => `${p.key}=${p.value}\0`).join(''), 'utf8');
}
