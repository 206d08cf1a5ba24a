/** The balancer's metrics (names are a contract with the Grafana dashboards). */
import type { Counter, Gauge, Histogram } from 'prom-client';
import { counter, gauge, histogram, type MetricsRegistry } from '../common/metrics.ts';

export interface LbMetrics {
  backendUp: Gauge<'backend'>;
  connections: Gauge<'listener' | 'backend'>;
  connectionsTotal: Counter<'listener' | 'backend'>;
  checks: Counter<'backend' | 'result'>;
  connectFailures: Counter<'backend'>;
  bytes: Counter<'direction'>;
  queueSeconds: Histogram<string>;
  rejected: Counter<'listener' | 'reason'>;
}

export function lbMetrics(registry: MetricsRegistry): LbMetrics {
  return {
    backendUp: gauge(registry, 'lb_backend_up', 'Backend health: 1 up, 0 down (checks)', ['backend']),
    connections: gauge(registry, 'lb_connections', 'Connections spliced now, per listener and backend', ['listener', 'backend']),
    connectionsTotal: counter(registry, 'lb_connections_total', 'Connections spliced to a backend since start', ['listener', 'backend']),
    checks: counter(registry, 'lb_check_total', 'Health checks by result (ok, fail, timeout)', ['backend', 'result']),
    connectFailures: counter(registry, 'lb_connect_failures_total', 'Failed connects to a backend (refused, reset, timeout)', ['backend']),
    bytes: counter(registry, 'lb_bytes_total', 'Bytes spliced: in = client to backend, out = backend to client', ['direction']),
    queueSeconds: histogram(registry, 'lb_queue_seconds', 'Time a client waited for a free slot (maxconn) before its backend connect', [], [
      0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
    ]),
    rejected: counter(registry, 'lb_rejected_total', 'Clients closed without a backend (no backend up, queue full, queue timeout, all connects failed)', [
      'listener',
      'reason',
    ]),
  };
}
