/**
 * Every refusal the SMTP front ends make, in one table: reason -> code, enhanced status code
 * (RFC 3463) and text. Handlers return or throw `SmtpReply` values built here; the reason is
 * also the `reason` label of pairgate_smtp_rejects_total.
 */

export class SmtpReply extends Error {
  constructor(
    readonly responseCode: number,
    readonly enhanced: string,
    readonly text: string,
    readonly reason: string,
  ) {
    // smtp-server writes `<code> <message>`; the connection wrapper (server.ts) keeps an
    // enhanced code already at the start of the message instead of adding its own.
    super(`${enhanced} ${text}`);
  }

  get temporary(): boolean {
    return this.responseCode >= 400 && this.responseCode < 500;
  }
}

export const REPLIES = {
  unknownRecipient: () => new SmtpReply(550, '5.1.1', 'Recipient address rejected: no such user here', 'unknown-recipient'),
  relayDenied: () => new SmtpReply(550, '5.7.1', 'Relay access denied', 'relay-denied'),
  pairDown: (pair: string) => new SmtpReply(451, '4.3.2', `Mailbox server for this recipient is unavailable (${pair}), try again later`, 'pair-down'),
  routeBroken: () => new SmtpReply(451, '4.3.5', 'Recipient routing misconfigured, try again later', 'route'),
  directoryDown: () => new SmtpReply(451, '4.4.3', 'Directory unavailable, try again later', 'directory'),
  authRequired: () => new SmtpReply(530, '5.7.0', 'Authentication required', 'auth-required'),
  senderNotOwned: () => new SmtpReply(553, '5.7.1', 'Sender address not owned by the authenticated user', 'sender-not-owned'),
  tooBig: (max: number) => new SmtpReply(552, '5.3.4', `Message exceeds fixed maximum message size ${max}`, 'too-big'),
  authFailed: () => new SmtpReply(535, '5.7.8', 'Authentication credentials invalid', 'auth-failed'),
  authThrottled: () => new SmtpReply(454, '4.7.0', 'Too many failed logins, try again later', 'auth-throttled'),
  authTemp: () => new SmtpReply(454, '4.7.0', 'Temporary authentication failure, try again later', 'auth-temp'),
  authBadInput: () => new SmtpReply(535, '5.7.8', 'Authentication credentials invalid', 'auth-bad-input'),
  stopping: () => new SmtpReply(421, '4.3.2', 'Service shutting down, try again later', 'stopping'),
  deliveryTemp: (enhanced: string, id: string) =>
    new SmtpReply(451, enhanced, `Temporary failure delivering to some recipients, try again later (delivery ${id}; recipients that got it already will not get it twice)`, 'delivery-temp'),
  deliveryFailed: (code: number, enhanced: string, text: string) => new SmtpReply(code, enhanced, text, 'delivery-failed'),
  relayTemp: () => new SmtpReply(451, '4.4.1', 'Smarthost unavailable, try again later', 'relay-temp'),
} as const;

/** `4.2.2 Mailbox full` -> { enhanced: '4.2.2', text: 'Mailbox full' } (enhanced absent: derived from the code class). */
export function splitEnhanced(code: number, text: string): { enhanced: string; text: string } {
  const m = /^([245]\.\d{1,3}\.\d{1,3})\s+(.*)$/s.exec(text.trim());
  if (m) return { enhanced: m[1]!, text: m[2]! };
  return { enhanced: code >= 500 ? '5.0.0' : code >= 400 ? '4.0.0' : '2.0.0', text: text.trim() };
}
