/**
 * The mail store's contract with its protocol engines (LMTP, POP3, IMAP) and tools.
 * Engines never touch the volume or the log; they call this interface, and the store keeps
 * indexes, bodies and crash safety behind it. Every promise resolves only once the change is
 * durable on the replicated volume (so an acknowledged delivery or flag change survives a
 * failover). Errors are the typed ones of common/errors.ts: NotFoundError (no such mailbox),
 * ConflictError (mailbox exists, mailbox in use), LimitError (quota: 552 5.2.2),
 * UnavailableError (store closed, volume not primary: a temporary failure), IntegrityError.
 *
 * Users are named by their login uid (LDAP `uid`). Over LMTP the recipient's local part is the
 * uid and the domain is ignored (`RCPT TO:<alice@example.net>` or `<alice@pair-01>` both reach
 * user `alice`), as Dovecot does with `auth_username_format = %Ln`; the proxy resolves aliases
 * to the uid before delivering.
 */
import type { EventEmitter } from 'node:events';

export type SpecialUse = '\\Sent' | '\\Drafts' | '\\Trash' | '\\Junk' | '\\Archive';

/** System flags are spelled as in IMAP (`\Seen`, `\Answered`, `\Flagged`, `\Deleted`, `\Draft`); keywords as given. */
export type Flag = string;

export interface MailboxInfo {
  name: string;
  /** IMAP UIDVALIDITY: never reused for a different mailbox of the same name. */
  uidValidity: number;
  uidNext: number;
  /** CONDSTORE HIGHESTMODSEQ: grows with every change in the mailbox, never goes back. */
  highestModseq: number;
  messages: number;
  unseen: number;
  specialUse?: SpecialUse | undefined;
  subscribed: boolean;
}

export interface MessageMeta {
  uid: number;
  /** Byte size of the stored RFC 5322 message. */
  size: number;
  /** Internal date, milliseconds since the epoch. */
  internalDate: number;
  flags: Flag[];
  /** Modification sequence of the last change to this message. */
  modseq: number;
  /** Content address (SHA-256 hex) of the body, shared by every copy. */
  bodyId: string;
}

export interface DeliveryRecipientResult {
  user: string;
  ok: boolean;
  /** Set when ok: where the message landed. */
  uid?: number;
  /** Set when not ok: the typed error (LimitError for quota, NotFoundError, …). */
  error?: Error;
  /** True when this delivery id had already been stored for this user (idempotent retry). */
  duplicate?: boolean;
}

export interface StoreChange {
  user: string;
  mailbox: string;
  kind: 'exists' | 'expunge' | 'flags' | 'mailboxes';
  uids: number[];
  modseq: number;
}

export interface StoreStats {
  mailboxes: number;
  messages: number;
  /** Bytes of the volume in use by live and not yet reclaimed records. */
  bytesUsed: number;
  bytesTotal: number;
  /** Stored body bytes (each body counted once however many mailboxes link it). */
  bodyBytes: number;
}

/**
 * A message body as one buffer or as parts in order (e.g. the DATA chunks as they arrived), so
 * that a caller need not join a large body into one buffer first. Parts are kept by reference
 * until the delivery resolves: the caller must not modify them before. Once deliver() has
 * resolved, the store holds no reference to them (what it keeps, it copied; the volume has
 * written them locally and, under every protocol, handed their DATA frames to the kernel), so the
 * caller may reuse them (the LMTP server's ReadArena does). After a rejection, writes from them
 * may still be in flight.
 */
export type BodyData = Buffer | readonly Buffer[];

export interface MailStore extends EventEmitter {
  /**
   * Delivers one message to many users' INBOXes, storing the body once. Idempotent per deliveryId.
   * `bodySha256` (hex) spares a second pass over the body when the caller hashed it as it arrived
   * (the LMTP server does); it must be the SHA-256 of exactly `body`, as it becomes the body's address.
   */
  deliver(deliveryId: string, users: string[], body: BodyData, opts?: { internalDate?: number; bodySha256?: string }): Promise<DeliveryRecipientResult[]>;

  /** Creates INBOX and the special-use mailboxes on first use; cheap when they exist. */
  ensureUser(user: string): Promise<void>;
  listMailboxes(user: string): Promise<MailboxInfo[]>;
  mailboxInfo(user: string, mailbox: string): Promise<MailboxInfo>;
  createMailbox(user: string, mailbox: string, opts?: { specialUse?: SpecialUse }): Promise<MailboxInfo>;
  deleteMailbox(user: string, mailbox: string): Promise<void>;
  renameMailbox(user: string, from: string, to: string): Promise<void>;
  setSubscribed(user: string, mailbox: string, subscribed: boolean): Promise<void>;

  /** Messages of a mailbox in UID order (the IMAP sequence-number order). */
  listMessages(user: string, mailbox: string): Promise<MessageMeta[]>;
  /** The whole stored message. Verified against its checksum; IntegrityError rather than corrupt bytes. */
  readMessage(bodyId: string): Promise<Buffer>;
  append(user: string, mailbox: string, body: Buffer, opts?: { flags?: Flag[]; internalDate?: number }): Promise<{ uid: number; uidValidity: number }>;
  /**
   * Changes flags of the given UIDs. With `unchangedSince` (CONDSTORE), messages whose modseq is
   * higher are left alone and reported in `failed`.
   */
  updateFlags(
    user: string,
    mailbox: string,
    uids: number[],
    op: 'set' | 'add' | 'remove',
    flags: Flag[],
    opts?: { unchangedSince?: number },
  ): Promise<{ updated: MessageMeta[]; failed: number[] }>;
  /** Removes the given UIDs; returns the UIDs actually removed. */
  expunge(user: string, mailbox: string, uids: number[]): Promise<number[]>;
  copy(user: string, from: string, uids: number[], to: string): Promise<{ uidValidity: number; mapping: Array<[number, number]> }>;
  move(user: string, from: string, uids: number[], to: string): Promise<{ uidValidity: number; mapping: Array<[number, number]> }>;

  quota(user: string): Promise<{ usedBytes: number; limitBytes: number | null }>;
  stats(): Promise<StoreStats>;

  /** Small per-body metadata cache (IMAP keeps parsed ENVELOPE/BODYSTRUCTURE here). */
  getBodyMeta(bodyId: string, kind: string): Promise<string | null>;
  setBodyMeta(bodyId: string, kind: string, value: string): Promise<void>;

  close(): Promise<void>;

  /** Emitted after each durable change, for IDLE and for other sessions on the same mailbox. */
  on(event: 'change', listener: (change: StoreChange) => void): this;
  on(event: string | symbol, listener: (...args: any[]) => void): this;
}
