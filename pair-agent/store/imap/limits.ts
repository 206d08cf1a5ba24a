/**
 * Every bound of the IMAP engine in one place (after imapflow's lib/handler/limits.js): a peer
 * can never make the server hold more than these, and each one is reported as a BAD or a BYE
 * with a reason rather than a crash. Explicit zeros are kept as values by `normalizeLimits`
 * (where zero means something; a zero that would make the server unusable is refused).
 */
export interface ImapLimits {
  /** One command line (without literals), bytes. Dovecot's imap_max_line_length is 64 KiB. */
  maxLineBytes: number;
  /** One literal ({n} or {n+}), bytes: the largest message APPEND takes. */
  maxLiteralBytes: number;
  /** All literals and lines of one command together, bytes. */
  maxCommandBytes: number;
  /** Literals in one command. */
  maxLiterals: number;
  /** Commands read ahead of the one being executed before the socket is paused. */
  maxPipelined: number;
  /** Consecutive BAD responses before the session is closed with BYE. */
  maxBadCommands: number;
  /** Nesting depth of parenthesised lists. */
  maxListDepth: number;
  /** Bytes buffered for writing before a handler waits for the socket to drain. */
  maxWriteBufferBytes: number;
  /** Concurrent sessions of one user on this server. */
  maxSessionsPerUser: number;
  /** Failed logins (LOGIN, AUTHENTICATE) on one connection before it is closed with BYE. */
  maxAuthFailures: number;
  /**
   * Inactivity before login, ms (the shorter of this and the autologout time applies; 0 = no
   * separate bound). RFC 3501's 30-minute minimum is for authenticated sessions; Dovecot's login
   * processes give 3 minutes.
   */
  preLoginIdleMs: number;
}

export const DEFAULT_LIMITS: ImapLimits = {
  maxLineBytes: 64 * 1024,
  maxLiteralBytes: 64 * 1024 * 1024,
  maxCommandBytes: 80 * 1024 * 1024,
  maxLiterals: 64,
  maxPipelined: 64,
  maxBadCommands: 10,
  maxListDepth: 16,
  maxWriteBufferBytes: 1024 * 1024,
  maxSessionsPerUser: 50,
  maxAuthFailures: 3,
  preLoginIdleMs: 3 * 60_000,
};

/**
 * Bounds that cannot be zero: with maxPipelined 0 a session pauses its socket after the first
 * command and never resumes it (every session hangs), and a zero line, command or list bound
 * refuses every command. Refused at start, naming the key, instead.
 */
const AT_LEAST_ONE: ReadonlySet<keyof ImapLimits> = new Set(['maxPipelined', 'maxLineBytes', 'maxCommandBytes', 'maxListDepth']);

export function normalizeLimits(partial: Partial<ImapLimits> = {}): ImapLimits {
  const out = { ...DEFAULT_LIMITS };
  for (const [k, v] of Object.entries(partial) as Array<[keyof ImapLimits, number | undefined]>) {
    if (v === undefined) continue;
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`imap limit ${k} must be a non-negative integer, got ${v}`);
    if (v === 0 && AT_LEAST_ONE.has(k)) throw new RangeError(`imap limit ${k} must be at least 1, got 0`);
    out[k] = v;
  }
  return out;
}
