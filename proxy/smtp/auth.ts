/**
 * AUTH on submission: PLAIN or LOGIN, checked by a bind in the directory, with the failed-login
 * limits shared by the whole proxy tier (a growing delay, then a temporary lock per client
 * address and per login). Input with control characters never reaches the directory.
 */
import type { SMTPServerAuthentication, SMTPServerSession } from 'smtp-server';
import { AuthError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { UserRecord } from '../../directory/types.ts';
import type { SmtpListenerConfig } from './config.ts';
import { CONTROL, rejectWith, type FrontEndContext } from './context.ts';
import { REPLIES, type SmtpReply } from './replies.ts';

/** The user on success, else the refusal (counted). */
export async function checkAuth(ctx: FrontEndContext, kind: SmtpListenerConfig['kind'], auth: SMTPServerAuthentication, session: SMTPServerSession, log: Logger): Promise<UserRecord | SmtpReply> {
  const submission = kind === 'submission';
  const reject = (r: SmtpReply) => rejectWith(ctx, r);
  const ip = session.remoteAddress;
  const login = auth.username ?? '';
  const password = auth.password ?? '';
  if (!submission || (auth.method !== 'PLAIN' && auth.method !== 'LOGIN')) return reject(REPLIES.authFailed());
  if (!login || login.length > 256 || CONTROL.test(login) || password.length > 1024 || /[\0\r\n]/.test(password) || (auth.authzid && auth.authzid !== login)) {
    ctx.metrics.logins.inc({ protocol: 'smtp', result: 'auth' });
    const delay = await ctx.limiter.fail(ip, login.slice(0, 256));
    await new Promise((r) => setTimeout(r, delay));
    return reject(REPLIES.authBadInput());
  }
  const verdict = await ctx.limiter.check(ip, login);
  if (verdict.locked) {
    ctx.metrics.logins.inc({ protocol: 'smtp', result: 'locked' });
    log.warn({ client: ip, user: login, scope: verdict.scope }, 'AUTH refused: too many failures');
    return reject(REPLIES.authThrottled());
  }
  try {
    const user = await ctx.directory.authenticate(login, password);
    ctx.metrics.logins.inc({ protocol: 'smtp', result: 'ok' });
    log.info({ cid: session.id, client: ip, user: user.uid }, 'authenticated');
    return user;
  } catch (err) {
    if (err instanceof AuthError) {
      ctx.metrics.logins.inc({ protocol: 'smtp', result: 'auth' });
      const delay = await ctx.limiter.fail(ip, login);
      log.info({ cid: session.id, client: ip, user: login, delayMs: delay }, 'AUTH failed');
      await new Promise((r) => setTimeout(r, delay));
      return reject(REPLIES.authFailed());
    }
    ctx.metrics.logins.inc({ protocol: 'smtp', result: 'temp' });
    log.warn({ client: ip, err: (err as Error).message }, 'AUTH could not be checked');
    return reject(REPLIES.authTemp());
  }
}
