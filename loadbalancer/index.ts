/**
 * pairgate's L4 load balancer: TCP listeners (one per service port) mapped to pools of proxies,
 * least-connections with weights (or weighted round-robin, or consistent source hash), a PROXY
 * v2 (or v1) header on every backend connection, active health checks with fall/rise, drain /
 * maintenance / weight through the admin API, maxconn with a time-bounded queue, and a reload
 * (SIGHUP) that keeps every established connection.
 *
 * ```ts
 * const lb = await startLoadBalancer(lbConfigSchema.parse(raw), { log, registry });
 * lb.listenerAddress('imap'); // { host, port }
 * await lb.reload(newConfig); // refused whole (throws) when a new port cannot be bound
 * await lb.stop();
 * ```
 *
 * This API runs the balancer in the calling process. `pairgate lb` with `workers` > 1 runs one
 * engine per worker process and the admin listener and health checks in a primary (cluster.ts).
 */
import type { Logger } from '../common/log.ts';
import type { MetricsRegistry } from '../common/metrics.ts';
import { startAdminServer, type AdminServer } from '../common/admin-http.ts';
import { setMaxBulkPumps } from '../common/relay.ts';
import { PairgateError } from '../common/errors.ts';
import type { AdminState, Backend, BackendStatus } from './backend.ts';
import { splitHostPort, type LbConfig } from './config.ts';
import { Listener, type Conn } from './listener.ts';
import { lbMetrics, type LbMetrics } from './metrics.ts';
import { Pool } from './pool.ts';

export { lbConfigSchema, type LbConfig, type PoolConfig, type BackendConfig, type ListenerConfig, BALANCE_METHODS } from './config.ts';
export type { BackendStatus } from './backend.ts';

/** One worker process of a `pairgate lb` run with workers (cluster.ts), as the primary's status lists it. */
export interface LbWorkerStatus {
  /** Slot number 1..workers (a restarted worker keeps its slot). */
  worker: number;
  pid: number;
  /** running (accepting), starting, or restarting (exited; a new one is due after a backoff). */
  state: 'running' | 'starting' | 'restarting';
  /** Connections through this worker now (pending and spliced). */
  connections: number;
  /** Connections this worker has spliced to a backend since it started, over all listeners. */
  spliced: number;
  restarts: number;
}

export interface LbStatus {
  id: string | null;
  listeners: Array<{ name: string; listen: string; address: string; pool: string; active: number; total: number; maxconn: number }>;
  pools: Array<{ name: string; balance: string; proxyProtocol: string; queued: number; backends: BackendStatus[] }>;
  /** All backends of all pools (`name` is `pool/backend`), for `pairgate status`. */
  backends: Array<BackendStatus & { id: string }>;
  connections: number;
  /** Present when `pairgate lb` runs worker processes: one entry per worker slot. */
  workers?: LbWorkerStatus[];
}

/** A backend's runtime state that the cluster primary owns and hands to its workers. */
export interface BackendSync {
  /** `pool/name` */
  id: string;
  up: boolean;
  admin: AdminState;
  weight: number;
}

/** Listeners, pools and connections without the admin listener (a cluster worker is one of these). */
export interface BalancerEngine {
  status(): LbStatus;
  listenerAddress(name: string): { host: string; port: number };
  /** Applies a new config; established connections stay. Throws (old config kept) if a new listener cannot bind. */
  reload(config: LbConfig): Promise<void>;
  /** Admin actions by backend name (`name` in every pool, or `pool/name`). Returns the backends changed. */
  setState(backend: string, state: AdminState): BackendStatus[];
  setWeight(backend: string, weight: number): BackendStatus[];
  /** Health decided elsewhere (the cluster primary's checks); `id` is `pool/name`. */
  setHealth(id: string, up: boolean, reason: string): void;
  /** Health, admin state and weight of every backend as the cluster primary has them. */
  syncBackends(states: BackendSync[]): void;
  /** Runs one health check round now (tests, `pairgate lb check`). */
  checkNow(): Promise<void>;
  /** Every pool has a backend that is up and not in maintenance. */
  healthy(): boolean;
  /** Stops accepting, waits up to stopGraceMs for the connections, then closes what is left. */
  stop(): Promise<void>;
}

export interface LoadBalancer extends BalancerEngine {
  admin: AdminServer;
}

const BYTES_ACCOUNTING_MS = 5000;

/** Whether a running listener already serves `listen` (port 0 in its config matches its bound port). */
function sameAddress(l: Listener, listen: string): boolean {
  const want = splitHostPort(listen);
  return want.host === l.host && want.port !== 0 && want.port === l.port;
}

export interface LbDeps {
  log: Logger;
  registry: MetricsRegistry;
}

export interface EngineOptions {
  /** false: no health checks here; the backends follow setHealth (a cluster worker). Default true. */
  healthChecks?: boolean;
  /** Backend states applied before the listeners open (a cluster worker starting or restarting). */
  initialBackends?: BackendSync[];
}

/**
 * The pools by name and the admin actions on their backends, shared by the in-process engine
 * and the cluster primary (which holds the pools for their checks and admin state only).
 */
export class PoolSet {
  readonly pools = new Map<string, Pool>();

  constructor(
    private readonly metrics: LbMetrics,
    private readonly log: Logger,
    private readonly withChecks: boolean,
    /** Set on every pool, also the ones a reload adds. */
    private readonly onHealthChange?: (b: Backend, up: boolean, reason: string) => void,
  ) {}

  /** Creates, reconciles or removes pools to match `next` (kept backends keep state and connections). */
  apply(next: LbConfig['pools']): void {
    for (const [name, pc] of Object.entries(next)) {
      const p = this.pools.get(name);
      if (p) p.apply(pc);
      else {
        const np = new Pool(name, pc, this.metrics, this.log);
        if (this.onHealthChange) np.onHealthChange = this.onHealthChange;
        this.pools.set(name, np);
      }
    }
    for (const [name, p] of this.pools) if (!next[name]) (p.close(), this.pools.delete(name));
    // Idempotent per backend: starts the checks of new backends (and of re-enabled check configs).
    if (this.withChecks) for (const p of this.pools.values()) p.startChecks();
  }

  findBackends(name: string): Backend[] {
    const out: Backend[] = [];
    for (const p of this.pools.values()) for (const b of p.backends) if (b.id === name || b.name === name) out.push(b);
    if (out.length === 0) throw new PairgateError('NOT_FOUND', `no backend named ${name}`, false);
    return out;
  }

  setState(name: string, state: AdminState): BackendStatus[] {
    return this.findBackends(name).map((b) => (b.setAdmin(state), b.status()));
  }

  setWeight(name: string, weight: number): BackendStatus[] {
    if (!Number.isInteger(weight) || weight < 0 || weight > 256) throw new PairgateError('BAD_INPUT', `weight must be an integer 0..256, got ${weight}`, false);
    return this.findBackends(name).map((b) => {
      b.setWeight(weight);
      this.pools.get(b.pool)?.balancer.invalidate();
      return b.status();
    });
  }

  /** Applies states handed over by a cluster primary (unknown backends are skipped: a reload is on its way). */
  sync(states: BackendSync[]): void {
    const byId = new Map<string, Backend>();
    for (const p of this.pools.values()) for (const b of p.backends) byId.set(b.id, b);
    for (const s of states) {
      const b = byId.get(s.id);
      if (!b) continue;
      b.setHealth(s.up, 'primary');
      // The primary logged these changes; each worker repeating them would make 1 + N lines of one drain.
      if (b.admin !== s.admin) b.setAdmin(s.admin, false);
      if (b.weight !== s.weight) {
        b.setWeight(s.weight, false);
        this.pools.get(b.pool)?.balancer.invalidate();
      }
    }
  }

  snapshot(): BackendSync[] {
    return [...this.pools.values()].flatMap((p) => p.backends.map((b) => ({ id: b.id, up: b.up, admin: b.admin, weight: b.weight })));
  }

  healthy(): boolean {
    return [...this.pools.values()].every((p) => p.backends.some((b) => b.up && b.admin !== 'maintenance'));
  }

  status(): LbStatus['pools'] {
    return [...this.pools.values()].map((p) => ({
      name: p.name,
      balance: p.config.balance,
      proxyProtocol: p.config.proxyProtocol,
      queued: p.queued(),
      backends: p.backends.map((b) => b.status()),
    }));
  }

  close(): void {
    for (const p of this.pools.values()) p.close();
  }
}

/** `{ changed }` answers of the admin routes take `{"backend": "<name>"}`. */
export function backendArg(body: unknown): string {
  const b = (body as { backend?: unknown } | null)?.backend;
  if (typeof b !== 'string' || !b) throw new PairgateError('BAD_INPUT', 'body must be {"backend": "<name>"}', false);
  return b;
}

export async function startLoadBalancer(initial: LbConfig, deps: LbDeps): Promise<LoadBalancer> {
  const { log, registry } = deps;
  const engine = await startBalancerEngine(initial, deps);
  const admin = await startAdminServer({
    host: initial.admin.host,
    port: initial.admin.port,
    token: initial.admin.token,
    registry,
    log,
    health: () => {
      const st = engine.status();
      const healthy = engine.healthy();
      return { healthy, body: { role: 'loadbalancer', healthy, listeners: st.listeners, backends: st.backends } };
    },
    routes: {
      'GET /status': () => engine.status(),
      'POST /drain': ({ body }) => ({ changed: engine.setState(backendArg(body), 'drain') }),
      'POST /ready': ({ body }) => ({ changed: engine.setState(backendArg(body), 'ready') }),
      'POST /maintenance': ({ body }) => ({ changed: engine.setState(backendArg(body), 'maintenance') }),
      'POST /weight': ({ body }) => ({ changed: engine.setWeight(backendArg(body), Number((body as { weight?: unknown }).weight)) }),
    },
  }).catch(async (err: Error) => {
    await engine.stop();
    throw new PairgateError('UNAVAILABLE', `admin listener ${initial.admin.host}:${initial.admin.port}: ${err.message}`, false);
  });
  log.info({ listeners: engine.status().listeners.map((l) => `${l.name}=${l.address}->${l.pool}`), admin: admin.url }, 'load balancer started');
  return {
    ...engine,
    admin,
    stop: async () => {
      await engine.stop();
      await admin.close();
    },
  };
}

/** Listeners, pools and connections; no admin listener (startLoadBalancer adds it; a cluster worker has none). */
export async function startBalancerEngine(initial: LbConfig, deps: LbDeps, opts: EngineOptions = {}): Promise<BalancerEngine> {
  const { log, registry } = deps;
  const withChecks = opts.healthChecks ?? true;
  const metrics = lbMetrics(registry);
  let config = initial;
  const poolSet = new PoolSet(metrics, log, withChecks);
  const pools = poolSet.pools;
  const listeners = new Map<string, Listener>();
  const live = new Set<Conn>();
  let stopping = false;

  const listenerDeps = {
    metrics,
    log,
    live,
    pool: (name: string) => pools.get(name),
    closeLogSample: () => config.closeLog.sample,
    relayBufferBytes: () => config.relay.bulkBufferBytes,
  };
  setMaxBulkPumps(config.relay.maxBulkConnections);

  poolSet.apply(config.pools);
  if (opts.initialBackends) poolSet.sync(opts.initialBackends);
  try {
    for (const lc of config.listeners) {
      const l = new Listener(lc, listenerDeps);
      await l.listen();
      listeners.set(lc.name, l);
    }
  } catch (err) {
    for (const l of listeners.values()) await l.close();
    poolSet.close();
    throw new PairgateError('UNAVAILABLE', (err as Error).message, false);
  }
  // Long sessions (IMAP IDLE) show their bytes while they last, not only at close.
  const accounting = setInterval(() => {
    for (const c of live) c.account();
  }, BYTES_ACCOUNTING_MS);
  accounting.unref();

  const status = (): LbStatus => {
    const poolList = poolSet.status();
    return {
      id: config.id ?? null,
      listeners: [...listeners.values()].map((l) => ({
        name: l.name,
        listen: l.config.listen,
        address: `${l.host.includes(':') ? `[${l.host}]` : l.host}:${l.port}`,
        pool: l.config.pool,
        active: l.active,
        total: l.total,
        maxconn: l.config.maxconn,
      })),
      pools: poolList,
      backends: poolList.flatMap((p) => p.backends.map((b) => ({ ...b, id: `${p.name}/${b.name}`, name: `${p.name}/${b.name}` }))),
      connections: live.size,
    };
  };

  const reload = async (next: LbConfig): Promise<void> => {
    if (stopping) throw new PairgateError('CONFLICT', 'stopping', false);
    // Bind new or moved listeners first: if one fails, nothing has changed yet.
    const opened: Listener[] = [];
    const replaced: Listener[] = [];
    try {
      for (const lc of next.listeners) {
        // A listener on an unchanged address keeps its socket (whatever its name now).
        if ([...listeners.values()].some((x) => sameAddress(x, lc.listen))) continue;
        const l = new Listener(lc, listenerDeps);
        await l.listen();
        opened.push(l);
      }
    } catch (err) {
      for (const l of opened) await l.close();
      throw new PairgateError('UNAVAILABLE', (err as Error).message, false);
    }
    // Pools: kept ones reconcile their backends (state and connections kept), new ones start.
    poolSet.apply(next.pools);
    // Listeners: moved or removed ones stop accepting (their connections stay), kept ones follow the new pool.
    const keep = new Map<string, Listener>();
    for (const lc of next.listeners) {
      const o = opened.find((l) => l.config.name === lc.name);
      if (o) {
        keep.set(lc.name, o);
        continue;
      }
      const cur = [...listeners.values()].find((l) => sameAddress(l, lc.listen))!;
      cur.config = lc;
      keep.set(lc.name, cur);
    }
    for (const l of listeners.values()) if (![...keep.values()].includes(l)) replaced.push(l);
    for (const l of replaced) await l.close();
    listeners.clear();
    for (const [k, v] of keep) listeners.set(k, v);
    config = next;
    setMaxBulkPumps(config.relay.maxBulkConnections);
    log.info(
      { listeners: [...listeners.values()].map((l) => `${l.name}=${l.host}:${l.port}->${l.config.pool}`), connections: live.size },
      'load balancer config applied',
    );
  };

  return {
    status,
    listenerAddress: (name) => {
      const l = listeners.get(name);
      if (!l) throw new PairgateError('NOT_FOUND', `no listener ${name}`, false);
      return { host: l.host, port: l.port };
    },
    reload,
    setState: (name, state) => poolSet.setState(name, state),
    setWeight: (name, weight) => poolSet.setWeight(name, weight),
    setHealth: (id, up, reason) => {
      for (const b of poolSet.findBackends(id)) if (b.id === id) b.setHealth(up, reason);
    },
    syncBackends: (states) => poolSet.sync(states),
    checkNow: async () => {
      await Promise.all([...pools.values()].flatMap((p) => p.backends.map((b) => b.checkOnce())));
    },
    healthy: () => !stopping && poolSet.healthy(),
    stop: async () => {
      if (stopping) return;
      stopping = true;
      clearInterval(accounting);
      for (const l of listeners.values()) await l.close();
      poolSet.close();
      const deadline = Date.now() + config.stopGraceMs;
      while (live.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      if (live.size > 0) log.warn({ connections: live.size }, 'stop grace over: closing the remaining connections');
      for (const c of [...live]) c.destroy();
    },
  };
}
