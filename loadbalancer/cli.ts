/**
 * `pairgate lb --config FILE`: runs the load balancer until SIGTERM/SIGINT; SIGHUP re-reads the
 * file (a bad file is refused whole, the old config kept, no connection dropped). With `workers`
 * above 1 (the default `auto` is one per CPU) this process is the primary of worker processes
 * that each accept on every listener (cluster.ts); with 1 it is the balancer itself.
 *
 * `pairgate lb status|drain|ready|maintenance|weight <backend> [n]` talk to a running balancer's
 * admin API, found with `--admin URL` or from the `admin` section of `--config FILE`. A backend
 * is named `name` (that backend in every pool) or `pool/name`.
 */
import cluster from 'node:cluster';
import type { Command } from 'commander';
import Table from 'cli-table3';
import { adminCall } from '../common/admin-http.ts';
import { loadConfigFile } from '../common/config.ts';
import { PairgateError, UnavailableError } from '../common/errors.ts';
import { createLogger } from '../common/log.ts';
import { createRegistry } from '../common/metrics.ts';
import { installLifecycle } from '../common/lifecycle.ts';
import { runLbWorker, startLbCluster, WORKER_ENV, workerCount } from './cluster.ts';
import { lbConfigSchema, startLoadBalancer, type LbStatus } from './index.ts';

interface Globals {
  config?: string;
  admin?: string;
  token?: string;
  json?: boolean;
}

function target(opts: Globals): { url: string; token: string | undefined } {
  if (opts.admin) return { url: opts.admin, token: opts.token ?? process.env.PAIRGATE_ADMIN_TOKEN };
  if (!opts.config) throw new PairgateError('BAD_INPUT', 'give --admin URL or --config FILE to find the balancer', false);
  const cfg = loadConfigFile(lbConfigSchema, opts.config);
  if (!cfg.admin.port) throw new PairgateError('BAD_INPUT', `${opts.config}: admin.port is 0 (ephemeral); give --admin URL`, false);
  const host = cfg.admin.host === '0.0.0.0' ? '127.0.0.1' : cfg.admin.host === '::' ? '::1' : cfg.admin.host;
  return { url: `http://${host.includes(':') ? `[${host}]` : host}:${cfg.admin.port}`, token: opts.token ?? cfg.admin.token };
}

async function call(opts: Globals, method: 'GET' | 'POST', path: string, body?: unknown): Promise<unknown> {
  const t = target(opts);
  let r: { status: number; body: unknown };
  try {
    r = await adminCall(t.url, method, path, body, { token: t.token });
  } catch (err) {
    throw new UnavailableError(`cannot reach the balancer's admin API at ${t.url}: ${(err as Error).message}`);
  }
  if (r.status !== 200) {
    const msg = (r.body as { message?: string })?.message ?? JSON.stringify(r.body);
    throw new PairgateError(r.status === 404 ? 'NOT_FOUND' : r.status === 403 ? 'AUTH_FAILED' : 'BAD_INPUT', msg, false);
  }
  return r.body;
}

export function formatStatus(st: LbStatus): string {
  const l = new Table({ style: { head: [], border: [] }, head: ['listener', 'address', 'pool', 'active', 'total', 'maxconn'] });
  for (const x of st.listeners) l.push([x.name, x.address, x.pool, x.active, x.total, x.maxconn || '-']);
  const b = new Table({ style: { head: [], border: [] }, head: ['backend', 'address', 'state', 'weight', 'active', 'total', 'last check'] });
  for (const p of st.pools) {
    for (const x of p.backends) {
      b.push([`${p.name}/${x.name}`, x.address, x.state, x.effectiveWeight === x.weight ? x.weight : `${x.effectiveWeight}/${x.weight}`, x.active, x.total, x.checks.lastResult ?? '-']);
    }
  }
  if (!st.workers) return `${l.toString()}\n${b.toString()}`;
  const w = new Table({ style: { head: [], border: [] }, head: ['worker', 'pid', 'state', 'connections', 'spliced', 'restarts'] });
  for (const x of st.workers) w.push([x.worker, x.pid || '-', x.state, x.connections, x.spliced, x.restarts]);
  return `${l.toString()}\n${b.toString()}\n${w.toString()}`;
}

export function register(program: Command): void {
  const lb = program
    .command('lb')
    .description('run the L4 load balancer (--config FILE), or steer a running one: status|drain|ready|maintenance|weight')
    .option('-c, --config <file>', 'load balancer config file (YAML)')
    .option('--admin <url>', 'admin API of a running balancer (for the sub-commands)')
    .option('--token <token>', 'admin bearer token (default: from the config, or PAIRGATE_ADMIN_TOKEN)')
    .action(async (opts: Globals) => {
      // A worker forked by the primary below: it takes its config from the primary, not the file.
      if (cluster.isWorker && process.env[WORKER_ENV]) return runLbWorker();
      if (!opts.config) throw new PairgateError('BAD_INPUT', 'pairgate lb: --config FILE is required to run the balancer', false);
      const config = loadConfigFile(lbConfigSchema, opts.config);
      const log = createLogger({ role: 'loadbalancer', level: config.logLevel, ...(config.id ? { base: { lb: config.id } } : {}) });
      const registry = createRegistry({ role: 'loadbalancer', ...(config.id ? { instance_name: config.id } : {}) });
      const reread = () => loadConfigFile(lbConfigSchema, opts.config!);
      const workers = workerCount(config.workers);
      if (workers > 1) {
        const lbc = await startLbCluster(config, { log, registry, workers });
        installLifecycle({
          log,
          stop: () => lbc.stop(),
          reload: async () => lbc.reload(reread()),
          // Workers finish their connections (stopGraceMs) in parallel, plus their exit.
          stopTimeoutMs: config.stopGraceMs + 10_000,
        });
        return;
      }
      const balancer = await startLoadBalancer(config, { log, registry });
      installLifecycle({
        log,
        stop: () => balancer.stop(),
        reload: async () => balancer.reload(reread()),
        stopTimeoutMs: config.stopGraceMs + 5000,
      });
    });

  const globals = (cmd: Command): Globals => cmd.optsWithGlobals() as Globals;

  lb.command('status')
    .description('listeners and backends of a running balancer')
    .option('--json', 'print the raw JSON')
    .action(async (_o: unknown, cmd: Command) => {
      const g = globals(cmd);
      const st = (await call(g, 'GET', '/status')) as LbStatus;
      process.stdout.write(g.json ? `${JSON.stringify(st, null, 2)}\n` : `${formatStatus(st)}\n`);
    });

  for (const [action, what] of [
    ['drain', 'no new connections to the backend; established ones stay'],
    ['ready', 'the backend takes new connections again'],
    ['maintenance', 'the backend is out (down for new connections); established ones stay'],
  ] as const) {
    lb.command(`${action} <backend>`)
      .description(what)
      .action(async (backend: string, _o: unknown, cmd: Command) => {
        const r = (await call(globals(cmd), 'POST', `/${action}`, { backend })) as { changed: Array<{ pool: string; name: string; state: string; active: number }> };
        for (const c of r.changed) process.stdout.write(`${c.pool}/${c.name}: ${c.state} (${c.active} active)\n`);
      });
  }

  lb.command('weight <backend> <n>')
    .description('set the backend weight (0..256; 0 takes no new connections)')
    .action(async (backend: string, n: string, _o: unknown, cmd: Command) => {
      if (!/^\d+$/.test(n) || Number(n) > 256) throw new PairgateError('BAD_INPUT', `weight must be an integer 0..256, got ${JSON.stringify(n)}`, false);
      const r = (await call(globals(cmd), 'POST', '/weight', { backend, weight: Number(n) })) as { changed: Array<{ pool: string; name: string; weight: number }> };
      for (const c of r.changed) process.stdout.write(`${c.pool}/${c.name}: weight ${c.weight}\n`);
    });
}
