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
 */
import type { Logger } from '../common/log.ts';
import type { MetricsRegistry } from '../common/metrics.ts';
import { startAdminServer, type AdminServer } from '../common/admin-http.ts';
import { setMaxBulkPumps } from '../common/relay.ts';
import { PairgateError } from '../common/errors.ts';
import type { AdminState, Backend, BackendStatus } from './backend.ts';
import { splitHostPort, type LbConfig } from './config.ts';
import { Listener, type Conn } from './listener.ts';
import { lbMetrics } from './metrics.ts';
import { Pool } from './pool.ts';

export { lbConfigSchema, type LbConfig, type PoolConfig, type BackendConfig, type ListenerConfig, BALANCE_METHODS } from './config.ts';
export type { BackendStatus } from './backend.ts';

export interface LbStatus {
  id: string | null;
  listeners: Array<{ name: string; listen: string; address: string; pool: string; active: number; total: number; maxconn: number }>;
  pools: Array<{ name: string; balance: string; proxyProtocol: string; queued: number; backends: BackendStatus[] }>;
  /** All backends of all pools (`name` is `pool/backend`), for `pairgate status`. */
  backends: Array<BackendStatus & { id: string }>;
  connections: number;
}

export interface LoadBalancer {
  admin: AdminServer;
  status(): LbStatus;
  listenerAddress(name: string): { host: string; port: number };
  /** Applies a new config; established connections stay. Throws (old config kept) if a new listener cannot bind. */
  reload(config: LbConfig): Promise<void>;
  /** Admin actions by backend name (`name` in every pool, or `pool/name`). Returns the backends changed. */
  setState(backend: string, state: AdminState): BackendStatus[];
  setWeight(backend: string, weight: number): BackendStatus[];
  /** Runs one health check round now (tests, `pairgate lb check`). */
  checkNow(): Promise<void>;
  stop(): Promise<void>;
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

export async function startLoadBalancer(initial: LbConfig, deps: LbDeps): Promise<LoadBalancer> {
  const { log, registry } = deps;
  const metrics = lbMetrics(registry);
  let config = initial;
  const pools = new Map<string, Pool>();
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

  for (const [name, pc] of Object.entries(config.pools)) pools.set(name, new Pool(name, pc, metrics, log));
  try {
    for (const lc of config.listeners) {
      const l = new Listener(lc, listenerDeps);
      await l.listen();
      listeners.set(lc.name, l);
    }
  } catch (err) {
    for (const l of listeners.values()) await l.close();
    for (const p of pools.values()) p.close();
    throw new PairgateError('UNAVAILABLE', (err as Error).message, false);
  }
  for (const p of pools.values()) p.startChecks();
  // Long sessions (IMAP IDLE) show their bytes while they last, not only at close.
  const accounting = setInterval(() => {
    for (const c of live) c.account();
  }, BYTES_ACCOUNTING_MS);
  accounting.unref();

  const findBackends = (name: string): Backend[] => {
    const out: Backend[] = [];
    for (const p of pools.values()) for (const b of p.backends) if (b.id === name || b.name === name) out.push(b);
    if (out.length === 0) throw new PairgateError('NOT_FOUND', `no backend named ${name}`, false);
    return out;
  };

  const status = (): LbStatus => {
    const poolList = [...pools.values()].map((p) => ({
      name: p.name,
      balance: p.config.balance,
      proxyProtocol: p.config.proxyProtocol,
      queued: p.queued(),
      backends: p.backends.map((b) => b.status()),
    }));
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

  const setState = (name: string, state: AdminState) => findBackends(name).map((b) => (b.setAdmin(state), b.status()));
  const setWeight = (name: string, weight: number) => {
    if (!Number.isInteger(weight) || weight < 0 || weight > 256) throw new PairgateError('BAD_INPUT', `weight must be an integer 0..256, got ${weight}`, false);
    return findBackends(name).map((b) => {
      b.setWeight(weight);
      pools.get(b.pool)?.balancer.invalidate();
      return b.status();
    });
  };

  const backendArg = (body: unknown): string => {
    const b = (body as { backend?: unknown } | null)?.backend;
    if (typeof b !== 'string' || !b) throw new PairgateError('BAD_INPUT', 'body must be {"backend": "<name>"}', false);
    return b;
  };

  const admin = await startAdminServer({
    host: config.admin.host,
    port: config.admin.port,
    token: config.admin.token,
    registry,
    log,
    health: () => {
      const st = status();
      const healthy = !stopping && [...pools.values()].every((p) => p.backends.some((b) => b.up && b.admin !== 'maintenance'));
      return { healthy, body: { role: 'loadbalancer', healthy, listeners: st.listeners, backends: st.backends } };
    },
    routes: {
      'GET /status': () => status(),
      'POST /drain': ({ body }) => ({ changed: setState(backendArg(body), 'drain') }),
      'POST /ready': ({ body }) => ({ changed: setState(backendArg(body), 'ready') }),
      'POST /maintenance': ({ body }) => ({ changed: setState(backendArg(body), 'maintenance') }),
      'POST /weight': ({ body }) => ({ changed: setWeight(backendArg(body), Number((body as { weight?: unknown }).weight)) }),
    },
  }).catch(async (err: Error) => {
    for (const l of listeners.values()) await l.close();
    for (const p of pools.values()) p.close();
    throw new PairgateError('UNAVAILABLE', `admin listener ${config.admin.host}:${config.admin.port}: ${err.message}`, false);
  });

  log.info(
    { listeners: [...listeners.values()].map((l) => `${l.name}=${l.host}:${l.port}->${l.config.pool}`), admin: admin.url },
    'load balancer started',
  );

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
    for (const [name, pc] of Object.entries(next.pools)) {
      const p = pools.get(name);
      if (p) p.apply(pc);
      else {
        const np = new Pool(name, pc, metrics, log);
        pools.set(name, np);
        np.startChecks();
      }
    }
    for (const [name, p] of pools) if (!next.pools[name]) (p.close(), pools.delete(name));
    for (const p of pools.values()) p.startChecks();
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
    admin,
    status,
    listenerAddress: (name) => {
      const l = listeners.get(name);
      if (!l) throw new PairgateError('NOT_FOUND', `no listener ${name}`, false);
      return { host: l.host, port: l.port };
    },
    reload,
    setState,
    setWeight,
    checkNow: async () => {
      await Promise.all([...pools.values()].flatMap((p) => p.backends.map((b) => b.checkOnce())));
    },
    stop: async () => {
      if (stopping) return;
      stopping = true;
      clearInterval(accounting);
      for (const l of listeners.values()) await l.close();
      for (const p of pools.values()) p.close();
      const deadline = Date.now() + config.stopGraceMs;
      while (live.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
      if (live.size > 0) log.warn({ connections: live.size }, 'stop grace over: closing the remaining connections');
      for (const c of [...live]) c.destroy();
      await admin.close();
    },
  };
}
