/** What a storage backend (LDAP server or LDIF file) provides to the caching directory. */
import type { PairRecord, UserRecord } from './types.ts';

export interface NewUserEntry {
  uid: string;
  passwordHash: string;
  mail: string;
  aliases: string[];
  pair: string;
  cn: string;
  quotaBytes?: number | undefined;
}

/** A change seen in the backing data (LDIF reload): addresses and logins whose answers changed. */
export interface BackendChange {
  logins: string[];
  pairsChanged: boolean;
}

export interface DirectoryBackend {
  readonly kind: 'ldap' | 'ldif';
  /**
   * `login` is a uid (compared by the backend's rules) or a lower-cased address. Each answer
   * is a new record, the caller's to keep (the cache freezes and shares it).
   */
  findLogin(login: string): Promise<UserRecord | null>;
  findRecipient(address: string): Promise<UserRecord | null>;
  /** Checks the password by binding as `dn`; AuthError when refused. Never an anonymous bind. */
  bindUser(dn: string, password: string): Promise<void>;
  listPairs(): Promise<PairRecord[]>;
  countUsersByPair(): Promise<Map<string, number>>;
  addUser(user: NewUserEntry): Promise<UserRecord>;
  /** NotFoundError when there is no such uid; returns the updated record. */
  setUserPair(uid: string, pair: string): Promise<UserRecord>;
  onChange?(listener: (change: BackendChange) => void): void;
  close(): Promise<void>;
}
