/**
 * The session's named states (RFC 3501 section 3) and the command table's types. A session has
 * exactly one `state` value; a command handler returns the next state and the dispatcher
 * applies and logs the transition.
 */
import type { Token } from './parser.ts';
import type { SeqSet } from './seqset.ts';
import type { MailboxView } from './mailbox-view.ts';
import type { Session } from './session.ts';

export type ImapState =
  | { name: 'not-authenticated' }
  | { name: 'authenticated'; user: string }
  | { name: 'selected'; user: string; view: MailboxView }
  | { name: 'logout' };

export type StateName = ImapState['name'];

/** Argument shapes the dispatcher checks and converts before a handler runs. */
export type ArgKind = 'atom' | 'astring' | 'string' | 'nstring' | 'mailbox' | 'pattern' | 'seqset' | 'number' | 'list' | 'any';
/** `kind`, `kind?` (optional) or `kind*` (the rest, zero or more). */
export type ArgSpec = ArgKind | `${ArgKind}?` | `${ArgKind}*`;

export type ArgValue = string | number | SeqSet | Token[] | Token | null;

export interface Reply {
  status: 'OK' | 'NO' | 'BAD';
  /** Response code without brackets, e.g. `TRYCREATE` or `APPENDUID 3 7`. */
  code?: string;
  text: string;
  /** The state after the command; the current one when absent. */
  next?: ImapState;
  /** Runs after the tagged reply is written (STARTTLS handshake, closing after LOGOUT). */
  after?: () => void | Promise<void>;
}

export interface CommandContext<S extends ImapState = ImapState> {
  session: Session;
  tag: string;
  /** The command as the client named it (`FETCH`, or `UID FETCH` with `uid` set). */
  name: string;
  uid: boolean;
  state: S;
  args: ArgValue[];
  /** The raw argument tokens (for commands with free-form grammars). */
  tokens: Token[];
}

export interface CommandDef<S extends StateName = StateName> {
  name: string;
  states: readonly S[];
  args: readonly ArgSpec[];
  /** Has a `UID` form (`UID FETCH`, …). */
  uid?: boolean;
  /** Changes to other sessions' mailboxes are reported after it (false for FETCH/STORE/SEARCH, RFC 3501 7.4.1). */
  expungeAfter?: boolean;
  /** Arguments to hide in debug protocol logs (LOGIN's password). */
  secretArgs?: boolean;
  handler(ctx: CommandContext<Extract<ImapState, { name: S }>>): Promise<Reply>;
}

export function defineCommand<S extends StateName>(def: CommandDef<S>): CommandDef<S> {
  return def;
}
