/**
 * FETCH and UID FETCH (RFC 3501 6.4.5, CONDSTORE's MODSEQ and CHANGEDSINCE). Structure data
 * (ENVELOPE, BODY, BODYSTRUCTURE) comes from the store's body metadata cache and is computed
 * once per stored body; sections are cut from the stored bytes, never altered. Non-PEEK body
 * fetches set \Seen (unless the mailbox is read-only) and report the new FLAGS.
 */
import { NotFoundError } from '../../../../common/errors.ts';
import type { MessageMeta } from '../../types.ts';
import { flagValues } from '../mailbox-view.ts';
import { deserializeSummary, extractSection, extractTopSection, parseMime, serializeSummary, summarize, type MimePart, type SectionSpec, type StructureSummary } from '../mime.ts';
import type { Token } from '../parser.ts';
import type { SeqSet } from '../seqset.ts';
import { ArgError, type Session } from '../session.ts';
import { defineCommand, type CommandDef } from '../state.ts';
import { atom, Literal, Wire, type Value } from '../writer.ts';
import { formatDateTime } from './mailbox.ts';
import { resolveMessages } from './message.ts';

export const STRUCTURE_META_KIND = 'imap.structure.v1';

type Simple = 'UID' | 'FLAGS' | 'INTERNALDATE' | 'RFC822.SIZE' | 'ENVELOPE' | 'BODY' | 'BODYSTRUCTURE' | 'MODSEQ';

export type FetchItem =
  | { kind: 'simple'; name: Simple }
  | { kind: 'section'; label: string; section: SectionSpec; partial: [number, number] | null; setSeen: boolean };

const SIMPLE: Simple[] = ['UID', 'FLAGS', 'INTERNALDATE', 'RFC822.SIZE', 'ENVELOPE', 'BODY', 'BODYSTRUCTURE', 'MODSEQ'];
const MACROS: Record<string, string[]> = {
  ALL: ['FLAGS', 'INTERNALDATE', 'RFC822.SIZE', 'ENVELOPE'],
  FAST: ['FLAGS', 'INTERNALDATE', 'RFC822.SIZE'],
  FULL: ['FLAGS', 'INTERNALDATE', 'RFC822.SIZE', 'ENVELOPE', 'BODY'],
};

function parseSection(text: string): SectionSpec {
  const m = /^((?:\d+\.)*\d+)?(?:\.?)(.*)$/s.exec(text)!;
  const path = m[1] ? m[1].split('.').map(Number) : [];
  if (path.some((n) => !Number.isSafeInteger(n) || n < 1)) throw new ArgError('invalid section part number');
  let rest = m[2] ?? '';
  if (path.length && m[1] && text.length > m[1].length && text[m[1].length] !== '.') throw new ArgError('invalid section');
  const upper = rest.toUpperCase();
  if (upper === '') return { path, specifier: '', fields: [] };
  if (upper === 'HEADER' || upper === 'TEXT') return { path, specifier: upper, fields: [] };
  if (upper === 'MIME') {
    if (!path.length) throw new ArgError('MIME needs a part number');
    return { path, specifier: 'MIME', fields: [] };
  }
  const f = /^HEADER\.FIELDS(\.NOT)? \((.*)\)$/is.exec(rest);
  if (!f) throw new ArgError(`invalid section ${text.slice(0, 40)}`);
  const fields: string[] = [];
  rest = f[2]!;
  const re = /"((?:[^"\\]|\\.)*)"|([^\s"()]+)/g;
  let mm: RegExpExecArray | null;
  while ((mm = re.exec(rest))) fields.push((mm[1] ?? mm[2]!).replace(/\\(.)/g, '$1'));
  if (fields.length === 0) throw new ArgError('HEADER.FIELDS needs field names');
  for (const x of fields) if (!/^[\x21-\x39\x3b-\x7e]+$/.test(x)) throw new ArgError('invalid header field name');
  return { path, specifier: f[1] ? 'HEADER.FIELDS.NOT' : 'HEADER.FIELDS', fields };
}

function sectionLabel(spec: SectionSpec): string {
  const parts: string[] = [];
  if (spec.path.length) parts.push(spec.path.join('.'));
  if (spec.specifier) {
    parts.push(spec.specifier === 'HEADER.FIELDS' || spec.specifier === 'HEADER.FIELDS.NOT' ? `${spec.specifier} (${spec.fields.map((f) => f.toUpperCase()).join(' ')})` : spec.specifier);
  }
  return parts.join('.');
}

export function parseFetchItem(raw: string): FetchItem {
  const upper = raw.toUpperCase();
  if ((SIMPLE as string[]).includes(upper)) return { kind: 'simple', name: upper as Simple };
  if (upper === 'RFC822') return { kind: 'section', label: 'RFC822', section: { path: [], specifier: '', fields: [] }, partial: null, setSeen: true };
  if (upper === 'RFC822.HEADER') return { kind: 'section', label: 'RFC822.HEADER', section: { path: [], specifier: 'HEADER', fields: [] }, partial: null, setSeen: false };
  if (upper === 'RFC822.TEXT') return { kind: 'section', label: 'RFC822.TEXT', section: { path: [], specifier: 'TEXT', fields: [] }, partial: null, setSeen: true };
  const m = /^(BODY|BODY\.PEEK|BINARY\.PEEK|BINARY)\[(.*)\](?:<(\d+)\.(\d+)>)?$/is.exec(raw);
  if (!m) throw new ArgError(`unknown FETCH item ${raw.slice(0, 40)}`);
  const kindWord = m[1]!.toUpperCase();
  if (kindWord.startsWith('BINARY')) throw new ArgError('BINARY is not supported');
  const section = parseSection(m[2]!);
  const partial: [number, number] | null = m[3] !== undefined ? [Number(m[3]), Number(m[4])] : null;
  if (partial && (!Number.isSafeInteger(partial[0]) || !Number.isSafeInteger(partial[1]) || partial[1] === 0)) throw new ArgError('invalid partial range');
  return { kind: 'section', label: `BODY[${sectionLabel(section)}]`, section, partial, setSeen: kindWord === 'BODY' };
}

export function parseFetchItems(t: Token): FetchItem[] {
  if (t.type === 'atom' && MACROS[t.value.toUpperCase()]) return MACROS[t.value.toUpperCase()]!.map(parseFetchItem);
  const list = t.type === 'list' ? t.items : [t];
  if (list.length === 0) throw new ArgError('empty FETCH item list');
  return list.map((x) => {
    if (x.type !== 'atom') throw new ArgError('FETCH items are atoms');
    return parseFetchItem(x.value);
  });
}

async function structure(session: Session, meta: MessageMeta, body: () => Promise<Buffer>): Promise<StructureSummary> {
  const cached = await session.store.getBodyMeta(meta.bodyId, STRUCTURE_META_KIND);
  const parsed = cached ? deserializeSummary(cached) : null;
  if (parsed) return parsed;
  const s = summarize(await body());
  await session.store.setBodyMeta(meta.bodyId, STRUCTURE_META_KIND, serializeSummary(s)).catch((err: unknown) => {
    session.log.warn({ err: (err as Error).message }, 'could not cache message structure');
  });
  return s;
}

export const fetch = defineCommand({
  name: 'FETCH',
  states: ['selected'],
  args: ['seqset', 'any', 'list?'],
  uid: true,
  expungeAfter: false,
  async handler({ session, state, args, uid }) {
    const view = state.view;
    const items = parseFetchItems(args[1] as Token);
    let changedSince: number | undefined;
    const mods = args[2] as Token[] | null;
    if (mods) {
      if (mods.length !== 2 || mods[0]?.type !== 'atom' || mods[0].value.toUpperCase() !== 'CHANGEDSINCE' || mods[1]?.type !== 'atom' || !/^\d+$/.test(mods[1].value)) {
        throw new ArgError('unknown FETCH modifier');
      }
      changedSince = Number(mods[1].value);
    }
    const wantsModseq = changedSince !== undefined || items.some((i) => i.kind === 'simple' && i.name === 'MODSEQ');
    if (wantsModseq) session.condstore = true;
    let targets = resolveMessages(view, args[0] as SeqSet, uid);
    if (changedSince !== undefined) targets = targets.filter((t) => t.meta.modseq > changedSince!);

    // \Seen first, in one store call, so each response carries the new flags.
    const flagsChanged = new Set<number>();
    if (!view.readOnly && items.some((i) => i.kind === 'section' && i.setSeen)) {
      const unseen = targets.filter((t) => !t.meta.flags.includes('\\Seen') && !view.pendingExpunge.has(t.meta.uid)).map((t) => t.meta.uid);
      if (unseen.length) {
        const res = await session.store.updateFlags(view.user, view.name, unseen, 'add', ['\\Seen']);
        view.applyUpdates(res.updated);
        for (const u of res.updated) flagsChanged.add(u.uid);
      }
    }
    const needsBody = items.some((i) => i.kind === 'section');
    let expungeIssued = false;
    for (const t of targets) {
      const meta = view.meta(t.meta.uid) ?? t.meta;
      let raw: Buffer | null = null;
      let root: MimePart | null = null;
      const body = async () => (raw ??= await session.store.readMessage(meta.bodyId));
      const out: Value[] = [];
      const seen = new Set<string>();
      const push = (name: string, v: Value) => {
        if (seen.has(name)) return;
        seen.add(name);
        out.push(atom(name), v);
      };
      try {
        if (uid) push('UID', meta.uid);
        if (needsBody) await body();
        for (const item of items) {
          if (item.kind === 'simple') {
            switch (item.name) {
              case 'UID':
                push('UID', meta.uid);
                break;
              case 'FLAGS':
                push('FLAGS', flagValues(meta.flags, view.recent.has(meta.uid)));
                break;
              case 'INTERNALDATE':
                push('INTERNALDATE', formatDateTime(meta.internalDate));
                break;
              case 'RFC822.SIZE':
                push('RFC822.SIZE', meta.size);
                break;
              case 'MODSEQ':
                push('MODSEQ', [meta.modseq]);
                break;
              case 'ENVELOPE':
                push('ENVELOPE', new Wire((await structure(session, meta, body)).envelope));
                break;
              case 'BODY':
                push('BODY', new Wire((await structure(session, meta, body)).body));
                break;
              case 'BODYSTRUCTURE':
                push('BODYSTRUCTURE', new Wire((await structure(session, meta, body)).bodystructure));
                break;
            }
            continue;
          }
          const buf = await body();
          let bytes: Buffer;
          const top = root ? null : extractTopSection(buf, item.section);
          if (top) bytes = top;
          else {
            root ??= parseMime(buf);
            bytes = extractSection(buf, root, item.section);
          }
          let label = item.label;
          if (item.partial) {
            const [start, count] = item.partial;
            bytes = start >= bytes.length ? Buffer.alloc(0) : bytes.subarray(start, start + count);
            label += `<${start}>`;
          }
          push(label, new Literal(bytes));
        }
        if (flagsChanged.has(meta.uid)) push('FLAGS', flagValues(meta.flags, view.recent.has(meta.uid)));
        if (session.condstore) push('MODSEQ', [meta.modseq]);
      } catch (err) {
        // A message expunged by another session may have lost its body already: skip it.
        if (err instanceof NotFoundError && view.pendingExpunge.has(meta.uid)) {
          expungeIssued = true;
          continue;
        }
        throw err;
      }
      session.untagged([t.seq, atom('FETCH'), out]);
      await session.drain();
    }
    if (expungeIssued) return { status: 'NO', code: 'EXPUNGEISSUED', text: 'Some messages were expunged' };
    return { status: 'OK', text: 'Fetch completed' };
  },
});

export const fetchCommands: CommandDef[] = [fetch] as CommandDef[];
