/**
 * The directory's configuration (the `directory:` section of a proxy config, or the CLI's
 * --config file). Exactly one backend: `ldif: FILE` (embedded) or `urls: [...]` (LDAP).
 * Parsing is idempotent (defaults only, no transforms), so a section parsed by a caller can
 * be handed to openDirectory, which parses it again.
 */
import { durationMs, z } from '../common/config.ts';

export const cacheSchema = z
  .object({
    /** In-process LRU and Redis TTL of a found user. */
    ttlMs: durationMs.default(60_000),
    /** TTL of a "no such user" answer (shorter, so that a new user appears soon). */
    negativeTtlMs: durationMs.default(10_000),
    /** In-process LRU size; 0 turns the in-process cache off. */
    maxEntries: z.number().int().min(0).default(100_000),
    /** Use the shared Redis cache when a Redis bus is given. */
    redis: z.boolean().default(true),
    /** How long the pair list is reused before it is read again. */
    pairsTtlMs: durationMs.default(5_000),
    /** How long the users-per-pair counts used by placement are reused. */
    countsTtlMs: durationMs.default(10_000),
  })
  .strict();

const tlsOptionsSchema = z
  .object({
    /** PEM file with the CA that signed the LDAP servers' certificates. */
    ca: z.string().optional(),
    rejectUnauthorized: z.boolean().default(true),
    /** Name to check the certificate against (default: the URL's host). */
    servername: z.string().optional(),
  })
  .strict();

const ldapUrl = z.string().regex(/^ldaps?:\/\/[^/\s]+\/?$/i, 'expected ldap://host:port or ldaps://host:port');

export const directoryConfigSchema = z
  .object({
    // Embedded backend.
    /** LDIF file with the same entries an LDAP server would hold; watched and reloaded on change. */
    ldif: z.string().min(1).optional(),
    /** Watch the LDIF file for changes (default true). */
    watch: z.boolean().optional(),
    // LDAP backend.
    /** LDAP servers in order of preference (replicas); a down server is skipped. */
    urls: z.array(ldapUrl).min(1).optional(),
    /** Service account for lookups (absent: anonymous). */
    bindDn: z.string().optional(),
    /** Its password; use an environment reference such as `${PAIRGATE_LDAP_PASSWORD}`. */
    bindPassword: z.string().min(1, 'must not be empty (an empty password is an unauthenticated bind)').optional(),
    baseDn: z.string().min(1).optional(),
    /** Default `ou=people,<baseDn>` (LDIF: the `ou=people` entry of the file). */
    usersDn: z.string().min(1).optional(),
    /** Default `ou=pairs,<baseDn>`. */
    pairsDn: z.string().min(1).optional(),
    /** StartTLS on ldap:// URLs before binding. */
    startTls: z.boolean().optional(),
    tls: tlsOptionsSchema.optional(),
    connectTimeoutMs: durationMs.min(1).optional(),
    /** Bound of every LDAP operation. */
    timeoutMs: durationMs.min(1).optional(),
    /** Service connections per server (operations are pipelined on each). */
    poolSize: z.number().int().min(1).max(64).optional(),
    /** Most look-ups asked for in one turn of the event loop that share one LDAP search (1: no sharing). */
    batchMax: z.number().int().min(1).max(64).optional(),
    /** Connections per server for user binds (one bind at a time on each). */
    authPoolSize: z.number().int().min(1).max(256).optional(),
    /** How long a server that failed is skipped before it is tried again. */
    retryDownMs: durationMs.optional(),
    cache: cacheSchema.default({}),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.ldif && c.urls) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['ldif'], message: 'give either ldif (embedded directory) or urls (LDAP), not both' });
    if (!c.ldif && !c.urls) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['urls'], message: 'give urls: [ldap://host:port, ...] or ldif: FILE' });
    if (c.urls && !c.baseDn) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['baseDn'], message: 'required with urls (e.g. dc=example,dc=net)' });
    if (c.bindDn && c.bindPassword === undefined) ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['bindPassword'], message: 'required with bindDn' });
  });

export type DirectoryConfig = z.output<typeof directoryConfigSchema>;
export type CacheConfig = z.output<typeof cacheSchema>;

export const LDAP_DEFAULTS = {
  connectTimeoutMs: 2_000,
  timeoutMs: 3_000,
  poolSize: 2,
  authPoolSize: 8,
  batchMax: 16,
  retryDownMs: 5_000,
};
