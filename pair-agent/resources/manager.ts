/**
 * The resource manager: starts the resources in order, stops them in reverse, and monitors them
 * while they run. A monitor failure restarts the resource here (stop, start); past `maxRestarts`
 * failures within `failureWindowMs` the manager gives up and reports `failed`, and the state
 * machine hands the resources to a healthy peer; with none, the agent has it `retry()` after a
 * growing backoff.
 *
 * Every action has a time bound, as Pacemaker's operation timeouts: a start that overruns counts
 * as a failed start, a monitor that overruns as a failed monitor. A stop that fails or overruns
 * leaves the node *unclean* (the resource may still run here, so the peer must not start it until
 * this node is fenced): the manager says so (`unclean`, event 'unclean'); the agent tells the
 * peer, which fences this node and takes over. An in-process action cannot be cancelled (a store
 * recovering from a hung disk): the next action on that resource waits for it, within its own bound.
 */
import { EventEmitter } from 'node:events';
import { PairgateError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import { counter, type MetricsRegistry } from '../../common/metrics.ts';
import type { MonitorResult, Resource } from '../resource.ts';

export interface ResourceManagerOptions {
  monitorIntervalMs: number;
  maxRestarts: number;
  failureWindowMs: number;
  /** Time bounds of the three actions (defaults: the config's, pair-agent/config.ts). */
  startTimeoutMs?: number;
  stopTimeoutMs?: number;
  monitorTimeoutMs?: number;
  log: Logger;
  registry: MetricsRegistry;
}

type Action = 'start' | 'stop' | 'monitor';

const noop = (): void => undefined;

/** Bounds when none are given (the agent passes its config's). */
const DEFAULT_BOUNDS: Record<Action, number> = { start: 300_000, stop: 120_000, monitor: 20_000 };

export class ResourceManager extends EventEmitter {
  private started: Resource[] = [];
  private timer: NodeJS.Timeout | null = null;
  private failures: number[] = [];
  private monitoring = false;
  failed = false;
  /** Counts `stopAll` calls: a start planned before one is not begun after it (startStillWanted). */
  private stopGeneration = 0;
  /** Resources whose last stop failed or overran: they may still run here. */
  private readonly notStopped = new Set<string>();
  private readonly actions;
  /** Actions begun and not yet returned (overrun ones included), per resource. */
  private readonly inFlight = new Map<Resource, { action: Action; since: number; settled: Promise<void> }>();

  constructor(readonly resources: Resource[], private readonly opts: ResourceManagerOptions) {
    super();
    this.actions = counter(opts.registry, 'resource_actions_total', 'Resource actions by resource, action and outcome', ['resource', 'action', 'outcome']);
  }

  private boundOf(action: Action): number {
    const o = this.opts;
    return (action === 'start' ? o.startTimeoutMs : action === 'stop' ? o.stopTimeoutMs : o.monitorTimeoutMs) ?? DEFAULT_BOUNDS[action];
  }

  /**
   * Runs one action of `r` within its bound, after any action of `r` still running (an overrun
   * one: in-process actions cannot be cancelled). Rejects with a TIMEOUT error when the bound
   * passes first; an action whose bound passed while it waited is never begun.
   */
  private bounded<T>(r: Resource, action: Action, run: () => Promise<T>): Promise<T> {
    const ms = this.boundOf(action);
    const before = this.inFlight.get(r);
    let begun = false;
    let expired = false;
    const begin = (): Promise<T> => {
      if (expired) return Promise.reject(new Error('not begun: its bound passed while it waited'));
      begun = true;
      return run();
    };
    const op = before ? before.settled.then(begin) : begin();
    const mark = { action, since: Date.now(), settled: op.then(noop, noop) };
    this.inFlight.set(r, mark);
    void mark.settled.then(() => {
      if (this.inFlight.get(r) === mark) this.inFlight.delete(r);
    });
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        expired = true;
        if (begun) {
          op.then(() => this.opts.log.warn({ resource: r.name, action, ms: Date.now() - mark.since }, 'an overrun resource action returned at last'), noop);
          reject(new PairgateError('TIMEOUT', `${r.name} ${action} did not return within ${ms} ms`, true));
        } else {
          const waited = before!;
          reject(new PairgateError('TIMEOUT', `${r.name} ${action} not begun within ${ms} ms: an earlier ${waited.action} of it, asked for ${Date.now() - waited.since} ms ago, has not returned`, true));
        }
      }, ms);
      op.then(
        (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        (err: unknown) => {
          clearTimeout(timer);
          reject(err as Error);
        },
      );
    });
  }

  private async act(r: Resource, action: 'start' | 'stop'): Promise<void> {
    const t0 = Date.now();
    try {
      await this.bounded(r, action, () => r[action]());
      this.actions.inc({ resource: r.name, action, outcome: 'ok' });
      this.opts.log.info({ resource: r.name, action, ms: Date.now() - t0 }, `resource ${action}ed`.replace('stoped', 'stopped'));
      if (action === 'stop') this.markStopped(r.name);
    } catch (err) {
      const timeout = (err as PairgateError).code === 'TIMEOUT';
      this.actions.inc({ resource: r.name, action, outcome: timeout ? 'timeout' : 'failed' });
      this.opts.log.error({ resource: r.name, action, err: (err as Error).message }, `resource ${action} ${timeout ? 'timed out' : 'failed'}`);
      if (action === 'stop') this.markUnclean(r.name);
      throw err;
    }
  }

  /** A resource did not stop here (failed or overran) since its last good stop: it may still run, and the peer must fence this node before starting it. */
  get unclean(): boolean {
    return this.notStopped.size > 0;
  }

  private markUnclean(resource: string): void {
    const was = this.unclean;
    this.notStopped.add(resource);
    if (was) return;
    this.opts.log.error({ resource }, 'a resource did not stop: this node is unclean until it does (the peer fences this node before it takes over)');
    this.emit('unclean', resource);
  }

  /**
   * After maintenance (the operator had the resources by hand): a resource marked as not stopped
   * is forgotten once its monitor gives a definite answer that is safe for the peer: stopped, or
   * running on a node that holds the resources (the peer does not start them while it does).
   */
  async recheckUnclean(holding: boolean): Promise<void> {
    for (const r of this.resources) {
      if (!this.notStopped.has(r.name)) continue;
      const state = await this.monitorResource(r);
      if (state === 'stopped' || (holding && state === 'running')) {
        this.opts.log.info({ resource: r.name, state }, 'after maintenance: the resource that did not stop is accounted for');
        this.markStopped(r.name);
      }
    }
  }

  private markStopped(resource: string): void {
    if (!this.notStopped.delete(resource) || this.unclean) return;
    this.opts.log.info({ resource }, 'the resource that did not stop has stopped: this node is clean again');
    this.emit('clean');
  }

  private async monitorResource(r: Resource): Promise<MonitorResult> {
    try {
      return await this.bounded(r, 'monitor', () => r.monitor());
    } catch (err) {
      this.opts.log.warn({ resource: r.name, err: (err as Error).message }, (err as PairgateError).code === 'TIMEOUT' ? 'monitor timed out' : 'monitor threw');
      return 'failed';
    }
  }

  /**
   * A start begun after a `stopAll` began would run after that stop (actions on a resource run in
   * order) and leave the resource running on a node that says it released everything, while the
   * peer starts it too. Starts check this before they are begun.
   */
  private startStillWanted(r: Resource, gen: number): void {
    if (gen !== this.stopGeneration) throw new PairgateError('CONFLICT', `${r.name}: not started: the resources are being stopped`, true);
  }

  /** Stops and starts `r`, unless a stopAll has begun since `gen` (taken when the caller's pass began). */
  private async restart(r: Resource, gen: number): Promise<void> {
    this.startStillWanted(r, gen);
    await this.act(r, 'stop');
    this.startStillWanted(r, gen);
    await this.act(r, 'start');
  }

  /** Starts every resource in order; on a failure stops the ones already started (reverse) and throws. */
  async startAll(): Promise<void> {
    const gen = this.stopGeneration;
    for (const r of this.resources) {
      try {
        this.startStillWanted(r, gen);
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
    this.stopGeneration += 1;
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
    const gen = this.stopGeneration;
    try {
      for (const r of this.started) {
        const result = await this.monitorResource(r);
        if (!this.timer || gen !== this.stopGeneration) return; // stopped (and maybe started again) meanwhile
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
          await this.restart(r, gen);
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
    const gen = this.stopGeneration;
    try {
      this.opts.log.info('restarting what is not running, then monitoring again');
      for (const r of this.started) {
        const state = await this.monitorResource(r);
        if (state === 'running') continue;
        try {
          await this.restart(r, gen);
        } catch {
          if (gen !== this.stopGeneration) return; // released meanwhile: nothing failed
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
