/** Commands valid in any state: CAPABILITY, NOOP, LOGOUT, ID (RFC 2971). */
import { defineCommand, type CommandDef } from '../state.ts';
import { tokenString } from '../session.ts';
import type { Token } from '../parser.ts';

const ALL = ['not-authenticated', 'authenticated', 'selected'] as const;

export const capability = defineCommand({
  name: 'CAPABILITY',
  states: ALL,
  args: [],
  async handler({ session }) {
    session.writeLine(`* CAPABILITY ${session.capabilities().join(' ')}`);
    return { status: 'OK', text: 'Capability completed' };
  },
});

export const noop = defineCommand({
  name: 'NOOP',
  states: ALL,
  args: [],
  // The dispatcher reports pending mailbox changes after every command; NOOP exists for that.
  async handler() {
    return { status: 'OK', text: 'NOOP completed' };
  },
});

export const logout = defineCommand({
  name: 'LOGOUT',
  states: ALL,
  args: [],
  async handler({ session }) {
    session.writeLine('* BYE Logging out');
    return { status: 'OK', text: 'Logout completed', next: { name: 'logout' }, after: () => session.close() };
  },
});

const ID_MAX_PAIRS = 30;

export const id = defineCommand({
  name: 'ID',
  states: ALL,
  args: ['any'],
  async handler({ session, args }) {
    const arg = args[0] as Token;
    const fields: Record<string, string> = {};
    if (arg.type === 'list') {
      const items = arg.items;
      if (items.length % 2 !== 0 || items.length > ID_MAX_PAIRS * 2) return { status: 'BAD', text: 'ID needs field/value pairs (at most 30)' };
      for (let i = 0; i < items.length; i += 2) {
        const k = items[i]!;
        const v = items[i + 1]!;
        if (k.type !== 'string') return { status: 'BAD', text: 'ID field names are strings' };
        const isNil = v.type === 'atom' && v.value.toUpperCase() === 'NIL';
        if (!isNil && v.type !== 'string') return { status: 'BAD', text: 'ID values are strings or NIL' };
        fields[k.value.toString('utf8').toLowerCase().slice(0, 30)] = isNil ? '' : tokenString(v).slice(0, 1024);
      }
    } else if (!(arg.type === 'atom' && arg.value.toUpperCase() === 'NIL')) {
      return { status: 'BAD', text: 'ID takes a list or NIL' };
    }
    const originIp = fields['x-originating-ip'];
    if (originIp) {
      // Only a trusted proxy may tell us who its client is (as Dovecot's login_trusted_networks).
      if (session.ctx.auth.trusted.has(session.remoteAddress)) {
        const originPort = fields['x-originating-port'];
        session.log = session.log.child({ clientIp: originIp, ...(originPort ? { clientPort: originPort } : {}) });
        session.log.info({ clientIp: originIp, clientPort: originPort, session: fields['x-session-id'] }, 'client address forwarded by proxy');
      } else {
        session.log.info({ claimedIp: originIp }, 'ignored x-originating-ip from an untrusted peer');
      }
    }
    const client = fields['name'];
    if (client) session.log.debug({ clientName: client, clientVersion: fields['version'] }, 'client id');
    session.writeLine('* ID ("name" "pairgate" "vendor" "pairgate")');
    return { status: 'OK', text: 'ID completed' };
  },
});

export const anyCommands: CommandDef[] = [capability, noop, logout, id] as CommandDef[];
