/**
 * SEARCH and UID SEARCH (RFC 3501 6.4.4, CONDSTORE's MODSEQ key). Keys are parsed into a tree,
 * then evaluated per message; the stored message is read only when a key needs headers or
 * text. String keys are case-insensitive substrings over decoded header values (RFC 2047) and
 * decoded text parts (transfer encoding and charset). CHARSET: UTF-8 and US-ASCII.
 */
import libmime from 'libmime';
import type { MessageMeta } from '../../types.ts';
import { decodeHeader, headerValue, parseMime, parseTopHeaders, type HeaderField, type MimePart } from '../mime.ts';
import type { Token } from '../parser.ts';
import { inRanges, parseSeqSet, resolveRanges, SeqSetError } from '../seqset.ts';
import { ArgError } from '../session.ts';
import { defineCommand, type CommandDef } from '../state.ts';
import { SYSTEM_FLAGS } from './mailbox.ts';
import type { MailboxView } from '../mailbox-view.ts';

export type SearchKey =
  | { op: 'all' }
  | { op: 'flag'; flag: string; has: boolean }
  | { op: 'new' }
  | { op: 'recent'; has: boolean }
  | { op: 'header'; field: string; value: string }
  | { op: 'body'; value: string }
  | { op: 'text'; value: string }
  | { op: 'date'; sent: boolean; cmp: 'before' | 'on' | 'since'; day: number }
  | { op: 'size'; larger: boolean; n: number }
  | { op: 'uid'; ranges: Array<[number, number]> }
  | { op: 'seq'; ranges: Array<[number, number]> }
  | { op: 'modseq'; n: number }
  | { op: 'not'; key: SearchKey }
  | { op: 'or'; a: SearchKey; b: SearchKey }
  | { op: 'and'; keys: SearchKey[] };

const MONTHS = ['jan', 'feb', 'mar', 'apr', 'may', 'jun', 'jul', 'aug', 'sep', 'oct', 'nov', 'dec'];

/** RFC 3501 date ("1-Feb-1994") as a UTC day number. */
function parseDay(s: string): number {
  const m = /^(\d{1,2})-([A-Za-z]{3})-(\d{4})$/.exec(s);
  const month = m ? MONTHS.indexOf(m[2]!.toLowerCase()) : -1;
  if (!m || month < 0) throw new ArgError(`invalid date ${s.slice(0, 20)}`);
  return Math.floor(Date.UTC(Number(m[3]), month, Number(m[1])) / 86_400_000);
}

const FLAG_KEYS: Record<string, [string, boolean]> = {
  ANSWERED: ['\\Answered', true],
  DELETED: ['\\Deleted', true],
  DRAFT: ['\\Draft', true],
  FLAGGED: ['\\Flagged', true],
  SEEN: ['\\Seen', true],
  UNANSWERED: ['\\Answered', false],
  UNDELETED: ['\\Deleted', false],
  UNDRAFT: ['\\Draft', false],
  UNFLAGGED: ['\\Flagged', false],
  UNSEEN: ['\\Seen', false],
};
const HEADER_KEYS = ['BCC', 'CC', 'FROM', 'SUBJECT', 'TO'];

export interface SearchContext {
  maxSeq: number;
  maxUid: number;
}

export function parseSearch(tokens: Token[], ctx: SearchContext): { key: SearchKey; usesModseq: boolean } {
  let i = 0;
  let usesModseq = false;
  let depth = 0;
  const str = (): string => {
    const t = tokens[i++];
    if (!t || t.type === 'list') throw new ArgError('SEARCH key needs a string argument');
    return t.type === 'string' ? t.value.toString('utf8') : t.value;
  };
  const one = (): SearchKey => {
    const t = tokens[i++];
    if (!t) throw new ArgError('missing SEARCH key');
    if (t.type === 'list') {
      if (++depth > 16) throw new ArgError('SEARCH nested too deeply');
      const inner = parseSearch(t.items, ctx);
      depth--;
      if (inner.usesModseq) usesModseq = true;
      return inner.key;
    }
    if (t.type === 'string') throw new ArgError('unexpected string in SEARCH');
    const word = t.value.toUpperCase();
    const flag = FLAG_KEYS[word];
    if (flag) return { op: 'flag', flag: flag[0], has: flag[1] };
    if (HEADER_KEYS.includes(word)) return { op: 'header', field: word.toLowerCase(), value: str() };
    switch (word) {
      case 'ALL':
        return { op: 'all' };
      case 'NEW':
        return { op: 'new' };
      case 'OLD':
        return { op: 'recent', has: false };
      case 'RECENT':
        return { op: 'recent', has: true };
      case 'KEYWORD':
      case 'UNKEYWORD': {
        const k = str();
        const sys = SYSTEM_FLAGS.find((f) => f.toLowerCase() === k.toLowerCase());
        return { op: 'flag', flag: sys ?? k, has: word === 'KEYWORD' };
      }
      case 'HEADER': {
        const field = str().toLowerCase();
        return { op: 'header', field, value: str() };
      }
      case 'BODY':
        return { op: 'body', value: str() };
      case 'TEXT':
        return { op: 'text', value: str() };
      case 'BEFORE':
      case 'ON':
      case 'SINCE':
        return { op: 'date', sent: false, cmp: word.toLowerCase() as 'before', day: parseDay(str()) };
      case 'SENTBEFORE':
      case 'SENTON':
      case 'SENTSINCE':
        return { op: 'date', sent: true, cmp: word.slice(4).toLowerCase() as 'before', day: parseDay(str()) };
      case 'LARGER':
      case 'SMALLER': {
        const n = str();
        if (!/^\d{1,15}$/.test(n)) throw new ArgError(`${word} needs a number`);
        return { op: 'size', larger: word === 'LARGER', n: Number(n) };
      }
      case 'UID':
        try {
          return { op: 'uid', ranges: resolveRanges(parseSeqSet(str()), ctx.maxUid) };
        } catch (err) {
          throw new ArgError((err as Error).message);
        }
      case 'NOT':
        return { op: 'not', key: one() };
      case 'OR': {
        const a = one();
        return { op: 'or', a, b: one() };
      }
      case 'MODSEQ': {
        // MODSEQ [entry-name entry-type] mod-sequence-valzer
        let v = str();
        if (!/^\d+$/.test(v)) {
          str();
          v = str();
        }
        if (!/^\d{1,19}$/.test(v)) throw new ArgError('MODSEQ needs a number');
        usesModseq = true;
        return { op: 'modseq', n: Number(v) };
      }
      default:
        try {
          const set = parseSeqSet(t.value);
          return { op: 'seq', ranges: resolveRanges(set, ctx.maxSeq) };
        } catch (err) {
          if (err instanceof SeqSetError) throw new ArgError(`unknown SEARCH key ${t.value.slice(0, 30)}`);
          throw err;
        }
    }
  };
  const keys: SearchKey[] = [];
  while (i < tokens.length) keys.push(one());
  if (keys.length === 0) throw new ArgError('empty SEARCH');
  return { key: keys.length === 1 ? keys[0]! : { op: 'and', keys }, usesModseq };
}

function needs(key: SearchKey): 'none' | 'headers' | 'body' {
  switch (key.op) {
    case 'header':
    case 'date':
      return key.op === 'date' && !key.sent ? 'none' : 'headers';
    case 'body':
    case 'text':
      return 'body';
    case 'not':
      return needs(key.key);
    case 'or':
    case 'and': {
      const all = key.op === 'or' ? [needs(key.a), needs(key.b)] : key.keys.map(needs);
      return all.includes('body') ? 'body' : all.includes('headers') ? 'headers' : 'none';
    }
    default:
      return 'none';
  }
}

/** Header field names a key tree reads (lower case), for keys that need headers but no text. */
function headerNames(key: SearchKey, out = new Set<string>()): Set<string> {
  if (key.op === 'header') out.add(key.field);
  else if (key.op === 'date' && key.sent) out.add('date');
  else if (key.op === 'not') headerNames(key.key, out);
  else if (key.op === 'or') {
    headerNames(key.a, out);
    headerNames(key.b, out);
  } else if (key.op === 'and') for (const k of key.keys) headerNames(k, out);
  return out;
}

function qpDecode(s: string): Buffer {
  const bytes: number[] = [];
  const text = s.replace(/=\r?\n/g, '');
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (c === '=' && /^[0-9A-Fa-f]{2}$/.test(text.slice(i + 1, i + 3))) {
      bytes.push(parseInt(text.slice(i + 1, i + 3), 16));
      i += 2;
    } else bytes.push(text.charCodeAt(i) & 0xff);
  }
  return Buffer.from(bytes);
}

function decodeText(buf: Buffer, part: MimePart): string {
  const raw = buf.subarray(part.bodyStart, part.end);
  const cte = (headerValue(part, 'content-transfer-encoding') ?? '').trim().toLowerCase();
  let bytes = raw;
  if (cte === 'base64') bytes = Buffer.from(raw.toString('latin1').replace(/[^A-Za-z0-9+/=]/g, ''), 'base64');
  else if (cte === 'quoted-printable') bytes = qpDecode(raw.toString('latin1'));
  const charset = part.params.charset ?? 'utf-8';
  if (/^(utf-?8|us-ascii)$/i.test(charset)) return bytes.toString('utf8');
  try {
    // libmime's charset tables, reached through its encoded-word decoder.
    return libmime.decodeWord(charset, 'B', bytes.toString('base64'));
  } catch {
    return bytes.toString('utf8');
  }
}

function textParts(buf: Buffer, part: MimePart, out: string[], budget: { n: number }): void {
  if (budget.n-- <= 0) return;
  if (part.type === 'multipart') for (const c of part.children) textParts(buf, c, out, budget);
  else if (part.message) {
    out.push(part.message.headers.map((h) => `${h.key}: ${decodeHeader(h.value)}`).join('\n'));
    textParts(buf, part.message, out, budget);
  } else if (part.type === 'text') out.push(decodeText(buf, part));
}

/**
 * The day of a Date: header "disregarding time and timezone" (RFC 3501 6.4.4): the calendar date
 * as written, so "10 Nov 2026 23:30 -0500" is 10 November even though it is the 11th in UTC.
 * Two-digit years as RFC 5322 4.3 reads them. Unreadable dates match no date key.
 */
export function sentDay(value: string | undefined): number | null {
  if (!value) return null;
  const m = /(?:^|[\s,])(\d{1,2})\s+([A-Za-z]{3})[A-Za-z]*\.?\s+(\d{2,4})(?=\s|$)/.exec(value);
  if (m) {
    const month = MONTHS.indexOf(m[2]!.toLowerCase());
    let year = Number(m[3]);
    if (m[3]!.length === 2) year += year < 50 ? 2000 : 1900;
    else if (m[3]!.length === 3) year += 1900;
    const dayOfMonth = Number(m[1]);
    if (month >= 0 && dayOfMonth >= 1 && dayOfMonth <= 31) return Math.floor(Date.UTC(year, month, dayOfMonth) / 86_400_000);
  }
  const t = Date.parse(value.replace(/\s*\([^)]*\)\s*$/, ''));
  return Number.isNaN(t) ? null : Math.floor(t / 86_400_000);
}

interface Loaded {
  headers: HeaderField[];
  body?: string;
}

function evaluate(key: SearchKey, seq: number, m: MessageMeta, view: MailboxView, loaded: Loaded | null): boolean {
  switch (key.op) {
    case 'all':
      return true;
    case 'flag':
      return m.flags.includes(key.flag) === key.has;
    case 'new':
      return view.recent.has(m.uid) && !m.flags.includes('\\Seen');
    case 'recent':
      return view.recent.has(m.uid) === key.has;
    case 'size':
      return key.larger ? m.size > key.n : m.size < key.n;
    case 'uid':
      return inRanges(key.ranges, m.uid);
    case 'seq':
      return inRanges(key.ranges, seq);
    case 'modseq':
      return m.modseq >= key.n;
    case 'not':
      return !evaluate(key.key, seq, m, view, loaded);
    case 'or':
      return evaluate(key.a, seq, m, view, loaded) || evaluate(key.b, seq, m, view, loaded);
    case 'and':
      return key.keys.every((k) => evaluate(k, seq, m, view, loaded));
    case 'date': {
      let day: number;
      if (key.sent) {
        const d = sentDay(loaded?.headers.find((h) => h.key === 'date')?.value);
        if (d === null) return false;
        day = d;
      } else day = Math.floor(m.internalDate / 86_400_000);
      return key.cmp === 'before' ? day < key.day : key.cmp === 'on' ? day === key.day : day >= key.day;
    }
    case 'header': {
      const needle = key.value.toLowerCase();
      const fields = loaded?.headers.filter((h) => h.key === key.field) ?? [];
      if (needle === '') return fields.length > 0;
      return fields.some((h) => decodeHeader(h.value).toLowerCase().includes(needle));
    }
    case 'body':
      return (loaded?.body ?? '').toLowerCase().includes(key.value.toLowerCase());
    case 'text': {
      const needle = key.value.toLowerCase();
      if ((loaded?.body ?? '').toLowerCase().includes(needle)) return true;
      return (loaded?.headers ?? []).some((h) => `${h.key}: ${decodeHeader(h.value)}`.toLowerCase().includes(needle));
    }
  }
}

export const search = defineCommand({
  name: 'SEARCH',
  states: ['selected'],
  args: ['any*'],
  uid: true,
  expungeAfter: false,
  async handler({ session, state, args, uid }) {
    const view = state.view;
    let tokens = args as Token[];
    const first = tokens[0];
    if (first?.type === 'atom' && first.value.toUpperCase() === 'CHARSET') {
      const cs = tokens[1];
      const name = cs && cs.type !== 'list' ? (cs.type === 'string' ? cs.value.toString() : cs.value) : '';
      if (!/^(utf-8|us-ascii)$/i.test(name)) return { status: 'NO', code: 'BADCHARSET (UTF-8 US-ASCII)', text: 'Unsupported charset' };
      tokens = tokens.slice(2);
    }
    const { key, usesModseq } = parseSearch(tokens, { maxSeq: view.exists, maxUid: view.maxUid });
    if (usesModseq) session.condstore = true;
    const need = needs(key);
    const names = headerNames(key);
    const hits: number[] = [];
    let highest = 0;
    for (let idx = 0; idx < view.messages.length; idx++) {
      const m = view.messages[idx]!;
      if (view.pendingExpunge.has(m.uid)) continue;
      let loaded: Loaded | null = null;
      if (need !== 'none') {
        // Cached bodies resolve without giving the event loop a turn: let other sessions run
        // every so often during a long text search.
        if (idx % 256 === 255) await new Promise<void>((resolve) => setImmediate(resolve));
        const buf = await session.store.readMessage(m.bodyId);
        if (need === 'body') {
          const root = parseMime(buf);
          const texts: string[] = [];
          textParts(buf, root, texts, { n: 200 });
          loaded = { headers: root.headers, body: texts.join('\n') };
        } else {
          // Header keys need only the named fields of the top-level header block, not the MIME tree.
          loaded = { headers: parseTopHeaders(buf, names) };
        }
      }
      if (evaluate(key, idx + 1, m, view, loaded)) {
        hits.push(uid ? m.uid : idx + 1);
        if (m.modseq > highest) highest = m.modseq;
      }
    }
    const tail = usesModseq && hits.length ? ` (MODSEQ ${highest})` : '';
    session.writeLine(`* SEARCH${hits.map((h) => ' ' + h).join('')}${tail}`);
    return { status: 'OK', text: 'Search completed' };
  },
});

export const searchCommands: CommandDef[] = [search] as CommandDef[];
