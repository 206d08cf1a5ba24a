/**
 * The directory's caches with a real slapd and a real redis-server: the shared Redis layer,
 * invalidation seen by a second Directory through the bus, negative entries, and Redis
 * stopped in the middle of a run (look-ups still answered from LDAP).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Client } from 'ldapts';
import { silentLogger } from '../../common/log.ts';
import { createRegistry, type MetricsRegistry } from '../../common/metrics.ts';
import { keys, RedisBus } from '../../common/redis-bus.ts';
import { openDirectory } from '../../directory/index.ts';
import { hashPassword } from '../../directory/password.ts';
import type { Directory } from '../../directory/types.ts';
import { tempDir } from '../helpers/proc.ts';
import { waitFor } from '../helpers/net.ts';
import { startRedis, type RedisServer } from '../helpers/redis.ts';
import { startSlapd, type Slapd } from '../helpers/slapd.ts';
import { BASE, suiteLdif } from './directory-suite.ts';

const tmp = tempDir('pairgate-dir-cache-');
let slapd: Slapd;
let redis: RedisServer;
const opened: Array<{ d: Directory; bus: RedisBus }> = [];

async function open(registry: MetricsRegistry = createRegistry({}, false), cache: Record<string, unknown> = {}): Promise<Directory> {
  const bus = new RedisBus({ url: redis.url, subscribe: true, log: silentLogger });
  await waitFor(() => bus.connected, 5000, 'redis connected');
  // Subscribed once a probe published on the channel comes back.
  const probe = `probe-${Math.random()}`;
  let seen = false;
  const off = bus.onEvent((e) => {
    if (e.type === probe) seen = true;
  });
  await waitFor(async () => {
    await bus.publish({ type: probe });
    return seen;
  }, 5000, 'bus subscription');
  off();
  const d = await openDirectory(
    { urls: [slapd.url], bindDn: slapd.adminDn, bindPassword: slapd.adminPassword, baseDn: BASE, cache: { ttlMs: 60_000, negativeTtlMs: 30_000, ...cache } },
    { log: silentLogger, registry, bus },
  );
  opened.push({ d, bus });
  return d;
}

async function counterValue(registry: MetricsRegistry, name: string, labels: Record<string, string>): Promise<number> {
  const m = (await registry.getMetricsAsJSON()).find((x) => x.name === name);
  const v = m?.values.find((x) => Object.entries(labels).every(([k, val]) => x.labels[k] === val));
  return Number(v?.value ?? 0);
}

async function adminAdd(uid: string): Promise<void> {
  const c = new Client({ url: slapd.url, timeout: 5000 });
  try {
    await c.bind(slapd.adminDn, slapd.adminPassword);
    await c.add(`uid=${uid},ou=people,${BASE}`, {
      objectClass: ['inetOrgPerson', 'inetLocalMailRecipient'],
      uid,
      cn: uid,
      sn: uid,
      mail: `${uid}@example.net`,
      mailHost: 'pair-02',
      userPassword: hashPassword(`${uid}-pass`, 'SSHA'),
    });
  } finally {
    await c.unbind();
  }
}

beforeAll(async () => {
  const file = join(tmp.path, 'data.ldif');
  writeFileSync(file, suiteLdif());
  [slapd, redis] = await Promise.all([startSlapd({ ldif: [file] }), startRedis()]);
}, 30_000);

afterAll(async () => {
  for (const { d, bus } of opened) {
    await d.close();
    await bus.close();
  }
  await slapd?.close();
  await redis?.close();
  tmp.cleanup();
});

describe('directory caches (slapd + redis)', () => {
  it('a second instance answers from Redis, then from its own LRU', async () => {
    const ra = createRegistry({}, false);
    const rb = createRegistry({}, false);
    const a = await open(ra);
    const b = await open(rb);
    expect((await a.findLogin('alice'))?.pair).toBe('pair-01');
    expect(await counterValue(ra, 'pairgate_directory_cache_total', { layer: 'redis', result: 'miss' })).toBe(1);
    await waitFor(async () => (await opened[0]!.bus.get(keys.route('alice'))) !== null, 2000, 'route cached in redis');
    expect(JSON.parse((await opened[0]!.bus.get(keys.route('alice')))!)).toMatchObject({ uid: 'alice', pair: 'pair-01', dn: `uid=alice,ou=people,${BASE}` });
    expect((await b.findLogin('alice'))?.pair).toBe('pair-01');
    expect(await counterValue(rb, 'pairgate_directory_cache_total', { layer: 'redis', result: 'hit' })).toBe(1);
    expect((await b.findLogin('alice'))?.pair).toBe('pair-01');
    expect(await counterValue(rb, 'pairgate_directory_cache_total', { layer: 'lru', result: 'hit' })).toBe(1);
    expect(await counterValue(rb, 'pairgate_directory_lookups_total', { result: 'found' })).toBe(2);
    // LDAP was asked once for both instances together.
    const ldapCount = async (r: MetricsRegistry) => {
      const m = (await r.getMetricsAsJSON()).find((x) => x.name === 'pairgate_directory_ldap_seconds');
      return Number(m?.values.find((v) => (v as { metricName?: string }).metricName === 'pairgate_directory_ldap_seconds_count' && v.labels.op === 'search_login')?.value ?? 0);
    };
    expect((await ldapCount(ra)) + (await ldapCount(rb))).toBe(1);
    // Authentications are counted by result.
    await b.authenticate('alice', 'alice-pass');
    await expect(b.authenticate('alice', 'wrong')).rejects.toThrow(/invalid credentials/);
    await expect(b.authenticate('nobody', 'x')).rejects.toThrow(/invalid credentials/);
    expect(await counterValue(rb, 'pairgate_directory_auth_total', { result: 'ok' })).toBe(1);
    expect(await counterValue(rb, 'pairgate_directory_auth_total', { result: 'fail' })).toBe(2);
  });

  it('a user move in one instance is seen by another (bus invalidation), for every address of the user', async () => {
    const a = await open();
    const b = await open();
    for (const login of ['carol', 'carol@example.net']) expect((await b.findLogin(login))?.pair).toBe('pair-01');
    expect((await b.findRecipient('carol@example.net'))?.pair).toBe('pair-01');
    await a.setUserPair('carol', 'pair-02');
    await waitFor(async () => (await b.findLogin('carol'))?.pair === 'pair-02', 3000, 'b sees the move');
    expect((await b.findLogin('carol@example.net'))?.pair).toBe('pair-02');
    expect((await b.findRecipient('carol@example.net'))?.pair).toBe('pair-02');
    // A third instance does not get the old answer from Redis either.
    const c = await open();
    expect((await c.findLogin('carol'))?.pair).toBe('pair-02');
  });

  it('LDAP uids compare case-insensitively, so both spellings share one cache entry and one invalidation', async () => {
    const a = await open();
    const b = await open();
    expect((await b.findLogin('BOB'))?.uid).toBe('bob');
    expect((await b.findLogin('bob'))?.pair).toBe('pair-02');
    await a.setUserPair('bob', 'pair-01');
    await waitFor(async () => (await b.findLogin('Bob'))?.pair === 'pair-01', 3000, 'b sees the move under every spelling');
    expect(await opened[0]!.bus.get(keys.route('BOB'))).toBeNull();
  });

  it('caches "no such user" in Redis too, shorter; invalidate clears it everywhere', async () => {
    const a = await open();
    const rb = createRegistry({}, false);
    const b = await open(rb);
    expect(await a.findLogin('ghost')).toBeNull();
    await adminAdd('ghost');
    expect(await b.findLogin('ghost')).toBeNull(); // from Redis
    expect(await counterValue(rb, 'pairgate_directory_cache_total', { layer: 'redis', result: 'hit' })).toBe(1);
    const ttl = await opened[0]!.bus.client.pttl(keys.route('ghost'));
    expect(ttl).toBeGreaterThan(0);
    expect(ttl).toBeLessThanOrEqual(30_000);
    await a.invalidate(['ghost']);
    await waitFor(async () => (await b.findLogin('ghost'))?.uid === 'ghost', 3000, 'ghost visible to b');
    expect((await a.findLogin('ghost'))?.pair).toBe('pair-02');
  });

  it('keeps answering from LDAP while Redis is stopped mid-run, and uses it again when back', async () => {
    const registry = createRegistry({}, false);
    // No in-process cache: every look-up goes to Redis, then LDAP.
    const d = await open(registry, { maxEntries: 0 });
    const logins = ['alice', 'bob', 'bob@example.net', 'nobody', 'robert@example.org'];
    let failures = 0;
    let wrong = 0;
    const loop = async (n: number) => {
      for (let i = 0; i < n; i++) {
        const login = logins[i % logins.length]!;
        try {
          const u = await d.findLogin(login);
          if ((login === 'nobody') !== (u === null)) wrong++;
          if (i % 10 === 0) await d.authenticate('bob', 'bob-pass');
        } catch {
          failures++;
        }
      }
    };
    await loop(50);
    // Stopped while look-ups are running, then more look-ups with Redis gone.
    await Promise.all([loop(100), redis.stop()]);
    await waitFor(() => !opened.at(-1)!.bus.connected, 5000, 'redis client noticed the stop');
    await loop(100);
    await d.invalidate(['alice']); // publishes nothing, throws nothing
    expect(failures).toBe(0);
    expect(wrong).toBe(0);
    await redis.start();
    await waitFor(() => opened.at(-1)!.bus.connected, 10_000, 'redis reconnected');
    await loop(20);
    expect(failures).toBe(0);
    await waitFor(async () => (await opened.at(-1)!.bus.get(keys.route('alice'))) !== null, 3000, 'redis cache filled again');
  }, 30_000);
});
