/**
 * The pair-agent's configuration (one YAML file per node; see infra/examples/pair-agent-a.yaml).
 * Validated whole at start: a bad key, both nodes preferred, impossible timings or a floating
 * address outside its mode's range end the start with exit 2 and the key named.
 */
import { z } from 'zod';
import { durationMs, hostPort, logLevel, port, redisSchema } from '../common/config.ts';
import { ConfigError } from '../common/errors.ts';
import { fencingConfigSchema } from './fencing/index.ts';
import { checkFloatingIp, floatingIpSchema } from './resources/floating-ip.ts';
import { commandResourceSchema } from './resources/command.ts';
import { DEFAULT_TIMINGS } from './ha/heartbeat.ts';
import { storeConfigSchema } from './store/resource.ts';

const listOf = (s: z.ZodString) => z.union([s, z.array(s).min(1)]).transform((v) => (Array.isArray(v) ? v : [v]));

export const heartbeatConfigSchema = z
  .object({
    /** Shared HMAC-SHA256 key (at least 16 characters; put it in the environment: `${PAIRGATE_HB_KEY}`). */
    key: z.string().min(16, 'the heartbeat key needs at least 16 characters'),
    /** This node's heartbeat address(es), host:port; one socket each. */
    listen: listOf(hostPort),
    /** The peer's heartbeat address(es); with as many as `listen`, link i is listen[i] <-> peers[i]. Any live link keeps the peer alive. */
    peers: z.array(hostPort).min(1),
    keepaliveMs: durationMs.min(10).default(DEFAULT_TIMINGS.keepaliveMs),
    warntimeMs: durationMs.default(DEFAULT_TIMINGS.warntimeMs),
    deadtimeMs: durationMs.default(DEFAULT_TIMINGS.deadtimeMs),
    initdeadMs: durationMs.default(DEFAULT_TIMINGS.initdeadMs),
  })
  .strict();

export const pairAgentConfigSchema = z
  .object({
    pair: z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'pair id: letters, digits, . _ -'),
    node: z.enum(['a', 'b']),
    /** The node that takes the resources when both could. One node only (`a`, `b` or `none`). */
    preferred: z
      .union([z.enum(['a', 'b', 'none']), z.array(z.string())])
      .default('none')
      .superRefine((v, ctx) => {
        if (Array.isArray(v)) ctx.addIssue({ code: z.ZodIssueCode.custom, message: 'only one node can be preferred (a, b or none)' });
      })
      .transform((v) => (v === 'none' || Array.isArray(v) ? null : v)),
    /** Move the resources back to the preferred node when it returns. */
    autoFailback: z.boolean().default(false),
    logLevel,
    admin: z
      .object({
        /** The node's own admin API (operator commands, /metrics, /status): `listen: host:port`, or `host` and `port` as other roles spell it. */
        listen: hostPort.optional(),
        host: z.string().default('127.0.0.1'),
        port: port.default(0),
        /** Bearer token for operator calls from other hosts (loopback needs none). */
        token: z.string().optional(),
      })
      .strict()
      .default({})
      .transform((a) => ({ listen: a.listen ?? `${a.host.includes(':') && !a.host.startsWith('[') ? `[${a.host}]` : a.host}:${a.port}`, token: a.token })),
    redis: redisSchema.optional(),
    heartbeat: heartbeatConfigSchema,
    fencing: fencingConfigSchema,
    /** Where this node writes its pid (the peer's process fencing reads it in the lab). */
    pidFile: z.string().optional(),
    floatingIp: floatingIpSchema,
    /** The address the pair's services and health endpoint bind (default: the floating address). */
    serviceAddress: z.string().ip().optional(),
    /** Port of the pair's health endpoint on the floating address (contract: 9025; LDAP pairgatePorts admin=…). */
    healthPort: port.default(9025),
    ping: z
      .object({
        /** `host:port` (TCP connect) or `host` (ICMP echo via ping). */
        targets: z.array(z.string().min(1)).min(1),
        intervalMs: durationMs.min(50).default(1000),
        timeoutMs: durationMs.min(10).default(500),
        /** Consecutive failed rounds before the node counts as unable to reach any target. */
        failures: z.number().int().min(1).default(2),
      })
      .strict()
      .optional(),
    monitor: z
      .object({
        intervalMs: durationMs.default(2000),
        maxRestarts: z.number().int().min(0).default(3),
        failureWindowMs: durationMs.default(60_000),
        /**
         * Time bounds of resource actions. A start past its bound fails (the node releases, the
         * peer may take over); a stop past its bound, or failed, leaves the node unclean and the
         * peer fences it before taking over; a monitor past its bound is a failed monitor. The
         * start bound covers the store's recovery, which replays its log after a crash.
         */
        startTimeoutMs: durationMs.min(100).default(300_000),
        stopTimeoutMs: durationMs.min(100).default(120_000),
        timeoutMs: durationMs.min(100).default(20_000),
      })
      .strict()
      .default({}),
    /** Extra resources (OCF-style commands), started in this order after the floating IP and the store. */
    resources: z.array(commandResourceSchema).default([]),
    /** The replicated volume (pair-agent/volume); validated by that module's schema. */
    volume: z.record(z.string(), z.unknown()).optional(),
    /** The store agent (pair-agent/store/resource.ts: storeConfigSchema): LMTP, POP3, IMAP on the service address. */
    store: storeConfigSchema.optional(),
    /**
     * Without a replicated volume: a disk both nodes reach (a SAN LUN, or one file in a lab on
     * one host) that the store uses; fencing keeps it to one writer, as in shared-disk Heartbeat.
     */
    sharedDisk: z
      .object({ file: z.string().min(1), sizeBytes: z.number().int().positive().multipleOf(4096) })
      .strict()
      .optional(),
  })
  .strict()
  .superRefine((c, ctx) => {
    const hb = c.heartbeat;
    if (!(hb.keepaliveMs < hb.warntimeMs && hb.warntimeMs <= hb.deadtimeMs)) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['heartbeat', 'deadtimeMs'], message: `timings must satisfy keepalive (${hb.keepaliveMs}) < warntime (${hb.warntimeMs}) <= deadtime (${hb.deadtimeMs})` });
    }
    const names = new Set<string>();
    for (const [i, r] of c.resources.entries()) {
      if (names.has(r.name) || ['floating-ip', 'health-endpoint', 'volume', 'store'].includes(r.name)) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['resources', i, 'name'], message: `resource name ${r.name} is used twice or reserved` });
      }
      names.add(r.name);
    }
  });

export type PairAgentConfig = z.output<typeof pairAgentConfigSchema>;

/** Checks that need more than the schema; throws ConfigError naming the key. */
export function checkPairAgentConfig(c: PairAgentConfig): void {
  if (c.store && !c.volume && !c.sharedDisk) throw new ConfigError('store', 'the store needs a disk: configure `volume` (replicated) or `sharedDisk`');
  if (c.volume && c.sharedDisk) throw new ConfigError('sharedDisk', 'configure either `volume` or `sharedDisk`, not both');
  if (c.store && c.monitor.stopTimeoutMs <= c.store.stopGraceMs) {
    throw new ConfigError('monitor.stopTimeoutMs', `${c.monitor.stopTimeoutMs} ms leaves the store no time to stop: it must exceed store.stopGraceMs (${c.store.stopGraceMs} ms), which sessions get to finish`);
  }
  checkFloatingIp(c.floatingIp);
  if (c.floatingIp.mode === 'loopback' && c.serviceAddress && !c.serviceAddress.startsWith('127.')) {
    throw new ConfigError('serviceAddress', `${c.serviceAddress} is not in 127.0.0.0/8, which loopback mode needs`);
  }
}
