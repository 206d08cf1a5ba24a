/**
 * Failed-login limits shared by every proxy: counters per client address and per login in
 * Redis (`pairgate:authfail:ip:<addr>`, `pairgate:authfail:user:<login>`, fixed windows),
 * with counters in this process while Redis is down. Failures are answered after a delay that
 * grows with the count; past the limit the address (or login) is locked for the rest of the window.
 *
 * Keep `maxPerLogin` above `maxPerIp`: an attacker at one address locks that address out long
 * before the victim's own logins from elsewhere are refused.
 */
import type { Logger } from '../common/log.ts';
import { keys, type RedisBus } from '../common/redis-bus.ts';
import type { ProxyMetrics } from './metrics.ts';

export interface AuthLimitsConfig {
  windowMs: number;
  maxPerIp: number;
  maxPerLogin: number;
  delayStepMs: number;
  maxDelayMs: number;
}

export interface LimitVerdict {
  locked: boolean;
  scope?: 'ip' | 'login';
  ipFailures: number;
  loginFailures: number;
}

const LOCAL_MAX_ENTRIES = 100_000;
const UNLIMITED: LimitVerdict = Object.freeze({ locked: false, ipFailures: 0, loginFailures: 0 });

/** Logins are case-folded and bounded before they become keys. */
export function loginKey(login: string): string {
  return login.trim().toLowerCase().slice(0, 256);
}

export class AuthLimiter {
  private readonly local = new Map<string, { count: number; expires: number }>();
  private pruneTimer: NodeJS.Timeout;

  constructor(
    private cfg: AuthLimitsConfig,
    private readonly bus: RedisBus | null,
    private readonly log: Logger,
    private readonly metrics?: ProxyMetrics,
  ) {
    this.pruneTimer = setInterval(() => this.prune(), 30_000);
    this.pruneTimer.unref();
  }

  private localGet(key: string): number {
    const e = this.local.get(key);
    if (!e) return 0;
    if (e.expires <= Date.now()) {
      this.local.delete(key);
      return 0;
    }
    return e.count;
  }

  private localIncr(key: string): number {
    const now = Date.now();
    let e = this.local.get(key);
    if (!e || e.expires <= now) {
      if (this.local.size >= LOCAL_MAX_ENTRIES) this.prune(true);
      e = { count: 0, expires: now + this.cfg.windowMs };
      this.local.set(key, e);
    }
    e.count++;
    return e.count;
  }

  private prune(force = false): void {
    const now = Date.now();
    for (const [k, e] of this.local) if (e.expires <= now) this.local.delete(k);
    if (force && this.local.size >= LOCAL_MAX_ENTRIES) {
      // Still full of live entries: drop the oldest quarter (Map keeps insertion order).
      let n = Math.floor(LOCAL_MAX_ENTRIES / 4);
      for (const k of this.local.keys()) {
        if (n-- <= 0) break;
        this.local.delete(k);
      }
    }
  }

  /**
   * The verdict when it needs no Redis round trip: both limits off (nothing can lock), or no
   * Redis configured (local counters only); null when check() must ask Redis.
   */
  checkNow(ip: string, login: string): LimitVerdict | null {
    if (this.cfg.maxPerIp <= 0 && this.cfg.maxPerLogin <= 0) return UNLIMITED;
    if (this.bus) return null;
    return this.verdict(this.localGet(keys.authFailIp(ip)), this.localGet(keys.authFailUser(loginKey(login))));
  }

  private verdict(ipFailures: number, loginFailures: number): LimitVerdict {
    const ipLocked = this.cfg.maxPerIp > 0 && ipFailures >= this.cfg.maxPerIp;
    const loginLocked = this.cfg.maxPerLogin > 0 && loginFailures >= this.cfg.maxPerLogin;
    if (ipLocked || loginLocked) this.metrics?.throttled.inc({ scope: ipLocked ? 'ip' : 'login' });
    return { locked: ipLocked || loginLocked, ...(ipLocked ? { scope: 'ip' as const } : loginLocked ? { scope: 'login' as const } : {}), ipFailures, loginFailures };
  }

  /** Current failure counts; the larger of Redis and local is taken (local covers Redis outages). */
  async check(ip: string, login: string): Promise<LimitVerdict> {
    const ipKey = keys.authFailIp(ip);
    const userKey = keys.authFailUser(loginKey(login));
    let ipFailures = this.localGet(ipKey);
    let loginFailures = this.localGet(userKey);
    if (this.bus) {
      try {
        const [a, b] = await this.bus.mget([ipKey, userKey]);
        ipFailures = Math.max(ipFailures, Number(a ?? 0) || 0);
        loginFailures = Math.max(loginFailures, Number(b ?? 0) || 0);
      } catch {
        // Redis down: local counters only.
      }
    }
    return this.verdict(ipFailures, loginFailures);
  }

  /** Counts a failure; returns the delay to apply before answering it. */
  async fail(ip: string, login: string): Promise<number> {
    const ipKey = keys.authFailIp(ip);
    const userKey = keys.authFailUser(loginKey(login));
    let ipCount = 0;
    let redisOk = false;
    if (this.bus) {
      try {
        const [a] = await Promise.all([this.bus.incrWithTtl(ipKey, this.cfg.windowMs), this.bus.incrWithTtl(userKey, this.cfg.windowMs)]);
        ipCount = a;
        redisOk = true;
      } catch (err) {
        this.log.debug({ err: (err as Error).message }, 'auth failure not counted in redis; counting locally');
      }
    }
    // Local counters always run, so a Redis outage starts from what this proxy saw.
    const localIp = this.localIncr(ipKey);
    this.localIncr(userKey);
    if (!redisOk) ipCount = localIp;
    const delay = Math.min(this.cfg.maxDelayMs, this.cfg.delayStepMs * 2 ** Math.min(Math.max(ipCount - 1, 0), 20));
    if (delay > 0) this.metrics?.throttled.inc({ scope: 'delay' });
    return delay;
  }

  /** New limits (config reload); counters are kept. */
  configure(cfg: AuthLimitsConfig): void {
    this.cfg = cfg;
  }

  close(): void {
    clearInterval(this.pruneTimer);
  }
}
