import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/helpers/global-setup.ts'],
    testTimeout: 120_000,
    hookTimeout: 900_000,
    // e2e tests start real initiators and QEMU guests: on 2 cores, run files two at a time.
    maxWorkers: 2,
    reporters: ['default'],
  },
});
