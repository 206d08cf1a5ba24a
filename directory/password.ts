/**
 * userPassword checks for the embedded LDIF directory ({SSHA}, {SSHA256}, {SSHA512}, {SHA},
 * {SHA256}, {SHA512} and cleartext), compared in constant time, and the {SSHA512} hashes
 * written for new users. {CRYPT} needs the system's crypt(3), which Node does not expose:
 * such entries are refused (and reported once) rather than guessed at.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';

const SCHEMES: Record<string, { algo: string; len: number; salted: boolean }> = {
  SSHA: { algo: 'sha1', len: 20, salted: true },
  SSHA256: { algo: 'sha256', len: 32, salted: true },
  SSHA384: { algo: 'sha384', len: 48, salted: true },
  SSHA512: { algo: 'sha512', len: 64, salted: true },
  SHA: { algo: 'sha1', len: 20, salted: false },
  SHA256: { algo: 'sha256', len: 32, salted: false },
  SHA384: { algo: 'sha384', len: 48, salted: false },
  SHA512: { algo: 'sha512', len: 64, salted: false },
};

export type PasswordCheck = 'ok' | 'mismatch' | 'unsupported';

function digestEqual(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

export function checkPassword(stored: string, password: string): PasswordCheck {
  const m = /^\{([A-Za-z0-9.-]+)\}(.*)$/s.exec(stored);
  if (!m) {
    // Cleartext: compare digests so that the comparison time does not depend on the length.
    const h = (s: string) => createHash('sha256').update(s, 'utf8').digest();
    return digestEqual(h(stored), h(password)) ? 'ok' : 'mismatch';
  }
  const scheme = SCHEMES[m[1]!.toUpperCase()];
  if (!scheme) return 'unsupported';
  const raw = Buffer.from(m[2]!, 'base64');
  if (raw.length < scheme.len || (!scheme.salted && raw.length !== scheme.len)) return 'mismatch';
  const digest = raw.subarray(0, scheme.len);
  const salt = raw.subarray(scheme.len);
  const computed = createHash(scheme.algo).update(password, 'utf8').update(salt).digest();
  return digestEqual(computed, digest) ? 'ok' : 'mismatch';
}

export function hashPassword(password: string, scheme: 'SSHA' | 'SSHA256' | 'SSHA512' = 'SSHA512'): string {
  const s = SCHEMES[scheme]!;
  const salt = randomBytes(8);
  return `{${scheme}}${Buffer.concat([createHash(s.algo).update(password, 'utf8').update(salt).digest(), salt]).toString('base64')}`;
}

/** A valid hash no password matches quickly: checked for unknown logins to even out timing. */
export const DUMMY_HASH = hashPassword(randomBytes(16).toString('hex'));
