/**
 * MIME structure of a stored message for FETCH: ENVELOPE, BODY, BODYSTRUCTURE and the byte
 * ranges of every part for BODY[section]. Modelled on wildduck's indexer (lib/indexer/
 * parse-mime-tree.js), which also walks the raw message itself: section fetches need exact
 * byte offsets of each header and body, which streaming splitters do not expose. Header values
 * and parameters (RFC 2045/2231) are parsed with libmime, addresses with nodemailer's
 * addressparser, the same libraries wildduck and mailparser use.
 */
import libmime from 'libmime';
// nodemailer's address parser (@types/nodemailer declares it loosely; narrowed below).
import addressparserRaw from 'nodemailer/lib/addressparser/index.js';
import { encodeSequence, encodeToBuffer, toBuffer, Wire, type Value } from './writer.ts';

interface ParsedAddress {
  name?: string;
  address?: string;
  group?: ParsedAddress[];
}
const addressparser = addressparserRaw as (s: string) => ParsedAddress[];

export interface HeaderField {
  /** Lower-case field name. */
  key: string;
  /** Unfolded value, raw (encoded words kept). */
  value: string;
  /** The field's raw bytes, folding and CRLF included. */
  raw: Buffer;
}

export interface MimePart {
  /** Offset of the part's header block. */
  start: number;
  /** Offset of the part's body (after the blank line). */
  bodyStart: number;
  /** End of the body (exclusive). */
  end: number;
  headers: HeaderField[];
  type: string;
  subtype: string;
  params: Record<string, string>;
  children: MimePart[];
  /** For message/rfc822 parts: the encapsulated message. */
  message?: MimePart;
}

const MAX_DEPTH = 40;
const MAX_PARTS = 2000;

function findHeaderEnd(buf: Buffer, start: number, end: number): { headerEnd: number; bodyStart: number } {
  // An empty header block: the part starts with its blank line.
  if (buf[start] === 0x0a) return { headerEnd: start, bodyStart: start + 1 };
  if (buf[start] === 0x0d && buf[start + 1] === 0x0a) return { headerEnd: start, bodyStart: start + 2 };
  let pos = start;
  while (pos < end) {
    const lf = buf.indexOf(0x0a, pos);
    if (lf < 0 || lf >= end) return { headerEnd: end, bodyStart: end };
    const next = lf + 1;
    if (next >= end) return { headerEnd: end, bodyStart: end };
    if (buf[next] === 0x0a) return { headerEnd: next, bodyStart: next + 1 };
    if (buf[next] === 0x0d && buf[next + 1] === 0x0a) return { headerEnd: next, bodyStart: Math.min(next + 2, end) };
    pos = next;
  }
  return { headerEnd: end, bodyStart: end };
}

/** The header fields of a block; with `only`, just the fields of those (lower-case) names, the rest not decoded at all. */
export function parseHeaderBlock(block: Buffer, only?: ReadonlySet<string>): HeaderField[] {
  const fields: HeaderField[] = [];
  let pos = 0;
  let cur: { start: number; end: number } | null = null;
  const flush = () => {
    if (!cur) return;
    const raw = block.subarray(cur.start, cur.end);
    const colon = raw.indexOf(0x3a);
    if (colon > 0) {
      const key = raw.toString('latin1', 0, colon).trim().toLowerCase();
      if (only && !only.has(key)) {
        cur = null;
        return;
      }
      const text = raw.toString('binary');
      const value = text
        .slice(colon + 1)
        .replace(/\r?\n[ \t]/g, ' ')
        .replace(/\r?\n$/, '')
        .trim();
      fields.push({ key, value: Buffer.from(value, 'binary').toString('utf8'), raw });
    }
    cur = null;
  };
  while (pos < block.length) {
    let lf = block.indexOf(0x0a, pos);
    if (lf < 0) lf = block.length - 1;
    const first = block[pos];
    if (first === 0x20 || first === 0x09) {
      if (cur) cur.end = lf + 1;
    } else {
      flush();
      if (!(first === 0x0d || first === 0x0a)) cur = { start: pos, end: lf + 1 };
    }
    pos = lf + 1;
  }
  flush();
  return fields;
}

export function headerValue(part: { headers: HeaderField[] }, key: string): string | undefined {
  return part.headers.find((h) => h.key === key)?.value;
}

function parsePart(buf: Buffer, start: number, end: number, defaultType: string, depth: number, count: { n: number }): MimePart {
  count.n++;
  const { headerEnd, bodyStart } = findHeaderEnd(buf, start, end);
  const headers = parseHeaderBlock(buf.subarray(start, headerEnd));
  const ctRaw = headers.find((h) => h.key === 'content-type')?.value;
  let type = defaultType.split('/')[0]!;
  let subtype = defaultType.split('/')[1]!;
  let params: Record<string, string> = {};
  if (ctRaw) {
    const parsed = libmime.parseHeaderValue(ctRaw);
    const [t, s] = String(parsed.value ?? '').split('/');
    if (t && s) {
      type = t.trim().toLowerCase();
      subtype = s.trim().toLowerCase();
    }
    params = Object.fromEntries(Object.entries(parsed.params ?? {}).map(([k, v]) => [k, String(v)]));
  }
  if (type === 'text' && !params.charset) params = { charset: 'us-ascii', ...params };
  const part: MimePart = { start, bodyStart, end, headers, type, subtype, params, children: [] };
  if (depth >= MAX_DEPTH || count.n >= MAX_PARTS) return part;
  if (type === 'multipart' && params.boundary) {
    const childDefault = subtype === 'digest' ? 'message/rfc822' : 'text/plain';
    for (const [s, e] of splitMultipart(buf, bodyStart, end, params.boundary)) {
      part.children.push(parsePart(buf, s, e, childDefault, depth + 1, count));
      if (count.n >= MAX_PARTS) break;
    }
    if (part.children.length === 0) {
      // A multipart without any part: served like Dovecot, as one empty text part.
      part.children.push({ start: bodyStart, bodyStart, end: bodyStart, headers: [], type: 'text', subtype: 'plain', params: { charset: 'us-ascii' }, children: [] });
    }
  } else if (type === 'message' && (subtype === 'rfc822' || subtype === 'global')) {
    part.message = parsePart(buf, bodyStart, end, 'text/plain', depth + 1, count);
  }
  return part;
}

/** Byte ranges of the body parts between `--boundary` delimiter lines. */
function splitMultipart(buf: Buffer, start: number, end: number, boundary: string): Array<[number, number]> {
  const delim = Buffer.from('--' + boundary, 'binary');
  const ranges: Array<[number, number]> = [];
  let partStart = -1;
  let pos = start;
  while (pos < end) {
    const idx = buf.indexOf(delim, pos);
    if (idx < 0 || idx + delim.length > end) break;
    const atLineStart = idx === start || buf[idx - 1] === 0x0a;
    const after = idx + delim.length;
    if (!atLineStart) {
      pos = after;
      continue;
    }
    const closing = buf[after] === 0x2d && buf[after + 1] === 0x2d;
    // The CRLF before a delimiter belongs to the delimiter, not to the preceding part.
    if (partStart >= 0) {
      let pe = idx;
      if (pe > partStart && buf[pe - 1] === 0x0a) pe--;
      if (pe > partStart && buf[pe - 1] === 0x0d) pe--;
      ranges.push([partStart, Math.max(partStart, pe)]);
    }
    let lf = buf.indexOf(0x0a, after);
    if (lf < 0 || lf >= end) lf = end - 1;
    if (closing) return ranges;
    partStart = lf + 1;
    pos = partStart;
  }
  if (partStart >= 0 && partStart <= end) ranges.push([partStart, end]);
  return ranges;
}

export function parseMime(buf: Buffer): MimePart {
  return parsePart(buf, 0, buf.length, 'text/plain', 0, { n: 0 });
}

function countLines(buf: Buffer, start: number, end: number): number {
  let n = 0;
  let pos = start;
  for (;;) {
    const lf = buf.indexOf(0x0a, pos);
    if (lf < 0 || lf >= end) break;
    n++;
    pos = lf + 1;
  }
  if (end > pos) n++;
  return n;
}

const nstr = (s: string | undefined): Value => (s === undefined || s === '' ? null : s);

function addressList(raw: string | undefined): Value {
  if (!raw) return null;
  let parsed: ParsedAddress[];
  try {
    parsed = addressparser(raw);
  } catch {
    return null;
  }
  const out: Value[] = [];
  const one = (a: ParsedAddress) => {
    const addr = a.address ?? '';
    const at = addr.lastIndexOf('@');
    const mailbox = at >= 0 ? addr.slice(0, at) : addr;
    const host = at >= 0 ? addr.slice(at + 1) : '';
    out.push([nstr(a.name), null, nstr(mailbox), at >= 0 ? nstr(host) : null]);
  };
  for (const a of parsed) {
    if (a.group) {
      // RFC 3501: a group is (NIL NIL "name" NIL), its members, then (NIL NIL NIL NIL).
      out.push([null, null, nstr(a.name), null]);
      a.group.forEach(one);
      out.push([null, null, null, null]);
    } else if (a.address || a.name) one(a);
  }
  return out.length ? out : null;
}

export function envelope(part: MimePart): Value {
  const h = (k: string) => headerValue(part, k);
  const from = addressList(h('from'));
  const sender = addressList(h('sender'));
  const replyTo = addressList(h('reply-to'));
  return [
    nstr(h('date')),
    nstr(h('subject')),
    from,
    sender ?? from,
    replyTo ?? from,
    addressList(h('to')),
    addressList(h('cc')),
    addressList(h('bcc')),
    nstr(h('in-reply-to')),
    nstr(h('message-id')),
  ];
}

function paramList(params: Record<string, string>, skip: string[] = []): Value {
  const entries = Object.entries(params).filter(([k]) => !skip.includes(k));
  if (entries.length === 0) return null;
  return entries.flatMap(([k, v]) => [k, v]);
}

function disposition(part: MimePart): Value {
  const raw = headerValue(part, 'content-disposition');
  if (!raw) return null;
  const parsed = libmime.parseHeaderValue(raw);
  const value = String(parsed.value ?? '').trim().toLowerCase();
  if (!value) return null;
  return [value, paramList(Object.fromEntries(Object.entries(parsed.params ?? {}).map(([k, v]) => [k, String(v)])))];
}

function language(part: MimePart): Value {
  const raw = headerValue(part, 'content-language');
  if (!raw) return null;
  const langs = raw.split(/[\s,]+/).filter(Boolean);
  if (langs.length === 0) return null;
  return langs.length === 1 ? langs[0]! : langs;
}

/** BODYSTRUCTURE (`extended`) or BODY of a part, as wire bytes. */
export function bodyStructure(buf: Buffer, part: MimePart, extended: boolean): Buffer {
  if (part.type === 'multipart') {
    // body-type-mpart: the child structures follow each other without spaces: ((…)(…) "mixed").
    const children = Buffer.concat(part.children.map((c) => bodyStructure(buf, c, extended)));
    const tail: Value[] = [part.subtype];
    if (extended) tail.push(paramList(part.params), disposition(part), language(part), nstr(headerValue(part, 'content-location')));
    return Buffer.concat([Buffer.from('('), children, Buffer.from(' '), toBuffer(encodeSequence(tail)), Buffer.from(')')]);
  }
  const size = part.end - part.bodyStart;
  const cte = headerValue(part, 'content-transfer-encoding');
  const out: Value[] = [
    part.type,
    part.subtype,
    paramList(part.params),
    nstr(headerValue(part, 'content-id')),
    nstr(headerValue(part, 'content-description')),
    cte ? cte.trim().toLowerCase() : '7bit',
    size,
  ];
  if (part.type === 'message' && part.message && (part.subtype === 'rfc822' || part.subtype === 'global')) {
    out.push(envelope(part.message), new Wire(bodyStructure(buf, part.message, extended)), countLines(buf, part.bodyStart, part.end));
  } else if (part.type === 'text') {
    out.push(countLines(buf, part.bodyStart, part.end));
  }
  if (extended) out.push(nstr(headerValue(part, 'content-md5')), disposition(part), language(part), nstr(headerValue(part, 'content-location')));
  return encodeToBuffer(out);
}

/** The MIME-derived fetch data kept in the store's body metadata cache, as wire bytes. */
export interface StructureSummary {
  envelope: Buffer;
  body: Buffer;
  bodystructure: Buffer;
}

export function summarize(buf: Buffer, root = parseMime(buf)): StructureSummary {
  return {
    envelope: encodeToBuffer(envelope(root)),
    body: bodyStructure(buf, root, false),
    bodystructure: bodyStructure(buf, root, true),
  };
}

export function serializeSummary(s: StructureSummary): string {
  return JSON.stringify({ e: s.envelope.toString('base64'), b: s.body.toString('base64'), s: s.bodystructure.toString('base64') });
}

export function deserializeSummary(text: string): StructureSummary | null {
  try {
    const o = JSON.parse(text) as { e?: string; b?: string; s?: string };
    if (typeof o.e !== 'string' || typeof o.b !== 'string' || typeof o.s !== 'string') return null;
    return { envelope: Buffer.from(o.e, 'base64'), body: Buffer.from(o.b, 'base64'), bodystructure: Buffer.from(o.s, 'base64') };
  } catch {
    return null;
  }
}

export interface SectionSpec {
  /** Part path, e.g. [1, 2] for "1.2"; empty for the whole message. */
  path: number[];
  specifier: '' | 'HEADER' | 'HEADER.FIELDS' | 'HEADER.FIELDS.NOT' | 'TEXT' | 'MIME';
  fields: string[];
}

function childPart(node: MimePart, n: number, isRoot: boolean): MimePart | null {
  if (node.type === 'multipart') return node.children[n - 1] ?? null;
  if (!isRoot && node.message) {
    const m = node.message;
    if (m.type === 'multipart') return m.children[n - 1] ?? null;
    return n === 1 ? m : null;
  }
  return n === 1 ? node : null;
}

/**
 * The top-level HEADER, TEXT and HEADER.FIELDS[.NOT] sections need only the header block, not the
 * MIME tree: cut them without parsing the body (what mail clients fetch most, for lists of
 * messages). Returns null for sections that need the tree. Same bytes as `extractSection`.
 */
export function extractTopSection(buf: Buffer, spec: SectionSpec): Buffer | null {
  if (spec.path.length !== 0) return null;
  if (spec.specifier === '') return buf;
  if (spec.specifier !== 'HEADER' && spec.specifier !== 'TEXT' && spec.specifier !== 'HEADER.FIELDS' && spec.specifier !== 'HEADER.FIELDS.NOT') return null;
  const { headerEnd, bodyStart } = findHeaderEnd(buf, 0, buf.length);
  if (spec.specifier === 'HEADER') return buf.subarray(0, bodyStart);
  if (spec.specifier === 'TEXT') return buf.subarray(bodyStart);
  return filterHeaderFields(parseHeaderBlock(buf.subarray(0, headerEnd)), spec);
}

/** The top-level header fields only (optionally just some names), without the MIME tree: SEARCH keys that need no body. */
export function parseTopHeaders(buf: Buffer, only?: ReadonlySet<string>): HeaderField[] {
  const { headerEnd } = findHeaderEnd(buf, 0, buf.length);
  return parseHeaderBlock(buf.subarray(0, headerEnd), only);
}

function filterHeaderFields(headers: HeaderField[], spec: SectionSpec): Buffer {
  const wanted = new Set(spec.fields.map((f) => f.toLowerCase()));
  const keep = spec.specifier === 'HEADER.FIELDS';
  const parts = headers.filter((h) => wanted.has(h.key) === keep).map((h) => (h.raw[h.raw.length - 1] === 0x0a ? h.raw : Buffer.concat([h.raw, Buffer.from('\r\n')])));
  parts.push(Buffer.from('\r\n'));
  return Buffer.concat(parts);
}

/** The bytes of a BODY[section] (before any <partial>); an empty buffer where the part does not exist. */
export function extractSection(buf: Buffer, root: MimePart, spec: SectionSpec): Buffer {
  let node: MimePart | null = root;
  let isRoot = true;
  for (const n of spec.path) {
    node = childPart(node, n, isRoot);
    isRoot = false;
    if (!node) return Buffer.alloc(0);
  }
  if (spec.specifier === '') {
    return spec.path.length === 0 ? buf : buf.subarray(node.bodyStart, node.end);
  }
  if (spec.specifier === 'MIME') {
    if (spec.path.length === 0) return Buffer.alloc(0);
    return buf.subarray(node.start, node.bodyStart);
  }
  // HEADER / TEXT / HEADER.FIELDS apply to a message: the root or an encapsulated message.
  let msg: MimePart | null = node;
  if (spec.path.length > 0) msg = node.message ?? null;
  if (!msg) return Buffer.alloc(0);
  if (spec.specifier === 'TEXT') return buf.subarray(msg.bodyStart, msg.end);
  if (spec.specifier === 'HEADER') return buf.subarray(msg.start, msg.bodyStart);
  return filterHeaderFields(msg.headers, spec);
}

/** Decoded text of header fields for SEARCH (encoded words decoded). */
export function decodeHeader(value: string): string {
  // Only encoded words (RFC 2047) need decoding; most header values have none.
  if (!value.includes('=?')) return value;
  try {
    return libmime.decodeWords(value);
  } catch {
    return value;
  }
}
