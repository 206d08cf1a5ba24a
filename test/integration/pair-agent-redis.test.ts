/**
 * Health publishing: the active node writes the pair's record to Redis (`pairgate:pair:<id>:health`,
 * with a TTL) every second and on change, keeps failing over while Redis is down, and publishes
 * again when Redis is back.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RedisBus, keys } from '../../common/redis-bus.ts';
import { parseHealthRecord } from '../../common/health.ts';
import { waitFor } from '../helpers/net.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { startPair, type TestPair } from './pair-agent-harness.ts';

let redis: RedisServer;
let pair: TestPair;
let bus: RedisBus;

beforeAll(async () => {
  redis = await startRedis();
  const r = { redis: { url: redis.url } };
  pair = await startPair({ a: r, b: r });
  bus = new RedisBus({ url: redis.url });
}, 60_000);
afterAll(async () => {
  await bus?.close();
  await pair?.stop();
  await redis?.close();
});

async function record() {
  try {
    const v = await bus.get(keys.pairHealth('pair-t'));
    return v ? parseHealthRecord(v) : null;
  } catch {
    return null;
  }
}

describe('pair-agent health in Redis', () => {
  it('the active node publishes the record with a TTL, refreshed every second', async () => {
    expect(await pair.waitPrimary()).toBe('a');
    const first = await waitFor(async () => {
      const r = await record();
      return r?.primary === 'a' && r.state === 'ok' ? r : null;
    }, 10_000, 'record in redis');
    expect(first.nodes.b).toMatchObject({ heartbeat: 'up', role: 'secondary' });
    const ttl = await bus.client.pttl(keys.pairHealth('pair-t'));
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(5000);
    const next = await waitFor(async () => {
      const r = await record();
      return r && r.at > first.at ? r : null;
    }, 5000, 'a refreshed record');
    expect(next.at).toBeGreaterThan(first.at);
  });

  it('fails over while Redis is down, and publishes again when it is back', async () => {
    await redis.stop();
    pair.a.proc!.kill('SIGKILL');
    await waitFor(async () => (await pair.floatingHealth(200))?.body.primary === 'b', 15_000, 'b serving without redis');
    await redis.start();
    await waitFor(async () => (await record())?.primary === 'b', 15_000, 'record names b after redis is back');
    expect((await record())?.state).toBe('degraded');
  });

  it('publishes failing-over while the standby fences and takes over, then the new state', async () => {
    await pair.a.start();
    await waitFor(async () => (await pair.a.status())?.state === 'standby', 15_000, 'a standby');
    const sub = new RedisBus({ url: redis.url, subscribe: true });
    const states: string[] = [];
    sub.onEvent((e) => {
      if (e.type === 'health' && e.pair === 'pair-t') states.push(String(e.state));
    });
    try {
      await waitFor(() => sub.connected, 5000, 'subscriber connected');
      await new Promise((r) => setTimeout(r, 300));
      pair.b.proc!.kill('SIGKILL');
      await waitFor(() => states.includes('degraded'), 15_000, 'health events through the failover');
      expect(states.indexOf('failing-over')).toBeGreaterThanOrEqual(0);
      expect(states.indexOf('failing-over')).toBeLessThan(states.indexOf('degraded'));
      expect((await record())?.primary).toBe('a');
    } finally {
      await sub.close();
    }
  });
});
