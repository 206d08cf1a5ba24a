/**
 * ldap-batch's pure parts: which values may share a search, and how a shared search's entries
 * are handed back (and when its answer must not be used). The batcher against a real slapd is
 * in directory-ldap.test.ts.
 */
import { describe, expect, it } from 'vitest';
import type { Entry } from 'ldapts';
import { attribute, batchable, LookupBatcher, lookupAttributes, type Lookup } from '../../directory/ldap-batch.ts';

const entry = (uid: string, mail: string, aliases: string[] = []): Entry => ({ dn: `uid=${uid},ou=people,dc=x`, uid, mail, mailLocalAddress: aliases, mailHost: 'pair-01' }) as Entry;

describe('ldap-batch', () => {
  it('batches only printable ASCII values without spaces', () => {
    expect(batchable('alice')).toBe(true);
    expect(batchable('a.example+tag@Example.NET')).toBe(true);
    expect(batchable('*)(uid=*')).toBe(true); // travels as an assertion value either way
    expect(batchable('al ice')).toBe(false);
    expect(batchable(' alice')).toBe(false);
    expect(batchable('zoë@example.net')).toBe(false);
    expect(batchable('')).toBe(false);
    expect(batchable('a\tb')).toBe(false);
  });

  it('a login matches uid, and the addresses when it has an @; a recipient only the addresses', () => {
    expect(lookupAttributes('login', 'alice')).toEqual(['uid']);
    expect(lookupAttributes('login', 'alice@example.net')).toEqual(['uid', 'mail', 'mailLocalAddress']);
    expect(lookupAttributes('recipient', 'alice@example.net')).toEqual(['mail', 'mailLocalAddress']);
  });

  it('hands each entry to every look-up it matches, case-insensitively, trailing spaces ignored', () => {
    const alice = entry('alice', 'alice@example.net', ['Postmaster@Example.net']);
    const bob = entry('Bob ', 'bob@example.net');
    const lookups: Lookup[] = [
      { kind: 'login', value: 'ALICE' },
      { kind: 'recipient', value: 'postmaster@example.NET' },
      { kind: 'login', value: 'bob' },
      { kind: 'recipient', value: 'bob' }, // a recipient is never matched by uid
      { kind: 'login', value: 'nobody' },
    ];
    expect(attribute(lookups, [alice, bob])).toEqual([[alice], [alice], [bob], [], []]);
  });

  it('an entry matching two look-ups goes to both; two entries matching one go to it (ambiguity is decided as alone)', () => {
    const a = entry('a', 'shared@example.net');
    const b = entry('b', 'b@example.net', ['shared@example.net']);
    expect(attribute([{ kind: 'login', value: 'shared@example.net' }, { kind: 'login', value: 'a' }], [a, b])).toEqual([[a, b], [a]]);
  });

  it('reads attribute descriptions with options and in any case; an entry matching one look-up twice is given once', () => {
    const e = { dn: 'uid=c,dc=x', UID: 'c', 'mail;lang-en': 'c@example.net', mailLocalAddress: ['c@example.net'] } as unknown as Entry;
    expect(attribute([{ kind: 'login', value: 'c@example.net' }, { kind: 'login', value: 'C' }], [e])).toEqual([[e], [e]]);
    // A value matching only on an attribute the look-up does not use (a recipient on uid) is no match.
    expect(attribute([{ kind: 'recipient', value: 'c' }], [e])).toBeNull();
  });

  it('refuses an answer it cannot hand back exactly: an entry matching none, or with a value beyond printable ASCII', () => {
    const lookups: Lookup[] = [{ kind: 'login', value: 'alice' }, { kind: 'login', value: 'bob' }];
    expect(attribute(lookups, [entry('alice', 'alice@example.net'), entry('carol', 'carol@example.net')])).toBeNull();
    expect(attribute(lookups, [entry('alice', 'alice@example.net'), entry('bob', 'bob@example.net', ['bøb@example.net'])])).toBeNull();
    expect(attribute(lookups, [entry('alice', 'alice@example.net'), entry('bob\u0001', 'bob@example.net')])).toBeNull();
  });

  it('a batch answer that cannot be read is asked again one look-up at a time, never left unsettled', async () => {
    const unreadable = { dn: 'uid=x,dc=x', uid: { toString: () => { throw new Error('odd value'); } } } as unknown as Entry;
    const alice = entry('alice', 'alice@example.net');
    const bob = entry('bob', 'bob@example.net');
    const ops: string[] = [];
    const batcher = new LookupBatcher({
      maxBatch: 16,
      search: async (_filter, _limit, op) => {
        ops.push(op);
        if (op === 'batch') return [unreadable];
        return ops.length === 2 ? [alice] : [bob];
      },
    });
    const answers = await Promise.all([batcher.lookup('login', 'alice'), batcher.lookup('login', 'bob')]);
    expect(ops).toEqual(['batch', 'login', 'login']);
    expect(answers).toEqual([[alice], [bob]]);
  });
});
