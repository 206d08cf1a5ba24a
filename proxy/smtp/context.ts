/**
 * What the SMTP front ends share (config, directory, pair health, limits, metrics, the
 * delivery options) and the per-session state pairgate keeps on smtp-server's session object.
 */
import type { SMTPServerSession } from 'smtp-server';
import type { Logger } from '../../common/log.ts';
import type { Directory, UserRecord } from '../../directory/types.ts';
import type { SmtpConfig } from './config.ts';
import type { DeliveryOptions, LocalRecipient, PairHealthLike } from './delivery.ts';
import type { Smarthost } from './relay.ts';
import type { SmtpMetrics } from './metrics.ts';
import type { SmtpReply } from './replies.ts';

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

export interface Transaction {
  local: Map<string, LocalRecipient>;
  relay: Set<string>;
}

export interface PgSession extends SMTPServerSession {
  pgUser?: UserRecord;
  pgMessages?: number;
  pgBytes?: number;
  pgTx?: Transaction;
}

export function tx(session: SMTPServerSession): Transaction {
  const s = session as PgSession;
  // A new transaction starts at MAIL FROM (smtp-server resets the envelope after each message).
  if (!s.pgTx) s.pgTx = { local: new Map(), relay: new Set() };
  return s.pgTx;
}

export function domainOf(address: string): string {
  const at = address.lastIndexOf('@');
  return at < 0 ? '' : address.slice(at + 1).toLowerCase();
}

export const CONTROL = /[\x00-\x1f\x7f]/;

/** Counts a refusal under its reason and hands it back (to throw or pass to a callback). */
export function rejectWith(ctx: FrontEndContext, r: SmtpReply): SmtpReply {
  ctx.metrics.rejects.inc({ reason: r.reason });
  return r;
}
