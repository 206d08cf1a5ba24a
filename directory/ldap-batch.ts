/**
 * User look-ups asked for in the same turn of the event loop leave as one LDAP search.
 *
 * Why: most of what slapd spends on a look-up is per search (a thread hand-off, access
 * control, the filter's index look-ups and candidate list), not per entry. A burst of logins,
 * the recipients of one message, or a login storm after a pair fails over ask for many users at
 * once; one search whose filter ORs their assertions answers all of them. Measured against
 * slapd with 100,000 users and 32 look-ups in flight (2026-12-06, bench/directory's set-up):
 * batches of 4-16 cost slapd 24-33 µs per look-up against 70 alone, and this process 15 µs
 * against 29-45; look-ups per second 2-3x.
 *
 * A look-up never waits for a timer: those asked for before the loop's next check phase
 * (setImmediate, as the Redis cache's MGET batching) go together; one asked alone goes alone.
 *
 * The entries that come back are handed to the look-ups they match, so that matching must
 * agree with the server's. It does for the values batched here, and only those:
 * - a looked-up value is batched only when it is printable ASCII without spaces (every real
 *   login and address); anything else goes alone;
 * - for such a value, uid's caseIgnoreMatch and mail's caseIgnoreIA5Match (RFC 4517, with RFC
 *   4518's preparation: leading and trailing spaces are insignificant) come down to comparing
 *   ASCII case-insensitively with the entry's value trimmed;
 * - an entry whose uid, mail or alias holds anything but printable ASCII might match by rules
 *   this comparison does not model (Unicode case folding, characters the preparation drops), so
 *   a batch answer holding one is not used.
 * A batch whose answer is not used, that holds an entry matching none of its look-ups, or that
 * hits the size limit (more entries than 3 per look-up: ldapts returns a search cut short by
 * its size limit without an error, so the batch asks for one entry more and counts) is asked
 * again one look-up at a time; a look-up with more entries than a
 * single search allows is asked alone. So a batch never answers differently from the searches it
 * replaces. (Assumed: no server-side size limit for the service account below 3 x batchMax + 1;
 * a lower one would cut a batch short unseen, as it would cut a single search below 3.)
 */
import { EqualityFilter, OrFilter, type Entry, type Filter } from 'ldapts';
import { ConflictError } from '../common/errors.ts';

/** Which attributes a look-up may match: a login (uid; with '@' also the addresses) or a recipient (the addresses). */
export type LookupKind = 'login' | 'recipient';

/** Entries per single look-up that a search allows (the third says the answer is ambiguous). */
export const ENTRIES_PER_LOOKUP = 3;

const PLAIN = /^[\x21-\x7e]+$/;
const PLAIN_OR_SPACE = /^[\x20-\x7e]*$/;

/** True when `value` may share a search with others (see the module comment). */
export function batchable(value: string): boolean {
  return PLAIN.test(value);
}

/** The attributes a look-up of this kind and value matches on. */
export function lookupAttributes(kind: LookupKind, value: string): readonly string[] {
  if (kind === 'recipient') return ADDRESS_ATTRS;
  return value.includes('@') ? LOGIN_ADDRESS_ATTRS : UID_ONLY;
}
const UID_ONLY = ['uid'] as const;
const ADDRESS_ATTRS = ['mail', 'mailLocalAddress'] as const;
const LOGIN_ADDRESS_ATTRS = ['uid', 'mail', 'mailLocalAddress'] as const;

/** One equality assertion per attribute the look-up matches on. */
function lookupAssertions(kind: LookupKind, value: string): Filter[] {
  return lookupAttributes(kind, value).map((attribute) => new EqualityFilter({ attribute, value }));
}

/** The filter of one look-up: its assertions, ORed. */
function lookupFilter(kind: LookupKind, value: string): Filter {
  const parts = lookupAssertions(kind, value);
  return parts.length === 1 ? parts[0]! : new OrFilter({ filters: parts });
}

export interface Lookup {
  kind: LookupKind;
  value: string;
}

/** Lower-cased names of the attributes each kind of look-up matches on (lookupAttributes' lists). */
const MATCHED_ON = new Map<readonly string[], ReadonlySet<string>>(
  [UID_ONLY, ADDRESS_ATTRS, LOGIN_ADDRESS_ATTRS].map((list) => [list, new Set(list.map((a) => a.toLowerCase()))]),
);

/**
 * An attribute description's name, lower-cased, without options (`mail;lang-en` → `mail`).
 * Remembered: a server sends the same few descriptions in every entry, and lower-casing
 * `mailLocalAddress` makes a new string each time.
 */
export function attributeName(description: string): string {
  let name = ATTRIBUTE_NAMES.get(description);
  if (name === undefined) {
    const semi = description.indexOf(';');
    name = (semi < 0 ? description : description.slice(0, semi)).toLowerCase();
    if (ATTRIBUTE_NAMES.size >= 1024) ATTRIBUTE_NAMES.clear();
    ATTRIBUTE_NAMES.set(description, name);
  }
  return name;
}
const ATTRIBUTE_NAMES = new Map<string, string>();

/** An attribute value as text (ldapts gives a Buffer for values it does not decode). */
export function attributeText(v: string | Buffer): string {
  return Buffer.isBuffer(v) ? v.toString('utf8') : String(v);
}

/**
 * Hands each entry of a batch's answer to the look-ups it matches (by index). Null when the
 * answer cannot be used: an entry with a value this matching does not model, or an entry that
 * matches none of the look-ups.
 */
export function attribute(lookups: readonly Lookup[], entries: readonly Entry[]): Entry[][] | null {
  const out: Entry[][] = lookups.map(() => []);
  // Look-ups by their lower-cased value (batched values are plain ASCII without spaces).
  const byValue = new Map<string, number[]>();
  const matchedOn: Array<ReadonlySet<string>> = [];
  for (let i = 0; i < lookups.length; i++) {
    const l = lookups[i]!;
    matchedOn.push(MATCHED_ON.get(lookupAttributes(l.kind, l.value))!);
    const value = l.value.toLowerCase();
    const same = byValue.get(value);
    if (same) same.push(i);
    else byValue.set(value, [i]);
  }
  for (const entry of entries) {
    let used = false;
    for (const description in entry) {
      const attr = attributeName(description);
      if (attr !== 'uid' && attr !== 'mail' && attr !== 'maillocaladdress') continue;
      const raw = entry[description];
      for (const v of Array.isArray(raw) ? raw : [raw]) {
        const s = attributeText(v);
        if (!PLAIN_OR_SPACE.test(s)) return null;
        const matching = byValue.get(s.trim().toLowerCase());
        if (!matching) continue;
        for (const i of matching) {
          if (!matchedOn[i]!.has(attr)) continue;
          used = true;
          // Entries are handed out in order: this one, if already given to look-up i, is its last.
          const given = out[i]!;
          if (given[given.length - 1] !== entry) given.push(entry);
        }
      }
    }
    if (!used) return null;
  }
  return out;
}

interface Pending extends Lookup {
  resolve(entries: Entry[]): void;
  reject(err: unknown): void;
}

export interface LookupBatcherOptions {
  /** Most look-ups in one search; 1 turns batching off. */
  maxBatch: number;
  /** One search: the filter, how many entries it may return, and whose it is (for metrics). */
  search(filter: Filter, sizeLimit: number, op: LookupKind | 'batch'): Promise<Entry[]>;
  /** Told the size of each batch sent, and when a batch's answer could not be used. */
  onBatch?(size: number, usable: boolean): void;
}

export class LookupBatcher {
  private queue: Pending[] = [];
  private scheduled = false;

  constructor(private readonly opts: LookupBatcherOptions) {}

  /** The entries that match one look-up (as one search with ENTRIES_PER_LOOKUP as its size limit would return them). */
  lookup(kind: LookupKind, value: string): Promise<Entry[]> {
    if (this.opts.maxBatch <= 1 || !batchable(value)) return this.alone(kind, value);
    return new Promise<Entry[]>((resolve, reject) => {
      this.queue.push({ kind, value, resolve, reject });
      if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(this.flushBound);
      }
    });
  }

  private readonly flushBound = () => this.flush();

  private alone(kind: LookupKind, value: string): Promise<Entry[]> {
    return this.opts.search(lookupFilter(kind, value), ENTRIES_PER_LOOKUP, kind);
  }

  private flush(): void {
    this.scheduled = false;
    const queue = this.queue;
    this.queue = [];
    for (let i = 0; i < queue.length; i += this.opts.maxBatch) this.send(queue.slice(i, i + this.opts.maxBatch));
  }

  private sendAlone(p: Pending): void {
    this.alone(p.kind, p.value).then(p.resolve, p.reject);
  }

  private send(batch: Pending[]): void {
    if (batch.length === 1) {
      this.sendAlone(batch[0]!);
      return;
    }
    const filter = new OrFilter({ filters: batch.flatMap((p) => lookupAssertions(p.kind, p.value)) });
    // One entry over what the batch may use: ldapts hands back the entries that came before a
    // client size limit with no error (sizeLimitExceeded is not thrown when a limit was asked
    // for), so an answer cut short is only seen by its length. More than `limit` entries: the
    // answer may be incomplete (a look-up's entry among those left out), asked again one by one.
    const limit = ENTRIES_PER_LOOKUP * batch.length;
    this.opts.search(filter, limit + 1, 'batch').then(
      (entries) => {
        let per: Entry[][] | null;
        try {
          per = entries.length > limit ? null : attribute(batch, entries);
        } catch {
          // An entry this code could not read: the searches it replaces will say what it is.
          per = null;
        }
        this.opts.onBatch?.(batch.length, per !== null);
        if (!per) {
          for (const p of batch) this.sendAlone(p);
          return;
        }
        for (let i = 0; i < batch.length; i++) {
          if (per[i]!.length > ENTRIES_PER_LOOKUP) this.sendAlone(batch[i]!);
          else batch[i]!.resolve(per[i]!);
        }
      },
      (err: unknown) => {
        // Over a size limit reported as an error (searchUsers' ConflictError): asked again one by one.
        if (err instanceof ConflictError) {
          this.opts.onBatch?.(batch.length, false);
          for (const p of batch) this.sendAlone(p);
          return;
        }
        for (const p of batch) p.reject(err);
      },
    );
  }
}
