/**
 * The proxy role's config file (`pairgate proxy --config FILE`). Every key documented here;
 * durations in milliseconds; an explicit 0 is a value (0 = no limit where a limit is meant).
 */
import { adminSchema, durationMs, logLevel, port, redisSchema, tlsSchema, z } from '../common/config.ts';

export const listenerSchema = z
  .object({
    /** `imap` or `pop3` (SMTP listeners live under `smtp:` and are served by proxy/smtp). */
    protocol: z.enum(['imap', 'pop3']),
    host: z.string().default('0.0.0.0'),
    port,
    /** `none` (plain only), `starttls` (STARTTLS/STLS offered), `implicit` (993/995: TLS from the first byte). */
    tls: z.enum(['none', 'starttls', 'implicit']).default('starttls'),
    /** Refuse LOGIN/USER/AUTH before TLS (LOGINDISABLED). Default: true when tls is `starttls`. */
    requireTls: z.boolean().optional(),
    /** Optional name for logs and metrics (default `<protocol>-<port>`). */
    name: z.string().optional(),
  })
  .strict();

export const proxyConfigSchema = z
  .object({
    /** Identifies this proxy in logs and metrics (default: host name). */
    id: z.string().optional(),
    log: z.object({ level: logLevel }).strict().default({}),
    admin: adminSchema,
    /** Shared Redis (health records and events, rate limits). Optional: without it, polling and local counters. */
    redis: redisSchema.optional(),
    /** Directory config, validated by directory/index.ts (`ldif: FILE` or `urls: [...]` …). */
    directory: z.record(z.string(), z.unknown()),
    /** Default certificate for TLS listeners; reloaded on SIGHUP. */
    tls: tlsSchema.optional(),
    listeners: z.array(listenerSchema).default([]),
    /** Load-balancer addresses (CIDRs): PROXY v1/v2 required from them, refused from everyone else. */
    loadBalancers: z.array(z.string()).default([]),
    backend: z
      .object({
        /** Master account the proxy logs in as on the user's behalf (SASL PLAIN authzid = uid). */
        masterUser: z.string().min(1),
        /** Its secret; use `${PAIRGATE_MASTER_SECRET}` to keep it out of the file. */
        masterSecret: z.string().min(1),
        /** Pair addresses the master secret may be sent to; anything else is refused. */
        trustedNetworks: z.array(z.string()).default(['127.0.0.0/8', '::1', '10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', 'fc00::/7']),
        connectTimeoutMs: durationMs.default(3000),
        /** Greeting + ID/XCLIENT + master login on the backend. */
        loginTimeoutMs: durationMs.default(10_000),
        /** Forward the client address (IMAP ID x-originating-ip, POP3 XCLIENT). */
        forwardClientAddress: z.boolean().default(true),
      })
      .strict(),
    /** Holding logins while a pair fails over or right after a backend connect failed. */
    hold: z
      .object({
        /** Longest a login waits for its pair to serve again. */
        maxMs: durationMs.default(15_000),
        /** Pause between backend connect attempts while holding. */
        retryMs: durationMs.default(500),
      })
      .strict()
      .default({}),
    health: z
      .object({
        pollIntervalMs: durationMs.default(1000),
        pollTimeoutMs: durationMs.default(800),
        /** Admin port of pairs without an `admin=` override in pairgatePorts. */
        defaultAdminPort: port.default(9025),
        /** A pair with no new record for this long is down (default HEALTH_TTL_MS). */
        ttlMs: durationMs.optional(),
      })
      .strict()
      .default({}),
    timeouts: z
      .object({
        /** PROXY header after connect. */
        proxyHeaderMs: durationMs.default(5000),
        /** TLS handshake (implicit or STARTTLS). */
        tlsHandshakeMs: durationMs.default(10_000),
        /** Idle before login (no complete command). */
        preLoginMs: durationMs.default(60_000),
        /** Idle after login, either side, IMAP (RFC 3501: at least 30 minutes). */
        imapIdleMs: durationMs.default(31 * 60_000),
        /** Idle after login, either side, POP3 (RFC 1939: at least 10 minutes). */
        pop3IdleMs: durationMs.default(10 * 60_000),
      })
      .strict()
      .default({}),
    limits: z
      .object({
        /** Open client connections on this proxy (0 = no limit). */
        maxConnections: z.number().int().min(0).default(20_000),
        /** Open connections from one client address (0 = no limit). */
        maxConnectionsPerIp: z.number().int().min(0).default(50),
        /** Concurrent proxied sessions of one user on this proxy (0 = no limit). */
        maxSessionsPerUser: z.number().int().min(0).default(50),
        /** Longest command line before login. */
        maxLineBytes: z.number().int().min(64).default(8192),
        /** Bad commands before login before the connection is closed. */
        maxBadCommands: z.number().int().min(1).default(10),
      })
      .strict()
      .default({}),
    /** Failed-login limits, shared by all proxies through Redis (local counters while Redis is down). */
    authLimits: z
      .object({
        windowMs: durationMs.default(15 * 60_000),
        /** Failures from one client address in the window before it is locked out. */
        maxPerIp: z.number().int().min(0).default(20),
        /** Failures for one login in the window before it is locked out (keep above maxPerIp). */
        maxPerLogin: z.number().int().min(0).default(100),
        /** Delay before a failure answer: step × 2^(failures-1), capped. */
        delayStepMs: durationMs.default(250),
        maxDelayMs: durationMs.default(5000),
      })
      .strict()
      .default({}),
    /**
     * Who moves a logged-in session's bytes when client and pair are plain TCP: `native`, the
     * relay thread of common/native (built by `npm ci`; JavaScript when it is not built, said in the
     * start-up log), or `javascript`, the event loop. TLS client sessions are always relayed in JavaScript.
     */
    relay: z.enum(['native', 'javascript']).default('native'),
    /** Graceful stop: time sessions get to finish before they are closed. */
    stopGraceMs: durationMs.default(10_000),
    /** SMTP front ends (MX, submission), served by proxy/smtp; validated there. */
    smtp: z.unknown().optional(),
  })
  .strict();

export type ProxyConfig = z.output<typeof proxyConfigSchema>;
export type ListenerConfig = z.output<typeof listenerSchema>;
