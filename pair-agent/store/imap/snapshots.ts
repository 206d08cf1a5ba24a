/**
 * Message-list snapshots shared by the sessions of one IMAP server. SELECT needs the whole list
 * of a mailbox; the store hands out a fresh copy of every message's metadata on each call, which
 * on a 10,000-message INBOX was most of a session's CPU (allocation and garbage collection). A
 * mailbox that has not changed since the last SELECT is served from the previous list instead.
 *
 * A snapshot is valid while (1) no store change event arrived for its mailbox (or, for renames
 * and deletions, for its user) since the list was read, and (2) the mailbox's UIDVALIDITY,
 * HIGHESTMODSEQ, UIDNEXT and message count still equal those at the time it was read (every
 * change bumps HIGHESTMODSEQ, per the MailStore contract). The lists and their MessageMeta
 * objects are shared and must be treated as read-only: a view copies the array (pointers only)
 * and replaces, never mutates, the objects in it.
 */
import type { MailboxInfo, MailStore, MessageMeta, StoreChange } from '../types.ts';

export interface Snapshot {
  readonly messages: readonly MessageMeta[];
  /** Keywords in use (flags without a backslash), for SELECT's FLAGS. */
  readonly keywords: readonly string[];
  /** 1-based sequence number of the first message without \Seen, 0 when none. */
  readonly firstUnseen: number;
}

interface Entry extends Snapshot {
  uidValidity: number;
  highestModseq: number;
  uidNext: number;
  count: number;
}

export class SnapshotCache {
  private readonly entries = new Map<string, Entry>();
  private cachedMessages = 0;
  /** Bumped by every change event: a list read before a change is never stored after it. */
  private generation = 0;

  /** @param maxMessages bound on the messages held over all snapshots (memory). */
  constructor(private readonly maxMessages = 200_000) {}

  private static key(user: string, mailbox: string): string {
    return `${user}\0${mailbox}`;
  }

  /** Store change events (the server forwards every one). */
  onChange(change: StoreChange): void {
    this.generation++;
    if (change.kind === 'mailboxes') {
      const prefix = `${change.user}\0`;
      for (const k of [...this.entries.keys()]) if (k.startsWith(prefix)) this.drop(k);
    } else this.drop(SnapshotCache.key(change.user, change.mailbox));
  }

  private drop(key: string): void {
    const e = this.entries.get(key);
    if (!e) return;
    this.entries.delete(key);
    this.cachedMessages -= e.count;
  }

  /** The mailbox's messages as of `info` (read just before by the caller). */
  async get(store: MailStore, user: string, mailbox: string, info: MailboxInfo): Promise<Snapshot> {
    const key = SnapshotCache.key(user, mailbox);
    const hit = this.entries.get(key);
    if (hit && hit.uidValidity === info.uidValidity && hit.highestModseq === info.highestModseq && hit.uidNext === info.uidNext && hit.count === info.messages) {
      // Most recently used last, so that eviction drops the oldest.
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    if (hit) this.drop(key);
    const gen = this.generation;
    const messages = await store.listMessages(user, mailbox);
    const keywords = new Set<string>();
    let firstUnseen = 0;
    for (let i = 0; i < messages.length; i++) {
      const flags = messages[i]!.flags;
      for (const f of flags) if (!f.startsWith('\\')) keywords.add(f);
      if (!firstUnseen && !flags.includes('\\Seen')) firstUnseen = i + 1;
    }
    const entry: Entry = {
      messages,
      keywords: [...keywords],
      firstUnseen,
      uidValidity: info.uidValidity,
      highestModseq: info.highestModseq,
      uidNext: info.uidNext,
      count: messages.length,
    };
    // Kept only when nothing changed while the list was read and it matches the info it is keyed by.
    if (gen === this.generation && messages.length === info.messages && messages.length <= this.maxMessages) {
      this.entries.set(key, entry);
      this.cachedMessages += entry.count;
      for (const k of this.entries.keys()) {
        if (this.cachedMessages <= this.maxMessages) break;
        this.drop(k);
      }
    }
    return entry;
  }

  /** Snapshots held and their messages (tests, metrics). */
  size(): { mailboxes: number; messages: number } {
    return { mailboxes: this.entries.size, messages: this.cachedMessages };
  }
}
