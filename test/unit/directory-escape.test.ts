import { describe, expect, it } from 'vitest';
import { escapeDnValue, escapeFilterValue, normalizeDn, parentDn, splitDn, unescapeFilterValue } from '../../directory/escape.ts';

describe('escapeFilterValue (RFC 4515)', () => {
  it('escapes the filter metacharacters and NUL', () => {
    expect(escapeFilterValue('*)(uid=*')).toBe('\\2a\\29\\28uid=\\2a');
    expect(escapeFilterValue('admin)(|(uid=*')).toBe('admin\\29\\28|\\28uid=\\2a');
    expect(escapeFilterValue('a\\b')).toBe('a\\5cb');
    expect(escapeFilterValue('a\0b')).toBe('a\\00b');
  });
  it('escapes every non-ASCII octet of the UTF-8 form', () => {
    expect(escapeFilterValue('café')).toBe('caf\\c3\\a9');
    expect(escapeFilterValue('日')).toBe('\\e6\\97\\a5');
  });
  it('leaves ordinary values alone', () => {
    expect(escapeFilterValue('alice@example.net')).toBe('alice@example.net');
    expect(escapeFilterValue('a.b+c-d_e')).toBe('a.b+c-d_e');
  });
  it('round-trips through unescapeFilterValue', () => {
    for (const v of ['*)(uid=*', 'café\\x', '\0', 'plain', '((((', 'ü*ß']) expect(unescapeFilterValue(escapeFilterValue(v))).toBe(v);
  });
  it('never lets a parenthesis, star or backslash through (seeded fuzz)', () => {
    let seed = 1234;
    const rnd = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    const alphabet = ['*', '(', ')', '\\', '\0', 'a', '=', '|', '&', 'é', ' ', '!'];
    for (let i = 0; i < 500; i++) {
      const v = Array.from({ length: 1 + Math.floor(rnd() * 12) }, () => alphabet[Math.floor(rnd() * alphabet.length)]).join('');
      const e = escapeFilterValue(v);
      expect(e, `seed 1234 case ${i}: ${JSON.stringify(v)}`).not.toMatch(/[*()\0]|\\(?![0-9a-f]{2})/);
      expect(unescapeFilterValue(e)).toBe(v);
    }
  });
});

describe('escapeDnValue (RFC 4514)', () => {
  it('escapes the DN specials', () => {
    expect(escapeDnValue('a,b')).toBe('a\\,b');
    expect(escapeDnValue('a+b;c<d>e"f\\g=h')).toBe('a\\+b\\;c\\<d\\>e\\"f\\\\g\\=h');
    expect(escapeDnValue('x\0y')).toBe('x\\00y');
  });
  it('escapes a leading space or # and a trailing space', () => {
    expect(escapeDnValue(' lead')).toBe('\\ lead');
    expect(escapeDnValue('#hash')).toBe('\\#hash');
    expect(escapeDnValue('trail ')).toBe('trail\\ ');
    expect(escapeDnValue('mid#dle x')).toBe('mid#dle x');
  });
  it('keeps UTF-8 as it is', () => {
    expect(escapeDnValue('jürgen')).toBe('jürgen');
  });
  it('an escaped value stays one RDN', () => {
    const dn = `uid=${escapeDnValue('evil,ou=admins')},ou=people,dc=x`;
    expect(splitDn(dn)).toEqual(['uid=evil\\,ou\\=admins', 'ou=people', 'dc=x']);
    expect(parentDn(dn)).toBe('ou=people,dc=x');
  });
});

describe('normalizeDn', () => {
  it('compares DNs regardless of case and spaces after commas', () => {
    expect(normalizeDn('UID=Alice, ou=People,DC=pairgate')).toBe(normalizeDn('uid=alice,ou=people,dc=pairgate'));
  });
});
