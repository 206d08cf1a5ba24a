/**
 * The proxy's side of a pair's IMAP/POP3 service: connect to the pair's floating address,
 * read the greeting, forward the client's address (IMAP `ID x-originating-ip/port`, POP3
 * `XCLIENT ADDR/PORT`), and log in as the master account on the user's behalf with SASL PLAIN
 * (authorization identity = uid). Works with Dovecot and with pairgate's own store, which
 * behaves the same way. Every wait is bounded; failures are typed:
 * UnavailableError (connect, greeting, [UNAVAILABLE]: worth retrying while holding),
 * TimeoutError (no answer within the login bound: retried the same way) or AuthError (the pair
 * refused the master login: configuration, never retried).
 *
 * One login is one `MasterDialogue`: a state machine fed straight from the socket's reads, with
 * one promise for the whole connect-and-login and one deadline timer, rather than a promise,
 * a microtask turn and a line reader's wake-up per line (a login reads three to five lines, and
 * at a few hundred logins a second that machinery was a visible share of the proxy's CPU). The
 * same object is the socket's `onread` target and, once the session is spliced, hands the reads
 * to the relay's ReadPump.
 */
import net from 'node:net';
import { AuthError, ProtocolError, TimeoutError, UnavailableError } from '../common/errors.ts';
import { ReadPump } from '../common/relay.ts';

export interface Endpoint {
  host: string;
  port: number;
}

export interface ClientAddress {
  address: string;
  port: number;
}

export interface MasterLogin {
  uid: string;
  masterUser: string;
  masterSecret: string;
  /** Client address to forward; omitted = not forwarded. */
  client?: ClientAddress | undefined;
  /** Bound on the whole dialogue after connect. */
  timeoutMs: number;
}

/** Where a spliced pair connection's reads go (the MasterDialogue that logged it in). */
export interface BackendInput {
  /** Bytes read since the relay started. */
  readonly relayed: number;
  /**
   * Relays what the pair socket reads into `client` from now on, with the pump's backpressure,
   * and ends the client when the socket ends. Bytes read since the login finished are written first.
   */
  startRelay(socket: net.Socket, client: net.Socket): void;
  /** Takes what the pair sent after its login answer and was read since (to be written to the client first). */
  takeEarly(): Buffer[];
}

export interface BackendSession {
  socket: net.Socket;
  /** IMAP: the backend's post-login CAPABILITY list (without the word CAPABILITY); null if it sent none. */
  capabilities: string | null;
  /** POP3: the backend's answer to AUTH (e.g. `+OK Logged in.`), sent on to the client. */
  okLine: string;
  /** Bytes the backend sent after its login answer (rare), to be forwarded first. */
  leftover: Buffer;
  /** The socket's reads: it was connected with this input's `onread` (so it emits no 'data'). */
  input: BackendInput;
}

const MAX_LINE = 64 * 1024;
const EMPTY = Buffer.alloc(0);
const LITERAL_AT_END = /\{(\d{1,9})\}$/;
const CAPABILITY_CODE = /\[CAPABILITY ([^\]]*)\]/i;
const CAPABILITY_LINE = /^\* CAPABILITY (.*)$/i;
const SASL_IR = /(^| )SASL-IR( |$)/i;
// A spliced pair socket keeps an 'error' listener of its own from connect on (one function for
// all): an error between the login's end and the session's splice must not throw.
const ignoreError = (): void => undefined;

export function saslPlain(authzid: string, authcid: string, password: string): string {
  return Buffer.from(`${authzid}\0${authcid}\0${password}`, 'utf8').toString('base64');
}

function imapQuote(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

const enum Step {
  Connecting,
  Greeting,
  /** IMAP: CAPABILITY before the login (the greeting listed none). */
  CapaBefore,
  /** IMAP: ID sent alone (no SASL-IR), its answer awaited before AUTHENTICATE. */
  Id,
  /** IMAP: ID and AUTHENTICATE written together; the ID answer comes first. */
  IdPipelined,
  Auth,
  /** IMAP: CAPABILITY after the login (its answer listed none). */
  CapaAfter,
  /** POP3: XCLIENT's answer (AUTH's follows). */
  Xclient,
  Done,
}

/**
 * Connects to `ep` and logs in there as the master account for `login.uid` (IMAP or POP3).
 * Resolves with the logged-in socket; rejects with UnavailableError, TimeoutError, AuthError
 * or ProtocolError, the socket destroyed.
 */
export function connectAndLogin(protocol: 'imap' | 'pop3', ep: Endpoint, connectTimeoutMs: number, login: MasterLogin): Promise<BackendSession> {
  return new Promise<BackendSession>((resolve, reject) => {
    new MasterDialogue(protocol, ep, connectTimeoutMs, login, resolve, reject);
  });
}

class MasterDialogue implements BackendInput {
  readonly socket: net.Socket;
  relayed = 0;
  private step = Step.Connecting;
  private buf: Buffer = EMPTY;
  private readonly pump = new ReadPump();
  private relaying = false;
  /** Read after the login finished and before the relay started. */
  private early: Buffer[] | null = null;
  private timer: NodeJS.Timeout;
  /** When the login must be done (0 while connecting: the timer then bounds the connect). */
  private deadline = 0;
  private caps: string | null = null;
  private tagN = 0;
  /** The tag whose tagged answer is awaited (IMAP). */
  private waitTag = '';
  /** Sent after the next continuation request ('+'), once (IMAP AUTHENTICATE without SASL-IR). */
  private continuation: string | null = null;
  private idStatus = '';
  private idLine = '';
  private authLine = '';
  private authRetried = false;
  readonly onread: { buffer: () => Uint8Array; callback: (nread: number, buf: Uint8Array) => boolean };
  private readonly onError: (err: Error) => void;
  private readonly onGone: () => void;

  constructor(
    private readonly protocol: 'imap' | 'pop3',
    private readonly ep: Endpoint,
    private readonly connectTimeoutMs: number,
    private readonly login: MasterLogin,
    private resolve: ((s: BackendSession) => void) | null,
    private reject: ((e: Error) => void) | null,
  ) {
    // Listeners are assigned, not declared as named functions: under the TypeScript loader each
    // named closure gets a run-time name (Object.defineProperty) every time it is made.
    const pumpRead = this.pump.onread;
    const onread = (this.onread = { buffer: pumpRead.buffer, callback: pumpRead.callback });
    onread.callback = (nread, buf) => {
      if (this.relaying) {
        this.relayed += nread;
        return pumpRead.callback(nread, buf);
      }
      // A copy: the buffer read into is shared.
      const chunk = Buffer.from(buf.subarray(0, nread));
      if (this.step !== Step.Done) this.feed(chunk);
      else (this.early ??= []).push(chunk);
      return true;
    };
    this.onError = (err) => {
      if (this.step === Step.Connecting) this.fail(new UnavailableError(`cannot connect to ${this.ep.host}:${this.ep.port}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, { cause: err }));
      else this.fail(new UnavailableError('backend closed the connection'));
    };
    this.onGone = () => this.fail(new UnavailableError(this.step === Step.Connecting ? `cannot connect to ${this.ep.host}:${this.ep.port}: closed` : 'backend closed the connection'));
    // noDelay as an option: Node sets it once, after the connect. (setNoDelay() on the
    // connecting socket sets it at once and again after the connect: two setsockopt calls.)
    const socket = (this.socket = net.connect({ host: ep.host, port: ep.port, onread: this.onread, noDelay: true }));
    socket.on('error', ignoreError);
    socket.on('error', this.onError);
    socket.once('end', this.onGone);
    socket.once('close', this.onGone);
    socket.once('connect', () => this.connected());
    this.timer = setTimeout(() => this.timedOut(), connectTimeoutMs);
  }

  private connected(): void {
    if (this.step !== Step.Connecting) return;
    this.step = Step.Greeting;
    // One timer for the connect and the login: it is left running and re-armed for what is
    // left when it fires early (a login takes milliseconds, the bounds are seconds).
    this.deadline = Date.now() + this.login.timeoutMs;
    if (this.login.timeoutMs > this.connectTimeoutMs) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.timedOut(), this.login.timeoutMs);
  }

  private timedOut(): void {
    if (this.step === Step.Done) return;
    if (this.step === Step.Connecting) {
      this.fail(new UnavailableError(`connect to ${this.ep.host}:${this.ep.port} timed out after ${this.connectTimeoutMs} ms`));
      return;
    }
    const left = this.deadline - Date.now();
    if (left > 0) {
      this.timer = setTimeout(() => this.timedOut(), left);
      return;
    }
    this.fail(new TimeoutError('backend did not answer in time'));
  }

  /** Stops listening to the socket for the login (the relay's own listeners come next). */
  private detach(): void {
    clearTimeout(this.timer);
    const s = this.socket;
    s.off('error', this.onError);
    s.off('end', this.onGone);
    s.off('close', this.onGone);
  }

  private fail(err: Error): void {
    if (this.step === Step.Done) return;
    this.step = Step.Done;
    this.detach();
    this.socket.destroy();
    const reject = this.reject!;
    this.resolve = this.reject = null;
    reject(err);
  }

  private succeed(okLine: string): void {
    this.step = Step.Done;
    this.detach();
    const leftover = this.buf;
    this.buf = EMPTY;
    const resolve = this.resolve!;
    this.resolve = this.reject = null;
    resolve({ socket: this.socket, capabilities: this.protocol === 'imap' ? this.caps : null, okLine, leftover, input: this });
  }

  takeEarly(): Buffer[] {
    const early = this.early ?? [];
    this.early = null;
    return early;
  }

  startRelay(socket: net.Socket, client: net.Socket): void {
    if (this.early) {
      for (const c of this.early) {
        this.relayed += c.length;
        client.write(c);
      }
      this.early = null;
    }
    this.relaying = true;
    this.pump.start(socket, client);
  }

  private write(text: string): void {
    this.socket.write(text);
  }

  private feed(chunk: Buffer): void {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    try {
      if (this.buf.length > MAX_LINE * 2) throw new ProtocolError('backend line too long');
      for (;;) {
        const line = this.takeLine();
        if (line === null) return;
        if (this.protocol === 'imap') this.imapLine(line);
        else this.pop3Line(line);
        if (this.step === Step.Done) return;
      }
    } catch (err) {
      this.fail(err as Error);
    }
  }

  /** The next complete line (CRLF or LF; IMAP: with the literals that end lines appended), or null. */
  private takeLine(): string | null {
    const buf = this.buf;
    let at = 0;
    let out = '';
    for (;;) {
      const lf = buf.indexOf(0x0a, at);
      if (lf < 0) {
        if (buf.length - at > MAX_LINE) throw new ProtocolError('backend line too long');
        return null;
      }
      const end = lf > at && buf[lf - 1] === 0x0d ? lf - 1 : lf;
      const text = buf.toString('utf8', at, end);
      out += text;
      at = lf + 1;
      const lit = this.protocol === 'imap' && text.charCodeAt(text.length - 1) === 0x7d ? LITERAL_AT_END.exec(text) : null;
      if (lit) {
        const size = Number(lit[1]);
        if (size > MAX_LINE) throw new ProtocolError('backend literal too large');
        if (buf.length - at < size) return null; // parsed again from the start when more comes
        out += buf.toString('utf8', at, at + size);
        at += size;
        continue;
      }
      this.buf = at === buf.length ? EMPTY : buf.subarray(at);
      return out;
    }
  }

  // ---- IMAP ---------------------------------------------------------------------------------

  private tag(): string {
    return `pg${++this.tagN}`;
  }

  private imapCommand(text: string, step: Step, continuation: string | null = null): void {
    this.waitTag = this.tag();
    this.continuation = continuation;
    this.step = step;
    this.write(`${this.waitTag} ${text}\r\n`);
  }

  private imapLine(line: string): void {
    if (this.step === Step.Greeting) {
      if (!/^\* OK\b/i.test(line)) throw new UnavailableError(`backend greeting is not OK: ${line.slice(0, 120)}`);
      this.caps = CAPABILITY_CODE.exec(line)?.[1] ?? null;
      if (!this.caps) this.imapCommand('CAPABILITY', Step.CapaBefore);
      else this.imapLogin();
      return;
    }
    if (line.charCodeAt(0) === 0x2b /* + */) {
      // A continuation request: the credentials when AUTHENTICATE waits for them, else cancel it.
      const c = this.continuation;
      this.continuation = null;
      this.write(c !== null ? `${c}\r\n` : '*\r\n');
      return;
    }
    if (line.charCodeAt(0) === 0x2a /* * */) {
      const cap = CAPABILITY_LINE.exec(line);
      if (cap) this.caps = cap[1]!;
      return;
    }
    const tag = this.waitTag;
    if (!line.startsWith(tag) || line.charCodeAt(tag.length) !== 0x20) return;
    const rest = line.slice(tag.length + 1);
    const sp = rest.indexOf(' ');
    const status = (sp < 0 ? rest : rest.slice(0, sp)).toUpperCase();
    switch (this.step) {
      case Step.CapaBefore:
        this.imapLogin();
        return;
      case Step.Id:
        if (status !== 'OK') throw new UnavailableError(`backend refused ID: ${line.slice(0, 120)}`);
        this.caps = null; // pre-login capabilities do not count; the login answer (or a CAPABILITY after it) does
        this.imapAuthenticate(false);
        return;
      case Step.IdPipelined:
        // The AUTHENTICATE written with it is answered next.
        this.idStatus = status;
        this.idLine = line;
        this.waitTag = `pg${this.tagN}`;
        this.step = Step.Auth;
        return;
      case Step.Auth: {
        if (this.idStatus !== '' && this.idStatus !== 'OK') throw new UnavailableError(`backend refused ID: ${this.idLine.slice(0, 120)}`);
        if (status !== 'OK') {
          if (/\[(UNAVAILABLE|SERVERBUG|INUSE|LIMIT)\]/i.test(rest) || /temporar/i.test(rest)) throw new UnavailableError(`backend login failed: ${rest.slice(0, 160)}`);
          throw new AuthError(`backend refused the master login: ${rest.slice(0, 160)}`);
        }
        const fromOk = CAPABILITY_CODE.exec(line)?.[1] ?? null;
        if (fromOk) this.caps = fromOk;
        if (!this.caps) {
          this.authLine = line;
          this.imapCommand('CAPABILITY', Step.CapaAfter);
          return;
        }
        this.succeed(line);
        return;
      }
      case Step.CapaAfter:
        this.succeed(this.authLine);
        return;
      default:
        return;
    }
  }

  private imapLogin(): void {
    const login = this.login;
    const ir = this.caps ? SASL_IR.test(this.caps) : false;
    const idText = login.client
      ? `ID (${imapQuote('x-originating-ip')} ${imapQuote(login.client.address)} ${imapQuote('x-originating-port')} ${imapQuote(String(login.client.port))})`
      : null;
    if (idText && ir) {
      // ID and AUTHENTICATE with an initial response written together (RFC 3501 allows
      // pipelining; neither waits for a continuation): one round trip to the pair fewer per
      // login. ID is answered before the login runs, so the pair has the address by then.
      const idTag = this.tag();
      const authTag = this.tag();
      this.caps = null; // pre-login capabilities do not count; the login answer (or a CAPABILITY after it) does
      this.waitTag = idTag;
      this.continuation = null;
      this.step = Step.IdPipelined;
      this.write(`${idTag} ${idText}\r\n${authTag} AUTHENTICATE PLAIN ${saslPlain(login.uid, login.masterUser, login.masterSecret)}\r\n`);
      return;
    }
    if (idText) {
      this.imapCommand(idText, Step.Id);
      return;
    }
    this.caps = null;
    this.imapAuthenticate(ir);
  }

  private imapAuthenticate(ir: boolean): void {
    const creds = saslPlain(this.login.uid, this.login.masterUser, this.login.masterSecret);
    if (ir) this.imapCommand(`AUTHENTICATE PLAIN ${creds}`, Step.Auth);
    else this.imapCommand('AUTHENTICATE PLAIN', Step.Auth, creds);
  }

  // ---- POP3 ---------------------------------------------------------------------------------

  private pop3Line(line: string): void {
    const login = this.login;
    switch (this.step) {
      case Step.Greeting: {
        if (!line.startsWith('+OK')) throw new UnavailableError(`backend greeting is not +OK: ${line.slice(0, 120)}`);
        // XCLIENT and AUTH with its initial response in one write (RFC 2449 PIPELINING, which
        // Dovecot and the store both handle): one round trip to the pair fewer per login. The
        // answers come in order; a refused XCLIENT fails the login whatever AUTH answered.
        const auth = `AUTH PLAIN ${saslPlain(login.uid, login.masterUser, login.masterSecret)}\r\n`;
        this.write(login.client ? `XCLIENT ADDR=${login.client.address} PORT=${login.client.port}\r\n${auth}` : auth);
        this.step = login.client ? Step.Xclient : Step.Auth;
        return;
      }
      case Step.Xclient:
        if (!line.startsWith('+OK')) throw new UnavailableError(`backend refused XCLIENT: ${line.slice(0, 120)}`);
        this.step = Step.Auth;
        return;
      case Step.Auth:
        if (line.startsWith('+ ') && !this.authRetried) {
          // A server without initial-response support asks again: send the credentials once more.
          this.authRetried = true;
          this.write(`${saslPlain(login.uid, login.masterUser, login.masterSecret)}\r\n`);
          return;
        }
        if (!line.startsWith('+OK')) {
          if (/\[(SYS\/TEMP|IN-USE|LOGIN-DELAY)\]/i.test(line)) throw new UnavailableError(`backend login failed: ${line.slice(0, 160)}`);
          throw new AuthError(`backend refused the master login: ${line.slice(0, 160)}`);
        }
        this.succeed(line);
        return;
      default:
        return;
    }
  }
}
