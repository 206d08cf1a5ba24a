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
import { SMTPServer, type SMTPServerAddress, type SMTPServerAuthentication } from 'smtp-server';
import type { Readable } from 'node:stream';
import type { SmtpListenerConfig } from './config.ts';
import { REPLIES, SmtpReply } from './replies.ts';
import { rejectWith, tx, type ClientAddress, type FrontEndContext, type PgSession } from './context.ts';
import { resolveRecipient } from './recipients.ts';
import { checkAuth } from './auth.ts';
import { deliverMessage } from './message.ts';

export type { AuthLimiterLike, ClientAddress, FrontEndContext, RedisBusLike } from './context.ts';

const ENHANCED_AT_START = /^[245]\.\d{1,3}\.\d{1,3} /;

export interface FrontEnd {
  kind: SmtpListenerConfig['kind'];
  server: SMTPServer;
  /**
   * Serves one accepted connection; `onEnd` runs once when it has closed. (A listener on the
   * socket's own 'close' is not enough: smtp-server removes every listener from the socket when
   * STARTTLS upgrades it.)
   */
  handle(socket: net.Socket, client: ClientAddress, secure: boolean, onEnd?: () => void): void;
  sessions(): number;
  close(graceMs: number): Promise<void>;
}

export function createFrontEnd(ctx: FrontEndContext, kind: SmtpListenerConfig['kind'], tlsMode: SmtpListenerConfig['tls']): FrontEnd {
  const implicitTls = tlsMode === 'implicit';
  const starttls = tlsMode === 'starttls' && ctx.tlsFiles !== null;
  const cfg = ctx.config;
  const log = ctx.log.child({ frontend: kind });
  const submission = kind === 'submission';
  const protoLog = log.isLevelEnabled('debug') ? log.child({ component: 'smtp-server' }) : false;
  const sessionLabels = { protocol: 'smtp', pair: '', role: 'proxy' };

  const reject = (r: SmtpReply): SmtpReply => rejectWith(ctx, r);
  /** What to do when a session ends, by smtp-server's connection id (= session.id). */
  const endings = new Map<string, (session: PgSession) => void>();

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

    onClose(session) {
      const end = endings.get(session.id);
      endings.delete(session.id);
      end?.(session as PgSession);
    },

    onConnect(session, cb) {
      if (ctx.stopping) return cb(reject(REPLIES.stopping()));
      // Submission before STARTTLS: AUTH is neither offered nor accepted (RFC 4954 section 4).
      if (submission && !implicitTls) session.disabledCommands = ['AUTH'];
      cb();
    },

    onSecure(_socket, session, cb) {
      if (submission) session.disabledCommands = [];
      cb();
    },

    onAuth(auth: SMTPServerAuthentication, session, cb) {
      checkAuth(ctx, kind, auth, session, log)
        .then((r) => {
          if (r instanceof SmtpReply) return cb(r);
          (session as PgSession).pgUser = r;
          cb(null, { user: r.uid });
        })
        .catch((err) => {
          log.error({ err }, 'AUTH handler failed');
          cb(reject(REPLIES.authTemp()));
        });
    },

    onMailFrom(address: SMTPServerAddress, session, cb) {
      (session as PgSession).pgTx = { local: new Map(), relay: new Set() };
      const user = (session as PgSession).pgUser;
      // smtp-server asks for AUTH itself; checked here too, so that no option or session
      // setting can ever turn submission into an unauthenticated relay.
      if (submission && !user) return cb(reject(REPLIES.authRequired()));
      if (submission && cfg.submission.enforceSender && user && address.address) {
        const from = address.address.toLowerCase();
        const owned = [user.mail, ...user.aliases].some((a) => a.toLowerCase() === from);
        if (!owned) return cb(reject(REPLIES.senderNotOwned()));
      }
      cb();
    },

    onRcptTo(address: SMTPServerAddress, session, cb) {
      if (ctx.stopping) return cb(reject(REPLIES.stopping()));
      if (submission && !(session as PgSession).pgUser) return cb(reject(REPLIES.authRequired()));
      const t = tx(session);
      const key = address.address.toLowerCase();
      resolveRecipient(ctx, kind, address.address, log)
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
        deliverMessage(ctx, kind, session as PgSession, Buffer.concat(parts, size), log)
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

  let open = 0;
  return {
    kind,
    server,
    handle(socket, client, _secure, onEnd) {
      const before = server.connections.size;
      server.connect(socket, { remoteAddress: client.address, remotePort: client.port } as never);
      // The connection just made is the last one in the set: wrap its `send` so that a reply
      // whose text starts with an enhanced status code (ours) is not given a second, generic one.
      let conn: { id: string; send: (code: number, data?: unknown, context?: unknown) => void; close: () => void } | undefined;
      if (server.connections.size > before) for (const c of server.connections) conn = c as never;
      if (!conn) {
        // Turned away by smtp-server itself (maxClients): no session, and the socket keeps its listeners.
        if (onEnd) socket.once('close', onEnd);
        return;
      }
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
      endings.set(c.id, (ses) => {
        log.info(
          { cid: ses.id, client: client.address, user: ses.pgUser?.uid, messages: ses.pgMessages ?? 0, bytesIn: ses.pgBytes ?? 0, durationMs: Date.now() - started, tls: Boolean(ses.secure) },
          'SMTP session ended',
        );
        if (timer) clearTimeout(timer);
        open--;
        ctx.metrics.sessions.dec(sessionLabels);
        onEnd?.();
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
