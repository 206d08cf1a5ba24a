/**
 * Builds the Grafana dashboards in this folder from one short description each, so that
 * every panel has the same datasource, units and layout. Run after changing a panel:
 *   npx tsx infra/grafana/build-dashboards.ts
 * The JSON files are committed; Grafana imports them as they are (datasource variable
 * `${DS_PROMETHEUS}`). test/integration/lab-*.test.ts checks every metric named here exists.
 */
import { writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

interface Panel {
  title: string;
  exprs: Array<[expr: string, legend: string]>;
  unit?: string;
  kind?: 'timeseries' | 'stat' | 'bargauge';
  description?: string;
  stack?: boolean;
}

interface Dashboard {
  uid: string;
  title: string;
  description: string;
  panels: Panel[];
}

const ds = { type: 'prometheus', uid: '${DS_PROMETHEUS}' };

function panelJson(p: Panel, id: number): Record<string, unknown> {
  const width = p.kind === 'stat' ? 6 : 12;
  const perRow = 24 / width;
  const row = Math.floor((id - 1) / perRow);
  return {
    id,
    type: p.kind ?? 'timeseries',
    title: p.title,
    description: p.description ?? '',
    datasource: ds,
    gridPos: { x: ((id - 1) % perRow) * width, y: row * 8, w: width, h: 8 },
    fieldConfig: {
      defaults: {
        unit: p.unit ?? 'short',
        custom: p.kind && p.kind !== 'timeseries' ? {} : { stacking: { mode: p.stack ? 'normal' : 'none' }, fillOpacity: p.stack ? 30 : 10 },
      },
      overrides: [],
    },
    options: { legend: { displayMode: 'table', placement: 'bottom', calcs: ['lastNotNull', 'max'] }, tooltip: { mode: 'multi' } },
    targets: p.exprs.map(([expr, legendFormat], i) => ({ refId: String.fromCharCode(65 + i), datasource: ds, expr, legendFormat })),
  };
}

function dashboardJson(d: Dashboard): Record<string, unknown> {
  return {
    __inputs: [{ name: 'DS_PROMETHEUS', label: 'Prometheus', type: 'datasource', pluginId: 'prometheus', pluginName: 'Prometheus' }],
    uid: d.uid,
    title: d.title,
    description: d.description,
    tags: ['pairgate'],
    timezone: 'browser',
    schemaVersion: 39,
    version: 1,
    refresh: '30s',
    time: { from: 'now-6h', to: 'now' },
    templating: { list: [] },
    panels: d.panels.map((p, i) => panelJson(p, i + 1)),
  };
}

export const DASHBOARDS: Dashboard[] = [
  {
    uid: 'pairgate-capacity',
    title: 'pairgate / capacity per pair',
    description: 'Mailboxes, messages and volume usage per pair: where to place new users and when to add a pair.',
    panels: [
      { title: 'Volume used / total per pair', exprs: [['max by (pair) (pairgate_store_bytes_used) / max by (pair) (pairgate_store_bytes_total)', '{{pair}}']], unit: 'percentunit', description: 'Plan a new pair before any pair passes 80 %.' },
      { title: 'Bytes used per pair', exprs: [['max by (pair) (pairgate_store_bytes_used)', '{{pair}} used'], ['max by (pair) (pairgate_store_bytes_total)', '{{pair}} total']], unit: 'bytes' },
      { title: 'Mailboxes per pair', exprs: [['max by (pair) (pairgate_store_mailboxes)', '{{pair}}']] },
      { title: 'Messages per pair', exprs: [['max by (pair) (pairgate_store_messages)', '{{pair}}']] },
      { title: 'Growth per pair (bytes/day)', exprs: [['max by (pair) (deriv(pairgate_store_bytes_used[6h])) * 86400', '{{pair}}']], unit: 'bytes' },
      { title: 'Store sessions by protocol and pair', exprs: [['sum by (pair, protocol) (pairgate_sessions)', '{{pair}} {{protocol}}']], stack: true },
    ],
  },
  {
    uid: 'pairgate-traffic',
    title: 'pairgate / sessions and logins',
    description: 'What clients see: sessions by protocol and pair, login rate and latency, deliveries, held logins.',
    panels: [
      { title: 'Proxy sessions by protocol', exprs: [['sum by (protocol) (pairgate_sessions{role="proxy"})', '{{protocol}}']], stack: true },
      { title: 'Session rate by protocol', exprs: [['sum by (protocol) (rate(pairgate_sessions_total[5m]))', '{{protocol}}']], unit: 'ops' },
      {
        title: 'Proxy sessions on the native relay',
        exprs: [['sum(pairgate_proxy_native_relay_sessions)', 'native relay'], ['sum(pairgate_sessions{role="proxy"})', 'all proxied']],
        description: 'Logged-in plain-TCP sessions are moved by the native relay; TLS sessions, sessions with bytes in flight when the login ended, and every session of a proxy with relay: javascript or whose relay is not built (its start-up log says so), are relayed in JavaScript.',
      },
      { title: 'Logins by result', exprs: [['sum by (result) (rate(pairgate_logins_total[5m]))', '{{result}}']], unit: 'ops', stack: true },
      { title: 'Login latency p50 / p99', exprs: [['histogram_quantile(0.5, sum by (le) (rate(pairgate_login_seconds_bucket[5m])))', 'p50'], ['histogram_quantile(0.99, sum by (le) (rate(pairgate_login_seconds_bucket[5m])))', 'p99']], unit: 's' },
      { title: 'Directory lookups and cache', exprs: [['sum by (result) (rate(pairgate_directory_lookups_total[5m]))', 'lookup {{result}}'], ['sum by (layer, result) (rate(pairgate_directory_cache_total[5m]))', 'cache {{layer}} {{result}}']], unit: 'ops' },
      { title: 'Backend connect failures per pair', exprs: [['sum by (pair) (rate(pairgate_backend_connect_failures_total[5m]))', '{{pair}}']], unit: 'ops' },
      { title: 'Deliveries by result', exprs: [['sum by (result) (rate(pairgate_deliveries_total[5m]))', '{{result}}']], unit: 'ops', stack: true },
      { title: 'Delivery latency p99 per pair', exprs: [['histogram_quantile(0.99, sum by (le, pair) (rate(pairgate_delivery_seconds_bucket[5m])))', '{{pair}}']], unit: 's' },
      { title: 'Held logins (pair failing over)', exprs: [['sum(rate(pairgate_held_logins_total[5m]))', 'held/s']], unit: 'ops', description: 'Logins that waited for a pair to come back instead of failing.' },
    ],
  },
  {
    uid: 'pairgate-ha',
    title: 'pairgate / HA pairs: failover, fencing, replication',
    description: 'Heartbeat health, failovers and fencing outcomes, replication state and out-of-sync data per pair.',
    panels: [
      { title: 'Failovers', exprs: [['sum by (pair) (increase(pairgate_failovers_total[1h]))', '{{pair}}']], kind: 'bargauge' },
      { title: 'Fencing actions by outcome', exprs: [['sum by (pair, outcome) (increase(pairgate_fencing_actions_total[1h]))', '{{pair}} {{outcome}}']], description: 'Any failed outcome means a takeover was blocked: check the fencing device.' },
      { title: 'Heartbeat misses', exprs: [['sum by (pair, node) (rate(pairgate_heartbeat_misses_total[5m]))', '{{pair}}/{{node}}']], unit: 'ops' },
      { title: 'Replication out-of-sync bytes', exprs: [['max by (pair, node) (pairgate_replication_out_of_sync_bytes)', '{{pair}}/{{node}}']], unit: 'bytes', description: 'Non-zero while disconnected or resyncing; a pair is only fully redundant at 0.' },
      { title: 'Resync rate', exprs: [['max by (pair, node) (pairgate_replication_resync_bytes_per_second)', '{{pair}}/{{node}}']], unit: 'Bps' },
      { title: 'Volume write latency p99', exprs: [['histogram_quantile(0.99, sum by (le, pair) (rate(pairgate_volume_write_seconds_bucket[5m])))', '{{pair}}']], unit: 's' },
      {
        title: 'Unclean nodes and held writes',
        exprs: [
          ['max by (pair, node) (pairgate_pair_node_unclean)', 'unclean {{pair}}/{{node}}'],
          ['max by (pair, node) (pairgate_volume_writes_held)', 'writes held {{pair}}/{{node}}'],
        ],
        description: 'unclean: a resource did not stop on that node; its peer fences it before taking over. writes held: a primary lost its replication link and waits for the peer to be outdated or fenced (seconds at most; longer needs a human: pairgate volume status).',
      },
    ],
  },
  {
    uid: 'pairgate-loadbalancer',
    title: 'pairgate / load balancer',
    description: 'Backends (proxies) up or down, connections, health checks, connect failures and queueing.',
    panels: [
      { title: 'Backends up', exprs: [['sum by (backend) (pairgate_lb_backend_up)', '{{backend}}']], kind: 'stat' },
      { title: 'Connections per backend', exprs: [['sum by (backend) (pairgate_lb_connections)', '{{backend}}']], stack: true },
      { title: 'Connection rate per listener', exprs: [['sum by (listener) (rate(pairgate_lb_connections_total[5m]))', '{{listener}}']], unit: 'ops' },
      { title: 'Health checks by result', exprs: [['sum by (backend, result) (rate(pairgate_lb_check_total[5m]))', '{{backend}} {{result}}']], unit: 'ops' },
      { title: 'Backend connect failures', exprs: [['sum by (backend) (rate(pairgate_lb_connect_failures_total[5m]))', '{{backend}}']], unit: 'ops' },
      { title: 'Throughput', exprs: [['sum by (direction) (rate(pairgate_lb_bytes_total[5m]))', '{{direction}}']], unit: 'Bps' },
      { title: 'Queue time p99', exprs: [['histogram_quantile(0.99, sum by (le) (rate(pairgate_lb_queue_seconds_bucket[5m])))', 'p99']], unit: 's' },
    ],
  },
];

/** Every query of every panel (the lab test runs each against a Prometheus scraping the lab). */
export function dashboardExpressions(): string[] {
  return DASHBOARDS.flatMap((d) => d.panels.flatMap((p) => p.exprs.map(([expr]) => expr)));
}

/** Every `pairgate_*` metric name a dashboard query uses (histograms by their base name). */
export function dashboardMetricNames(): string[] {
  const names = new Set<string>();
  for (const d of DASHBOARDS)
    for (const p of d.panels)
      for (const [expr] of p.exprs) for (const m of expr.matchAll(/pairgate_[a-z0-9_]+/g)) names.add(m[0].replace(/_bucket$/, ''));
  return [...names].sort();
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const dir = dirname(fileURLToPath(import.meta.url));
  for (const d of DASHBOARDS) writeFileSync(join(dir, `${d.uid}.json`), `${JSON.stringify(dashboardJson(d), null, 2)}\n`);
  process.stdout.write(`wrote ${DASHBOARDS.length} dashboards to ${dir}\n`);
}
