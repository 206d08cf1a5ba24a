/**
 * Real mail clients for the lab's tour and the day-two commands: nodemailer for SMTP, imapflow
 * for IMAP, and a small POP3 client (no well-kept POP3 client library exists for Node). Every
 * network wait is bounded; errors carry the server's reply so the tour can print it.
 */
import net from 'node:net';
import nodemailer from 'nodemailer';
import { ImapFlow } from 'imapflow';

export interface Endpoint {
  host: string;
  port: number;
}

export interface Credentials {
  user: string;
  password: string;
  /** Master login: authenticate as `user` on behalf of `authzid` (SASL PLAIN). */
  authzid?: string;
}

const TIMEOUT_MS = 10_000;

/** Sends one message over SMTP (opportunistic STARTTLS, lab certificates are self-signed). */
export async function sendMail(
  at: Endpoint,
  mail: { from: string; to: string[]; subject: string; text: string; headers?: Record<string, string> },
  auth?: Credentials,
): Promise<{ accepted: string[]; rejected: string[]; response: string }> {
  const transport = nodemailer.createTransport({
    host: at.host,
    port: at.port,
    secure: false,
    tls: { rejectUnauthorized: false },
    connectionTimeout: TIMEOUT_MS,
    greetingTimeout: TIMEOUT_MS,
    socketTimeout: TIMEOUT_MS * 3,
    ...(auth ? { auth: { user: auth.user, pass: auth.password } } : {}),
  });
  try {
    const info = await transport.sendMail({
      from: mail.from,
      to: mail.to,
      subject: mail.subject,
      text: mail.text,
      ...(mail.headers ? { headers: mail.headers } : {}),
    });
    return {
      accepted: info.accepted.map(String),
      rejected: info.rejected.map(String),
      response: info.response,
    };
  } finally {
    transport.close();
  }
}

export interface ImapMessageSummary {
  uid: number;
  subject: string;
  flags: string[];
}

/** Logs in over IMAP and lists INBOX's messages (subject and flags). */
export async function imapListInbox(at: Endpoint, creds: Credentials): Promise<ImapMessageSummary[]> {
  const client = new ImapFlow({
    host: at.host,
    port: at.port,
    secure: false,
    doSTARTTLS: false,
    auth: creds.authzid
      ? { user: creds.user, pass: creds.password, authzid: creds.authzid, loginMethod: 'AUTH=PLAIN' }
      : { user: creds.user, pass: creds.password },
    logger: false,
    connectionTimeout: TIMEOUT_MS,
    greetingTimeout: TIMEOUT_MS,
    socketTimeout: TIMEOUT_MS * 3,
  });
  // imapflow reports socket errors as events too; the awaited calls below carry them.
  client.on('error', () => undefined);
  await client.connect();
  try {
    const lock = await client.getMailboxLock('INBOX');
    try {
      const out: ImapMessageSummary[] = [];
      const exists = typeof client.mailbox === 'object' ? client.mailbox.exists : 0;
      if (exists === 0) return out;
      for await (const msg of client.fetch('1:*', { uid: true, envelope: true, flags: true })) {
        out.push({ uid: msg.uid, subject: msg.envelope?.subject ?? '', flags: [...(msg.flags ?? [])] });
      }
      return out;
    } finally {
      lock.release();
    }
  } finally {
    await client.logout().catch(() => client.close());
  }
}

/** A POP3 session over one socket: one command at a time, multi-line replies dot-unstuffed. */
export class Pop3Client {
  private buffer = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  private closed: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.waiter?.();
    });
    const onEnd = (err?: Error) => {
      this.closed = err ?? new Error('POP3 server closed the connection');
      this.waiter?.();
    };
    socket.on('error', onEnd);
    socket.on('close', () => onEnd());
  }

  static async connect(at: Endpoint, timeoutMs = TIMEOUT_MS): Promise<Pop3Client> {
    const socket = net.connect(at.port, at.host);
    socket.setTimeout(timeoutMs, () => socket.destroy(new Error(`POP3 ${at.host}:${at.port}: timed out`)));
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new Pop3Client(socket);
    await client.expectOk(await client.readLine());
    return client;
  }

  private async waitFor<T>(take: () => T | null): Promise<T> {
    for (;;) {
      const got = take();
      if (got !== null) return got;
      if (this.closed) throw this.closed;
      await new Promise<void>((resolve) => (this.waiter = resolve));
      this.waiter = null;
    }
  }

  private readLine(): Promise<string> {
    return this.waitFor(() => {
      const end = this.buffer.indexOf('\r\n');
      if (end < 0) return null;
      const line = this.buffer.subarray(0, end).toString('latin1');
      this.buffer = this.buffer.subarray(end + 2);
      return line;
    });
  }

  private async expectOk(line: string): Promise<string> {
    if (!line.startsWith('+OK')) throw new Error(`POP3: ${line}`);
    return line;
  }

  async command(line: string): Promise<string> {
    this.socket.write(`${line}\r\n`);
    return this.expectOk(await this.readLine());
  }

  /** A command whose +OK is followed by a dot-terminated block. */
  async multiline(line: string): Promise<string[]> {
    await this.command(line);
    const lines: string[] = [];
    for (;;) {
      const l = await this.readLine();
      if (l === '.') return lines;
      lines.push(l.startsWith('..') ? l.slice(1) : l);
    }
  }

  async login(creds: Credentials): Promise<void> {
    await this.command(`USER ${creds.user}`);
    await this.command(`PASS ${creds.password}`);
  }

  async quit(): Promise<void> {
    await this.command('QUIT').catch(() => undefined);
    this.socket.end();
  }
}

/** Logs in over POP3 and returns each message's Subject (from TOP n 0). */
export async function pop3ListSubjects(at: Endpoint, creds: Credentials): Promise<string[]> {
  const client = await Pop3Client.connect(at);
  try {
    await client.login(creds);
    const listing = await client.multiline('LIST');
    const subjects: string[] = [];
    for (const entry of listing) {
      const n = entry.split(' ')[0];
      const headers = await client.multiline(`TOP ${n} 0`);
      const subject = headers.find((h) => /^subject:/i.test(h));
      subjects.push(subject ? subject.slice(subject.indexOf(':') + 1).trim() : '');
    }
    return subjects;
  } finally {
    await client.quit();
  }
}
