import { defineConfig } from 'vitest/config';

// Integration tests spawn real servers (slapd, redis-server, dovecot, pair-agents); two cores
// are all a CI machine has, so files run two at a time and each gets generous timeouts.
export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 60_000,
    hookTimeout: 60_000,
    teardownTimeout: 20_000,
    reporters: ['default'],
  },
});
