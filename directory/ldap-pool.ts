/**
 * LDAP connections through ldapts: per server a few service connections (bound once as the
 * service account, operations pipelined on them) and a pool of user-bind connections (one
 * bind at a time each, never used for searches). Servers are tried in the configured order;
 * one that fails at the transport level (refused, timed out, closed, TLS, busy/unavailable)
 * is skipped for `retryDownMs` and the operation is repeated on the next, so a down replica
 * costs no failed look-up. When every server fails: UnavailableError (temporary).
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import tls, { type ConnectionOptions } from 'node:tls';
import { AbandonRequest, Client, ResultCodeError, UnbindRequest } from 'ldapts';
import { ConfigError, PairgateError, UnavailableError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import type { DirectoryMetrics } from './metrics.ts';

export interface LdapPoolOptions {
  urls: string[];
  bindDn?: string | undefined;
  bindPassword?: string | undefined;
  startTls: boolean;
  tls?: { ca?: string | undefined; rejectUnauthorized: boolean; servername?: string | undefined } | undefined;
  connectTimeoutMs: number;
  timeoutMs: number;
  poolSize: number;
  authPoolSize: number;
  retryDownMs: number;
  log: Logger;
  metrics: DirectoryMetrics;
}

/** Result codes that say "this server cannot serve now" rather than "no". */
const SERVER_TROUBLE = new Set([3 /* timeLimitExceeded */, 51 /* busy */, 52 /* unavailable */, 80 /* other */]);

export function errorKind(err: unknown): string | null {
  // Our own typed errors (made from a result inside an operation) are answers, not failures.
  if (err instanceof PairgateError) return null;
  if (err instanceof ResultCodeError) return SERVER_TROUBLE.has(err.code) ? 'server' : null;
  const msg = String((err as Error)?.message ?? err);
  const code = (err as NodeJS.ErrnoException)?.code ?? '';
  if (/timed? ?out/i.test(msg) || code === 'ETIMEDOUT') return /connect/i.test(msg) ? 'connect' : 'timeout';
  if (/ECONNREFUSED|EHOSTUNREACH|ENETUNREACH|ENOTFOUND|EAI_AGAIN/.test(code + msg)) return 'connect';
  if (/closed|ECONNRESET|EPIPE|socket/i.test(code + msg)) return 'closed';
  if (/certificate|self.signed|TLS|SSL|ERR_TLS|unable to verify/i.test(code + msg)) return 'tls';
  return 'other';
}

/**
 * Writes made in one turn of the event loop leave as one system call: with many look-ups
 * pipelined on a connection, ldapts' one write per request was a fifth of the CPU time.
 */
function autoCork<S extends net.Socket>(sock: S): S {
  const write = sock.write;
  let corked = false;
  sock.write = function (this: S, ...args: unknown[]) {
    if (!corked && !sock.destroyed) {
      corked = true;
      sock.cork();
      process.nextTick(() => {
        corked = false;
        sock.uncork();
      });
    }
    return (write as (...a: unknown[]) => boolean).apply(this, args);
  } as S['write'];
  return sock;
}

const corkedConnect = ((...args: Parameters<typeof net.connect>) => autoCork(net.connect(...args))) as typeof net.connect;
const corkedTlsConnect = ((...args: Parameters<typeof tls.connect>) => autoCork(tls.connect(...args))) as typeof tls.connect;

/**
 * ldapts 8 (and 9) build `Sending message: ${JSON.stringify(message)}` for its debuglog on
 * every request, whether NODE_DEBUG asks for it or not: the whole request (filter tree,
 * attribute list, controls) serialized and thrown away, the largest allocation of a look-up
 * and the young-generation GC work that goes with it. This is ldapts' own `_send` (8.2.0)
 * without that string; with NODE_DEBUG=ldapts the library's original runs, so its debug
 * output is unchanged. ldap-pool's tests exercise it (search, bind, timeouts, unbind).
 */
interface LdaptsInternals {
  connected: boolean;
  socket?: net.Socket;
  clientOptions: { timeout?: number };
  messageDetailsByMessageId: Map<string, { message: unknown; resolve: (v?: unknown) => void; reject: (e: unknown) => void; timeoutTimer: NodeJS.Timeout | null; socket: net.Socket }>;
  _destroySocket(socket: net.Socket): void;
}
interface LdaptsMessage {
  messageId: number;
  write(): Buffer;
}
const LDAPTS_DEBUG = /\bldapts\b/i.test(process.env.NODE_DEBUG ?? '');
function sendQuietly(this: LdaptsInternals, message: LdaptsMessage): Promise<unknown> {
  if (!this.connected || !this.socket) throw new Error('Socket connection not established');
  const buffer = message.write();
  const id = message.messageId.toString();
  let resolveMessage: (v?: unknown) => void = () => {};
  let rejectMessage: (e: unknown) => void = () => {};
  const timer = this.clientOptions.timeout
    ? setTimeout(() => {
        const details = this.messageDetailsByMessageId.get(id);
        if (details) {
          this._destroySocket(details.socket);
          rejectMessage(new Error(`${(message as object).constructor.name}: Operation timed out`));
        }
      }, this.clientOptions.timeout)
    : null;
  const promise = new Promise((resolve, reject) => {
    resolveMessage = resolve;
    rejectMessage = reject;
  }).finally(() => {
    if (timer) clearTimeout(timer);
  });
  this.messageDetailsByMessageId.set(id, { message, resolve: resolveMessage, reject: rejectMessage, timeoutTimer: timer, socket: this.socket });
  const isAbandon = message instanceof AbandonRequest;
  const isUnbind = message instanceof UnbindRequest;
  this.socket.write(
    buffer,
    isAbandon || isUnbind
      ? () => {
          if (isAbandon) {
            this.messageDetailsByMessageId.delete(id);
            resolveMessage();
          } else if (this.socket) this._destroySocket(this.socket);
        }
      : undefined,
  );
  return promise;
}

export function quietClient(client: Client): Client {
  const internals = client as unknown as { _send?: unknown };
  // Only over the method this was written against; another ldapts keeps its own.
  if (!LDAPTS_DEBUG && typeof internals._send === 'function' && (internals._send as () => void).length === 1) internals._send = sendQuietly;
  return client;
}

class Conn {
  readonly client: Client;
  ready: Promise<void>;
  dead = false;
  busy = false;
  initialized = false;

  constructor(
    readonly url: string,
    private readonly opts: LdapPoolOptions,
    tlsOptions: ConnectionOptions,
    private readonly serviceBind: boolean,
  ) {
    this.client = quietClient(new Client({
      url,
      timeout: opts.timeoutMs,
      connectTimeout: opts.connectTimeoutMs,
      // ldapts speaks TLS from the start whenever tlsOptions are given: only for ldaps://.
      ...(url.toLowerCase().startsWith('ldaps://') ? { tlsOptions } : {}),
      strictDN: false,
      createConnection: corkedConnect,
      createSecureConnection: corkedTlsConnect,
      // Plain and ldaps:// sessions re-bind by themselves after a transparent reconnect.
      autoRebind: serviceBind && !(opts.startTls && url.toLowerCase().startsWith('ldap://')),
    }));
    this.ready = this.init(tlsOptions).then(() => {
      this.initialized = true;
    });
    this.ready.catch(() => undefined);
  }

  private async init(tlsOptions: ConnectionOptions): Promise<void> {
    if (this.opts.startTls && this.url.toLowerCase().startsWith('ldap://')) await this.client.startTLS(tlsOptions);
    if (this.serviceBind && this.opts.bindDn) await this.client.bind(this.opts.bindDn, this.opts.bindPassword ?? '');
  }

  /** Still usable: connected, and bound when it must be (an idle close would leave it anonymous). */
  healthy(startTls: boolean): boolean {
    if (this.dead) return false;
    // A StartTLS session that lost its socket would be re-opened in clear text: drop it.
    // (Before `ready` settles the client is not connected yet; that is fine.)
    if (this.initialized && startTls && !this.client.isConnected) return false;
    return true;
  }

  destroy(): void {
    this.dead = true;
    this.client.unbind().catch(() => undefined);
  }
}

interface Server {
  url: string;
  downUntil: number;
  service: Conn[];
  next: number;
  auth: Conn[];
  authWaiters: Array<() => void>;
}

export class LdapPool {
  private readonly servers: Server[];
  private readonly tlsOptions: ConnectionOptions;
  private closed = false;

  constructor(private readonly opts: LdapPoolOptions) {
    this.servers = opts.urls.map((url) => ({ url: url.replace(/\/$/, ''), downUntil: 0, service: [], next: 0, auth: [], authWaiters: [] }));
    let ca: string | undefined;
    if (opts.tls?.ca) {
      try {
        ca = readFileSync(opts.tls.ca, 'utf8');
      } catch (err) {
        throw new ConfigError('tls.ca', `cannot read ${opts.tls.ca}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
      }
    }
    this.tlsOptions = {
      rejectUnauthorized: opts.tls?.rejectUnauthorized ?? true,
      ...(ca ? { ca } : {}),
      ...(opts.tls?.servername ? { servername: opts.tls.servername } : {}),
    };
  }

  /** Servers in order of preference, the ones marked down last (still tried: the mark is a hint). */
  private order(): Server[] {
    const now = Date.now();
    // Every operation asks: with no server marked down (the usual case) no new arrays.
    if (this.servers.every((s) => s.downUntil <= now)) return this.servers;
    return [...this.servers.filter((s) => s.downUntil <= now), ...this.servers.filter((s) => s.downUntil > now)];
  }

  private startTlsFor(url: string): boolean {
    return this.opts.startTls && url.toLowerCase().startsWith('ldap://');
  }

  private serviceConn(s: Server): Conn {
    s.service = s.service.filter((c) => c.healthy(this.startTlsFor(s.url)));
    if (s.service.length < this.opts.poolSize) {
      const c = new Conn(s.url, this.opts, this.tlsOptions, true);
      s.service.push(c);
      return c;
    }
    s.next = (s.next + 1) % s.service.length;
    return s.service[s.next]!;
  }

  private fail(s: Server, conn: Conn, err: unknown, kind: string, op: string): void {
    conn.destroy();
    s.service = s.service.filter((c) => c !== conn);
    s.auth = s.auth.filter((c) => c !== conn);
    const wasUp = s.downUntil <= Date.now();
    s.downUntil = Date.now() + this.opts.retryDownMs;
    this.opts.metrics.ldapErrors.inc({ kind });
    if (wasUp) this.opts.log.warn({ url: s.url, op, kind, err: (err as Error)?.message }, 'directory: LDAP server failed; trying the next one');
  }

  /** A connection that could not be set up (connect, StartTLS, service bind): skip the server. */
  private setupFailed(s: Server, conn: Conn, err: unknown, op: string): unknown {
    const kind = errorKind(err);
    this.fail(s, conn, err, kind ?? 'bind', op);
    if (kind === null) return new UnavailableError(`LDAP service bind refused by ${s.url}: ${(err as Error).message}`, { cause: err });
    return err;
  }

  /**
   * Runs `fn` on a service connection, failing over across servers on transport errors.
   * Result-code errors that mean "no" (no such object, insufficient access…) are rethrown.
   */
  async run<T>(op: string, fn: (client: Client) => Promise<T>): Promise<T> {
    if (this.closed) throw new UnavailableError('directory closed');
    let last: unknown;
    for (const s of this.order()) {
      const conn = this.serviceConn(s);
      try {
        await conn.ready;
      } catch (err) {
        last = this.setupFailed(s, conn, err, op);
        continue;
      }
      const end = this.opts.metrics.ldapSeconds.startTimer({ op });
      try {
        const out = await fn(conn.client);
        end();
        if (s.downUntil > Date.now()) {
          s.downUntil = 0;
          this.opts.log.info({ url: s.url }, 'directory: LDAP server answers again');
        }
        return out;
      } catch (err) {
        end();
        const kind = errorKind(err);
        if (kind === null) {
          if (err instanceof ResultCodeError) {
            // A refusal the caller did not expect (insufficient access, bad base…): a set-up
            // problem of the directory, so a temporary failure, never "unknown user".
            throw new UnavailableError(`LDAP ${op} refused by ${s.url}: ${err.message}`, { cause: err, details: { ldapCode: err.code } });
          }
          throw err;
        }
        last = err;
        this.fail(s, conn, err, kind, op);
      }
    }
    throw new UnavailableError(`LDAP unavailable (${this.servers.map((s) => s.url).join(', ')}): ${(last as Error)?.message ?? last}`, { cause: last });
  }

  private async acquireAuth(s: Server): Promise<Conn> {
    const deadline = Date.now() + this.opts.timeoutMs;
    for (;;) {
      s.auth = s.auth.filter((c) => !c.dead);
      const idle = s.auth.find((c) => !c.busy && c.healthy(this.startTlsFor(s.url)));
      if (idle) {
        idle.busy = true;
        return idle;
      }
      if (s.auth.length < this.opts.authPoolSize) {
        const c = new Conn(s.url, this.opts, this.tlsOptions, false);
        c.busy = true;
        s.auth.push(c);
        return c;
      }
      const wait = deadline - Date.now();
      if (wait <= 0) throw new Error('timed out waiting for a free bind connection');
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, wait);
        s.authWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  private releaseAuth(s: Server, c: Conn): void {
    c.busy = false;
    s.authWaiters.shift()?.();
  }

  /**
   * Binds as `dn` with `password` on a bind connection. Resolves true on success, false on
   * invalid credentials; transport failures fail over, then UnavailableError.
   */
  async bind(dn: string, password: string): Promise<boolean> {
    if (this.closed) throw new UnavailableError('directory closed');
    let last: unknown;
    for (const s of this.order()) {
      let conn: Conn;
      try {
        conn = await this.acquireAuth(s);
      } catch (err) {
        last = err;
        continue;
      }
      try {
        await conn.ready;
      } catch (err) {
        last = this.setupFailed(s, conn, err, 'bind');
        this.releaseAuth(s, conn);
        continue;
      }
      const end = this.opts.metrics.ldapSeconds.startTimer({ op: 'bind' });
      try {
        await conn.client.bind(dn, password);
        end();
        this.releaseAuth(s, conn);
        return true;
      } catch (err) {
        end();
        const kind = errorKind(err);
        if (kind === null) {
          this.releaseAuth(s, conn);
          // invalidCredentials, inappropriateAuthentication, insufficientAccess, unwillingToPerform
          // (a locked account under a password policy): the server said no to these credentials.
          if (err instanceof ResultCodeError && [49, 48, 50, 53].includes(err.code)) return false;
          if (err instanceof ResultCodeError) throw new UnavailableError(`LDAP bind refused by ${s.url}: ${err.message}`, { cause: err, details: { ldapCode: err.code } });
          throw err;
        }
        last = err;
        this.fail(s, conn, err, kind, 'bind');
        this.releaseAuth(s, conn);
      }
    }
    throw new UnavailableError(`LDAP unavailable for bind (${this.servers.map((s) => s.url).join(', ')}): ${(last as Error)?.message ?? last}`, { cause: last });
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const s of this.servers) {
      for (const c of [...s.service, ...s.auth]) c.destroy();
      s.service = [];
      s.auth = [];
      for (const w of s.authWaiters.splice(0)) w();
    }
  }
}
