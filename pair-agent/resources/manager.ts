/**
 * The resource manager: starts the resources in order, stops them in reverse, and monitors them
 * while they run. A monitor failure restarts the resource here (stop, start); past `maxRestarts`
 * failures within `failureWindowMs` the manager gives up and reports `failed`, and the state
 * machine hands the resources to a healthy peer; with none, the agent has it `retry()` after a
 * growing backoff.
 */
import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/log.ts';
import { counter, type MetricsRegistry } from '../../common/metrics.ts';
import type { Resource } from '../resource.ts';

export interface ResourceManagerOptions {
  monitorIntervalMs: number;
  maxRestarts: number;
  failureWindowMs: number;
  log: Logger;
  registry: MetricsRegistry;
}

export class ResourceManager extends EventEmitter {
  private started: Resource[] = [];
  private timer: NodeJS.Timeout | null = null;
  private failures: number[] = [];
  private monitoring = false;
  failed = false;
  private readonly actions;

  constructor(readonly resources: Resource[], private readonly opts: ResourceManagerOptions) {
    super();
    this.actions = counter(opts.registry, 'resource_actions_total', 'Resource actions by resource, action and outcome', ['resource', 'action', 'outcome']);
  }

  private async act(r: Resource, action: 'start' | 'stop'): Promise<void> {
    const t0 = Date.now();
    try {
      await r[action]();
      this.actions.inc({ resource: r.name, action, outcome: 'ok' });
      this.opts.log.info({ resource: r.name, action, ms: Date.now() - t0 }, `resource ${action}ed`.replace('stoped', 'stopped'));
    } catch (err) {
      this.actions.inc({ resource: r.name, action, outcome: 'failed' });
      this.opts.log.error({ resource: r.name, action, err: (err as Error).message }, `resource ${action} failed`);
      throw err;
    }
  }

  private async restart(r: Resource): Promise<void> {
    await this.act(r, 'stop');
    await this.act(r, 'start');
  }

  /** Starts every resource in order; on a failure stops the ones already started (reverse) and throws. */
  async startAll(): Promise<void> {
    for (const r of this.resources) {
      try {
        await this.act(r, 'start');
        this.started.push(r);
      } catch (err) {
        await this.stopAll().catch(() => undefined);
        throw err;
      }
    }
    this.failures = [];
    this.failed = false;
    this.startMonitor();
  }

  /** Stops every resource in reverse order (all of them, even those not started here: stop is idempotent). Throws the first failure after trying all. */
  async stopAll(): Promise<void> {
    this.stopMonitor();
    let first: unknown = null;
    for (const r of [...this.resources].reverse()) {
      try {
        await this.act(r, 'stop');
      } catch (err) {
        first ??= err;
      }
    }
    this.started = [];
    if (first) throw first;
  }

  private startMonitor(): void {
    this.stopMonitor();
    if (this.opts.monitorIntervalMs <= 0) return;
    this.timer = setInterval(() => void this.monitorOnce(), this.opts.monitorIntervalMs);
    this.timer.unref();
  }

  stopMonitor(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** One monitor pass; exported for tests. Restarts a failed resource, or gives up past the threshold. */
  async monitorOnce(): Promise<void> {
    if (this.monitoring || this.failed) return;
    this.monitoring = true;
    try {
      for (const r of this.started) {
        let result: string;
        try {
          result = await r.monitor();
        } catch (err) {
          result = 'failed';
          this.opts.log.warn({ resource: r.name, err: (err as Error).message }, 'monitor threw');
        }
        if (!this.timer) return; // stopped meanwhile
        this.actions.inc({ resource: r.name, action: 'monitor', outcome: result === 'running' ? 'ok' : 'failed' });
        if (result === 'running') continue;
        const now = Date.now();
        this.failures = this.failures.filter((t) => now - t < this.opts.failureWindowMs);
        this.failures.push(now);
        if (this.failures.length > this.opts.maxRestarts) {
          this.failed = true;
          this.opts.log.error({ resource: r.name, failures: this.failures.length, windowMs: this.opts.failureWindowMs }, 'resource failed past the restart threshold: giving up here');
          this.emit('failed', r.name);
          return;
        }
        this.opts.log.warn({ resource: r.name, result, restart: this.failures.length }, 'resource monitor failed: restarting it here');
        try {
          await this.restart(r);
        } catch {
          // counted; the next pass sees it again
        }
      }
    } finally {
      this.monitoring = false;
    }
  }

  /**
   * After giving up (`failed`) with nobody to hand the resources to: forget the failures, restart
   * here what is not running, and monitor on. A restart that fails reports `failed` again (the
   * agent retries after a longer backoff).
   */
  async retry(): Promise<void> {
    if (!this.failed || this.monitoring) return;
    this.failed = false;
    this.failures = [];
    this.monitoring = true;
    try {
      this.opts.log.info('restarting what is not running, then monitoring again');
      for (const r of this.started) {
        const state = await r.monitor().catch(() => 'failed');
        if (state === 'running') continue;
        try {
          await this.restart(r);
        } catch {
          this.failed = true;
          this.emit('failed', r.name);
          return;
        }
      }
    } finally {
      this.monitoring = false;
    }
  }

  get running(): boolean {
    return this.started.length === this.resources.length && this.resources.length > 0;
  }
}
