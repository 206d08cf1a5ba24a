/**
 * The directory's behavioural suite, written once and run against both backends
 * (directory-ldif.test.ts: the embedded LDIF file; directory-ldap.test.ts: a real slapd).
 * Not a test file itself.
 */
import { describe, expect, it } from 'vitest';
import { AuthError, ConflictError, NotFoundError } from '../../common/errors.ts';
import { hashPassword } from '../../directory/password.ts';
import type { Directory } from '../../directory/types.ts';

export const BASE = 'dc=pairgate,dc=test';

export const PASSWORDS: Record<string, string> = { alice: 'alice-pass', bob: 'bob-pass', carol: 'carol-pass', dave: 'dave-pass', erin: 'erin-pass', admin: 'admin-user-pass' };

function pair(id: string, address: string, state: string, weight: number, ports?: string): string {
  return `dn: cn=${id},ou=pairs,${BASE}\nobjectClass: pairgatePair\ncn: ${id}\npairgateAddress: ${address}\n${ports ? `pairgatePorts: ${ports}\n` : ''}pairgateState: ${state}\npairgateWeight: ${weight}\n`;
}

export function userEntry(uid: string, mail: string, pairId: string, aliases: string[] = [], password = PASSWORDS[uid] ?? `${uid}-pass`): string {
  return (
    `dn: uid=${uid},ou=people,${BASE}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\nuid: ${uid}\ncn: ${uid}\nsn: ${uid}\nmail: ${mail}\n` +
    aliases.map((a) => `mailLocalAddress: ${a}\n`).join('') +
    `mailHost: ${pairId}\nuserPassword: ${hashPassword(password, 'SSHA')}\n`
  );
}

/** Test data: pairs in every state, users on each, one on a missing and one on a retired pair. */
export function suiteLdif(): string {
  return [
    `dn: ${BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: pairgate\no: test\n`,
    `dn: ou=people,${BASE}\nobjectClass: organizationalUnit\nou: people\n`,
    `dn: ou=pairs,${BASE}\nobjectClass: organizationalUnit\nou: pairs\n`,
    `# the service account\ndn: ou=services,${BASE}\nobjectClass: organizationalUnit\nou: services\n`,
    `dn: cn=pairgate,ou=services,${BASE}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: pairgate\nuserPassword: ${hashPassword('service-pass', 'SSHA')}\n`,
    pair('pair-01', '127.0.1.1', 'active', 100, 'imap=10143,pop3=10110,lmtp=10024,admin=10025'),
    pair('pair-02', '127.0.2.1', 'active', 300),
    pair('pair-03', '127.0.3.1', 'retired', 1000),
    pair('pair-04', '127.0.4.1', 'draining', 1000),
    userEntry('alice', 'alice@example.net', 'pair-01', ['a.example@example.net', 'Postmaster@Example.net']),
    userEntry('bob', 'bob@example.net', 'pair-02', ['robert@example.org']),
    userEntry('carol', 'carol@example.net', 'pair-01'),
    userEntry('dave', 'dave@example.net', 'pair-99'),
    userEntry('erin', 'erin@example.net', 'pair-03'),
    userEntry('admin', 'admin@example.net', 'pair-04'),
  ].join('\n');
}

export interface SuiteContext {
  directory: Directory;
  /** Adds a user without going through the Directory (as another tool would). */
  addBehindBack(uid: string, mail: string, pairId: string): Promise<void>;
  /** Opens a second Directory on the same data (fresh caches). */
  openAnother(): Promise<Directory>;
  negativeTtlMs: number;
}

export function behaviouralSuite(name: string, ctx: () => SuiteContext): void {
  describe(`directory behaviour (${name})`, () => {
    it('finds a login by uid, by primary address and by alias, addresses case-insensitively', async () => {
      const d = ctx().directory;
      const byUid = await d.findLogin('alice');
      expect(byUid).toMatchObject({ uid: 'alice', mail: 'alice@example.net', pair: 'pair-01', dn: `uid=alice,ou=people,${BASE}` });
      expect([...byUid!.aliases].sort()).toEqual(['a.example@example.net', 'postmaster@example.net']);
      expect((await d.findLogin('ALICE@example.NET'))?.uid).toBe('alice');
      expect((await d.findLogin('postmaster@example.net'))?.uid).toBe('alice');
      expect((await d.findLogin('Robert@Example.org'))?.uid).toBe('bob');
      expect(await d.findLogin('nobody')).toBeNull();
      expect(await d.findLogin('nobody@example.net')).toBeNull();
      expect(await d.findLogin('')).toBeNull();
    });

    it('finds recipients by mail and alias only', async () => {
      const d = ctx().directory;
      expect((await d.findRecipient('bob@example.net'))?.uid).toBe('bob');
      expect((await d.findRecipient('A.Example@example.net'))?.uid).toBe('alice');
      expect(await d.findRecipient('alice')).toBeNull();
      expect(await d.findRecipient('unknown@example.net')).toBeNull();
    });

    it('authenticates with the right password only', async () => {
      const d = ctx().directory;
      expect((await d.authenticate('alice', 'alice-pass')).uid).toBe('alice');
      expect((await d.authenticate('a.example@example.net', 'alice-pass')).uid).toBe('alice');
      await expect(d.authenticate('alice', 'wrong')).rejects.toBeInstanceOf(AuthError);
      await expect(d.authenticate('alice', '')).rejects.toBeInstanceOf(AuthError);
      await expect(d.authenticate('alice', 'alice-pass ')).rejects.toBeInstanceOf(AuthError);
      await expect(d.authenticate('nobody', 'alice-pass')).rejects.toBeInstanceOf(AuthError);
      await expect(d.authenticate('bob', 'alice-pass')).rejects.toBeInstanceOf(AuthError);
    });

    it('matches nobody for filter injection attempts', async () => {
      const d = ctx().directory;
      for (const login of ['*', '*)(uid=*', 'admin)(|(uid=*', 'admin*', 'a*', '*@example.net', 'alice)(mail=*', 'alice\\', 'ad\0min', '(uid=alice)', 'alice*)(|(uid=*']) {
        expect(await d.findLogin(login), login).toBeNull();
        expect(await d.findRecipient(login), login).toBeNull();
        await expect(d.authenticate(login, 'alice-pass'), login).rejects.toBeInstanceOf(AuthError);
        await expect(d.authenticate(login, 'admin-user-pass'), login).rejects.toBeInstanceOf(AuthError);
      }
      // And the real admin still works, so the refusals above are not an accident.
      expect((await d.authenticate('admin', 'admin-user-pass')).uid).toBe('admin');
    });

    it('routes to the home pair with its ports; a missing or retired pair is a NotFoundError', async () => {
      const d = ctx().directory;
      const route = await d.routeFor((await d.findLogin('alice'))!);
      expect(route.pair).toMatchObject({ id: 'pair-01', address: '127.0.1.1', state: 'active', weight: 100, ports: { imap: 10143, pop3: 10110, lmtp: 10024, admin: 10025 } });
      expect((await d.routeFor((await d.findLogin('admin'))!)).pair.state).toBe('draining');
      await expect(d.routeFor((await d.findLogin('dave'))!)).rejects.toBeInstanceOf(NotFoundError);
      await expect(d.routeFor((await d.findLogin('erin'))!)).rejects.toThrow(/retired/);
    });

    it('lists pairs with state and weight', async () => {
      const d = ctx().directory;
      const pairs = await d.listPairs();
      expect(pairs.map((p) => [p.id, p.state, p.weight])).toEqual([
        ['pair-01', 'active', 100],
        ['pair-02', 'active', 300],
        ['pair-03', 'retired', 1000],
        ['pair-04', 'draining', 1000],
      ]);
      expect((await d.getPair('pair-02'))?.address).toBe('127.0.2.1');
      expect(await d.getPair('pair-77')).toBeNull();
    });

    it('places new users on the active pair with the most free capacity, weight-aware', async () => {
      const d = ctx().directory;
      // pair-01: weight 100, 2 users → 98 free; pair-02: weight 300, 1 user → 299 free.
      expect((await d.placeNewUser()).id).toBe('pair-02');
      const placed: string[] = [];
      for (let i = 0; i < 4; i++) placed.push((await d.addUser({ uid: `placed${i}`, password: 'p', mail: `placed${i}@example.net` })).pair);
      expect(placed).toEqual(['pair-02', 'pair-02', 'pair-02', 'pair-02']);
      expect((await d.routeFor((await d.findLogin('placed0'))!)).pair.id).toBe('pair-02');
    });

    it('adds a user who can then log in; refuses a taken uid or address', async () => {
      const d = ctx().directory;
      const u = await d.addUser({ uid: 'frank', password: 'frank-pass', mail: 'Frank@example.net', aliases: ['f@example.net'], pair: 'pair-01', quotaBytes: 5000 });
      expect(u).toMatchObject({ uid: 'frank', mail: 'frank@example.net', aliases: ['f@example.net'], pair: 'pair-01', quotaBytes: 5000 });
      expect((await d.authenticate('f@example.net', 'frank-pass')).uid).toBe('frank');
      await expect(d.addUser({ uid: 'frank', password: 'x', mail: 'other@example.net' })).rejects.toBeInstanceOf(ConflictError);
      await expect(d.addUser({ uid: 'frank2', password: 'x', mail: 'postmaster@example.net' })).rejects.toBeInstanceOf(ConflictError);
      await expect(d.addUser({ uid: 'x)(uid=*', password: 'x', mail: 'x@example.net' })).rejects.toThrow(/not valid/);
      await expect(d.addUser({ uid: 'gina', password: 'x', mail: 'gina@example.net', pair: 'pair-03' })).rejects.toThrow(/retired/);
    });

    it('moves a user to another pair and the cached answer follows', async () => {
      const d = ctx().directory;
      expect((await d.findLogin('carol'))?.pair).toBe('pair-01');
      expect((await d.findRecipient('carol@example.net'))?.pair).toBe('pair-01');
      await d.setUserPair('carol', 'pair-02');
      expect((await d.findLogin('carol'))?.pair).toBe('pair-02');
      expect((await d.findRecipient('carol@example.net'))?.pair).toBe('pair-02');
      const other = await ctx().openAnother();
      try {
        expect((await other.findLogin('carol'))?.pair).toBe('pair-02');
      } finally {
        await other.close();
      }
      await expect(d.setUserPair('nobody', 'pair-02')).rejects.toBeInstanceOf(NotFoundError);
      await expect(d.setUserPair('carol', 'pair-77')).rejects.toBeInstanceOf(NotFoundError);
    });

    it('caches "no such user" for the negative TTL; invalidate drops it', async () => {
      const c = ctx();
      const d = c.directory;
      expect(await d.findLogin('latecomer')).toBeNull();
      await c.addBehindBack('latecomer', 'latecomer@example.net', 'pair-01');
      expect(await d.findLogin('latecomer')).toBeNull(); // negative entry still fresh
      await d.invalidate(['latecomer']);
      expect((await d.findLogin('latecomer'))?.pair).toBe('pair-01');
    });
  });
}
