/** Not-authenticated state: STARTTLS, AUTHENTICATE PLAIN (with SASL-IR), LOGIN. */
import { checkPlain, checkUser, decodePlain, type AuthResult } from '../auth.ts';
import type { Session } from '../session.ts';
import { defineCommand, type CommandDef, type Reply } from '../state.ts';

async function loggedIn(session: Session, result: AuthResult, mechanism: string): Promise<Reply> {
  if (!result.ok) {
    session.log.info({ mechanism, reason: result.reason }, 'login failed');
    const reply: Reply = { status: 'NO', code: 'AUTHENTICATIONFAILED', text: 'Authentication failed.' };
    // Password guessing gets a few tries per connection, as with Dovecot's login processes.
    if (session.authFailed()) reply.after = () => session.bye('Too many authentication failures');
    return reply;
  }
  const { user } = result;
  if (!session.holdUser(user)) {
    session.log.info({ user }, 'login refused: too many sessions for this user');
    return { status: 'NO', code: 'LIMIT', text: 'Too many sessions for this user' };
  }
  await session.store.ensureUser(user);
  session.log = session.log.child({ user });
  session.log.info({ mechanism, master: result.master }, 'logged in');
  const next = { name: 'authenticated' as const, user };
  return { status: 'OK', code: `CAPABILITY ${session.capabilities('authenticated').join(' ')}`, text: 'Logged in', next };
}

export const starttls = defineCommand({
  name: 'STARTTLS',
  states: ['not-authenticated'],
  args: [],
  async handler({ session }) {
    if (!session.ctx.secureContext) return { status: 'BAD', text: 'STARTTLS is not available' };
    if (session.tlsActive) return { status: 'BAD', text: 'TLS is already active' };
    return { status: 'OK', text: 'Begin TLS negotiation now', after: () => session.upgradeTls() };
  },
});

export const login = defineCommand({
  name: 'LOGIN',
  states: ['not-authenticated'],
  args: ['astring', 'astring'],
  secretArgs: true,
  async handler({ session, args }) {
    const [user, password] = args as [string, string];
    return loggedIn(session, checkUser(session.ctx.auth, user, password), 'LOGIN');
  },
});

export const authenticate = defineCommand({
  name: 'AUTHENTICATE',
  states: ['not-authenticated'],
  args: ['atom', 'atom?'],
  secretArgs: true,
  async handler({ session, args }) {
    const [mechanism, initial] = args as [string, string | null];
    if (mechanism.toUpperCase() !== 'PLAIN') return { status: 'NO', code: 'CANNOT', text: `Unsupported authentication mechanism ${mechanism.slice(0, 20)}` };
    let response = initial;
    if (response === null) {
      session.writeLine('+ ');
      const got = await session.readRawLine();
      if (!got) return { status: 'NO', text: 'Connection closed' };
      if ('error' in got) return { status: 'BAD', text: got.error };
      response = got.line.trim();
    }
    if (response === '*') return { status: 'BAD', text: 'Authentication cancelled' };
    // SASL-IR: "=" stands for an empty initial response.
    const decoded = decodePlain(response === '=' ? '' : response);
    if (!decoded) return { status: 'BAD', text: 'Invalid SASL PLAIN response' };
    return loggedIn(session, checkPlain(session.ctx.auth, decoded.authzid, decoded.authcid, decoded.password, session.remoteAddress), 'PLAIN');
  },
});

export const authCommands: CommandDef[] = [starttls, login, authenticate] as CommandDef[];
