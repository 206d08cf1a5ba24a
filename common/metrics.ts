/**
 * One Prometheus registry per process. Metric names are a contract with the Grafana
 * dashboards (ARCHITECTURE.md, "Metrics"): every name starts with `pairgate_`.
 * The helpers return an existing metric when a module asks twice, so that modules can
 * declare what they use without a central list.
 */
import client, { Counter, Gauge, Histogram, Registry } from 'prom-client';

export const PREFIX = 'pairgate_';

export type MetricsRegistry = Registry;

export function createRegistry(defaultLabels: Record<string, string> = {}, withDefaults = true): Registry {
  const registry = new Registry();
  registry.setDefaultLabels(defaultLabels);
  if (withDefaults) client.collectDefaultMetrics({ register: registry, prefix: PREFIX + 'process_' });
  return registry;
}

function fullName(name: string): string {
  return name.startsWith(PREFIX) ? name : PREFIX + name;
}

export function counter<L extends string>(registry: Registry, name: string, help: string, labelNames: readonly L[] = []): Counter<L> {
  const existing = registry.getSingleMetric(fullName(name));
  if (existing) return existing as Counter<L>;
  return new Counter({ name: fullName(name), help, labelNames, registers: [registry] });
}

export function gauge<L extends string>(
  registry: Registry,
  name: string,
  help: string,
  labelNames: readonly L[] = [],
  collect?: (this: Gauge<L>) => void | Promise<void>,
): Gauge<L> {
  const existing = registry.getSingleMetric(fullName(name));
  if (existing) return existing as Gauge<L>;
  return new Gauge({ name: fullName(name), help, labelNames, registers: [registry], ...(collect ? { collect } : {}) });
}

/** Latency buckets in seconds, from 50 µs (in-process cache) to 10 s (a held login). */
export const LATENCY_BUCKETS = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export function histogram<L extends string>(
  registry: Registry,
  name: string,
  help: string,
  labelNames: readonly L[] = [],
  buckets: number[] = LATENCY_BUCKETS,
): Histogram<L> {
  const existing = registry.getSingleMetric(fullName(name));
  if (existing) return existing as Histogram<L>;
  return new Histogram({ name: fullName(name), help, labelNames, buckets, registers: [registry] });
}
