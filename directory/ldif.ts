/**
 * LDIF (RFC 2849) content records: parsing with line folding, `::` base64 values, `:<`
 * file URLs, comments and CRLF; writing with base64 where a value is not a SAFE-STRING and
 * folding at 76 columns. A parsed file keeps each record's original text, so rewriting one
 * entry leaves the others (and their comments) byte for byte as they were.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BadInputError } from '../common/errors.ts';

export interface LdifEntry {
  dn: string;
  /** Attribute name (as written) and value, in file order. */
  attrs: Array<[string, string]>;
}

export interface LdifRecord {
  /** null for a block of comments only (or a `version:` line). */
  entry: LdifEntry | null;
  /** Original text of the record (without the blank line that ends it). */
  text: string;
  /** Comment lines of the record (kept when the entry is rewritten). */
  comments: string[];
  line: number;
}

export class LdifError extends BadInputError {
  constructor(source: string, line: number, message: string) {
    super(`${source}:${line}: ${message}`);
  }
}

/** Values of an attribute (case-insensitive name, options such as `;binary` ignored). */
export function attrValues(entry: LdifEntry, name: string): string[] {
  const want = name.toLowerCase();
  const out: string[] = [];
  for (const [n, v] of entry.attrs) {
    const base = n.split(';')[0]!.toLowerCase();
    if (base === want) out.push(v);
  }
  return out;
}

export function attrValue(entry: LdifEntry, name: string): string | undefined {
  return attrValues(entry, name)[0];
}

function decodeValue(rest: string, source: string, line: number): string {
  if (rest.startsWith(':')) {
    const b64 = rest.slice(1).trim();
    if (!/^[A-Za-z0-9+/]*=*$/.test(b64)) throw new LdifError(source, line, 'malformed base64 value');
    return Buffer.from(b64, 'base64').toString('utf8');
  }
  if (rest.startsWith('<')) {
    const url = rest.slice(1).trim();
    if (!url.startsWith('file://')) throw new LdifError(source, line, `unsupported URL ${url} (only file://)`);
    try {
      return readFileSync(fileURLToPath(url), 'utf8');
    } catch (err) {
      throw new LdifError(source, line, `cannot read ${url}: ${(err as NodeJS.ErrnoException).code ?? err}`);
    }
  }
  return rest.replace(/^ +/, '');
}

/** Parses LDIF text into records. Throws LdifError naming the line. */
export function parseLdif(text: string, source = 'ldif'): LdifRecord[] {
  const rawLines = text.split(/\r?\n/);
  const records: LdifRecord[] = [];
  let block: Array<{ text: string; line: number }> = [];

  const flush = () => {
    if (block.length === 0) return;
    const recordText = block.map((l) => l.text).join('\n');
    // Unfold: a line starting with one space continues the previous one.
    const logical: Array<{ text: string; line: number }> = [];
    for (const l of block) {
      if (l.text.startsWith(' ') && logical.length > 0) logical[logical.length - 1]!.text += l.text.slice(1);
      else logical.push({ ...l });
    }
    const comments = logical.filter((l) => l.text.startsWith('#')).map((l) => l.text);
    const content = logical.filter((l) => !l.text.startsWith('#'));
    const first = block[0]!.line;
    block = [];
    if (content.length === 0 || (content.length === 1 && /^version:\s*1\s*$/i.test(content[0]!.text))) {
      records.push({ entry: null, text: recordText, comments, line: first });
      return;
    }
    let start = 0;
    if (/^version:/i.test(content[0]!.text)) start = 1;
    const head = content[start]!;
    const dnMatch = /^dn:(.*)$/i.exec(head.text);
    if (!dnMatch) throw new LdifError(source, head.line, `expected "dn:", got ${JSON.stringify(head.text.slice(0, 40))}`);
    const dn = decodeValue(dnMatch[1]!, source, head.line).trim();
    const attrs: Array<[string, string]> = [];
    for (const l of content.slice(start + 1)) {
      const m = /^([A-Za-z0-9][A-Za-z0-9;.-]*):(.*)$/.exec(l.text);
      if (!m) throw new LdifError(source, l.line, `expected "attribute: value", got ${JSON.stringify(l.text.slice(0, 40))}`);
      const name = m[1]!;
      if (name.toLowerCase() === 'changetype') {
        const v = decodeValue(m[2]!, source, l.line).trim().toLowerCase();
        if (v !== 'add') throw new LdifError(source, l.line, `changetype ${v} is not supported (content records and changetype: add only)`);
        continue;
      }
      attrs.push([name, decodeValue(m[2]!, source, l.line)]);
    }
    records.push({ entry: { dn, attrs }, text: recordText, comments, line: first });
  };

  rawLines.forEach((text, i) => {
    if (text.trim() === '' && !text.startsWith(' ')) flush();
    else block.push({ text, line: i + 1 });
  });
  flush();
  return records;
}

export function parseLdifEntries(text: string, source?: string): LdifEntry[] {
  return parseLdif(text, source).flatMap((r) => (r.entry ? [r.entry] : []));
}

/** RFC 2849 SAFE-STRING: ASCII without NUL/CR/LF, not starting with space, `:` or `<`, no trailing space. */
function isSafe(value: string): boolean {
  if (value === '') return true;
  if (/^[ :<]/.test(value) || value.endsWith(' ')) return false;
  return /^[\x01-\x09\x0b\x0c\x0e-\x7f]*$/.test(value);
}

function fold(line: string): string {
  if (line.length <= 76) return line;
  const parts = [line.slice(0, 76)];
  for (let i = 76; i < line.length; i += 75) parts.push(` ${line.slice(i, i + 75)}`);
  return parts.join('\n');
}

export function formatLine(name: string, value: string): string {
  return fold(isSafe(value) ? `${name}: ${value}` : `${name}:: ${Buffer.from(value, 'utf8').toString('base64')}`);
}

export function formatEntry(entry: LdifEntry, comments: string[] = []): string {
  return [...comments, formatLine('dn', entry.dn), ...entry.attrs.map(([n, v]) => formatLine(n, v))].join('\n');
}

/** Writes records back: unchanged records keep their original text. */
export function formatRecords(records: LdifRecord[]): string {
  return `${records.map((r) => r.text).join('\n\n')}\n`;
}
