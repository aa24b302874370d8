/** Zero-byte checks shared by every layer (backup writer, mounted LUNs, the SCSI layer). */

const ZERO_PAGE = Buffer.alloc(64 * 1024);

/** True if every byte of `data` is zero (compared 64 KiB at a time against a shared zero page, no allocation). */
export function isAllZero(data: Buffer): boolean {
  for (let at = 0; at < data.length; at += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, data.length - at);
    if (data.compare(ZERO_PAGE, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}
