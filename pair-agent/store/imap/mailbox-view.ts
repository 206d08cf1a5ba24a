/**
 * A session's view of its selected mailbox: the messages in sequence-number order as this client
 * knows them. Changes made elsewhere (other sessions, deliveries) reach the view only through
 * `sync`, which compares it with the store and reports the difference as untagged EXPUNGE,
 * EXISTS, RECENT and FETCH responses, so a client never sees a wrong sequence number: an
 * expunge stays in the view (and keeps its number) until its EXPUNGE has been sent.
 */
import type { MailStore, MessageMeta } from '../types.ts';
import type { Value } from './writer.ts';
import { atom } from './writer.ts';

export interface ViewUpdateSink {
  untagged(values: Value[]): void;
}

/** Recent (\Recent) bookkeeping shared by the sessions of one server: the first session to see a new message gets it. */
export class RecentTracker {
  private readonly claimed = new Map<string, { uidValidity: number; uid: number }>();

  /** Returns the UIDs (of `list`, in ascending UID order) that become recent for the caller. */
  claim(user: string, mailbox: string, uidValidity: number, list: ReadonlyArray<{ uid: number }>): Set<number> {
    const key = `${user}\0${mailbox}`;
    let c = this.claimed.get(key);
    if (!c || c.uidValidity !== uidValidity) {
      c = { uidValidity, uid: 0 };
      this.claimed.set(key, c);
    }
    const out = new Set<number>();
    // From the end: only UIDs above the last claimed one count, and the list is ascending.
    for (let i = list.length - 1; i >= 0 && list[i]!.uid > c.uid; i--) out.add(list[i]!.uid);
    if (list.length) c.uid = Math.max(c.uid, list[list.length - 1]!.uid);
    return out;
  }

  countUnclaimed(user: string, mailbox: string, uidValidity: number, uids: number[]): number {
    const c = this.claimed.get(`${user}\0${mailbox}`);
    const floor = c && c.uidValidity === uidValidity ? c.uid : 0;
    return uids.filter((u) => u > floor).length;
  }

  forget(user: string, mailbox: string): void {
    this.claimed.delete(`${user}\0${mailbox}`);
  }
}

export function flagValues(flags: string[], recent: boolean): Value[] {
  const out: Value[] = flags.map((f) => atom(f));
  if (recent) out.push(atom('\\Recent'));
  return out;
}

export class MailboxView {
  /**
   * The messages in sequence order, which is also ascending UID order (the store lists them so,
   * new ones only ever come with higher UIDs, and removals keep the order): a UID's position is
   * found by binary search. No UID-to-index map is built, so SELECT of a large mailbox costs one
   * pass over the list the store returns, not a hash insert per message (the bench profile showed
   * that map as the largest cost of a session on a 10,000-message INBOX).
   */
  messages: MessageMeta[];
  /** UIDs removed from the store whose EXPUNGE has not been sent yet. */
  readonly pendingExpunge = new Set<number>();
  readonly recent: Set<number>;
  /** Set by store change events; the next sync reads the mailbox again. */
  dirty = false;
  highestModseq: number;

  constructor(
    readonly user: string,
    readonly name: string,
    readonly readOnly: boolean,
    readonly uidValidity: number,
    messages: MessageMeta[],
    highestModseq: number,
    recent: Set<number>,
    private readonly recentTracker: RecentTracker,
  ) {
    this.messages = messages;
    this.highestModseq = highestModseq;
    this.recent = recent;
  }

  /** 0-based position of a UID in `messages`, or -1. */
  private indexOf(uid: number): number {
    const msgs = this.messages;
    let lo = 0;
    let hi = msgs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const u = msgs[mid]!.uid;
      if (u < uid) lo = mid + 1;
      else if (u > uid) hi = mid - 1;
      else return mid;
    }
    return -1;
  }

  get exists(): number {
    return this.messages.length;
  }

  get maxUid(): number {
    return this.messages.length ? this.messages[this.messages.length - 1]!.uid : 0;
  }

  /** 1-based sequence number of a UID, or 0. */
  seqOf(uid: number): number {
    return this.indexOf(uid) + 1;
  }

  meta(uid: number): MessageMeta | undefined {
    const i = this.indexOf(uid);
    return i < 0 ? undefined : this.messages[i];
  }

  /** Records flag changes this session made itself (no untagged FETCH needed for them later). */
  applyUpdates(updated: MessageMeta[]): void {
    for (const m of updated) {
      const i = this.indexOf(m.uid);
      if (i >= 0) this.messages[i] = m;
      if (m.modseq > this.highestModseq) this.highestModseq = m.modseq;
    }
  }

  /** Removes UIDs and reports each EXPUNGE, highest sequence number first so numbers stay right. */
  removeAndReport(uids: number[], sink: ViewUpdateSink): void {
    const seqs = uids
      .map((u) => this.seqOf(u))
      .filter((s) => s > 0)
      .sort((a, b) => b - a);
    if (!seqs.length) return;
    // Highest first, each number is right at the moment the client reads it; the list itself is
    // rebuilt once rather than spliced per message.
    for (const seq of seqs) {
      const m = this.messages[seq - 1]!;
      this.pendingExpunge.delete(m.uid);
      this.recent.delete(m.uid);
      sink.untagged([seq, atom('EXPUNGE')]);
    }
    const gone = new Set(seqs);
    this.messages = this.messages.filter((_, i) => !gone.has(i + 1));
  }

  /**
   * Reads the mailbox from the store and reports what changed. With `allowExpunge` false
   * (during FETCH, STORE, SEARCH) removed messages keep their sequence numbers until later.
   * Both lists are in ascending UID order, so they are compared by one merge walk.
   */
  async sync(store: MailStore, sink: ViewUpdateSink, opts: { allowExpunge: boolean; condstore: boolean }): Promise<void> {
    if (!this.dirty && (!opts.allowExpunge || this.pendingExpunge.size === 0)) return;
    this.dirty = false;
    const current = await store.listMessages(this.user, this.name);
    let j = 0;
    for (const m of this.messages) {
      while (j < current.length && current[j]!.uid < m.uid) j++;
      if (j >= current.length || current[j]!.uid !== m.uid) this.pendingExpunge.add(m.uid);
    }
    if (opts.allowExpunge && this.pendingExpunge.size) this.removeAndReport([...this.pendingExpunge], sink);

    // Flag changes of messages the client knows.
    j = 0;
    for (let i = 0; i < this.messages.length; i++) {
      const m = this.messages[i]!;
      while (j < current.length && current[j]!.uid < m.uid) j++;
      const now = current[j];
      if (!now || now.uid !== m.uid || now.modseq === m.modseq) continue;
      this.messages[i] = now;
      const items: Value[] = [atom('UID'), now.uid, atom('FLAGS'), flagValues(now.flags, this.recent.has(now.uid))];
      if (opts.condstore) items.push(atom('MODSEQ'), [now.modseq]);
      sink.untagged([i + 1, atom('FETCH'), items]);
    }

    // New messages: UIDs above the highest the client knows, in UID order.
    const max = this.maxUid;
    const added = current.filter((m) => m.uid > max);
    if (added.length) {
      const recent = this.readOnly ? new Set<number>() : this.recentTracker.claim(this.user, this.name, this.uidValidity, added);
      for (const m of added) {
        this.messages.push(m);
        if (recent.has(m.uid)) this.recent.add(m.uid);
      }
      sink.untagged([this.messages.length, atom('EXISTS')]);
      sink.untagged([this.recent.size, atom('RECENT')]);
    }
    for (const m of current) if (m.modseq > this.highestModseq) this.highestModseq = m.modseq;
  }
}
