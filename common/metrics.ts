/**
 * One Prometheus registry per process. Metric names are a contract with the Grafana
 * dashboards (ARCHITECTURE.md, "Metrics"): every name starts with `pairgate_`.
 * The helpers return an existing metric when a module asks twice, so that modules can
 * declare what they use without a central list.
 */
import client, { Counter, Gauge, Histogram, Registry } from 'prom-client';

export const PREFIX = 'pairgate_';

export type MetricsRegistry = Registry;

/**
 * How often the event-loop delay (the `process_eventloop_lag_*` metrics) is sampled, in ms.
 * prom-client's default is 10 ms: a timer firing 100 times a second that wakes the process
 * about twice per firing (libuv rounds the wait down to whole milliseconds and wakes once
 * early), ~200 wake-ups a second, which cost an idle proxy ~8 ms of CPU per second, half of all
 * it spent idle (measured on the proxy, 8439e30; every role ran the same sampler). Under load
 * the loop is awake anyway. At 100 ms a 15 s scrape still holds ~150 samples for the
 * percentiles, and any stall longer than 100 ms is seen every time.
 */
export const EVENT_LOOP_SAMPLE_MS = 100;

export function createRegistry(defaultLabels: Record<string, string> = {}, withDefaults = true): Registry {
  const registry = new Registry();
  registry.setDefaultLabels(defaultLabels);
  if (withDefaults) client.collectDefaultMetrics({ register: registry, prefix: PREFIX + 'process_', eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
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

/**
 * Changes to a counter or gauge for label sets that come up on every session, kept as plain
 * numbers and added to the prom-client metric when it is read (a scrape, `registry.metrics()`,
 * `metric.get()`): prom-client hashes and validates the label object on every call, which at a
 * few hundred sessions a second was a measurable share of the proxy's CPU, and at a hundred
 * thousand directory look-ups a second a share of the young-generation garbage. The key is the label
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
/** The one Tally of a metric (made on first use; whoever asks shares it). */
export function tallyOf(metric: Counter<string> | Gauge<string>): Tally {
  let t = tallies.get(metric);
  if (!t) tallies.set(metric, (t = new Tally(metric)));
  return t;
}
