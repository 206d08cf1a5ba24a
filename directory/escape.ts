/**
 * Escaping of values placed in LDAP filters (RFC 4515) and DNs (RFC 4514).
 *
 * The LDAP backend builds its filters as ldapts Filter objects (the value travels as raw
 * octets in BER, so nothing a user types can change the filter's structure); the string
 * forms below are for every place where a filter or DN is written as text: DNs of new
 * entries, log lines, the CLI and the ldapsearch baseline of the bench.
 */

const FILTER_SPECIAL = new Set([0x2a, 0x28, 0x29, 0x5c, 0x00]);

function hex(b: number): string {
  return `\\${b.toString(16).padStart(2, '0')}`;
}

/** RFC 4515 assertion value: `*`, `(`, `)`, `\`, NUL and every non-ASCII octet as `\xx`. */
export function escapeFilterValue(value: string): string {
  let out = '';
  for (const b of Buffer.from(value, 'utf8')) out += FILTER_SPECIAL.has(b) || b >= 0x80 ? hex(b) : String.fromCharCode(b);
  return out;
}

/** Inverse of escapeFilterValue (any `\xx` sequence decoded as UTF-8 octets). */
export function unescapeFilterValue(escaped: string): string {
  const bytes: number[] = [];
  for (let i = 0; i < escaped.length; i++) {
    const c = escaped[i]!;
    if (c === '\\' && /^[0-9a-fA-F]{2}$/.test(escaped.slice(i + 1, i + 3))) {
      bytes.push(Number.parseInt(escaped.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      for (const b of Buffer.from(c, 'utf8')) bytes.push(b);
    }
  }
  return Buffer.from(bytes).toString('utf8');
}

const DN_SPECIAL = new Set(['"', '+', ',', ';', '<', '>', '\\', '=']);

/**
 * RFC 4514 attribute value: `"+,;<>\=` escaped with a backslash, NUL as `\00`, a leading
 * space or `#` and a trailing space escaped. UTF-8 stays as it is (RFC 4514 allows it).
 */
export function escapeDnValue(value: string): string {
  let out = '';
  const chars = [...value];
  chars.forEach((c, i) => {
    if (c === '\0') out += '\\00';
    else if (DN_SPECIAL.has(c)) out += `\\${c}`;
    else if ((i === 0 && (c === ' ' || c === '#')) || (i === chars.length - 1 && c === ' ')) out += `\\${c}`;
    else out += c;
  });
  return out;
}

/** Splits a DN string into RDN strings at unescaped commas. */
export function splitDn(dn: string): string[] {
  const parts: string[] = [];
  let cur = '';
  for (let i = 0; i < dn.length; i++) {
    const c = dn[i]!;
    if (c === '\\' && i + 1 < dn.length) {
      cur += c + dn[i + 1];
      i++;
    } else if (c === ',') {
      parts.push(cur.trim());
      cur = '';
    } else cur += c;
  }
  if (cur.trim() || parts.length) parts.push(cur.trim());
  return parts;
}

/** A DN form for comparisons: RDNs trimmed, attribute names and values lower-cased. */
export function normalizeDn(dn: string): string {
  return splitDn(dn)
    .map((rdn) => {
      const eq = rdn.indexOf('=');
      return eq < 0 ? rdn.toLowerCase() : `${rdn.slice(0, eq).trim().toLowerCase()}=${rdn.slice(eq + 1).trim().toLowerCase()}`;
    })
    .join(',');
}

/** The DN one level up (`uid=a,ou=people,dc=x` → `ou=people,dc=x`). */
export function parentDn(dn: string): string {
  return splitDn(dn).slice(1).join(',');
}
