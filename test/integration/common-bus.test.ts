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

  it('fails fast with UnavailableError while Redis is down and recovers after, events included', async () => {
    // A command timeout far past the test's own: a call that waited for Redis instead of failing
    // at once would hang the test rather than pass (no wall-clock assertion needed).
    const bus = new RedisBus({ url: redis.url, subscribe: true, commandTimeoutMs: 120_000 });
    const other = new RedisBus({ url: redis.url });
    const seen: BusEvent[] = [];
    const downs: string[] = [];
    bus.onEvent((e) => seen.push(e));
    bus.on('down', (name: string) => downs.push(name));
    await waitFor(() => bus.connected && other.connected, 5000, 'redis ready');
    await redis.stop();
    await waitFor(() => !bus.connected && !other.connected, 5000, 'disconnect noticed');
    // While it is down: every call fails at once with the typed error, nothing throws out of
    // ioredis's reconnect loop (an unhandled 'error' event would fail this test file).
    for (let i = 0; i < 20; i++) {
      await expect(bus.get('pairgate:x')).rejects.toBeInstanceOf(UnavailableError);
      await expect(bus.incrWithTtl('pairgate:n', 1000)).rejects.toBeInstanceOf(UnavailableError);
      bus.publishQuietly({ type: 'state', reason: 'while down' });
    }
    await new Promise((r) => setTimeout(r, 700)); // a few reconnect attempts against a closed port
    expect(downs.length).toBe(0); // reconnecting, never given up ('end')
    await redis.start();
    await waitFor(() => bus.connected && other.connected, 10_000, 'reconnect');
    await bus.set('pairgate:x', '1');
    expect(await bus.get('pairgate:x')).toBe('1');
    // The subscriber re-subscribed by itself: events published after the outage arrive.
    await waitFor(async () => {
      await other.publish({ type: 'route-invalidate', logins: ['after-outage'] });
      return seen.some((e) => e.type === 'route-invalidate');
    }, 10_000, 'event after the outage');
    await bus.close();
    await other.close();
  });

  it('starts while Redis is down without failing, and connects once it is up', async () => {
    await redis.stop();
    const bus = new RedisBus({ url: redis.url, subscribe: true });
    await expect(bus.get('pairgate:y')).rejects.toBeInstanceOf(UnavailableError);
    await new Promise((r) => setTimeout(r, 500));
    expect(bus.connected).toBe(false);
    await redis.start();
    await waitFor(() => bus.connected, 10_000, 'first connect');
    await bus.set('pairgate:y', '2');
    expect(await bus.get('pairgate:y')).toBe('2');
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
