/**
 * IMAP parser, response writer and sequence sets: input cut into 1, 3 and 17-byte chunks must
 * parse exactly as when whole; limits turn into error events and the stream resynchronises;
 * any bytes written by the writer parse back identically; a seeded fuzzer (seed printed, set
 * IMAP_FUZZ_SEED to replay) never makes the parser throw anything but ParseError.
 */
import { describe, expect, it } from 'vitest';
import { ImapFramer, ParseError, parseCommand, type CommandUnit, type FrameEvent, type ParsedCommand, type Token } from '../../pair-agent/store/imap/parser.ts';
import { DEFAULT_LIMITS, normalizeLimits } from '../../pair-agent/store/imap/limits.ts';
import { encodeSequence, toBuffer, atom } from '../../pair-agent/store/imap/writer.ts';
import { formatSet, inRanges, parseSeqSet, resolveRanges, STAR } from '../../pair-agent/store/imap/seqset.ts';

const CORPUS = [
  'a1 CAPABILITY\r\n',
  'a2 LOGIN {5}\r\nalice "pa\\"ss\\\\word"\r\n',
  'a3 SELECT "INBOX" (CONDSTORE)\r\n',
  'a4 FETCH 1:*,7 (FLAGS UID BODY.PEEK[HEADER.FIELDS (From "To" Subject)]<0.2048> BODYSTRUCTURE)\r\n',
  'a5 UID STORE 1:3 (UNCHANGEDSINCE 12) +FLAGS.SILENT (\\Seen $Forwarded)\r\n',
  'a6 APPEND Sent (\\Seen) " 5-Nov-2026 10:00:00 +0100" {12+}\r\nSubject: x\r\n\r\n',
  'a7 SEARCH CHARSET UTF-8 OR (FROM "bob" SINCE 1-Feb-2026) NOT HEADER X-Spam {3}\r\nyes\r\n',
  'a8 LIST "" [Gmail]/%\r\n',
  'a9 ID ("name" "imapflow" "x-originating-ip" "192.0.2.7")\r\n',
  'b1 APPEND INBOX {0}\r\n\r\n',
  'b2 NOOP\n',
];

function parseAll(events: FrameEvent[]): Array<ParsedCommand | string> {
  return events
    .filter((e) => e.kind !== 'continue')
    .map((e) => {
      if (e.kind === 'error') return `error:${e.tag}:${e.reason}`;
      if (e.kind !== 'unit') return 'x';
      try {
        return parseCommand(e.unit);
      } catch (err) {
        return `parse:${(err as ParseError).tag}:${(err as Error).message}`;
      }
    });
}

function feed(framer: ImapFramer, input: Buffer, chunk: number): FrameEvent[] {
  const out: FrameEvent[] = [];
  for (let i = 0; i < input.length; i += chunk) out.push(...framer.push(input.subarray(i, i + chunk)));
  return out;
}

const str = (t: Token | undefined) => (t && t.type === 'string' ? t.value.toString('utf8') : t && t.type === 'atom' ? t.value : undefined);

describe('imap framer and tokenizer', () => {
  const whole = Buffer.from(CORPUS.join(''));
  const reference = parseAll(new ImapFramer(DEFAULT_LIMITS).push(whole));

  it('parses the corpus whole', () => {
    expect(reference).toHaveLength(CORPUS.length);
    const cmds = reference as ParsedCommand[];
    expect(cmds.map((c) => c.name)).toEqual(['CAPABILITY', 'LOGIN', 'SELECT', 'FETCH', 'UID', 'APPEND', 'SEARCH', 'LIST', 'ID', 'APPEND', 'NOOP']);
    expect(str(cmds[1]!.args[0])).toBe('alice');
    expect(str(cmds[1]!.args[1])).toBe('pa"ss\\word');
    const fetchItems = cmds[3]!.args[1]!;
    expect(fetchItems.type).toBe('list');
    expect(fetchItems.type === 'list' && fetchItems.items[2]).toEqual({ type: 'atom', value: 'BODY.PEEK[HEADER.FIELDS (From "To" Subject)]<0.2048>' });
    expect(str(cmds[5]!.args[3])).toBe('Subject: x\r\n');
    expect(cmds[6]!.args.at(-1)).toEqual({ type: 'string', value: Buffer.from('yes'), literal: true });
    expect(str(cmds[7]!.args[1])).toBe('[Gmail]/%');
    expect(cmds[9]!.args[1]).toEqual({ type: 'string', value: Buffer.alloc(0), literal: true });
  });

  for (const size of [1, 3, 17]) {
    it(`gives the same commands when cut into ${size}-byte chunks`, () => {
      const events = feed(new ImapFramer(DEFAULT_LIMITS), whole, size);
      expect(parseAll(events)).toEqual(reference);
      // One continuation per synchronising literal ({5}, {3}); none for LITERAL+ or {0}.
      expect(events.filter((e) => e.kind === 'continue').map((e) => e.kind === 'continue' && e.tag)).toEqual(['a2', 'a7']);
    });
  }

  it('limits: zero is a value where it means something, refused where it would make every session unusable', () => {
    expect(normalizeLimits({ maxAuthFailures: 0, maxLiteralBytes: 0 })).toMatchObject({ maxAuthFailures: 0, maxLiteralBytes: 0 });
    for (const key of ['maxPipelined', 'maxLineBytes', 'maxCommandBytes', 'maxListDepth'] as const) {
      expect(() => normalizeLimits({ [key]: 0 })).toThrow(new RegExp(`${key} must be at least 1`));
    }
    expect(() => normalizeLimits({ maxPipelined: -1 })).toThrow(/non-negative integer/);
    expect(normalizeLimits({ maxPipelined: 1 }).maxPipelined).toBe(1);
  });

  it('refuses an over-long line with the tag, then resynchronises', () => {
    const limits = normalizeLimits({ maxLineBytes: 100 });
    for (const size of [1, 3, 17, 1000]) {
      const input = Buffer.from(`t1 LOGIN ${'x'.repeat(300)}\r\nt2 NOOP\r\n`);
      const out = parseAll(feed(new ImapFramer(limits), input, size));
      expect(out[0]).toBe('error:t1:line longer than 100 bytes');
      expect((out[1] as ParsedCommand).name).toBe('NOOP');
      expect(out).toHaveLength(2);
    }
  });

  it('refuses a synchronising literal over the limit without a continuation', () => {
    const framer = new ImapFramer(normalizeLimits({ maxLiteralBytes: 10 }));
    const events = framer.push(Buffer.from('t1 APPEND INBOX {11}\r\nt2 NOOP\r\n'));
    expect(events.some((e) => e.kind === 'continue')).toBe(false);
    const out = parseAll(events);
    expect(out[0]).toMatch(/^error:t1:literal of 11 bytes is larger than the limit/);
    expect((out[1] as ParsedCommand).tag).toBe('t2');
  });

  it('skips a refused LITERAL+ literal and the rest of its command', () => {
    for (const size of [1, 3, 17]) {
      const framer = new ImapFramer(normalizeLimits({ maxLiteralBytes: 10 }));
      const input = Buffer.from('t1 APPEND INBOX {20+}\r\nt9 NOOP\r\nt8 NOOP\r\nX {3+}\r\nabc tail\r\nt2 NOOP\r\n');
      const out = parseAll(feed(framer, input, size));
      expect(out[0]).toMatch(/^error:t1:/);
      expect(out.slice(1).map((c) => (c as ParsedCommand).tag)).toEqual(['t2']);
    }
  });

  it('bounds the number of literals and the command size', () => {
    const framer = new ImapFramer(normalizeLimits({ maxLiterals: 2 }));
    const out = parseAll(framer.push(Buffer.from('t1 X {1+}\r\na {1+}\r\nb {1+}\r\nc\r\nt2 NOOP\r\n')));
    expect(out[0]).toBe('error:t1:more than 2 literals in one command');
    expect((out.at(-1) as ParsedCommand).tag).toBe('t2');
  });

  const bad: Array<[string, RegExp]> = [
    ['t1 FETCH 1 (FLAGS UID\r\n', /missing \)/],
    ['t1 FETCH 1 FLAGS)\r\n', /unexpected \)/],
    ['t1 SELECT caf\xc3\xa9\r\n', /8-bit characters in atom/],
    ['t1 LOGIN "a\\x" b\r\n', /invalid escape/],
    ['t1 LOGIN "abc\r\n', /unterminated quoted string/],
    ['t1 FETCH 1 BODY[HEADER\r\n', /unbalanced brackets/],
    ['t1 LOGIN a  b\r\n', /expected a space/],
    ['t1 NOOP \r\n', /trailing space/],
    ['t1\r\n', /missing command name/],
    ['t\xff NOOP\r\n', /8-bit characters in tag/],
    ['t1 LOGIN a\x01b c\r\n', /control character/],
    ['t1 LOGIN {3}x\r\n', /literal announcement not at the end/],
  ];
  for (const [input, reason] of bad) {
    it(`rejects ${JSON.stringify(input)}`, () => {
      const out = parseAll(new ImapFramer(DEFAULT_LIMITS).push(Buffer.from(input, 'latin1')));
      expect(out).toHaveLength(1);
      expect(out[0]).toMatch(reason);
    });
  }

  it('limits list nesting', () => {
    const deep = `t1 X ${'('.repeat(40)}${')'.repeat(40)}\r\n`;
    const ev = new ImapFramer(DEFAULT_LIMITS).push(Buffer.from(deep));
    expect(() => parseCommand((ev[0] as { unit: CommandUnit }).unit, 16)).toThrow(/nested too deeply/);
  });
});

/** Mulberry32: small seeded PRNG so that a failing fuzz run can be replayed. */
function prng(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe('imap writer', () => {
  it('writes any bytes so that they parse back identically', () => {
    const seed = Number(process.env.IMAP_FUZZ_SEED ?? Date.now() % 1_000_000);
    console.log(`imap writer round-trip seed=${seed}`);
    const rnd = prng(seed);
    for (let n = 0; n < 300; n++) {
      const len = Math.floor(rnd() * (n % 10 === 0 ? 3000 : 40));
      const bytes = Buffer.alloc(len);
      const alphabet = rnd() < 0.5 ? [0x22, 0x5c, 0x0d, 0x0a, 0x00, 0x7b, 0x7d, 0x28, 0x29, 0xff, 0x20, 0x41] : null;
      for (let i = 0; i < len; i++) bytes[i] = alphabet ? alphabet[Math.floor(rnd() * alphabet.length)]! : Math.floor(rnd() * 256);
      const wire = toBuffer(['t1 X ', ...encodeSequence([bytes, [bytes, null, 7]]), '\r\n']);
      const framer = new ImapFramer(DEFAULT_LIMITS);
      const events = feed(framer, wire, 1 + Math.floor(rnd() * 20)).filter((e) => e.kind === 'unit');
      expect(events).toHaveLength(1);
      const cmd = parseCommand((events[0] as { unit: CommandUnit }).unit);
      const first = cmd.args[0]!;
      expect(first.type === 'string' && first.value.equals(bytes)).toBe(true);
      const list = cmd.args[1]!;
      expect(list.type === 'list' && list.items[0]!.type === 'string' && list.items[0].value.equals(bytes)).toBe(true);
    }
  });

  it('quotes short text and escapes quotes and backslashes', () => {
    expect(toBuffer(encodeSequence(['a "b" \\c', null, 42, atom('\\Seen'), ['x']])).toString()).toBe('"a \\"b\\" \\\\c" NIL 42 \\Seen ("x")');
    expect(toBuffer(encodeSequence([Buffer.from('é')])).toString('latin1')).toBe('{2}\r\n\xc3\xa9');
    expect(toBuffer(encodeSequence(['a\r\nb'])).toString()).toBe('{4}\r\na\r\nb');
  });
});

describe('imap parser fuzz', () => {
  it('never throws anything but ParseError and resynchronises after junk', () => {
    const seed = Number(process.env.IMAP_FUZZ_SEED ?? (Date.now() * 7) % 1_000_000);
    console.log(`imap parser fuzz seed=${seed}`);
    const rnd = prng(seed);
    const limits = normalizeLimits({ maxLineBytes: 512, maxLiteralBytes: 256, maxCommandBytes: 2048, maxLiterals: 4 });
    const tokens = ['(', ')', '"', '\\', '{', '}', '{5}', '{3+}', '{9999}', '{300+}', '[', ']', '<', '>', ' ', '\r\n', '\n', '*', '%', '\x00', '\xff', 'BODY[', 'NIL', 'a1', '1:*'];
    for (let round = 0; round < 400; round++) {
      const framer = new ImapFramer(limits);
      let junk = CORPUS[Math.floor(rnd() * CORPUS.length)]!;
      const edits = 1 + Math.floor(rnd() * 6);
      for (let e = 0; e < edits; e++) {
        const pos = Math.floor(rnd() * junk.length);
        const tok = tokens[Math.floor(rnd() * tokens.length)]!;
        junk = rnd() < 0.7 ? junk.slice(0, pos) + tok + junk.slice(pos) : junk.slice(0, pos) + junk.slice(pos + 1 + Math.floor(rnd() * 5));
      }
      const input = Buffer.from(junk, 'latin1');
      const events = feed(framer, input, 1 + Math.floor(rnd() * 17));
      for (const ev of events) {
        if (ev.kind !== 'unit') continue;
        try {
          parseCommand(ev.unit);
        } catch (err) {
          expect(err).toBeInstanceOf(ParseError);
        }
      }
      // Whatever state the junk left (an unfinished literal included), the framer's memory is bounded...
      const st = framer as unknown as { lineLen: number; literalParts: Buffer[] };
      expect(st.lineLen).toBeLessThanOrEqual(limits.maxLineBytes);
      expect(st.literalParts.reduce((n, b) => n + b.length, 0)).toBeLessThanOrEqual(limits.maxLiteralBytes);
      // ...and after enough filler to finish any pending literal and line, a clean command parses.
      const filler = Buffer.alloc(400, 0x20);
      const tail = [...framer.push(filler), ...framer.push(Buffer.from('\r\nz1 NOOP\r\nz2 NOOP\r\n'))];
      const last = tail.filter((e) => e.kind === 'unit').map((e) => {
        try {
          return parseCommand((e as { unit: CommandUnit }).unit).tag;
        } catch {
          return 'bad';
        }
      });
      expect(last.at(-1)).toBe('z2');
    }
  });
});

describe('sequence sets', () => {
  it('parses, resolves * and unordered ranges, and formats', () => {
    const s = parseSeqSet('4:2,7,9:*,*');
    expect(s.ranges).toEqual([[4, 2], [7, 7], [9, STAR], [STAR, STAR]]);
    expect(resolveRanges(s, 12)).toEqual([[2, 4], [7, 7], [9, 12]]);
    // A UID range n:* includes the highest UID even when n is above it (RFC 3501 6.4.8).
    const r = resolveRanges(parseSeqSet('559:*'), 20);
    expect(inRanges(r, 20)).toBe(true);
    expect(inRanges(r, 19)).toBe(false);
    expect(formatSet([1, 2, 3, 5, 7, 8])).toBe('1:3,5,7:8');
    for (const badSet of ['', '0', '1:0', 'a', '1,', ',1', '1::2', '4294967296', '-1', '1:2:3']) expect(() => parseSeqSet(badSet)).toThrow();
  });
});
