/**
 * The IMAP listener of the store agent: accepts connections, creates sessions, counts them per
 * user and in metrics, and routes the store's change events to the sessions that have the
 * changed mailbox selected (for untagged EXISTS/EXPUNGE/FETCH and IDLE).
 */
import net from 'node:net';
import { createSecureContext } from 'node:tls';
import type { AddressList } from '../../../common/cidr.ts';
import type { Logger } from '../../../common/log.ts';
import { counter, gauge, type MetricsRegistry } from '../../../common/metrics.ts';
import type { MailStore, StoreChange } from '../types.ts';
import { commandTable } from './commands/index.ts';
import { normalizeLimits, type ImapLimits } from './limits.ts';
import { RecentTracker } from './mailbox-view.ts';
import { Session, type ServerContext } from './session.ts';
import { SnapshotCache } from './snapshots.ts';
import { untilNoSessions } from '../drain.ts';

export interface ImapServerOptions {
  store: MailStore;
  host: string;
  port: number;
  /** Offers STARTTLS with this key and certificate (PEM). */
  tls?: { key: string | Buffer; cert: string | Buffer } | undefined;
  /** The proxies' master account for SASL PLAIN logins on a user's behalf. */
  masterUser: string;
  masterSecret: string;
  /** Addresses allowed to use the master login and to forward client addresses (ID). */
  trusted: AddressList;
  log: Logger;
  registry: MetricsRegistry;
  /** Inactivity before `* BYE` (RFC 3501 asks for at least 30 minutes). */
  idleTimeoutMs?: number;
  /** `* OK Still here` this often during IDLE, so NAT and proxies see traffic (Dovecot: 2 min); 0 = off. */
  idleKeepaliveMs?: number;
  /** Static logins (trials, tests): user → password. */
  users?: Record<string, string>;
  limits?: Partial<ImapLimits>;
  greeting?: string;
}

export interface ImapServer {
  /** Stops accepting; open sessions get `graceMs` to finish on their own, then a BYE. */
  close(graceMs?: number): Promise<void>;
  sessions(): number;
  port: number;
}

export async function startImapServer(opts: ImapServerOptions): Promise<ImapServer> {
  const limits = normalizeLimits(opts.limits);
  const log = opts.log.child({ protocol: 'imap' });
  const sessionsGauge = gauge(opts.registry, 'sessions', 'Open sessions by protocol', ['protocol']);
  const sessionsTotal = counter(opts.registry, 'sessions_total', 'Sessions started by protocol', ['protocol']);
  const commandsTotal = counter(opts.registry, 'imap_commands_total', 'IMAP commands by command and result', ['command', 'result']);
  const sessions = new Set<Session>();
  const perUser = new Map<string, number>();
  const snapshots = new SnapshotCache();
  const byMailbox = (change: StoreChange) => {
    snapshots.onChange(change);
    for (const s of sessions) {
      if (s.state.name !== 'selected' || s.state.user !== change.user) continue;
      if (change.kind === 'mailboxes' || s.state.view.name === change.mailbox) s.mailboxChanged();
    }
  };
  const ctx: ServerContext = {
    store: opts.store,
    log,
    limits,
    auth: { masterUser: opts.masterUser, masterSecret: opts.masterSecret, trusted: opts.trusted, users: opts.users },
    secureContext: opts.tls ? createSecureContext({ key: opts.tls.key, cert: opts.tls.cert }) : undefined,
    idleTimeoutMs: opts.idleTimeoutMs ?? 30 * 60_000,
    idleKeepaliveMs: opts.idleKeepaliveMs ?? 2 * 60_000,
    recent: new RecentTracker(),
    snapshots,
    commands: commandTable(),
    commandsTotal,
    acquireUser(user) {
      const n = perUser.get(user) ?? 0;
      if (n >= limits.maxSessionsPerUser) return false;
      perUser.set(user, n + 1);
      return true;
    },
    releaseUser(user) {
      const n = (perUser.get(user) ?? 1) - 1;
      if (n <= 0) perUser.delete(user);
      else perUser.set(user, n);
    },
    onClose(session) {
      if (sessions.delete(session)) sessionsGauge.dec({ protocol: 'imap' });
    },
  };
  opts.store.on('change', byMailbox);

  const server = net.createServer((socket) => {
    socket.setNoDelay(true);
    const session = new Session(socket, ctx);
    sessions.add(session);
    sessionsGauge.inc({ protocol: 'imap' });
    sessionsTotal.inc({ protocol: 'imap' });
    session.log.info({ remotePort: socket.remotePort }, 'connection');
    session.start(opts.greeting ?? 'pairgate IMAP ready.');
  });
  server.on('error', (err) => log.error({ err }, 'listener error'));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(opts.port, opts.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as net.AddressInfo).port;
  log.info({ host: opts.host, port, starttls: Boolean(opts.tls) }, 'imap listening');
  sessionsGauge.set({ protocol: 'imap' }, 0);

  return {
    port,
    sessions: () => sessions.size,
    async close(graceMs = 0) {
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      // A planned hand-over lets sessions that are finishing (a client's FETCH and LOGOUT) end
      // cleanly; the proxies hold new logins meanwhile. Changes still reach them until then.
      await untilNoSessions(sessions, graceMs);
      opts.store.off('change', byMailbox);
      for (const s of [...sessions]) s.bye('Server shutting down');
      // Sessions get a short grace to flush their BYE; then their sockets are destroyed.
      await untilNoSessions(sessions, 3000);
      for (const s of [...sessions]) s.socket.destroy();
      await closed;
      log.info('imap stopped');
    },
  };
}
