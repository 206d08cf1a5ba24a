/**
 * PairHealth against a real redis-server and real HTTP /health endpoints: states from either
 * source, staleness turning into `down`, awaitServable holding through `failing-over` and
 * failing at once on `down`, and routing surviving a Redis outage through polling.
 */
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PairHealth, type PairHealthChange } from '../../proxy/pair-health.ts';
import { RedisBus, keys } from '../../common/redis-bus.ts';
import { silentLogger } from '../../common/log.ts';
import { UnavailableError } from '../../common/errors.ts';
import type { PairState } from '../../common/health.ts';
import type { PairRecord } from '../../directory/types.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { waitFor } from '../helpers/net.ts';
// The record a pair's /health serves: the same builder as the integration tests' pairs.
import { healthRecord as record } from '../integration/proxy-harness.ts';

/** A pair's admin endpoint serving whatever state the test sets (null = connection answered 500 garbage). */
async function fakePair(id: string, initial: PairState | null) {
  let state: PairState | null = initial;
  const server = http.createServer((_req, res) => {
    if (state === null) {
      res.writeHead(500).end('nope');
      return;
    }
    res.writeHead(state === 'ok' || state === 'degraded' ? 200 : 503, { 'content-type': 'application/json' });
    res.end(JSON.stringify(record(id, state)));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  const pair: PairRecord = { id, dn: `cn=${id}`, address: '127.0.0.1', ports: { admin: port }, state: 'active', weight: 100 };
  return {
    pair,
    set: (s: PairState | null) => {
      state = s;
    },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

describe('PairHealth', () => {
  let redis: RedisServer;
  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    await redis?.close();
  });

  it('follows polling alone: ok, failing-over holds then serves, down fails at once, stale = down', async () => {
    const p = await fakePair('pair-p1', 'ok');
    const health = new PairHealth({ log: silentLogger, pollIntervalMs: 100, pollTimeoutMs: 300, ttlMs: 600 });
    await health.start();
    try {
      await health.awaitServable(p.pair, 1000);
      expect(health.state('pair-p1')).toBe('ok');

      p.set('failing-over');
      await waitFor(() => health.state('pair-p1') === 'failing-over', 3000, 'failing-over');
      const t0 = Date.now();
      const held = health.awaitServable(p.pair, 5000);
      setTimeout(() => p.set('ok'), 400);
      await held;
      expect(Date.now() - t0).toBeGreaterThanOrEqual(300);

      p.set('failing-over');
      await waitFor(() => health.state('pair-p1') === 'failing-over', 3000, 'failing-over again');
      await expect(health.awaitServable(p.pair, 300)).rejects.toBeInstanceOf(UnavailableError);

      const changes: PairHealthChange[] = [];
      health.on('change', (c) => changes.push(c));
      p.set('down');
      await waitFor(() => health.state('pair-p1') === 'down', 3000, 'down');
      await expect(health.awaitServable(p.pair, 5000)).rejects.toThrow(/down/);
      expect(changes.some((c) => c.to === 'down')).toBe(true);

      p.set('ok');
      await waitFor(() => health.state('pair-p1') === 'ok', 3000, 'ok');
      await p.close(); // unreachable now
      await waitFor(() => health.state('pair-p1') === 'down', 3000, 'stale -> down');
    } finally {
      await health.close();
      await p.close().catch(() => undefined);
    }
  });

  it('follows Redis records and events without polling, and polling carries on while Redis is down', async () => {
    const bus = new RedisBus({ url: redis.url, subscribe: true });
    await waitFor(() => bus.connected, 5000, 'redis');
    const writer = new RedisBus({ url: redis.url });
    await waitFor(() => writer.connected, 5000, 'redis writer');
    const pair: PairRecord = { id: 'pair-r1', dn: 'cn=pair-r1', address: '127.0.0.1', ports: { admin: 1 }, state: 'active', weight: 1 };
    const health = new PairHealth({ log: silentLogger, bus, pollIntervalMs: 100, ttlMs: 800, poll: false });
    await health.start();
    let beat: NodeJS.Timeout | null = null;
    let state: PairState = 'ok';
    try {
      beat = setInterval(() => void writer.set(keys.pairHealth('pair-r1'), JSON.stringify(record('pair-r1', state)), 2000).catch(() => undefined), 100);
      await health.awaitServable(pair, 3000);
      expect(health.state('pair-r1')).toBe('ok');
      // An event applies at once (before the next record).
      state = 'down';
      await writer.publish({ type: 'health', pair: 'pair-r1', state: 'down', at: Date.now() });
      await waitFor(() => health.state('pair-r1') === 'down', 3000, 'down by event');
      state = 'ok';
      await waitFor(() => health.state('pair-r1') === 'ok', 3000, 'ok again');
      // Record no longer refreshed -> stale -> down.
      clearInterval(beat);
      beat = null;
      await waitFor(() => health.state('pair-r1') === 'down', 4000, 'stale');
    } finally {
      if (beat) clearInterval(beat);
      await health.close();
      await bus.close();
      await writer.close();
    }

    // Redis down, polling on: still routes.
    const p = await fakePair('pair-r2', 'ok');
    const bus2 = new RedisBus({ url: redis.url, subscribe: true });
    await waitFor(() => bus2.connected, 5000, 'redis');
    await redis.stop();
    const h2 = new PairHealth({ log: silentLogger, bus: bus2, pollIntervalMs: 100, ttlMs: 600 });
    try {
      await h2.start();
      await h2.awaitServable(p.pair, 2000);
      expect(h2.state('pair-r2')).toBe('ok');
    } finally {
      await h2.close();
      await bus2.close();
      await p.close();
      await redis.start();
    }
  });

  it('bounds a poll: an endpoint that never answers or answers too much teaches nothing (the pair goes down once stale)', async () => {
    const sockets = new Set<import('node:net').Socket>();
    const hang = http.createServer(() => undefined); // never answers
    const huge = http.createServer((_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ ...record('pair-big', 'ok'), pad: 'x'.repeat(100 * 1024) }));
    });
    for (const srv of [hang, huge]) {
      srv.on('connection', (c) => sockets.add(c));
      await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    }
    const pairOf = (id: string, srv: http.Server): PairRecord => ({ id, dn: `cn=${id}`, address: '127.0.0.1', ports: { admin: (srv.address() as AddressInfo).port }, state: 'active', weight: 100 });
    const ok = await fakePair('pair-fine', 'ok');
    const health = new PairHealth({ log: silentLogger, pollIntervalMs: 100, pollTimeoutMs: 200, ttlMs: 600 });
    await health.start();
    try {
      const started = Date.now();
      await expect(health.awaitServable(pairOf('pair-hang', hang), 0)).rejects.toBeInstanceOf(UnavailableError);
      // Bounded, not timed: a hanging /health ends at pollTimeoutMs, not never (generous for a loaded machine).
      expect(Date.now() - started).toBeLessThan(8000);
      await health.awaitServable(ok.pair, 1000); // a good pair polled alongside is not held up
      await expect(health.awaitServable(pairOf('pair-big', huge), 0)).rejects.toBeInstanceOf(UnavailableError);
      await waitFor(() => health.state('pair-hang') === 'down' && health.state('pair-big') === 'down', 3000, 'both down');
      expect(health.state('pair-fine')).toBe('ok');
    } finally {
      await health.close();
      for (const c of sockets) c.destroy();
      await Promise.all([hang, huge].map((srv) => new Promise<void>((r) => srv.close(() => r()))));
      await ok.close();
    }
  });
});
