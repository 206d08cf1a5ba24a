/**
 * Authenticated-state commands on mailboxes: SELECT, EXAMINE, CREATE, DELETE, RENAME,
 * SUBSCRIBE, UNSUBSCRIBE, LIST, LSUB, STATUS, APPEND, plus NAMESPACE, ENABLE, QUOTA and IDLE.
 * Hierarchy delimiter is "/"; mailbox names are kept as the client sends them (modified UTF-7).
 */
import { ConflictError, NotFoundError } from '../../../../common/errors.ts';
import type { MailboxInfo } from '../../types.ts';
import { MailboxView } from '../mailbox-view.ts';
import type { Token } from '../parser.ts';
import { ArgError, normalizeMailbox, type Session } from '../session.ts';
import { defineCommand, type CommandDef, type ImapState, type Reply } from '../state.ts';
import { atom, type Value } from '../writer.ts';

export const DELIMITER = '/';
const AUTHED = ['authenticated', 'selected'] as const;
export const SYSTEM_FLAGS = ['\\Answered', '\\Flagged', '\\Deleted', '\\Seen', '\\Draft'];

async function openMailbox(session: Session, state: ImapState, mailbox: string, readOnly: boolean, params: Token[] | null): Promise<Reply> {
  const user = state.name === 'selected' || state.name === 'authenticated' ? state.user : '';
  if (params) {
    for (const p of params) {
      if (p.type === 'atom' && p.value.toUpperCase() === 'CONDSTORE') session.condstore = true;
      else return { status: 'BAD', text: 'unknown SELECT parameter' };
    }
  }
  let info: MailboxInfo;
  let snap;
  try {
    info = await session.store.mailboxInfo(user, mailbox);
    snap = await session.ctx.snapshots.get(session.store, user, mailbox, info);
  } catch (err) {
    // A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
    if (err instanceof NotFoundError) return { status: 'NO', code: 'NONEXISTENT', text: `Mailbox doesn't exist: ${mailbox}`, next: { name: 'authenticated', user } };
    throw err;
  }
  const { keywords, firstUnseen } = snap;
  // The snapshot is shared with other sessions: the view gets its own array of the same objects.
  const messages = snap.messages.slice();
  const recent = readOnly ? new Set<number>() : session.ctx.recent.claim(user, mailbox, info.uidValidity, messages);
  const highest = Math.max(info.highestModseq, ...messages.slice(-1).map((m) => m.modseq));
  const view = new MailboxView(user, mailbox, readOnly, info.uidValidity, messages, highest, recent, session.ctx.recent);
  const flags = [...SYSTEM_FLAGS, ...keywords].join(' ');
  session.writeLine(`* FLAGS (${flags})`);
  session.writeLine(`* OK [PERMANENTFLAGS (${readOnly ? '' : `${flags} \\*`})] ${readOnly ? 'Read-only mailbox' : 'Flags permitted'}`);
  session.writeLine(`* ${messages.length} EXISTS`);
  session.writeLine(`* ${recent.size} RECENT`);
  if (firstUnseen) session.writeLine(`* OK [UNSEEN ${firstUnseen}] First unseen`);
  session.writeLine(`* OK [UIDVALIDITY ${info.uidValidity}] UIDs valid`);
  session.writeLine(`* OK [UIDNEXT ${info.uidNext}] Predicted next UID`);
  session.writeLine(`* OK [HIGHESTMODSEQ ${Math.max(1, highest)}] Highest`);
  return {
    status: 'OK',
    code: readOnly ? 'READ-ONLY' : 'READ-WRITE',
    text: `${readOnly ? 'Examine' : 'Select'} completed`,
    next: { name: 'selected', user, view },
  };
}

const userOf = (s: ImapState): string => (s.name === 'authenticated' || s.name === 'selected' ? s.user : '');

export const select = defineCommand({
  name: 'SELECT',
  states: AUTHED,
  args: ['mailbox', 'list?'],
  async handler({ session, state, args }) {
    return openMailbox(session, state, args[0] as string, false, args[1] as Token[] | null);
  },
});

export const examine = defineCommand({
  name: 'EXAMINE',
  states: AUTHED,
  args: ['mailbox', 'list?'],
  async handler({ session, state, args }) {
    return openMailbox(session, state, args[0] as string, true, args[1] as Token[] | null);
  },
});

/** Marks the selected view stale after this session changed that mailbox itself. */
export function touchSelected(session: Session, mailbox: string): void {
  if (session.state.name === 'selected' && session.state.view.name === mailbox) session.state.view.dirty = true;
}

export const create = defineCommand({
  name: 'CREATE',
  states: AUTHED,
  args: ['mailbox'],
  async handler({ session, state, args }) {
    let name = args[0] as string;
    // A trailing delimiter only says the client means to create children under it (RFC 3501 6.3.3).
    while (name.endsWith(DELIMITER)) name = name.slice(0, -1);
    if (!name || name.split(DELIMITER).some((p) => p === '')) return { status: 'NO', code: 'CANNOT', text: 'Invalid mailbox name' };
    name = normalizeMailbox(name);
    if (name === 'INBOX') return { status: 'NO', code: 'ALREADYEXISTS', text: 'Mailbox already exists' };
    const user = userOf(state);
    const existing = new Set((await session.store.listMailboxes(user)).map((m) => m.name));
    if (existing.has(name)) return { status: 'NO', code: 'ALREADYEXISTS', text: 'Mailbox already exists' };
    // Create missing superiors too, so the hierarchy LIST shows is real.
    const parts = name.split(DELIMITER);
    for (let i = 1; i < parts.length; i++) {
      const parent = parts.slice(0, i).join(DELIMITER);
      if (!existing.has(parent)) {
        try {
          await session.store.createMailbox(user, parent);
        } catch (err) {
          if (!(err instanceof ConflictError)) throw err;
        }
      }
    }
    await session.store.createMailbox(user, name);
    return { status: 'OK', text: 'Create completed' };
  },
});

export const del = defineCommand({
  name: 'DELETE',
  states: AUTHED,
  args: ['mailbox'],
  async handler({ session, state, args }) {
    const name = args[0] as string;
    if (name === 'INBOX') return { status: 'NO', code: 'CANNOT', text: 'INBOX cannot be deleted' };
    await session.store.deleteMailbox(userOf(state), name);
    session.ctx.recent.forget(userOf(state), name);
    return { status: 'OK', text: 'Delete completed' };
  },
});

export const rename = defineCommand({
  name: 'RENAME',
  states: AUTHED,
  args: ['mailbox', 'mailbox'],
  async handler({ session, state, args }) {
    const [from, to] = args as [string, string];
    const user = userOf(state);
    if (from === 'INBOX') return { status: 'NO', code: 'CANNOT', text: 'Renaming INBOX is not supported; move its messages instead' };
    if (to === 'INBOX') return { status: 'NO', code: 'ALREADYEXISTS', text: 'Mailbox already exists' };
    if (to.startsWith(from + DELIMITER)) return { status: 'NO', code: 'CANNOT', text: 'Cannot rename a mailbox into itself' };
    await session.store.renameMailbox(user, from, to);
    // Inferior names move with their superior (RFC 3501 6.3.5) unless the store already did it.
    const rest = (await session.store.listMailboxes(user)).filter((m) => m.name.startsWith(from + DELIMITER));
    for (const m of rest) await session.store.renameMailbox(user, m.name, to + m.name.slice(from.length));
    return { status: 'OK', text: 'Rename completed' };
  },
});

export const subscribe = defineCommand({
  name: 'SUBSCRIBE',
  states: AUTHED,
  args: ['mailbox'],
  async handler({ session, state, args }) {
    await session.store.setSubscribed(userOf(state), args[0] as string, true);
    return { status: 'OK', text: 'Subscribe completed' };
  },
});

export const unsubscribe = defineCommand({
  name: 'UNSUBSCRIBE',
  states: AUTHED,
  args: ['mailbox'],
  async handler({ session, state, args }) {
    await session.store.setSubscribed(userOf(state), args[0] as string, false);
    return { status: 'OK', text: 'Unsubscribe completed' };
  },
});

export function patternRegex(pattern: string): RegExp {
  let re = '';
  for (const ch of pattern) {
    if (ch === '*') re += '.*';
    else if (ch === '%') re += '[^/]*';
    else re += ch.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 's');
}

function matches(re: RegExp, name: string): boolean {
  if (re.test(name)) return true;
  // INBOX is case-insensitive, also as the first level of a hierarchy.
  if (name === 'INBOX' || name.startsWith('INBOX/')) {
    for (const variant of ['inbox', 'Inbox']) if (re.test(variant + name.slice(5))) return true;
  }
  return false;
}

async function listCommand(session: Session, state: ImapState, ref: string, pattern: string, lsub: boolean): Promise<Reply> {
  const word = lsub ? 'LSUB' : 'LIST';
  if (pattern === '' && !lsub) {
    session.untagged([atom('LIST'), [atom('\\Noselect')], DELIMITER, '']);
    return { status: 'OK', text: 'List completed' };
  }
  const full = normalizeMailbox(ref + pattern);
  const re = patternRegex(full);
  const boxes = await session.store.listMailboxes(userOf(state));
  const byName = new Map(boxes.map((b) => [b.name, b]));
  const names = new Set<string>(byName.keys());
  // Superiors that do not exist as mailboxes still appear, as \Noselect.
  for (const b of boxes) {
    const parts = b.name.split(DELIMITER);
    for (let i = 1; i < parts.length; i++) names.add(parts.slice(0, i).join(DELIMITER));
  }
  const sorted = [...names].sort((a, b) => (a === 'INBOX' ? -1 : b === 'INBOX' ? 1 : a < b ? -1 : a > b ? 1 : 0));
  for (const name of sorted) {
    if (!matches(re, name)) continue;
    const box = byName.get(name);
    if (lsub && !box?.subscribed) continue;
    const attrs: Value[] = [];
    if (!box) attrs.push(atom('\\Noselect'));
    const hasChildren = [...names].some((n) => n.startsWith(name + DELIMITER));
    attrs.push(atom(hasChildren ? '\\HasChildren' : '\\HasNoChildren'));
    if (box?.specialUse) attrs.push(atom(box.specialUse));
    session.untagged([atom(word), attrs, DELIMITER, name]);
  }
  return { status: 'OK', text: `${word} completed` };
}

export const list = defineCommand({
  name: 'LIST',
  states: AUTHED,
  args: ['pattern', 'pattern'],
  async handler({ session, state, args }) {
    return listCommand(session, state, args[0] as string, args[1] as string, false);
  },
});

export const lsub = defineCommand({
  name: 'LSUB',
  states: AUTHED,
  args: ['pattern', 'pattern'],
  async handler({ session, state, args }) {
    return listCommand(session, state, args[0] as string, args[1] as string, true);
  },
});

export const status = defineCommand({
  name: 'STATUS',
  states: AUTHED,
  args: ['mailbox', 'list'],
  async handler({ session, state, args }) {
    const name = args[0] as string;
    const items = (args[1] as Token[]).map((t) => (t.type === 'atom' ? t.value.toUpperCase() : ''));
    const known = ['MESSAGES', 'RECENT', 'UIDNEXT', 'UIDVALIDITY', 'UNSEEN', 'HIGHESTMODSEQ'];
    const bad = items.find((i) => !known.includes(i));
    if (bad !== undefined || items.length === 0) return { status: 'BAD', text: `unknown STATUS item ${bad ?? ''}`.trim() };
    const user = userOf(state);
    const info = await session.store.mailboxInfo(user, name);
    const out: Value[] = [];
    for (const item of items) {
      let v: number;
      if (item === 'MESSAGES') v = info.messages;
      else if (item === 'UIDNEXT') v = info.uidNext;
      else if (item === 'UIDVALIDITY') v = info.uidValidity;
      else if (item === 'UNSEEN') v = info.unseen;
      else if (item === 'HIGHESTMODSEQ') {
        v = Math.max(1, info.highestModseq);
        session.condstore = true;
      } else {
        // RECENT: messages no session has seen yet, counted without claiming them (STATUS must not).
        const sel = session.state.name === 'selected' && session.state.view.name === name ? session.state.view : null;
        if (sel) v = sel.recent.size;
        else {
          const msgs = await session.store.listMessages(user, name);
          v = session.ctx.recent.countUnclaimed(user, name, info.uidValidity, msgs.map((m) => m.uid));
        }
      }
      out.push(atom(item), v);
    }
    session.untagged([atom('STATUS'), name, out]);
    return { status: 'OK', text: 'Status completed' };
  },
});

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** RFC 3501 date-time: "dd-Mon-yyyy hh:mm:ss +zzzz". */
export function parseDateTime(s: string): number | null {
  const m = /^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d{2}):(\d{2}):(\d{2}) ([+-])(\d{2})(\d{2})$/.exec(s);
  if (!m) return null;
  const month = MONTHS.findIndex((x) => x.toLowerCase() === m[2]!.toLowerCase());
  if (month < 0) return null;
  const utc = Date.UTC(Number(m[3]), month, Number(m[1]), Number(m[4]), Number(m[5]), Number(m[6]));
  const offset = (Number(m[8]) * 60 + Number(m[9])) * 60_000 * (m[7] === '-' ? -1 : 1);
  const t = utc - offset;
  return Number.isFinite(t) ? t : null;
}

export function formatDateTime(ms: number): string {
  const d = new Date(ms);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${p(d.getUTCDate())}-${MONTHS[d.getUTCMonth()]}-${d.getUTCFullYear()} ${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())} +0000`;
}

/** Validates a flag list from APPEND/STORE; system flags are spelled canonically, \Recent refused. */
export function parseFlagTokens(tokens: Token[]): string[] {
  const out: string[] = [];
  for (const t of tokens) {
    if (t.type !== 'atom') throw new ArgError('flags are atoms');
    const v = t.value;
    if (v.startsWith('\\')) {
      const sys = SYSTEM_FLAGS.find((f) => f.toLowerCase() === v.toLowerCase());
      if (!sys) throw new ArgError(v.toLowerCase() === '\\recent' ? '\\Recent cannot be set' : `unknown system flag ${v.slice(0, 30)}`);
      if (!out.includes(sys)) out.push(sys);
    } else {
      if (/[\]%*\\]/.test(v) || v.length > 100) throw new ArgError(`invalid keyword ${v.slice(0, 30)}`);
      if (!out.includes(v)) out.push(v);
    }
  }
  return out;
}

export const append = defineCommand({
  name: 'APPEND',
  states: AUTHED,
  args: ['mailbox', 'any*'],
  async handler({ session, state, args }) {
    const mailbox = args[0] as string;
    const rest = args.slice(1) as Token[];
    let flags: string[] = [];
    let date: number | undefined;
    let i = 0;
    if (rest[i]?.type === 'list') flags = parseFlagTokens((rest[i++] as { items: Token[] }).items);
    const maybeDate = rest[i];
    if (maybeDate && maybeDate.type === 'string' && !maybeDate.literal) {
      const t = parseDateTime(maybeDate.value.toString('latin1'));
      if (t === null) return { status: 'BAD', text: 'invalid date-time' };
      date = t;
      i++;
    }
    const body = rest[i++];
    if (!body || body.type !== 'string') return { status: 'BAD', text: 'APPEND needs the message as a literal' };
    if (i !== rest.length) return { status: 'BAD', text: 'too many arguments (MULTIAPPEND is not supported)' };
    if (body.value.length === 0) return { status: 'NO', text: 'Empty message' };
    const user = userOf(state);
    let res;
    try {
      res = await session.store.append(user, mailbox, body.value, { flags, ...(date !== undefined ? { internalDate: date } : {}) });
    } catch (err) {
      if (err instanceof NotFoundError) return { status: 'NO', code: 'TRYCREATE', text: `Mailbox doesn't exist: ${mailbox}` };
      throw err;
    }
    touchSelected(session, mailbox);
    return { status: 'OK', code: `APPENDUID ${res.uidValidity} ${res.uid}`, text: 'Append completed' };
  },
});

export const namespace = defineCommand({
  name: 'NAMESPACE',
  states: AUTHED,
  args: [],
  async handler({ session }) {
    session.untagged([atom('NAMESPACE'), [['', DELIMITER]], null, null]);
    return { status: 'OK', text: 'Namespace completed' };
  },
});

export const enable = defineCommand({
  name: 'ENABLE',
  states: AUTHED,
  args: ['atom*'],
  async handler({ session, args }) {
    if (args.length === 0) return { status: 'BAD', text: 'ENABLE needs capability names' };
    const enabled: string[] = [];
    for (const a of args as string[]) {
      if (a.toUpperCase() === 'CONDSTORE' && !session.enabled.has('CONDSTORE')) {
        session.condstore = true;
        session.enabled.add('CONDSTORE');
        enabled.push('CONDSTORE');
      }
    }
    session.writeLine(`* ENABLED${enabled.map((e) => ' ' + e).join('')}`);
    return { status: 'OK', text: 'Enabled' };
  },
});

async function quotaLine(session: Session, user: string): Promise<boolean> {
  const q = await session.store.quota(user);
  if (q.limitBytes === null) return false;
  session.untagged([atom('QUOTA'), '', [atom('STORAGE'), Math.ceil(q.usedBytes / 1024), Math.floor(q.limitBytes / 1024)]]);
  return true;
}

export const getquotaroot = defineCommand({
  name: 'GETQUOTAROOT',
  states: AUTHED,
  args: ['mailbox'],
  async handler({ session, state, args }) {
    const user = userOf(state);
    await session.store.mailboxInfo(user, args[0] as string);
    const q = await session.store.quota(user);
    if (q.limitBytes === null) session.untagged([atom('QUOTAROOT'), args[0] as string]);
    else {
      session.untagged([atom('QUOTAROOT'), args[0] as string, '']);
      await quotaLine(session, user);
    }
    return { status: 'OK', text: 'Getquotaroot completed' };
  },
});

export const getquota = defineCommand({
  name: 'GETQUOTA',
  states: AUTHED,
  args: ['astring'],
  async handler({ session, state, args }) {
    if (args[0] !== '' || !(await quotaLine(session, userOf(state)))) return { status: 'NO', code: 'NONEXISTENT', text: 'No such quota root' };
    return { status: 'OK', text: 'Getquota completed' };
  },
});

export const setquota = defineCommand({
  name: 'SETQUOTA',
  states: AUTHED,
  args: ['astring', 'list'],
  async handler() {
    return { status: 'NO', code: 'NOPERM', text: 'Quota is set by the administrator' };
  },
});

export const idle = defineCommand({
  name: 'IDLE',
  states: AUTHED,
  args: [],
  async handler({ session }) {
    session.writeLine('+ idling');
    const line = session.readRawLine();
    let result: Reply | null = null;
    const keepalive =
      session.ctx.idleKeepaliveMs > 0
        ? setInterval(() => {
            session.writeLine('* OK Still here');
            session.flush();
          }, session.ctx.idleKeepaliveMs)
        : null;
    void line.then((l) => {
      if (!l) result = { status: 'NO', text: 'Connection closed' };
      else if ('error' in l) result = { status: 'BAD', text: l.error };
      else if (l.line.trim().toUpperCase() === 'DONE') result = { status: 'OK', text: 'IDLE terminated' };
      else result = { status: 'BAD', text: 'Expected DONE' };
      session.idleWake?.();
    });
    try {
      for (;;) {
        // Changes are reported as they happen while idling, expunges included (RFC 2177).
        if (session.state.name === 'selected') {
          try {
            await session.state.view.sync(session.store, session, { allowExpunge: true, condstore: session.condstore });
          } catch (err) {
            session.lostMailbox(err);
          }
        }
        if (result || session.isClosed) break;
        if (session.state.name === 'selected' && session.state.view.dirty) continue;
        session.flush();
        await new Promise<void>((resolve) => {
          session.idleWake = resolve;
        });
        session.idleWake = null;
      }
    } finally {
      session.idleWake = null;
      if (keepalive) clearInterval(keepalive);
    }
    return result ?? { status: 'NO', text: 'Connection closed' };
  },
});

export const mailboxCommands: CommandDef[] = [select, examine, create, del, rename, subscribe, unsubscribe, list, lsub, status, append, namespace, enable, getquotaroot, getquota, setquota, idle] as CommandDef[];
