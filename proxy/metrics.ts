/**
 * The proxy tier's metrics (names are a contract with the Grafana dashboards). proxy/smtp
 * uses the same objects through `proxyMetrics(registry)`, so labels stay the same everywhere.
 */
import { counter, createRegistry, gauge, histogram, tallyOf, type MetricsRegistry } from '../common/metrics.ts';
import { nativeRelayLive } from '../common/native-relay.ts';

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
    // Read when scraped: the relay thread's own count (0 when it is not built or not used).
    nativeRelaySessions: gauge(registry, 'proxy_native_relay_sessions', 'Proxied sessions whose bytes the native relay moves now (the rest: JavaScript)', [], function () {
      this.set(nativeRelayLive());
    }),
  };
}

export type ProxyMetrics = ReturnType<typeof proxyMetrics>;

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
