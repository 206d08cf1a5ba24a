/**
 * The proxy role: IMAP and POP3 front ends (this folder) and the SMTP front ends
 * (proxy/smtp, started here when present and configured), sharing one directory, one pair
 * health follower, the failed-login limits and the admin HTTP listener.
 *
 *   const proxy = await startProxy(config, { log, registry });
 *   …
 *   await proxy.stop();   // stop accepting, let sessions finish (bounded), close the rest
 */
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dirname, join } from 'node:path';
import type { Logger } from '../common/log.ts';
import { AddressList } from '../common/cidr.ts';
import { RedisBus } from '../common/redis-bus.ts';
import { startAdminServer, type AdminServer } from '../common/admin-http.ts';
import type { MetricsRegistry } from '../common/metrics.ts';
import { ConfigError } from '../common/errors.ts';
import type { Directory } from '../directory/types.ts';
import { proxyConfigSchema, type ProxyConfig } from './config.ts';
import { PairHealth } from './pair-health.ts';
import { AuthLimiter } from './rate-limit.ts';
import { proxyMetrics, proxyRegistry, proxyTallies } from './metrics.ts';
import { TlsStore } from './tls.ts';
import { SessionRegistry, type ProxyContext } from './context.ts';
import { startListener, type Listener } from './listener.ts';
import { startSmtpFrontEnds } from './smtp/index.ts';
import { nativeRelayStatus } from '../common/native-relay.ts';

export { proxyConfigSchema, type ProxyConfig } from './config.ts';
export { PairHealth, type PairHealthChange, type EffectiveState } from './pair-health.ts';
export { proxyMetrics, proxyRegistry, type ProxyMetrics } from './metrics.ts';
export { AuthLimiter } from './rate-limit.ts';
export { TlsStore } from './tls.ts';

export interface ProxyDeps {
  log: Logger;
  registry?: MetricsRegistry;
  /** An already open directory (embedding, tests); default: opened from `config.directory`. */
  directory?: Directory;
}

export interface Proxy {
  listeners: Listener[];
  admin: AdminServer;
  directory: Directory;
  pairHealth: PairHealth;
  bus: RedisBus | null;
  sessions: SessionRegistry;
  /** Address of the first listener of a protocol (tests, lab). */
  address(protocol: 'imap' | 'pop3', tls?: 'none' | 'starttls' | 'implicit'): { host: string; port: number } | null;
  /** Applies a new config: certificates, limits, timeouts, hold; listener changes need a restart. */
  reload(next: ProxyConfig): Promise<void>;
  /** Graceful stop: stop accepting, wait up to `graceMs` for sessions, then close them. */
  stop(graceMs?: number): Promise<void>;
}

const here = dirname(fileURLToPath(import.meta.url));

async function openConfiguredDirectory(config: ProxyConfig, log: Logger, registry: MetricsRegistry, bus: RedisBus | null): Promise<Directory> {
  const mod = (await import(pathToFileURL(join(here, '../directory/index.ts')).href)) as {
    directoryConfigSchema: { parse(v: unknown): unknown; safeParse(v: unknown): { success: boolean; data?: unknown; error?: { issues: Array<{ path: Array<string | number>; message: string }> } } };
    openDirectory(config: unknown, deps: { log: Logger; registry?: MetricsRegistry; bus?: RedisBus }): Promise<Directory>;
  };
  const parsed = mod.directoryConfigSchema.safeParse(config.directory);
  if (!parsed.success) {
    const issue = parsed.error!.issues[0]!;
    throw new ConfigError(`directory.${issue.path.join('.')}`, issue.message);
  }
  return mod.openDirectory(parsed.data, { log, registry, ...(bus ? { bus } : {}) });
}

export async function startProxy(config: ProxyConfig, deps: ProxyDeps): Promise<Proxy> {
  const registry = deps.registry ?? proxyRegistry({ role: 'proxy' });
  const log = deps.log.child({ role: 'proxy', ...(config.id ? { proxy: config.id } : {}) });
  const metrics = proxyMetrics(registry);
  const loadBalancers = new AddressList(config.loadBalancers, 'loadBalancers');
  const trustedBackends = new AddressList(config.backend.trustedNetworks, 'backend.trustedNetworks');
  const tls = config.tls ? new TlsStore(config.tls) : null;
  if (!tls && config.listeners.some((l) => l.tls === 'implicit')) throw new ConfigError('tls', 'an implicit-TLS listener needs tls.cert and tls.key');

  const bus = config.redis
    ? new RedisBus({ url: config.redis.url, connectTimeoutMs: config.redis.connectTimeoutMs, commandTimeoutMs: config.redis.commandTimeoutMs, log, subscribe: true })
    : null;
  const cleanup: Array<() => Promise<void> | void> = [];
  try {
    if (bus) cleanup.push(() => bus.close());
    const directory = deps.directory ?? (await openConfiguredDirectory(config, log, registry, bus));
    if (!deps.directory) cleanup.push(() => directory.close());
    const pairHealth = new PairHealth({
      log,
      registry,
      bus,
      directory,
      pollIntervalMs: config.health.pollIntervalMs,
      pollTimeoutMs: config.health.pollTimeoutMs,
      defaultAdminPort: config.health.defaultAdminPort,
      ...(config.health.ttlMs !== undefined ? { ttlMs: config.health.ttlMs } : {}),
    });
    cleanup.push(() => pairHealth.close());
    await pairHealth.start();
    const limiter = new AuthLimiter(config.authLimits, bus, log, metrics);
    cleanup.push(() => limiter.close());
    const sessions = new SessionRegistry();
    // One timer for every session: idle timeouts and closing bounds each second, the byte
    // metric every fifth second.
    // After stop() it runs on (unref'd) until the last session is gone: a client kicked at the
    // stop that has not closed yet is still destroyed when its close grace runs out.
    let ticks = 0;
    let draining = false;
    const sweepTimer = setInterval(() => {
      sessions.sweep();
      if (++ticks % 5 === 0) sessions.flushBytes();
      if (draining && sessions.size === 0) clearInterval(sweepTimer);
    }, 1000);
    sweepTimer.unref();
    cleanup.push(() => {
      if (sessions.size === 0) clearInterval(sweepTimer);
      else draining = true;
    });
    const ctx: ProxyContext = { config, directory, pairHealth, limiter, metrics, tallies: proxyTallies(metrics), log, loadBalancers, trustedBackends, tls, bus, sessions, stopping: false };

    pairHealth.on('change', (c) => {
      if (c.to !== 'down') return;
      const victims = sessions.byPair(c.pair);
      if (victims.length) log.warn({ pair: c.pair, sessions: victims.length, reason: c.reason }, 'pair down: closing its sessions');
      for (const s of victims) s.kick('pair down');
    });
    if (bus) {
      const off = bus.onEvent((e) => {
        if (e.type !== 'user-close-sessions' || typeof e.user !== 'string') return;
        for (const s of sessions.list()) if (s.uid === e.user) s.kick('user moved');
      });
      cleanup.push(off);
    }

    const listeners: Listener[] = [];
    cleanup.push(async () => {
      await Promise.all(listeners.map((l) => l.close()));
    });
    for (const lc of config.listeners) listeners.push(await startListener(ctx, lc));
    // SMTP shares the failed-login counters and the Redis connection with IMAP and POP3.
    const smtp = config.smtp ? await startSmtpFrontEnds(config, { directory, pairHealth, log, registry, limiter, ...(bus ? { bus } : {}) }) : null;
    if (smtp) cleanup.push(() => smtp.close());

    let stopped = false;
    const admin = await startAdminServer({
      host: config.admin.host,
      port: config.admin.port,
      token: config.admin.token,
      registry,
      log,
      health: () => ({
        healthy: !ctx.stopping,
        body: {
          role: 'proxy',
          id: config.id ?? null,
          state: ctx.stopping ? 'stopping' : 'ok',
          sessions: sessions.size,
          redis: bus ? (bus.connected ? 'up' : 'down') : 'not configured',
          pairs: pairHealth.snapshot(),
        },
      }),
      routes: {
        'GET /sessions': () => ({ total: sessions.size, byProtocolAndPair: sessions.counts() }),
        'GET /pairs': () => pairHealth.snapshot(),
      },
    });
    cleanup.push(() => admin.close());
    // Which relay moves logged-in plain-TCP sessions (the native one when built and configured).
    const native = config.relay === 'native' ? nativeRelayStatus() : { available: false, reason: 'relay: javascript in the config' };
    if (config.relay === 'native' && !native.available) log.warn({ reason: native.reason }, 'native relay unavailable: logged-in sessions are relayed in JavaScript');
    log.info(
      { listeners: listeners.map((l) => `${l.name}@${l.address.address}:${l.address.port}`), admin: admin.url, relay: native.available ? 'native' : 'javascript' },
      'proxy started',
    );

    const proxy: Proxy = {
      listeners,
      admin,
      directory,
      pairHealth,
      bus,
      sessions,
      address(protocol, tlsMode) {
        const l = listeners.find((x) => x.config.protocol === protocol && (tlsMode === undefined || x.config.tls === tlsMode));
        return l ? { host: l.address.address, port: l.address.port } : null;
      },
      async reload(next) {
        // Everything that can fail is checked before anything is applied: a bad file changes nothing.
        const lbs = new AddressList(next.loadBalancers, 'loadBalancers');
        const trusted = new AddressList(next.backend.trustedNetworks, 'backend.trustedNetworks');
        if (next.tls && tls) {
          try {
            tls.reload(next.tls);
            smtp?.reloadTls(next.tls);
            metrics.tlsReloads.inc({ result: 'ok' });
          } catch (err) {
            metrics.tlsReloads.inc({ result: 'error' });
            throw err;
          }
        }
        if (JSON.stringify(next.listeners) !== JSON.stringify(ctx.config.listeners)) log.warn('listener changes take effect after a restart');
        ctx.loadBalancers = lbs;
        ctx.trustedBackends = trusted;
        ctx.config = { ...next, listeners: ctx.config.listeners, directory: ctx.config.directory, backend: { ...next.backend } };
        limiter.configure(next.authLimits);
        log.info('proxy config reloaded');
      },
      async stop(graceMs = config.stopGraceMs) {
        if (stopped) return;
        stopped = true;
        ctx.stopping = true;
        await Promise.all(listeners.map((l) => l.close()));
        if (smtp) await smtp.close().catch((err) => log.warn({ err: (err as Error).message }, 'smtp front ends did not close cleanly'));
        const open = sessions.list();
        if (open.length) {
          log.info({ sessions: open.length, graceMs }, 'waiting for sessions to finish');
          await Promise.race([Promise.all(open.map((s) => s.closed)), new Promise((r) => setTimeout(r, graceMs).unref())]);
          const left = sessions.list();
          for (const s of left) s.kick('stopping');
          await Promise.race([Promise.all(left.map((s) => s.closed)), new Promise((r) => setTimeout(r, 3000).unref())]);
        }
        for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
        log.info('proxy stopped');
      },
    };
    return proxy;
  } catch (err) {
    for (const fn of cleanup.reverse()) await Promise.resolve(fn()).catch(() => undefined);
    throw err;
  }
}

/** Validates a raw config object (tests, lab) with the proxy schema. */
export function parseProxyConfig(raw: unknown): ProxyConfig {
  return proxyConfigSchema.parse(raw);
}
