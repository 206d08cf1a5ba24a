/**
 * The proxy's SMTP front ends: MX (25) for local recipients, delivered to each recipient's
 * home pair over LMTP, and submission (587 STARTTLS, 465 implicit TLS) with AUTH against the
 * directory, local recipients delivered the same way and others relayed through a smarthost.
 *
 *   const smtp = await startSmtpFrontEnds(proxyConfig, { directory, pairHealth, log, registry });
 *   smtp.address('mx')             // { host, port } of the first MX listener
 *   await smtp.close();            // stop accepting, let sessions finish (bounded)
 *
 * `config` is the proxy's config (proxy/config.ts) whose `smtp:` section is validated here with
 * `smtpConfigSchema`; the certificate (`tls`), load balancers (PROXY headers), failed-login
 * limits (`authLimits`), Redis and the hold bounds (`hold`) are shared with the IMAP/POP3 side.
 */
import { readFileSync } from 'node:fs';
import { AddressList } from '../../common/cidr.ts';
import { validateConfig, type RedisConfig, type TlsFiles } from '../../common/config.ts';
import { ConfigError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { MetricsRegistry } from '../../common/metrics.ts';
import { RedisBus } from '../../common/redis-bus.ts';
import type { Directory, PairRecord } from '../../directory/types.ts';
import { AuthLimiter, type AuthLimitsConfig } from '../rate-limit.ts';
import { TlsStore } from '../tls.ts';
import { smtpConfigSchema, type SmtpConfig } from './config.ts';
import { smtpMetrics } from './metrics.ts';
import { PairSlots } from './delivery.ts';
import { createSmarthost } from './relay.ts';
import { createFrontEnd, type AuthLimiterLike, type FrontEnd, type FrontEndContext, type RedisBusLike } from './server.ts';
import { startSmtpListener, type SmtpListener } from './listener.ts';

export { smtpConfigSchema, smtpListenerSchema, type SmtpConfig, type SmtpListenerConfig } from './config.ts';
export { deliveryIdFor, stripDeliveryIdHeaders, verdictFor, DELIVERY_ID_HEADER } from './delivery.ts';
export { sendLmtp, encodeData, LmtpConnection, LmtpPool } from './lmtp-client.ts';
import { LmtpPool } from './lmtp-client.ts';

/** The parts of the proxy config the SMTP front ends read (ProxyConfig fits). */
export interface SmtpHostConfig {
  smtp?: unknown;
  tls?: TlsFiles | undefined;
  loadBalancers?: string[];
  redis?: RedisConfig | undefined;
  authLimits?: AuthLimitsConfig;
  hold?: { maxMs: number; retryMs: number };
  timeouts?: { proxyHeaderMs: number; tlsHandshakeMs: number };
  stopGraceMs?: number;
}

export interface SmtpDeps {
  directory: Directory;
  pairHealth: { awaitServable(pair: PairRecord, timeoutMs: number): Promise<void> };
  log: Logger;
  registry: MetricsRegistry;
  /** The proxy's failed-login limiter (shared counters); default: one made here from `authLimits` and `redis`. */
  limiter?: AuthLimiterLike;
  /** The proxy's Redis bus; default: one opened here when `redis` is configured. */
  bus?: RedisBusLike;
}

export interface SmtpFrontEnds {
  listeners: SmtpListener[];
  /** Address of the first listener of a kind (and TLS mode). */
  address(kind: 'mx' | 'submission', tls?: 'none' | 'starttls' | 'implicit'): { host: string; port: number } | null;
  /** Open SMTP sessions. */
  sessions(): number;
  /**
   * Re-reads the certificate (SIGHUP): new STARTTLS and implicit-TLS handshakes use it, open
   * sessions keep theirs. Throws ConfigError and keeps the old one when the files are unusable.
   */
  reloadTls(files?: TlsFiles): void;
  close(graceMs?: number): Promise<void>;
}

const DEFAULT_AUTH_LIMITS: AuthLimitsConfig = { windowMs: 15 * 60_000, maxPerIp: 20, maxPerLogin: 100, delayStepMs: 250, maxDelayMs: 5000 };

export function parseSmtpConfig(raw: unknown): SmtpConfig {
  try {
    return validateConfig(smtpConfigSchema, raw ?? {}, 'smtp section');
  } catch (err) {
    if (err instanceof ConfigError && err.key) throw new ConfigError(`smtp.${err.key}`, err.message.slice(err.key.length + 2));
    throw err;
  }
}

export async function startSmtpFrontEnds(config: SmtpHostConfig, deps: SmtpDeps): Promise<SmtpFrontEnds> {
  const cfg = parseSmtpConfig(config.smtp);
  const log = deps.log.child({ role: 'proxy', protocol: 'smtp' });
  const metrics = smtpMetrics(deps.registry);
  const tlsFiles = cfg.tls ?? config.tls;
  const tlsStore = tlsFiles ? new TlsStore(tlsFiles) : null;
  cfg.listeners.forEach((l, i) => {
    if (l.kind === 'submission' && l.tls === 'none') throw new ConfigError(`smtp.listeners[${i}].tls`, 'submission needs starttls or implicit (AUTH is only accepted over TLS)');
    if (l.tls !== 'none' && !tlsStore && (l.kind === 'submission' || l.tls === 'implicit')) throw new ConfigError(`smtp.listeners[${i}].tls`, 'TLS needs a certificate (smtp.tls or the proxy tls)');
  });
  const loadBalancers = new AddressList(config.loadBalancers ?? [], 'loadBalancers');
  const cleanup: Array<() => unknown> = [];
  // Redis: failed-login counters shared with the IMAP/POP3 side, and user-move holds.
  let bus: RedisBusLike | null = deps.bus ?? null;
  if (!bus && config.redis) {
    const own = new RedisBus({ url: config.redis.url, connectTimeoutMs: config.redis.connectTimeoutMs, commandTimeoutMs: config.redis.commandTimeoutMs, log });
    cleanup.push(() => own.close());
    bus = own;
  }
  let limiter = deps.limiter;
  if (!limiter) {
    const own = new AuthLimiter(config.authLimits ?? DEFAULT_AUTH_LIMITS, bus instanceof RedisBus ? bus : null, log);
    cleanup.push(() => own.close());
    limiter = own;
  }
  const smarthost = cfg.smarthost ? createSmarthost(cfg.smarthost, cfg.hostname, log) : null;
  if (smarthost) cleanup.push(() => smarthost.close());

  const pool = new LmtpPool(cfg.delivery.idleConnectionMs);
  cleanup.push(() => pool.close());
  const ctx: FrontEndContext = {
    config: cfg,
    directory: deps.directory,
    pairHealth: deps.pairHealth,
    limiter,
    bus,
    smarthost,
    metrics,
    log,
    delivery: {
      slots: new PairSlots(cfg.delivery.maxConnectionsPerPair),
      pool,
      name: cfg.hostname,
      lmtpPort: cfg.delivery.lmtpPort,
      connectTimeoutMs: cfg.delivery.connectTimeoutMs,
      replyTimeoutMs: cfg.delivery.replyTimeoutMs,
      holdMs: cfg.delivery.holdMs ?? config.hold?.maxMs ?? 15_000,
      retryMs: cfg.delivery.retryMs ?? config.hold?.retryMs ?? 500,
      forwardClientAddress: cfg.delivery.forwardClientAddress,
    },
    tlsFiles: tlsFiles ? { key: readFileSync(tlsFiles.key), cert: readFileSync(tlsFiles.cert) } : null,
    stopping: false,
  };

  const frontEnds = new Map<string, FrontEnd>();
  const frontEndFor = (kind: 'mx' | 'submission', tlsMode: 'none' | 'starttls' | 'implicit'): FrontEnd => {
    const key = `${kind}/${tlsMode}`;
    let fe = frontEnds.get(key);
    if (!fe) {
      fe = createFrontEnd(ctx, kind, tlsMode);
      frontEnds.set(key, fe);
    }
    return fe;
  };
  const listeners: SmtpListener[] = [];
  try {
    for (const lc of cfg.listeners) {
      listeners.push(
        await startSmtpListener(lc, {
          frontEnd: frontEndFor(lc.kind, lc.tls),
          loadBalancers,
          proxyHeaderTimeoutMs: config.timeouts?.proxyHeaderMs ?? 5000,
          tlsHandshakeTimeoutMs: config.timeouts?.tlsHandshakeMs ?? 10_000,
          tls: tlsStore,
          maxConnectionsPerIp: cfg.limits.maxConnectionsPerIp,
          metrics,
          log,
          stopping: () => ctx.stopping,
        }),
      );
    }
  } catch (err) {
    await Promise.all(listeners.map((l) => l.close()));
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
    throw err;
  }
  log.info({ listeners: listeners.map((l) => `${l.name}@${l.address.address}:${l.address.port}`), smarthost: cfg.smarthost ? `${cfg.smarthost.host}:${cfg.smarthost.port}` : null }, 'SMTP front ends started');

  let closed = false;
  return {
    listeners,
    address(kind, tlsMode) {
      const l = listeners.find((x) => x.config.kind === kind && (tlsMode === undefined || x.config.tls === tlsMode));
      return l ? { host: l.address.address, port: l.address.port } : null;
    },
    sessions: () => [...frontEnds.values()].reduce((n, f) => n + f.sessions(), 0),
    reloadTls(files) {
      const next = files ?? cfg.tls ?? config.tls;
      if (!tlsStore || !next) return;
      tlsStore.reload(next);
      const pem = { key: readFileSync(next.key), cert: readFileSync(next.cert) };
      ctx.tlsFiles = pem;
      for (const fe of frontEnds.values()) fe.server.updateSecureContext(pem);
      log.info({ cert: next.cert }, 'SMTP certificate reloaded');
    },
    async close(graceMs = config.stopGraceMs ?? 10_000) {
      if (closed) return;
      closed = true;
      ctx.stopping = true;
      await Promise.all(listeners.map((l) => l.close()));
      await Promise.all([...frontEnds.values()].map((f) => f.close(graceMs)));
      for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
      log.info('SMTP front ends stopped');
    },
  };
}
