/**
 * The LDAP backend: look-ups as the service account, user authentication by a bind as the
 * user's DN, pair listing, and the writes of addUser/setUserPair. Filters are built as
 * ldapts Filter objects, so a value (whatever it contains) travels as an assertion value
 * and cannot change the filter; DNs of new entries are RFC 4514-escaped (escape.ts).
 */
import { AndFilter, Attribute, Change, EqualityFilter, PresenceFilter, ResultCodeError, type Client, type Entry, type Filter } from 'ldapts';
import { AuthError, ConflictError, LimitError, NotFoundError, UnavailableError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import type { DirectoryBackend, NewUserEntry } from './backend.ts';
import { LDAP_DEFAULTS, type DirectoryConfig } from './config.ts';
import { escapeDnValue, escapeFilterValue } from './escape.ts';
import { LdapPool } from './ldap-pool.ts';
import { attributeName, attributeText, ENTRIES_PER_LOOKUP, LookupBatcher, type LookupKind } from './ldap-batch.ts';
import type { DirectoryMetrics } from './metrics.ts';
import { PAIR_ATTRIBUTES, toPairRecord, toUserRecord, USER_ATTRIBUTES, type AttrMap, type PairParseProblem } from './records.ts';
import type { PairRecord, UserRecord } from './types.ts';

function attrMap(entry: Entry): AttrMap {
  const m: AttrMap = new Map();
  for (const description in entry) {
    if (description === 'dn') continue;
    const v = entry[description]!;
    m.set(attributeName(description), Array.isArray(v) ? v.map(attributeText) : [attributeText(v)]);
  }
  return m;
}

/** The directory_ldap_seconds op label of a user search. */
const SEARCH_OP: Record<LookupKind | 'batch', string> = { login: 'search_login', recipient: 'search_recipient', batch: 'search_batch' };

const eq = (attribute: string, value: string) => new EqualityFilter({ attribute, value });

/** The text form of a filter for logs (values RFC 4515-escaped). */
export function filterText(attr: string, value: string): string {
  return `(${attr}=${escapeFilterValue(value)})`;
}

export class LdapBackend implements DirectoryBackend {
  readonly kind = 'ldap' as const;
  private readonly pool: LdapPool;
  private readonly usersDn: string;
  private readonly pairsDn: string;
  private readonly log: Logger;
  private readonly warned = new Set<string>();
  private readonly batcher: LookupBatcher;

  constructor(c: DirectoryConfig, deps: { log: Logger; metrics: DirectoryMetrics }) {
    this.log = deps.log;
    this.usersDn = c.usersDn ?? `ou=people,${c.baseDn}`;
    this.pairsDn = c.pairsDn ?? `ou=pairs,${c.baseDn}`;
    this.pool = new LdapPool({
      urls: c.urls!,
      bindDn: c.bindDn,
      bindPassword: c.bindPassword,
      startTls: c.startTls ?? false,
      tls: c.tls,
      connectTimeoutMs: c.connectTimeoutMs ?? LDAP_DEFAULTS.connectTimeoutMs,
      timeoutMs: c.timeoutMs ?? LDAP_DEFAULTS.timeoutMs,
      poolSize: c.poolSize ?? LDAP_DEFAULTS.poolSize,
      authPoolSize: c.authPoolSize ?? LDAP_DEFAULTS.authPoolSize,
      retryDownMs: c.retryDownMs ?? LDAP_DEFAULTS.retryDownMs,
      log: deps.log,
      metrics: deps.metrics,
    });
    this.batcher = new LookupBatcher({
      maxBatch: c.batchMax ?? LDAP_DEFAULTS.batchMax,
      search: (filter, sizeLimit, op) => this.searchUsers(SEARCH_OP[op], filter, sizeLimit),
      onBatch: (size, usable) => deps.metrics.ldapBatched.inc({ outcome: usable ? 'answered' : 'asked_again' }, size),
    });
  }

  private async searchUsers(op: string, filter: Filter, sizeLimit = ENTRIES_PER_LOOKUP): Promise<Entry[]> {
    return this.pool.run(op, async (client: Client) => {
      try {
        const r = await client.search(this.usersDn, { scope: 'sub', filter, attributes: USER_ATTRIBUTES, sizeLimit });
        return r.searchEntries;
      } catch (err) {
        // No users base at all is a set-up mistake: a temporary failure (mail is retried), not 550 for everyone.
        if (err instanceof ResultCodeError && err.code === 32) {
          this.warnOnce(`nobase|${this.usersDn}`, `directory: users base ${this.usersDn} does not exist`);
          throw new UnavailableError(`users base ${this.usersDn} does not exist on the LDAP server (check usersDn/baseDn)`, { cause: err });
        }
        if (err instanceof ResultCodeError && err.code === 4) throw new ConflictError(`more than ${sizeLimit - 1} entries match`, { cause: err });
        throw err;
      }
    });
  }

  private warnOnce(key: string, msg: string, fields: Record<string, unknown> = {}): void {
    if (this.warned.has(key)) return;
    this.warned.add(key);
    this.log.warn(fields, msg);
  }

  /** One answer out of several matches: uid first, then mail, then alias; logged once. */
  private pick(entries: Entry[], login: string, how: string): UserRecord | null {
    if (entries.length <= 1) return entries.length ? toUserRecord(entries[0]!.dn, attrMap(entries[0]!)) : null;
    const users = entries.map((e) => toUserRecord(e.dn, attrMap(e))).filter((u): u is UserRecord => u !== null);
    if (users.length <= 1) return users[0] ?? null;
    const lower = login.toLowerCase();
    const best =
      users.find((u) => u.uid === login) ?? users.find((u) => u.uid.toLowerCase() === lower) ?? users.find((u) => u.mail === lower) ?? [...users].sort((a, b) => a.dn.localeCompare(b.dn))[0]!;
    this.warnOnce(`ambiguous|${how}|${login}`, 'directory: several entries match; using one', { login, dns: users.map((u) => u.dn), used: best.dn });
    return best;
  }

  async findLogin(login: string): Promise<UserRecord | null> {
    return this.pick(await this.batcher.lookup('login', login), login, 'login');
  }

  async findRecipient(address: string): Promise<UserRecord | null> {
    return this.pick(await this.batcher.lookup('recipient', address), address, 'recipient');
  }

  async bindUser(dn: string, password: string): Promise<void> {
    // Never an unauthenticated bind (RFC 4513 5.1.2: empty password "succeeds").
    if (!dn || !password) throw new AuthError('invalid credentials');
    if (!(await this.pool.bind(dn, password))) throw new AuthError('invalid credentials');
  }

  async listPairs(): Promise<PairRecord[]> {
    const entries = await this.pool.run('search_pairs', async (client) => {
      try {
        const r = await client.search(this.pairsDn, { scope: 'sub', filter: eq('objectClass', 'pairgatePair'), attributes: PAIR_ATTRIBUTES, paged: { pageSize: 500 } });
        return r.searchEntries;
      } catch (err) {
        if (err instanceof ResultCodeError && err.code === 32) {
          this.warnOnce(`nobase|${this.pairsDn}`, `directory: pairs base ${this.pairsDn} does not exist`);
          throw new UnavailableError(`pairs base ${this.pairsDn} does not exist on the LDAP server (check pairsDn/baseDn)`, { cause: err });
        }
        throw err;
      }
    });
    const problems: PairParseProblem[] = [];
    const pairs = entries.map((e) => toPairRecord(e.dn, attrMap(e), problems)).filter((p): p is PairRecord => p !== null);
    for (const p of problems) this.warnOnce(`pair|${p.dn}|${p.problem}`, `directory: ${p.problem}`, { dn: p.dn });
    return pairs;
  }

  async countUsersByPair(): Promise<Map<string, number>> {
    return this.pool.run('count_users', async (client) => {
      const counts = new Map<string, number>();
      const r = await client
        .search(this.usersDn, { scope: 'sub', filter: new PresenceFilter({ attribute: 'mailHost' }), attributes: ['mailHost'], paged: { pageSize: 500 } })
        .catch((err: unknown) => {
          if (err instanceof ResultCodeError && (err.code === 4 || err.code === 11)) {
            throw new LimitError(
              `counting the users per pair (for placement) hit the server's size limit for the bind DN; allow it more entries (OpenLDAP: olcLimits, size.prtotal=unlimited) or give --pair`,
              { cause: err },
            );
          }
          throw err;
        });
      for (const e of r.searchEntries) {
        const host = attrMap(e).get('mailhost')?.[0]?.trim();
        if (host) counts.set(host, (counts.get(host) ?? 0) + 1);
      }
      return counts;
    });
  }

  private writeError(err: unknown, what: string): never {
    if (err instanceof ResultCodeError) {
      if (err.code === 68) throw new ConflictError(`${what}: entry already exists`, { cause: err });
      if (err.code === 50) throw new ConflictError(`${what}: the bind DN may not write here (insufficient access)`, { cause: err });
      if (err.code === 32) throw new NotFoundError(`${what}: no such entry`, { cause: err });
      throw new ConflictError(`${what}: ${err.message}`, { cause: err });
    }
    throw err;
  }

  async addUser(u: NewUserEntry): Promise<UserRecord> {
    const dn = `uid=${escapeDnValue(u.uid)},${this.usersDn}`;
    const attributes: Record<string, string[]> = {
      objectClass: ['inetOrgPerson', 'inetLocalMailRecipient', ...(u.quotaBytes !== undefined ? ['pairgateUser'] : [])],
      uid: [u.uid],
      cn: [u.cn],
      sn: [u.cn],
      mail: [u.mail],
      mailHost: [u.pair],
      userPassword: [u.passwordHash],
      ...(u.aliases.length ? { mailLocalAddress: u.aliases } : {}),
      ...(u.quotaBytes !== undefined ? { pairgateQuotaBytes: [String(u.quotaBytes)] } : {}),
    };
    await this.pool.run('add', (client) => client.add(dn, attributes).catch((err) => this.writeError(err, `add ${dn}`)));
    const user = await this.findLogin(u.uid);
    if (!user) throw new UnavailableError(`added ${dn} but cannot read it back`);
    return user;
  }

  async setUserPair(uid: string, pair: string): Promise<UserRecord> {
    const entries = await this.searchUsers('search_login', new AndFilter({ filters: [eq('uid', uid), new PresenceFilter({ attribute: 'objectClass' })] }));
    const user = this.pick(entries, uid, 'uid');
    if (!user) throw new NotFoundError(`no user ${uid}`);
    await this.pool.run('modify', (client) =>
      client
        .modify(user.dn, new Change({ operation: 'replace', modification: new Attribute({ type: 'mailHost', values: [pair] }) }))
        .catch((err) => this.writeError(err, `modify ${user.dn}`)),
    );
    return { ...user, pair };
  }

  async close(): Promise<void> {
    await this.pool.close();
  }
}
