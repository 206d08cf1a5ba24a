/** The per-worker share of the balancer's limits and the `workers` setting (loadbalancer/cluster.ts). */
import os from 'node:os';
import { describe, expect, it } from 'vitest';
import { workerCount, workerShare } from '../../loadbalancer/cluster.ts';
import { lbConfigSchema } from '../../loadbalancer/index.ts';

const config = lbConfigSchema.parse({
  listeners: [
    { name: 'imap', listen: '127.0.0.1:1143', pool: 'imap', maxconn: 50_001 },
    { name: 'pop3', listen: '127.0.0.1:1110', pool: 'imap' },
  ],
  pools: {
    imap: {
      maxQueue: 3,
      backends: [
        { name: 'a', address: '127.0.0.1:2001', maxconn: 1 },
        { name: 'b', address: '127.0.0.1:2002' },
      ],
    },
  },
  relay: { maxBulkConnections: 0 },
});

describe('lb workers', () => {
  it('defaults to one worker per CPU; a number is taken as it is', () => {
    expect(config.workers).toBe('auto');
    expect(workerCount('auto')).toBe(os.availableParallelism());
    expect(workerCount(3)).toBe(3);
    expect(() => lbConfigSchema.parse({ ...config, workers: 0 })).toThrow();
    expect(() => lbConfigSchema.parse({ ...config, workers: 'all' })).toThrow();
  });

  it('splits every per-process limit, rounding up, and keeps 0 (no limit / none) as 0', () => {
    const share = workerShare(config, 2);
    expect(share.listeners.map((l) => l.maxconn)).toEqual([25_001, 0]);
    expect(share.pools.imap!.backends.map((b) => b.maxconn)).toEqual([1, 0]);
    expect(share.pools.imap!.maxQueue).toBe(2);
    expect(share.relay.maxBulkConnections).toBe(0);
    expect(workerShare(lbConfigSchema.parse({ ...config, relay: {} }), 4).relay.maxBulkConnections).toBe(16);
    // The caller's config is left as it was.
    expect(config.listeners[0]!.maxconn).toBe(50_001);
  });

  it('with one worker the share is the whole config', () => {
    expect(workerShare(config, 1)).toEqual(config);
  });
});
