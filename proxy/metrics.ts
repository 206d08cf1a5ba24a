/**
 * The proxy tier's metrics (names are a contract with the Grafana dashboards). proxy/smtp
 * uses the same objects through `proxyMetrics(registry)`, so labels stay the same everywhere.
 */
import type { Counter, Gauge } from 'prom-client';
import { counter, createRegistry, gauge, histogram, type MetricsRegistry } from '../common/metrics.ts';

/** The proxy process's metrics registry (common/metrics.ts's, default process metrics included). */
export function proxyRegistry(defaultLabels: Record<string, string>): MetricsRegistry {
  return createRegistry(defaultLabels);
}

export function proxyMetrics(registry: MetricsRegistry) {
  return {
    sessions: gauge(registry, 'sessions', 'Open proxied sessions', ['protocol', 'pair', 'role']),
    sessionsTotal: counter(registry, 'sessions_total', 'Proxied sessions started', ['protocol', 'pair', 'role']),
    logins: counter(registry, 'logins_total', 'Login attempts by outcome', ['protocol', 'result']),
    loginSeconds: histogram(registry, 'login_seconds', 'Time from login command to the backend session being ready', ['protocol']),
    backendConnectFailures: counter(registry, 'backend_connect_failures_total', 'Failed connects or master logins to a pair', ['pair']),
    heldLogins: counter(registry, 'held_logins_total', 'Logins that waited for their pair (failing-over or connect failure)', ['pair']),
    heldSeconds: histogram(registry, 'held_login_seconds', 'How long held logins waited', ['pair']),
    bytes: counter(registry, 'proxy_bytes_total', 'Bytes spliced between clients and pairs', ['direction', 'protocol']),
    connections: gauge(registry, 'proxy_connections', 'Open client connections (before and after login)', ['protocol']),
    rejected: counter(registry, 'proxy_connections_rejected_total', 'Client connections refused before a session', ['protocol', 'reason']),
    throttled: counter(registry, 'proxy_auth_throttled_total', 'Logins refused or delayed by failed-login limits', ['scope']),
    closed: counter(registry, 'proxy_sessions_closed_total', 'Proxied sessions ended, by reason', ['protocol', 'reason']),
    tlsReloads: counter(registry, 'proxy_tls_reloads_total', 'Certificate reloads by outcome', ['result']),
  };
}

export type ProxyMetrics = ReturnType<typeof proxyMetrics>;

/**
 * Changes to a counter or gauge for label sets that come up on every session, kept as plain
 * numbers and added to the prom-client metric when it is read (a scrape, `registry.metrics()`,
 * `metric.get()`): prom-client hashes and validates the label object on every call, which at a
 * few hundred sessions a second was a measurable share of the proxy's CPU. The key is the label
 * object itself: callers make each label set once and never change it.
 */
export class Tally {
  private pending = new Map<object, number>();

  constructor(private readonly metric: Counter<string> | Gauge<string>) {
    // prom-client calls a metric's `collect` at the start of every read.
    const m = metric as unknown as { collect?: (this: unknown) => unknown };
    const before = m.collect;
    m.collect = (): unknown => {
      this.flush();
      return before?.call(metric);
    };
  }

  add(labels: object, n: number): void {
    this.pending.set(labels, (this.pending.get(labels) ?? 0) + n);
  }

  flush(): void {
    if (this.pending.size === 0) return;
    const pending = this.pending;
    this.pending = new Map();
    for (const [labels, n] of pending) {
      // A gauge moved up and down again still shows its series (at its value), as before.
      if (n >= 0) (this.metric as Counter<string>).inc(labels as Record<string, string>, n);
      else (this.metric as Gauge<string>).dec(labels as Record<string, string>, -n);
    }
  }
}

const tallies = new WeakMap<object, Tally>();
function tallyOf(metric: Counter<string> | Gauge<string>): Tally {
  let t = tallies.get(metric);
  if (!t) tallies.set(metric, (t = new Tally(metric)));
  return t;
}

/** The per-session metrics' tallies (one per metric object, whoever asks). */
export function proxyTallies(m: ProxyMetrics) {
  return {
    connections: tallyOf(m.connections),
    sessions: tallyOf(m.sessions),
    sessionsTotal: tallyOf(m.sessionsTotal),
    closed: tallyOf(m.closed),
    logins: tallyOf(m.logins),
  };
}

export type ProxyTallies = ReturnType<typeof proxyTallies>;
