/**
 * The Directory both backends share: in-process LRU plus the shared Redis cache in front of
 * the backend's lookups (negative answers with a shorter TTL, concurrent look-ups of one key
 * coalesced), invalidation through the Redis bus, pair listing with a short reuse window,
 * routing checks and weight-aware placement. Redis is an accelerator only: when it is down
 * every answer comes from the backend and nothing fails because of it.
 */
import { LRUCache } from 'lru-cache';
import { AuthError, BadInputError, ConflictError, NotFoundError, PairgateError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import { tallyOf } from '../common/metrics.ts';
import { keys, type BusEvent, type RedisBus } from '../common/redis-bus.ts';
import type { DirectoryBackend } from './backend.ts';
import type { CacheConfig } from './config.ts';
import type { DirectoryMetrics } from './metrics.ts';
import { hashPassword } from './password.ts';
import { choosePair } from './placement.ts';
import { normalizeAddress } from './records.ts';
import type { Directory, NewUser, PairRecord, Route, UserRecord } from './types.ts';

type Kind = 'login' | 'rcpt';

interface Cached {
  user: UserRecord | null;
}

const MAX_LOGIN_LENGTH = 320;
const NEGATIVE = '{"none":true}';

export interface CachingDirectoryOptions {
  backend: DirectoryBackend;
  cache: CacheConfig;
  log: Logger;
  metrics: DirectoryMetrics;
  bus?: RedisBus | undefined;
}

/** Normal form of a login or address for cache keys and look-ups; null when it cannot name anyone. */
export function normalizeLogin(login: string, caseInsensitiveUid = false): string | null {
  if (typeof login !== 'string') return null;
  const t = login.trim();
  if (!t || t.length > MAX_LOGIN_LENGTH || /[\x00-\x1f\x7f]/.test(t)) return null;
  return caseInsensitiveUid || t.includes('@') ? normalizeAddress(t) : t;
}

type Resolve = (user: UserRecord | null) => void;
type Reject = (err: unknown) => void;

/**
 * The executor of every look-up's promise: one function for all of them, which leaves the
 * promise's settle functions here for join() to take. An arrow function per promise would be
 * one more allocation on the hot path of every login.
 */
let capturedResolve: Resolve | null = null;
let capturedReject: Reject | null = null;
function captureSettlers(resolve: Resolve, reject: Reject): void {
  capturedResolve = resolve;
  capturedReject = reject;
}

/**
 * One look-up in flight. Every caller asking for the same key before it settles shares it (one
 * Redis GET or backend search) and gets its own promise, settled together with the others'.
 */
class PendingLookup {
  /** The first caller's settle functions; callers who join later are kept in `joined`. */
  private firstResolve: Resolve | null = null;
  private firstReject: Reject | null = null;
  private joined: Array<[Resolve, Reject]> | null = null;

  constructor(
    readonly kind: Kind,
    readonly key: string,
    readonly lruKey: string,
    /** The invalidation epoch when the look-up began: an answer from an older one is not cached. */
    readonly epoch: number,
  ) {}

  /** A promise for one more caller. */
  join(): Promise<UserRecord | null> {
    const answer = new Promise<UserRecord | null>(captureSettlers);
    if (!this.firstResolve) {
      this.firstResolve = capturedResolve;
      this.firstReject = capturedReject;
    } else (this.joined ??= []).push([capturedResolve!, capturedReject!]);
    capturedResolve = capturedReject = null;
    return answer;
  }

  /** How many callers wait on this look-up (each is counted in the metrics). */
  get callers(): number {
    return (this.firstResolve ? 1 : 0) + (this.joined?.length ?? 0);
  }

  resolve(user: UserRecord | null): void {
    this.firstResolve?.(user);
    if (this.joined) for (const [resolve] of this.joined) resolve(user);
  }

  reject(err: unknown): void {
    this.firstReject?.(err);
    if (this.joined) for (const [, reject] of this.joined) reject(err);
  }
}

/**
 * Cached records are shared: one object is handed to every caller that asks for the user
 * while it is cached, instead of a copy each (a copy per Redis hit was a twentieth of that
 * path's garbage). Frozen, so that no caller can change what another one reads.
 */
function shared(u: UserRecord): UserRecord {
  Object.freeze(u.aliases);
  return Object.freeze(u);
}

/** A Redis cache value: the record, null for a cached negative, undefined for nothing usable. */
function parseCached(raw: string | null): UserRecord | null | undefined {
  if (raw === null) return undefined;
  if (raw === NEGATIVE) return null;
  try {
    const v = JSON.parse(raw) as UserRecord;
    return v && typeof v.uid === 'string' && typeof v.dn === 'string' && Array.isArray(v.aliases) ? shared(v) : undefined;
  } catch {
    return undefined;
  }
}

export class CachingDirectory implements Directory {
  private readonly backend: DirectoryBackend;
  /** LDAP compares uid with caseIgnoreMatch: `Alice` and `alice` share cache entries there. */
  private readonly uidFold: boolean;
  private readonly cfg: CacheConfig;
  private readonly log: Logger;
  private readonly m: DirectoryMetrics;
  private readonly bus: RedisBus | undefined;
  private readonly lru: LRUCache<string, Cached> | null;
  private readonly inflight = new Map<string, PendingLookup>();
  /** Bumped by every invalidation: an answer read before it is returned but not cached. */
  private epoch = 0;
  private pairs: { at: number; list: PairRecord[] } | null = null;
  private pairsInflight: Promise<PairRecord[]> | null = null;
  private counts: { at: number; byPair: Map<string, number> } | null = null;
  private readonly loggedOnce = new Set<string>();
  private readonly unsubscribe: (() => void) | null;
  private closed = false;
  // Labelled children bound once: the in-process hit path is a few microseconds.
  private readonly count: Record<'lruHit' | 'lruMiss' | 'redisHit' | 'redisMiss' | 'found' | 'notFound' | 'error' | 'authOk' | 'authFail' | 'authError', { inc(): void; add(n: number): void }>;

  constructor(opts: CachingDirectoryOptions) {
    this.backend = opts.backend;
    this.uidFold = opts.backend.kind === 'ldap';
    this.cfg = opts.cache;
    this.log = opts.log;
    this.m = opts.metrics;
    this.bus = opts.bus;
    this.lru =
      opts.cache.maxEntries > 0
        ? new LRUCache<string, Cached>({
            max: opts.cache.maxEntries,
            ttl: Math.max(1, opts.cache.ttlMs),
            // The clock read on each look-up instead of cached for 1 ms by a timer: that timer's
            // wake-up came once per login at proxy rates.
            ttlResolution: 0,
          })
        : null;
    const m = this.m;
    // Counted as plain numbers, added to the metrics when they are read (common/metrics.ts Tally).
    const tally = (metric: typeof m.cache | typeof m.lookups | typeof m.auth, labels: Record<string, string>) => {
      const t = tallyOf(metric);
      return { inc: () => t.add(labels, 1), add: (n: number) => t.add(labels, n) };
    };
    this.count = {
      lruHit: tally(m.cache, { layer: 'lru', result: 'hit' }),
      lruMiss: tally(m.cache, { layer: 'lru', result: 'miss' }),
      redisHit: tally(m.cache, { layer: 'redis', result: 'hit' }),
      redisMiss: tally(m.cache, { layer: 'redis', result: 'miss' }),
      found: tally(m.lookups, { result: 'found' }),
      notFound: tally(m.lookups, { result: 'not_found' }),
      error: tally(m.lookups, { result: 'error' }),
      authOk: tally(m.auth, { result: 'ok' }),
      authFail: tally(m.auth, { result: 'fail' }),
      authError: tally(m.auth, { result: 'error' }),
    };
    this.unsubscribe = this.bus ? this.bus.onEvent((e) => this.onBusEvent(e)) : null;
    this.backend.onChange?.((change) => {
      if (change.pairsChanged) this.dropPairs();
      if (change.logins.length) void this.invalidate(change.logins).catch((err) => this.log.warn({ err: (err as Error).message }, 'directory: invalidation after reload failed'));
    });
  }

  // ---- look-ups -------------------------------------------------------------------------

  findLogin(login: string): Promise<UserRecord | null> {
    return this.lookup('login', login);
  }

  findRecipient(address: string): Promise<UserRecord | null> {
    return this.lookup('rcpt', address);
  }

  private redisKey(kind: Kind, key: string): string {
    return kind === 'login' ? keys.route(key) : keys.directory('rcpt', key);
  }

  private get useRedis(): boolean {
    return !!this.bus && this.cfg.redis;
  }

  /**
   * The hot path of every login and recipient: written with plain promise callbacks bound
   * once, not async functions, because at tens of thousands of look-ups a second the
   * allocations of each await (frames, reactions) set the rate of young-generation GC pauses,
   * and those pauses are the look-up's p99.
   */
  private lookup(kind: Kind, raw: string): Promise<UserRecord | null> {
    const key = normalizeLogin(raw, this.uidFold);
    if (key === null || (kind === 'rcpt' && !key.includes('@'))) {
      this.count.notFound.inc();
      return Promise.resolve(null);
    }
    const lruKey = `${kind}:${key}`;
    if (this.lru) {
      const hit = this.lru.get(lruKey);
      if (hit) {
        this.count.lruHit.inc();
        (hit.user ? this.count.found : this.count.notFound).inc();
        return Promise.resolve(hit.user);
      }
      this.count.lruMiss.inc();
    }
    const joining = this.inflight.get(lruKey);
    if (joining) return joining.join();
    const pending = new PendingLookup(kind, key, lruKey, this.epoch);
    this.inflight.set(lruKey, pending);
    const answer = pending.join();
    if (!this.useRedis) this.askBackend(pending);
    else if (!this.bus!.connected) {
      // Redis down: a miss of that layer, answered by the backend.
      this.count.redisMiss.inc();
      this.askBackend(pending);
    } else {
      this.pendingGets.push(pending);
      if (this.pendingGets.length === 1) setImmediate(this.flushGetsBound);
    }
    return answer;
  }

  /** Ends a look-up: later callers start a new one; each caller is counted and answered. */
  private settle(pending: PendingLookup, user: UserRecord | null): void {
    this.forget(pending);
    (user ? this.count.found : this.count.notFound).add(pending.callers);
    pending.resolve(user);
  }

  private fail(pending: PendingLookup, err: unknown): void {
    this.forget(pending);
    this.count.error.add(pending.callers);
    pending.reject(err);
  }

  /** Takes a finished look-up out of `inflight`, unless an invalidation already replaced it there. */
  private forget(pending: PendingLookup): void {
    if (this.inflight.get(pending.lruKey) === pending) this.inflight.delete(pending.lruKey);
  }

  private askBackend(pending: PendingLookup): void {
    this.fromBackend(pending.kind, pending.key, pending.lruKey, pending.epoch).then(
      (user) => this.settle(pending, user),
      (err: unknown) => this.fail(pending, err),
    );
  }

  private async fromBackend(kind: Kind, key: string, lruKey: string, epoch: number): Promise<UserRecord | null> {
    const found = kind === 'login' ? await this.backend.findLogin(key) : await this.backend.findRecipient(key);
    const user = found ? shared(found) : null;
    const ttl = user ? this.cfg.ttlMs : this.cfg.negativeTtlMs;
    // An invalidation while this look-up ran may have made its answer stale: do not keep it.
    if (ttl > 0 && epoch === this.epoch) {
      this.lru?.set(lruKey, { user }, { ttl });
      if (this.useRedis) {
        this.bus!.set(this.redisKey(kind, key), user ? JSON.stringify(user) : NEGATIVE, ttl).catch(() => undefined);
      }
    }
    return user;
  }

  /** Look-ups waiting for the next MGET. */
  private pendingGets: PendingLookup[] = [];

  private readonly flushGetsBound = () => this.flushGets();

  /**
   * Redis GETs asked for in one turn of the event loop go out as one MGET: under load the
   * look-ups of many sessions share a round trip (and a write and a read system call). Each
   * look-up is settled here, without a promise step of its own in between: a hit is the cached
   * answer (a record, or null for a cached "no such user"); a miss (not in Redis, unreadable,
   * or Redis unavailable) is asked of the backend.
   */
  private flushGets(): void {
    const batch = this.pendingGets;
    this.pendingGets = [];
    const settle = (values: Array<string | null> | null) => {
      for (let i = 0; i < batch.length; i++) {
        const pending = batch[i]!;
        try {
          this.settleGet(pending, parseCached(values?.[i] ?? null));
        } catch (err) {
          this.fail(pending, err);
        }
      }
    };
    const req =
      batch.length === 1
        ? this.bus!.get(this.redisKey(batch[0]!.kind, batch[0]!.key)).then((v) => [v])
        : this.bus!.mget(batch.map((b) => this.redisKey(b.kind, b.key)));
    req.then(settle, () => settle(null));
  }

  private settleGet(pending: PendingLookup, cached: UserRecord | null | undefined): void {
    if (cached === undefined) {
      this.count.redisMiss.inc();
      this.askBackend(pending);
      return;
    }
    this.count.redisHit.inc();
    if (pending.epoch === this.epoch) this.lru?.set(pending.lruKey, { user: cached }, { ttl: cached ? this.cfg.ttlMs : this.cfg.negativeTtlMs });
    this.settle(pending, cached);
  }

  // ---- authentication -------------------------------------------------------------------

  async authenticate(login: string, password: string): Promise<UserRecord> {
    try {
      if (typeof password !== 'string' || password.length === 0) throw new AuthError('invalid credentials (empty password)');
      const user = await this.findLogin(login);
      if (!user) {
        // Same work as a wrong password, so that timing does not tell which logins exist.
        await this.backend.bindUser('', password).catch(() => undefined);
        throw new AuthError('invalid credentials');
      }
      await this.backend.bindUser(user.dn, password);
      this.count.authOk.inc();
      return user;
    } catch (err) {
      (err instanceof AuthError ? this.count.authFail : this.count.authError).inc();
      throw err;
    }
  }

  // ---- pairs ----------------------------------------------------------------------------

  async listPairs(): Promise<PairRecord[]> {
    return (await this.pairList(false)).map((p) => ({ ...p, ports: { ...p.ports } }));
  }

  private async pairList(force: boolean): Promise<PairRecord[]> {
    const now = Date.now();
    if (!force && this.pairs && now - this.pairs.at < this.cfg.pairsTtlMs) return this.pairs.list;
    if (!this.pairsInflight) {
      this.pairsInflight = this.backend
        .listPairs()
        .then((list) => {
          const sorted = [...list].sort((a, b) => a.id.localeCompare(b.id));
          this.pairs = { at: Date.now(), list: sorted };
          return sorted;
        })
        .finally(() => {
          this.pairsInflight = null;
        });
    }
    try {
      return await this.pairsInflight;
    } catch (err) {
      // Keep routing with the last known list while the backend is unreachable.
      if (this.pairs && err instanceof PairgateError && err.temporary) {
        this.logOnce(`stale-pairs`, () => this.log.warn({ err: err.message }, 'directory: pair list unavailable; using the last one read'));
        return this.pairs.list;
      }
      throw err;
    }
  }

  async getPair(id: string): Promise<PairRecord | null> {
    let list = await this.pairList(false);
    let found = list.find((p) => p.id === id);
    if (!found && this.pairs && Date.now() - this.pairs.at > 1000) {
      list = await this.pairList(true);
      found = list.find((p) => p.id === id);
    }
    return found ? { ...found, ports: { ...found.ports } } : null;
  }

  private logOnce(key: string, fn: () => void): void {
    if (this.loggedOnce.has(key)) return;
    if (this.loggedOnce.size > 10_000) this.loggedOnce.clear();
    this.loggedOnce.add(key);
    fn();
  }

  async routeFor(user: UserRecord): Promise<Route> {
    if (!user.pair) {
      this.logOnce(`nopair|${user.dn}`, () => this.log.error({ dn: user.dn }, 'directory: user has no mailHost (home pair)'));
      throw new NotFoundError(`user ${user.uid} has no home pair (mailHost)`, { details: { dn: user.dn } });
    }
    const pair = await this.getPair(user.pair);
    if (!pair) {
      this.logOnce(`unknown|${user.dn}|${user.pair}`, () => this.log.error({ dn: user.dn, pair: user.pair }, 'directory: mailHost names no pair'));
      throw new NotFoundError(`home pair ${user.pair} of ${user.uid} does not exist`, { details: { dn: user.dn, pair: user.pair } });
    }
    if (pair.state === 'retired') {
      this.logOnce(`retired|${user.dn}|${user.pair}`, () => this.log.error({ dn: user.dn, pair: user.pair }, 'directory: mailHost names a retired pair'));
      throw new NotFoundError(`home pair ${user.pair} of ${user.uid} is retired`, { details: { dn: user.dn, pair: user.pair } });
    }
    return { user, pair };
  }

  // ---- placement and changes ------------------------------------------------------------

  private async userCounts(): Promise<Map<string, number>> {
    if (this.counts && Date.now() - this.counts.at < this.cfg.countsTtlMs) return this.counts.byPair;
    const byPair = await this.backend.countUsersByPair();
    this.counts = { at: Date.now(), byPair };
    return byPair;
  }

  async usersPerPair(): Promise<Map<string, number>> {
    return new Map(await this.userCounts());
  }

  async placeNewUser(): Promise<PairRecord> {
    const [pairs, counts] = await Promise.all([this.pairList(false), this.userCounts()]);
    const chosen = choosePair(pairs, counts);
    if (!chosen) throw new NotFoundError('no active pair to place a new user on');
    return { ...chosen, ports: { ...chosen.ports } };
  }

  async addUser(nu: NewUser): Promise<UserRecord> {
    if (typeof nu.uid !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/.test(nu.uid)) {
      throw new BadInputError(`uid ${JSON.stringify(nu.uid)} is not valid (letters, digits, . _ + -, up to 64)`);
    }
    if (!nu.password) throw new BadInputError('a new user needs a password');
    const addresses = [nu.mail, ...(nu.aliases ?? [])].map((a) => normalizeAddress(a ?? ''));
    for (const a of addresses) if (!/^[^@\s]+@[^@\s]+$/.test(a)) throw new BadInputError(`address ${JSON.stringify(a)} is not valid`);
    let pair: PairRecord;
    if (nu.pair) {
      const p = await this.getPair(nu.pair);
      if (!p) throw new NotFoundError(`pair ${nu.pair} does not exist`);
      if (p.state === 'retired') throw new NotFoundError(`pair ${nu.pair} is retired`);
      pair = p;
    } else pair = await this.placeNewUser();
    if (await this.backend.findLogin(nu.uid)) throw new ConflictError(`uid ${nu.uid} is taken`);
    for (const a of addresses) {
      const owner = await this.backend.findRecipient(a);
      if (owner) throw new ConflictError(`address ${a} belongs to ${owner.uid}`);
    }
    const user = await this.backend.addUser({
      uid: nu.uid,
      passwordHash: hashPassword(nu.password, this.backend.kind === 'ldap' ? 'SSHA' : 'SSHA512'),
      mail: addresses[0]!,
      aliases: addresses.slice(1),
      pair: pair.id,
      cn: nu.cn ?? nu.uid,
      quotaBytes: nu.quotaBytes,
    });
    if (this.counts) this.counts.byPair.set(pair.id, (this.counts.byPair.get(pair.id) ?? 0) + 1);
    this.log.info({ uid: user.uid, dn: user.dn, pair: pair.id }, 'directory: user added');
    await this.invalidate([user.uid, user.mail, ...user.aliases]);
    return user;
  }

  async setUserPair(uid: string, pairId: string): Promise<void> {
    const target = await this.getPair(pairId);
    if (!target) throw new NotFoundError(`pair ${pairId} does not exist`);
    if (target.state === 'retired') throw new NotFoundError(`pair ${pairId} is retired`);
    const before = await this.backend.findLogin(uid);
    const user = await this.backend.setUserPair(uid, pairId);
    this.counts = null;
    this.log.info({ uid: user.uid, dn: user.dn, from: before?.pair, to: pairId }, 'directory: home pair changed');
    await this.invalidate([user.uid, user.mail, ...user.aliases, ...(before ? [before.mail, ...before.aliases] : [])]);
  }

  // ---- invalidation ---------------------------------------------------------------------

  /** Drops local entries for these logins and every entry of the users they name. */
  private dropLocal(logins: string[]): string[] {
    this.epoch++;
    const normal = new Set(logins.map((l) => normalizeLogin(l, this.uidFold)).filter((l): l is string => l !== null));
    if (this.lru) this.dropFromLru(normal);
    for (const l of normal) {
      // Later callers must not join a look-up that started before the change: for every name
      // given, and every other name of their users that the LRU knew.
      this.inflight.delete(`login:${l}`);
      this.inflight.delete(`rcpt:${l}`);
    }
    return [...normal];
  }

  /** Drops the LRU's entries for these names and for every name of the users they name, adding those names to `normal`. */
  private dropFromLru(normal: Set<string>): void {
    const lru = this.lru!;
    const uids = new Set<string>();
    // A set visits what is added while it is walked: the names of each user found are looked at too.
    for (const l of normal) {
      for (const kind of ['login', 'rcpt'] as const) {
        const c = lru.peek(`${kind}:${l}`);
        if (c?.user) {
          uids.add(c.user.uid);
          normal.add(this.uidFold ? c.user.uid.toLowerCase() : c.user.uid);
          normal.add(c.user.mail);
          for (const a of c.user.aliases) normal.add(a);
        }
      }
    }
    for (const l of normal) {
      lru.delete(`login:${l}`);
      lru.delete(`rcpt:${l}`);
    }
    if (uids.size) {
      for (const [k, v] of lru.entries()) {
        if (v.user && uids.has(v.user.uid)) {
          lru.delete(k);
          normal.add(k.slice(k.indexOf(':') + 1));
        }
      }
    }
  }

  private dropPairs(): void {
    this.pairs = null;
    this.counts = null;
  }

  private onBusEvent(e: BusEvent): void {
    if (e.type !== 'route-invalidate') return;
    const ev = e as { logins?: unknown; user?: unknown; pair?: unknown };
    const logins = [
      ...(Array.isArray(ev.logins) ? ev.logins.filter((l): l is string => typeof l === 'string') : []),
      ...(typeof ev.user === 'string' ? [ev.user] : []),
    ];
    if (logins.length) this.dropLocal(logins);
    if (typeof ev.pair === 'string') this.dropPairs();
  }

  async invalidate(logins: string[]): Promise<void> {
    const all = this.dropLocal(logins);
    if (!this.bus || all.length === 0) return;
    try {
      if (this.cfg.redis) await this.bus.del(...all.flatMap((l) => [keys.route(l), keys.directory('rcpt', l)]));
      await this.bus.publish({ type: 'route-invalidate', logins: all });
    } catch (err) {
      // Redis down: other instances keep their entries until the TTL ends.
      this.log.warn({ err: (err as Error).message, logins: all.length }, 'directory: invalidation not published (redis unavailable); other caches expire by TTL');
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.unsubscribe?.();
    this.lru?.clear();
    await this.backend.close();
  }
}

