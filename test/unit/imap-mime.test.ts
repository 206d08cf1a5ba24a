/**
 * The fast path for top-level sections (HEADER, TEXT, HEADER.FIELDS[.NOT] without the MIME tree)
 * cuts exactly the bytes the full parse does, on ordinary and awkward messages.
 */
import { describe, expect, it } from 'vitest';
import { decodeHeader, extractSection, extractTopSection, parseMime, parseTopHeaders, type SectionSpec } from '../../pair-agent/store/imap/mime.ts';

const MESSAGES: Record<string, string> = {
  plain: 'From: a@example.org\r\nSubject: hi\r\nTo: b@example.org\r\n\r\nbody\r\n',
  folded: 'Subject: a long\r\n  folded subject\r\nX-Other: 1\r\nsubject: second\r\n\r\nbody',
  lfOnly: 'From: a@example.org\nSubject: lf\n\nbody\n',
  noBody: 'From: a@example.org\r\nSubject: none\r\n',
  emptyHeader: '\r\nonly a body\r\n',
  multipart:
    'Content-Type: multipart/mixed; boundary="b1"\r\nSubject: mp\r\n\r\npre\r\n--b1\r\nContent-Type: text/plain\r\n\r\none\r\n--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body\r\n--b1--\r\n',
  eightBit: 'Subject: Gr\xfc\xdfe\r\nFrom: \xe9@example.org\r\n\r\n\x00\xff binary',
  empty: '',
};

const SPECS: SectionSpec[] = [
  { path: [], specifier: '', fields: [] },
  { path: [], specifier: 'HEADER', fields: [] },
  { path: [], specifier: 'TEXT', fields: [] },
  { path: [], specifier: 'HEADER.FIELDS', fields: ['Subject', 'FROM'] },
  { path: [], specifier: 'HEADER.FIELDS.NOT', fields: ['subject'] },
  { path: [], specifier: 'HEADER.FIELDS', fields: ['X-Missing'] },
];

describe('extractTopSection', () => {
  for (const [name, text] of Object.entries(MESSAGES)) {
    it(`cuts the same bytes as the full parse: ${name}`, () => {
      const buf = Buffer.from(text, 'latin1');
      for (const spec of SPECS) {
        const fast = extractTopSection(buf, spec);
        expect(fast, `${spec.specifier}`).not.toBeNull();
        expect(fast!.equals(extractSection(buf, parseMime(buf), spec)), `${name} ${spec.specifier} ${spec.fields.join(',')}`).toBe(true);
      }
    });
  }

  it('leaves part sections and MIME to the full parse', () => {
    const buf = Buffer.from(MESSAGES.multipart!, 'latin1');
    expect(extractTopSection(buf, { path: [1], specifier: '', fields: [] })).toBeNull();
    expect(extractTopSection(buf, { path: [2], specifier: 'HEADER', fields: [] })).toBeNull();
    expect(extractTopSection(buf, { path: [1], specifier: 'MIME', fields: [] })).toBeNull();
  });
});

describe('parseTopHeaders (SEARCH on header keys without the MIME tree)', () => {
  for (const [name, text] of Object.entries(MESSAGES)) {
    it(`gives the same fields as the full parse: ${name}`, () => {
      const buf = Buffer.from(text, 'latin1');
      const fast = parseTopHeaders(buf).map((h) => [h.key, h.value, h.raw.toString('latin1')]);
      expect(fast).toEqual(parseMime(buf).headers.map((h) => [h.key, h.value, h.raw.toString('latin1')]));
    });
  }

  it('with a set of names, gives just those fields, the same as the full parse', () => {
    for (const [name, text] of Object.entries(MESSAGES)) {
      const buf = Buffer.from(text, 'latin1');
      const only = new Set(['subject', 'from']);
      const fast = parseTopHeaders(buf, only).map((h) => [h.key, h.value, h.raw.toString('latin1')]);
      const full = parseMime(buf).headers.filter((h) => only.has(h.key)).map((h) => [h.key, h.value, h.raw.toString('latin1')]);
      expect(fast, name).toEqual(full);
    }
  });

  it('decodes encoded words and leaves other values as they are', () => {
    expect(decodeHeader('=?utf-8?q?J=C3=BCrgen?= <j@example.org>')).toBe('Jürgen <j@example.org>');
    expect(decodeHeader('plain = value ?')).toBe('plain = value ?');
  });
});
