/**
 * The response writer: turns response values into wire bytes. A string goes out quoted when it
 * is short 7-bit text without CR, LF, NUL, `"` issues, and as a literal `{n}` otherwise, so any
 * byte content (8-bit headers, binary bodies) is sent exactly as stored.
 */

/** A raw atom written as-is (flags, keywords, NIL-free tokens, numbers as text). */
export class Atom {
  constructor(readonly value: string) {}
}

/** Bytes already encoded for the wire (a cached ENVELOPE or BODYSTRUCTURE). */
export class Wire {
  constructor(readonly bytes: Buffer) {}
}

/** Forces a literal even for short text (message bodies and sections). */
export class Literal {
  constructor(readonly bytes: Buffer) {}
}

/**
 * Response values: `null` is NIL, numbers are numbers, JS strings and Buffers are IMAP strings
 * (quoted or literal as fits), arrays are parenthesised lists.
 */
export type Value = null | number | bigint | string | Buffer | Atom | Wire | Literal | Value[];

export const atom = (s: string): Atom => new Atom(s);
export const NIL = null;

const QUOTED_MAX = 1024;

function canQuote(b: Buffer): boolean {
  if (b.length > QUOTED_MAX) return false;
  for (const c of b) if (c === 0 || c === 0x0d || c === 0x0a || c >= 0x80) return false;
  return true;
}

/** Appends the encoding of `v` to `out`; large buffers are pushed by reference, not copied. */
export function encodeValue(v: Value, out: Array<Buffer | string>): void {
  if (v === null) {
    out.push('NIL');
  } else if (typeof v === 'number' || typeof v === 'bigint') {
    out.push(String(v));
  } else if (typeof v === 'string') {
    encodeString(Buffer.from(v, 'utf8'), out);
  } else if (Buffer.isBuffer(v)) {
    encodeString(v, out);
  } else if (v instanceof Atom) {
    out.push(v.value);
  } else if (v instanceof Wire) {
    out.push(v.bytes);
  } else if (v instanceof Literal) {
    out.push(`{${v.bytes.length}}\r\n`);
    out.push(v.bytes);
  } else {
    out.push('(');
    v.forEach((item, idx) => {
      if (idx > 0) out.push(' ');
      encodeValue(item, out);
    });
    out.push(')');
  }
}

function encodeString(b: Buffer, out: Array<Buffer | string>): void {
  if (canQuote(b)) {
    let s = b.toString('latin1');
    if (s.includes('\\') || s.includes('"')) s = s.replace(/[\\"]/g, (m) => '\\' + m);
    out.push('"' + s + '"');
  } else {
    out.push(`{${b.length}}\r\n`);
    out.push(b);
  }
}

/** Encodes a space-separated sequence of values (no surrounding parentheses). */
export function encodeSequence(values: Value[]): Array<Buffer | string> {
  const out: Array<Buffer | string> = [];
  values.forEach((v, i) => {
    if (i > 0) out.push(' ');
    encodeValue(v, out);
  });
  return out;
}

/** Joins encoded parts into one Buffer (latin1 for string parts: they are 7-bit by construction). */
export function toBuffer(parts: Array<Buffer | string>): Buffer {
  return Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p, 'latin1') : p)));
}

export function encodeToBuffer(v: Value): Buffer {
  const out: Array<Buffer | string> = [];
  encodeValue(v, out);
  return toBuffer(out);
}

/** Text for a tagged or untagged status line: one line, no CR/LF (a human-readable reason). */
export function safeText(s: string): string {
  return s.replace(/[\r\n\0]+/g, ' ').slice(0, 400);
}
