/** The caching Directory over a scripted backend: coalescing, TTLs, invalidation races, copies, log-once. */
import { describe, expect, it } from 'vitest';
import { EventEmitter } from 'node:events';
import { pino } from 'pino';
import { NotFoundError } from '../../common/errors.ts';
import { silentLogger } from '../../common/log.ts';
import { keys, type RedisBus } from '../../common/redis-bus.ts';
import type { DirectoryBackend } from '../../directory/backend.ts';
import { cacheSchema } from '../../directory/config.ts';
import { CachingDirectory } from '../../directory/directory.ts';
import { directoryMetrics } from '../../directory/metrics.ts';
import type { PairRecord, UserRecord } from '../../directory/types.ts';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function user(uid: string, pair: string): UserRecord {
  return { dn: `uid=${uid},ou=people,dc=t`, uid, mail: `${uid}@example.net`, aliases: [], pair };
}

function scripted(answer: (login: string) => Promise<UserRecord | null>) {
  const calls: string[] = [];
  const pairs: PairRecord[] = [
    { id: 'p1', dn: 'cn=p1', address: '10.0.0.1', ports: {}, state: 'active', weight: 10 },
    { id: 'p-old', dn: 'cn=p-old', address: '10.0.0.9', ports: {}, state: 'retired', weight: 10 },
  ];
  const backend: DirectoryBackend = {
    kind: 'ldif',
    findLogin: (l) => {
      calls.push(l);
      return answer(l);
    },
    findRecipient: (a) => {
      calls.push(`rcpt:${a}`);
      return answer(a);
    },
    bindUser: async () => undefined,
    listPairs: async () => pairs,
    countUsersByPair: async () => new Map(),
    addUser: async () => {
      throw new Error('unused');
    },
    setUserPair: async () => {
      throw new Error('unused');
    },
    close: async () => undefined,
  };
  return { backend, calls };
}

function open(backend: DirectoryBackend, cache: Record<string, unknown> = {}, log = silentLogger, metrics = directoryMetrics(), bus?: RedisBus) {
  return new CachingDirectory({ backend, cache: cacheSchema.parse(cache), log, metrics, bus });
}

/** A Redis bus over a Map: GET and MGET read it, or fail (as a command timeout does) when `down`. */
function mapBus(values: Map<string, string>, state = { down: false, gets: 0, mgets: 0 }): RedisBus {
  const read = async (k: string) => {
    await sleep(1);
    if (state.down) throw new Error('redis get failed: Command timed out');
    return values.get(k) ?? null;
  };
  const events = new EventEmitter();
  return Object.assign(events, {
    connected: true,
    get: (k: string) => (state.gets++, read(k)),
    mget: (ks: string[]) => (state.mgets++, Promise.all(ks.map(read))),
    set: async (k: string, v: string) => void values.set(k, v),
    del: async () => 0,
    publish: async () => undefined,
    onEvent: (h: (e: unknown) => void) => (events.on('event', h), () => events.off('event', h)),
  }) as unknown as RedisBus;
}

async function lookupCounts(m: ReturnType<typeof directoryMetrics>): Promise<Record<string, number>> {
  return Object.fromEntries((await m.lookups.get()).values.map((v) => [v.labels.result, v.value]));
}

describe('caching Directory', () => {
  it('coalesces concurrent look-ups of one login into one backend call', async () => {
    const { backend, calls } = scripted(async (l) => {
      await sleep(20);
      return user(l, 'p1');
    });
    const d = open(backend);
    const got = await Promise.all(Array.from({ length: 10 }, () => d.findLogin('alice')));
    expect(got.every((u) => u?.uid === 'alice')).toBe(true);
    expect(calls).toEqual(['alice']);
    await d.findLogin('alice');
    expect(calls).toEqual(['alice']);
  });

  it('a failed look-up fails every caller that joined it, counted once each; the next caller asks again', async () => {
    let down = true;
    const { backend, calls } = scripted(async (l) => {
      await sleep(10);
      if (down) throw new Error('ldap down');
      return user(l, 'p1');
    });
    const m = directoryMetrics();
    const d = open(backend, {}, silentLogger, m);
    const failed = await Promise.allSettled(Array.from({ length: 5 }, () => d.findLogin('alice')));
    expect(failed.map((r) => r.status)).toEqual(Array(5).fill('rejected'));
    expect(await lookupCounts(m)).toEqual({ error: 5 });
    down = false;
    expect((await Promise.all([d.findLogin('alice'), d.findLogin('alice')])).map((u) => u?.uid)).toEqual(['alice', 'alice']);
    expect(calls).toEqual(['alice', 'alice']);
    expect(await lookupCounts(m)).toEqual({ error: 5, found: 2 });
  });

  it('one MGET answers each caller for its own key (hit, cached "none", unreadable, not there), and a Redis failure falls back to the backend', async () => {
    const values = new Map<string, string>([
      [keys.route('hit'), JSON.stringify(user('hit', 'p1'))],
      [keys.route('none'), '{"none":true}'],
      [keys.route('junk'), '{not json'],
      [keys.route('short'), JSON.stringify({ uid: 'short', dn: 'uid=short' })],
    ]);
    const state = { down: false, gets: 0, mgets: 0 };
    const { backend, calls } = scripted(async (l) => (l === 'none' ? null : user(l, 'p2')));
    const m = directoryMetrics();
    const d = open(backend, { redis: true }, silentLogger, m, mapBus(values, state));
    const logins = ['hit', 'none', 'junk', 'short', 'hit', 'absent', 'none'];
    const got = await Promise.all(logins.map((l) => d.findLogin(l)));
    expect(got.map((u) => (u ? `${u.uid}@${u.pair}` : null))).toEqual(['hit@p1', null, 'junk@p2', 'short@p2', 'hit@p1', 'absent@p2', null]);
    expect(Object.isFrozen(got[0]) && Object.isFrozen(got[0]!.aliases)).toBe(true);
    expect([...calls].sort()).toEqual(['absent', 'junk', 'short']);
    expect(await lookupCounts(m)).toEqual({ found: 5, not_found: 2 });
    expect(state).toMatchObject({ gets: 0, mgets: 1 }); // the five distinct keys in one MGET
    state.down = true;
    const fallback = await Promise.all(['x', 'y', 'x'].map((l) => d.findLogin(l)));
    expect(fallback.map((u) => u?.uid)).toEqual(['x', 'y', 'x']);
  });

  it('expires negative answers after negativeTtlMs, positive ones after ttlMs', async () => {
    let exists = false;
    const { backend, calls } = scripted(async (l) => (exists ? user(l, 'p1') : null));
    const d = open(backend, { ttlMs: 10_000, negativeTtlMs: 60 });
    expect(await d.findLogin('bob')).toBeNull();
    exists = true;
    expect(await d.findLogin('bob')).toBeNull();
    await sleep(100);
    expect((await d.findLogin('bob'))?.uid).toBe('bob');
    expect(calls).toEqual(['bob', 'bob']);
  });

  it('does not keep an answer read before an invalidation that happened during the look-up', async () => {
    let pair = 'old';
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { backend, calls } = scripted(async (l) => {
      const seen = pair;
      if (calls.length === 1) await gate;
      return user(l, seen);
    });
    const d = open(backend);
    const slow = d.findLogin('carol');
    await sleep(5);
    pair = 'new';
    await d.invalidate(['carol']);
    expect((await d.findLogin('carol'))?.pair).toBe('new'); // does not join the old look-up
    release();
    expect((await slow)?.pair).toBe('old');
    expect((await d.findLogin('carol'))?.pair).toBe('new');
  });

  it('an invalidation also keeps later callers out of look-ups in flight for the user\'s other addresses', async () => {
    let pair = 'old';
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const { backend, calls } = scripted(async () => {
      const seen = pair;
      if (calls.length === 2) await gate;
      return user('dave', seen);
    });
    const d = open(backend);
    expect((await d.findLogin('dave'))?.pair).toBe('old'); // now in the LRU, with its address
    const slow = d.findLogin('dave@example.net'); // another key: a look-up of its own, held
    await sleep(5);
    pair = 'new';
    // Names only the uid: the LRU entry tells the address, whose look-up in flight is old.
    await d.invalidate(['dave']);
    const again = d.findLogin('dave@example.net');
    release();
    expect((await again)?.pair).toBe('new');
    expect((await slow)?.pair).toBe('old');
    expect(calls).toEqual(['dave', 'dave@example.net', 'dave@example.net']);
  });

  it('hands out read-only records: no caller can change what the cache holds', async () => {
    const { backend } = scripted(async (l) => user(l, 'p1'));
    const d = open(backend);
    const a = (await d.findLogin('dave'))!;
    expect(() => {
      (a as { pair: string }).pair = 'elsewhere';
    }).toThrow(TypeError);
    expect(() => (a.aliases as string[]).push('x@y')).toThrow(TypeError);
    expect(await d.findLogin('dave')).toEqual(user('dave', 'p1'));
  });

  it('invalidating one address drops every cached form of that user', async () => {
    const { backend, calls } = scripted(async () => ({ ...user('erin', 'p1'), aliases: ['e@example.net'] }));
    const d = open(backend);
    await d.findLogin('erin');
    await d.findLogin('e@example.net');
    await d.findRecipient('erin@example.net');
    await d.invalidate(['e@example.net']);
    await d.findLogin('erin');
    await d.findRecipient('erin@example.net');
    expect(calls).toEqual(['erin', 'e@example.net', 'rcpt:erin@example.net', 'erin', 'rcpt:erin@example.net']);
  });

  it('logs a user on a missing, retired or absent pair once each, with the DN; the error is typed and carries the DN', async () => {
    const lines: Array<{ dn?: string; msg?: string }> = [];
    const log = pino({ level: 'error' }, { write: (s: string) => lines.push(JSON.parse(s)) });
    const homes: Record<string, string> = { frank: 'nope', gina: 'p-old', hank: '', ivy: 'p1' };
    const { backend } = scripted(async (l) => user(l, homes[l]!));
    const d = open(backend, {}, log);
    for (const [uid, re] of [['frank', /names no pair/], ['gina', /retired pair/], ['hank', /no mailHost/]] as const) {
      const u = (await d.findLogin(uid))!;
      for (let i = 0; i < 3; i++) {
        const err = await d.routeFor(u).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(NotFoundError);
        expect((err as NotFoundError).temporary).toBe(false);
        expect((err as NotFoundError).details.dn).toBe(u.dn);
      }
      const mine = lines.filter((l) => l.dn === u.dn);
      expect(mine, uid).toHaveLength(1);
      expect(mine[0]!.msg).toMatch(re);
    }
    // A user on a good pair routes, and logs nothing.
    expect((await d.routeFor((await d.findLogin('ivy'))!)).pair.id).toBe('p1');
    expect(lines).toHaveLength(3);
  });
});
