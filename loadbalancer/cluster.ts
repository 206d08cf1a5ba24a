/**
 * `pairgate lb` on every core: a primary process and `workers` worker processes (node:cluster),
 * as HAProxy runs nbthread threads and nginx worker_processes processes.
 *
 * Accepting: the cluster runs with SCHED_NONE. The primary binds each listener once and hands the
 * socket to every worker, and each worker accepts on it itself: the kernel gives each new
 * connection to one of the workers waiting on it, with no IPC per connection. (Node's default,
 * round-robin, accepts everything in the primary and passes each connection to a worker over IPC,
 * which costs more than a balancer's whole per-connection work.) Node 20 has no `reusePort`.
 *
 * Each worker runs a full engine (listeners, pools, the splice; index.ts) on its share of the
 * limits (workerShare) and no health checks of its own. The primary:
 *   - runs the health checks once and passes every up/down transition to all workers at once, so
 *     a backend is never up in one worker and down in another for longer than an IPC message
 *     takes (checks per worker would multiply the check traffic and could disagree for a whole
 *     interval x fall);
 *   - owns the admin state (drain, maintenance, weight): an admin call is applied by every
 *     running worker before it is answered (one that fails to answer within CALL_TIMEOUT_MS is
 *     logged, named in the answer and sent the state once more a second later), and a worker that starts (or restarts) gets the current state
 *     before it accepts;
 *   - serves the admin HTTP listener: /metrics sums the workers' registries with its own
 *     (prom-client's AggregatorRegistry.aggregate), /status merges the workers' figures and lists
 *     the workers, /health;
 *   - restarts a worker that dies (backoff from 100 ms doubling to 10 s while it keeps dying
 *     within 10 s of its start), forwards a reload (SIGHUP) to every worker and stops them
 *     gracefully.
 *
 * Workers ignore SIGINT/SIGTERM/SIGHUP (a terminal's Ctrl-C or a service manager's stop reaches the
 * whole process group; the primary orders the stop) and stop gracefully if the primary is gone
 * (IPC channel closed).
 */
import cluster, { type Worker } from 'node:cluster';
import os from 'node:os';
import { AggregatorRegistry, Registry } from 'prom-client';
import { startAdminServer, type AdminServer } from '../common/admin-http.ts';
import { PairgateError } from '../common/errors.ts';
import { createLogger, type Logger } from '../common/log.ts';
import { createRegistry, type MetricsRegistry } from '../common/metrics.ts';
import type { AdminState } from './backend.ts';
import type { LbConfig } from './config.ts';
import { backendArg, PoolSet, startBalancerEngine, type BackendSync, type BalancerEngine, type LbStatus, type LbWorkerStatus } from './index.ts';
import { lbMetrics } from './metrics.ts';

/** The `workers` setting as a process count. */
export function workerCount(setting: LbConfig['workers']): number {
  return setting === 'auto' ? os.availableParallelism() : setting;
}

/**
 * A worker's config: every per-process limit divided by the worker count (rounded up, so the
 * sum over the workers is the configured limit plus at most workers - 1). Connections are not
 * spread evenly by the kernel, so one worker may be at its share while another has room.
 */
export function workerShare(config: LbConfig, workers: number): LbConfig {
  const share = (n: number) => (n === 0 ? 0 : Math.ceil(n / workers));
  return {
    ...config,
    listeners: config.listeners.map((l) => ({ ...l, maxconn: share(l.maxconn) })),
    pools: Object.fromEntries(
      Object.entries(config.pools).map(([name, p]) => [name, { ...p, maxQueue: share(p.maxQueue), backends: p.backends.map((b) => ({ ...b, maxconn: share(b.maxconn) })) }]),
    ),
    relay: { ...config.relay, maxBulkConnections: share(config.relay.maxBulkConnections) },
  };
}

/** Metrics only the primary has the truth of (workers run no checks); the workers' copies are left out. */
const PRIMARY_OWNED_METRICS = new Set(['pairgate_lb_backend_up', 'pairgate_lb_check_total']);
/** Bound for one IPC call to a worker (status, metrics, an admin change). */
const CALL_TIMEOUT_MS = 5000;
/** Bound for the workers' status answers behind /health. */
const HEALTH_CALL_TIMEOUT_MS = 1000;
const START_TIMEOUT_MS = 60_000;
const RESTART_MIN_MS = 100;
const RESTART_MAX_MS = 10_000;
/** A worker that ran this long before dying restarts after RESTART_MIN_MS again. */
const STABLE_MS = 10_000;
/** Marks this process as a balancer worker for the CLI (cluster.fork runs the same command line). */
export const WORKER_ENV = 'PAIRGATE_LB_WORKER';

type CallOp = 'status' | 'metrics' | 'sync' | 'reload' | 'stop';

type ToWorker =
  | { t: 'start'; slot: number; config: LbConfig; backends: BackendSync[] }
  | { t: 'health'; id: string; up: boolean; reason: string }
  | { t: 'call'; n: number; op: CallOp; arg?: unknown };

type FromWorker =
  | { t: 'hello' }
  | { t: 'ready' }
  | { t: 'start-failed'; message: string }
  | { t: 'reply'; n: number; ok: true; result: unknown }
  | { t: 'reply'; n: number; ok: false; code: PairgateError['code']; message: string };

interface Slot {
  n: number;
  worker: Worker | null;
  ready: boolean;
  startedAt: number;
  restarts: number;
  backoffMs: number;
  timer: NodeJS.Timeout | null;
  /** Kills a worker that has not become ready within START_TIMEOUT_MS of its fork (its exit restarts it). */
  startTimer: NodeJS.Timeout | null;
  /** Config generation the worker runs (a worker that started during a reload catches up). */
  gen: number;
}

interface Pending {
  slot: Slot;
  resolve(v: unknown): void;
  reject(e: Error): void;
  timer: NodeJS.Timeout;
}

/** Sums the workers' registries with the primary's own at each scrape. */
class ClusterRegistry extends Registry {
  constructor(
    private readonly own: Registry,
    private readonly fromWorkers: () => Promise<Array<Array<{ name: string }>>>,
  ) {
    super();
  }

  override async metrics(): Promise<string> {
    const workers = (await this.fromWorkers()).map((list) => list.filter((m) => !PRIMARY_OWNED_METRICS.has(m.name)));
    return AggregatorRegistry.aggregate([await this.own.getMetricsAsJSON(), ...workers]).metrics();
  }
}

export interface LbCluster {
  admin: AdminServer;
  status(): Promise<LbStatus>;
  /** Applies a new config in every worker (and the primary's checks); throws if every worker refused it. */
  reload(config: LbConfig): Promise<void>;
  stop(): Promise<void>;
}

export interface ClusterDeps {
  log: Logger;
  registry: MetricsRegistry;
  workers: number;
}

/** Starts the workers and the primary's admin listener and checks; resolves once every worker accepts. */
export async function startLbCluster(initial: LbConfig, deps: ClusterDeps): Promise<LbCluster> {
  const { log, registry } = deps;
  const count = deps.workers;
  let config = initial;
  let gen = 1;
  let stopping = false;
  let nextCall = 1;
  const pending = new Map<number, Pending>();
  const slots: Slot[] = Array.from({ length: count }, (_, i) => ({ n: i + 1, worker: null, ready: false, startedAt: 0, restarts: 0, backoffMs: RESTART_MIN_MS, timer: null, startTimer: null, gen: 0 }));

  const send = (slot: Slot, m: ToWorker): boolean => {
    const w = slot.worker;
    if (!w || !w.isConnected()) return false;
    w.send(m);
    return true;
  };

  const poolSet = new PoolSet(lbMetrics(registry), log, true, (b, up, reason) => {
    for (const s of slots) if (s.ready) send(s, { t: 'health', id: b.id, up, reason });
  });

  const call = (slot: Slot, op: CallOp, arg?: unknown, timeoutMs = CALL_TIMEOUT_MS): Promise<unknown> =>
    new Promise((resolve, reject) => {
      if (!slot.ready) return reject(new PairgateError('UNAVAILABLE', `worker ${slot.n} is not running`, true));
      const n = nextCall++;
      const timer = setTimeout(() => {
        pending.delete(n);
        reject(new PairgateError('UNAVAILABLE', `worker ${slot.n} did not answer ${op} within ${timeoutMs} ms`, true));
      }, timeoutMs);
      pending.set(n, { slot, resolve, reject, timer });
      if (!send(slot, { t: 'call', n, op, arg })) {
        clearTimeout(timer);
        pending.delete(n);
        reject(new PairgateError('UNAVAILABLE', `worker ${slot.n} is not connected`, true));
      }
    });

  /** Answers of every running worker (a worker that fails to answer is logged and left out). */
  const callAll = async (op: CallOp, arg?: unknown, timeoutMs?: number): Promise<Array<{ slot: Slot; result: unknown }>> => {
    const running = slots.filter((s) => s.ready);
    const settled = await Promise.allSettled(running.map((s) => call(s, op, arg, timeoutMs)));
    const out: Array<{ slot: Slot; result: unknown }> = [];
    settled.forEach((r, i) => {
      if (r.status === 'fulfilled') out.push({ slot: running[i]!, result: r.value });
      else log.warn({ worker: running[i]!.n, op, err: (r.reason as Error).message }, 'worker call failed');
    });
    return out;
  };

  /**
   * A worker that started on an older config (a reload ran while it started) takes the current
   * one, then the backends' states again: backends the reload added were unknown to its earlier
   * sync, and health messages for them were dropped until it had them.
   */
  const catchUp = (slot: Slot) => {
    slot.gen = gen;
    void call(slot, 'reload', workerShare(config, count), 15_000).then(
      () => call(slot, 'sync', poolSet.snapshot()).catch(() => {}),
      (err: Error) => log.error({ worker: slot.n, err: err.message }, 'worker refused the current config'),
    );
  };

  let startup: { resolve(): void; reject(e: Error): void } | null = null;
  let startupWaiting = count;

  const fork = (slot: Slot) => {
    slot.timer = null;
    slot.ready = false;
    slot.startedAt = Date.now();
    const w = cluster.fork({ [WORKER_ENV]: String(slot.n) });
    slot.worker = w;
    // A worker stuck while starting (a restart after the first start included) would otherwise
    // show "starting" for ever with its share of the limits idle: kill it, its exit restarts it.
    slot.startTimer = setTimeout(() => {
      slot.startTimer = null;
      if (slot.worker !== w || slot.ready || w.isDead()) return;
      log.error({ worker: slot.n, workerPid: w.process.pid, timeoutMs: START_TIMEOUT_MS }, 'worker did not become ready in time; killing it');
      w.process.kill('SIGKILL');
    }, START_TIMEOUT_MS);
    w.on('message', (m: FromWorker) => {
      if (slot.worker !== w) return;
      // Sent once its message handler is in place (a message sent before that, at 'online', would be lost).
      if (m.t === 'hello') {
        slot.gen = gen;
        send(slot, { t: 'start', slot: slot.n, config: workerShare(config, count), backends: poolSet.snapshot() });
      } else if (m.t === 'ready') {
        slot.ready = true;
        if (slot.startTimer) (clearTimeout(slot.startTimer), (slot.startTimer = null));
        log.info({ worker: slot.n, workerPid: w.process.pid }, 'worker accepting');
        // Admin or health changes made while it started, and a reload it missed.
        void call(slot, 'sync', poolSet.snapshot()).catch(() => {});
        if (slot.gen !== gen) catchUp(slot);
        if (startup && --startupWaiting === 0) startup.resolve();
      } else if (m.t === 'start-failed') {
        log.error({ worker: slot.n, err: m.message }, 'worker could not start');
        startup?.reject(new PairgateError('UNAVAILABLE', m.message, false));
      } else if (m.t === 'reply') {
        const p = pending.get(m.n);
        if (!p) return;
        pending.delete(m.n);
        clearTimeout(p.timer);
        if (m.ok) p.resolve(m.result);
        else p.reject(new PairgateError(m.code, m.message, false));
      }
    });
    // A send() that fails (the channel of a worker that has just died) is an 'error' event on the
    // worker (send is called without a callback); with no listener it would be an uncaught
    // exception in the primary, ending every worker. Its exit follows and restarts it.
    w.on('error', (err: Error) => log.warn({ worker: slot.n, workerPid: w.process.pid, err: err.message }, 'worker IPC error'));
    w.on('exit', (code, signal) => {
      if (slot.worker !== w) return;
      if (slot.startTimer) (clearTimeout(slot.startTimer), (slot.startTimer = null));
      slot.worker = null;
      slot.ready = false;
      for (const [n, p] of pending) {
        if (p.slot !== slot) continue;
        pending.delete(n);
        clearTimeout(p.timer);
        p.reject(new PairgateError('UNAVAILABLE', `worker ${slot.n} exited`, true));
      }
      if (stopping) return;
      if (startup) {
        startup.reject(new PairgateError('UNAVAILABLE', `worker ${slot.n} exited while starting (code ${code}, signal ${signal})`, false));
        return;
      }
      if (Date.now() - slot.startedAt >= STABLE_MS) slot.backoffMs = RESTART_MIN_MS;
      const delay = slot.backoffMs;
      slot.backoffMs = Math.min(delay * 2, RESTART_MAX_MS);
      slot.restarts++;
      log.error({ worker: slot.n, workerPid: w.process.pid, code, signal, restartInMs: delay, restarts: slot.restarts }, 'worker exited; restarting it');
      slot.timer = setTimeout(() => fork(slot), delay);
    });
  };

  const stopWorkers = async () => {
    for (const s of slots) {
      if (s.timer) (clearTimeout(s.timer), (s.timer = null));
      if (s.startTimer) (clearTimeout(s.startTimer), (s.startTimer = null));
    }
    await Promise.all(
      slots.map(async (s) => {
        const w = s.worker;
        if (!w) return;
        const exited = new Promise<void>((r) => (w.isDead() ? r() : w.once('exit', () => r())));
        // The worker answers once its connections are done (or closed at stopGraceMs), then exits.
        await call(s, 'stop', undefined, config.stopGraceMs + 5000).catch(() => {});
        const killTimer = setTimeout(() => w.process.kill('SIGKILL'), 3000);
        if (!s.ready && !w.isDead()) w.process.kill('SIGKILL');
        await exited;
        clearTimeout(killTimer);
      }),
    );
  };

  // Each worker accepts on the shared socket itself (see the header); set before the first fork.
  cluster.schedulingPolicy = cluster.SCHED_NONE;
  poolSet.apply(config.pools);
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new PairgateError('UNAVAILABLE', `workers did not start within ${START_TIMEOUT_MS} ms`, false)), START_TIMEOUT_MS);
      startup = {
        resolve: () => (clearTimeout(timer), resolve()),
        reject: (e) => (clearTimeout(timer), reject(e)),
      };
      for (const s of slots) fork(s);
    });
  } catch (err) {
    stopping = true;
    poolSet.close();
    for (const s of slots) s.worker?.process.kill('SIGKILL');
    throw err;
  } finally {
    startup = null;
  }

  /** Merged status; a worker that does not answer within `timeoutMs` is logged and counted with no connections. */
  const status = async (timeoutMs = CALL_TIMEOUT_MS): Promise<LbStatus> => {
    const answers = await callAll('status', undefined, timeoutMs);
    const byWorker = new Map<Slot, LbStatus>(answers.map((a) => [a.slot, a.result as LbStatus]));
    const sums = new Map<string, { active: number; total: number }>();
    const add = (key: string, active: number, total: number) => {
      const s = sums.get(key) ?? { active: 0, total: 0 };
      s.active += active;
      s.total += total;
      sums.set(key, s);
    };
    for (const st of byWorker.values()) {
      for (const l of st.listeners) add(`listener:${l.name}`, l.active, l.total);
      for (const b of st.backends) add(`backend:${b.id}`, b.active, b.total);
    }
    const queued = (pool: string) => [...byWorker.values()].reduce((n, st) => n + (st.pools.find((p) => p.name === pool)?.queued ?? 0), 0);
    const anyWorker = [...byWorker.values()][0];
    const pools = poolSet.status().map((p) => ({
      ...p,
      queued: queued(p.name),
      backends: p.backends.map((b) => ({ ...b, ...(sums.get(`backend:${p.name}/${b.name}`) ?? { active: 0, total: 0 }) })),
    }));
    const workers: LbWorkerStatus[] = slots.map((s) => {
      const st = byWorker.get(s);
      return {
        worker: s.n,
        pid: s.worker?.process.pid ?? 0,
        state: s.ready ? 'running' : s.worker ? 'starting' : 'restarting',
        connections: st?.connections ?? 0,
        spliced: st?.listeners.reduce((n, l) => n + l.total, 0) ?? 0,
        restarts: s.restarts,
      };
    });
    return {
      id: config.id ?? null,
      listeners: config.listeners.map((l) => ({
        name: l.name,
        listen: l.listen,
        address: anyWorker?.listeners.find((x) => x.name === l.name)?.address ?? l.listen,
        pool: l.pool,
        ...(sums.get(`listener:${l.name}`) ?? { active: 0, total: 0 }),
        maxconn: l.maxconn,
      })),
      pools,
      backends: pools.flatMap((p) => p.backends.map((b) => ({ ...b, id: `${p.name}/${b.name}`, name: `${p.name}/${b.name}` }))),
      connections: workers.reduce((n, w) => n + w.connections, 0),
      workers,
    };
  };

  /** An admin change: the primary's state first (it names a bad backend), then every worker applies it before the answer. */
  const adminChange = async (apply: () => unknown, name: string) => {
    apply();
    const running = slots.filter((sl) => sl.ready);
    const answered = new Set((await callAll('sync', poolSet.snapshot())).map((a) => a.slot));
    // A worker alive but slow to answer would keep the old drain/weight until the next change:
    // send it the state again once more a little later, and say so in the answer.
    const notAnswering = running.filter((sl) => !answered.has(sl));
    for (const sl of notAnswering) {
      setTimeout(() => {
        if (sl.ready) call(sl, 'sync', poolSet.snapshot()).catch((err: Error) => log.error({ worker: sl.n, err: err.message }, 'worker still not taking the admin state'));
      }, 1000).unref();
    }
    const st = await status();
    const changed = new Set(poolSet.findBackends(name).map((b) => b.id));
    // Shaped as the single process answers: `name` without the pool, `pool` beside it.
    return {
      changed: st.pools.flatMap((p) => p.backends.filter((b) => changed.has(`${p.name}/${b.name}`))),
      ...(notAnswering.length ? { workersNotAnswering: notAnswering.map((sl) => sl.n) } : {}),
    };
  };
  const setState = (body: unknown, state: AdminState) => {
    const name = backendArg(body);
    return adminChange(() => poolSet.setState(name, state), name);
  };

  const metricsRegistry = new ClusterRegistry(registry, async () => (await callAll('metrics')).map((a) => a.result as Array<{ name: string }>));
  let admin: AdminServer;
  try {
    admin = await startAdminServer({
      host: config.admin.host,
      port: config.admin.port,
      token: config.admin.token,
      registry: metricsRegistry,
      log,
      health: async () => {
        // A health probe has a short timeout of its own: one hung worker must not make it wait 5 s.
        const st = await status(HEALTH_CALL_TIMEOUT_MS);
        const healthy = !stopping && poolSet.healthy() && slots.some((s) => s.ready);
        return { healthy, body: { role: 'loadbalancer', healthy, listeners: st.listeners, backends: st.backends, workers: st.workers } };
      },
      routes: {
        'GET /status': () => status(),
        'POST /drain': ({ body }) => setState(body, 'drain'),
        'POST /ready': ({ body }) => setState(body, 'ready'),
        'POST /maintenance': ({ body }) => setState(body, 'maintenance'),
        'POST /weight': ({ body }) => {
          const name = backendArg(body);
          return adminChange(() => poolSet.setWeight(name, Number((body as { weight?: unknown }).weight)), name);
        },
      },
    });
  } catch (err) {
    stopping = true;
    poolSet.close();
    await stopWorkers();
    throw new PairgateError('UNAVAILABLE', `admin listener ${config.admin.host}:${config.admin.port}: ${(err as Error).message}`, false);
  }
  log.info({ workers: count, workerPids: slots.map((s) => s.worker?.process.pid), listeners: config.listeners.map((l) => `${l.name}=${l.listen}->${l.pool}`), admin: admin.url }, 'load balancer started');

  return {
    admin,
    status,
    reload: async (next) => {
      if (stopping) throw new PairgateError('CONFLICT', 'stopping', false);
      const wanted = workerCount(next.workers);
      if (wanted !== count) log.warn({ running: count, configured: wanted }, 'a change of workers takes a restart; keeping the running count');
      const running = slots.filter((s) => s.ready);
      const asked = new Set(running.map((s) => s.worker));
      const settled = await Promise.allSettled(running.map((s) => call(s, 'reload', workerShare(next, count), 15_000)));
      const refused = settled.flatMap((r, i) => (r.status === 'rejected' ? [{ worker: running[i]!.n, err: (r.reason as Error).message }] : []));
      // A refusal is the same in every worker (a new port that cannot be bound): all of them keep the old config.
      if (running.length > 0 && refused.length === running.length) throw new PairgateError('UNAVAILABLE', refused[0]!.err, false);
      if (refused.length > 0) log.error({ refused }, 'config applied by some workers only; the others keep the old one');
      poolSet.apply(next.pools);
      config = next;
      gen++;
      for (const s of running) if (!refused.some((r) => r.worker === s.n)) s.gen = gen;
      // A worker that became ready while the workers above reloaded (a restart) started on the old
      // config and compared generations before this one counted: it catches up now.
      for (const s of slots) if (s.ready && s.gen !== gen && !asked.has(s.worker)) catchUp(s);
    },
    stop: async () => {
      if (stopping) return;
      stopping = true;
      poolSet.close();
      await stopWorkers();
      await admin.close();
    },
  };
}

/** Runs in a worker process (cluster.fork of `pairgate lb`): waits for the primary's start message. */
export function runLbWorker(): void {
  // The primary orders stops and reloads (see the header).
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, () => {});
  let engine: BalancerEngine | null = null;
  let registry: MetricsRegistry | null = null;
  let log: Logger | null = null;
  let stopping: Promise<void> | null = null;
  const reply = (m: FromWorker, then?: () => void) => {
    if (process.connected) process.send!(m, undefined, {}, () => then?.());
    else then?.();
  };
  const stop = () => (stopping ??= engine ? engine.stop() : Promise.resolve());

  const handle = async (m: ToWorker): Promise<void> => {
    if (m.t === 'start') {
      log = createLogger({ role: 'loadbalancer', level: m.config.logLevel, base: { ...(m.config.id ? { lb: m.config.id } : {}), worker: m.slot } });
      registry = createRegistry({ role: 'loadbalancer', ...(m.config.id ? { instance_name: m.config.id } : {}) });
      try {
        engine = await startBalancerEngine(m.config, { log, registry }, { healthChecks: false, initialBackends: m.backends });
      } catch (err) {
        reply({ t: 'start-failed', message: (err as Error).message }, () => process.exit(1));
        return;
      }
      reply({ t: 'ready' });
      return;
    }
    if (!engine || !registry) return;
    if (m.t === 'health') {
      engine.setHealth(m.id, m.up, m.reason);
      return;
    }
    try {
      let result: unknown = null;
      if (m.op === 'status') result = engine.status();
      else if (m.op === 'metrics') result = await registry.getMetricsAsJSON();
      else if (m.op === 'sync') engine.syncBackends(m.arg as BackendSync[]);
      else if (m.op === 'reload') await engine.reload(m.arg as LbConfig);
      else if (m.op === 'stop') {
        await stop();
        reply({ t: 'reply', n: m.n, ok: true, result: null }, () => process.exit(0));
        return;
      }
      reply({ t: 'reply', n: m.n, ok: true, result });
    } catch (err) {
      const e = err as Error;
      reply({ t: 'reply', n: m.n, ok: false, code: err instanceof PairgateError ? err.code : 'UNAVAILABLE', message: e.message });
    }
  };
  process.on('message', (m: ToWorker) => {
    handle(m).catch((err: Error) => log?.error({ err: err.message }, 'worker message failed'));
  });
  reply({ t: 'hello' });
  // The primary is gone (killed): finish the connections, then leave.
  process.on('disconnect', () => {
    log?.warn('primary gone: stopping');
    void stop().finally(() => process.exit(0));
  });
}
