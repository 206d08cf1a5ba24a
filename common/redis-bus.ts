/**
 * The Redis bus: shared keys under `pairgate:` and the `pairgate:events` channel.
 *
 * Redis is an accelerator here, never a hard dependency: while it is down every call fails
 * fast with an UnavailableError (no offline queue, short command timeout) and the client
 * reconnects in the background, so callers fall back to LDAP, polling or local counters.
 */
import { Redis } from 'ioredis';
import { EventEmitter } from 'node:events';
import type { Logger } from './log.ts';
import { silentLogger } from './log.ts';
import { UnavailableError } from './errors.ts';

export const KEY_PREFIX = 'pairgate:';
export const EVENTS_CHANNEL = `${KEY_PREFIX}events`;

export const keys = {
  pairHealth: (pair: string) => `${KEY_PREFIX}pair:${pair}:health`,
  route: (login: string) => `${KEY_PREFIX}route:${login}`,
  authFailIp: (addr: string) => `${KEY_PREFIX}authfail:ip:${addr}`,
  authFailUser: (login: string) => `${KEY_PREFIX}authfail:user:${login}`,
  /**
   * Set while `pairgate user move` copies a user's final delta: proxies hold (bounded) new
   * logins and deliveries for that user until it is gone.
   */
  userMove: (uid: string) => `${KEY_PREFIX}usermove:${uid}`,
  /**
   * Set by a primary that wrote without its peer once the peer was outdated or fenced: which node's
   * replica is older. A node that starts alone reads it before it takes over (its own metadata
   * may still say UpToDate: fenced by a reboot, it never heard that it was outdated).
   */
  pairOutdated: (pair: string) => `${KEY_PREFIX}pair:${pair}:outdated`,
  /** Directory cache entries; not in the contract table because only `directory/` reads them. */
  directory: (kind: string, id: string) => `${KEY_PREFIX}dir:${kind}:${id}`,
};

export type BusEvent =
  | { type: 'health'; pair: string; state: string; at: number }
  | { type: 'route-invalidate'; user?: string; logins?: string[]; pair?: string }
  | { type: 'state'; pair?: string; node?: string; from?: string; to?: string; reason?: string }
  /** Proxies close every session of this user (after a user move switched the home pair). */
  | { type: 'user-close-sessions'; user: string }
  | { type: string; [field: string]: unknown };

export interface RedisBusOptions {
  url: string;
  connectTimeoutMs?: number;
  commandTimeoutMs?: number;
  log?: Logger;
  /** Subscribe to the events channel (proxies and directories do; CLI one-shots do not). */
  subscribe?: boolean;
}

export class RedisBus extends EventEmitter {
  readonly client: Redis;
  private subscriber: Redis | null = null;
  private readonly log: Logger;
  private lastErrorLog = 0;
  private closed = false;

  constructor(opts: RedisBusOptions) {
    super();
    this.log = opts.log ?? silentLogger;
    const common = {
      connectTimeout: opts.connectTimeoutMs ?? 1000,
      // Reconnect forever with a capped backoff; a down Redis must never end the process.
      retryStrategy: (times: number) => Math.min(100 * 2 ** Math.min(times, 5), 2000),
      maxRetriesPerRequest: 0,
      lazyConnect: false,
    };
    this.client = new Redis(opts.url, {
      ...common,
      enableOfflineQueue: false,
      commandTimeout: opts.commandTimeoutMs ?? 500,
    });
    this.watch(this.client, 'redis');
    if (opts.subscribe) {
      this.subscriber = new Redis(opts.url, { ...common, enableOfflineQueue: true, autoResubscribe: true });
      this.watch(this.subscriber, 'redis-sub');
      this.subscriber.subscribe(EVENTS_CHANNEL).catch((err) => this.logError(err));
      this.subscriber.on('message', (channel: string, message: string) => {
        if (channel !== EVENTS_CHANNEL) return;
        try {
          this.emit('event', JSON.parse(message) as BusEvent);
        } catch {
          this.log.warn({ channel }, 'ignored a bus message that is not JSON');
        }
      });
    }
  }

  private watch(conn: Redis, name: string): void {
    conn.on('error', (err) => this.logError(err, name));
    conn.on('ready', () => {
      this.log.info({ conn: name }, 'redis connected');
      this.emit('up', name);
    });
    conn.on('end', () => {
      if (!this.closed) this.emit('down', name);
    });
  }

  private logError(err: unknown, conn = 'redis'): void {
    // While Redis is down ioredis reports every retry; one line per 10 s is enough to explain.
    const now = Date.now();
    if (now - this.lastErrorLog < 10_000) return;
    this.lastErrorLog = now;
    this.log.warn({ conn, err: (err as Error)?.message }, 'redis unavailable; continuing without it');
  }

  get connected(): boolean {
    return this.client.status === 'ready';
  }

  private async run<T>(what: string, fn: () => Promise<T>): Promise<T> {
    if (!this.connected) throw new UnavailableError(`redis not connected (${what})`);
    try {
      return await fn();
    } catch (err) {
      throw new UnavailableError(`redis ${what} failed: ${(err as Error).message}`, { cause: err });
    }
  }

  get(key: string): Promise<string | null> {
    return this.run('get', () => this.client.get(key));
  }

  mget(keyList: string[]): Promise<(string | null)[]> {
    if (keyList.length === 0) return Promise.resolve([]);
    return this.run('mget', () => this.client.mget(keyList));
  }

  async set(key: string, value: string, ttlMs?: number): Promise<void> {
    await this.run('set', () => (ttlMs ? this.client.set(key, value, 'PX', ttlMs) : this.client.set(key, value)));
  }

  async del(...keyList: string[]): Promise<number> {
    if (keyList.length === 0) return 0;
    return this.run('del', () => this.client.del(...keyList));
  }

  /** Increments a counter and (re)arms its TTL only when it is created, giving a fixed window. */
  incrWithTtl(key: string, ttlMs: number): Promise<number> {
    return this.run('incr', async () => {
      const [[e1, n], [e2]] = (await this.client.multi().incr(key).pexpire(key, ttlMs, 'NX').exec()) as [[Error | null, number], [Error | null, unknown]];
      if (e1) throw e1;
      if (e2) throw e2;
      return n;
    });
  }

  scanKeys(pattern: string, limit = 10_000): Promise<string[]> {
    return this.run('scan', async () => {
      const found: string[] = [];
      let cursor = '0';
      do {
        const [next, batch] = await this.client.scan(cursor, 'MATCH', pattern, 'COUNT', 500);
        cursor = next;
        found.push(...batch);
      } while (cursor !== '0' && found.length < limit);
      return found;
    });
  }

  async publish(event: BusEvent): Promise<void> {
    await this.run('publish', () => this.client.publish(EVENTS_CHANNEL, JSON.stringify(event)));
  }

  /** Publishes, logging instead of throwing when Redis is down. */
  publishQuietly(event: BusEvent): void {
    this.publish(event).catch((err) => this.logError(err));
  }

  onEvent(handler: (event: BusEvent) => void): () => void {
    this.on('event', handler);
    return () => this.off('event', handler);
  }

  async close(): Promise<void> {
    this.closed = true;
    this.client.disconnect();
    this.subscriber?.disconnect();
  }
}
