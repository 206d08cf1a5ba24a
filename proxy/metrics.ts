/**
 * The proxy tier's metrics (names are a contract with the Grafana dashboards). proxy/smtp
 * uses the same objects through `proxyMetrics(registry)`, so labels stay the same everywhere.
 */
import client from 'prom-client';
import { PREFIX, counter, createRegistry, gauge, histogram, type MetricsRegistry } from '../common/metrics.ts';

/**
 * How often the event-loop delay (the `process_eventloop_lag_*` metrics) is sampled, in ms.
 * prom-client's default is 10 ms: a timer firing 100 times a second that wakes the process
 * about twice per firing (libuv rounds the wait down to whole milliseconds and wakes once
 * early), ~200 wake-ups a second, which cost an idle proxy ~8 ms of CPU per second, half of all
 * it spent idle. (Under load the loop is awake anyway: there the difference was not measurable.)
 * At 100 ms a 15 s scrape still holds ~150 samples for the percentiles, and any stall longer
 * than 100 ms is seen every time.
 */
export const EVENT_LOOP_SAMPLE_MS = 100;

/**
 * The proxy process's metrics registry: common/metrics.ts's, with the default process metrics
 * (`pairgate_process_*`) sampling the event loop every EVENT_LOOP_SAMPLE_MS.
 */
export function proxyRegistry(defaultLabels: Record<string, string>): MetricsRegistry {
  const registry = createRegistry(defaultLabels, false);
  client.collectDefaultMetrics({ register: registry, prefix: `${PREFIX}process_`, eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
  return registry;
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
