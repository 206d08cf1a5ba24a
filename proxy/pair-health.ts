/**
 * What the proxy knows about each pair's health, and the one question logins and deliveries
 * ask of it: "may I open a session on this pair now?" (`awaitServable`).
 *
 * Two sources, either enough on its own:
 * - Redis: the record at `pairgate:pair:<id>:health` (read each interval) and `health` events on
 *   the `pairgate:events` channel (applied at once);
 * - polling: `GET http://<pair address>:<admin port>/health` on the pair's floating address, so
 *   that routing survives a Redis outage.
 *
 * Freshness is judged on this host's clock: a record counts as new when its `at` advanced
 * since the last one seen (so clock skew between hosts does not matter). A pair with no new
 * record for `ttlMs` (HEALTH_TTL_MS) is `down`, as if its record said so.
 */
import { EventEmitter } from 'node:events';
import http from 'node:http';
import { isIP } from 'node:net';
import type { Logger } from '../common/log.ts';
import type { RedisBus, BusEvent } from '../common/redis-bus.ts';
import { keys } from '../common/redis-bus.ts';
import { HEALTH_TTL_MS, PAIR_STATES, pairServes, parseHealthRecord, type HealthRecord, type PairState } from '../common/health.ts';
import { UnavailableError } from '../common/errors.ts';
import { counter, gauge, type MetricsRegistry } from '../common/metrics.ts';
import type { Directory, PairRecord } from '../directory/types.ts';

export const DEFAULT_ADMIN_PORT = 9025;
/** Bound on a /health answer (a record is a few hundred bytes). */
const MAX_HEALTH_BYTES = 64 * 1024;

/** `unknown`: nothing heard yet about this pair (it was just learned of). */
export type EffectiveState = PairState | 'unknown';

export interface PairHealthChange {
  pair: string;
  from: EffectiveState;
  to: EffectiveState;
  reason: string;
}

export interface PairHealthOptions {
  log: Logger;
  registry?: MetricsRegistry | undefined;
  /** Redis bus (subscribed to events for instant changes); null/undefined = polling only. */
  bus?: RedisBus | null | undefined;
  /** Source of the pair list to follow (refreshed every `pairListRefreshMs`); pairs passed to awaitServable are followed too. */
  directory?: Pick<Directory, 'listPairs'> | undefined;
  /** How often Redis is read and each pair's /health polled. Default 1000 ms. */
  pollIntervalMs?: number;
  /** Bound on one /health request. Default 800 ms. */
  pollTimeoutMs?: number;
  /** A pair with no new record for this long is down. Default HEALTH_TTL_MS. */
  ttlMs?: number;
  /** Set false to follow Redis only (tests of the Redis path). Default true. */
  poll?: boolean;
  pairListRefreshMs?: number;
  /** Admin port when the pair entry has no `admin=` override. Default 9025. */
  defaultAdminPort?: number;
}

interface Tracked {
  pair: PairRecord;
  record: HealthRecord | null;
  /** Local time the last new record (advanced `at`) or event was seen; 0 = never. */
  seenAt: number;
  /** Effective state last reported through 'change'. */
  reported: EffectiveState;
  source: 'redis' | 'poll' | 'event' | 'none';
  /** When the pair was first followed (to bound "unknown"). */
  since: number;
}

export function healthUrl(pair: PairRecord, defaultAdminPort = DEFAULT_ADMIN_PORT): string {
  const host = isIP(pair.address) === 6 ? `[${pair.address}]` : pair.address;
  return `http://${host}:${pair.ports.admin ?? defaultAdminPort}/health`;
}

export class PairHealth extends EventEmitter {
  private readonly pairs = new Map<string, Tracked>();
  private readonly log: Logger;
  private readonly bus: RedisBus | null;
  private readonly opts: Required<Pick<PairHealthOptions, 'pollIntervalMs' | 'pollTimeoutMs' | 'ttlMs' | 'poll' | 'pairListRefreshMs' | 'defaultAdminPort'>>;
  private timer: NodeJS.Timeout | null = null;
  /** Keep-alive connections to the pairs' /health endpoints (a few per pair at most). */
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 2 });
  private listTimer: NodeJS.Timeout | null = null;
  private unsubscribe: (() => void) | null = null;
  private closed = false;
  private tickRunning = false;
  private readonly changes;
  private readonly polls;

  constructor(private readonly options: PairHealthOptions) {
    super();
    this.setMaxListeners(0);
    this.log = options.log.child({ component: 'pair-health' });
    this.bus = options.bus ?? null;
    this.opts = {
      pollIntervalMs: options.pollIntervalMs ?? 1000,
      pollTimeoutMs: options.pollTimeoutMs ?? 800,
      ttlMs: options.ttlMs ?? HEALTH_TTL_MS,
      poll: options.poll ?? true,
      pairListRefreshMs: options.pairListRefreshMs ?? 30_000,
      defaultAdminPort: options.defaultAdminPort ?? DEFAULT_ADMIN_PORT,
    };
    const reg = options.registry;
    this.changes = reg ? counter(reg, 'proxy_pair_state_changes_total', 'Pair health state changes seen by this proxy', ['pair', 'to']) : null;
    this.polls = reg ? counter(reg, 'proxy_health_polls_total', 'Health polls of pairs by source and outcome', ['pair', 'source', 'result']) : null;
    if (reg) {
      const self = this;
      gauge(reg, 'proxy_pair_state', 'Pair state as this proxy sees it (1 for the current state)', ['pair', 'state'], function collect() {
        this.reset();
        for (const t of self.pairs.values()) {
          const cur = self.state(t.pair.id);
          for (const s of [...PAIR_STATES, 'unknown'] as const) this.set({ pair: t.pair.id, state: s }, s === cur ? 1 : 0);
        }
      });
    }
  }

  /** Starts following: the pair list from the directory, Redis events, the poll timer. */
  async start(): Promise<void> {
    if (this.bus) this.unsubscribe = this.bus.onEvent((e) => this.onBusEvent(e));
    await this.refreshPairList();
    await this.tick();
    this.timer = setInterval(() => void this.tick(), this.opts.pollIntervalMs);
    this.timer.unref();
    if (this.options.directory) {
      this.listTimer = setInterval(() => void this.refreshPairList(), this.opts.pairListRefreshMs);
      this.listTimer.unref();
    }
  }

  /** Follows this pair from now on (idempotent; an updated record replaces the old address/ports). */
  track(pair: PairRecord): void {
    const t = this.pairs.get(pair.id);
    if (t) {
      t.pair = pair;
      return;
    }
    this.pairs.set(pair.id, { pair, record: null, seenAt: 0, reported: 'unknown', source: 'none', since: Date.now() });
  }

  /** The pair's state now: its record's state, `down` when stale, `unknown` when never heard of. */
  state(pairId: string): EffectiveState {
    const t = this.pairs.get(pairId);
    if (!t) return 'unknown';
    return this.effective(t, Date.now());
  }

  /** The last record seen for the pair (null when none), for status pages. */
  record(pairId: string): HealthRecord | null {
    return this.pairs.get(pairId)?.record ?? null;
  }

  snapshot(): Array<{ pair: string; state: EffectiveState; source: string; ageMs: number | null }> {
    const now = Date.now();
    return [...this.pairs.values()].map((t) => ({
      pair: t.pair.id,
      state: this.effective(t, now),
      source: t.source,
      ageMs: t.seenAt ? now - t.seenAt : null,
    }));
  }

  private effective(t: Tracked, now: number): EffectiveState {
    if (t.seenAt === 0) return now - t.since > this.opts.ttlMs ? 'down' : 'unknown';
    if (now - t.seenAt > this.opts.ttlMs) return 'down';
    return t.record?.state ?? 'unknown';
  }

  /**
   * Resolves when the pair serves (ok or degraded). While it is `failing-over` (or not heard
   * of yet) it waits, at most `timeoutMs`. Throws UnavailableError at once when the pair is
   * down, in maintenance or its record is stale, and when the wait runs out.
   */
  async awaitServable(pair: PairRecord, timeoutMs: number): Promise<void> {
    this.track(pair);
    const deadline = Date.now() + timeoutMs;
    let st = this.state(pair.id);
    if (st === 'unknown') {
      await this.refresh(pair.id);
      st = this.state(pair.id);
    }
    for (;;) {
      if (st === 'ok' || st === 'degraded') return;
      if (st === 'down' || st === 'maintenance') {
        throw new UnavailableError(`pair ${pair.id} is ${st}`, { details: { pair: pair.id, state: st } });
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new UnavailableError(`pair ${pair.id} still ${st} after ${timeoutMs} ms`, { details: { pair: pair.id, state: st } });
      await this.waitForChange(pair.id, Math.min(left, this.opts.pollIntervalMs));
      st = this.state(pair.id);
    }
  }

  private waitForChange(pairId: string, ms: number): Promise<void> {
    return new Promise((resolve) => {
      const onChange = (c: PairHealthChange) => {
        if (c.pair !== pairId) return;
        done();
      };
      const done = () => {
        clearTimeout(timer);
        this.off('change', onChange);
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.on('change', onChange);
    });
  }

  /** Reads Redis and polls /health for one pair now (bounded by the poll timeout). */
  async refresh(pairId: string): Promise<void> {
    const t = this.pairs.get(pairId);
    if (!t) return;
    await Promise.all([this.readRedis([t]), this.opts.poll ? this.pollPair(t) : Promise.resolve()]);
    this.evaluate();
  }

  private async refreshPairList(): Promise<void> {
    if (!this.options.directory) return;
    try {
      const list = await this.options.directory.listPairs();
      for (const p of list) if (p.state !== 'retired') this.track(p);
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'cannot list pairs from the directory; following the pairs already known');
    }
  }

  private async tick(): Promise<void> {
    if (this.closed || this.tickRunning) return;
    this.tickRunning = true;
    try {
      const all = [...this.pairs.values()];
      await Promise.all([this.readRedis(all), ...(this.opts.poll ? all.map((t) => this.pollPair(t)) : [])]);
      this.evaluate();
    } finally {
      this.tickRunning = false;
    }
  }

  /** Takes a record if it is newer than the one held. */
  private accept(t: Tracked, rec: HealthRecord, source: Tracked['source']): void {
    if (rec.pair !== t.pair.id) {
      this.log.warn({ pair: t.pair.id, recordPair: rec.pair, source }, 'ignored a health record for another pair');
      return;
    }
    if (t.record && rec.at <= t.record.at && t.seenAt > 0) return;
    t.record = rec;
    t.seenAt = Date.now();
    t.source = source;
  }

  private async readRedis(list: Tracked[]): Promise<void> {
    if (!this.bus || !this.bus.connected || list.length === 0) return;
    try {
      const values = await this.bus.mget(list.map((t) => keys.pairHealth(t.pair.id)));
      values.forEach((v, i) => {
        const t = list[i]!;
        if (v === null) return;
        const rec = parseHealthRecord(v);
        if (!rec) {
          this.polls?.inc({ pair: t.pair.id, source: 'redis', result: 'malformed' });
          return;
        }
        this.polls?.inc({ pair: t.pair.id, source: 'redis', result: 'ok' });
        this.accept(t, rec, 'redis');
      });
    } catch (err) {
      this.log.debug({ err: (err as Error).message }, 'health read from redis failed');
    }
  }

  private async pollPair(t: Tracked): Promise<void> {
    const url = healthUrl(t.pair, this.opts.defaultAdminPort);
    try {
      const text = await this.httpGet(url, this.opts.pollTimeoutMs);
      const rec = parseHealthRecord(text);
      if (!rec) {
        this.polls?.inc({ pair: t.pair.id, source: 'poll', result: 'malformed' });
        return;
      }
      this.polls?.inc({ pair: t.pair.id, source: 'poll', result: 'ok' });
      this.accept(t, rec, 'poll');
    } catch {
      // Unreachable: nothing new learned; staleness turns it into `down` after the TTL.
      this.polls?.inc({ pair: t.pair.id, source: 'poll', result: 'error' });
    }
  }

  /**
   * GET `url` through this object's keep-alive agent and return the body, bounded by
   * `timeoutMs` and MAX_HEALTH_BYTES. node:http rather than fetch: one poll per pair per
   * interval, and fetch (undici) took about twice the CPU per request of node:http's client.
   */
  private httpGet(url: string, timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      let settled = false;
      const finish = (err: Error | null, body?: string) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (err) {
          req.destroy();
          reject(err);
        } else resolve(body!);
      };
      const req = http.get(url, { agent: this.agent }, (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_HEALTH_BYTES) finish(new Error('health record too large'));
          else chunks.push(c);
        });
        res.on('end', () => finish(null, Buffer.concat(chunks).toString('utf8')));
        res.on('error', (err) => finish(err));
        res.on('aborted', () => finish(new Error('health response aborted')));
      });
      req.on('error', (err) => finish(err));
      const timer = setTimeout(() => finish(new Error(`health poll timed out after ${timeoutMs} ms`)), timeoutMs);
    });
  }

  private onBusEvent(e: BusEvent): void {
    if (e.type !== 'health' || typeof e.pair !== 'string') return;
    const t = this.pairs.get(e.pair);
    if (!t) return;
    const state = e.state as PairState;
    if (!(PAIR_STATES as readonly string[]).includes(state)) return;
    const at = typeof e.at === 'number' ? e.at : Date.now();
    if (t.record && at < t.record.at) return;
    t.record = t.record ? { ...t.record, state, at } : null;
    if (t.record) {
      t.seenAt = Date.now();
      t.source = 'event';
      this.evaluate();
    } else {
      void this.refresh(e.pair);
    }
  }

  /** Emits 'change' for each pair whose effective state moved since the last report. */
  private evaluate(): void {
    const now = Date.now();
    for (const t of this.pairs.values()) {
      const to = this.effective(t, now);
      if (to === t.reported) continue;
      const from = t.reported;
      t.reported = to;
      const reason = t.seenAt && now - t.seenAt > this.opts.ttlMs ? 'record stale' : `record (${t.source})`;
      this.changes?.inc({ pair: t.pair.id, to });
      this.log.info({ pair: t.pair.id, from, to, reason }, 'pair health changed');
      this.emit('change', { pair: t.pair.id, from, to, reason } satisfies PairHealthChange);
    }
  }

  override on(event: 'change', listener: (change: PairHealthChange) => void): this;
  override on(event: string | symbol, listener: (...args: any[]) => void): this;
  override on(event: string | symbol, listener: (...args: any[]) => void): this {
    return super.on(event, listener);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    if (this.listTimer) clearInterval(this.listTimer);
    this.unsubscribe?.();
    this.removeAllListeners();
    this.agent.destroy();
  }
}

export { pairServes };
