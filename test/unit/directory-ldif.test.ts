import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { attrValue, attrValues, formatEntry, formatLine, formatRecords, LdifError, parseLdif, parseLdifEntries } from '../../directory/ldif.ts';
import { checkPassword, hashPassword } from '../../directory/password.ts';
import { parsePorts, toPairRecord, toUserRecord } from '../../directory/records.ts';
import { choosePair } from '../../directory/placement.ts';
import { normalizeLogin } from '../../directory/directory.ts';
import type { PairRecord } from '../../directory/types.ts';

const SAMPLE = new URL('../../infra/ldap/sample.ldif', import.meta.url);

describe('LDIF parser', () => {
  it('reads the sample directory', () => {
    const entries = parseLdifEntries(readFileSync(SAMPLE, 'utf8'));
    const alice = entries.find((e) => e.dn === 'uid=alice,ou=people,dc=pairgate,dc=test')!;
    expect(attrValues(alice, 'mailLocalAddress')).toEqual(['a.example@example.net', 'postmaster@example.net']);
    expect(attrValue(alice, 'MAILHOST')).toBe('pair-01');
  });

  it('unfolds continuation lines, decodes base64 and skips comments and version', () => {
    const text = [
      'version: 1',
      '',
      '# a comment',
      '#  folded comment',
      '  continues here',
      'dn: uid=x,ou=people,dc=t',
      'description: a long value that is',
      '  folded across lines',
      'cn:: SsO8cmdlbg==',
      'mail: x@example.net',
      'mailLocalAddress:x2@example.net',
      '',
      '',
      'dn:: dWlkPXksb3U9cGVvcGxlLGRjPXQ=',
      'uid: y',
    ].join('\r\n');
    const recs = parseLdif(text);
    expect(recs.map((r) => r.entry?.dn ?? null)).toEqual([null, 'uid=x,ou=people,dc=t', 'uid=y,ou=people,dc=t']);
    const x = recs[1]!.entry!;
    expect(attrValue(x, 'description')).toBe('a long value that is folded across lines');
    expect(attrValue(x, 'cn')).toBe('Jürgen');
    expect(attrValue(x, 'mailLocalAddress')).toBe('x2@example.net');
    expect(recs[1]!.comments).toEqual(['# a comment', '#  folded comment continues here']);
  });

  it('names the line of a malformed record', () => {
    expect(() => parseLdif('dn: a=b\nthis is not ldif\n', 'f.ldif')).toThrow(LdifError);
    expect(() => parseLdif('dn: a=b\nthis is not ldif\n', 'f.ldif')).toThrow(/f\.ldif:2/);
    expect(() => parseLdif('cn: no dn first\n', 'f.ldif')).toThrow(/f\.ldif:1: expected "dn:"/);
    expect(() => parseLdif('dn: a=b\ncn:: @@@\n', 'f.ldif')).toThrow(/base64/);
    expect(() => parseLdif('dn: a=b\nchangetype: delete\n', 'f.ldif')).toThrow(/changetype delete/);
  });

  it('gives the same entries whatever the chunking of lines (fold at 1, 3, 17 columns)', () => {
    const value = 'ü'.repeat(30) + ' and text';
    const line = formatLine('description', value);
    for (const width of [1, 3, 17]) {
      const unfolded = line.replace(/\n /g, '');
      const parts: string[] = [unfolded.slice(0, width)];
      for (let i = width; i < unfolded.length; i += width) parts.push(` ${unfolded.slice(i, i + width)}`);
      const e = parseLdifEntries(`dn: cn=x\n${parts.join('\n')}\n`)[0]!;
      expect(attrValue(e, 'description')).toBe(value);
    }
  });

  it('writes base64 for unsafe values and folds at 76 columns; round-trips', () => {
    expect(formatLine('cn', 'plain')).toBe('cn: plain');
    expect(formatLine('cn', ' leading')).toMatch(/^cn:: /);
    expect(formatLine('cn', 'trailing ')).toMatch(/^cn:: /);
    expect(formatLine('cn', 'Jürgen')).toBe('cn:: SsO8cmdlbg==');
    const long = formatLine('description', 'x'.repeat(200));
    expect(long.split('\n').every((l) => l.length <= 76)).toBe(true);
    const entry = { dn: 'uid=ü,dc=t', attrs: [['cn', 'Jürgen'], ['description', 'x'.repeat(200)], ['sn', ':colon']] as Array<[string, string]> };
    expect(parseLdifEntries(formatEntry(entry))[0]).toEqual(entry);
  });

  it('keeps other records byte for byte when one is rewritten', () => {
    const text = '# header\n\ndn: cn=a\ncn: a\n# inner comment\n\ndn: cn=b\ncn: b\n';
    const recs = parseLdif(text);
    expect(formatRecords(recs)).toBe(text);
  });
});

describe('passwords', () => {
  it('checks {SSHA}, {SSHA256}, {SSHA512} and cleartext', () => {
    for (const s of ['SSHA', 'SSHA256', 'SSHA512'] as const) {
      const h = hashPassword('sekrit', s);
      expect(checkPassword(h, 'sekrit')).toBe('ok');
      expect(checkPassword(h, 'sekriT')).toBe('mismatch');
    }
    expect(checkPassword('plain', 'plain')).toBe('ok');
    expect(checkPassword('plain', 'plainx')).toBe('mismatch');
    expect(checkPassword('{CRYPT}$6$abc$def', 'x')).toBe('unsupported');
    expect(checkPassword('{SSHA}short', 'x')).toBe('mismatch');
  });
  it('reads the sample hashes (slappasswd {SSHA})', () => {
    expect(checkPassword('{SSHA}8D1bxcTKTok+ar8Yn5RwrNrgXZB16ipq', 'alice-pass')).toBe('ok');
  });
});

describe('records and placement', () => {
  const attrs = (o: Record<string, string[]>) => new Map(Object.entries(o).map(([k, v]) => [k.toLowerCase(), v]));
  it('parses pairgatePorts into a ports object', () => {
    expect(parsePorts(['imap=10143,pop3=10110,lmtp=10024,admin=10025'])).toEqual({ ports: { imap: 10143, pop3: 10110, lmtp: 10024, admin: 10025 }, bad: [] });
    expect(parsePorts(['imap=10143', 'pop3=x', 'smtp=70000'])).toEqual({ ports: { imap: 10143 }, bad: ['pop3=x', 'smtp=70000'] });
  });
  it('maps entries to records with lower-cased addresses', () => {
    const u = toUserRecord('uid=A,dc=t', attrs({ uid: ['A'], mail: ['A@Example.NET'], mailLocalAddress: ['b@example.net', 'a@example.net'], mailHost: ['pair-01'] }))!;
    expect(u).toEqual({ dn: 'uid=A,dc=t', uid: 'A', mail: 'a@example.net', aliases: ['b@example.net'], pair: 'pair-01' });
    // Aliases: lower-cased, without the primary address or repeats, in order (a short list and a long one).
    const short = toUserRecord('uid=A,dc=t', attrs({ uid: ['A'], mail: ['a@x.net'], mailLocalAddress: ['C@x.net', 'b@x.net', 'c@X.net', ' ', 'A@x.net'] }))!;
    expect(short.aliases).toEqual(['c@x.net', 'b@x.net']);
    const many = Array.from({ length: 40 }, (_, i) => `u${i % 20}@x.net`);
    expect(toUserRecord('uid=A,dc=t', attrs({ uid: ['A'], mailLocalAddress: many }))!.aliases).toEqual(many.slice(0, 20));
    const problems: Array<{ dn: string; problem: string }> = [];
    const p = toPairRecord('cn=p,dc=t', attrs({ cn: ['p'], pairgateAddress: ['10.0.0.1'], pairgateState: ['Bogus'], pairgateWeight: ['50'], pairgatePorts: ['imap=1'] }), problems)!;
    expect(p).toMatchObject({ id: 'p', state: 'maintenance', weight: 50, ports: { imap: 1 } });
    expect(problems[0]!.problem).toMatch(/pairgateState/);
  });
  it('places on the active pair with the most free capacity, ties by id', () => {
    const pair = (id: string, weight: number, state: PairRecord['state'] = 'active'): PairRecord => ({ id, dn: `cn=${id}`, address: '', ports: {}, state, weight });
    const pairs = [pair('p3', 100), pair('p1', 100), pair('p2', 300), pair('p4', 1000, 'draining'), pair('p5', 1000, 'retired')];
    expect(choosePair(pairs, new Map([['p2', 250]]))!.id).toBe('p1');
    expect(choosePair(pairs, new Map([['p2', 10]]))!.id).toBe('p2');
    expect(choosePair(pairs, new Map([['p1', 5], ['p2', 205], ['p3', 5]]))!.id).toBe('p1');
    expect(choosePair([pair('x', 10, 'maintenance')], new Map())).toBeNull();
  });
  it('normalizes logins: addresses lower-cased, uids exact, junk refused', () => {
    expect(normalizeLogin(' Alice@Example.NET ')).toBe('alice@example.net');
    expect(normalizeLogin('Alice')).toBe('Alice');
    expect(normalizeLogin('Alice', true)).toBe('alice');
    expect(normalizeLogin('')).toBeNull();
    expect(normalizeLogin('a\r\nb')).toBeNull();
    expect(normalizeLogin('x'.repeat(400))).toBeNull();
  });
});
