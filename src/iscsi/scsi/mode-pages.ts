/**
 * Mode pages (SPC-4 7.5, SBC-3 6.4) of one logical unit: current values, the changeable mask and
 * defaults, and the MODE SENSE / MODE SELECT parameter-list encoding (SPC-4 7.5.4 - 7.5.6).
 */

export const enum ModePageCode {
  ReadWriteErrorRecovery = 0x01,
  Caching = 0x08,
  Control = 0x0a,
  InformationalExceptions = 0x1c,
  AllPages = 0x3f,
}

interface ModePageDefinition {
  readonly code: number;
  /** Default (= initial current) value, header included. */
  readonly defaults: readonly number[];
  /** Bits MODE SELECT may change, header bytes zero. */
  readonly changeable: readonly number[];
}

/** Pages in ascending page-code order, as MODE SENSE page 0x3F returns them (SPC-4 7.5.6). */
const PAGE_DEFINITIONS: readonly ModePageDefinition[] = [
  {
    // SBC-3 6.4.7 read-write error recovery: no retries worth reporting, nothing changeable.
    code: ModePageCode.ReadWriteErrorRecovery,
    defaults: [0x01, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    changeable: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  },
  {
    // SBC-3 6.4.5 caching: WCE=1 (byte 2 bit 2), changeable; WCE=0 turns every write into FUA.
    code: ModePageCode.Caching,
    defaults: [0x08, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    changeable: [0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  },
  {
    // SPC-4 7.5.8 control: D_SENSE (byte 2 bit 2) and SWP (byte 4 bit 3) changeable;
    // BUSY TIMEOUT PERIOD unlimited (bytes 8-9).
    code: ModePageCode.Control,
    defaults: [0x0a, 0x0a, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0],
    changeable: [0, 0, 0x04, 0, 0x08, 0, 0, 0, 0, 0, 0, 0],
  },
  {
    // SPC-4 7.5.11 informational exceptions control: DEXCPT=1 (byte 2 bit 3), MRIE 0.
    code: ModePageCode.InformationalExceptions,
    defaults: [0x1c, 0x0a, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    changeable: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  },
];

export const enum PageControl {
  Current = 0,
  Changeable = 1,
  Default = 2,
  Saved = 3,
}

export type ModeSelectResult =
  | { readonly ok: true; readonly changed: boolean }
  | { readonly ok: false; readonly kind: 'field'; readonly byte: number; readonly bit?: number }
  | { readonly ok: false; readonly kind: 'length' };

export class ModePages {
  private readonly current = new Map<number, Buffer>();

  constructor() {
    for (const def of PAGE_DEFINITIONS) this.current.set(def.code, Buffer.from(def.defaults));
  }

  /** D_SENSE: report sense in descriptor format (SPC-4 7.5.8). */
  get descriptorSense(): boolean {
    return (this.current.get(ModePageCode.Control)![2]! & 0x04) !== 0;
  }

  /** SWP: software write protect (SPC-4 7.5.8). */
  get softwareWriteProtect(): boolean {
    return (this.current.get(ModePageCode.Control)![4]! & 0x08) !== 0;
  }

  /** WCE: write cache enabled (SBC-3 6.4.5). */
  get writeCacheEnabled(): boolean {
    return (this.current.get(ModePageCode.Caching)![2]! & 0x04) !== 0;
  }

  /** Whether `code` (0x3F = all) is a page we have. */
  static hasPage(code: number): boolean {
    return code === ModePageCode.AllPages || PAGE_DEFINITIONS.some((d) => d.code === code);
  }

  /** The page bytes for MODE SENSE; `code` 0x3F returns every page concatenated. */
  pages(code: number, control: PageControl): Buffer {
    const parts: Buffer[] = [];
    for (const def of PAGE_DEFINITIONS) {
      if (code !== ModePageCode.AllPages && def.code !== code) continue;
      if (control === PageControl.Changeable) {
        const page = Buffer.from(def.changeable);
        page[0] = def.code;
        page[1] = def.defaults[1]!;
        parts.push(page);
      } else if (control === PageControl.Default) {
        parts.push(Buffer.from(def.defaults));
      } else {
        parts.push(Buffer.from(this.current.get(def.code)!));
      }
    }
    return Buffer.concat(parts);
  }

  /**
   * Apply MODE SELECT pages (`data` = the page part of the parameter list, `offset` = where it starts
   * in the whole list, for field pointers). A page may change only changeable bits (SPC-4 7.5.4);
   * anything else is rejected and nothing is applied.
   */
  select(data: Buffer, offset: number): ModeSelectResult {
    const updates: Array<{ code: number; value: Buffer }> = [];
    let at = 0;
    while (at < data.length) {
      if (at + 2 > data.length) return { ok: false, kind: 'length' };
      const code = data[at]! & 0x3f;
      if ((data[at]! & 0x40) !== 0) return { ok: false, kind: 'field', byte: offset + at, bit: 6 }; // SPF: no subpages
      const def = PAGE_DEFINITIONS.find((d) => d.code === code);
      if (def === undefined) return { ok: false, kind: 'field', byte: offset + at, bit: 5 };
      const length = data[at + 1]!;
      if (length !== def.defaults[1]) return { ok: false, kind: 'field', byte: offset + at + 1 };
      if (at + 2 + length > data.length) return { ok: false, kind: 'length' };
      const cur = updates.find((u) => u.code === code)?.value ?? this.current.get(code)!;
      const next = Buffer.from(cur);
      for (let i = 2; i < 2 + length; i++) {
        const wanted = data[at + i]!;
        const diff = (wanted ^ cur[i]!) & ~def.changeable[i]! & 0xff;
        if (diff !== 0) return { ok: false, kind: 'field', byte: offset + at + i, bit: 31 - Math.clz32(diff) };
        next[i] = (cur[i]! & ~def.changeable[i]!) | (wanted & def.changeable[i]!);
      }
      const existing = updates.findIndex((u) => u.code === code);
      if (existing >= 0) updates.splice(existing, 1);
      updates.push({ code, value: next });
      at += 2 + length;
    }
    let changed = false;
    for (const u of updates) {
      if (!u.value.equals(this.current.get(u.code)!)) changed = true;
      this.current.set(u.code, u.value);
    }
    return { ok: true, changed };
  }
}
