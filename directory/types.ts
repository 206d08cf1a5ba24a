/**
 * The directory's contract with its users (proxy, lab, CLI): who a login is, which pair is
 * their home, and the pairs themselves. Two backends implement it: LDAP (ldapts) and the
 * embedded LDIF file. Both throw the typed errors of common/errors.ts:
 * UnavailableError (LDAP down: a temporary failure, never "unknown user"), AuthError,
 * NotFoundError (user whose mailHost names no pair, or a retired pair).
 */

export type PairPlacementState = 'active' | 'draining' | 'maintenance' | 'retired';

export interface PairRecord {
  /** Pair id, the `cn` of the pair entry and the value of users' `mailHost` (e.g. `pair-07`). */
  id: string;
  dn: string;
  /** Floating service address (pairgateAddress). */
  address: string;
  /** Port overrides from `pairgatePorts` (`imap=10143` → `{ imap: 10143 }`). */
  ports: Partial<Record<'imap' | 'pop3' | 'lmtp' | 'admin' | string, number>>;
  state: PairPlacementState;
  weight: number;
}

export interface UserRecord {
  readonly dn: string;
  readonly uid: string;
  /** Primary address (`mail`). */
  readonly mail: string;
  /** Further addresses and aliases (`mailLocalAddress`). */
  readonly aliases: readonly string[];
  /** Home pair id (`mailHost`). */
  readonly pair: string;
  readonly quotaBytes?: number | undefined;
}

export interface Route {
  user: UserRecord;
  pair: PairRecord;
}

export interface NewUser {
  uid: string;
  password: string;
  mail: string;
  aliases?: string[];
  /** Home pair; chosen by placement when absent. */
  pair?: string;
  cn?: string;
  quotaBytes?: number;
}

export interface Directory {
  /** Login lookup: by uid, or by any address (mail or mailLocalAddress). null = no such user. */
  findLogin(login: string): Promise<UserRecord | null>;
  /** Recipient lookup: by mail or mailLocalAddress. null = no such recipient. */
  findRecipient(address: string): Promise<UserRecord | null>;
  /** Binds as the user's DN. Resolves the user on success; AuthError on a wrong password or unknown login. */
  authenticate(login: string, password: string): Promise<UserRecord>;
  /** The user's home pair; NotFoundError when mailHost names no pair or a retired pair. */
  routeFor(user: UserRecord): Promise<Route>;
  listPairs(): Promise<PairRecord[]>;
  getPair(id: string): Promise<PairRecord | null>;
  /** The active pair with the most free capacity (weight-aware), for a new user. */
  placeNewUser(): Promise<PairRecord>;
  /** Users homed on each pair (what placement counts with); optional for other implementations. */
  usersPerPair?(): Promise<Map<string, number>>;
  addUser(user: NewUser): Promise<UserRecord>;
  /** Changes a user's home pair (user move) and publishes the cache invalidation. */
  setUserPair(uid: string, pair: string): Promise<void>;
  /** Drops cached answers for these logins/addresses here and, through the bus, everywhere. */
  invalidate(logins: string[]): Promise<void>;
  close(): Promise<void>;
}
