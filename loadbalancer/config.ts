/**
 * The load balancer's config (YAML, validated with zod at start and on SIGHUP; a bad file is
 * refused whole). Example: infra/examples/loadbalancer.yaml.
 *
 * ```yaml
 * logLevel: info
 * admin: { host: 127.0.0.1, port: 9100, token: ${LB_ADMIN_TOKEN} }
 * listeners:                       # one per service port, each mapped to a pool
 *   - { name: imap, listen: 0.0.0.0:143, pool: imap, maxconn: 20000 }
 * pools:
 *   imap:
 *     balance: leastconn           # leastconn (weighted, default) | roundrobin (weighted) | source (consistent hash)
 *     proxyProtocol: v2            # v2 (default) | v1 | none
 *     slowStartMs: 10000           # a backend that came back ramps its weight up over this time
 *     retries: 2                   # further backends tried after a connect failure
 *     connectTimeoutMs: 2000
 *     idleTimeoutMs: 1800000       # no byte either way for this long closes both sides
 *     queueTimeoutMs: 5000         # a client waiting for a free slot (maxconn) waits at most this long
 *     check: { intervalMs: 2000, timeoutMs: 1000, fall: 3, rise: 2 }
 *     backends:
 *       - { name: proxy-1, address: 10.0.0.11:143, weight: 1, maxconn: 5000, healthUrl: http://10.0.0.11:9025/health }
 * workers: auto                    # `pairgate lb`: processes accepting on every listener (auto = one per CPU); limits are split
 * closeLog: { sample: 0.01 }        # one info line per closed connection, for this fraction of them
 * relay:                           # backend -> client copying (common/relay.ts)
 *   bulkBufferBytes: 1048576       # a connection that streams reads into two buffers this large...
 *   maxBulkConnections: 64         # ...at most this many at once (memory: 2 x bulkBufferBytes each); others copy per read
 * ```
 */
import { z } from 'zod';
import { adminSchema, durationMs, hostPort, logLevel } from '../common/config.ts';

export const BALANCE_METHODS = ['leastconn', 'roundrobin', 'source'] as const;
export type BalanceMethod = (typeof BALANCE_METHODS)[number];

const name = z.string().regex(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/, 'expected a name of letters, digits, _ . -');

export const backendSchema = z
  .object({
    name,
    /** host:port the balancer connects to. */
    address: hostPort,
    /** Relative share of new connections (0 = none, like drain). */
    weight: z.number().int().min(0).max(256).default(1),
    /** Connections at once to this backend; 0 = no limit. Further clients queue (queueTimeoutMs). */
    maxconn: z.number().int().min(0).default(0),
    /** HTTP check of the proxy's `/health` (200 = up); without it the check is a TCP connect. */
    healthUrl: z.string().url().optional(),
    /** Initial admin state. */
    state: z.enum(['ready', 'drain', 'maintenance']).default('ready'),
  })
  .strict();

export const checkSchema = z
  .object({
    intervalMs: durationMs.min(50).default(2000),
    timeoutMs: durationMs.min(10).default(1000),
    /** Consecutive failed checks that mark an up backend down. */
    fall: z.number().int().min(1).max(100).default(3),
    /** Consecutive good checks that mark a down backend up. */
    rise: z.number().int().min(1).max(100).default(2),
    /** Checks off: every backend counts as up (connect failures still retry the next one). */
    enabled: z.boolean().default(true),
  })
  .strict()
  .default({});

export const poolSchema = z
  .object({
    balance: z.enum(BALANCE_METHODS).default('leastconn'),
    proxyProtocol: z.enum(['v2', 'v1', 'none']).default('v2'),
    slowStartMs: durationMs.default(0),
    retries: z.number().int().min(0).max(10).default(2),
    connectTimeoutMs: durationMs.min(1).default(2000),
    idleTimeoutMs: durationMs.default(30 * 60_000),
    queueTimeoutMs: durationMs.default(5000),
    /** Clients waiting at once for a slot; more are refused at once. */
    maxQueue: z.number().int().min(0).default(10_000),
    keepaliveMs: durationMs.default(60_000),
    check: checkSchema,
    backends: z.array(backendSchema).min(1),
  })
  .strict()
  .superRefine((pool, ctx) => {
    const seen = new Set<string>();
    pool.backends.forEach((b, i) => {
      if (seen.has(b.name)) ctx.addIssue({ code: 'custom', path: ['backends', i, 'name'], message: `duplicate backend name ${b.name}` });
      seen.add(b.name);
    });
  });

export const listenerSchema = z
  .object({
    name,
    /** host:port to accept on, e.g. `0.0.0.0:143` or `[::]:143`. */
    listen: hostPort,
    pool: name,
    /** Connections at once through this listener; 0 = no limit. Further clients queue. */
    maxconn: z.number().int().min(0).default(0),
    backlog: z.number().int().min(1).default(1024),
  })
  .strict();

export const lbConfigSchema = z
  .object({
    id: z.string().optional(),
    logLevel,
    admin: adminSchema,
    listeners: z.array(listenerSchema).min(1),
    pools: z.record(name, poolSchema),
    closeLog: z
      .object({ sample: z.number().min(0).max(1).default(0) })
      .strict()
      .default({}),
    /**
     * Backend -> client copying: while data streams, a connection reads into two buffers of its own
     * (fewer, larger reads); at most maxBulkConnections at once, the others copy per read as usual.
     */
    relay: z
      .object({
        bulkBufferBytes: z.number().int().min(65536).max(16 * 1024 * 1024).default(1024 * 1024),
        maxBulkConnections: z.number().int().min(0).default(64),
      })
      .strict()
      .default({}),
    /** Bound for a graceful stop: established connections get this long to finish. */
    stopGraceMs: durationMs.default(10_000),
    /**
     * `pairgate lb` only (the in-process `startLoadBalancer` is always one process): how many
     * worker processes accept on every listener, like HAProxy's nbthread or nginx's
     * worker_processes. `auto` = one per CPU (os.availableParallelism()); 1 = no workers, the
     * balancer runs in the one process. With more than one, maxconn (listener and backend),
     * maxQueue and relay.maxBulkConnections are split across the workers (see workerShare in
     * cluster.ts). A change takes a restart (a reload keeps the running count).
     */
    workers: z.union([z.literal('auto'), z.number().int().min(1).max(256)]).default('auto'),
  })
  .strict()
  .superRefine((cfg, ctx) => {
    const ports = new Map<string, string>();
    const names = new Set<string>();
    cfg.listeners.forEach((l, i) => {
      const port = l.listen.slice(l.listen.lastIndexOf(':') + 1);
      const host = l.listen.slice(0, l.listen.lastIndexOf(':'));
      const wildcard = host === '0.0.0.0' || host === '[::]' || host === '*';
      for (const [other, otherName] of ports) {
        const [oh, op] = [other.slice(0, other.lastIndexOf(':')), other.slice(other.lastIndexOf(':') + 1)];
        if (op === port && port !== '0' && (oh === host || wildcard || oh === '0.0.0.0' || oh === '[::]' || oh === '*')) {
          ctx.addIssue({ code: 'custom', path: ['listeners', i, 'listen'], message: `duplicate port ${port} (also used by listener ${otherName})` });
        }
      }
      ports.set(l.listen, l.name);
      if (names.has(l.name)) ctx.addIssue({ code: 'custom', path: ['listeners', i, 'name'], message: `duplicate listener name ${l.name}` });
      names.add(l.name);
      if (!cfg.pools[l.pool]) ctx.addIssue({ code: 'custom', path: ['listeners', i, 'pool'], message: `no pool named ${l.pool}` });
      if (Number(port) > 65535) ctx.addIssue({ code: 'custom', path: ['listeners', i, 'listen'], message: `port ${port} out of range` });
    });
    for (const [pname, pool] of Object.entries(cfg.pools)) {
      pool.backends.forEach((b, i) => {
        const port = Number(b.address.slice(b.address.lastIndexOf(':') + 1));
        if (!(port > 0 && port <= 65535)) ctx.addIssue({ code: 'custom', path: ['pools', pname, 'backends', i, 'address'], message: `port ${port} out of range` });
      });
    }
  });

export type LbConfig = z.output<typeof lbConfigSchema>;
export type PoolConfig = z.output<typeof poolSchema>;
export type BackendConfig = z.output<typeof backendSchema>;
export type ListenerConfig = z.output<typeof listenerSchema>;

/** Splits `host:port` / `[v6]:port` into parts (brackets removed). */
export function splitHostPort(hp: string): { host: string; port: number } {
  const i = hp.lastIndexOf(':');
  let host = hp.slice(0, i);
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  if (host === '*') host = '0.0.0.0';
  return { host, port: Number(hp.slice(i + 1)) };
}
