/**
 * IMAP pre-login dialogue of the proxy (RFC 3501/9051 not-authenticated state): CAPABILITY,
 * ID, NOOP, STARTTLS, LOGIN, AUTHENTICATE PLAIN and LOGIN (with SASL-IR), LOGOUT, and
 * LOGINDISABLED until TLS where the listener requires it. Framing and tokenising come from the
 * IMAP engine's pure parser (pair-agent/store/imap/parser.ts), bounded by small pre-login
 * limits. Once logged in, the session is spliced to the pair and this file is done.
 *
 * Command table: each command names the handler; the handler answers and returns nothing, or
 * starts the login. Replies for refusals come from one table (`REPLIES`).
 */
import { ImapFramer, parseCommand, ParseError, type FrameEvent, type ParsedCommand, type Token } from '../pair-agent/store/imap/parser.ts';
import { ClientSession, type AcceptedConnection } from './session.ts';
import type { ProxyContext } from './context.ts';
import type { LoginFailure } from './login.ts';

/** One table for login refusals (RFC 5530 response codes). */
const REPLIES: Record<LoginFailure, string> = {
  auth: 'NO [AUTHENTICATIONFAILED] Authentication failed.',
  locked: 'NO [UNAVAILABLE] Too many failed logins; try again later.',
  limit: 'NO [LIMIT] Too many sessions for this user.',
  temp: 'NO [UNAVAILABLE] Mail server temporarily unavailable; try again later.',
};

/** Per listener config: the capability lists without and with TLS, and the TLS store they were made for. */
const capsCache = new WeakMap<object, [string | null, string | null, unknown]>();

type SaslState = { mech: 'PLAIN'; tag: string } | { mech: 'LOGIN'; tag: string; user?: string };

export class ImapSession extends ClientSession {
  readonly protocol = 'imap' as const;
  private readonly framer: ImapFramer;
  /** Raw bytes pushed to the framer and not yet accounted to a command (forwarded after login). */
  private pendingRaw: Buffer = Buffer.alloc(0);
  private rawReliable = true;
  private queue: FrameEvent[] = [];
  private sasl: SaslState | null = null;
  private badCommands = 0;
  private busy = false;

  constructor(ctx: ProxyContext, conn: AcceptedConnection) {
    super(ctx, conn);
    const max = ctx.config.limits.maxLineBytes;
    this.framer = new ImapFramer({ maxLineBytes: max, maxLiteralBytes: 4096, maxCommandBytes: max + 8192, maxLiterals: 4 });
  }

  private get tlsRequired(): boolean {
    const l = this.conn.listener;
    return !this.isSecure && (l.requireTls ?? l.tls === 'starttls');
  }

  /** The pre-login capability list (the same for every session of a listener in the same TLS state: kept). */
  private capabilities(): string {
    const kept = capsCache.get(this.conn.listener);
    const i = this.isSecure ? 1 : 0;
    if (kept?.[i] && kept[2] === this.ctx.tls) return kept[i];
    const text = this.buildCapabilities();
    const entry: [string | null, string | null, unknown] = kept && kept[2] === this.ctx.tls ? kept : [null, null, this.ctx.tls];
    entry[i] = text;
    capsCache.set(this.conn.listener, entry);
    return text;
  }

  private buildCapabilities(): string {
    const caps = ['IMAP4rev1', 'SASL-IR', 'LOGIN-REFERRALS', 'ID', 'ENABLE', 'IDLE', 'LITERAL+'];
    if (!this.isSecure && this.conn.listener.tls === 'starttls' && this.ctx.tls) caps.push('STARTTLS');
    if (this.tlsRequired) caps.push('LOGINDISABLED');
    else caps.push('AUTH=PLAIN', 'AUTH=LOGIN');
    return caps.join(' ');
  }

  protected greeting(): string {
    return `* OK [CAPABILITY ${this.capabilities()}] pairgate ready.\r\n`;
  }

  protected goodbye(reason: string): string | null {
    if (reason === 'idle timeout') return '* BYE Autologout; idle for too long.\r\n';
    if (reason === 'stopping') return '* BYE [UNAVAILABLE] Server shutting down; please reconnect.\r\n';
    return '* BYE [UNAVAILABLE] Mail server unavailable; please reconnect later.\r\n';
  }

  protected refuseLine(text: string): string {
    return `* BYE ${text}\r\n`;
  }

  protected onInput(chunk: Buffer): void {
    if (this.rawReliable) this.pendingRaw = this.pendingRaw.length ? Buffer.concat([this.pendingRaw, chunk]) : chunk;
    if (this.pendingRaw.length > 256 * 1024) this.rawReliable = false;
    this.queue.push(...this.framer.push(chunk));
    void this.drain();
  }

  private async drain(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.queue.length > 0 && this.phase === 'pre-login') {
        const ev = this.queue.shift()!;
        if (ev.kind === 'continue') {
          this.write('+ Ready for literal data\r\n');
          continue;
        }
        if (ev.kind === 'error') {
          this.rawReliable = false;
          this.pendingRaw = Buffer.alloc(0);
          this.bad(ev.tag, ev.reason);
          continue;
        }
        if (this.rawReliable) this.pendingRaw = this.pendingRaw.subarray(Math.min(ev.unit.size, this.pendingRaw.length));
        this.armIdle(this.ctx.config.timeouts.preLoginMs);
        if (this.sasl) {
          await this.saslLine((ev.unit.segments[0] ?? Buffer.alloc(0)).toString('latin1'));
          continue;
        }
        let cmd: ParsedCommand;
        try {
          cmd = parseCommand(ev.unit, 4);
        } catch (err) {
          this.bad(err instanceof ParseError ? err.tag : '*', (err as Error).message);
          continue;
        }
        await this.dispatch(cmd);
      }
    } finally {
      this.busy = false;
    }
  }

  private bad(tag: string, reason: string): void {
    this.badCommands++;
    this.log.info({ tag, reason }, 'bad command before login');
    if (this.badCommands >= this.ctx.config.limits.maxBadCommands) {
      this.write('* BYE Too many invalid commands.\r\n');
      this.close('too many bad commands');
      return;
    }
    this.write(`${tag} BAD ${reason.replace(/[\r\n]/g, ' ')}\r\n`);
  }

  private async dispatch(cmd: ParsedCommand): Promise<void> {
    const { tag, name, args } = cmd;
    if (this.log.isLevelEnabled('debug')) this.log.debug({ tag, cmd: name }, 'C:');
    switch (name) {
      case 'CAPABILITY':
        this.write(`* CAPABILITY ${this.capabilities()}\r\n${tag} OK Pre-login capabilities listed, post-login capabilities have more.\r\n`);
        return;
      case 'NOOP':
        this.write(`${tag} OK NOOP completed.\r\n`);
        return;
      case 'ID':
        this.write(`* ID ("name" "pairgate")\r\n${tag} OK ID completed.\r\n`);
        return;
      case 'LOGOUT':
        this.write(`* BYE Logging out\r\n${tag} OK Logout completed.\r\n`);
        this.close('logout');
        return;
      case 'STARTTLS': {
        if (args.length) return this.bad(tag, 'STARTTLS takes no arguments');
        if (this.isSecure) return this.bad(tag, 'TLS is already active');
        if (this.conn.listener.tls !== 'starttls' || !this.ctx.tls) return this.bad(tag, 'STARTTLS not available');
        if (this.pendingRaw.length > 0 || this.queue.length > 0 || this.framer.pending) {
          // Plaintext pipelined after STARTTLS would be taken as sent under TLS (CVE-2011-0411): drop it.
          this.log.warn('data pipelined after STARTTLS: dropped');
        }
        this.queue = [];
        this.pendingRaw = Buffer.alloc(0);
        this.write(`${tag} OK Begin TLS negotiation now.\r\n`);
        await this.startTls();
        return;
      }
      case 'LOGIN': {
        if (this.tlsRequired) {
          this.write(`${tag} NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connections.\r\n`);
          return;
        }
        const user = astring(args[0]);
        const pass = astring(args[1]);
        if (user === null || pass === null || args.length !== 2) return this.bad(tag, 'LOGIN expects user name and password');
        await this.doLogin(tag, user, pass);
        return;
      }
      case 'AUTHENTICATE': {
        const mech = astring(args[0])?.toUpperCase();
        if (!mech || args.length > 2) return this.bad(tag, 'AUTHENTICATE expects a mechanism');
        if (this.tlsRequired) {
          this.write(`${tag} NO [PRIVACYREQUIRED] Authentication disallowed on non-secure connections.\r\n`);
          return;
        }
        if (mech === 'PLAIN') {
          this.sasl = { mech: 'PLAIN', tag };
          const ir = astring(args[1]);
          if (ir !== null) {
            await this.saslLine(ir);
            return;
          }
          this.write('+ \r\n');
          return;
        }
        if (mech === 'LOGIN') {
          if (args.length > 1) return this.bad(tag, 'AUTHENTICATE LOGIN takes no initial response');
          this.sasl = { mech: 'LOGIN', tag };
          this.write('+ VXNlcm5hbWU6\r\n');
          return;
        }
        this.write(`${tag} NO Unsupported authentication mechanism.\r\n`);
        return;
      }
      case 'SELECT':
      case 'EXAMINE':
      case 'LIST':
      case 'LSUB':
      case 'STATUS':
      case 'FETCH':
      case 'ENABLE':
      case 'IDLE':
        this.bad(tag, 'Please log in first.');
        return;
      default:
        this.bad(tag, 'Unknown command.');
    }
  }

  private async saslLine(line: string): Promise<void> {
    const sasl = this.sasl!;
    if (line === '*') {
      this.sasl = null;
      this.write(`${sasl.tag} BAD Authentication cancelled.\r\n`);
      return;
    }
    const decoded = decodeBase64(line);
    if (decoded === null) {
      this.sasl = null;
      return this.bad(sasl.tag, 'Invalid base64 data in continued response');
    }
    if (sasl.mech === 'LOGIN') {
      if (sasl.user === undefined) {
        sasl.user = decoded.toString('utf8');
        this.write('+ UGFzc3dvcmQ6\r\n');
        return;
      }
      this.sasl = null;
      await this.doLogin(sasl.tag, sasl.user, decoded.toString('utf8'));
      return;
    }
    this.sasl = null;
    const parts = decoded.toString('utf8').split('\0');
    if (parts.length !== 3) {
      this.write(`${sasl.tag} NO [AUTHENTICATIONFAILED] Invalid PLAIN response.\r\n`);
      return;
    }
    const [authzid, authcid, password] = parts as [string, string, string];
    if (authzid !== '' && authzid !== authcid) {
      // Users may not act for other users; only the proxy's own master login does that.
      this.write(`${sasl.tag} NO [AUTHORIZATIONFAILED] Authorization identity not allowed.\r\n`);
      return;
    }
    await this.doLogin(sasl.tag, authcid, password);
  }

  private async doLogin(tag: string, user: string, pass: string): Promise<void> {
    const result = await this.login(
      user,
      pass,
      () => (this.rawReliable ? this.pendingRaw : Buffer.alloc(0)),
      (ok) => `${tag} OK ${ok.backend.capabilities ? `[CAPABILITY ${ok.backend.capabilities}] ` : ''}Logged in\r\n`,
    );
    if (!result.ok) this.write(`${tag} ${REPLIES[result.kind]}\r\n`);
    else this.queue = [];
  }
}

function astring(t: Token | undefined): string | null {
  if (!t) return null;
  if (t.type === 'atom') return t.value;
  if (t.type === 'string') return t.value.toString('utf8');
  return null;
}

function decodeBase64(s: string): Buffer | null {
  const t = s.trim();
  if (t === '' || t === '=') return Buffer.alloc(0);
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(t) || t.length % 4 !== 0) return null;
  return Buffer.from(t, 'base64');
}
