/**
 * Submission's outbound path: non-local recipients go to the configured smarthost through
 * nodemailer's SMTP transport (pooled connections), the smarthost's per-recipient answers
 * mapped back to outcomes like the LMTP ones.
 */
import nodemailer from 'nodemailer';
import type { Logger } from '../../common/log.ts';
import type { SmtpConfig } from './config.ts';
import type { RecipientOutcome } from './delivery.ts';
import { splitEnhanced } from './replies.ts';

export interface Smarthost {
  send(from: string, recipients: string[], message: Buffer): Promise<RecipientOutcome[]>;
  close(): void;
}

interface SmtpError extends Error {
  responseCode?: number;
  response?: string;
  rejected?: string[];
  rejectedErrors?: SmtpError[];
  recipient?: string;
}

function replyOf(err: SmtpError | undefined): { code: number; enhanced: string; text: string } {
  const code = err?.responseCode ?? 451;
  const raw = (err?.response ?? '').replace(/^\d{3}[ -]/, '') || (err?.message ?? 'relay failed');
  if (!err?.responseCode) return { code: 451, enhanced: '4.4.1', text: 'Smarthost unavailable' };
  return { code, ...splitEnhanced(code, raw) };
}

export function createSmarthost(cfg: NonNullable<SmtpConfig['smarthost']>, name: string, log: Logger): Smarthost {
  const transport = nodemailer.createTransport({
    host: cfg.host,
    port: cfg.port,
    secure: cfg.secure,
    requireTLS: cfg.requireTls,
    tls: { rejectUnauthorized: cfg.verifyTls },
    name,
    pool: true,
    maxConnections: 5,
    connectionTimeout: cfg.timeoutMs,
    greetingTimeout: cfg.timeoutMs,
    socketTimeout: cfg.timeoutMs,
    ...(cfg.user ? { auth: { user: cfg.user, pass: cfg.pass ?? '' } } : {}),
  });
  return {
    async send(from, recipients, message) {
      try {
        const info = await transport.sendMail({ envelope: { from, to: recipients }, raw: message });
        const rejected = new Map<string, SmtpError>();
        for (const e of (info as unknown as { rejectedErrors?: SmtpError[] }).rejectedErrors ?? []) if (e.recipient) rejected.set(e.recipient, e);
        const rejectedList = new Set((info.rejected ?? []).map((r) => String(r)));
        return recipients.map((address) => {
          if (!rejectedList.has(address)) return { address, pair: null, reply: { code: 250, enhanced: '2.0.0', text: 'relayed' } };
          return { address, pair: null, reply: replyOf(rejected.get(address)) };
        });
      } catch (err) {
        const e = err as SmtpError;
        log.warn({ smarthost: `${cfg.host}:${cfg.port}`, err: e.message, code: e.responseCode }, 'relay through the smarthost failed');
        const perRcpt = new Map<string, SmtpError>();
        for (const r of e.rejectedErrors ?? []) if (r.recipient) perRcpt.set(r.recipient, r);
        return recipients.map((address) => ({ address, pair: null, reply: replyOf(perRcpt.get(address) ?? e) }));
      }
    },
    close() {
      transport.close();
    },
  };
}
