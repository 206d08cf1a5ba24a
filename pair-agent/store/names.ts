/** Validation of user and mailbox names, and flag normalisation, shared by the store and its servers. */
import { BadInputError } from '../../common/errors.ts';
import type { Flag, SpecialUse } from './types.ts';

export const MAILBOX_DELIMITER = '/';
export const MAX_MAILBOX_BYTES = 512;
export const MAX_USER_BYTES = 128;
export const MAX_FLAGS = 64;
export const MAX_FLAG_BYTES = 128;

export const DEFAULT_MAILBOXES: Array<{ name: string; specialUse?: SpecialUse }> = [
  { name: 'INBOX' },
  { name: 'Sent', specialUse: '\\Sent' },
  { name: 'Drafts', specialUse: '\\Drafts' },
  { name: 'Trash', specialUse: '\\Trash' },
  { name: 'Junk', specialUse: '\\Junk' },
  { name: 'Archive', specialUse: '\\Archive' },
];

const USER_RE = /^[A-Za-z0-9][A-Za-z0-9._+=@-]*$/;

/** A store user is a login uid: letters, digits and `._+=@-`, at most 128 bytes. */
export function checkUser(user: string): string {
  if (typeof user !== 'string' || !user || Buffer.byteLength(user) > MAX_USER_BYTES || !USER_RE.test(user)) {
    throw new BadInputError(`invalid user name ${JSON.stringify(String(user).slice(0, 64))}`);
  }
  return user;
}

/**
 * Normalises a mailbox name (INBOX in any case is INBOX) and refuses names with control
 * characters, IMAP wildcards, empty or dot-only hierarchy levels (path tricks), or over 512 bytes.
 */
export function checkMailbox(name: string): string {
  if (typeof name !== 'string' || !name) throw new BadInputError('empty mailbox name');
  if (Buffer.byteLength(name) > MAX_MAILBOX_BYTES) throw new BadInputError('mailbox name too long');
  if (/[\u0000-\u001f\u007f*%]/.test(name)) throw new BadInputError('mailbox name has invalid characters');
  const up = name.toUpperCase();
  if (up === 'INBOX') return 'INBOX';
  if (up.startsWith('INBOX' + MAILBOX_DELIMITER)) name = 'INBOX' + name.slice(5);
  for (const part of name.split(MAILBOX_DELIMITER)) {
    if (part === '' || part === '.' || part === '..') throw new BadInputError(`invalid mailbox name ${JSON.stringify(name)}`);
  }
  return name;
}

const SYSTEM_FLAGS = new Map(['\\Seen', '\\Answered', '\\Flagged', '\\Deleted', '\\Draft'].map((f) => [f.toLowerCase(), f]));

/** Canonical spelling for system flags, `\Recent` dropped (it is session state), duplicates removed. */
export function normalizeFlags(flags: Flag[]): Flag[] {
  const out: Flag[] = [];
  const seen = new Set<string>();
  if (flags.length > MAX_FLAGS) throw new BadInputError('too many flags');
  for (const f of flags) {
    if (typeof f !== 'string' || !f || Buffer.byteLength(f) > MAX_FLAG_BYTES || /[\s()\]{"\u0000-\u001f\u007f*%]/.test(f)) {
      throw new BadInputError(`invalid flag ${JSON.stringify(String(f).slice(0, 64))}`);
    }
    const low = f.toLowerCase();
    if (low === '\\recent') continue;
    if (f.startsWith('\\') && !SYSTEM_FLAGS.has(low)) throw new BadInputError(`unknown system flag ${f}`);
    if (seen.has(low)) continue;
    seen.add(low);
    out.push(SYSTEM_FLAGS.get(low) ?? f);
  }
  return out;
}
