/**
 * A backend's runtime state: admin state (ready | drain | maintenance, set by config or the
 * admin API), health (up/down from active checks with fall/rise counts), weight with slow
 * start, and its connection count against maxconn.
 *
 * Health transitions are one function (`observe`) that logs from/to/reason once and moves
 * the `pairgate_lb_backend_up` gauge. Marking a backend down never touches connections already
 * spliced to it: those go on until one side closes them.
 */
import type { Logger } from '../common/log.ts';
import type { Candidate } from './balance.ts';
import type { BackendConfig, PoolConfig } from './config.ts';
import { splitHostPort } from './config.ts';
import { httpCheck, tcpCheck, type CheckResult } from './health-check.ts';
import type { LbMetrics } from './metrics.ts';

export type AdminState = 'ready' | 'drain' | 'maintenance';

export interface BackendStatus {
  name: string;
  pool: string;
  address: string;
  /** ready | drain | maintenance | down (health) */
  state: string;
  up: boolean;
  admin: AdminState;
  weight: number;
  effectiveWeight: number;
  active: number;
  total: number;
  maxconn: number;
  checks: { lastResult: CheckResult | null; lastChange: number; failures: number; successes: number };
}

export class Backend implements Candidate {
  readonly id: string;
  host: string;
  port: number;
  weight: number;
  maxconn: number;
  admin: AdminState;
  up = true;
  active = 0;
  total = 0;
  private upSince = 0;
  private failures = 0;
  private successes = 0;
  private lastResult: CheckResult | null = null;
  private lastChange = Date.now();
  private timer: NodeJS.Timeout | null = null;
  /** Which check loop is current (startChecks/stopChecks move it on; an older loop stops at its next turn). */
  private checkLoop = 0;
  private checking = false;
  /** Called when this backend may take a queued client again. */
  onCapacity: () => void = () => {};
  /** Called on every health transition (the cluster primary passes it on to its workers). */
  onHealth: (up: boolean, reason: string) => void = () => {};

  constructor(
    readonly pool: string,
    public config: BackendConfig,
    private poolConfig: PoolConfig,
    private readonly metrics: LbMetrics,
    private readonly log: Logger,
  ) {
    this.id = `${pool}/${config.name}`;
    const { host, port } = splitHostPort(config.address);
    this.host = host;
    this.port = port;
    this.weight = config.weight;
    this.maxconn = config.maxconn;
    this.admin = config.state;
    this.metrics.backendUp.set({ backend: this.id }, 1);
    // A zero series from the start, so that rate() and alerts see "no failures" rather than no data.
    this.metrics.connectFailures.inc({ backend: this.id }, 0);
  }

  get name(): string {
    return this.config.name;
  }

  /** Same identity across a reload: name and address unchanged. */
  sameAs(cfg: BackendConfig): boolean {
    return cfg.name === this.config.name && cfg.address === this.config.address;
  }

  /** Config reload of a kept backend: weight, maxconn, check settings; admin state set by the API is kept. */
  update(cfg: BackendConfig, pool: PoolConfig): void {
    const checkChanged = JSON.stringify(pool.check) !== JSON.stringify(this.poolConfig.check) || cfg.healthUrl !== this.config.healthUrl;
    if (cfg.state !== this.config.state) this.admin = cfg.state;
    this.config = cfg;
    this.poolConfig = pool;
    this.weight = cfg.weight;
    this.maxconn = cfg.maxconn;
    if (checkChanged && this.timer) {
      this.stopChecks();
      this.startChecks();
    }
    if (!pool.check.enabled && !this.up) this.transition(true, 'checks disabled');
    this.onCapacity();
  }

  effectiveWeight(now: number): number {
    const slow = this.poolConfig.slowStartMs;
    if (slow <= 0 || this.upSince === 0) return this.weight;
    const elapsed = now - this.upSince;
    if (elapsed >= slow) {
      this.upSince = 0;
      return this.weight;
    }
    // Ramp from 5 % to 100 % of the weight, as HAProxy's slowstart does (never quite 0).
    return this.weight * Math.max(0.05, elapsed / slow);
  }

  eligible(): boolean {
    return this.up && this.admin === 'ready' && this.weight > 0 && (this.maxconn === 0 || this.active < this.maxconn);
  }

  /** Could take a connection once a slot frees up (so a client may queue for it). */
  serviceable(): boolean {
    return this.up && this.admin === 'ready' && this.weight > 0;
  }

  /** Holds a slot (connecting or spliced); `total` counts spliced connections only. */
  acquire(): void {
    this.active++;
  }

  release(): void {
    this.active--;
    if (this.maxconn > 0 && this.active < this.maxconn) this.onCapacity();
  }

  startChecks(): void {
    if (!this.poolConfig.check.enabled || this.timer) return;
    const every = this.poolConfig.check.intervalMs;
    // The loop this call starts: a check that was running when the checks were stopped (or
    // restarted by a reload) ends its own loop rather than going on beside the new one.
    const loop = ++this.checkLoop;
    const next = (delay: number) => {
      this.timer = setTimeout(() => {
        void this.checkOnce().finally(() => {
          if (this.timer && loop === this.checkLoop) next(every);
        });
      }, delay);
    };
    // Spread the first checks of many backends over one interval.
    next(Math.floor(Math.random() * Math.min(every, 500)));
  }

  stopChecks(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.checkLoop++;
  }

  async checkOnce(): Promise<CheckResult> {
    if (this.checking) return this.lastResult ?? 'ok';
    this.checking = true;
    try {
      const c = this.poolConfig.check;
      const r = this.config.healthUrl
        ? await httpCheck(this.config.healthUrl, c.timeoutMs)
        : await tcpCheck(this.host, this.port, c.timeoutMs, this.poolConfig.proxyProtocol === 'v2');
      this.metrics.checks.inc({ backend: this.id, result: r });
      this.observe(r);
      return r;
    } finally {
      this.checking = false;
    }
  }

  /** Applies one check result to the fall/rise counters. */
  observe(r: CheckResult): void {
    this.lastResult = r;
    const c = this.poolConfig.check;
    if (r === 'ok') {
      this.failures = 0;
      this.successes++;
      if (!this.up && this.successes >= c.rise) this.transition(true, `${this.successes} good checks (rise ${c.rise})`);
    } else {
      this.successes = 0;
      this.failures++;
      if (this.up && this.failures >= c.fall) this.transition(false, `${this.failures} failed checks (fall ${c.fall}), last ${r}`);
    }
  }

  private transition(up: boolean, reason: string, logIt = true): void {
    this.up = up;
    this.lastChange = Date.now();
    if (up) this.upSince = Date.now();
    this.metrics.backendUp.set({ backend: this.id }, up ? 1 : 0);
    if (logIt) this.log.info({ backend: this.id, from: up ? 'down' : 'up', to: up ? 'up' : 'down', reason, active: this.active }, 'backend state change');
    this.onHealth(up, reason);
    if (up) this.onCapacity();
  }

  /**
   * Health decided elsewhere: a cluster worker runs no checks of its own and follows the
   * primary's verdicts (the primary has logged the transition; the worker does not repeat it).
   */
  setHealth(up: boolean, reason: string): void {
    if (up !== this.up) this.transition(up, reason, false);
  }

  /** `logIt` false: a cluster worker taking the primary's state (the primary has logged the change). */
  setAdmin(state: AdminState, logIt = true): void {
    if (state === this.admin) return;
    const from = this.admin;
    this.admin = state;
    if (logIt) this.log.info({ backend: this.id, from, to: state, reason: 'admin', active: this.active }, 'backend admin state change');
    if (state === 'ready') {
      this.upSince = Date.now();
      this.onCapacity();
    }
  }

  setWeight(w: number, logIt = true): void {
    if (logIt) this.log.info({ backend: this.id, from: this.weight, to: w, reason: 'admin' }, 'backend weight change');
    this.weight = w;
    this.onCapacity();
  }

  /** Removed from the config: checks stop, the gauge goes, connections stay until they close. */
  retire(): void {
    this.stopChecks();
    this.metrics.backendUp.remove({ backend: this.id });
  }

  status(now = Date.now()): BackendStatus {
    return {
      name: this.name,
      pool: this.pool,
      address: this.config.address,
      state: this.admin === 'maintenance' ? 'maintenance' : !this.up ? 'down' : this.admin,
      up: this.up,
      admin: this.admin,
      weight: this.weight,
      effectiveWeight: Math.round(this.effectiveWeight(now) * 100) / 100,
      active: this.active,
      total: this.total,
      maxconn: this.maxconn,
      checks: { lastResult: this.lastResult, lastChange: this.lastChange, failures: this.failures, successes: this.successes },
    };
  }
}
