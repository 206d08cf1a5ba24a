/**
 * Delivery status notifications (RFC 3464) for recipients that refused a message permanently
 * after DATA while others accepted it: the SMTP reply after DATA is one for the whole message,
 * so the failures go back to the sender as a bounce from the null sender, delivered like any
 * other mail (the sender's home pair over LMTP when local, else the smarthost).
 */
import { randomBytes } from 'node:crypto';
import type { RecipientOutcome } from './delivery.ts';

const MAX_RETURNED_HEADER_BYTES = 64 * 1024;

function headerBlock(message: Buffer): string {
  let end = message.indexOf('\r\n\r\n');
  if (end < 0) end = message.indexOf('\n\n');
  const head = message.subarray(0, end < 0 ? Math.min(message.length, MAX_RETURNED_HEADER_BYTES) : Math.min(end, MAX_RETURNED_HEADER_BYTES));
  return head.toString('latin1').replace(/\r?\n/g, '\r\n');
}

/** Text safe to put in a header or report field: one line, printable ASCII. */
function clean(s: string, max = 300): string {
  return s.replace(/[^\x20-\x7e]/g, ' ').slice(0, max);
}

export function buildBounce(opts: { hostname: string; sender: string; failed: RecipientOutcome[]; original: Buffer; deliveryId: string; arrival: Date }): Buffer {
  const boundary = `pg-${randomBytes(8).toString('hex')}`;
  const date = new Date().toUTCString().replace('GMT', '+0000');
  const lines = opts.failed.map((f) => `  <${clean(f.address)}>: ${f.reply.code} ${f.reply.enhanced} ${clean(f.reply.text)}`);
  const perRcpt = opts.failed
    .map((f) => [`Final-Recipient: rfc822; ${clean(f.address)}`, 'Action: failed', `Status: ${f.reply.enhanced}`, `Diagnostic-Code: smtp; ${f.reply.code} ${f.reply.enhanced} ${clean(f.reply.text)}`].join('\r\n'))
    .join('\r\n\r\n');
  const text = [
    `From: Mail Delivery System <MAILER-DAEMON@${opts.hostname}>`,
    `To: <${clean(opts.sender)}>`,
    'Subject: Undelivered Mail Returned to Sender',
    `Date: ${date}`,
    `Message-ID: <${opts.deliveryId}.${randomBytes(4).toString('hex')}@${opts.hostname}>`,
    'Auto-Submitted: auto-replied',
    'MIME-Version: 1.0',
    `Content-Type: multipart/report; report-type=delivery-status; boundary="${boundary}"`,
    '',
    `--${boundary}`,
    'Content-Type: text/plain; charset=us-ascii',
    '',
    `This is the mail system at ${opts.hostname}.`,
    '',
    'Your message was delivered to its other recipients, but could not be delivered to:',
    '',
    ...lines,
    '',
    `--${boundary}`,
    'Content-Type: message/delivery-status',
    '',
    `Reporting-MTA: dns; ${opts.hostname}`,
    `X-Pairgate-Original-Delivery-Id: ${opts.deliveryId}`,
    `Arrival-Date: ${opts.arrival.toUTCString().replace('GMT', '+0000')}`,
    '',
    perRcpt,
    '',
    `--${boundary}`,
    'Content-Type: text/rfc822-headers',
    '',
    headerBlock(opts.original),
    '',
    `--${boundary}--`,
    '',
  ].join('\r\n');
  return Buffer.from(text, 'latin1');
}
