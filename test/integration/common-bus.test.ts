import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedisBus, keys, type BusEvent } from '../../common/redis-bus.ts';
import { startAdminServer, adminCall } from '../../common/admin-http.ts';
import { createRegistry, counter } from '../../common/metrics.ts';
import { silentLogger } from '../../common/log.ts';
import { UnavailableError } from '../../common/errors.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { waitFor } from '../helpers/net.ts';

describe('redis bus against a real redis-server', () => {
  let redis: RedisServer;
  beforeAll(async () => {
    redis = await startRedis();
  });
  afterAll(async () => {
    await redis?.close();
  });

  it('sets with TTL, counts in a window, and carries events', async () => {
    const a = new RedisBus({ url: redis.url, subscribe: true });
    const b = new RedisBus({ url: redis.url, subscribe: true });
    await waitFor(() => a.connected && b.connected, 5000, 'redis ready');
    await a.set(keys.route('alice'), 'pair-01', 200);
    expect(await b.get(keys.route('alice'))).toBe('pair-01');
    expect(await a.incrWithTtl(keys.authFailIp('192.0.2.1'), 5000)).toBe(1);
    expect(await b.incrWithTtl(keys.authFailIp('192.0.2.1'), 5000)).toBe(2);
    const seen: BusEvent[] = [];
    b.onEvent((e) => seen.push(e));
    await waitFor(async () => {
      await a.publish({ type: 'route-invalidate', logins: ['alice'] });
      return seen.length > 0;
    }, 5000, 'event delivery');
    expect(seen[0]).toMatchObject({ type: 'route-invalidate', logins: ['alice'] });
    await waitFor(async () => (await a.get(keys.route('alice'))) === null, 2000, 'ttl expiry');
    await a.close();
    await b.close();
  });

  it('fails fast with UnavailableError while Redis is down and recovers after', async () => {
    const bus = new RedisBus({ url: redis.url });
    await waitFor(() => bus.connected, 5000, 'redis ready');
    await redis.stop();
    await waitFor(() => !bus.connected, 5000, 'disconnect noticed');
    const t0 = Date.now();
    await expect(bus.get('pairgate:x')).rejects.toBeInstanceOf(UnavailableError);
    expect(Date.now() - t0).toBeLessThan(1000);
    await redis.start();
    await waitFor(() => bus.connected, 10_000, 'reconnect');
    await bus.set('pairgate:x', '1');
    expect(await bus.get('pairgate:x')).toBe('1');
    await bus.close();
  });
});

describe('admin http', () => {
  it('serves metrics, health and guards POST routes with the token', async () => {
    const registry = createRegistry({ role: 'test' });
    counter(registry, 'test_things_total', 'things').inc();
    let healthy = true;
    const admin = await startAdminServer({
      host: '127.0.0.1',
      port: 0,
      registry,
      log: silentLogger,
      token: 't0ken',
      health: () => ({ healthy, body: { ok: healthy } }),
      routes: { 'POST /standby': () => ({ done: true }) },
    });
    const m = await adminCall(admin.url, 'GET', '/metrics');
    expect(String(m.body)).toMatch(/pairgate_test_things_total\{role="test"\} 1/);
    expect((await adminCall(admin.url, 'GET', '/health')).status).toBe(200);
    healthy = false;
    expect((await adminCall(admin.url, 'GET', '/health')).status).toBe(503);
    expect((await adminCall(admin.url, 'POST', '/standby')).status).toBe(403);
    expect(await adminCall(admin.url, 'POST', '/standby', {}, { token: 't0ken' })).toEqual({ status: 200, body: { done: true } });
    await admin.close();
  });
});
