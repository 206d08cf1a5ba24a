/**
 * The IMAP command parser, in two pure layers (no sockets, no storage), after smtp-server's
 * lib/smtp-stream.js and wildduck's imap-core/lib/handler/imap-parser.js:
 *
 * 1. `ImapFramer` is fed byte chunks of any size and cuts them into command units: a command
 *    line plus the literals it announces (`{n}` synchronising, `{n+}` LITERAL+), each followed by
 *    the rest of the line. It tells the session when to send a `+` continuation, and turns
 *    over-long lines, over-large literals and over-large commands into error events while
 *    skipping exactly the bytes the client will send, so the next command parses cleanly.
 *    Memory is bounded by the limits whatever the peer sends.
 * 2. `parseCommand` tokenises one unit into tag, command name and arguments: atoms, quoted
 *    strings, literals, parenthesised lists, and bracketed sections kept inside their atom
 *    (`BODY[HEADER.FIELDS (From)]<0.10>`, and mailbox names such as `[Gmail]/Sent`).
 */
import type { ImapLimits } from './limits.ts';

export type Token =
  | { type: 'atom'; value: string }
  | { type: 'string'; value: Buffer; literal: boolean }
  | { type: 'list'; items: Token[] };

export interface ParsedCommand {
  tag: string;
  /** Upper-cased command name. */
  name: string;
  args: Token[];
}

/** A unit of input: lines (CRLF stripped) alternating with the literals they announce. */
export interface CommandUnit {
  segments: Buffer[];
  /** Total bytes read for the unit (lines, CRLFs and literals). */
  size: number;
}

export type FrameEvent =
  | { kind: 'unit'; unit: CommandUnit }
  /** A synchronising literal was announced and accepted: send `+ …` now. */
  | { kind: 'continue'; tag: string; size: number }
  /** Input that cannot form a command; `tag` is the best guess (`*` when none). */
  | { kind: 'error'; tag: string; reason: string };

export class ParseError extends Error {
  constructor(
    message: string,
    readonly tag = '*',
  ) {
    super(message);
    this.name = 'ParseError';
  }
}

const CR = 0x0d;
const LF = 0x0a;
const LITERAL_END = /\{(\d{1,20})(\+?)\}$/;

type FramerState =
  | { name: 'line' }
  | { name: 'literal'; remaining: number }
  /** Skipping the rest of an over-long line; `tail` keeps its last bytes to spot a `{n+}` at its end. */
  | { name: 'skip-line'; tail: string }
  /** Skipping a refused non-synchronising literal, then the rest of its command. */
  | { name: 'skip-literal'; remaining: number };

/** Whether `line` (CRLF stripped) ends with a literal announcement outside a quoted string. */
function literalAtEnd(line: Buffer): { size: number; sync: boolean } | null {
  if (line.length < 3 || line[line.length - 1] !== 0x7d) return null;
  let inQuote = false;
  let open = -1;
  for (let i = 0; i < line.length; i++) {
    const c = line[i]!;
    if (inQuote) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inQuote = false;
    } else if (c === 0x22) inQuote = true;
    else if (c === 0x7b) open = i;
  }
  if (inQuote || open < 0) return null;
  const m = LITERAL_END.exec(line.subarray(open).toString('latin1'));
  if (!m) return null;
  return { size: Number(m[1]), sync: m[2] !== '+' };
}

function guessTag(first: Buffer | string): string {
  const s = typeof first === 'string' ? first : first.subarray(0, 64).toString('latin1');
  const m = /^([\x21\x23\x24\x26\x27\x2c-\x5b\x5e-\x7a\x7c\x7e]+)(?:[ \r\n]|$)/.exec(s);
  return m ? m[1]! : '*';
}

export class ImapFramer {
  private state: FramerState = { name: 'line' };
  private line: Buffer[] = [];
  private lineLen = 0;
  private segments: Buffer[] = [];
  private unitSize = 0;
  private literalParts: Buffer[] = [];
  private tag = '*';

  constructor(private readonly limits: Pick<ImapLimits, 'maxLineBytes' | 'maxLiteralBytes' | 'maxCommandBytes' | 'maxLiterals'>) {}

  /** True while a command is partly read (used by STARTTLS to refuse pipelined plaintext). */
  get pending(): boolean {
    return this.lineLen > 0 || this.segments.length > 0 || this.state.name !== 'line';
  }

  push(chunk: Buffer): FrameEvent[] {
    const events: FrameEvent[] = [];
    let pos = 0;
    while (pos < chunk.length) {
      const st = this.state;
      if (st.name === 'literal') {
        const take = Math.min(st.remaining, chunk.length - pos);
        this.literalParts.push(chunk.subarray(pos, pos + take));
        pos += take;
        st.remaining -= take;
        if (st.remaining === 0) {
          this.segments.push(this.literalParts.length === 1 ? Buffer.from(this.literalParts[0]!) : Buffer.concat(this.literalParts));
          this.literalParts = [];
          this.state = { name: 'line' };
        }
        continue;
      }
      if (st.name === 'skip-literal') {
        const take = Math.min(st.remaining, chunk.length - pos);
        pos += take;
        st.remaining -= take;
        // After the literal comes the rest of its command line, skipped the same way.
        if (st.remaining === 0) this.state = { name: 'skip-line', tail: '' };
        continue;
      }
      const lf = chunk.indexOf(LF, pos);
      const end = lf < 0 ? chunk.length : lf;
      if (st.name === 'skip-line') {
        st.tail = (st.tail + chunk.subarray(pos, end).toString('latin1')).slice(-32);
        pos = end;
        if (lf < 0) continue;
        pos = lf + 1;
        this.state = { name: 'line' };
        const lit = literalAtEnd(Buffer.from(st.tail.replace(/\r$/, ''), 'latin1'));
        // A non-synchronising literal at the end of a skipped line arrives anyway: skip it too.
        if (lit && !lit.sync) this.state = { name: 'skip-literal', remaining: lit.size };
        continue;
      }
      // state 'line'
      const piece = chunk.subarray(pos, end);
      if (this.lineLen + piece.length > this.limits.maxLineBytes) {
        const first = this.segments[0] ?? Buffer.concat([...this.line, piece]);
        this.resetUnit();
        events.push({ kind: 'error', tag: guessTag(first), reason: `line longer than ${this.limits.maxLineBytes} bytes` });
        this.state = { name: 'skip-line', tail: piece.subarray(-32).toString('latin1') };
        continue;
      }
      if (piece.length > 0) {
        this.line.push(piece);
        this.lineLen += piece.length;
      }
      pos = end;
      if (lf < 0) continue;
      pos = lf + 1;
      let line = this.line.length === 1 ? Buffer.from(this.line[0]!) : Buffer.concat(this.line);
      this.unitSize += this.lineLen + 1;
      this.line = [];
      this.lineLen = 0;
      if (line.length > 0 && line[line.length - 1] === CR) line = line.subarray(0, line.length - 1);
      if (this.segments.length === 0) this.tag = guessTag(line);
      const lit = literalAtEnd(line);
      this.segments.push(line);
      if (!lit) {
        events.push({ kind: 'unit', unit: { segments: this.segments, size: this.unitSize } });
        this.segments = [];
        this.unitSize = 0;
        continue;
      }
      const literals = (this.segments.length + 1) / 2;
      let refusal: string | null = null;
      if (lit.size > this.limits.maxLiteralBytes) refusal = `literal of ${lit.size} bytes is larger than the limit of ${this.limits.maxLiteralBytes}`;
      else if (this.unitSize + lit.size > this.limits.maxCommandBytes) refusal = `command larger than ${this.limits.maxCommandBytes} bytes`;
      else if (literals > this.limits.maxLiterals) refusal = `more than ${this.limits.maxLiterals} literals in one command`;
      if (refusal) {
        const tag = this.tag;
        this.resetUnit();
        events.push({ kind: 'error', tag, reason: refusal });
        // A synchronising literal is never sent once refused; a LITERAL+ one is on its way and is skipped.
        if (!lit.sync) this.state = { name: 'skip-literal', remaining: lit.size };
        continue;
      }
      this.unitSize += lit.size;
      if (lit.size === 0) {
        this.segments.push(Buffer.alloc(0));
        continue;
      }
      this.state = { name: 'literal', remaining: lit.size };
      if (lit.sync) events.push({ kind: 'continue', tag: this.tag, size: lit.size });
    }
    return events;
  }

  private resetUnit(): void {
    this.line = [];
    this.lineLen = 0;
    this.segments = [];
    this.unitSize = 0;
    this.literalParts = [];
  }
}

const SP = 0x20;

function isAtomChar(c: number): boolean {
  // ATOM-CHAR: any CHAR except atom-specials: ( ) { SP CTL % * " \ ]. `%`, `*` (list wildcards,
  // sequence `*`), `]` (allowed in astrings) and a leading `\` (flags) are admitted here and left
  // to each command's own checks.
  return c > 0x20 && c < 0x7f && c !== 0x28 && c !== 0x29 && c !== 0x7b && c !== 0x22;
}

function isTagChar(c: number): boolean {
  return isAtomChar(c) && c !== 0x2b && c !== 0x5c && c !== 0x25 && c !== 0x2a;
}

/** Tokenises one command unit. Throws ParseError with the tag when it is known. */
export function parseCommand(unit: CommandUnit, maxDepth = 16): ParsedCommand {
  const segs = unit.segments;
  let seg = 0;
  let line = segs[0] ?? Buffer.alloc(0);
  let i = 0;

  let tagEnd = 0;
  while (tagEnd < line.length && line[tagEnd] !== SP) tagEnd++;
  const rawTag = line.subarray(0, tagEnd);
  if (rawTag.length === 0) throw new ParseError('empty command line');
  for (const c of rawTag) if (!isTagChar(c)) throw new ParseError(c >= 0x80 ? '8-bit characters in tag' : 'invalid character in tag');
  const tag = rawTag.toString('latin1');
  if (tagEnd >= line.length) throw new ParseError('missing command name', tag);
  i = tagEnd + 1;
  let nameEnd = i;
  while (nameEnd < line.length && line[nameEnd] !== SP) nameEnd++;
  const rawName = line.subarray(i, nameEnd);
  if (rawName.length === 0) throw new ParseError('missing command name', tag);
  for (const c of rawName) {
    const alpha = (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) || c === 0x2d || c === 0x2e;
    if (!alpha) throw new ParseError(c >= 0x80 ? '8-bit characters in command name' : 'invalid character in command name', tag);
  }
  const name = rawName.toString('latin1').toUpperCase();
  i = nameEnd;

  const fail = (msg: string): never => {
    throw new ParseError(msg, tag);
  };

  const parseAtom = (): Token => {
    const start = i;
    let bracket = 0;
    let inQuote = false;
    while (i < line.length) {
      const c = line[i]!;
      if (bracket > 0) {
        // Inside `[...]`: a section spec, which may hold spaces, lists and quoted header names.
        if (c >= 0x80 || c < 0x20 || c === 0x7f) fail(c >= 0x80 ? '8-bit characters in atom' : 'control character in atom');
        if (inQuote) {
          if (c === 0x5c) i++;
          else if (c === 0x22) inQuote = false;
        } else if (c === 0x22) inQuote = true;
        else if (c === 0x5b) bracket++;
        else if (c === 0x5d) bracket--;
        i++;
        continue;
      }
      if (c === SP || c === 0x29 || c === 0x28) break;
      if (c === 0x5b) {
        bracket++;
        i++;
        continue;
      }
      if (c >= 0x80) fail('8-bit characters in atom');
      if (!isAtomChar(c)) fail(c < 0x20 || c === 0x7f ? 'control character in atom' : `invalid character ${JSON.stringify(String.fromCharCode(c))} in atom`);
      if (c === 0x5c && i !== start) fail('backslash inside an atom');
      i++;
    }
    if (bracket > 0) fail('unbalanced brackets');
    return { type: 'atom', value: line.subarray(start, i).toString('latin1') };
  };

  const parseQuoted = (): Token => {
    i++; // opening quote
    const out: number[] = [];
    while (i < line.length) {
      const c = line[i]!;
      if (c === 0x5c) {
        const n = line[i + 1];
        if (n !== 0x22 && n !== 0x5c) fail('invalid escape in quoted string');
        out.push(n!);
        i += 2;
        continue;
      }
      if (c === 0x22) {
        i++;
        return { type: 'string', value: Buffer.from(out), literal: false };
      }
      if (c === 0 ) fail('NUL in quoted string');
      out.push(c);
      i++;
    }
    return fail('unterminated quoted string');
  };

  const parseLiteral = (): Token => {
    const m = LITERAL_END.exec(line.subarray(i).toString('latin1'));
    if (!m || i + m[0].length !== line.length) fail('literal announcement not at the end of the line');
    if (seg + 2 >= segs.length) fail('missing literal data');
    const value = segs[seg + 1]!;
    seg += 2;
    line = segs[seg]!;
    i = 0;
    return { type: 'string', value, literal: true };
  };

  const parseItems = (depth: number, closing: boolean): Token[] => {
    const items: Token[] = [];
    for (;;) {
      if (i >= line.length) {
        if (closing) fail('unbalanced parentheses: missing )');
        return items;
      }
      const c = line[i]!;
      if (c === 0x29) {
        if (!closing) fail('unbalanced parentheses: unexpected )');
        i++;
        return items;
      }
      if (items.length > 0 || !closing) {
        // Arguments are separated by one space; the first item of a list follows "(" directly.
        if (c !== SP) fail('expected a space between arguments');
        i++;
        if (i >= line.length) fail(closing ? 'unbalanced parentheses: missing )' : 'trailing space');
      }
      const d = line[i]!;
      if (d === 0x28) {
        if (depth + 1 > maxDepth) fail('lists nested too deeply');
        i++;
        items.push({ type: 'list', items: parseItems(depth + 1, true) });
      } else if (d === 0x22) items.push(parseQuoted());
      else if (d === 0x7b) items.push(parseLiteral());
      else if (d === 0x29) {
        if (!closing) fail('unbalanced parentheses: unexpected )');
        // "( )" or "(a )": tolerate a space before the closing parenthesis.
        i++;
        return items;
      } else if (d === SP) fail('expected a space between arguments');
      else items.push(parseAtom());
      // After an item: space, ")" or end.
      if (i < line.length && line[i] !== SP && line[i] !== 0x29) fail('expected a space between arguments');
    }
  };

  const args = parseItems(0, false);
  return { tag, name, args };
}
