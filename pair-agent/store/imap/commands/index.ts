/** The command table: every command the server knows, by name. */
import type { CommandDef } from '../state.ts';
import { anyCommands } from './any.ts';
import { authCommands } from './auth.ts';
import { fetchCommands } from './fetch.ts';
import { mailboxCommands } from './mailbox.ts';
import { messageCommands } from './message.ts';
import { searchCommands } from './search.ts';

export function commandTable(): Map<string, CommandDef> {
  const table = new Map<string, CommandDef>();
  for (const def of [...anyCommands, ...authCommands, ...mailboxCommands, ...messageCommands, ...fetchCommands, ...searchCommands]) {
    if (table.has(def.name)) throw new Error(`IMAP command ${def.name} defined twice`);
    table.set(def.name, def);
  }
  return table;
}
