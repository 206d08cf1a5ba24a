/**
 * The load balancer's per-backend check loop across reloads: a reload that changes the check
 * settings while a check is in flight restarts the loop; the loop must stay one (not one more
 * per such reload: checks at a multiple of the configured rate, fall/rise counted that much
 * faster) and stopChecks() (stop, backend removed) must end it.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Backend } from '../../loadbalancer/backend.ts';
import { poolSchema } from '../../loadbalancer/config.ts';
import { lbMetrics } from '../../loadbalancer/metrics.ts';
import { createRegistry } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import { waitFor } from '../helpers/net.ts';

describe('load balancer: backend check loop across reloads', () => {
  let server: http.Server;
  let url = '';
  /** When each check request arrived. */
  const hits: number[] = [];
  let inFlight = 0;
  /** Answer after 80 ms (so that a reload can land during a check), else at once. */
  let slow = true;

  beforeAll(async () => {
    server = http.createServer((_req, res) => {
      hits.push(Date.now());
      inFlight++;
      setTimeout(() => {
        inFlight--;
        res.writeHead(200).end('{}');
      }, slow ? 80 : 0);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/health`;
  });
  afterAll(async () => {
    await new Promise<void>((r) => server.close(() => r()));
  });

  it('a check-settings reload during a check keeps one loop, and stopChecks() ends it', async () => {
    const pool = (timeoutMs: number) => poolSchema.parse({ check: { intervalMs: 100, timeoutMs, fall: 3, rise: 2 }, backends: [{ name: 'p1', address: '127.0.0.1:1', healthUrl: url }] });
    let cfg = pool(1000);
    const b = new Backend('imap', cfg.backends[0]!, cfg, lbMetrics(createRegistry({}, false)), silentLogger);
    b.startChecks();
    try {
      // Three reloads, each while a check is in flight.
      for (let i = 0; i < 3; i++) {
        await waitFor(() => inFlight > 0 || undefined, 3000, `check ${i} in flight`, 2);
        cfg = pool(1000 + i + 1);
        b.update(cfg.backends[0]!, cfg);
        await waitFor(() => inFlight === 0 || undefined, 3000, `check ${i} answered`, 2);
      }
      // One loop runs a check about every 100 ms: some 15 in 1.5 s. Each extra loop adds as many
      // (checks that find one already running return at once and send nothing, so the requests
      // counted at the server vary with how the loops line up; the runs do not).
      slow = false;
      let runs = 0;
      const checkOnce = b.checkOnce.bind(b);
      b.checkOnce = () => {
        runs++;
        return checkOnce();
      };
      await new Promise((r) => setTimeout(r, 200));
      const from = Date.now();
      runs = 0;
      await new Promise((r) => setTimeout(r, 1500));
      const n = hits.filter((t) => t >= from).length;
      expect(runs, 'check runs in 1.5 s').toBeLessThanOrEqual(18);
      expect(n, 'check requests in 1.5 s').toBeLessThanOrEqual(18);
    } finally {
      b.stopChecks();
    }
    const stoppedAt = Date.now() + 100; // a check already running may still arrive
    await new Promise((r) => setTimeout(r, 600));
    expect(hits.filter((t) => t > stoppedAt).length, 'checks after stopChecks()').toBe(0);
  });
});
