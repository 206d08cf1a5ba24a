/**
 * After DATA: one LMTP delivery per involved pair, in parallel, each holding (bounded) while
 * its pair fails over or right after a connect failed; then one SMTP reply for the message.
 *
 * The message carries `X-Pairgate-Delivery-Id: <id>` where the id is a digest of the sender
 * and the message as received (any such header from outside removed first). A sender's
 * retry of the same message gets the same id, so a pair that accepted it the first time
 * stores it once (the store dedups on the id); recipients are rewritten to `<uid>@<pair-id>`.
 */
import { createHash } from 'node:crypto';
import { UnavailableError, isTemporary } from '../../common/errors.ts';
import type { Logger } from '../../common/log.ts';
import type { PairRecord, UserRecord } from '../../directory/types.ts';
import type { LmtpPool, LmtpReply } from './lmtp-client.ts';
import { REPLIES, SmtpReply } from './replies.ts';

export const DELIVERY_ID_HEADER = 'X-Pairgate-Delivery-Id';

export interface PairHealthLike {
  awaitServable(pair: PairRecord, timeoutMs: number): Promise<void>;
}

export interface LocalRecipient {
  /** The address as the client gave it. */
  address: string;
  user: UserRecord;
  pair: PairRecord;
}

export interface RecipientOutcome {
  address: string;
  pair: string | null;
  reply: LmtpReply;
}

/** A bound on concurrent LMTP connections per pair, waits for a slot bounded in time. */
export class PairSlots {
  private readonly used = new Map<string, number>();
  private readonly waiting = new Map<string, Array<() => void>>();

  constructor(private readonly max: number) {}

  /** Resolves with a release function, or null when no slot came free within timeoutMs. */
  async acquire(pair: string, timeoutMs: number): Promise<(() => void) | null> {
    if (this.max <= 0) return () => undefined;
    if ((this.used.get(pair) ?? 0) < this.max) return this.take(pair);
    const q = this.waiting.get(pair) ?? [];
    this.waiting.set(pair, q);
    const got = await new Promise<boolean>((resolve) => {
      const wake = () => {
        clearTimeout(t);
        resolve(true);
      };
      const t = setTimeout(() => {
        const i = q.indexOf(wake);
        if (i >= 0) q.splice(i, 1);
        resolve(false);
      }, timeoutMs);
      q.push(wake);
    });
    return got ? this.take(pair) : null;
  }

  private take(pair: string): () => void {
    this.used.set(pair, (this.used.get(pair) ?? 0) + 1);
    let done = false;
    return () => {
      if (done) return;
      done = true;
      const n = (this.used.get(pair) ?? 1) - 1;
      if (n <= 0) this.used.delete(pair);
      else this.used.set(pair, n);
      this.waiting.get(pair)?.shift()?.();
    };
  }

  inUse(pair: string): number {
    return this.used.get(pair) ?? 0;
  }
}

export interface DeliveryOptions {
  /** Concurrent LMTP connections per pair (shared by all sessions of this proxy). */
  slots: PairSlots;
  /** LMTP connections kept open between messages. */
  pool: LmtpPool;
  name: string;
  lmtpPort: number;
  connectTimeoutMs: number;
  replyTimeoutMs: number;
  holdMs: number;
  retryMs: number;
  forwardClientAddress: boolean;
}

/** Removes every `X-Pairgate-Delivery-Id` header (with continuation lines) from the header block. */
export function stripDeliveryIdHeaders(message: Buffer): Buffer {
  let end = message.indexOf('\r\n\r\n');
  let sepLen = 4;
  if (end < 0 || (message.indexOf('\n\n') >= 0 && message.indexOf('\n\n') < end)) {
    end = message.indexOf('\n\n');
    sepLen = 2;
  }
  const headEnd = end < 0 ? message.length : end + sepLen;
  const head = message.subarray(0, headEnd).toString('latin1');
  if (!/^x-pairgate-delivery-id:/im.test(head)) return message;
  const lines = head.split(/(?<=\n)/);
  const kept: string[] = [];
  let dropping = false;
  for (const l of lines) {
    if (/^[ \t]/.test(l) && dropping) continue;
    dropping = /^x-pairgate-delivery-id:/i.test(l);
    if (!dropping) kept.push(l);
  }
  return Buffer.concat([Buffer.from(kept.join(''), 'latin1'), message.subarray(headEnd)]);
}

/** Stable per message: the same sender and bytes give the same id (a retry), anything else another. */
export function deliveryIdFor(from: string, message: Buffer): string {
  const h = createHash('sha256');
  h.update(`${from.toLowerCase()}\0`);
  h.update(message);
  return `pg1-${h.digest('hex').slice(0, 40)}`;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

function temp(enhanced: string, text: string): LmtpReply {
  return { code: 451, enhanced, text };
}

/** Delivers to one pair, holding while it is failing over or its LMTP port refuses, up to holdMs. */
export async function deliverToPair(
  pair: PairRecord,
  rcpts: LocalRecipient[],
  from: string,
  body: Buffer,
  client: { address: string; port: number; helo?: string | undefined },
  health: PairHealthLike,
  opts: DeliveryOptions,
  log: Logger,
): Promise<RecipientOutcome[]> {
  const deadline = Date.now() + opts.holdMs;
  const all = (reply: LmtpReply) => rcpts.map((r) => ({ address: r.address, pair: pair.id, reply }));
  let attempt = 0;
  for (;;) {
    attempt++;
    try {
      await health.awaitServable(pair, Math.max(0, deadline - Date.now()));
    } catch (err) {
      log.warn({ pair: pair.id, err: (err as Error).message }, 'pair not servable: delivery deferred');
      return all(temp('4.3.2', `Mailbox server ${pair.id} unavailable`));
    }
    const release = await opts.slots.acquire(pair.id, Math.max(0, deadline - Date.now()));
    if (!release) {
      log.warn({ pair: pair.id, inUse: opts.slots.inUse(pair.id) }, 'no LMTP connection slot for the pair within the hold time');
      return all(temp('4.3.2', `Mailbox server ${pair.id} busy`));
    }
    try {
      const results = await opts.pool.deliver({
        host: pair.address,
        port: pair.ports.lmtp ?? opts.lmtpPort,
        name: opts.name,
        from,
        recipients: rcpts.map((r) => `${r.user.uid}@${pair.id}`),
        body,
        client: opts.forwardClientAddress ? client : undefined,
        connectTimeoutMs: opts.connectTimeoutMs,
        replyTimeoutMs: opts.replyTimeoutMs,
      });
      return results.map((res, i) => ({ address: rcpts[i]!.address, pair: pair.id, reply: res.reply }));
    } catch (err) {
      const left = deadline - Date.now();
      // Connection-level failure: retry while the hold lasts (the pair may be moving its address).
      if (isTemporary(err) && left > opts.retryMs) {
        log.info({ pair: pair.id, attempt, err: (err as Error).message }, 'LMTP delivery failed; holding and retrying');
        release();
        await sleep(opts.retryMs);
        continue;
      }
      log.warn({ pair: pair.id, attempt, err: (err as Error).message }, 'LMTP delivery failed');
      return all(temp(err instanceof UnavailableError ? '4.4.1' : '4.4.2', `No answer from mailbox server ${pair.id}`));
    } finally {
      release();
    }
  }
}

export interface MessageVerdict {
  /** null = accept (250). */
  error: SmtpReply | null;
  accepted: number;
  temporary: number;
  permanent: number;
}

/**
 * One SMTP reply from per-recipient outcomes: any temporary failure -> 451 for the message
 * (the retry is idempotent where it was accepted); all failed permanently -> that failure
 * (552 when they were all over quota); otherwise 250, with the permanent failures returned
 * to the sender as a bounce (bounce.ts), since the reply after DATA cannot name recipients.
 */
export function verdictFor(outcomes: RecipientOutcome[], deliveryId: string): MessageVerdict {
  const ok = outcomes.filter((o) => o.reply.code >= 200 && o.reply.code < 300);
  const tmp = outcomes.filter((o) => o.reply.code >= 400 && o.reply.code < 500);
  const perm = outcomes.filter((o) => o.reply.code >= 500);
  const v = { accepted: ok.length, temporary: tmp.length, permanent: perm.length };
  if (tmp.length) return { ...v, error: REPLIES.deliveryTemp(tmp[0]!.reply.enhanced.startsWith('4.') ? tmp[0]!.reply.enhanced : '4.3.0', deliveryId) };
  if (perm.length && !ok.length) {
    const quota = perm.every((o) => o.reply.code === 552);
    const first = perm[0]!.reply;
    return {
      ...v,
      error: quota
        ? REPLIES.deliveryFailed(552, first.enhanced.startsWith('5.') ? first.enhanced : '5.2.2', 'Mailbox full')
        : REPLIES.deliveryFailed(550, first.enhanced.startsWith('5.') ? first.enhanced : '5.0.0', `Delivery failed: ${first.text}`.slice(0, 200)),
    };
  }
  return { ...v, error: null };
}
