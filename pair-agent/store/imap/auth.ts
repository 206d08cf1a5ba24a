/**
 * Login checks. The normal login is the proxy's master login (ARCHITECTURE.md, store agent):
 * SASL PLAIN with authorization identity = the user, authentication identity = the master
 * account and password = the master secret, accepted only from trusted addresses. A static
 * `users` map (trials, tests) allows plain user logins too. Comparisons are constant-time.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { AddressList } from '../../../common/cidr.ts';

export interface AuthConfig {
  masterUser: string;
  masterSecret: string;
  trusted: AddressList;
  users?: Record<string, string> | undefined;
}

export type AuthResult = { ok: true; user: string; master: boolean } | { ok: false; reason: string };

function same(a: string, b: string): boolean {
  const ha = createHash('sha256').update(a, 'utf8').digest();
  const hb = createHash('sha256').update(b, 'utf8').digest();
  return timingSafeEqual(ha, hb);
}

/** Users are named by uid; the same characters LDAP uids and Dovecot's %Ln accept. */
export function validUserName(user: string): boolean {
  return /^[A-Za-z0-9._@+-]{1,128}$/.test(user);
}

export function checkPlain(cfg: AuthConfig, authzid: string, authcid: string, password: string, remoteAddress: string | undefined): AuthResult {
  if (cfg.masterUser && same(authcid, cfg.masterUser)) {
    if (!cfg.trusted.has(remoteAddress)) return { ok: false, reason: 'master login from an untrusted address' };
    if (!cfg.masterSecret || !same(password, cfg.masterSecret)) return { ok: false, reason: 'bad master secret' };
    if (!authzid) return { ok: false, reason: 'master login without an authorization identity' };
    const user = authzid.toLowerCase();
    if (!validUserName(user)) return { ok: false, reason: 'invalid user name' };
    return { ok: true, user, master: true };
  }
  return checkUser(cfg, authcid, password, authzid);
}

export function checkUser(cfg: AuthConfig, user: string, password: string, authzid = ''): AuthResult {
  const login = user.toLowerCase();
  if (authzid && authzid.toLowerCase() !== login) return { ok: false, reason: 'authorization identity differs from the user' };
  const expected = cfg.users ? Object.entries(cfg.users).find(([u]) => u.toLowerCase() === login)?.[1] : undefined;
  // Compare against something even for unknown users so that timing tells nothing.
  const match = same(password, expected ?? '\0no-such-user\0');
  if (expected === undefined || !match) return { ok: false, reason: 'bad user or password' };
  if (!validUserName(login)) return { ok: false, reason: 'invalid user name' };
  return { ok: true, user: login, master: false };
}

/** Decodes a SASL PLAIN message (RFC 4616): authzid NUL authcid NUL passwd. */
export function decodePlain(b64: string): { authzid: string; authcid: string; password: string } | null {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) return null;
  const parts = Buffer.from(b64, 'base64').toString('utf8').split('\0');
  if (parts.length !== 3) return null;
  const [authzid, authcid, password] = parts as [string, string, string];
  if (!authcid) return null;
  return { authzid, authcid, password };
}
