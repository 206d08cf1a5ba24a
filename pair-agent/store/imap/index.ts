/** The store agent's IMAP4rev1 server: see server.ts for the listener, session.ts for a connection. */
export { startImapServer, type ImapServer, type ImapServerOptions } from './server.ts';
export { DEFAULT_LIMITS, type ImapLimits } from './limits.ts';
