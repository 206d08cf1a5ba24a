/**
 * What every client session of one proxy shares: config, directory, pair health, limits,
 * metrics, the TLS certificate and the registry of open sessions (for per-user caps, for
 * closing a pair's sessions when it goes down, and for the graceful stop).
 */
import type { Logger } from '../common/log.ts';
import type { AddressList } from '../common/cidr.ts';
import type { Directory } from '../directory/types.ts';
import type { RedisBus } from '../common/redis-bus.ts';
import type { ProxyConfig } from './config.ts';
import type { PairHealth } from './pair-health.ts';
import type { AuthLimiter } from './rate-limit.ts';
import type { ProxyMetrics, ProxyTallies } from './metrics.ts';
import type { TlsStore } from './tls.ts';

export type Protocol = 'imap' | 'pop3';

/** One open client session, as the registry sees it. */
export interface SessionHandle {
  cid: string;
  protocol: Protocol;
  clientAddress: string;
  /** Set once logged in. */
  uid: string | null;
  pair: string | null;
  /** Closes the session with the protocol's goodbye. */
  kick(reason: string): void;
  /** Resolves when the session is gone. */
  closed: Promise<void>;
  /** Adds bytes relayed since the last call to the byte metric (called every few seconds). */
  flushBytes?(): void;
  /** The registry's once-a-second look at the session (idle timeout, closing bound). */
  sweep?(now: number): void;
}

const addressVerdicts = new WeakMap<AddressList, Map<string, boolean>>();

/**
 * `list.has(address)`, remembered per list object and address (a config reload makes new list
 * objects, so nothing stale is kept): BlockList checks build a SocketAddress each time, and the
 * same few load-balancer, client and pair addresses come up on every connection.
 */
export function inList(list: AddressList, address: string): boolean {
  let verdicts = addressVerdicts.get(list);
  if (!verdicts) addressVerdicts.set(list, (verdicts = new Map()));
  let v = verdicts.get(address);
  if (v === undefined) {
    v = list.has(address);
    if (verdicts.size >= 10_000) verdicts.clear();
    verdicts.set(address, v);
  }
  return v;
}

export class SessionRegistry {
  private readonly all = new Set<SessionHandle>();
  private readonly perUser = new Map<string, number>();
  /**
   * The sessions counted in `perUser`, with the user each is counted for. A session is counted
   * out once, by whichever comes first: its end (remove) or a failed login (unbindUser). A login
   * runs on after its client left (directory bind, held backend login): checked against this
   * map, neither a bind after the end nor an unbind after it changes the count.
   */
  private readonly bound = new Map<SessionHandle, string>();

  /** A new session; it calls remove() when it ends. */
  add(s: SessionHandle): void {
    this.all.add(s);
  }

  /** Whether the session is still open (added and not yet removed). */
  has(s: SessionHandle): boolean {
    return this.all.has(s);
  }

  remove(s: SessionHandle): void {
    if (!this.all.delete(s)) return;
    this.countOut(s);
  }

  /**
   * Marks a session logged in; returns false (and changes nothing) when the user's cap is
   * reached or the session has already ended.
   */
  bindUser(s: SessionHandle, uid: string, cap: number): boolean {
    if (!this.all.has(s)) return false;
    if (this.bound.get(s) === uid) return true;
    this.countOut(s);
    const n = this.perUser.get(uid) ?? 0;
    if (cap > 0 && n >= cap) return false;
    this.perUser.set(uid, n + 1);
    this.bound.set(s, uid);
    s.uid = uid;
    return true;
  }

  /** Undoes bindUser (a login that failed after the cap check). */
  unbindUser(s: SessionHandle): void {
    this.countOut(s);
    s.uid = null;
  }

  private countOut(s: SessionHandle): void {
    const uid = this.bound.get(s);
    if (uid === undefined) return;
    this.bound.delete(s);
    this.decUser(uid);
  }

  private decUser(uid: string): void {
    const n = (this.perUser.get(uid) ?? 1) - 1;
    if (n <= 0) this.perUser.delete(uid);
    else this.perUser.set(uid, n);
  }

  userSessions(uid: string): number {
    return this.perUser.get(uid) ?? 0;
  }

  byPair(pair: string): SessionHandle[] {
    return [...this.all].filter((s) => s.pair === pair);
  }

  list(): SessionHandle[] {
    return [...this.all];
  }

  /** Every open session's byte counts into the metric (one timer for all sessions, not one each). */
  flushBytes(): void {
    for (const s of this.all) s.flushBytes?.();
  }

  /** Every open session's idle and closing bounds (one timer for all sessions, not timers per socket). */
  sweep(now = Date.now()): void {
    for (const s of this.all) s.sweep?.(now);
  }

  get size(): number {
    return this.all.size;
  }

  counts(): Record<string, Record<string, number>> {
    const out: Record<string, Record<string, number>> = {};
    for (const s of this.all) {
      const p = s.pair ?? '(pre-login)';
      out[s.protocol] ??= {};
      out[s.protocol]![p] = (out[s.protocol]![p] ?? 0) + 1;
    }
    return out;
  }
}

export interface ProxyContext {
  config: ProxyConfig;
  directory: Directory;
  pairHealth: PairHealth;
  limiter: AuthLimiter;
  metrics: ProxyMetrics;
  /** Per-session counts for `metrics`, added to them when they are read. */
  tallies: ProxyTallies;
  log: Logger;
  /** Load-balancer addresses: PROXY header required from them, refused from others. */
  loadBalancers: AddressList;
  /** Pair addresses the master secret may be sent to. */
  trustedBackends: AddressList;
  tls: TlsStore | null;
  /** Shared Redis (null when not configured). */
  bus: RedisBus | null;
  sessions: SessionRegistry;
  /** True once the graceful stop began: no new logins. */
  stopping: boolean;
}
