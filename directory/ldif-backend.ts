/**
 * The embedded directory: an LDIF file with the entries an LDAP server would hold, for the
 * lab and small trials. The file is watched and reloaded when it changes (a file that does
 * not parse is refused as a whole and the previous contents stay in use); addUser and
 * setUserPair rewrite it atomically (temporary file, fsync, rename), other records keep
 * their text and comments.
 */
import { randomBytes } from 'node:crypto';
import { watch, type FSWatcher } from 'node:fs';
import { open, readFile, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { AuthError, BadInputError, ConfigError, NotFoundError } from '../common/errors.ts';
import type { Logger } from '../common/log.ts';
import type { BackendChange, DirectoryBackend, NewUserEntry } from './backend.ts';
import { escapeDnValue, normalizeDn, parentDn } from './escape.ts';
import { attrValues, formatEntry, formatRecords, parseLdif, type LdifEntry, type LdifRecord } from './ldif.ts';
import { checkPassword, DUMMY_HASH } from './password.ts';
import { normalizeAddress, toPairRecord, toUserRecord, type AttrMap, type PairParseProblem } from './records.ts';
import type { PairRecord, UserRecord } from './types.ts';

export interface LdifBackendOptions {
  file: string;
  usersDn?: string | undefined;
  watch?: boolean | undefined;
  log: Logger;
  /** Poll interval as a fallback to fs.watch (ms). */
  pollMs?: number;
}

interface Snapshot {
  text: string;
  records: LdifRecord[];
  users: Map<string, { user: UserRecord; record: LdifRecord }>;
  byAddress: Map<string, UserRecord>;
  byDn: Map<string, LdifRecord>;
  pairs: PairRecord[];
}

function attrMap(entry: LdifEntry): AttrMap {
  const m: AttrMap = new Map();
  for (const [n, v] of entry.attrs) {
    const k = n.split(';')[0]!.toLowerCase();
    const list = m.get(k);
    if (list) list.push(v);
    else m.set(k, [v]);
  }
  return m;
}

function isPair(entry: LdifEntry): boolean {
  return attrValues(entry, 'objectClass').some((c) => c.toLowerCase() === 'pairgatepair');
}

export class LdifBackend implements DirectoryBackend {
  readonly kind = 'ldif' as const;
  private snap!: Snapshot;
  private readonly file: string;
  private readonly log: Logger;
  private readonly usersDn: string | undefined;
  private watcher: FSWatcher | null = null;
  private pollTimer: NodeJS.Timeout | null = null;
  private reloadTimer: NodeJS.Timeout | null = null;
  private lastStat = '';
  private listeners: Array<(c: BackendChange) => void> = [];
  private writing: Promise<unknown> = Promise.resolve();
  private readonly warned = new Set<string>();

  private constructor(opts: LdifBackendOptions) {
    this.file = opts.file;
    this.log = opts.log;
    this.usersDn = opts.usersDn;
  }

  static async open(opts: LdifBackendOptions): Promise<LdifBackend> {
    const b = new LdifBackend(opts);
    let text: string;
    try {
      text = await readFile(opts.file, 'utf8');
    } catch (err) {
      throw new ConfigError('ldif', `cannot read ${opts.file}: ${(err as NodeJS.ErrnoException).code ?? String(err)}`);
    }
    b.snap = b.build(text);
    b.lastStat = await b.statKey();
    if (opts.watch !== false) b.startWatching(opts.pollMs ?? 1000);
    return b;
  }

  private build(text: string): Snapshot {
    const records = parseLdif(text, this.file);
    const users = new Map<string, { user: UserRecord; record: LdifRecord }>();
    const byAddress = new Map<string, UserRecord>();
    const byDn = new Map<string, LdifRecord>();
    const pairs: PairRecord[] = [];
    const problems: PairParseProblem[] = [];
    for (const record of records) {
      const e = record.entry;
      if (!e) continue;
      const attrs = attrMap(e);
      if (isPair(e)) {
        const p = toPairRecord(e.dn, attrs, problems);
        if (p) pairs.push(p);
        continue;
      }
      const user = toUserRecord(e.dn, attrs);
      if (!user) continue;
      if (users.has(user.uid)) {
        problems.push({ dn: e.dn, problem: `uid ${user.uid} appears twice; the first entry is used` });
        continue;
      }
      users.set(user.uid, { user, record });
      byDn.set(normalizeDn(e.dn), record);
      for (const a of [user.mail, ...user.aliases]) {
        if (!a) continue;
        const owner = byAddress.get(a);
        if (owner) problems.push({ dn: e.dn, problem: `address ${a} also belongs to ${owner.dn}; the first is used` });
        else byAddress.set(a, user);
      }
    }
    for (const p of problems) {
      const key = `${p.dn}|${p.problem}`;
      if (this.warned.has(key)) continue;
      this.warned.add(key);
      this.log.warn({ dn: p.dn, file: this.file }, `directory: ${p.problem}`);
    }
    return { text, records, users, byAddress, byDn, pairs };
  }

  // ---- watching -------------------------------------------------------------------------

  private async statKey(): Promise<string> {
    try {
      const s = await stat(this.file);
      return `${s.ino}:${s.size}:${s.mtimeMs}`;
    } catch {
      return 'missing';
    }
  }

  private startWatching(pollMs: number): void {
    try {
      // The directory, not the file: an atomic rename replaces the file's inode.
      this.watcher = watch(dirname(this.file), (_event, name) => {
        if (!name || name === basename(this.file)) this.scheduleReload();
      });
      this.watcher.on('error', () => undefined);
      this.watcher.unref();
    } catch (err) {
      this.log.warn({ err: (err as Error).message }, 'directory: cannot watch the LDIF directory; polling only');
    }
    this.pollTimer = setInterval(() => this.scheduleReload(), pollMs);
    this.pollTimer.unref();
  }

  private scheduleReload(): void {
    if (this.reloadTimer) return;
    this.reloadTimer = setTimeout(() => {
      this.reloadTimer = null;
      void this.reloadIfChanged();
    }, 50);
    this.reloadTimer.unref();
  }

  /** Re-reads the file when it changed; returns whether new contents were taken. */
  async reloadIfChanged(): Promise<boolean> {
    await this.writing;
    const key = await this.statKey();
    if (key === this.lastStat || key === 'missing') return false;
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch {
      return false;
    }
    this.lastStat = key;
    if (text === this.snap.text) return false;
    let next: Snapshot;
    try {
      next = this.build(text);
    } catch (err) {
      this.log.error({ file: this.file, err: (err as Error).message }, 'directory: LDIF file not reloaded (keeping the previous contents)');
      return false;
    }
    const prev = this.snap;
    this.snap = next;
    const change = diff(prev, next);
    this.log.info({ file: this.file, users: next.users.size, pairs: next.pairs.length, changedLogins: change.logins.length }, 'directory: LDIF file reloaded');
    for (const l of this.listeners) l(change);
    return true;
  }

  onChange(listener: (change: BackendChange) => void): void {
    this.listeners.push(listener);
  }

  // ---- look-ups -------------------------------------------------------------------------

  private loginIn(snap: Snapshot, login: string): UserRecord | undefined {
    return snap.users.get(login)?.user ?? (login.includes('@') ? snap.byAddress.get(normalizeAddress(login)) : undefined);
  }

  /** A miss re-checks the file first (a stat; misses are negatively cached above). */
  private async withFreshMiss(find: (snap: Snapshot) => UserRecord | undefined): Promise<UserRecord | null> {
    let u = find(this.snap);
    if (!u && (await this.reloadIfChanged())) u = find(this.snap);
    return u ? copy(u) : null;
  }

  findLogin(login: string): Promise<UserRecord | null> {
    return this.withFreshMiss((snap) => this.loginIn(snap, login));
  }

  findRecipient(address: string): Promise<UserRecord | null> {
    return this.withFreshMiss((snap) => snap.byAddress.get(normalizeAddress(address)));
  }

  async bindUser(dn: string, password: string): Promise<void> {
    const found = dn ? this.snap.byDn.get(normalizeDn(dn)) : undefined;
    const stored = found?.entry ? attrValues(found.entry, 'userPassword') : [];
    if (!password || stored.length === 0) {
      checkPassword(DUMMY_HASH, password);
      throw new AuthError('invalid credentials');
    }
    for (const s of stored) {
      const r = checkPassword(s, password);
      if (r === 'ok') return;
      if (r === 'unsupported' && !this.warned.has(`scheme|${dn}`)) {
        this.warned.add(`scheme|${dn}`);
        this.log.warn({ dn }, `directory: userPassword scheme ${s.replace(/\}.*$/s, '}')} is not supported by the LDIF directory`);
      }
    }
    throw new AuthError('invalid credentials');
  }

  async listPairs(): Promise<PairRecord[]> {
    return this.snap.pairs.map((p) => ({ ...p, ports: { ...p.ports } }));
  }

  async countUsersByPair(): Promise<Map<string, number>> {
    const m = new Map<string, number>();
    for (const { user } of this.snap.users.values()) if (user.pair) m.set(user.pair, (m.get(user.pair) ?? 0) + 1);
    return m;
  }

  // ---- changes --------------------------------------------------------------------------

  private peopleDn(): string {
    if (this.usersDn) return this.usersDn;
    const ou = this.snap.records.find((r) => r.entry && /^ou=people,/i.test(normalizeDn(r.entry.dn)));
    if (ou) return ou.entry!.dn;
    const anyUser = this.snap.users.values().next().value;
    if (anyUser) return parentDn(anyUser.user.dn);
    throw new ConfigError('usersDn', `the LDIF file ${this.file} has no ou=people entry and no users; set usersDn`);
  }

  private async writeAtomically(text: string): Promise<void> {
    const tmp = join(dirname(this.file), `.${basename(this.file)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
    let mode = 0o600;
    try {
      mode = (await stat(this.file)).mode & 0o777;
    } catch {
      /* new file */
    }
    const fh = await open(tmp, 'w', mode);
    try {
      await fh.writeFile(text, 'utf8');
      await fh.sync();
    } finally {
      await fh.close();
    }
    try {
      await rename(tmp, this.file);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw err;
    }
  }

  /** Applies `mutate` to a copy of the records, writes the file, then takes the new snapshot. */
  private mutate<T>(fn: (records: LdifRecord[]) => T): Promise<T> {
    const run = async () => {
      await this.reloadIfChangedUnlocked();
      const records = this.snap.records.map((r) => ({ ...r }));
      const result = fn(records);
      const text = formatRecords(records);
      const next = this.build(text);
      await this.writeAtomically(text);
      this.snap = next;
      this.lastStat = await this.statKey();
      return result;
    };
    const p = this.writing.then(run, run);
    this.writing = p.catch(() => undefined);
    return p;
  }

  private async reloadIfChangedUnlocked(): Promise<void> {
    const key = await this.statKey();
    if (key !== this.lastStat && key !== 'missing') {
      const text = await readFile(this.file, 'utf8');
      this.lastStat = key;
      if (text !== this.snap.text) this.snap = this.build(text);
    }
  }

  async addUser(u: NewUserEntry): Promise<UserRecord> {
    const dn = `uid=${escapeDnValue(u.uid)},${this.peopleDn()}`;
    const entry: LdifEntry = {
      dn,
      attrs: [
        ['objectClass', 'inetOrgPerson'],
        ['objectClass', 'inetLocalMailRecipient'],
        ...(u.quotaBytes !== undefined ? ([['objectClass', 'pairgateUser']] as Array<[string, string]>) : []),
        ['uid', u.uid],
        ['cn', u.cn],
        ['sn', u.cn],
        ['mail', u.mail],
        ...u.aliases.map((a): [string, string] => ['mailLocalAddress', a]),
        ['mailHost', u.pair],
        ...(u.quotaBytes !== undefined ? ([['pairgateQuotaBytes', String(u.quotaBytes)]] as Array<[string, string]>) : []),
        ['userPassword', u.passwordHash],
      ],
    };
    await this.mutate((records) => {
      records.push({ entry, text: formatEntry(entry), comments: [], line: 0 });
    });
    return (await this.findLogin(u.uid))!;
  }

  /**
   * Adds the entries of another LDIF file (`pairgate directory import --ldif`), as an LDAP
   * import would: an entry whose DN is already in the file is skipped, the rest are appended
   * in one atomic write. Entries that would give a second user the same uid or address are
   * refused whole (BadInputError naming them), since the file would then answer ambiguously.
   */
  async importEntries(entries: LdifEntry[]): Promise<{ added: number; skipped: number }> {
    return this.mutate((records) => {
      const dns = new Set(records.flatMap((r) => (r.entry ? [normalizeDn(r.entry.dn)] : [])));
      const uids = new Set(this.snap.users.keys());
      const addresses = new Set(this.snap.byAddress.keys());
      let added = 0;
      let skipped = 0;
      for (const e of entries) {
        const dn = normalizeDn(e.dn);
        if (dns.has(dn)) {
          skipped++;
          continue;
        }
        if (!isPair(e)) {
          const u = toUserRecord(e.dn, attrMap(e));
          if (u) {
            if (uids.has(u.uid)) throw new BadInputError(`${e.dn}: uid ${u.uid} is already taken in ${this.file}`);
            for (const a of [u.mail, ...u.aliases]) {
              if (a && addresses.has(a)) throw new BadInputError(`${e.dn}: address ${a} already belongs to someone in ${this.file}`);
              if (a) addresses.add(a);
            }
            uids.add(u.uid);
          }
        }
        dns.add(dn);
        records.push({ entry: e, text: formatEntry(e), comments: [], line: 0 });
        added++;
      }
      return { added, skipped };
    });
  }

  async setUserPair(uid: string, pair: string): Promise<UserRecord> {
    await this.mutate((records) => {
      const current = this.snap.users.get(uid);
      if (!current) throw new NotFoundError(`no user ${uid}`);
      const i = records.findIndex((r) => r.entry && r.entry.dn === current.record.entry!.dn);
      const old = records[i]!;
      const attrs = old.entry!.attrs.filter(([n]) => n.toLowerCase() !== 'mailhost');
      const at = old.entry!.attrs.findIndex(([n]) => n.toLowerCase() === 'mailhost');
      attrs.splice(at >= 0 ? at : attrs.length, 0, ['mailHost', pair]);
      const entry = { dn: old.entry!.dn, attrs };
      records[i] = { entry, text: formatEntry(entry, old.comments), comments: old.comments, line: old.line };
    });
    return (await this.findLogin(uid))!;
  }

  async close(): Promise<void> {
    this.watcher?.close();
    if (this.pollTimer) clearInterval(this.pollTimer);
    if (this.reloadTimer) clearTimeout(this.reloadTimer);
    await this.writing;
  }
}

function copy(u: UserRecord): UserRecord {
  return { ...u, aliases: [...u.aliases] };
}

function diff(prev: Snapshot, next: Snapshot): BackendChange {
  const logins = new Set<string>();
  const mark = (u: UserRecord) => {
    logins.add(u.uid);
    if (u.mail) logins.add(u.mail);
    for (const a of u.aliases) logins.add(a);
  };
  for (const [uid, { user }] of prev.users) {
    const n = next.users.get(uid)?.user;
    if (!n || JSON.stringify(n) !== JSON.stringify(user)) {
      mark(user);
      if (n) mark(n);
    }
  }
  for (const [uid, { user }] of next.users) if (!prev.users.has(uid)) mark(user);
  // Passwords changed: nothing cached depends on them.
  const pairsChanged = JSON.stringify(prev.pairs) !== JSON.stringify(next.pairs);
  return { logins: [...logins], pairsChanged };
}
