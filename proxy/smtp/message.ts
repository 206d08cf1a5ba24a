/**
 * After DATA: the message gets its delivery id and Received header, goes to every involved pair
 * over LMTP in parallel (delivery.ts) and to the smarthost for relayed recipients (relay.ts);
 * one SMTP reply comes back (verdictFor), and recipients that refused an accepted message
 * permanently are bounced to the sender (bounce.ts).
 */
import type { Logger } from '../../common/log.ts';
import type { PairRecord } from '../../directory/types.ts';
import type { SmtpListenerConfig } from './config.ts';
import { tx, type FrontEndContext, type PgSession } from './context.ts';
import { deliverToPair, deliveryIdFor, stripDeliveryIdHeaders, verdictFor, DELIVERY_ID_HEADER, type LocalRecipient, type RecipientOutcome } from './delivery.ts';
import { holdForUserMoves } from './recipients.ts';
import { buildBounce } from './bounce.ts';
import type { SmtpReply } from './replies.ts';

function received(ctx: FrontEndContext, session: PgSession): string {
  const helo = (session.hostNameAppearsAs || 'unknown').replace(/[^\w.\-[\]:]/g, '');
  const proto = `${session.transmissionType ?? 'ESMTP'}`;
  const date = new Date().toUTCString().replace('GMT', '+0000');
  return `Received: from ${helo} ([${session.remoteAddress}])\r\n\tby ${ctx.config.hostname} (pairgate) with ${proto} id ${session.id};\r\n\t${date}\r\n`;
}

/** Delivers a message after DATA; a string is the 250 text, an SmtpReply the refusal. */
export async function deliverMessage(ctx: FrontEndContext, kind: SmtpListenerConfig['kind'], session: PgSession, raw: Buffer, log: Logger): Promise<string | SmtpReply> {
  const t = tx(session);
  session.pgMessages = (session.pgMessages ?? 0) + 1;
  session.pgBytes = (session.pgBytes ?? 0) + raw.length;
  const from = session.envelope.mailFrom ? session.envelope.mailFrom.address : '';
  const original = stripDeliveryIdHeaders(raw);
  const id = deliveryIdFor(from, original);
  const slog = log.child({ cid: session.id, deliveryId: id });
  const rcv = received(ctx, session);
  const forPairs = Buffer.concat([Buffer.from(`${DELIVERY_ID_HEADER}: ${id}\r\n${rcv}`, 'latin1'), original]);
  const client = { address: session.remoteAddress, port: session.remotePort, helo: session.hostNameAppearsAs || undefined };
  const byPair = new Map<string, { pair: PairRecord; rcpts: LocalRecipient[] }>();
  const moving = await holdForUserMoves(ctx, [...t.local.values()], slog);
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
    if (from) void sendBounce(ctx, from, failed, original, id, slog);
    else ctx.metrics.bounces.inc({ result: 'null-sender' });
  } else slog.info(summary, 'message delivered');
  return `2.0.0 Ok: delivered as ${id}`;
}

/** Returns permanent per-recipient failures to the sender (null sender, so no bounce loops). */
async function sendBounce(ctx: FrontEndContext, sender: string, failed: RecipientOutcome[], original: Buffer, id: string, slog: Logger): Promise<void> {
  const dsn = buildBounce({ hostname: ctx.config.hostname, sender, failed, original, deliveryId: id, arrival: new Date() });
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
