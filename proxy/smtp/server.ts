/**
 * One smtp-server instance per front-end kind (MX or submission) with pairgate's hooks:
 * recipient lookup and pair health at RCPT, AUTH against the directory (rate limited) on
 * submission, and after DATA the fan-out to the pairs over LMTP (delivery.ts) plus the
 * smarthost for relayed recipients (relay.ts).
 *
 * Sockets come from listener.ts (after the PROXY header and, on 465, the TLS handshake) through
 * `handle(socket, client)`; smtp-server never listens itself.
 */
import type net from 'node:net';
import { SMTPServer, type SMTPServerAddress, type SMTPServerAuthentication, type SMTPServerSession } from 'smtp-server';
import type { Readable } from 'node:stream';
import { AuthError, UnavailableError, NotFoundError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import { keys } from '../../common/redis-bus.ts';
import type { Directory, PairRecord, UserRecord } from '../../directory/types.ts';
import type { SmtpConfig, SmtpListenerConfig } from './config.ts';
import { REPLIES, SmtpReply } from './replies.ts';
import { deliverToPair, deliveryIdFor, stripDeliveryIdHeaders, verdictFor, DELIVERY_ID_HEADER, type DeliveryOptions, type LocalRecipient, type PairHealthLike, type RecipientOutcome } from './delivery.ts';
import type { Smarthost } from './relay.ts';
import { buildBounce } from './bounce.ts';
import type { SmtpMetrics } from './metrics.ts';

/** The failed-login limiter (proxy/rate-limit.ts AuthLimiter fits). */
export interface AuthLimiterLike {
  check(ip: string, login: string): Promise<{ locked: boolean; scope?: string }>;
  fail(ip: string, login: string): Promise<number>;
}

/** What the SMTP side reads from Redis (common/redis-bus.ts RedisBus fits). */
export interface RedisBusLike {
  get(key: string): Promise<string | null>;
}

export interface FrontEndContext {
  /** For user-move holds (`pairgate:usermove:<uid>`); null without Redis. */
  bus: RedisBusLike | null;
  config: SmtpConfig;
  directory: Directory;
  pairHealth: PairHealthLike;
  limiter: AuthLimiterLike;
  smarthost: Smarthost | null;
  metrics: SmtpMetrics;
  log: Logger;
  delivery: DeliveryOptions;
  tlsFiles: { key: Buffer; cert: Buffer } | null;
  stopping: boolean;
}

export interface ClientAddress {
  address: string;
  port: number;
}

interface Transaction {
  local: Map<string, LocalRecipient>;
  relay: Set<string>;
}

interface PgSession extends SMTPServerSession {
  pgUser?: UserRecord;
  pgMessages?: number;
  pgBytes?: number;
  pgTx?: Transaction;
}

const ENHANCED_AT_START = /^[245]\.\d{1,3}\.\d{1,3} /;

function tx(session: SMTPServerSession): Transaction {
  const s = session as PgSession;
  // A new transaction starts at MAIL FROM (smtp-server resets the envelope after each message).
  if (!s.pgTx) s.pgTx = { local: new Map(), relay: new Set() };
  return s.pgTx;
}

function domainOf(address: string): string {
  const at = address.lastIndexOf('@');
  return at < 0 ? '' : address.slice(at + 1).toLowerCase();
}

const CONTROL = /[\x00-\x1f\x7f]/;

export interface FrontEnd {
  kind: SmtpListenerConfig['kind'];
  server: SMTPServer;
  handle(socket: net.Socket, client: ClientAddress, secure: boolean): void;
  sessions(): number;
  close(graceMs: number): Promise<void>;
}

export function createFrontEnd(ctx: FrontEndContext, kind: SmtpListenerConfig['kind'], tlsMode: SmtpListenerConfig['tls']): FrontEnd {
  const implicitTls = tlsMode === 'implicit';
  const starttls = tlsMode === 'starttls' && ctx.tlsFiles !== null;
  const cfg = ctx.config;
  const log = ctx.log.child({ frontend: kind });
  const submission = kind === 'submission';
  const localDomains = new Set(cfg.localDomains.map((d) => d.toLowerCase()));
  const protoLog = log.isLevelEnabled('debug') ? log.child({ component: 'smtp-server' }) : false;
  const sessionLabels = { protocol: 'smtp', pair: '', role: 'proxy' };

  const reject = (r: SmtpReply): SmtpReply => {
    ctx.metrics.rejects.inc({ reason: r.reason });
    return r;
  };

  const resolveRecipient = async (address: string): Promise<LocalRecipient | 'relay'> => {
    let user: UserRecord | null;
    try {
      user = await ctx.directory.findRecipient(address);
    } catch (err) {
      log.warn({ rcpt: address, err: (err as Error).message }, 'recipient lookup failed');
      throw reject(REPLIES.directoryDown());
    }
    if (!user) {
      const local = localDomains.size === 0 ? !submission : localDomains.has(domainOf(address));
      if (local) throw reject(REPLIES.unknownRecipient());
      if (submission && ctx.smarthost) return 'relay';
      throw reject(REPLIES.relayDenied());
    }
    let pair: PairRecord;
    try {
      pair = (await ctx.directory.routeFor(user)).pair;
    } catch (err) {
      if (err instanceof NotFoundError) {
        log.error({ rcpt: address, uid: user.uid, pair: user.pair, err: err.message }, 'recipient has no usable home pair');
        throw reject(REPLIES.routeBroken());
      }
      throw reject(REPLIES.directoryDown());
    }
    try {
      await ctx.pairHealth.awaitServable(pair, cfg.delivery.rcptWaitMs);
    } catch (err) {
      const state = err instanceof UnavailableError ? (err.details.state as string | undefined) : undefined;
      // Failing over (or not heard of yet): accept; the delivery after DATA holds for it.
      if (state !== 'failing-over' && state !== 'unknown') throw reject(REPLIES.pairDown(pair.id));
    }
    return { address, user, pair };
  };

  const server = new SMTPServer({
    name: cfg.hostname,
    banner: submission ? 'pairgate submission ready' : 'pairgate ESMTP ready',
    secure: implicitTls,
    ...(ctx.tlsFiles ? { key: ctx.tlsFiles.key, cert: ctx.tlsFiles.cert } : {}),
    hideSTARTTLS: !starttls,
    disabledCommands: [...(submission ? [] : ['AUTH']), ...(starttls ? [] : ['STARTTLS'])],
    authOptional: !submission,
    authMethods: ['PLAIN', 'LOGIN'],
    allowInsecureAuth: false,
    hideENHANCEDSTATUSCODES: false,
    hideDSN: true,
    size: cfg.limits.maxMessageBytes,
    maxRecipients: cfg.limits.maxRecipients,
    maxClients: cfg.limits.maxConnections || Infinity,
    socketTimeout: cfg.limits.commandTimeoutMs || 24 * 3600_000,
    closeTimeout: 10_000,
    maxAllowedUnauthenticatedCommands: cfg.limits.maxUnauthenticatedCommands,
    maxCommandLength: cfg.limits.maxLineBytes,
    disableReverseLookup: true,
    logger: protoLog as never,

    onConnect(session, cb) {
      if (ctx.stopping) return cb(reject(REPLIES.stopping()));
      cb();
    },

    onAuth(auth: SMTPServerAuthentication, session, cb) {
      const ip = session.remoteAddress;
      const login = auth.username ?? '';
      const password = auth.password ?? '';
      (async () => {
        if (!submission || (auth.method !== 'PLAIN' && auth.method !== 'LOGIN')) return cb(reject(REPLIES.authFailed()));
        if (!login || login.length > 256 || CONTROL.test(login) || password.length > 1024 || /[\0\r\n]/.test(password) || (auth.authzid && auth.authzid !== login)) {
          ctx.metrics.logins.inc({ protocol: 'smtp', result: 'auth' });
          const delay = await ctx.limiter.fail(ip, login.slice(0, 256));
          await new Promise((r) => setTimeout(r, delay));
          return cb(reject(REPLIES.authBadInput()));
        }
        const verdict = await ctx.limiter.check(ip, login);
        if (verdict.locked) {
          ctx.metrics.logins.inc({ protocol: 'smtp', result: 'locked' });
          log.warn({ client: ip, user: login, scope: verdict.scope }, 'AUTH refused: too many failures');
          return cb(reject(REPLIES.authThrottled()));
        }
        try {
          const user = await ctx.directory.authenticate(login, password);
          (session as PgSession).pgUser = user;
          ctx.metrics.logins.inc({ protocol: 'smtp', result: 'ok' });
          log.info({ cid: session.id, client: ip, user: user.uid }, 'authenticated');
          cb(null, { user: user.uid });
        } catch (err) {
          if (err instanceof AuthError) {
            ctx.metrics.logins.inc({ protocol: 'smtp', result: 'auth' });
            const delay = await ctx.limiter.fail(ip, login);
            log.info({ cid: session.id, client: ip, user: login, delayMs: delay }, 'AUTH failed');
            await new Promise((r) => setTimeout(r, delay));
            return cb(reject(REPLIES.authFailed()));
          }
          ctx.metrics.logins.inc({ protocol: 'smtp', result: 'temp' });
          log.warn({ client: ip, err: (err as Error).message }, 'AUTH could not be checked');
          cb(reject(REPLIES.authTemp()));
        }
      })().catch((err) => {
        log.error({ err }, 'AUTH handler failed');
        cb(reject(REPLIES.authTemp()));
      });
    },

    onMailFrom(address: SMTPServerAddress, session, cb) {
      (session as PgSession).pgTx = { local: new Map(), relay: new Set() };
      const user = (session as PgSession).pgUser;
      if (submission && cfg.submission.enforceSender && user && address.address) {
        const from = address.address.toLowerCase();
        const owned = [user.mail, ...user.aliases].some((a) => a.toLowerCase() === from);
        if (!owned) return cb(reject(REPLIES.senderNotOwned()));
      }
      cb();
    },

    onRcptTo(address: SMTPServerAddress, session, cb) {
      if (ctx.stopping) return cb(reject(REPLIES.stopping()));
      const t = tx(session);
      const key = address.address.toLowerCase();
      resolveRecipient(address.address)
        .then((r) => {
          if (r === 'relay') t.relay.add(address.address);
          else t.local.set(key, r);
          cb();
        })
        .catch((err) => {
          if (err instanceof SmtpReply) {
            log.info({ cid: session.id, client: session.remoteAddress, rcpt: address.address, code: err.responseCode, reason: err.reason }, 'recipient refused');
            return cb(err);
          }
          log.error({ err }, 'RCPT handler failed');
          cb(reject(REPLIES.directoryDown()));
        });
    },

    onData(stream: Readable, session, cb) {
      const parts: Buffer[] = [];
      let size = 0;
      stream.on('data', (d: Buffer) => {
        size += d.length;
        if (size <= cfg.limits.maxMessageBytes) parts.push(d);
      });
      stream.on('error', (err) => cb(err));
      stream.on('end', () => {
        if ((stream as Readable & { sizeExceeded?: boolean }).sizeExceeded || size > cfg.limits.maxMessageBytes) {
          return cb(reject(REPLIES.tooBig(cfg.limits.maxMessageBytes)));
        }
        const t0 = process.hrtime.bigint();
        deliverMessage(session as PgSession, Buffer.concat(parts, size))
          .then((res) => {
            ctx.metrics.deliverySeconds.observe(Number(process.hrtime.bigint() - t0) / 1e9);
            if (res instanceof SmtpReply) cb(reject(res));
            else cb(null, res);
          })
          .catch((err) => {
            log.error({ err }, 'delivery failed unexpectedly');
            cb(reject(REPLIES.deliveryTemp('4.3.0', 'unknown')));
          });
      });
    },
  });
  server.on('error', (err) => log.debug({ err: err.message }, 'SMTP connection error'));

  const received = (session: PgSession, id: string): string => {
    const helo = (session.hostNameAppearsAs || 'unknown').replace(/[^\w.\-[\]:]/g, '');
    const proto = `${session.transmissionType ?? 'ESMTP'}`;
    const date = new Date().toUTCString().replace('GMT', '+0000');
    return `Received: from ${helo} ([${session.remoteAddress}])\r\n\tby ${cfg.hostname} (pairgate) with ${proto} id ${session.id};\r\n\t${date}\r\n`;
  };

  async function deliverMessage(session: PgSession, raw: Buffer): Promise<string | SmtpReply> {
    const t = tx(session);
    session.pgMessages = (session.pgMessages ?? 0) + 1;
    session.pgBytes = (session.pgBytes ?? 0) + raw.length;
    const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
    const original = stripDeliveryIdHeaders(raw);
    const id = deliveryIdFor(from, original);
    const slog = log.child({ cid: session.id, deliveryId: id });
    const rcv = received(session, id);
    const forPairs = Buffer.concat([Buffer.from(`${DELIVERY_ID_HEADER}: ${id}\r\n${rcv}`, 'latin1'), original]);
    const client = { address: session.remoteAddress, port: session.remotePort, helo: session.hostNameAppearsAs || undefined };
    const byPair = new Map<string, { pair: PairRecord; rcpts: LocalRecipient[] }>();
    const moving = await holdForUserMoves([...t.local.values()], slog);
    const held: RecipientOutcome[] = moving.blocked.map((r) => ({ address: r.address, pair: r.pair.id, reply: { code: 451, enhanced: '4.2.0', text: 'Mailbox is being moved, try again later' } }));
    for (const r of moving.ready) {
      const g = byPair.get(r.pair.id) ?? { pair: r.pair, rcpts: [] };
      g.rcpts.push(r);
      byPair.set(r.pair.id, g);
    }
    const jobs: Array<Promise<RecipientOutcome[]>> = [...byPair.values()].map((g) =>
      deliverToPair(g.pair, g.rcpts, from, forPairs, client, ctx.pairHealth, ctx.delivery, slog),
    );
    if (t.relay.size && ctx.smarthost) jobs.push(ctx.smarthost.send(from, [...t.relay], Buffer.concat([Buffer.from(rcv, 'latin1'), original])));
    const outcomes = [...held, ...(await Promise.all(jobs)).flat()];
    for (const o of outcomes) ctx.metrics.deliveries.inc({ result: o.reply.code < 300 ? 'ok' : o.reply.code < 500 ? 'tempfail' : 'rejected' });
    const verdict = verdictFor(outcomes, id);
    const summary = { from, bytes: raw.length, client: session.remoteAddress, user: session.pgUser?.uid, accepted: verdict.accepted, temporary: verdict.temporary, permanent: verdict.permanent, pairs: [...byPair.keys()], relayed: t.relay.size };
    ctx.metrics.messages.inc({ kind, result: verdict.error ? (verdict.error.temporary ? 'tempfail' : 'rejected') : 'ok' });
    if (verdict.error) {
      slog.info({ ...summary, code: verdict.error.responseCode, failures: outcomes.filter((o) => o.reply.code >= 400).map((o) => ({ rcpt: o.address, pair: o.pair, code: o.reply.code, text: o.reply.text })) }, 'message not accepted');
      return verdict.error;
    }
    if (verdict.permanent) {
      // Accepted for the others; the reply after DATA cannot refuse single recipients.
      const failed = outcomes.filter((o) => o.reply.code >= 500);
      slog.warn({ ...summary, failed: failed.map((o) => ({ rcpt: o.address, code: o.reply.code, text: o.reply.text })) }, 'message accepted; some recipients refused it permanently: bouncing');
      if (from) void sendBounce(from, failed, original, id, slog);
      else ctx.metrics.bounces.inc({ result: 'null-sender' });
    } else slog.info(summary, 'message delivered');
    return `2.0.0 Ok: delivered as ${id}`;
  }

  /**
   * While `pairgate user move` copies a user's last changes (Redis `pairgate:usermove:<uid>`),
   * deliveries to that user wait (bounded by the hold time); once the move is done the route is
   * looked up again, since the home pair has changed. Still moving at the bound: 451.
   */
  async function holdForUserMoves(rcpts: LocalRecipient[], slog: Logger): Promise<{ ready: LocalRecipient[]; blocked: LocalRecipient[] }> {
    const bus = ctx.bus;
    if (!bus) return { ready: rcpts, blocked: [] };
    const deadline = Date.now() + ctx.delivery.holdMs;
    const uids = [...new Set(rcpts.map((r) => r.user.uid))];
    const state = new Map<string, 'clear' | 'moved' | 'blocked'>();
    await Promise.all(
      uids.map(async (uid) => {
        let waited = false;
        for (;;) {
          let moving: boolean;
          try {
            moving = (await bus.get(keys.userMove(uid))) !== null;
          } catch {
            moving = false; // Redis unreachable: nothing we can see to wait for.
          }
          if (!moving) return void state.set(uid, waited ? 'moved' : 'clear');
          if (!waited) slog.info({ uid }, 'delivery held: user move in progress');
          waited = true;
          if (Date.now() + 200 >= deadline) return void state.set(uid, 'blocked');
          await new Promise((r) => setTimeout(r, 200));
        }
      }),
    );
    const ready: LocalRecipient[] = [];
    const blocked: LocalRecipient[] = [];
    for (const r of rcpts) {
      const st = state.get(r.user.uid);
      if (st === 'blocked') {
        blocked.push(r);
        continue;
      }
      if (st === 'moved') {
        try {
          const user = (await ctx.directory.findRecipient(r.address)) ?? r.user;
          const { pair } = await ctx.directory.routeFor(user);
          slog.info({ uid: user.uid, from: r.pair.id, to: pair.id }, 'user moved while the message was on its way: new route');
          ready.push({ address: r.address, user, pair });
        } catch (err) {
          slog.warn({ uid: r.user.uid, err: (err as Error).message }, 'route lookup after a user move failed');
          blocked.push(r);
        }
        continue;
      }
      ready.push(r);
    }
    return { ready, blocked };
  }

  /** Returns permanent per-recipient failures to the sender (null sender, so no bounce loops). */
  async function sendBounce(sender: string, failed: RecipientOutcome[], original: Buffer, id: string, slog: Logger): Promise<void> {
    const dsn = buildBounce({ hostname: cfg.hostname, sender, failed, original, deliveryId: id, arrival: new Date() });
    try {
      const user = await ctx.directory.findRecipient(sender);
      let outcomes: RecipientOutcome[];
      if (user) {
        const { pair } = await ctx.directory.routeFor(user);
        const body = Buffer.concat([Buffer.from(`${DELIVERY_ID_HEADER}: ${deliveryIdFor('', dsn)}\r\n`), dsn]);
        outcomes = await deliverToPair(pair, [{ address: sender, user, pair }], '', body, { address: '127.0.0.1', port: 0 }, ctx.pairHealth, { ...ctx.delivery, forwardClientAddress: false }, slog);
      } else if (ctx.smarthost) {
        outcomes = await ctx.smarthost.send('', [sender], dsn);
      } else {
        ctx.metrics.bounces.inc({ result: 'no-route' });
        slog.error({ sender }, 'bounce not sent: sender is not local and no smarthost is configured');
        return;
      }
      const ok = outcomes.every((o) => o.reply.code < 300);
      ctx.metrics.bounces.inc({ result: ok ? 'sent' : 'failed' });
      if (ok) slog.info({ sender, recipients: failed.length }, 'bounce sent');
      else slog.error({ sender, reply: outcomes[0]?.reply }, 'bounce not delivered');
    } catch (err) {
      ctx.metrics.bounces.inc({ result: 'auth' });
      slog.error({ sender, err: (err as Error).message }, 'bounce not delivered');
    }
  }

  let open = 0;
  return {
    kind,
    server,
    handle(socket, client, _secure) {
      const before = server.connections.size;
      server.connect(socket, { remoteAddress: client.address, remotePort: client.port } as never);
      // The connection just made is the last one in the set: wrap its `send` so that a reply
      // whose text starts with an enhanced status code (ours) is not given a second, generic one.
      let conn: { send: (code: number, data?: unknown, context?: unknown) => void; close: () => void; session: PgSession } | undefined;
      if (server.connections.size > before) for (const c of server.connections) conn = c as never;
      if (!conn) return;
      const c = conn;
      const origSend = c.send.bind(c);
      c.send = (code, data, context) => (typeof data === 'string' && ENHANCED_AT_START.test(data) ? origSend(code, data, false) : origSend(code, data, context));
      open++;
      ctx.metrics.sessions.inc(sessionLabels);
      ctx.metrics.sessionsTotal.inc(sessionLabels);
      const limit = cfg.limits.sessionTimeoutMs;
      const timer = limit > 0 ? setTimeout(() => {
        log.info({ client: client.address }, 'session time limit reached');
        c.send(421, '4.4.2 Session time limit exceeded, closing connection');
        c.close();
      }, limit) : null;
      timer?.unref();
      const started = Date.now();
      socket.once('close', () => {
        const ses = c.session;
        log.info(
          { cid: ses.id, client: client.address, user: ses.pgUser?.uid, messages: ses.pgMessages ?? 0, bytesIn: ses.pgBytes ?? 0, durationMs: Date.now() - started, tls: Boolean(ses.secure) },
          'SMTP session ended',
        );
        if (timer) clearTimeout(timer);
        open--;
        ctx.metrics.sessions.dec(sessionLabels);
      });
    },
    sessions: () => open,
    async close(graceMs) {
      // smtp-server's close: stop (nothing listens here), then after closeTimeout say 421 to
      // the sessions still open. Wait for them to finish within the grace time.
      (server as unknown as { options: { closeTimeout: number } }).options.closeTimeout = Math.max(1, graceMs);
      server.close(() => undefined);
      const deadline = Date.now() + graceMs + 2000;
      while (server.connections.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    },
  };
}
