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
import { connectAndLogin, type BackendSession, type ClientAddress } from './backend.ts';
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

/** Counts the login's outcome (and its latency when it succeeded) and returns it. */
function done(ctx: ProxyContext, protocol: Protocol, started: number, r: LoginResult): LoginResult {
  ctx.tallies.logins.add(protocol === 'imap' ? (r.ok ? LOGIN_LABELS.imap.ok : LOGIN_LABELS.imap[r.kind]) : r.ok ? LOGIN_LABELS.pop3.ok : LOGIN_LABELS.pop3[r.kind], 1);
  if (r.ok) ctx.metrics.loginSeconds.observe(PROTOCOL_LABELS[protocol], (Date.now() - started) / 1000);
  return r;
}

/** Label objects made once (prom-client hashes what it is given; no object per event). */
const PROTOCOL_LABELS = { imap: { protocol: 'imap' }, pop3: { protocol: 'pop3' } } as const;
const loginLabels = (protocol: Protocol) => ({
  ok: { protocol, result: 'ok' },
  auth: { protocol, result: 'auth' },
  locked: { protocol, result: 'locked' },
  limit: { protocol, result: 'limit' },
  temp: { protocol, result: 'temp' },
});
const LOGIN_LABELS = { imap: loginLabels('imap'), pop3: loginLabels('pop3') };

/** A wrong password (or malformed credentials): counted against the address and the login, answered after the delay. */
async function failAuth(ctx: ProxyContext, protocol: Protocol, started: number, client: ClientAddress, login: string, message: string): Promise<LoginResult> {
  const delay = await ctx.limiter.fail(client.address, login);
  if (delay > 0) await sleep(delay);
  return done(ctx, protocol, started, { ok: false, kind: 'auth', message });
}

export async function proxyLogin(
  ctx: ProxyContext,
  req: { protocol: Protocol; login: string; password: string; client: ClientAddress; session: SessionHandle; log: SessionLog },
): Promise<LoginResult> {
  const { protocol, login, password, client, log } = req;
  const started = Date.now();

  if (ctx.stopping) return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'proxy is shutting down' });
  // Without Redis (or with both limits off) the verdict is had without waiting.
  const verdict = ctx.limiter.checkNow(client.address, login) ?? (await ctx.limiter.check(client.address, login));
  if (verdict.locked) {
    log.warn({ login, client: client.address, scope: verdict.scope, ipFailures: verdict.ipFailures, loginFailures: verdict.loginFailures }, 'login refused: too many failures');
    return done(ctx, protocol, started, { ok: false, kind: 'locked', message: 'too many failed logins' });
  }
  if (!validCredentials(login, password)) {
    log.info({ client: client.address }, 'login refused: malformed credentials');
    return failAuth(ctx, protocol, started, client, login, 'malformed credentials');
  }

  let user: UserRecord;
  try {
    user = await ctx.directory.authenticate(login, password);
  } catch (err) {
    if (err instanceof AuthError) {
      log.info({ login, client: client.address }, 'login failed: bad credentials');
      return failAuth(ctx, protocol, started, client, login, 'authentication failed');
    }
    log.warn({ login, err: (err as Error).message, code: errorCode(err) }, 'login failed: directory unavailable');
    return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'directory unavailable' });
  }
  // The session's logger is lazy (its pino child is made only when a line is written); the
  // lines below, none of which a successful login writes, add the user (and pair) to it.

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
        log.with({ user: user.uid }).info('login held: user move in progress');
      }
      if (Date.now() + 200 >= deadline) {
        log.with({ user: user.uid }).warn('login failed: user move still in progress after the hold bound');
        return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'user move in progress' });
      }
      await sleep(200);
    }
  }

  let pair: PairRecord;
  try {
    pair = (await ctx.directory.routeFor(user)).pair;
  } catch (err) {
    log
      .with({ user: user.uid })
      .warn({ err: (err as Error).message, code: errorCode(err) }, err instanceof NotFoundError ? 'login failed: user has no usable home pair' : 'login failed: route lookup failed');
    return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'no route' });
  }

  if (!inList(ctx.trustedBackends, pair.address)) {
    log.with({ user: user.uid, pair: pair.id }).error({ address: pair.address }, 'pair address is outside backend.trustedNetworks: master login refused');
    return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'pair not trusted' });
  }
  // The client may have left during the directory bind or the route lookup: nothing to log in for.
  if (!ctx.sessions.has(req.session)) return { ok: false, kind: 'temp', message: 'client went away' };
  if (!ctx.sessions.bindUser(req.session, user.uid, ctx.config.limits.maxSessionsPerUser)) {
    log.with({ user: user.uid, pair: pair.id }).warn({ cap: ctx.config.limits.maxSessionsPerUser }, 'login refused: too many sessions for this user');
    return done(ctx, protocol, started, { ok: false, kind: 'limit', message: 'too many sessions' });
  }

  const holdDeadline = started + ctx.config.hold.maxMs;
  const ep = { host: pair.address, port: protocol === 'imap' ? (pair.ports.imap ?? 143) : (pair.ports.pop3 ?? 110) };
  const backendCfg = ctx.config.backend;
  const opts = {
    uid: user.uid,
    masterUser: backendCfg.masterUser,
    masterSecret: backendCfg.masterSecret,
    client: backendCfg.forwardClientAddress ? client : undefined,
    timeoutMs: backendCfg.loginTimeoutMs,
  };
  let held = false;
  let holdStart = 0;
  for (let attempt = 1; ; attempt++) {
    const st = ctx.pairHealth.state(pair.id);
    if (!held && (st === 'failing-over' || (st === 'unknown' && attempt > 1))) {
      held = true;
      holdStart = Date.now();
      ctx.metrics.heldLogins.inc({ pair: pair.id });
      log.with({ user: user.uid, pair: pair.id }).info({ state: st }, 'login held: waiting for the pair');
    }
    if (st !== 'ok' && st !== 'degraded') {
      try {
        await ctx.pairHealth.awaitServable(pair, Math.max(0, holdDeadline - Date.now()));
      } catch (err) {
        log.with({ user: user.uid, pair: pair.id }).warn({ err: (err as Error).message, attempt }, 'login failed: pair not serving');
        ctx.sessions.unbindUser(req.session);
        return done(ctx, protocol, started, { ok: false, kind: 'temp', message: (err as Error).message });
      }
    } else ctx.pairHealth.track(pair);
    try {
      const backend = await connectAndLogin(protocol, ep, backendCfg.connectTimeoutMs, opts);
      if (held) ctx.metrics.heldSeconds.observe({ pair: pair.id }, (Date.now() - holdStart) / 1000);
      req.session.pair = pair.id;
      return done(ctx, protocol, started, { ok: true, backend, user, pair, held });
    } catch (err) {
      ctx.metrics.backendConnectFailures.inc({ pair: pair.id });
      const plog = log.with({ user: user.uid, pair: pair.id });
      if (err instanceof AuthError) {
        plog.error({ err: err.message }, 'pair refused the master login (check backend.masterUser/masterSecret and the pair trusted networks)');
        ctx.sessions.unbindUser(req.session);
        return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'backend login refused' });
      }
      const retryMs = ctx.config.hold.retryMs;
      if (Date.now() + retryMs >= holdDeadline || !(err instanceof UnavailableError || errorCode(err) === 'TIMEOUT')) {
        plog.warn({ err: (err as Error).message, attempt }, 'login failed: cannot reach the pair');
        ctx.sessions.unbindUser(req.session);
        return done(ctx, protocol, started, { ok: false, kind: 'temp', message: 'pair unreachable' });
      }
      if (!ctx.sessions.has(req.session)) {
        // The client left while the login was held: no more attempts for it.
        plog.info({ err: (err as Error).message, attempt }, 'login abandoned: the client went away while it was held');
        ctx.sessions.unbindUser(req.session);
        return { ok: false, kind: 'temp', message: 'client went away' };
      }
      plog.info({ err: (err as Error).message, attempt }, 'backend connect failed; retrying within the hold bound');
      if (!held) {
        held = true;
        holdStart = Date.now();
        ctx.metrics.heldLogins.inc({ pair: pair.id });
        plog.info({ state: ctx.pairHealth.state(pair.id) }, 'login held: waiting for the pair');
      }
      await sleep(retryMs);
    }
  }
}
