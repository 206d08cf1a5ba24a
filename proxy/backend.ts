/**
 * The proxy's side of a pair's IMAP/POP3 service: connect to the pair's floating address,
 * read the greeting, forward the client's address (IMAP `ID x-originating-ip/port`, POP3
 * `XCLIENT ADDR/PORT`), and log in as the master account on the user's behalf with SASL PLAIN
 * (authorization identity = uid). Works with Dovecot and with pairgate's own store, which
 * behaves the same way. Every wait is bounded; failures are typed:
 * UnavailableError (connect, greeting, [UNAVAILABLE]: worth retrying while holding) or
 * AuthError (the pair refused the master login: configuration, never retried).
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

export interface BackendSession {
  socket: net.Socket;
  /** IMAP: the backend's post-login CAPABILITY list (without the word CAPABILITY); null if it sent none. */
  capabilities: string | null;
  /** POP3: the backend's answer to AUTH (e.g. `+OK Logged in.`), sent on to the client. */
  okLine: string;
  /** Bytes the backend sent after its login answer (rare), to be forwarded first. */
  leftover: Buffer;
  /** The socket's reads: it was connected with this BackendInput's `onread` (so it emits no 'data'). */
  input: BackendInput;
}

/**
 * Where a pair connection's reads go. The socket is made with this object's `onread` (Node
 * reads into buffers the relay's ReadPump provides, see common/relay.ts): during the login
 * dialogue each read is handed on as a copy (the buffer read into is shared), and once the
 * session is spliced, reads go through the pump straight to the client, from buffers that are
 * reused rather than a fresh 64 KiB one per read. What arrives while nobody listens (between
 * the dialogue and the splice) is kept and written to the client first.
 */
export class BackendInput {
  private readonly pump = new ReadPump();
  private toLogin: ((chunk: Buffer) => void) | null = null;
  private early: Buffer[] = [];
  private relaying = false;
  /** Bytes read since the relay started. */
  relayed = 0;
  readonly onread: { buffer: () => Uint8Array; callback: (nread: number, buf: Uint8Array) => boolean } = {
    buffer: () => this.pump.onread.buffer(),
    callback: (nread, buf) => {
      if (this.relaying) {
        this.relayed += nread;
        return this.pump.onread.callback(nread, buf);
      }
      const chunk = Buffer.from(buf.subarray(0, nread)); // a copy: the buffer read into is shared
      if (this.toLogin) this.toLogin(chunk);
      else this.early.push(chunk);
      return true;
    },
  };

  /** The login dialogue's reader. */
  listen(fn: (chunk: Buffer) => void): void {
    this.toLogin = fn;
    const early = this.early;
    this.early = [];
    for (const c of early) fn(c);
  }

  unlisten(): void {
    this.toLogin = null;
  }

  /**
   * Relays what `socket` (made with this `onread`) reads into `client` from now on, with the
   * pump's backpressure, and ends the client when the socket ends. Bytes read since the dialogue
   * stopped listening are written first.
   */
  startRelay(socket: net.Socket, client: net.Socket): void {
    for (const c of this.early) {
      this.relayed += c.length;
      client.write(c);
    }
    this.early = [];
    this.toLogin = null;
    this.relaying = true;
    this.pump.start(socket, client);
  }
}

const MAX_LINE = 64 * 1024;

export function connectTcp(ep: Endpoint, timeoutMs: number, input?: BackendInput): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: ep.host, port: ep.port, ...(input ? { onread: input.onread } : {}) });
    socket.setNoDelay(true);
    const done = (err: Error | null) => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.off('error', onError);
      if (err) {
        socket.destroy();
        reject(err);
      } else resolve(socket);
    };
    const onConnect = () => done(null);
    const onError = (err: Error) => done(new UnavailableError(`cannot connect to ${ep.host}:${ep.port}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, { cause: err }));
    const timer = setTimeout(() => done(new UnavailableError(`connect to ${ep.host}:${ep.port} timed out after ${timeoutMs} ms`)), timeoutMs);
    socket.once('connect', onConnect);
    socket.once('error', onError);
  });
}

/**
 * Reads CRLF lines (IMAP literals at a line end are read and appended) from a socket, with a
 * deadline. One timer per reader, armed at the first wait and cleared at detach (not a timer
 * and a closure per wait: a login waits two or three times).
 */
export class LineReader {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private ended: Error | null = null;
  private timer: NodeJS.Timeout | null = null;
  private timedOut = false;
  private readonly onData = (chunk: Buffer) => {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    if (this.buf.length > MAX_LINE * 2) this.ended = new ProtocolError('backend line too long');
    this.wakeUp();
  };
  private readonly onEnd = () => {
    this.ended ??= new UnavailableError('backend closed the connection');
    this.wakeUp();
  };
  private readonly onTimer = () => {
    this.timer = null;
    this.timedOut = true;
    this.wakeUp();
  };
  private readonly parkWaiter = (resolve: () => void) => {
    this.wake = resolve;
  };

  constructor(
    private readonly socket: net.Socket,
    private readonly deadline: number,
    private readonly input: BackendInput | null = null,
  ) {
    if (input) input.listen(this.onData);
    else socket.on('data', this.onData);
    socket.once('end', this.onEnd);
    socket.once('close', this.onEnd);
    socket.on('error', this.onEnd);
  }

  private wakeUp(): void {
    const w = this.wake;
    if (w) {
      this.wake = null;
      w();
    }
  }

  private async waitMore(): Promise<void> {
    if (this.ended) throw this.ended;
    if (this.timedOut || this.deadline - Date.now() <= 0) throw new TimeoutError('backend did not answer in time');
    this.timer ??= setTimeout(this.onTimer, this.deadline - Date.now());
    await new Promise<void>(this.parkWaiter);
  }

  async line(imapLiterals = false): Promise<string> {
    let out = '';
    for (;;) {
      const lf = this.buf.indexOf(0x0a);
      if (lf < 0) {
        if (this.buf.length > MAX_LINE) throw new ProtocolError('backend line too long');
        await this.waitMore();
        continue;
      }
      const text = this.buf.subarray(0, lf).toString('utf8').replace(/\r$/, '');
      this.buf = this.buf.subarray(lf + 1);
      out += text;
      const lit = imapLiterals ? /\{(\d{1,9})\}$/.exec(text) : null;
      if (!lit) return out;
      const size = Number(lit[1]);
      if (size > MAX_LINE) throw new ProtocolError('backend literal too large');
      while (this.buf.length < size) await this.waitMore();
      out += this.buf.subarray(0, size).toString('utf8');
      this.buf = this.buf.subarray(size);
    }
  }

  /** Stops reading; returns what was read past the last line. */
  detach(): Buffer {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    this.wake = null;
    if (this.input) this.input.unlisten();
    else this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onEnd);
    const rest = this.buf;
    this.buf = Buffer.alloc(0);
    return rest;
  }
}

export function saslPlain(authzid: string, authcid: string, password: string): string {
  return Buffer.from(`${authzid}\0${authcid}\0${password}`, 'utf8').toString('base64');
}

function imapQuote(s: string): string {
  return `"${s.replace(/[\\"]/g, (c) => `\\${c}`)}"`;
}

/** IMAP: greeting, ID with the client address, AUTHENTICATE PLAIN as master for uid. */
export async function imapMasterLogin(socket: net.Socket, login: MasterLogin, input: BackendInput): Promise<BackendSession> {
  const reader = new LineReader(socket, Date.now() + login.timeoutMs, input);
  try {
    const greeting = await reader.line(true);
    if (!/^\* OK\b/i.test(greeting)) {
      throw new UnavailableError(`backend greeting is not OK: ${greeting.slice(0, 120)}`);
    }
    let caps = /\[CAPABILITY ([^\]]*)\]/i.exec(greeting)?.[1] ?? null;
    let n = 0;
    const send = (...texts: string[]): string[] => {
      // Several commands in one write (one system call, one segment).
      const tags = texts.map(() => `pg${++n}`);
      socket.write(texts.map((t, i) => `${tags[i]} ${t}\r\n`).join(''));
      return tags;
    };
    const answer = async (tag: string, continuation?: string): Promise<{ status: string; line: string }> => {
      for (;;) {
        const line = await reader.line(true);
        if (line.startsWith('+') && continuation !== undefined) {
          socket.write(`${continuation}\r\n`);
          continuation = undefined;
          continue;
        }
        if (line.startsWith('+')) {
          socket.write('*\r\n'); // cancel an unexpected continuation
          continue;
        }
        const cap = /^\* CAPABILITY (.*)$/i.exec(line);
        if (cap) caps = cap[1]!;
        if (line.startsWith(`${tag} `)) {
          const status = line.slice(tag.length + 1).split(' ')[0]!.toUpperCase();
          return { status, line };
        }
      }
    };
    const command = (text: string, continuation?: string) => answer(send(text)[0]!, continuation);
    if (!caps) {
      await command('CAPABILITY');
    }
    const ir = caps ? /(^| )SASL-IR( |$)/i.test(caps) : false;
    const creds = saslPlain(login.uid, login.masterUser, login.masterSecret);
    const idText = login.client
      ? `ID (${imapQuote('x-originating-ip')} ${imapQuote(login.client.address)} ${imapQuote('x-originating-port')} ${imapQuote(String(login.client.port))})`
      : null;
    let auth: { status: string; line: string };
    if (idText && ir) {
      // ID and AUTHENTICATE with an initial response written together (RFC 3501 allows
      // pipelining; neither waits for a continuation): one round trip to the pair fewer per
      // login. ID is answered before the login runs, so the pair has the address by then.
      const [idTag, authTag] = send(idText, `AUTHENTICATE PLAIN ${creds}`) as [string, string];
      caps = null; // pre-login capabilities do not count; the login answer (or a CAPABILITY after it) does
      const id = await answer(idTag);
      auth = await answer(authTag);
      if (id.status !== 'OK') throw new UnavailableError(`backend refused ID: ${id.line.slice(0, 120)}`);
    } else {
      if (idText) {
        const id = await command(idText);
        if (id.status !== 'OK') throw new UnavailableError(`backend refused ID: ${id.line.slice(0, 120)}`);
      }
      caps = null; // pre-login capabilities do not count; the login answer (or a CAPABILITY after it) does
      auth = ir ? await command(`AUTHENTICATE PLAIN ${creds}`) : await command('AUTHENTICATE PLAIN', creds);
    }
    if (auth.status !== 'OK') {
      const text = auth.line.replace(/^\S+ /, '');
      if (/\[(UNAVAILABLE|SERVERBUG|INUSE|LIMIT)\]/i.test(text) || /temporar/i.test(text)) throw new UnavailableError(`backend login failed: ${text.slice(0, 160)}`);
      throw new AuthError(`backend refused the master login: ${text.slice(0, 160)}`);
    }
    const fromOk = /\[CAPABILITY ([^\]]*)\]/i.exec(auth.line)?.[1] ?? null;
    caps = fromOk ?? caps;
    if (!caps) {
      await command('CAPABILITY');
    }
    return { socket, capabilities: caps, okLine: auth.line, leftover: reader.detach(), input };
  } catch (err) {
    reader.detach();
    throw err;
  }
}

/** POP3: greeting, XCLIENT with the client address, AUTH PLAIN as master for uid. */
export async function pop3MasterLogin(socket: net.Socket, login: MasterLogin, input: BackendInput): Promise<BackendSession> {
  const reader = new LineReader(socket, Date.now() + login.timeoutMs, input);
  try {
    const greeting = await reader.line();
    if (!greeting.startsWith('+OK')) throw new UnavailableError(`backend greeting is not +OK: ${greeting.slice(0, 120)}`);
    // XCLIENT and AUTH with its initial response in one write (RFC 2449 PIPELINING, which
    // Dovecot and the store both handle): one round trip to the pair fewer per login. The
    // answers come in order; a refused XCLIENT fails the login whatever AUTH answered.
    const auth = `AUTH PLAIN ${saslPlain(login.uid, login.masterUser, login.masterSecret)}\r\n`;
    socket.write(login.client ? `XCLIENT ADDR=${login.client.address} PORT=${login.client.port}\r\n${auth}` : auth);
    if (login.client) {
      const x = await reader.line();
      if (!x.startsWith('+OK')) throw new UnavailableError(`backend refused XCLIENT: ${x.slice(0, 120)}`);
    }
    let answer = await reader.line();
    if (answer.startsWith('+ ')) {
      // A server without initial-response support asks again: send the credentials once more.
      socket.write(`${saslPlain(login.uid, login.masterUser, login.masterSecret)}\r\n`);
      answer = await reader.line();
    }
    if (!answer.startsWith('+OK')) {
      if (/\[(SYS\/TEMP|IN-USE|LOGIN-DELAY)\]/i.test(answer)) throw new UnavailableError(`backend login failed: ${answer.slice(0, 160)}`);
      throw new AuthError(`backend refused the master login: ${answer.slice(0, 160)}`);
    }
    return { socket, capabilities: null, okLine: answer, leftover: reader.detach(), input };
  } catch (err) {
    reader.detach();
    throw err;
  }
}
