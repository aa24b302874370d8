/** A fresh temporary directory for every test of a file, removed after each test. */
import { afterEach, beforeEach } from 'vitest';
import { makeTempDir, type TempDir } from './tmp.js';

/** Registers beforeEach/afterEach hooks; `use` receives each test's new directory before the test runs. */
export function freshDirPerTest(prefix: string, use: (path: string) => void): void {
  let current: TempDir | null = null;
  beforeEach(async () => {
    current = await makeTempDir(prefix);
    use(current.path);
  });
  afterEach(async () => {
    await current?.remove();
    current = null;
  });
}
