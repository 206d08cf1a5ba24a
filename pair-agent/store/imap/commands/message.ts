/**
 * Selected-state commands on messages: CHECK, CLOSE, UNSELECT, EXPUNGE (and UID EXPUNGE,
 * UIDPLUS), COPY and MOVE (COPYUID), STORE (+/-FLAGS, .SILENT, CONDSTORE UNCHANGEDSINCE).
 */
import { NotFoundError } from '../../../../common/errors.ts';
import type { MessageMeta } from '../../types.ts';
import { flagValues, type MailboxView } from '../mailbox-view.ts';
import type { Token } from '../parser.ts';
import { formatSet, inRanges, resolveRanges, SeqSetError, STAR, type SeqSet } from '../seqset.ts';
import type { Session } from '../session.ts';
import { ArgError } from '../session.ts';
import { defineCommand, type CommandDef, type ImapState } from '../state.ts';
import { atom, type Value } from '../writer.ts';
import { parseFlagTokens, touchSelected } from './mailbox.ts';

type Selected = Extract<ImapState, { name: 'selected' }>;

export interface Target {
  seq: number;
  meta: MessageMeta;
}

/** The messages a sequence set or UID set names, in sequence order. */
export function resolveMessages(view: MailboxView, set: SeqSet, uid: boolean): Target[] {
  if (uid) {
    const ranges = resolveRanges(set, view.maxUid);
    const out: Target[] = [];
    view.messages.forEach((meta, i) => {
      if (inRanges(ranges, meta.uid)) out.push({ seq: i + 1, meta });
    });
    return out;
  }
  const n = view.exists;
  // Numbers past the last message are an error, except in a range with "*", which is clamped
  // (so "1:*" in an empty mailbox names nothing, as Dovecot treats it).
  for (const [a, b] of set.ranges) if (a !== STAR && b !== STAR && (a > n || b > n)) throw new SeqSetError('invalid sequence number (past the last message)');
  const ranges = resolveRanges(set, n);
  const out: Target[] = [];
  for (const [lo, hi] of ranges) for (let s = lo; s <= Math.min(hi, n); s++) out.push({ seq: s, meta: view.messages[s - 1]! });
  return out;
}

export const check = defineCommand({
  name: 'CHECK',
  states: ['selected'],
  args: [],
  async handler() {
    // Every change is durable when its command completes; CHECK has nothing left to do.
    return { status: 'OK', text: 'Check completed' };
  },
});

export const close = defineCommand({
  name: 'CLOSE',
  states: ['selected'],
  args: [],
  async handler({ session, state }) {
    const view = state.view;
    if (!view.readOnly) {
      const deleted = view.messages.filter((m) => m.flags.includes('\\Deleted')).map((m) => m.uid);
      // CLOSE expunges without EXPUNGE responses (RFC 3501 6.4.2).
      if (deleted.length) await session.store.expunge(view.user, view.name, deleted);
    }
    return { status: 'OK', text: 'Close completed', next: { name: 'authenticated', user: state.user } };
  },
});

export const unselect = defineCommand({
  name: 'UNSELECT',
  states: ['selected'],
  args: [],
  async handler({ state }) {
    return { status: 'OK', text: 'Unselect completed', next: { name: 'authenticated', user: state.user } };
  },
});

export const expunge = defineCommand({
  name: 'EXPUNGE',
  states: ['selected'],
  args: ['seqset?'],
  uid: true,
  async handler({ session, state, args, uid }) {
    const view = state.view;
    if (view.readOnly) return { status: 'NO', code: 'READ-ONLY', text: 'Mailbox is read-only' };
    if (!uid && args[0] !== null) return { status: 'BAD', text: 'EXPUNGE takes no arguments' };
    if (uid && args[0] === null) return { status: 'BAD', text: 'UID EXPUNGE needs a UID set' };
    let candidates = view.messages;
    if (uid) {
      const ranges = resolveRanges(args[0] as SeqSet, view.maxUid);
      candidates = candidates.filter((m) => inRanges(ranges, m.uid));
    }
    const deleted = candidates.filter((m) => m.flags.includes('\\Deleted')).map((m) => m.uid);
    if (deleted.length) {
      const removed = await session.store.expunge(view.user, view.name, deleted);
      view.removeAndReport(removed, session);
      view.dirty = true;
    }
    return { status: 'OK', text: 'Expunge completed' };
  },
});

async function copyOrMove(session: Session, state: Selected, set: SeqSet, uid: boolean, dest: string, move: boolean) {
  const view = state.view;
  if (move && view.readOnly) return { status: 'NO' as const, code: 'READ-ONLY', text: 'Mailbox is read-only' };
  const targets = resolveMessages(view, set, uid).filter((t) => !view.pendingExpunge.has(t.meta.uid));
  if (targets.length === 0) return { status: 'OK' as const, text: `No messages ${move ? 'moved' : 'copied'}` };
  const uids = targets.map((t) => t.meta.uid);
  let res;
  try {
    res = move ? await session.store.move(view.user, view.name, uids, dest) : await session.store.copy(view.user, view.name, uids, dest);
  } catch (err) {
    if (err instanceof NotFoundError) return { status: 'NO' as const, code: 'TRYCREATE', text: `Mailbox doesn't exist: ${dest}` };
    throw err;
  }
  const mapping = [...res.mapping].sort((a, b) => a[0] - b[0]);
  const code = mapping.length ? `COPYUID ${res.uidValidity} ${mapping.map((m) => m[0]).join(',')} ${mapping.map((m) => m[1]).join(',')}` : undefined;
  const compact = mapping.length ? `COPYUID ${res.uidValidity} ${formatSet(mapping.map((m) => m[0]))} ${formatSet(mapping.map((m) => m[1]))}` : undefined;
  // The compact form is only right when both sides are ascending runs in the same order.
  const copyuid = compact && sameOrder(mapping) ? compact : code;
  touchSelected(session, dest);
  if (!move) return { status: 'OK' as const, ...(copyuid ? { code: copyuid } : {}), text: 'Copy completed' };
  // RFC 6851: COPYUID goes in an untagged OK before the EXPUNGE responses.
  if (copyuid) session.writeLine(`* OK [${copyuid}] Moved UIDs.`);
  view.removeAndReport(mapping.map((m) => m[0]), session);
  view.dirty = true;
  return { status: 'OK' as const, text: 'Move completed' };
}

function sameOrder(mapping: Array<[number, number]>): boolean {
  for (let i = 1; i < mapping.length; i++) if (mapping[i]![1] <= mapping[i - 1]![1]) return false;
  return true;
}

export const copy = defineCommand({
  name: 'COPY',
  states: ['selected'],
  args: ['seqset', 'mailbox'],
  uid: true,
  async handler({ session, state, args, uid }) {
    return copyOrMove(session, state, args[0] as SeqSet, uid, args[1] as string, false);
  },
});

export const move = defineCommand({
  name: 'MOVE',
  states: ['selected'],
  args: ['seqset', 'mailbox'],
  uid: true,
  async handler({ session, state, args, uid }) {
    return copyOrMove(session, state, args[0] as SeqSet, uid, args[1] as string, true);
  },
});

export const store = defineCommand({
  name: 'STORE',
  states: ['selected'],
  args: ['seqset', 'any*'],
  uid: true,
  expungeAfter: false,
  async handler({ session, state, args, uid }) {
    const view = state.view;
    const set = args[0] as SeqSet;
    const rest = args.slice(1) as Token[];
    let i = 0;
    let unchangedSince: number | undefined;
    const mods = rest[i];
    if (mods?.type === 'list') {
      const items = mods.items;
      if (items.length !== 2 || items[0]?.type !== 'atom' || items[0].value.toUpperCase() !== 'UNCHANGEDSINCE' || items[1]?.type !== 'atom' || !/^\d+$/.test(items[1].value)) {
        throw new ArgError('unknown STORE modifier');
      }
      unchangedSince = Number(items[1].value);
      session.condstore = true;
      i++;
    }
    const item = rest[i++];
    if (!item || item.type !== 'atom') throw new ArgError('missing STORE data item');
    const m = /^([+-]?)FLAGS(\.SILENT)?$/i.exec(item.value);
    if (!m) throw new ArgError(`unknown STORE data item ${item.value.slice(0, 30)}`);
    const valueTokens = rest.slice(i);
    const flagTokens = valueTokens.length === 1 && valueTokens[0]!.type === 'list' ? valueTokens[0].items : valueTokens;
    const flags = parseFlagTokens(flagTokens);
    if (view.readOnly) return { status: 'NO', code: 'READ-ONLY', text: 'Mailbox is read-only' };
    const op = m[1] === '+' ? 'add' : m[1] === '-' ? 'remove' : 'set';
    const silent = Boolean(m[2]);
    const targets = resolveMessages(view, set, uid).filter((t) => !view.pendingExpunge.has(t.meta.uid));
    if (targets.length === 0) return { status: 'OK', text: 'Store completed' };
    const res = await session.store.updateFlags(view.user, view.name, targets.map((t) => t.meta.uid), op, flags, unchangedSince !== undefined ? { unchangedSince } : {});
    view.applyUpdates(res.updated);
    const failed = new Set(res.failed);
    const updated = new Set(res.updated.map((u) => u.uid));
    for (const t of targets) {
      if (failed.has(t.meta.uid)) continue;
      const meta = view.meta(t.meta.uid);
      if (!meta) continue;
      const items: Value[] = [];
      if (uid) items.push(atom('UID'), meta.uid);
      if (!silent) items.push(atom('FLAGS'), flagValues(meta.flags, view.recent.has(meta.uid)));
      if (session.condstore && (updated.has(meta.uid) || !silent)) items.push(atom('MODSEQ'), [meta.modseq]);
      // .SILENT without CONDSTORE says nothing; with CONDSTORE the new MODSEQ still goes out (RFC 7162 3.1.3).
      if (silent && !(session.condstore && updated.has(meta.uid))) continue;
      session.untagged([view.seqOf(meta.uid), atom('FETCH'), items]);
    }
    if (failed.size) {
      const ids = targets.filter((t) => failed.has(t.meta.uid)).map((t) => (uid ? t.meta.uid : t.seq));
      return { status: 'OK', code: `MODIFIED ${formatSet(ids.sort((a, b) => a - b))}`, text: 'Conditional store failed' };
    }
    return { status: 'OK', text: 'Store completed' };
  },
});

export const messageCommands: CommandDef[] = [check, close, unselect, expunge, copy, move, store] as CommandDef[];
