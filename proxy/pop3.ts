/**
 * POP3 pre-login dialogue of the proxy (RFC 1939 AUTHORIZATION state, RFC 2449 CAPA and
 * response codes, RFC 2595 STLS, RFC 5034 AUTH): CAPA, STLS, USER/PASS, AUTH PLAIN and LOGIN,
 * QUIT. Plaintext USER/PASS/AUTH refused before TLS where the listener requires it.
 */
import { ClientSession, type AcceptedConnection } from './session.ts';
import type { ProxyContext } from './context.ts';
import type { LoginFailure } from './login.ts';

/** One table for login refusals (RFC 2449 / RFC 3206 response codes). */
const REPLIES: Record<LoginFailure, string> = {
  auth: '-ERR [AUTH] Authentication failed.',
  locked: '-ERR [SYS/TEMP] Too many failed logins; try again later.',
  limit: '-ERR [IN-USE] Too many sessions for this user.',
  temp: '-ERR [SYS/TEMP] Mail server temporarily unavailable; try again later.',
};

type Pop3State =
  | { name: 'authorization'; user?: string }
  | { name: 'sasl-plain' }
  | { name: 'sasl-login'; user?: string };

export class Pop3Session extends ClientSession {
  readonly protocol = 'pop3' as const;
  private state: Pop3State = { name: 'authorization' };
  private buf: Buffer = Buffer.alloc(0);
  private skipping = false;
  private lines: string[] = [];
  private busy = false;
  private badCommands = 0;

  constructor(ctx: ProxyContext, conn: AcceptedConnection) {
    super(ctx, conn);
  }

  private get tlsRequired(): boolean {
    const l = this.conn.listener;
    return !this.isSecure && (l.requireTls ?? l.tls === 'starttls');
  }

  protected greeting(): string {
    return '+OK pairgate ready.\r\n';
  }

  protected goodbye(reason: string): string | null {
    // POP3 has no unsolicited replies; only an idle timeout before login gets a line.
    return reason === 'idle timeout' && this.phase !== 'proxying' ? '-ERR Disconnected for inactivity.\r\n' : null;
  }

  protected refuseLine(text: string): string {
    return `-ERR ${text}\r\n`;
  }

  protected onInput(chunk: Buffer): void {
    const max = this.ctx.config.limits.maxLineBytes;
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    for (;;) {
      const lf = this.buf.indexOf(0x0a);
      if (lf < 0) {
        if (this.buf.length > max) {
          if (!this.skipping) this.lines.push('\0too-long');
          this.skipping = true;
          this.buf = Buffer.alloc(0);
        }
        break;
      }
      const line = this.buf.subarray(0, lf).toString('utf8').replace(/\r$/, '');
      this.buf = this.buf.subarray(lf + 1);
      if (this.skipping) {
        this.skipping = false;
        continue;
      }
      if (lf > max) this.lines.push('\0too-long');
      else this.lines.push(line);
    }
    void this.drain();
  }

  /** Bytes the client sent after the command being handled (pipelined; forwarded after login). */
  private leftover(): Buffer {
    if (this.lines.length === 0) {
      const out = this.buf;
      this.buf = Buffer.alloc(0);
      return out;
    }
    const rest = this.lines.map((l) => Buffer.from(`${l}\r\n`));
    this.lines = [];
    const out = Buffer.concat([...rest, this.buf]);
    this.buf = Buffer.alloc(0);
    return out;
  }

  private async drain(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (this.lines.length > 0 && this.phase === 'pre-login') {
        const line = this.lines.shift()!;
        this.armIdle(this.ctx.config.timeouts.preLoginMs);
        if (line === '\0too-long') {
          this.err('Line too long.');
          continue;
        }
        await this.handle(line);
      }
    } finally {
      this.busy = false;
    }
  }

  private err(text: string): void {
    this.badCommands++;
    this.log.info({ reason: text }, 'bad command before login');
    if (this.badCommands >= this.ctx.config.limits.maxBadCommands) {
      this.write('-ERR Too many invalid commands.\r\n');
      this.close('too many bad commands');
      return;
    }
    this.write(`-ERR ${text}\r\n`);
  }

  private async handle(line: string): Promise<void> {
    const st = this.state;
    if (st.name === 'sasl-plain' || st.name === 'sasl-login') {
      await this.saslLine(line);
      return;
    }
    const sp = line.indexOf(' ');
    const cmd = (sp < 0 ? line : line.slice(0, sp)).toUpperCase();
    const arg = sp < 0 ? '' : line.slice(sp + 1);
    if (this.log.isLevelEnabled('debug')) this.log.debug({ cmd }, 'C:');
    switch (cmd) {
      case 'CAPA': {
        const caps = ['TOP', 'UIDL', 'RESP-CODES', 'AUTH-RESP-CODE', 'PIPELINING', 'USER'];
        if (!this.isSecure && this.conn.listener.tls === 'starttls' && this.ctx.tls) caps.push('STLS');
        if (!this.tlsRequired) caps.push('SASL PLAIN LOGIN');
        this.write(`+OK\r\n${caps.join('\r\n')}\r\n.\r\n`);
        return;
      }
      case 'NOOP':
        this.err('Log in first.');
        return;
      case 'QUIT':
        this.write('+OK Logging out.\r\n');
        this.close('quit');
        return;
      case 'STLS':
        if (this.isSecure) return this.err('TLS already active.');
        if (this.conn.listener.tls !== 'starttls' || !this.ctx.tls) return this.err('STLS not available.');
        if (this.lines.length || this.buf.length) this.log.warn('data pipelined after STLS: dropped');
        this.lines = [];
        this.buf = Buffer.alloc(0);
        this.write('+OK Begin TLS negotiation now.\r\n');
        await this.startTls();
        return;
      case 'USER':
        if (this.tlsRequired) return this.err('[AUTH] Plaintext authentication disallowed on non-secure connections.');
        if (!arg) return this.err('USER expects a name.');
        this.state = { name: 'authorization', user: arg };
        this.write('+OK\r\n');
        return;
      case 'PASS': {
        if (this.tlsRequired) return this.err('[AUTH] Plaintext authentication disallowed on non-secure connections.');
        const user = st.name === 'authorization' ? st.user : undefined;
        if (user === undefined) return this.err('USER first.');
        this.state = { name: 'authorization' };
        await this.doLogin(user, arg);
        return;
      }
      case 'AUTH': {
        if (!arg) {
          this.write('+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n');
          return;
        }
        if (this.tlsRequired) return this.err('[AUTH] Authentication disallowed on non-secure connections.');
        const [mech, ir, extra] = arg.split(' ');
        if (extra !== undefined) return this.err('AUTH expects a mechanism and an optional initial response.');
        const m = mech!.toUpperCase();
        if (m === 'PLAIN') {
          if (ir !== undefined) {
            this.state = { name: 'sasl-plain' };
            await this.saslLine(ir);
            return;
          }
          this.state = { name: 'sasl-plain' };
          this.write('+ \r\n');
          return;
        }
        if (m === 'LOGIN') {
          this.state = { name: 'sasl-login' };
          this.write('+ VXNlcm5hbWU6\r\n');
          return;
        }
        return this.err('Unsupported authentication mechanism.');
      }
      default:
        this.err(cmd === 'STAT' || cmd === 'LIST' || cmd === 'RETR' || cmd === 'UIDL' || cmd === 'TOP' || cmd === 'DELE' ? 'Log in first.' : 'Unknown command.');
    }
  }

  private async saslLine(line: string): Promise<void> {
    const st = this.state;
    if (line === '*') {
      this.state = { name: 'authorization' };
      this.write('-ERR Authentication cancelled.\r\n');
      return;
    }
    const decoded = decodeBase64(line);
    if (decoded === null) {
      this.state = { name: 'authorization' };
      return this.err('Invalid base64 data.');
    }
    if (st.name === 'sasl-login') {
      if (st.user === undefined) {
        this.state = { name: 'sasl-login', user: decoded.toString('utf8') };
        this.write('+ UGFzc3dvcmQ6\r\n');
        return;
      }
      this.state = { name: 'authorization' };
      await this.doLogin(st.user, decoded.toString('utf8'));
      return;
    }
    this.state = { name: 'authorization' };
    const parts = decoded.toString('utf8').split('\0');
    if (parts.length !== 3) {
      this.write('-ERR [AUTH] Invalid PLAIN response.\r\n');
      return;
    }
    const [authzid, authcid, password] = parts as [string, string, string];
    if (authzid !== '' && authzid !== authcid) {
      this.write('-ERR [AUTH] Authorization identity not allowed.\r\n');
      return;
    }
    await this.doLogin(authcid, password);
  }

  private async doLogin(user: string, pass: string): Promise<void> {
    const result = await this.login(user, pass, () => this.leftover(), (ok) => `${ok.backend.okLine}\r\n`);
    if (!result.ok) this.write(`${REPLIES[result.kind]}\r\n`);
  }
}

function decodeBase64(s: string): Buffer | null {
  const t = s.trim();
  if (t === '' || t === '=') return Buffer.alloc(0);
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(t) || t.length % 4 !== 0) return null;
  return Buffer.from(t, 'base64');
}
