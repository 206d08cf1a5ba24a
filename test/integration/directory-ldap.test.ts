/**
 * The LDAP directory against real slapd servers: the behavioural suite, failover across
 * replicas (one stopped in the middle of a loop of look-ups), every server down, LDAPS and
 * StartTLS with certificate checks on, a refused service bind.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Client } from 'ldapts';
import { AuthError, ConflictError, UnavailableError } from '../../common/errors.ts';
import { silentLogger } from '../../common/log.ts';
import { createRegistry } from '../../common/metrics.ts';
import { openDirectory } from '../../directory/index.ts';
import { quietClient } from '../../directory/ldap-pool.ts';
import { generateLdif } from '../../directory/generate.ts';
import { hashPassword } from '../../directory/password.ts';
import type { Directory } from '../../directory/types.ts';
import { tempDir } from '../helpers/proc.ts';
import { freePort, waitFor } from '../helpers/net.ts';
import { startSlapd, SERVICE_DN, type Slapd } from '../helpers/slapd.ts';
import { BASE, behaviouralSuite, suiteLdif, type SuiteContext } from './directory-suite.ts';

const tmp = tempDir('pairgate-dir-ldap-');
const dataFile = join(tmp.path, 'suite.ldif');
writeFileSync(dataFile, suiteLdif());

async function adminAdd(slapd: Slapd, uid: string, mail: string, pair: string): Promise<void> {
  const c = new Client({ url: slapd.url, timeout: 5000, connectTimeout: 5000 });
  try {
    await c.bind(slapd.adminDn, slapd.adminPassword);
    await c.add(`uid=${uid},ou=people,${BASE}`, {
      objectClass: ['inetOrgPerson', 'inetLocalMailRecipient'],
      uid,
      cn: uid,
      sn: uid,
      mail,
      mailHost: pair,
      userPassword: hashPassword(`${uid}-pass`, 'SSHA'),
    });
  } finally {
    await c.unbind();
  }
}

let slapd: Slapd;
let ctx: SuiteContext;

beforeAll(async () => {
  slapd = await startSlapd({ ldif: [dataFile] });
  // The admin DN: the suite also adds users and moves them (the service account only reads).
  const config = { urls: [slapd.url], bindDn: slapd.adminDn, bindPassword: slapd.adminPassword, baseDn: BASE, cache: { negativeTtlMs: 60_000 } };
  ctx = {
    directory: await openDirectory(config, { log: silentLogger }),
    addBehindBack: (uid, mail, pair) => adminAdd(slapd, uid, mail, pair),
    openAnother: () => openDirectory(config, { log: silentLogger }),
    negativeTtlMs: 60_000,
  };
}, 30_000);

afterAll(async () => {
  await ctx?.directory.close();
  await slapd?.close();
  tmp.cleanup();
});

behaviouralSuite('LDAP', () => ctx);

describe('LDAP specifics', () => {
  const lookupConfig = (urls: string[], extra: Record<string, unknown> = {}) => ({
    urls,
    bindDn: SERVICE_DN,
    bindPassword: 'service-pass',
    baseDn: BASE,
    connectTimeoutMs: 1000,
    timeoutMs: 2000,
    cache: { maxEntries: 0 },
    ...extra,
  });

  it("sends through the quiet replacement of ldapts' _send (the library's is still the one it was written for); close leaves no socket", async () => {
    // If an ldapts upgrade changes _send, this fails: look whether the replacement still fits.
    const proto = (Client.prototype as unknown as { _send: (m: unknown) => unknown })._send;
    expect(typeof proto).toBe('function');
    expect(proto.length).toBe(1);
    expect(String(proto)).toContain('messageDetailsByMessageId.set');
    const c = quietClient(new Client({ url: slapd.url }));
    expect((c as unknown as { _send: unknown })._send).not.toBe(proto);
    await c.bind(SERVICE_DN, 'service-pass');
    const r = await c.search(`ou=people,${BASE}`, { filter: '(uid=alice)', attributes: ['mailHost'] });
    expect(r.searchEntries[0]?.mailHost).toBe('pair-01');
    await c.unbind();
    const sockets = () => process.getActiveResourcesInfo().filter((x) => x === 'TCPSocketWrap').length;
    const before = sockets();
    const d = await openDirectory(lookupConfig([slapd.url]), { log: silentLogger });
    expect((await d.findLogin('alice'))?.pair).toBe('pair-01');
    await expect(d.authenticate('alice', 'alice-pass')).resolves.toMatchObject({ uid: 'alice' });
    expect(sockets()).toBeGreaterThan(before);
    await d.close();
    await waitFor(() => sockets() <= before, 5000, 'LDAP sockets closed');
  });

  it('look-ups asked together share one search and get the answers each would get alone', async () => {
    // An entry whose uid is not ASCII: a batch that brings it back is asked again one by one.
    const c = new Client({ url: slapd.url, timeout: 5000, connectTimeout: 5000 });
    await c.bind(slapd.adminDn, slapd.adminPassword);
    await c.add(`uid=zoë,ou=people,${BASE}`, { objectClass: ['inetOrgPerson', 'inetLocalMailRecipient'], uid: 'zoë', cn: 'z', sn: 'z', mail: 'zoe@example.net', mailHost: 'pair-04' });
    await c.unbind();
    const registry = createRegistry({}, false);
    const batched = await openDirectory(lookupConfig([slapd.url]), { log: silentLogger, registry });
    const alone = await openDirectory(lookupConfig([slapd.url], { batchMax: 1 }), { log: silentLogger });
    const logins = ['alice', 'ALICE', 'alice@example.net', 'A.Example@EXAMPLE.net', 'postmaster@example.net', 'bob', 'robert@example.org', 'carol', 'dave', 'nobody', 'nobody@example.net', '*)(uid=*', 'al ice', 'zoë'];
    const recipients = ['alice@example.net', 'Robert@Example.ORG', 'bob', 'nobody@example.net'];
    const uidOf = (u: { uid: string } | null) => u?.uid ?? null;
    const answer = async (d: Directory, i: number) => {
      const [l, r] = await Promise.all([Promise.all(logins.map((x) => d.findLogin(x).then(uidOf))), Promise.all(recipients.map((x) => d.findRecipient(x).then(uidOf)))]);
      return [...l, ...r, i];
    };
    const want = [];
    for (const x of logins) want.push(uidOf(await alone.findLogin(x)));
    for (const x of recipients) want.push(uidOf(await alone.findRecipient(x)));
    expect(want.slice(0, 8)).toEqual(['alice', 'alice', 'alice', 'alice', 'alice', 'bob', 'bob', 'carol']);
    expect(await answer(batched, 0)).toEqual([...want, 0]);
    const counted = (outcome: string) => Number(new RegExp(`directory_ldap_batched_lookups_total\\{outcome="${outcome}"\\} (\\d+)`).exec(registryText)?.[1] ?? 0);
    let registryText = await registry.metrics();
    expect(counted('answered')).toBeGreaterThan(10);
    expect(counted('asked_again')).toBe(0);
    // zoë's entry comes back for zoe@example.net: that batch is asked again, one look-up at a time, with the same answers.
    const withZoe = await Promise.all(['alice', 'zoe@example.net', 'bob'].map((x) => batched.findLogin(x).then(uidOf)));
    expect(withZoe).toEqual(['alice', 'zoë', 'bob']);
    registryText = await registry.metrics();
    expect(counted('asked_again')).toBe(3);
    await batched.close();
    await alone.close();
  });

  it('a batch cut short by its size limit is asked again (ldapts returns the entries before the limit without an error)', async () => {
    // Seven entries share an alias; one more user is added after them (a later entry ID).
    const c = new Client({ url: slapd.url, timeout: 5000, connectTimeout: 5000 });
    await c.bind(slapd.adminDn, slapd.adminPassword);
    for (let i = 1; i <= 7; i++) {
      await c.add(`uid=crowd${i},ou=people,${BASE}`, { objectClass: ['inetOrgPerson', 'inetLocalMailRecipient'], uid: `crowd${i}`, cn: 'c', sn: 'c', mail: `crowd${i}@example.net`, mailLocalAddress: 'crowd@example.net', mailHost: 'pair-01' });
    }
    await c.add(`uid=straggler,ou=people,${BASE}`, { objectClass: ['inetOrgPerson', 'inetLocalMailRecipient'], uid: 'straggler', cn: 'l', sn: 'l', mail: 'straggler@example.net', mailHost: 'pair-02' });
    await c.unbind();
    const batched = await openDirectory(lookupConfig([slapd.url]), { log: silentLogger });
    const alone = await openDirectory(lookupConfig([slapd.url], { batchMax: 1 }), { log: silentLogger });
    const uidOf = (u: { uid: string } | null) => u?.uid ?? null;
    const want = [uidOf(await alone.findRecipient('crowd@example.net')), uidOf(await alone.findLogin('straggler'))];
    expect(want[1]).toBe('straggler');
    // Two look-ups: a limit of 6 (or 7) entries, eight match.
    expect(await Promise.all([batched.findRecipient('crowd@example.net').then(uidOf), batched.findLogin('straggler').then(uidOf)])).toEqual(want);
    await batched.close();
    await alone.close();
  });

  it('binds as the service account and reads as it', async () => {
    const d = await openDirectory(lookupConfig([slapd.url]), { log: silentLogger });
    try {
      expect((await d.findLogin('bob'))?.pair).toBe('pair-02');
      expect((await d.authenticate('bob', 'bob-pass')).uid).toBe('bob');
      await expect(d.authenticate('bob', 'nope')).rejects.toBeInstanceOf(AuthError);
    } finally {
      await d.close();
    }
  });

  it('a refused service bind is a temporary failure, never "unknown user"', async () => {
    const d = await openDirectory(lookupConfig([slapd.url], { bindPassword: 'wrong' }), { log: silentLogger });
    try {
      await expect(d.findLogin('bob')).rejects.toBeInstanceOf(UnavailableError);
      await expect(d.authenticate('bob', 'bob-pass')).rejects.toBeInstanceOf(UnavailableError);
    } finally {
      await d.close();
    }
  });

  it('a refused write is a ConflictError (no failover, no server marked down); a wrong base is temporary, not "unknown user"', async () => {
    const registry = createRegistry({}, false);
    const readOnly = await openDirectory(lookupConfig([slapd.url]), { log: silentLogger, registry });
    const wrongBase = await openDirectory(lookupConfig([slapd.url], { usersDn: `ou=nobody,${BASE}`, pairsDn: `ou=nopairs,${BASE}` }), { log: silentLogger });
    try {
      await expect(readOnly.addUser({ uid: 'ro1', password: 'p', mail: 'ro1@example.net', pair: 'pair-01' })).rejects.toThrow(/may not write/);
      await expect(readOnly.addUser({ uid: 'ro1', password: 'p', mail: 'ro1@example.net', pair: 'pair-01' })).rejects.toBeInstanceOf(ConflictError);
      expect(await registry.metrics()).not.toMatch(/pairgate_directory_ldap_errors_total\{kind="[a-z]+"\} [1-9]/);
      expect((await readOnly.findLogin('alice'))?.uid).toBe('alice');
      await expect(wrongBase.findLogin('alice')).rejects.toBeInstanceOf(UnavailableError);
      await expect(wrongBase.listPairs()).rejects.toBeInstanceOf(UnavailableError);
    } finally {
      await readOnly.close();
      await wrongBase.close();
    }
  });

  it('every server down: UnavailableError (temporary), counted as LDAP errors', async () => {
    const registry = createRegistry({}, false);
    const d = await openDirectory(lookupConfig([`ldap://127.0.0.1:${await freePort()}`, `ldap://127.0.0.1:${await freePort()}`]), { log: silentLogger, registry });
    try {
      const err = await d.findLogin('bob').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(UnavailableError);
      expect((err as UnavailableError).temporary).toBe(true);
      await expect(d.findRecipient('bob@example.net')).rejects.toBeInstanceOf(UnavailableError);
      await expect(d.authenticate('bob', 'bob-pass')).rejects.toBeInstanceOf(UnavailableError);
      const text = await registry.metrics();
      expect(text).toMatch(/pairgate_directory_ldap_errors_total\{kind="connect"\} [1-9]/);
      expect(text).toMatch(/pairgate_directory_lookups_total\{result="error"\} [1-9]/);
    } finally {
      await d.close();
    }
  });

  it('skips a dead first URL without a failed look-up', async () => {
    const d = await openDirectory(lookupConfig([`ldap://127.0.0.1:${await freePort()}`, slapd.url]), { log: silentLogger });
    try {
      for (let i = 0; i < 20; i++) expect((await d.findLogin(i % 2 ? 'alice' : 'bob@example.net'))?.uid).toBeTruthy();
      expect((await d.authenticate('alice', 'alice-pass')).uid).toBe('alice');
    } finally {
      await d.close();
    }
  });

  it('a replica stopped in the middle of a loop of look-ups costs no failed look-up', async () => {
    const [first, second] = await Promise.all([startSlapd({ ldif: [dataFile] }), startSlapd({ ldif: [dataFile] })]);
    const d = await openDirectory(lookupConfig([first.url, second.url]), { log: silentLogger });
    try {
      let done = 0;
      let failures = 0;
      let stopped = false;
      let afterDeath = 0;
      const logins = ['alice', 'bob', 'carol@example.net', 'robert@example.org', 'nobody'];
      // Look-ups go on until 300 more have been made after the first server's process is gone.
      const worker = async () => {
        while (afterDeath < 300 && done < 100_000) {
          const n = done++;
          if (n === 150 && !stopped) {
            stopped = true;
            void first.stop();
          }
          if (stopped && !first.proc.alive()) afterDeath++;
          try {
            const login = logins[n % logins.length]!;
            const u = await d.findLogin(login);
            if (login === 'nobody' ? u !== null : u === null) failures++;
            if (n % 50 === 0) await d.authenticate('bob', 'bob-pass');
          } catch {
            failures++;
          }
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      expect(stopped).toBe(true);
      expect(failures).toBe(0);
      expect(afterDeath).toBeGreaterThanOrEqual(300);
    } finally {
      await d.close();
      await first.close();
      await second.close();
    }
  }, 40_000);

  it('a replica that hangs (SIGSTOP) is left after the operation timeout, without a failed look-up', async () => {
    const [first, second] = await Promise.all([startSlapd({ ldif: [dataFile] }), startSlapd({ ldif: [dataFile] })]);
    const registry = createRegistry({}, false);
    const d = await openDirectory(lookupConfig([first.url, second.url], { timeoutMs: 800, retryDownMs: 60_000 }), { log: silentLogger, registry });
    try {
      let failures = 0;
      const lookups = async (n: number) => {
        for (let i = 0; i < n; i++) {
          const u = await d.findLogin(i % 2 ? 'alice' : 'robert@example.org').catch(() => null);
          if (!u) failures++;
        }
      };
      await Promise.all([lookups(20), lookups(20)]);
      first.proc.kill('SIGSTOP');
      await Promise.all([lookups(30), lookups(30), (async () => expect((await d.authenticate('bob', 'bob-pass')).uid).toBe('bob'))()]);
      expect(failures).toBe(0);
      expect(await registry.metrics()).toMatch(/pairgate_directory_ldap_errors_total\{kind="timeout"\} [1-9]/);
    } finally {
      first.proc.kill('SIGCONT');
      await d.close();
      await first.close();
      await second.close();
    }
  }, 30_000);

  it('placement over more users than the bind DN may read: a LimitError naming the fix; unlimited DN places', async () => {
    const big = join(tmp.path, 'big.ldif');
    writeFileSync(big, [...generateLdif({ users: 1100, pairs: 3, seed: 5 })].join(''));
    const s = await startSlapd({ ldif: [big] });
    const limited = await openDirectory(lookupConfig([s.url]), { log: silentLogger });
    const root = await openDirectory({ urls: [s.url], bindDn: s.adminDn, bindPassword: s.adminPassword, baseDn: BASE }, { log: silentLogger });
    try {
      await expect(limited.placeNewUser()).rejects.toThrow(/size limit.*olcLimits/);
      const chosen = await root.placeNewUser();
      expect(['pair-01', 'pair-02', 'pair-03']).toContain(chosen.id);
    } finally {
      await limited.close();
      await root.close();
      await s.close();
    }
  }, 30_000);

  describe('TLS', () => {
    let tlsSlapd: Slapd;
    beforeAll(async () => {
      tlsSlapd = await startSlapd({ ldif: [dataFile], tls: true });
    }, 30_000);
    afterAll(async () => {
      await tlsSlapd?.close();
    });

    it('LDAPS with the CA given', async () => {
      const d = await openDirectory(lookupConfig([tlsSlapd.ldapsUrl!], { tls: { ca: tlsSlapd.cert!.certFile } }), { log: silentLogger });
      try {
        expect((await d.findLogin('alice'))?.pair).toBe('pair-01');
        expect((await d.authenticate('alice', 'alice-pass')).uid).toBe('alice');
      } finally {
        await d.close();
      }
    });

    it('StartTLS with the CA given', async () => {
      const d = await openDirectory(lookupConfig([tlsSlapd.url], { startTls: true, tls: { ca: tlsSlapd.cert!.certFile } }), { log: silentLogger });
      try {
        expect((await d.findLogin('bob'))?.pair).toBe('pair-02');
        expect((await d.authenticate('bob', 'bob-pass')).uid).toBe('bob');
      } finally {
        await d.close();
      }
    });

    it('an untrusted certificate is refused (UnavailableError), not ignored', async () => {
      const d = await openDirectory(lookupConfig([tlsSlapd.ldapsUrl!]), { log: silentLogger });
      try {
        await expect(d.findLogin('alice')).rejects.toBeInstanceOf(UnavailableError);
      } finally {
        await d.close();
      }
    });
  });
});
