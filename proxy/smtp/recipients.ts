/**
 * Recipients: at RCPT, who they are (directory), where they live (home pair) and whether that
 * pair can take mail now; after DATA, the hold for users being moved between pairs.
 */
import { NotFoundError, UnavailableError } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import { keys } from '../../common/redis-bus.ts';
import type { PairRecord, UserRecord } from '../../directory/types.ts';
import type { SmtpListenerConfig } from './config.ts';
import { domainOf, rejectWith, type FrontEndContext } from './context.ts';
import type { LocalRecipient } from './delivery.ts';
import { REPLIES, type SmtpReply } from './replies.ts';

/**
 * Resolves one RCPT: a local recipient with its home pair, `relay` (submission with a
 * smarthost), or throws the refusal (SmtpReply, already counted).
 */
export async function resolveRecipient(ctx: FrontEndContext, kind: SmtpListenerConfig['kind'], address: string, log: Logger): Promise<LocalRecipient | 'relay'> {
const submission = kind === 'submission';
const localDomains = new Set(ctx.config.localDomains.map((d) => d.toLowerCase()));
const reject = (r: SmtpReply) => rejectWith(ctx, r);
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
    await ctx.pairHealth.awaitServable(pair, ctx.config.delivery.rcptWaitMs);
  } catch (err) {
    const state = err instanceof UnavailableError ? (err.details.state as string | undefined) : undefined;
    // Failing over (or not heard of yet): accept; the delivery after DATA holds for it.
    if (state !== 'failing-over' && state !== 'unknown') throw reject(REPLIES.pairDown(pair.id));
  }
  return { address, user, pair };
}

/**
 * While `pairgate user move` copies a user's last changes (Redis `pairgate:usermove:<uid>`),
 * deliveries to that user wait (bounded by the hold time); once the move is done the route is
 * looked up again, since the home pair has changed. Still moving at the bound: 451.
 */
export async function holdForUserMoves(ctx: FrontEndContext, rcpts: LocalRecipient[], slog: Logger): Promise<{ ready: LocalRecipient[]; blocked: LocalRecipient[] }> {
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
