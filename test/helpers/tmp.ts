import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface TempDir {
  readonly path: string;
  /** Removes the directory and everything in it; safe to call twice. */
  remove(): Promise<void>;
}

/** A fresh directory under os.tmpdir() named bootrestore-<prefix>-XXXXXX. */
export async function makeTempDir(prefix: string): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), `bootrestore-${prefix}-`));
  return {
    path,
    remove: async () => {
      await rm(path, { recursive: true, force: true });
    },
  };
}
