/**
 * One proxied login, the same for IMAP and POP3: check the failed-login limits, authenticate
 * against the directory, find the home pair, wait (bounded) while the pair fails over, connect
 * and log in there as the master account, retrying connect failures within the hold bound.
 *
 * An expected refusal is a value (`LoginResult` with `ok: false`), mapped to protocol replies
 * by each session's reply table; only bugs throw.
 */
import type { SessionLog } from './lazy-log.ts';
import { AuthError, NotFoundError, UnavailableError, errorCode } from '../common/errors.ts';
import type { PairRecord, UserRecord } from '../directory/types.ts';
import { keys } from '../common/redis-bus.ts';
import { BackendInput, connectTcp, imapMasterLogin, pop3MasterLogin, type BackendSession, type ClientAddress } from './backend.ts';
import { inList, type ProxyContext, type Protocol, type SessionHandle } from './context.ts';

export type LoginFailure =
  /** Wrong credentials (or a login that can never be valid). */
  | 'auth'
  /** Too many failures from this address or for this login: try later. */
  | 'locked'
  /** Too many sessions of this user. */
  | 'limit'
  /** Directory, pair or backend unavailable: try later. */
  | 'temp';

export type LoginResult =
  | { ok: true; backend: BackendSession; user: UserRecord; pair: PairRecord; held: boolean }
  | { ok: false; kind: LoginFailure; message: string };

export const MAX_LOGIN_BYTES = 256;
export const MAX_PASSWORD_BYTES = 1024;

/** A login or password with control characters (CR, LF, NUL…) or over the bounds can never be valid. */
export function validCredentials(login: string, password: string): boolean {
  if (login.length === 0 || Buffer.byteLength(login) > MAX_LOGIN_BYTES) return false;
  if (Buffer.byteLength(password) > MAX_PASSWORD_BYTES || password.length === 0) return false;
  // eslint-disable-next-line no-control-regex
  return !/[\x00-\x1f\x7f]/.test(login) && !/[\x00\r\n]/.test(password);
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export async function proxyLogin(
  ctx: ProxyContext,
  req: { protocol: Protocol; login: string; password: string; client: ClientAddress; session: SessionHandle; log: SessionLog },
): Promise<LoginResult> {
  const { protocol, login, password, client, log } = req;
  const started = Date.now();
  const done = (r: LoginResult): LoginResult => {
    const result = r.ok ? 'ok' : r.kind;
    ctx.metrics.logins.inc({ protocol, result });
    if (r.ok) ctx.metrics.loginSeconds.observe({ protocol }, (Date.now() - started) / 1000);
    return r;
  };
  const failAuth = async (message: string): Promise<LoginResult> => {
    const delay = await ctx.limiter.fail(client.address, login);
    if (delay > 0) await sleep(delay);
    return done({ ok: false, kind: 'auth', message });
  };

  if (ctx.stopping) return done({ ok: false, kind: 'temp', message: 'proxy is shutting down' });
  const verdict = await ctx.limiter.check(client.address, login);
  if (verdict.locked) {
    log.warn({ login, client: client.address, scope: verdict.scope, ipFailures: verdict.ipFailures, loginFailures: verdict.loginFailures }, 'login refused: too many failures');
    return done({ ok: false, kind: 'locked', message: 'too many failed logins' });
  }
  if (!validCredentials(login, password)) {
    log.info({ client: client.address }, 'login refused: malformed credentials');
    return failAuth('malformed credentials');
  }

  let user: UserRecord;
  try {
    user = await ctx.directory.authenticate(login, password);
  } catch (err) {
    if (err instanceof AuthError) {
      log.info({ login, client: client.address }, 'login failed: bad credentials');
      return failAuth('authentication failed');
    }
    log.warn({ login, err: (err as Error).message, code: errorCode(err) }, 'login failed: directory unavailable');
    return done({ ok: false, kind: 'temp', message: 'directory unavailable' });
  }
  // The session's logger is lazy (its pino child is made only when a line is written), and so
  // are these: a successful login logs nothing here.
  let ulogMade: SessionLog | undefined;
  const ulog = () => (ulogMade ??= log.with({ user: user.uid }));

  // A user move in its final copy blocks new sessions for the user (Redis `usermove:<uid>`):
  // wait, bounded by the hold, then route afresh (the move switches the home pair).
  if (ctx.bus?.connected) {
    const deadline = started + ctx.config.hold.maxMs;
    let waited = false;
    for (;;) {
      let blocked = false;
      try {
        blocked = (await ctx.bus.get(keys.userMove(user.uid))) !== null;
      } catch {
        break; // Redis went away: nothing to wait for that we can see.
      }
      if (!blocked) break;
      if (!waited) {
        waited = true;
        ulog().info('login held: user move in progress');
      }
      if (Date.now() + 200 >= deadline) {
        ulog().warn('login failed: user move still in progress after the hold bound');
        return done({ ok: false, kind: 'temp', message: 'user move in progress' });
      }
      await sleep(200);
    }
  }

  let pair: PairRecord;
  try {
    pair = (await ctx.directory.routeFor(user)).pair;
  } catch (err) {
    ulog().warn({ err: (err as Error).message, code: errorCode(err) }, err instanceof NotFoundError ? 'login failed: user has no usable home pair' : 'login failed: route lookup failed');
    return done({ ok: false, kind: 'temp', message: 'no route' });
  }
  let plogMade: SessionLog | undefined;
  const plog = () => (plogMade ??= log.with({ user: user.uid, pair: pair.id }));

  if (!inList(ctx.trustedBackends, pair.address)) {
    plog().error({ address: pair.address }, 'pair address is outside backend.trustedNetworks: master login refused');
    return done({ ok: false, kind: 'temp', message: 'pair not trusted' });
  }
  if (!ctx.sessions.bindUser(req.session, user.uid, ctx.config.limits.maxSessionsPerUser)) {
    plog().warn({ cap: ctx.config.limits.maxSessionsPerUser }, 'login refused: too many sessions for this user');
    return done({ ok: false, kind: 'limit', message: 'too many sessions' });
  }
  const unbind = () => ctx.sessions.unbindUser(req.session);

  const holdDeadline = started + ctx.config.hold.maxMs;
  const port = protocol === 'imap' ? (pair.ports.imap ?? 143) : (pair.ports.pop3 ?? 110);
  let held = false;
  let holdStart = 0;
  const markHeld = () => {
    if (held) return;
    held = true;
    holdStart = Date.now();
    ctx.metrics.heldLogins.inc({ pair: pair.id });
    plog().info({ state: ctx.pairHealth.state(pair.id) }, 'login held: waiting for the pair');
  };
  for (let attempt = 1; ; attempt++) {
    const st = ctx.pairHealth.state(pair.id);
    if (st === 'failing-over' || (st === 'unknown' && attempt > 1)) markHeld();
    try {
      await ctx.pairHealth.awaitServable(pair, Math.max(0, holdDeadline - Date.now()));
    } catch (err) {
      plog().warn({ err: (err as Error).message, attempt }, 'login failed: pair not serving');
      unbind();
      return done({ ok: false, kind: 'temp', message: (err as Error).message });
    }
    try {
      const input = new BackendInput();
      const socket = await connectTcp({ host: pair.address, port }, ctx.config.backend.connectTimeoutMs, input);
      try {
        const opts = {
          uid: user.uid,
          masterUser: ctx.config.backend.masterUser,
          masterSecret: ctx.config.backend.masterSecret,
          client: ctx.config.backend.forwardClientAddress ? client : undefined,
          timeoutMs: ctx.config.backend.loginTimeoutMs,
        };
        const backend = protocol === 'imap' ? await imapMasterLogin(socket, opts, input) : await pop3MasterLogin(socket, opts, input);
        if (held) ctx.metrics.heldSeconds.observe({ pair: pair.id }, (Date.now() - holdStart) / 1000);
        req.session.pair = pair.id;
        return done({ ok: true, backend, user, pair, held });
      } catch (err) {
        socket.destroy();
        throw err;
      }
    } catch (err) {
      ctx.metrics.backendConnectFailures.inc({ pair: pair.id });
      if (err instanceof AuthError) {
        plog().error({ err: err.message }, 'pair refused the master login (check backend.masterUser/masterSecret and the pair trusted networks)');
        unbind();
        return done({ ok: false, kind: 'temp', message: 'backend login refused' });
      }
      const retryMs = ctx.config.hold.retryMs;
      if (Date.now() + retryMs >= holdDeadline || !(err instanceof UnavailableError || errorCode(err) === 'TIMEOUT')) {
        plog().warn({ err: (err as Error).message, attempt }, 'login failed: cannot reach the pair');
        unbind();
        return done({ ok: false, kind: 'temp', message: 'pair unreachable' });
      }
      plog().info({ err: (err as Error).message, attempt }, 'backend connect failed; retrying within the hold bound');
      markHeld();
      await sleep(retryMs);
    }
  }
}
