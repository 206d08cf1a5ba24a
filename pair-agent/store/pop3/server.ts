/**
 * The store's POP3 listener: plain (with STLS) and, when configured, implicit TLS (pop3s).
 * Keeps the per-user maildrop locks ([IN-USE]), counts sessions, and closes every session on
 * stop.
 */
import net from 'node:net';
import tls from 'node:tls';
import { randomBytes } from 'node:crypto';
import type { AddressList } from '../../../common/cidr.ts';
import type { Logger } from '../../../common/log.ts';
import { counter, gauge, type MetricsRegistry } from '../../../common/metrics.ts';
import type { MailStore } from '../types.ts';
import { POP3_LIMITS, type Pop3Limits } from './lines.ts';
import { Pop3Session, type Pop3Context } from './session.ts';
import { untilNoSessions } from '../drain.ts';

export interface Pop3ServerOptions {
  store: MailStore;
  host: string;
  port: number;
  /** Implicit TLS listener port (needs `tls`). */
  tlsPort?: number | undefined;
  tls?: { key: string | Buffer; cert: string | Buffer } | undefined;
  masterUser: string;
  masterSecret: string;
  /** Who may use the master login and XCLIENT. */
  trusted: AddressList;
  /** Static logins (trials, tests): user -> password; USER/PASS is offered only with these. */
  users?: Record<string, string> | undefined;
  log: Logger;
  registry: MetricsRegistry;
  /** RFC 1939 asks for at least 10 minutes. */
  idleTimeoutMs?: number | undefined;
  limits?: Partial<Pop3Limits> | undefined;
  maxSessions?: number | undefined;
}

export interface Pop3Server {
  port: number;
  tlsPort?: number | undefined;
  sessions(): number;
  /** Stops accepting; open sessions get `graceMs` to finish on their own, then are shut down. */
  close(graceMs?: number): Promise<void>;
}

function listen(server: net.Server, port: number, host: string): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      const a = server.address();
      resolve(typeof a === 'object' && a ? a.port : port);
    });
  });
}

export async function startPop3Server(opts: Pop3ServerOptions): Promise<Pop3Server> {
  const log = opts.log.child({ protocol: 'pop3' });
  const sessionsGauge = gauge(opts.registry, 'sessions', 'Open sessions by protocol', ['protocol']);
  const sessionsTotal = counter(opts.registry, 'sessions_total', 'Sessions started by protocol', ['protocol']);
  const commandsTotal = counter(opts.registry, 'pop3_commands_total', 'POP3 commands by command and result', ['command', 'result']);
  const sessions = new Set<Pop3Session>();
  const locks = new Set<string>();
  const secureContext = opts.tls ? tls.createSecureContext({ key: opts.tls.key, cert: opts.tls.cert }) : undefined;
  const ctx: Pop3Context = {
    store: opts.store,
    log,
    auth: { masterUser: opts.masterUser, masterSecret: opts.masterSecret, trusted: opts.trusted, users: opts.users },
    limits: { ...POP3_LIMITS, ...(opts.limits ?? {}) },
    secureContext,
    idleTimeoutMs: opts.idleTimeoutMs ?? 10 * 60_000,
    lock(user) {
      if (locks.has(user)) return false;
      locks.add(user);
      return true;
    },
    unlock(user) {
      locks.delete(user);
    },
    onClose(s) {
      if (sessions.delete(s)) sessionsGauge.dec({ protocol: 'pop3' });
    },
    commandsTotal,
  };
  const accept = (socket: net.Socket, secure: boolean) => {
    if (sessions.size >= (opts.maxSessions ?? 1000)) {
      // Not a session: nothing else would ever close it. A client that keeps its side open
      // would keep the socket (and close(), which waits for every connection) forever.
      socket.on('error', () => undefined);
      socket.end('-ERR [SYS/TEMP] Too many connections\r\n');
      setTimeout(() => socket.destroy(), 2000).unref();
      return;
    }
    socket.setNoDelay(true);
    const s = new Pop3Session(socket, ctx, randomBytes(6).toString('hex'), secure);
    sessions.add(s);
    sessionsGauge.inc({ protocol: 'pop3' });
    sessionsTotal.inc({ protocol: 'pop3' });
    s.start();
  };
  const plain = net.createServer((socket) => accept(socket, false));
  const port = await listen(plain, opts.port, opts.host);
  let implicit: tls.Server | undefined;
  let tlsPort: number | undefined;
  if (secureContext && opts.tlsPort !== undefined) {
    implicit = tls.createServer({ key: opts.tls!.key, cert: opts.tls!.cert }, (socket) => accept(socket, true));
    implicit.on('tlsClientError', (err) => log.debug({ err: err.message }, 'TLS handshake failed'));
    tlsPort = await listen(implicit, opts.tlsPort, opts.host);
  }
  log.info({ host: opts.host, port, tlsPort }, 'POP3 listening');
  const closeServer = (srv: net.Server | undefined) => (srv ? new Promise<void>((r) => srv.close(() => r())) : Promise.resolve());
  return {
    port,
    tlsPort,
    sessions: () => sessions.size,
    async close(graceMs = 0) {
      const closing = Promise.all([closeServer(plain), closeServer(implicit)]);
      // As IMAP: a planned hand-over lets a finishing session (RETR, QUIT) end on its own first.
      await untilNoSessions(sessions, graceMs);
      for (const s of [...sessions]) s.shutdown();
      await untilNoSessions(sessions, 3000);
      for (const s of [...sessions]) s.socket.destroy();
      await closing;
    },
  };
}
